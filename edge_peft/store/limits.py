"""What one device may cost the store: body size per route, versions and bytes kept, requests per minute."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from .storage import StoreError

DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_MAX_DEVICE_VERSIONS = 1000
DEFAULT_MAX_DEVICE_BYTES = 4 << 30
DEFAULT_RATE_PER_MINUTE = 600
SPEC_BODY_BYTES = 4 << 20  # POST /v1/bases: an adapter spec (a few KiB for most models)
SMALL_BODY_BYTES = 64 << 10  # every other route: a device id, an aggregation policy, or nothing
PUSH_PATH = re.compile(r"/v1/bases/[^/]+/(devices/[^/]+/versions|global)")  # adapter uploads: a push, a global


@dataclass(frozen=True)
class StoreLimits:
    """The server's limits (``serve`` options); each refusal names the option that raises it."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_device_versions: int = DEFAULT_MAX_DEVICE_VERSIONS
    max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE

    def body_limit(self, method: str, path: str) -> int:
        """The most bytes a request to this route may send."""
        if method == "POST" and PUSH_PATH.fullmatch(path):
            return self.max_body_bytes
        if method == "POST" and path == "/v1/bases":
            return SPEC_BODY_BYTES
        return SMALL_BODY_BYTES

    def check_quota(self, device: str, versions: int, stored_bytes: int, new_bytes: int) -> None:
        """StoreError(413) when one more version of ``new_bytes`` would put ``device`` over its quota."""
        if versions + 1 > self.max_device_versions:
            raise StoreError(413, f"device {device!r} already keeps {versions} versions, this store's quota: the "
                                  "admin can raise `serve --max-device-versions` or `store remove-device` it")
        if stored_bytes + new_bytes > self.max_device_bytes:
            raise StoreError(413, f"device {device!r} keeps {stored_bytes >> 20} MiB; {new_bytes >> 20} MiB more is "
                                  f"over this store's quota of {self.max_device_bytes >> 20} MiB: the admin can raise "
                                  "`serve --max-device-mb`")


class RateLimiter:
    """A token bucket per principal: ``per_minute`` requests a minute, bursts of up to ten seconds' worth."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 6.0)
        self.buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, time)
        self.lock = threading.Lock()

    def take(self, principal: str) -> None:
        """Spend one request of ``principal``'s budget; StoreError(429) when it is spent."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(principal, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self.buckets[principal] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise StoreError(429, f"{principal!r} sent more than {round(self.rate * 60)} requests a minute, this "
                                      f"store's rate limit: retry in {wait:.1f} s (admin: `serve --rate-limit`)",
                                 {"Retry-After": str(max(1, round(wait)))})
            self.buckets[principal] = (tokens - 1.0, now)
