"""`edge-peft report`: a run's metrics as HTML + PNG charts, on a run in progress and on a real run in Chromium."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from browser import chromium
from edge_peft.cli import main
from edge_peft.errors import UserError
from edge_peft.report.report import write_report
from edge_peft.report.run_data import read_run

PNG = b"\x89PNG\r\n\x1a\n"


def write_partial_run(run: Path) -> list[dict]:
    """A run still training: five steps logged, a sixth line half written, no summary.json yet."""
    run.mkdir()
    records = [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 100.0 + s, "rss_mb": 300.0 + s,
                "peak_rss_mb": 310.0 + s, "total_rank": 16 - s, "rank_budget": 16 - s} for s in range(5)]
    records[3]["eval_loss"] = 1.9
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    (run / "run.json").write_text(json.dumps({"config": {"steps": 40}, "plan": {"budget_mb": 512.0,
                                                                                 "predicted_peak_mb": 420.5}}))
    return records


@pytest.mark.slow  # matplotlib draws five charts: about 2 s
def test_report_of_a_run_in_progress_charts_what_is_logged_so_far(tmp_path):
    records = write_partial_run(tmp_path / "run")
    written = write_report(tmp_path / "run", tmp_path / "out" / "report.html")
    assert [p.name for p in written] == ["report.html", "report-loss.png", "report-speed.png", "report-memory.png",
                                         "report-lr.png", "report-rank.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written[1:])
    html = written[0].read_text()
    assert 'http-equiv="refresh"' in html and '<span id="status">in progress</span>' in html
    assert '<td id="steps">5 of 40</td>' in html and '<td id="peak-rss">314.0</td>' in html
    assert '<td id="budget">512.0</td>' in html and '<td id="total-rank">12</td>' in html
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:  # the sixth step lands; the report re-reads it
        f.write('ss": 1.4, "tokens_per_s": 99.0}\n')
    assert len(read_run(tmp_path / "run").records) == len(records) + 1


def test_report_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    write_partial_run(run)
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl line 2 is not JSON"):
        read_run(run)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.slow  # trains a toy GPT-2 artifact for 6 steps, then Chromium: about 8 s
def test_report_of_a_real_run_in_chromium_states_its_metrics(artifacts, data, tmp_path):
    from edge_peft.device.trainer import TrainConfig, open_run

    artifact = artifacts("gpt2", "int8")
    config = TrainConfig(data=str(data["lm"]), steps=6, batch_size=4, lr=1e-2, eval_fraction=0.25, eval_every=2,
                         checkpoint_every=6, threads=2, adaptive_rank=True, target_rank=2, memory_budget="2GB")
    open_run(artifact, config, tmp_path / "run").run()
    main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report" / "report.html")])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((tmp_path / "run" / "run.json").read_text())["plan"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    with chromium() as browser:
        page = browser.new_page()
        page.goto((tmp_path / "report" / "report.html").as_uri())
        assert page.inner_text("#status") == "finished"
        assert page.inner_text("#steps") == f"{len(records)} of 6"
        assert float(page.inner_text("#last-loss")) == round(records[-1]["loss"], 4)
        assert float(page.inner_text("#last-eval-loss")) == round(evals[-1], 4)
        assert float(page.inner_text("#eval-loss-before")) == round(summary["eval_loss_before"], 4)
        mean_speed = statistics.fmean(r["tokens_per_s"] for r in records)  # the report's own mean: sum/len can round the other way
        assert float(page.inner_text("#tokens-per-s")) == round(mean_speed, 1)
        assert float(page.inner_text("#peak-rss")) == max(r["peak_rss_mb"] for r in records)
        assert float(page.inner_text("#budget")) == plan["budget_mb"]
        assert float(page.inner_text("#predicted-peak")) == plan["predicted_peak_mb"]
        assert int(page.inner_text("#total-rank")) == records[-1]["total_rank"]
        for chart in ("loss", "speed", "memory", "lr", "rank"):  # every chart's PNG loaded
            assert page.eval_on_selector(f"#chart-{chart} img", "img => img.complete && img.naturalWidth") == 720
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
