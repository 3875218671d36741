"""Headless Chromium for the page tests: Playwright driving Debian's ``chromium`` (or Playwright's own browser).

Locally a missing browser or Playwright skips the test with the reason; with EDGE_PEFT_REQUIRE_SERVICES=1 (CI)
it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return os.environ.get("EDGE_PEFT_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


@contextlib.contextmanager
def chromium() -> Iterator["object"]:
    """A headless Chromium browser (Playwright's sync API), closed afterwards."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = 'Playwright is not installed (pip install -e ".[dev]")'
    executable = chromium_path()
    if missing is None and executable is None:
        missing = "no Chromium found (Debian: apt-get install chromium; or set EDGE_PEFT_CHROMIUM)"
    if missing:
        if os.environ.get("EDGE_PEFT_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{missing}; EDGE_PEFT_REQUIRE_SERVICES=1 forbids skipping (run scripts/services.sh)")
        pytest.skip(missing)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()
