"""Talking to an OPC UA server, without the driver's state: an asyncua client set up for the
endpoint's security, errors said in words a technician can act on, a close bounded in time
(also while cancelled), and the values it answers turned into samples (quality from the status
code, plain values, source timestamps), buffered for the sink keeping the latest per tag.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509

from drivers.opcua.config import OpcUaSecurity, SecurityModeName, SecurityPolicyName
from drivers.opcua.trust_list import TrustList, UntrustedCertificate

log = logging.getLogger(__name__)


DEFAULT_APPLICATION_URI = "urn:plantsync:edge"
"""The client's application URI when no client certificate names one."""


SECURITY_POLICY: dict[SecurityPolicyName, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}

_MESSAGE_SECURITY_MODE: dict[SecurityModeName, ua.MessageSecurityMode] = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

USER_REJECTED = {
    StatusCodes.BadUserAccessDenied,
    StatusCodes.BadIdentityTokenInvalid,
    StatusCodes.BadIdentityTokenRejected,
    StatusCodes.BadUserSignatureInvalid,
}
SECURITY_REJECTED = {
    StatusCodes.BadSecurityChecksFailed,
    StatusCodes.BadSecurityPolicyRejected,
    StatusCodes.BadSecurityModeRejected,
    StatusCodes.BadCertificateInvalid,
    StatusCodes.BadCertificateUntrusted,
    StatusCodes.BadCertificateUriInvalid,
    StatusCodes.BadCertificateTimeInvalid,
    StatusCodes.BadCertificateRevoked,
    StatusCodes.BadCertificateUseNotAllowed,
}


async def _application_uri(certificate: Path) -> str:
    """The URI in the certificate's SubjectAltName, which servers match against the client's."""
    cert = await uacrypto.load_certificate(str(certificate))
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return DEFAULT_APPLICATION_URI
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else DEFAULT_APPLICATION_URI


class SecuritySetupError(Exception):
    """A client certificate, its key or a pinned server certificate does not load."""


async def new_client(
    endpoint: str,
    security: OpcUaSecurity,
    *,
    username: str | None = None,
    password: str | None = None,
    request_timeout: float = 5.0,
    session_timeout: float = 60.0,
    keepalive: float = 5.0,
    client_name: str = "PlantSync Edge",
    trust: TrustList | None = None,
) -> Client:
    """An asyncua client set up for `endpoint`, not yet connected.

    With a security policy and no pinned server certificate this asks the server for its
    endpoints (network I/O), because the channel needs the server's certificate, and checks
    that certificate against `trust` before anything else is sent: a server that is not
    trusted never sees the user's password. UntrustedCertificate if it is not trusted.
    """
    client = Client(endpoint, timeout=request_timeout, watchdog_intervall=keepalive)
    client.name = client.description = client_name
    client.product_uri = DEFAULT_APPLICATION_URI
    client.application_uri = DEFAULT_APPLICATION_URI
    client.session_timeout = int(session_timeout * 1000)
    if username is not None:
        client.set_user(username)
        client.set_password(password or "")
    if security.policy != "None":
        assert security.certificate is not None and security.private_key is not None
        if security.server_certificate is None and trust is None:
            raise SecuritySetupError(
                "no trust list to check the server's certificate against: pin it "
                "(server_certificate) or give a data directory (its pki/trusted)"
            )
        try:
            client.application_uri = await _application_uri(security.certificate)
            for path in (security.private_key, security.server_certificate):
                if path is not None:
                    await asyncio.to_thread(path.read_bytes)  # a clear error, before asyncua's
        except (OSError, ValueError) as exc:
            raise SecuritySetupError(f"cannot load the certificates or key: {exc}") from exc
        await client.set_security(
            SECURITY_POLICY[security.policy],
            certificate=str(security.certificate),
            private_key=str(security.private_key),
            server_certificate=(
                str(security.server_certificate) if security.server_certificate else None
            ),
            mode=_MESSAGE_SECURITY_MODE[security.mode],
        )
        if security.server_certificate is None and trust is not None:
            peer = client.security_policy.peer_certificate
            if not peer:
                raise SecuritySetupError("the server sent no certificate in its endpoint list")
            await asyncio.to_thread(trust.check, peer, endpoint)
    return client


def describe_error(
    exc: BaseException,
    timeout: float,
    username: str | None = None,
    security: OpcUaSecurity | None = None,
) -> str:
    """Why connecting or talking to a server failed, in words for a technician."""
    if isinstance(exc, UaStatusCodeError):
        name = ua.StatusCode(exc.code).name
        if exc.code in USER_REJECTED:
            who = f"user {username!r}" if username else "anonymous access"
            return f"the server rejected {who} ({name}): check the username and password"
        if exc.code == StatusCodes.BadTooManySessions:
            return (
                f"the server has no room for another session ({name}). Sessions of clients "
                "that vanished without closing them (a gateway killed, an HMI crashed) stay "
                "until their session timeout runs out; retrying. To fix it for good, raise the "
                "server's session limit, or lower session_timeout in every client's config"
            )
        if exc.code in SECURITY_REJECTED:
            return f"the server rejected the security settings or client certificate ({name})"
        return f"the server answered {name}"
    if isinstance(exc, SecuritySetupError | UntrustedCertificate):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return f"connection failed ({exc.strerror or exc})"
    if isinstance(exc, UaError):
        # asyncua's words for a server without an endpoint of the client's policy and mode.
        if "No matching endpoints" in str(exc):
            wanted = f"{security.policy} {security.mode}" if security else "this security"
            return f"the server offers no endpoint with security {wanted}"
        return f"the connection failed ({exc})"
    return f"{type(exc).__name__}: {exc}"


async def close_client(client: Client, *, within: float) -> None:
    """End a session and stop asyncua's tasks for it (keep-alive, channel renewal, publish).

    The server is told when the connection is still open, but not waited for longer than
    `within`: one that stopped answering would hold up the reconnect for nothing.
    """
    protocol = client.uaclient.protocol
    try:
        async with asyncio.timeout(within):
            if protocol is not None and not protocol.is_closed:
                await client.disconnect()
            else:
                await client.close_session()
    except (Exception, TimeoutError) as exc:
        log.debug("Closing the OPC UA session did not finish cleanly: %s", exc)
    finally:
        client.disconnect_socket()  # also when cancelled mid-close: never leak the socket


async def load_structures(client: Client, server: str) -> None:
    """Make asyncua decode the server's own structures (OPC 30050's count and alarm structures)
    instead of handing over their raw bytes. A failure leaves them undecoded; whoever selects
    a field of one then says so."""
    # asyncua warns of every namespace-0 enum a server defines a little differently: noise.
    type_log = logging.getLogger("asyncua.ua.uatypes")
    level = type_log.level
    type_log.setLevel(logging.ERROR)
    try:
        await client.load_data_type_definitions()
    except Exception as exc:  # a server with odd definitions
        log.debug("OPC UA server %s: loading its data type definitions failed: %s", server, exc)
    finally:
        type_log.setLevel(level)


async def close_despite_cancel(client: Client, *, within: float) -> None:
    """`close_client`, finished even when the caller is cancelled meanwhile (a stopping daemon
    cancels its drivers again every half second): an orderly stop must not leave the session
    on the server, where it would hold one of its few sessions for the session timeout.
    `close_client` is bounded by `within`, so this is too; a cancellation is raised after it."""
    closing = asyncio.ensure_future(close_client(client, within=within))
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
