"""Write a run's report: ``report.html`` (figures and charts) and one PNG per chart beside it, atomically."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..fileio import atomic_write_bytes
from .charts import charts
from .run_data import RunData, read_run

REFRESH_SECONDS = 30  # a report of a run in progress reloads itself in the browser
_templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(default=True))


def figures(data: RunData) -> dict[str, Any]:
    """The numbers the report states (each None when the run has not logged it)."""
    def last(key: str) -> float | None:
        return (data.series(key)[1] or [None])[-1]

    speeds = data.series("tokens_per_s")[1]
    peaks = data.series("peak_rss_mb")[1]
    plan = data.plan or {}
    return {"status": "finished" if data.finished else "in progress",
            "steps": len(data.records), "planned_steps": data.config.get("steps"),
            "last_loss": last("loss"), "last_eval_loss": last("eval_loss"),
            "eval_loss_before": (data.summary or {}).get("eval_loss_before"),
            "mean_tokens_per_s": round(statistics.fmean(speeds), 1) if speeds else None,
            "peak_rss_mb": max(peaks) if peaks else None,
            "budget_mb": plan.get("budget_mb"), "predicted_peak_mb": plan.get("predicted_peak_mb"),
            "total_rank": last("total_rank")}


def write_report(run: Path, out: Path) -> list[Path]:
    """Read ``run`` and write ``out`` plus ``<out stem>-<chart>.png`` beside it; the paths written."""
    data = read_run(run)
    made = charts(data)
    written = []
    for chart in made:
        path = out.with_name(f"{out.stem}-{chart.name}.png")
        atomic_write_bytes(path, chart.png)
        written.append(path)
    html = _templates.get_template("report.html").render(
        run=str(run), figures=figures(data), charts=[(c, p.name) for c, p in zip(made, written)],
        refresh=None if data.finished else REFRESH_SECONDS, generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    atomic_write_bytes(out, html.encode())
    return [out, *written]


def watch_report(run: Path, out: Path, every: float, on_write=lambda paths, finished: None) -> None:
    """Rewrite the report every ``every`` seconds while the run trains; once more after it finished."""
    while True:
        paths = write_report(run, out)
        finished = read_run(run).finished
        on_write(paths, finished)
        if finished:
            return
        time.sleep(every)
