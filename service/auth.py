"""Who is calling: Bearer API keys map to tenants; without keys everyone is the tenant "local".

A tenant id is "k_" + the first 16 hex digits of the key's SHA-256, so keys are never stored or logged.
Every job and mask lookup is scoped to the tenant; another tenant's id looks exactly like an unknown one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.settings import GatewaySettings

LOCAL_TENANT = "local"

# auto_error=False: our own 401 carries the error shape; the scheme still shows in OpenAPI.
bearer_scheme = HTTPBearer(auto_error=False, description="one of SELPRUNE_API_KEYS")


def tenant_for_key(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def authenticate(settings: GatewaySettings, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The caller's tenant; 401 when keys are configured and the request lacks a valid one."""
    if not settings.auth_enabled:
        return LOCAL_TENANT
    challenge = {"WWW-Authenticate": "Bearer"}
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
