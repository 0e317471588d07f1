"""One connection to the hub's NATS servers, shared by the plant's `jetstream` destination,
`plantsync hub init`, `doctor jetstream` and the relay.

`connect` builds nats-py's options from our config (servers, TLS, token / user and password /
creds file / NKey seed) and connects once: a failed first connection raises HubUnavailable
with the reason, and the caller retries later (the forwarder engine does, with backoff).
Once connected, nats-py reconnects by itself, forever; a lost and a regained connection are
said once each by the shared availability piece (drivers.common.availability).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client

from drivers.common.availability import Availability
from edge.config.destinations import TlsConfig
from edge.hub.settings import (
    NatsAuth,
    NatsCredentials,
    NatsNKey,
    NatsNoAuth,
    NatsToken,
    NatsUserPassword,
)

log = logging.getLogger(__name__)


class HubUnavailable(Exception):
    """No connection to any server of the hub; says why, without secrets."""


def tls_context(servers: Sequence[str], tls: TlsConfig) -> ssl.SSLContext | None:
    """A TLS context when a server is tls:// (or client certificates are configured)."""
    wanted = any(url.startswith("tls://") for url in servers) or tls.cert_file is not None
    if not wanted:
        return None
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls.ca_file is not None else None
    )
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def auth_options(auth: NatsAuth) -> dict[str, Any]:
    match auth:
        case NatsNoAuth():
            return {}
        case NatsToken():
            return {"token": auth.token.get_secret_value()}
        case NatsUserPassword():
            return {"user": auth.user, "password": auth.password.get_secret_value()}
        case NatsCredentials():
            return {"user_credentials": str(auth.file)}
        case NatsNKey():
            return {"nkeys_seed": str(auth.seed_file)}
    raise ValueError(f"no NATS authentication for {auth!r}")  # pragma: no cover


async def connect(
    name: str,
    servers: Sequence[str],
    tls: TlsConfig,
    auth: NatsAuth,
    *,
    connect_timeout: float = 5.0,
    availability: Availability | None = None,
) -> Client:
    """Connected client, or HubUnavailable. `name` shows in the server's connection list;
    `availability` (the shared lost/back piece) is told when nats-py loses and regains the
    connection, so each is logged once."""
    hosts = ", ".join(urlsplit(url).netloc for url in servers)
    state: dict[str, str] = {}
    client = Client()
    said = availability or Availability(f"The hub ({hosts})", log, extra={"client": name})

    async def disconnected() -> None:
        if not client.is_closed:  # a close of ours is no loss
            said.lost(state.get("error") or "connection lost; nats-py reconnects")

    async def reconnected() -> None:
        said.back()

    async def error(exc: Exception) -> None:
        state["error"] = str(exc) or type(exc).__name__
        log.debug("Hub connection error: %s", exc, extra={"client": name})

    # nats-py's first connect tries the servers for as long as it may reconnect (forever
    # here): bound it, so a wrong token or a hub that is away is a retry with backoff.
    try:
        async with asyncio.timeout(connect_timeout * len(servers) + 1):
            await client.connect(
                list(servers),
                name=name,
                tls=tls_context(servers, tls),
                connect_timeout=max(1, int(connect_timeout)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
                **auth_options(auth),
            )
        return client
    except (nats.errors.Error, OSError, TimeoutError, ssl.SSLError) as exc:
        with contextlib.suppress(nats.errors.Error, OSError):
            await client.close()
        text = state.get("error") or str(exc) or type(exc).__name__
        raise HubUnavailable(f"cannot connect to the hub ({hosts}): {text}") from None
