"""Profiles: how canonical events are shaped and sent for one kind of target. Chosen by an
explicit match on the configured name; one module each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge.config.destinations import DestinationConfig
from edge.config.models import PlantConfig
from edge.forward.profiles.base import Profile
from edge.forward.profiles.canonical import CanonicalProfile
from edge.forward.profiles.jetstream import JetStreamProfile
from edge.forward.profiles.qms_rest import QmsRestProfile
from edge.forward.profiles.sap_s4hana import SapS4HanaProfile, field_problems
from edge.forward.session import Session


def create_profile(config: DestinationConfig, session: Session) -> Profile:
    match config.profile:
        case "canonical":
            return CanonicalProfile(config, session)
        case "sap_s4hana":
            return SapS4HanaProfile(config, session)
        case "qms_rest":
            return QmsRestProfile(config, session)
        case "jetstream":
            return JetStreamProfile(config, session)


def input_problems(config: PlantConfig, event_type: str, data: Mapping[str, Any]) -> str | None:
    """Why a destination this event type is routed to would refuse this input (a value longer
    than its field, a unit it cannot be told), so it becomes an input dead letter before
    anything is sent; None when every destination can take it."""
    problems = []
    for name in config.destinations_for(event_type):
        destination = config.destinations.get(name)
        if destination is None:
            continue
        match destination.profile:
            case "sap_s4hana":
                found = field_problems(event_type, data, destination.sap)
            case "canonical" | "qms_rest" | "jetstream":
                found = []
        problems += [f"{problem} (destination {name})" for problem in found]
    return "; ".join(problems) or None


__all__ = ["Profile", "create_profile", "input_problems"]
