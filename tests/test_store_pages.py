"""The store's fleet page in headless Chromium, served by two store processes on PostgreSQL + S3."""

from __future__ import annotations

import hashlib

import httpx
import numpy as np
import pytest

from browser import chromium
from edge_peft.adapters.peft_format import encode_adapter
from edge_peft.store.backends import StoreLocation, open_store
from edge_peft.store.fleet import MAX_POINTS, pushes_chart
from edge_peft.store.local_server import StoreServer
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.store.wire import PUSH_MEDIA_TYPE, encode_push

DEVICES = ("phone-1", "phone-2", "tablet-1")


def push(url: str, token: str, spec, device: str, seed: int, samples: int) -> dict:
    data = encode_adapter(spec, random_tensors(spec, np.random.default_rng(seed)))
    meta = {"spec": spec.to_dict(), "samples": samples, "steps": 5, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    r = httpx.post(f"{url}/v1/bases/{spec.base_fingerprint}/devices/{device}/versions", content=encode_push(meta, data),
                   headers={"Authorization": f"Bearer {token}", "Content-Type": PUSH_MEDIA_TYPE}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.slow  # a two-process store, six pushes, Chromium: about 8 s
def test_fleet_page_in_chromium_shows_what_the_api_holds(postgres, s3_server, tmp_path):
    location = StoreLocation(tmp_path / "store", postgres.new_database("fleet-page"),
                             s3_server.new_bucket("fleet-page"), s3_server.endpoint)
    store, admin = open_store(location)
    tokens = {d: store.add_device(d) for d in DEVICES}
    spec, other = make_manifest(labels=2).adapter, make_manifest(layers=3, fingerprint="sha256:" + "e" * 64).adapter
    store.add_base(spec.to_dict())
    store.add_base(other.to_dict())
    store.close()
    options = {"--database": location.database, "--blobs": location.blobs, "--processes": 2}
    with StoreServer(location.data_dir, options=options) as server:
        pushed = [push(server.url, tokens[d], spec, d, seed, samples=10 * seed)
                  for seed, d in enumerate(DEVICES + DEVICES[:2], start=1)]
        pushed.append(push(server.url, tokens["tablet-1"], other, "tablet-1", 9, samples=7))
        made = httpx.post(f"{server.url}/v1/bases/{spec.base_fingerprint}/aggregates",
                          headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()
        assert made["created"] and made["number"] == 1

        assert httpx.get(f"{server.url}/").headers["location"] == "/login"  # no token: to the login form
        assert httpx.get(f"{server.url}/v1/fleet", headers={"Authorization": f"Bearer {tokens['phone-1']}"}).status_code == 403
        api = httpx.get(f"{server.url}/v1/fleet", headers={"Authorization": f"Bearer {admin}"}).json()

        with chromium() as browser:
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"{server.url}/")
            assert page.url.endswith("/login")
            page.fill("#token", tokens["phone-1"])  # a device token is not the admin's
            page.click("#sign-in")
            assert "not this store's admin token" in page.inner_text("#error")
            page.fill("#token", admin)
            page.click("#sign-in")
            assert page.url == f"{server.url}/"
            cookie, = context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and admin not in cookie["value"]
            assert page.inner_text("#totals") == "2 base(s), 3 device(s), 6 push(es)."

            section = page.locator(f"section.base[data-fingerprint='{spec.base_fingerprint}']")
            shown = [[c.strip() for c in row.split("\t")] for row in section.locator("table.versions tbody tr").all_inner_texts()]
            times = [v["created"] for v in api["bases"][0]["versions"]]  # the push answers' "created" is a flag
            expected = [[p["device"], str(p["number"]), str(p["size"]), str(p["full_size"]), str(spec.rank),
                         str(p["samples"]), str(p["steps"]), "", t] for p, t in zip(pushed[:5], times)]
            assert shown == expected
            g = api["bases"][0]["globals"][0]
            assert g["inputs"] == ["tablet-1 v1", "phone-1 v2", "phone-2 v2"]  # each device's latest version
            global_row = section.locator("table.globals tbody tr").inner_text().split("\t")
            assert [c.strip() for c in global_row] == ["1", g["created"], str(made["full_size"]), "3",
                                                       "tablet-1 v1, phone-1 v2, phone-2 v2"]
            chart = page.locator("#pushes-chart")
            assert chart.get_attribute("data-pushes") == "6" and chart.locator("circle.push").count() == 6
            device_rows = page.locator("#devices tbody tr").all_inner_texts()
            assert [r.split("\t")[0] for r in device_rows] == sorted(DEVICES)
            assert [r.split("\t")[-1].strip() for r in device_rows] == ["2", "2", "2"]
            shot = tmp_path / "fleet.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000


def test_pushes_chart_is_cumulative_and_samples_a_large_fleet():
    pushes = [{"time": f"2026-12-01T00:{i // 60:02d}:{i % 60:02d}.000+00:00", "label": f"phone v{i + 1}"}
              for i in range(1200)]
    chart = pushes_chart(pushes)
    assert chart["total"] == 1200 and len(chart["points"]) == MAX_POINTS
    assert chart["points"][-1]["title"] == "phone v1200 at 2026-12-01T00:19:59.000+00:00"
    ys = [p["y"] for p in chart["points"]]
    assert ys == sorted(ys, reverse=True) and ys[-1] == chart["y1"]  # rising to the top at the last push
    assert [p["title"][:8] for p in pushes_chart(pushes[:3])["points"]] == ["phone v1", "phone v2", "phone v3"]
    assert pushes_chart([])["total"] == 0
