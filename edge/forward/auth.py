"""How a destination proves who we are: nothing, a static bearer token or API key header, or
OAuth2 client credentials.

The OAuth2 token is fetched once, cached, and refreshed `refresh_before` its expiry; a 401 from
the target drops it so the next request fetches a fresh one (the session repeats the request
once). Secrets stay in `SecretStr` and never reach a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from edge.config.destinations import ApiKeyAuth, Auth, BearerAuth, NoAuth, OAuth2ClientCredentials
from edge.forward.outcome import tls_hint

log = logging.getLogger(__name__)


class AuthError(Exception):
    """Credentials were refused or no token could be had; says why without the secret."""


class Authenticator:
    """No authentication; the base of the others."""

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return {}

    def invalidate(self) -> bool:
        """Forget cached credentials after a 401; True when retrying can help."""
        return False


class StaticHeader(Authenticator):
    def __init__(self, name: str, value: str) -> None:
        self._headers = {name: value}

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        return self._headers


class OAuth2Token(Authenticator):
    """OAuth2 client credentials grant (RFC 6749 section 4.4)."""

    def __init__(self, config: OAuth2ClientCredentials) -> None:
        self.config = config
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0

    async def headers(self, client: httpx.AsyncClient) -> dict[str, str]:
        if self._token is None or time.monotonic() >= self._expires_at:
            async with self._lock:  # one fetch for all the requests that found it stale
                if self._token is None or time.monotonic() >= self._expires_at:
                    await self._fetch(client)
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        self._token = None
        return True

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        config = self.config
        form = {
            "grant_type": "client_credentials",
            "client_id": config.client_id,
            "client_secret": config.client_secret.get_secret_value(),
        }
        if config.scope:
            form["scope"] = config.scope
        try:
            response = await client.post(config.token_url, data=form, timeout=config.timeout)
        except httpx.HTTPError as exc:
            raise AuthError(
                f"token endpoint {config.token_url} unreachable: {tls_hint(exc)}"
            ) from None
        if response.status_code != 200:
            raise AuthError(
                f"token endpoint {config.token_url} answered "
                f"{response.status_code}: {response.text[:200]}"
            )
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"token endpoint {config.token_url} sent no access_token") from None
        self._token = token
        # Refresh `refresh_before` ahead of expiry, but never past half the token's life: a
        # short-lived token is still used for most of it.
        ahead = min(config.refresh_before, lifetime / 2)
        self._expires_at = time.monotonic() + max(1.0, lifetime - ahead)
        self.fetched += 1
        log.debug("Fetched an OAuth2 token from %s, valid %gs", config.token_url, lifetime)


def authenticator(auth: Auth) -> Authenticator:
    match auth:
        case NoAuth():
            return Authenticator()
        case BearerAuth():
            return StaticHeader("Authorization", f"Bearer {auth.token.get_secret_value()}")
        case ApiKeyAuth():
            return StaticHeader(auth.header, auth.key.get_secret_value())
        case OAuth2ClientCredentials():
            return OAuth2Token(auth)
    raise ValueError(f"no authenticator for {auth!r}")  # pragma: no cover
