"""One connection to the hub's NATS servers, shared by the plant's `jetstream` destination,
`plantsync hub init`, `doctor jetstream` and the relay.

`connect` builds nats-py's options from our config (servers, TLS, token / user and password /
creds file / NKey seed) and connects once: a failed first connection raises HubUnavailable
with the reason, and the caller retries later (the forwarder engine does, with backoff).
Two things nats-py leaves to us: it reads a seed or creds file only while connecting, where a
missing or malformed one escapes as an AssertionError, TypeError or nkeys error (it stopped
the forwarder), so the files are checked first and named; and it upgrades to TLS only when
the server's INFO asks, even for a `tls://` URL, so a server without TLS (or anyone on the
path answering first) would be sent the CONNECT, token or password included, in cleartext:
the connection is refused before CONNECT is written.
Once connected, nats-py reconnects by itself, forever; a lost and a regained connection are
said once each by the shared availability piece (drivers.common.availability).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.errors
import nkeys
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


class _Refused(Exception):
    """Every server refused the first connect: raised out of nats-py's connect loop."""


class _Client(Client):
    """nats-py's client, refusing to send CONNECT over plain TCP to a tls:// server."""

    def _connect_command(self) -> bytes:
        server = self._current_server
        writer = getattr(self._transport, "_io_writer", None)
        encrypted = writer is not None and writer.get_extra_info("ssl_object") is not None
        if server is not None and server.uri.scheme == "tls" and not encrypted:
            raise nats.errors.Error(
                f"{server.uri.netloc} does not offer TLS, though its URL is tls://: "
                "no credentials were sent"
            )
        return super()._connect_command()


def tls_context(servers: Sequence[str], tls: TlsConfig) -> ssl.SSLContext | None:
    """A TLS context when a server is tls:// or `tls:` says anything (a CA, client
    certificates, no verification): nats-py then uses it also for a nats:// server that
    asks for TLS, instead of a default context that ignores the plant's CA."""
    wanted = (
        any(url.startswith("tls://") for url in servers)
        or tls.cert_file is not None
        or tls.ca_file is not None
        or not tls.verify
    )
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


def _user_seed(text: str, what: str) -> None:
    """ValueError unless `text` is a user NKey seed (SU...), naming `what` but never the seed."""
    seed = text.strip()
    if not seed.startswith("SU"):
        raise ValueError(f"{what} is not a user NKey seed (SU...)")
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except (nkeys.NkeysError, ValueError) as exc:
        raise ValueError(f"{what} is not a valid NKey seed ({exc})") from None


def _line_after(lines: list[str], marker: str) -> str:
    for i, line in enumerate(lines[:-1]):
        if marker in line:
            return lines[i + 1].strip()
    return ""


def check_key_files(auth: NatsAuth) -> None:
    """ValueError naming the file when a seed or creds file is missing or malformed."""
    match auth:
        case NatsNKey():
            path = auth.seed_file
            _user_seed(_read(path, "NKey seed file"), f"NKey seed file {path}")
        case NatsCredentials():
            path = auth.file
            lines = _read(path, "creds file").splitlines()
            if not _line_after(lines, "BEGIN NATS USER JWT").startswith("ey"):
                raise ValueError(
                    f"creds file {path} has no user JWT (-----BEGIN NATS USER JWT----- "
                    "then the JWT, as nsc generate creds writes it)"
                )
            _user_seed(
                _line_after(lines, "BEGIN USER NKEY SEED"), f"the NKey seed of creds file {path}"
            )


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None


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
    try:
        check_key_files(auth)
    except ValueError as exc:
        raise HubUnavailable(f"cannot connect to the hub ({hosts}): {exc}") from None
    state: dict[str, str] = {}
    refusals = {"first connect": 0}
    client = _Client()
    said = availability or Availability(f"The hub ({hosts})", log, extra={"client": name})

    async def disconnected() -> None:
        if not client.is_closed:  # a close of ours is no loss
            said.lost(state.get("error") or "connection lost; nats-py reconnects")

    async def reconnected() -> None:
        said.back()

    async def error(exc: Exception) -> None:
        text = state["error"] = str(exc) or type(exc).__name__
        log.debug("Hub connection error: %s", exc, extra={"client": name})
        if isinstance(exc, ssl.SSLError):
            # The handshake's own reason (a certificate the server or the plant refused):
            # a later attempt can end as a broken pipe or a reset instead, which says less.
            state["tls"] = text
        if isinstance(exc, nats.errors.AuthorizationError) or text.startswith("nats: '"):
            state["refusal"] = text  # the server's own words (-ERR)
            if "connected" not in state:
                refusals["first connect"] += 1
                # A refusal is the hub's answer, not an outage: once each server has given
                # it, more tries within this connect only delay saying it (by up to the
                # bound, 31 s for three servers at a 10 s timeout).
                if refusals["first connect"] >= len(servers):
                    raise _Refused(text)

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
        state["connected"] = "yes"
        return client
    # nkeys.NkeysError: a key file changed between the check and nats-py's read of it.
    except (
        nats.errors.Error,
        OSError,
        TimeoutError,
        ssl.SSLError,
        nkeys.NkeysError,
        _Refused,
    ) as exc:
        with contextlib.suppress(nats.errors.Error, OSError):
            await client.close()
        # A server that refuses says why (-ERR) and closes at once, with the client's PING
        # still unread: the reset that follows can discard that line, so an attempt ends as
        # "Connection reset by peer". The refusal of any attempt is the reason to give.
        text = (
            state.get("refusal")
            or state.get("tls")
            or state.get("error")
            or str(exc)
            or type(exc).__name__
        )
        raise HubUnavailable(f"cannot connect to the hub ({hosts}): {text}") from None
