"""Tokens, identities and the checks every request passes before it can change anything.

A token is ``<principal>.<secret>``: the principal (a device id, or ``admin``) says whose hash to
compare with; the secret is ``secrets.token_urlsafe(32)``. Only sha256 hashes are stored (enough for
256-bit random secrets), compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from .storage import MetadataStore, StoreError

ADMIN = "admin"
ADMIN_TOKEN_ENV = "EDGE_PEFT_ADMIN_TOKEN"  # where the command line and a Flower server read the admin token
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # always fullmatch: "phone\n" is no id
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
REVOKED = "revoked"  # stored in place of a device's token hash: no token hashes to it
_NO_HASH = "0" * 64


@dataclass(frozen=True)
class Principal:
    """Who a valid token belongs to: the admin, or one device."""

    kind: str  # "admin" | "device"
    id: str


def new_token(principal: str) -> str:
    return f"{principal}.{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_principal(token: str) -> str:
    """The principal a token names (no check of the secret); StoreError(401) if it is malformed."""
    name, dot, secret = token.partition(".")
    if not dot or not secret or not (name == ADMIN or DEVICE_ID.fullmatch(name)):
        raise StoreError(401, "malformed token: pass the token `edge-peft store add-device` printed")
    return name


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_ID.fullmatch(device) or device == ADMIN:
        raise StoreError(400, f"invalid device id {str(device)[:70]!r}: use 1-64 letters, digits, '-' or '_' "
                              f"(not starting with '-' or '_', not {ADMIN!r})")
    return device


def check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise StoreError(400, f"invalid base fingerprint {str(fingerprint)[:80]!r}: pass the manifest's "
                              "base_fingerprint ('sha256:' + 64 hex digits)")
    return fingerprint


def authenticate(metadata: MetadataStore, token: str | None) -> Principal:
    """The principal of a valid token; StoreError(401) for a missing, malformed or wrong one."""
    if not token:
        raise StoreError(401, "missing token: pass --token (or EDGE_PEFT_TOKEN) as printed by `edge-peft store add-device`")
    name = token_principal(token)
    stored = metadata.admin_token_hash() if name == ADMIN else metadata.device_token_hash(name)
    matches = hmac.compare_digest(stored or _NO_HASH, hash_token(token))
    if stored is None or not matches:
        raise StoreError(401, "invalid token: use the token printed when the device (or store) was registered, "
                              "or the one `edge-peft store rotate-token` printed since")
    return Principal(ADMIN if name == ADMIN else "device", name)


def require_admin(principal: Principal) -> None:
    if principal.kind != ADMIN:
        raise StoreError(403, "this needs the admin token: pass --admin-token (printed when the store first started)")


def require_device(principal: Principal, device: str) -> None:
    """Only a device itself may push under its id."""
    if principal.kind != "device" or principal.id != device:
        raise StoreError(403, f"this token cannot push as device {device!r}: push with that device's own token")


def may_read_device(principal: Principal, device: str) -> None:
    """A device's adapters are readable by that device and by the admin."""
    if principal.kind != ADMIN and principal.id != device:
        raise StoreError(403, f"this token cannot read device {device!r}'s adapters: use its token or the admin token")
