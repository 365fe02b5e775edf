"""Who is calling: Bearer API keys map to tenants; without keys everyone is the tenant "local".

A tenant id is "k_" + the first 16 hex digits of the key's SHA-256, so keys are never stored or logged.
Every job and mask lookup is scoped to the tenant; another tenant's id looks exactly like an unknown one.

Without keys the gateway binds to loopback only, but a web page the user opens could still reach it
through a name of its own that resolves to 127.0.0.1 (DNS rebinding); `HostCheckMiddleware` answers
such requests 400 unless their Host header is a loopback name, the bind host or one of
SELPRUNE_ALLOWED_HOSTS. /metrics takes its own Bearer token, SELPRUNE_METRICS_KEY, when one is set.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError, error_response
from service.settings import GatewaySettings

LOCAL_TENANT = "local"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}

# auto_error=False: our own 401 carries the error shape; the scheme still shows in OpenAPI.
bearer_scheme = HTTPBearer(auto_error=False, description="one of SELPRUNE_API_KEYS")


def tenant_for_key(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def authenticate(settings: GatewaySettings, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The caller's tenant; 401 when keys are configured and the request lacks a valid one."""
    if not settings.auth_enabled:
        return LOCAL_TENANT
    challenge = _CHALLENGE
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(401, "Unauthorized", "missing API key: send 'Authorization: Bearer <key>'", challenge)
    presented = credentials.credentials.encode()
    matched = False
    for key in settings.api_keys:  # compare against every key, in constant time per key
        matched |= hmac.compare_digest(presented, key.get_secret_value().encode())
    if not matched:
        raise ApiError(401, "Unauthorized", "invalid API key", challenge)
    return tenant_for_key(credentials.credentials)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (where running without API keys is allowed)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_metrics_key(settings: GatewaySettings, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 unless /metrics is open (no SELPRUNE_METRICS_KEY) or the request bears that key."""
    if settings.metrics_key is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401, "Unauthorized", "missing metrics key: send 'Authorization: Bearer <metrics key>'", _CHALLENGE
        )
    expected = settings.metrics_key.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise ApiError(401, "Unauthorized", "invalid metrics key", _CHALLENGE)


# Host header check (DNS rebinding) -----------------------------------------------------------------
def allowed_hosts(settings: GatewaySettings) -> frozenset[str] | None:
    """The host names the gateway answers, or None for any. Keyless: the loopback names, the bind host
    and SELPRUNE_ALLOWED_HOSTS. With keys: SELPRUNE_ALLOWED_HOSTS when set, else any."""
    extra = {_normalize(h) for h in settings.allowed_hosts}
    if settings.auth_enabled:
        return frozenset(extra) or None
    bind = _normalize(settings.host)
    return LOOPBACK_HOSTS | extra | ({bind} if bind not in ("", "0.0.0.0", "::") else set())


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without its port: '[::1]:8000' -> '::1'."""
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """`host` (from host_name) is listed, or matches a '*.example.com' entry."""
    if not host:
        return False
    return host in allowed or any(a.startswith("*.") and host.endswith(a[1:]) for a in allowed)


def _normalize(host: str) -> str:
    return host.strip().lower().strip("[]")


class HostCheckMiddleware:
    """400 InvalidHost for a request whose Host header names a host not in `allowed`."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host", "")
        if host_allowed(host_name(header), self.allowed):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        message = (
            f"Host header {header[:100]!r} is not allowed: this gateway answers only "
            f"{', '.join(sorted(self.allowed))} (add names with SELPRUNE_ALLOWED_HOSTS)"
        )
        await error_response(400, "InvalidHost", message)(scope, receive, send)
