"""Profiles: how canonical events are shaped and sent for one kind of target. Chosen by an
explicit match on the configured name; one module each."""

from __future__ import annotations

from edge.config import DestinationConfig
from edge.forward.profiles.base import Profile
from edge.forward.profiles.canonical import CanonicalProfile
from edge.forward.profiles.qms_rest import QmsRestProfile
from edge.forward.profiles.sap_s4hana import SapS4HanaProfile
from edge.forward.session import Session


def create_profile(config: DestinationConfig, session: Session) -> Profile:
    match config.profile:
        case "canonical":
            return CanonicalProfile(config, session)
        case "sap_s4hana":
            return SapS4HanaProfile(config, session)
        case "qms_rest":
            return QmsRestProfile(config, session)


__all__ = ["Profile", "create_profile"]
