"""The fleet view: bases, devices, device versions and global versions as one JSON-ready dict, and the
SVG geometry of the pushes-over-time chart (``pages.py`` renders both; ``GET /v1/fleet`` returns the dict)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .service import AdapterStore

CHART_W, CHART_H, PAD = 720, 220, 44
MAX_ROWS = 200  # device versions listed per base (the latest); the totals count them all
MAX_POINTS = 400  # pushes drawn as points; a larger fleet's curve is sampled evenly (the last push always drawn)


def fleet_view(store: AdapterStore) -> dict[str, Any]:
    """Everything the fleet page shows, read from the metadata store (no blob is read)."""
    meta = store.metadata
    bases, pushes, counts = [], [], {}
    for base in meta.bases():
        versions = meta.versions(base.fingerprint)
        names = {v.id: f"{v.device} v{v.number}" for v in versions}
        rows = [{"device": v.device, "number": v.number, "size": v.size, "full_size": v.full_size,
                 "rank": base.spec.get("rank"), "samples": v.samples, "steps": v.steps, "created": v.created,
                 "parent": _parent(v.parent)} for v in versions]
        for v in versions:
            counts[v.device] = counts.get(v.device, 0) + 1
            pushes.append({"time": v.created, "label": f"{v.device} v{v.number}"})
        globals_ = [{"number": a.number, "created": a.created, "size": a.full_size, "devices": len(a.inputs),
                     "inputs": [names.get(i, f"removed version {i}") for i in a.inputs]}
                    for a in meta.aggregates(base.fingerprint)]
        bases.append({"fingerprint": base.fingerprint, "created": base.created, "variant": base.spec.get("variant"),
                      "task": base.spec.get("task"), "rank": base.spec.get("rank"),
                      "modules": len(base.spec.get("modules", ())), "versions_total": len(rows),
                      "versions": rows[-MAX_ROWS:], "globals": globals_})
    devices = [{"id": d.id, "created": d.created, "last_seen": d.last_seen, "versions": counts.get(d.id, 0)}
               for d in meta.devices()]
    pushes.sort(key=lambda p: p["time"])
    return {"bases": bases, "devices": devices, "pushes": pushes}


def _parent(parent: Any) -> str | None:
    if parent is None:
        return None
    return f"global v{parent.version}" if parent.kind == "global" else f"{parent.device or 'own'} v{parent.version}"


def pushes_chart(pushes: list[dict[str, str]]) -> dict[str, Any]:
    """Cumulative pushes over time as SVG geometry: a step line, one point per push, axis labels."""
    if not pushes:
        return {"width": CHART_W, "height": CHART_H, "points": [], "line": "", "total": 0}
    times = [datetime.fromisoformat(p["time"]).timestamp() for p in pushes]
    t0, t1 = times[0], max(times[-1], times[0] + 1.0)
    n = len(pushes)
    x = lambda t: PAD + (t - t0) / (t1 - t0) * (CHART_W - 2 * PAD)  # noqa: E731
    y = lambda k: CHART_H - PAD - k / n * (CHART_H - 2 * PAD)  # noqa: E731
    stride = -(-n // MAX_POINTS)
    drawn = sorted({*range(stride, n + 1, stride), n})  # cumulative counts k whose push is drawn
    points, line, previous = [], [f"{x(t0):.1f},{y(0):.1f}"], 0
    for k in drawn:
        t, push = times[k - 1], pushes[k - 1]
        line += [f"{x(t):.1f},{y(previous):.1f}", f"{x(t):.1f},{y(k):.1f}"]
        points.append({"x": round(x(t), 1), "y": round(y(k), 1), "title": f"{push['label']} at {push['time']}"})
        previous = k
    return {"width": CHART_W, "height": CHART_H, "points": points, "line": " ".join(line), "total": n,
            "x0": PAD, "x1": CHART_W - PAD, "y0": CHART_H - PAD, "y1": PAD,
            "first": pushes[0]["time"][:19].replace("T", " "), "last": pushes[-1]["time"][:19].replace("T", " ")}
