"""--memory-budget: refused before loading when impossible, kept (measured) when tight; device profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import toy
from helpers import budgeted_train, cli

from edge_peft.backends import ort as backend_module
from edge_peft.device.data import Batch
from edge_peft.device.memory import huge_pages_env
from edge_peft.device.memory_model import MB, predict
from edge_peft.exporter.pipeline import memory_shortfall
from edge_peft.device.planner import BudgetGuard, make_plan, parse_budget
from edge_peft.device.profiles import list_profiles, load_profile
from edge_peft.device.trainer import TrainConfig, open_run
from edge_peft.errors import UserError
from edge_peft.artifact.manifest import load_manifest

BUDGET_MB = 140  # micro-batch 8 x 256 needs about 160 MB with the margin: the plan must cut it


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory):
    """A GPT-2 with a 8k vocabulary and 256 positions: logits make the budget bite at short lengths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("budget")
    toy.save_tokenizer(root / "model", classifier=False)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=8000, n_embd=128, n_layer=2, n_head=2, n_positions=256, bos_token_id=4,
                               eos_token_id=4, pad_token_id=0)).save_pretrained(root / "model")
    export_artifact(root / "model", root / "artifact", ExportOptions(rank=4, max_seq_len=256, targets=["c_attn"]),
                    quiet=True)
    return root / "artifact"


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Short sentences plus a few very long documents (each cut into 256-token windows)."""
    rows = toy.lm_rows(40) + [{"text": " ".join(toy.SENTENCES * 60)} for _ in range(3)]
    return toy.write_jsonl(tmp_path_factory.mktemp("long") / "long.jsonl", rows)


@pytest.mark.slow
def test_impossible_budget_is_refused_before_the_model_loads(lm_artifact, long_data, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(backend_module.OrtTrainingBackend, "__init__", never)
    config = TrainConfig(data=str(long_data), memory_budget="100MB")
    with pytest.raises(UserError) as caught:
        open_run(lm_artifact, config, tmp_path / "run")
    message = str(caught.value)
    assert message.startswith("--memory-budget 100 MB cannot be met: micro-batch 1 at 32 tokens needs ")
    assert "try a --memory-budget of at least" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_impossible_budget_on_the_command_line(artifacts, tmp_path):
    proc = cli("plan", artifacts("gpt2", "none"), "--memory-budget", "64MB")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: --memory-budget 64 MB cannot be met")
    assert "--quantize int8 at export" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_plan_fits_and_cuts_the_sequence_when_needed(lm_artifact):
    manifest = load_manifest(lm_artifact)
    budget = BUDGET_MB * MB
    plan = make_plan(manifest, budget, batch_size=8, seq_len=256, backend="ort")
    factor = 1 + plan.margin
    assert predict(manifest, plan.micro_batch, plan.seq_len, "ort").total * factor <= budget
    assert plan.micro_batch < 8 and plan.accumulation * plan.micro_batch >= 8
    assert predict(manifest, plan.micro_batch + 1, plan.seq_len, "ort").total * factor > budget
    def need(seq_len: int) -> float:
        return predict(manifest, 1, seq_len, "ort").total * factor

    # a budget between what 1 x 32 and 1 x 256 need: the plan keeps one row and cuts its sequence
    short = make_plan(manifest, int((need(32) + need(256)) / 2), batch_size=8, seq_len=256, backend="ort")
    assert short.micro_batch == 1 and 32 <= short.seq_len < 256
    assert "cut from 256" in short.describe()[0]


@pytest.mark.slow
def test_guard_splits_a_batch_that_does_not_fit(lm_artifact):
    manifest = load_manifest(lm_artifact)
    plan = make_plan(manifest, BUDGET_MB * MB, batch_size=8, seq_len=256, backend="ort")
    guard = BudgetGuard(manifest, plan)
    ids = np.ones((8, 256), dtype=np.int64)
    parts = guard.split(Batch(ids, np.ones_like(ids), ids.copy()))
    assert len(parts) > 1 and sum(p.input_ids.shape[0] for p in parts) == 8
    assert all(guard.fits(p) for p in parts)
    guard.correction = 10**12  # measured far above prediction: nothing fits any more but single rows
    assert len(guard.split(Batch(ids, np.ones_like(ids), ids.copy()))) == 8


@pytest.mark.slow
def test_tight_budget_run_stays_under_it(lm_artifact, long_data, tmp_path):
    run = tmp_path / "run"
    summary, info = budgeted_train(lm_artifact, long_data, run, BUDGET_MB, steps=4, batch_size=8, timeout=300)
    assert summary["peak_rss_mb"] <= BUDGET_MB, summary  # VmHWM: the high-water mark of the whole process
    assert info["config"]["memory_budget"] == f"{BUDGET_MB}MB" and info["config"]["micro_batch_size"] is None
    assert info["plan"]["micro_batch"] < 8 and info["plan"]["budget_mb"] == BUDGET_MB  # the plan, beside the options
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["peak_rss_mb"] <= BUDGET_MB for r in records)
    assert records[0]["memory_overhead_mb"] >= 0  # measured once data and session are loaded
    assert summary["huge_pages"] == (huge_pages_env({}) is not None)  # the budget held with them on


@pytest.mark.parametrize("mode,size,env,expected", [
    ("always [madvise] never", 2 * MB, {}, "glibc.malloc.hugetlb=1"),
    ("[always] madvise never", 2 * MB, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("always madvise [never]", 2 * MB, {}, None),
    ("always [madvise] never", 32 * MB, {}, None),  # a 16 KiB-page kernel (some Raspberry Pi 5 images)
    ("always [madvise] never", 2 * MB, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),  # the user's opt-out
])
def test_huge_pages_only_where_they_are_2_mib_and_wanted(tmp_path, monkeypatch, mode, size, env, expected):
    from edge_peft.device import memory

    if memory._mallopt() is None:
        pytest.skip("no glibc here")
    (tmp_path / "enabled").write_text(mode + "\n")
    (tmp_path / "hpage_pmd_size").write_text(f"{size}\n")
    monkeypatch.setattr(memory, "_THP", tmp_path)
    result = huge_pages_env({"PATH": "/bin", **env})
    assert (result and result["GLIBC_TUNABLES"]) == expected
    assert result is None or result["PATH"] == "/bin"


@pytest.mark.slow
@pytest.mark.skipif(huge_pages_env({}) is None, reason="no glibc or no 2 MiB transparent huge pages here")
@pytest.mark.parametrize("budget,env,expected", [("512MB", {}, True), (None, {}, False),
                                                 ("512MB", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, False)])
def test_budgeted_runs_restart_with_huge_pages_unless_told_not(lm_artifact, data, tmp_path, budget, env, expected):
    import os

    run = tmp_path / "run"
    proc = cli("train", lm_artifact, "--data", data["lm"], "--out", run, "--steps", "2", "--batch-size", "4",
               "--eval-every", "0", "--quiet", *(["--memory-budget", budget] if budget else []),
               env={**os.environ, **env})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((run / "summary.json").read_text())["huge_pages"] is expected


def test_profiles_load_and_list():
    names = {p.name for p in list_profiles()}
    assert names == {"laptop", "jetson-orin-nano", "raspberry-pi-5", "cpu"}
    pi = load_profile("raspberry-pi-5")
    assert pi.threads == 4 and parse_budget(pi.memory_budget) == 1024 * MB and 0 < pi.margin < 1


@pytest.mark.parametrize("line,key", [('threads = "four"', "threads"), ('memory_budget = "lots"', "memory_budget"),
                                      ("margin = 2.0", "margin"), ("colour = 1", "colour")])
def test_bad_profile_value_names_file_and_key(line, key, tmp_path, monkeypatch):
    good = {"description": '"x"', "threads": "2", "execution_provider": '"CPUExecutionProvider"',
            "memory_budget": '"512MB"', "margin": "0.1"}
    name = line.split(" = ")[0]
    good[name] = line.split(" = ")[1]
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "board.toml").write_text("".join(f"{k} = {v}\n" for k, v in good.items()))
    monkeypatch.setenv("EDGE_PEFT_DATA", str(tmp_path))
    with pytest.raises(UserError) as caught:
        load_profile("board")
    assert str(tmp_path / "devices" / "board.toml") in str(caught.value) and repr(key) in str(caught.value)
    with pytest.raises(UserError, match="does not exist"):
        load_profile("toaster")


@pytest.mark.slow
def test_profile_applies_and_missing_provider_falls_back(lm_artifact):
    proc = cli("plan", lm_artifact, "--device-profile", "jetson-orin-nano")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "CUDAExecutionProvider is not available" in err and "falling back to CPUExecutionProvider" in err
    assert out.startswith("memory budget 3072 MB, safety margin 15%")
    proc = cli("devices")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "raspberry-pi-5" in out and "1GB budget" in out


@pytest.mark.slow
def test_export_plan_fits_and_is_recorded(models, tmp_path):
    from edge_peft.exporter.export_plan import PLAN_SEQ_LEN, plan_export
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    budget = 200 * MB
    opts = plan_export(models["gpt2"], ExportOptions(rank=4, quantize="none", max_seq_len=64,
                                                     targets=toy.TARGETS["gpt2"]), budget, 0.15, "cpu")
    manifest = export_artifact(models["gpt2"], tmp_path / "artifact", opts, quiet=True)
    chosen = manifest.memory.export_plan
    assert manifest.quantization == chosen["quantize"] == "int8" and manifest.adapter.rank == chosen["rank"]
    assert manifest.memory.budget_mb == 200 and manifest.memory.margin == 0.15
    assert manifest.memory.profile == "cpu" and chosen["seq_len"] == min(PLAN_SEQ_LEN, 64)
    assert predict(manifest, 1, chosen["seq_len"], "ort").total * 1.15 <= budget  # the real artifact fits too


@pytest.mark.slow
def test_impossible_export_budget_is_refused_before_export(models, tmp_path, monkeypatch, capsys):
    from edge_peft import cli as cli_module
    from edge_peft.exporter import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was exported")

    monkeypatch.setattr(pipeline, "export_artifact", never)
    monkeypatch.setattr(pipeline, "load_model_dir", never)
    with pytest.raises(SystemExit) as caught:
        cli_module.main(["export", str(models["llama"]), "--out", str(tmp_path / "artifact"), "--memory-budget", "64MB"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --memory-budget 64 MB cannot be met at export: the smallest choice (int4, "
                          "checkpointing, rank 1, layers top:1, micro-batch 1 x 64 tokens) needs ")
    assert "try a --memory-budget of at least" in err and not (tmp_path / "artifact").exists()


def test_export_plan_keeps_every_block_and_the_rank_by_checkpointing_then_int4(tmp_path):
    """On the portable backend a causal LM's budget first costs time (blocks recomputed), then base precision,
    before rank or depth (planned on SmolLM2-135M's shape: a config, no weights)."""
    import dataclasses

    from transformers import LlamaConfig

    from edge_peft.exporter.export_plan import _needed, model_figures, plan_export
    from edge_peft.exporter.load import meta_model
    from edge_peft.exporter.pipeline import ExportOptions

    LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True).save_pretrained(tmp_path)
    opts = ExportOptions(rank=8, max_seq_len=512, backend="portable")
    meta = meta_model(tmp_path, None)
    ladder = [("int8", False), ("int8", True), ("int4", True)]
    need = [_needed(model_figures(meta, dataclasses.replace(opts, checkpointing=c), 8, None, q, "portable"), 256, 0.1)
            for q, c in ladder]
    assert need[0] > need[1] > need[2]
    for (quantize, checkpointing), needed in zip(ladder, need):
        planned = plan_export(tmp_path, opts, int(needed) + 1, 0.1)
        chosen = planned.memory["export_plan"]
        assert (planned.quantize, planned.checkpointing, planned.rank, planned.layers) == \
            (quantize, checkpointing, 8, None)
        assert (chosen["quantize"], chosen["checkpointing"], chosen["layers"]) == (quantize, checkpointing, "all")
    assert plan_export(tmp_path, opts, int(need[2]), 0.1).rank < 8  # below the last rung: a smaller rank


@pytest.mark.slow
def test_export_plan_auto_layers_takes_as_many_blocks_as_fit(models):
    from edge_peft.exporter.export_plan import _needed, model_figures, plan_export
    from edge_peft.exporter.layer_selection import auto_count
    from edge_peft.exporter.load import meta_model
    from edge_peft.exporter.pipeline import ExportOptions

    # int4 with checkpointing: the last rung of the quantization / checkpointing ladder, so depth is what gives
    opts = ExportOptions(rank=4, quantize="int4", checkpointing=True, max_seq_len=64, targets=toy.TARGETS["gpt2"],
                         layers="auto")
    meta = meta_model(models["gpt2"], None)
    depth = meta.model.config.n_layer
    need = {n: _needed(model_figures(meta, opts, 1, f"top:{n}", "int4"), 64, 0.1) for n in (depth - 1, depth)}
    assert need[depth - 1] < need[depth]
    planned = plan_export(models["gpt2"], opts, int(need[depth - 1]) + 1, 0.1)
    assert planned.layers == f"auto:{depth - 1}" and planned.memory["export_plan"]["layers"] == f"auto:{depth - 1}"
    with pytest.raises(UserError, match="--layers auto adapts as many blocks as the memory budget allows"):
        auto_count("auto")


@pytest.mark.parametrize("setting,kept", [("default", False), ("reuse_freed_memory", True),
                                          ("predictable_memory", False)])
def test_freed_step_memory_stays_resident_only_when_asked(setting, kept):
    """Without a budget the trainer keeps freed pages for the next step; under one RSS follows live tensors."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from edge_peft.device import memory\n"
        f"assert {setting!r} == 'default' or getattr(memory, {setting!r})()\n"
        "block = np.ones(24 * memory.MB // 8)\n"
        "held = memory.current_rss()\n"
        "del block\n"
        "print((held - memory.current_rss()) / memory.MB)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    released = float(proc.stdout)
    assert (released < 2) if kept else (released > 20), released


def test_an_export_larger_than_free_memory_is_announced_in_one_line():
    """A 1 B model on a machine with 10 GB free (8 available + 2 held): the note names both figures."""
    note = memory_shortfall(1_070_000_000, 2_000_000_000, 8_000_000_000)
    assert note is not None and "\n" not in note
    assert "1.07 B parameters" in note and "13.1 GB" in note and "10.0 GB is free" in note
    assert memory_shortfall(1_070_000_000, 3_600_000_000, 16_000_000_000) is None  # the same on 19.6 GB free
    assert memory_shortfall(135_000_000, 1_000_000_000, 8_000_000_000) is None  # SmolLM2 on an 8 GB laptop
