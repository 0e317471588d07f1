"""What the models cannot check one section at a time: cross references (signals name a configured
driver tag, routes a known event type and a configured destination, ...), SAP settings, secrets
that would cross the network in cleartext; and warnings about settings that are valid but
probably not what was meant (Modicon-style Modbus addresses, Rec 21 package codes).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from drivers.mqtt import MqttConfig
from edge.config.destinations import (
    PROFILE_EVENT_TYPES,
    DestinationConfig,
    NoAuth,
    OAuth2ClientCredentials,
)
from edge.config.errors import Loc, Problem
from edge.config.models import PlantConfig, is_loopback_host
from edge.config.orders import ORDERS_DESTINATION
from edge.hub.settings import NatsNoAuth
from edge.model.codes import REC21_PACKAGE_CODES
from edge.model.events import EVENT_MODELS


def cross_check(config: PlantConfig) -> Iterator[Problem]:
    tags = {f"{d.name}.{t.name}" for d in config.drivers for t in getattr(d, "tags", ())}

    def unknown_signal(signal: str, loc: Loc) -> Iterator[Problem]:
        if signal not in tags:
            known = difflib.get_close_matches(signal, sorted(tags), n=1)
            hint = f" (did you mean {known[0]!r}?)" if known else ""
            yield Problem(loc, f"no driver tag named {signal!r}{hint}")

    def unknown_uom(code: str, loc: Loc) -> Iterator[Problem]:
        if code not in config.all_uom_codes:
            yield Problem(
                loc,
                f"{code!r} is not a known UN/ECE Rec 20 unit code; add it to "
                "uom_codes if your ERP uses it",
            )

    names: dict[str, int] = {}
    for i, driver in enumerate(config.drivers):
        if driver.name in names:
            yield Problem(("drivers", i, "name"), f"driver {driver.name!r} is defined twice")
        names[driver.name] = i
    machine_ids: set[str] = set()
    for i, machine in enumerate(config.machines):
        at: Loc = ("machines", i)
        if machine.id in machine_ids:
            yield Problem((*at, "id"), f"machine {machine.id!r} is defined twice")
        machine_ids.add(machine.id)
        for key, signal in machine.signals.model_dump().items():
            if signal is not None:
                yield from unknown_signal(signal, (*at, "signals", key))
        if machine.signals.state is not None and not machine.state_map:
            yield Problem(
                (*at, "state_map"),
                "signals.state needs a state_map (the machine's "
                "state numbers to PackML names, e.g. {6: Execute, 11: Held})",
            )
        yield from unknown_uom(machine.confirm.uom, (*at, "confirm", "uom"))
        for j, limit in enumerate(machine.limits):
            yield from unknown_signal(limit.signal, (*at, "limits", j, "signal"))
            yield from unknown_uom(limit.uom, (*at, "limits", j, "uom"))
    for loc, what, host in cleartext_secrets(config):
        if not _allows_insecure(config, loc):
            yield Problem(
                loc,
                f"{what} would cross the network in cleartext to {host}: use "
                "TLS (https://, or tls: for a broker), or set allow_insecure: true "
                "in this section if the network is trusted",
            )
    qms = config.quality.qms
    if qms is not None and (destination := config.destinations.get(qms)) is None:
        yield Problem(("quality", "qms"), f"no destination named {qms!r} under destinations")
    elif qms is not None and destination is not None and destination.profile != "qms_rest":
        yield Problem(
            ("quality", "qms"),
            f"destination {qms!r} has profile "
            f"{destination.profile}; dispositions are polled from a qms_rest one",
        )
    yield from _orders_problems(config)
    yield from _sap_problems(config)
    yield from _ops_problems(config)
    for event_type, destinations in config.routes.items():
        if event_type not in EVENT_MODELS:
            close = difflib.get_close_matches(event_type, list(EVENT_MODELS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            yield Problem(("routes", event_type), f"unknown event type{hint}")
        for j, name in enumerate(destinations):
            destination = config.destinations.get(name)
            if destination is None:
                yield Problem(
                    ("routes", event_type, j), f"no destination named {name!r} under destinations"
                )
                continue
            supported = PROFILE_EVENT_TYPES[destination.profile]
            if supported is not None and event_type not in supported:
                yield Problem(
                    ("routes", event_type, j),
                    f"destination {name!r} (profile {destination.profile}) cannot "
                    f"take {event_type}; it takes {', '.join(sorted(supported))}",
                )


def _orders_problems(config: PlantConfig) -> Iterator[Problem]:
    orders = config.orders
    if ORDERS_DESTINATION in config.destinations:
        yield Problem(
            ("destinations", ORDERS_DESTINATION),
            f"{ORDERS_DESTINATION!r} is the "
            "name of the released orders' MQTT destination: choose another name",
        )
    if orders is None:
        if config.validation.require_released_order:
            yield Problem(
                ("validation", "require_released_order"),
                "needs the orders section (which orders ERP released)",
            )
        return
    source = config.destinations.get(orders.source)
    if source is None:
        yield Problem(
            ("orders", "source"), f"no destination named {orders.source!r} under destinations"
        )
    elif source.profile not in ("sap_s4hana", "canonical"):
        yield Problem(
            ("orders", "source"),
            f"destination {orders.source!r} has profile "
            f"{source.profile}; orders are polled from a sap_s4hana or canonical one",
        )


def _ops_problems(config: PlantConfig) -> Iterator[Problem]:
    """Names the `reconcile:` and `exceptions:` sections refer to."""
    erp = config.reconcile.erp
    if erp is not None and erp not in config.destinations:
        yield Problem(("reconcile", "erp"), f"no destination named {erp!r} under destinations")
    elif erp is not None and config.destinations[erp].profile not in ("sap_s4hana", "canonical"):
        yield Problem(
            ("reconcile", "erp"),
            f"destination {erp!r} has profile "
            f"{config.destinations[erp].profile}; reconcile reads a sap_s4hana or "
            "canonical ERP",
        )
    roles = config.exceptions.roles
    for kind, named in config.exceptions.routes.items():
        for j, role in enumerate(named):
            # With no roles configured, every role is heard through GET /exceptions and
            # status only; once some are, a name that is none of them is a typo.
            if roles and role not in roles:
                yield Problem(
                    ("exceptions", "routes", kind, j),
                    f"no role named {role!r} under exceptions.roles",
                )
    for role, channels in roles.items():
        for j, name in enumerate(channels.webhook):
            destination = config.destinations.get(name)
            if destination is None:
                yield Problem(
                    ("exceptions", "roles", role, "webhook", j),
                    f"no destination named {name!r} under destinations",
                )
            elif destination.profile != "canonical":
                yield Problem(
                    ("exceptions", "roles", role, "webhook", j),
                    f"destination {name!r} has profile {destination.profile}; a "
                    "webhook is a canonical destination (JSON POST)",
                )
        if channels.mqtt is not None and not any(
            isinstance(d, MqttConfig) and d.name == channels.mqtt.driver for d in config.drivers
        ):
            yield Problem(
                ("exceptions", "roles", role, "mqtt", "driver"),
                f"no MQTT driver named {channels.mqtt.driver!r} under drivers",
            )


def _sap_problems(config: PlantConfig) -> Iterator[Problem]:
    """Values in the file that a sap_s4hana destination would send and SAP would refuse:
    longer than SAP's field, or settings SAP needs that are missing."""
    # Imported here: the profile imports this module for its config types.
    from edge.forward.profiles.sap_s4hana import CONFIG_LIMITS, FIELD_LIMITS

    limits = {**FIELD_LIMITS, **CONFIG_LIMITS}
    for name, destination in config.destinations.items():
        at: Loc = ("destinations", name, "sap")
        if destination.profile != "sap_s4hana":
            if "sap" in destination.model_fields_set:
                yield Problem(
                    at, f"sap settings apply to profile sap_s4hana, not {destination.profile}"
                )
            continue

        def too_long(
            value: str | None, field: str, loc: Loc, destination: str = name
        ) -> Iterator[Problem]:
            limit = limits[field]
            if value is not None and len(value) > limit.max_length:
                yield Problem(
                    loc,
                    f"{value!r} has {len(value)} characters; SAP's "
                    f"{limit.name} takes at most {limit.max_length} (destination "
                    f"{destination!r})",
                )

        yield from too_long(config.site, "site", ("site",))
        for i, machine in enumerate(config.machines):
            if machine.order is not None:
                for field in ("order_id", "operation", "material", "lot_id"):
                    yield from too_long(
                        getattr(machine.order, field), field, ("machines", i, "order", field)
                    )
        sap = destination.sap
        yield from too_long(
            sap.goods_receipt_storage_location,
            "goods_receipt_storage_location",
            (*at, "goods_receipt_storage_location"),
        )
        yield from too_long(sap.order_item, "order_item", (*at, "order_item"))
        for disposition, decision in sap.usage_decisions.items():
            for field in ("code", "code_group", "selected_set", "selected_set_plant", "catalog"):
                yield from too_long(
                    getattr(decision, field), field, (*at, "usage_decisions", disposition, field)
                )
        for uom, unit in sap.units.items():
            for field in ("iso", "internal"):
                yield from too_long(getattr(unit, field), field, (*at, "units", uom, field))
        if name in config.routes.get("lot.disposition", []):
            for disposition in ("release", "reject"):
                if disposition not in sap.usage_decisions:
                    yield Problem(
                        (*at, "usage_decisions"),
                        f"lot.disposition goes to "
                        f"{name!r}: set the usage decision code, code_group and "
                        f"selected_set SAP posts for {disposition}",
                    )


def rec20_units(data: Any) -> Iterator[tuple[Loc, str]]:
    """Replace, in place, the Rec 21 package codes an earlier release took as units (BX, CT,
    PF...) by their Rec 20 codes (XBX, XCT, XPX...), saying where."""

    def replaced(code: object, loc: Loc) -> Iterator[tuple[Loc, str]]:
        if isinstance(code, str) and code in REC21_PACKAGE_CODES:
            yield (
                loc,
                (
                    f"{code!r} is a UN/ECE Rec 21 package code, not a Rec 20 unit; read as "
                    f"{REC21_PACKAGE_CODES[code]!r}: write that"
                ),
            )

    if not isinstance(data, dict):
        return
    codes = data.get("uom_codes")
    if isinstance(codes, list):
        for i, code in enumerate(codes):
            for found in replaced(code, ("uom_codes", i)):
                codes[i] = REC21_PACKAGE_CODES[code]
                yield found
    machines = data.get("machines")
    for i, machine in enumerate(machines if isinstance(machines, list) else []):
        if not isinstance(machine, dict):
            continue
        confirm = machine.get("confirm")
        if isinstance(confirm, dict):
            for found in replaced(confirm.get("uom"), ("machines", i, "confirm", "uom")):
                confirm["uom"] = REC21_PACKAGE_CODES[confirm["uom"]]
                yield found
        limits = machine.get("limits")
        for j, limit in enumerate(limits if isinstance(limits, list) else []):
            if isinstance(limit, dict):
                for found in replaced(limit.get("uom"), ("machines", i, "limits", j, "uom")):
                    limit["uom"] = REC21_PACKAGE_CODES[limit["uom"]]
                    yield found
    destinations = data.get("destinations")
    for name, destination in destinations.items() if isinstance(destinations, dict) else []:
        units = (
            destination.get("sap", {}).get("units")
            if isinstance(destination, dict) and (isinstance(destination.get("sap"), dict))
            else None
        )
        if isinstance(units, dict):
            for code in [code for code in units if code in REC21_PACKAGE_CODES]:
                yield from replaced(code, ("destinations", name, "sap", "units", code))
                units[REC21_PACKAGE_CODES[code]] = units.pop(code)


def cleartext_secrets(config: PlantConfig) -> Iterator[tuple[Loc, str, str]]:
    """Secrets the config would send without TLS to a host off this box: where, what, to
    which host. (On loopback, nothing crosses a network.)"""
    for i, driver in enumerate(config.drivers):
        if (
            isinstance(driver, MqttConfig)
            and driver.password is not None
            and (driver.tls is None and not is_loopback_host(driver.host))
        ):
            yield (("drivers", i, "password"), f"driver {driver.name}'s MQTT password", driver.host)
    for name, destination in config.destinations.items():
        if not isinstance(destination, DestinationConfig):
            continue  # offline, not built (see fully_validated)
        auth = destination.auth
        at: Loc = ("destinations", name)
        base = urlsplit(destination.base_url)
        if (
            not isinstance(auth, NoAuth)
            and base.scheme == "http"
            and not is_loopback_host(base.hostname or "")
        ):
            yield (
                (*at, "base_url"),
                f"destination {name}'s {auth.type} credentials",
                base.hostname or "?",
            )
        if destination.profile == "jetstream" and not isinstance(
            destination.jetstream.auth, NatsNoAuth
        ):
            for url in (destination.base_url, *destination.jetstream.servers):
                server = urlsplit(url)
                if server.scheme == "nats" and not is_loopback_host(server.hostname or ""):
                    yield (
                        (*at, "base_url"),
                        f"destination {name}'s NATS {destination.jetstream.auth.type}",
                        server.hostname or "?",
                    )
                    break
        if isinstance(auth, OAuth2ClientCredentials):
            token = urlsplit(auth.token_url)
            if token.scheme == "http" and not is_loopback_host(token.hostname or ""):
                yield (
                    (*at, "auth", "token_url"),
                    f"destination {name}'s OAuth client secret",
                    token.hostname or "?",
                )
    mes = config.orders.mes if config.orders is not None else None
    if (
        mes is not None
        and mes.password is not None
        and mes.tls is None
        and (not is_loopback_host(mes.host))
    ):
        yield (("orders", "mes", "password"), "the order publisher's MQTT password", mes.host)


def _allows_insecure(config: PlantConfig, loc: Loc) -> bool:
    section: Any = (
        config.drivers[int(loc[1])]
        if loc[0] == "drivers"
        else (
            config.orders.mes
            if loc[0] == "orders" and config.orders is not None
            else config.destinations[str(loc[1])]
        )
    )
    return bool(getattr(section, "allow_insecure", False))


def fully_validated(config: PlantConfig) -> bool:
    """False for what an offline check returns when a reference's placeholder did not fit
    its field: the settings were checked one by one, the cross references were not."""
    sections: list[Any] = [
        config.api,
        *config.drivers,
        *config.machines,
        *config.destinations.values(),
    ]
    return all(isinstance(section, BaseModel) for section in sections)


def config_warnings(config: PlantConfig) -> list[str]:
    """Settings that are valid but probably not what was meant, one line each (`check`
    prints them and `run` logs them): Modbus addresses written Modicon-style (40001), Rec 21
    package codes read as their Rec 20 codes (BX as XBX)."""
    return list(config._warnings) if fully_validated(config) else []


def doubts(config: PlantConfig) -> Iterator[tuple[Loc, str]]:
    for i, driver in enumerate(config.drivers):
        address_warnings = getattr(driver, "address_warnings", None)
        if address_warnings is not None:
            for loc, message in address_warnings():
                yield ("drivers", i, *loc), message
