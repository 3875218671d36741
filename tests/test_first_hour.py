"""What a new user hits in the first hour: no dead ends, no tracebacks, no silent wrong answers. Each test
drives the command line in its own process, as a user does."""

from __future__ import annotations

import json
import os
import resource
import socket

import numpy as np
import pytest
from helpers import cli, losses

pytestmark = pytest.mark.slow  # training processes on exported artifacts


def _run(*args, env: dict | None = None, preexec=None, timeout: int = 300) -> tuple[int, str, str]:
    proc = cli(*args, env={**os.environ, **(env or {})}, preexec_fn=preexec)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _one_line_error(err: str, expect: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: ") and expect in lines[-1], err


def _train(artifact, data, run, *extra) -> list[str]:
    return ["train", artifact, "--data", data, "--out", run, "--batch-size", "4", "--eval-every", "0", "--threads", "1",
            "--lr", "5e-3", "--quiet", *extra]


def test_a_run_refused_after_its_directory_was_made_can_be_run_again(artifacts, data, tmp_path):
    artifact, run = artifacts("gpt2", "int8"), tmp_path / "run"  # this artifact carries only the ort graphs
    code, _, err = _run(*_train(artifact, data["lm"], run, "--steps", "2", "--backend", "portable"))
    _one_line_error(err, "carries no portable training graphs")
    assert code == 2 and (run / "run.json").is_file()  # the directory was made before the refusal

    code, _, err = _run(*_train(artifact, data["lm"], run, "--steps", "2", "--resume"))
    assert code == 0 and "starting it over from step 0" in err, err
    code, _, err = _run(*_train(artifact, data["lm"], run, "--steps", "2"))
    _one_line_error(err, "already holds a run: pass --resume")  # now it has a checkpoint: nothing is lost


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_newest(artifacts, data, tmp_path):
    artifact = artifacts("gpt2", "int8")
    args = ("--steps", "12", "--checkpoint-every", "4")
    code, _, err = _run(*_train(artifact, data["lm"], tmp_path / "straight", *args))
    assert code == 0, err
    killed = tmp_path / "killed"
    code, _, _ = _run(*_train(artifact, data["lm"], killed, *args), env={"EDGE_PEFT_CRASH_AT": "between-renames"})
    assert code == -9 and not (killed / "checkpoint").exists()  # old and new both beside it, neither in place
    assert (killed / ".checkpoint.old").is_dir() and list(killed.glob(".checkpoint.*.tmp"))

    code, _, err = _run(*_train(artifact, data["lm"], killed, *args, "--resume"))
    assert code == 0, err
    assert [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(12))
    np.testing.assert_allclose(losses(killed), losses(tmp_path / "straight"), rtol=1e-6)  # resumed from step 8
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith(".")) == []  # leftovers cleaned


def test_out_of_memory_in_a_step_is_one_line(artifacts, data, tmp_path):
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    code, _, err = _run(*_train(artifacts("gpt2", "int8"), data["lm"], tmp_path / "run", "--steps", "1",
                                "--batch-size", "200000", "--micro-batch-size", "200000"), preexec=limit_memory)
    assert code == 2, err
    _one_line_error(err, "ran out of memory on a micro-batch of 200000 x")
    assert "--memory-budget" in err


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(artifacts, data, tmp_path):
    run = tmp_path / "run"
    code, _, err = _run(*_train(artifacts("gpt2", "int8"), data["lm"], run, "--steps", "20", "--checkpoint-every", "1",
                                "--lr", "1e30"))
    assert code == 2, err
    _one_line_error(err, "training diverged and stopped")
    step = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert 1 <= step < 20
    code, out, err = _run("adapter", "save", run, "--out", tmp_path / "adapter")  # the kept adapter is finite
    assert code == 0, err


def test_a_nonexistent_adapter_path_is_refused(artifacts, data, tmp_path):
    artifact = artifacts("bert", "int8")
    code, _, err = _run("classify", artifact, "--text", "good day", "--adapter", tmp_path / "adapters" / "typo")
    assert code == 2
    _one_line_error(err, "does not exist")


def test_serve_on_a_busy_port_creates_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = _run("serve", "--data-dir", tmp_path / "store", "--port", str(port), timeout=60)
    assert code == 2
    _one_line_error(err, f"cannot listen on 127.0.0.1:{port}")
    assert not (tmp_path / "store").exists()


def test_training_and_inference_see_the_same_ids_on_long_texts(artifacts, tmp_path):
    from tokenizers import Tokenizer

    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.device.data import Example, Tokenized
    from edge_peft.device.inference import Predictor

    artifact = artifacts("minilm", "int8")
    manifest = load_manifest(artifact)
    text = " ".join(["the film was a very good one and we saw it twice"] * 40)  # far past 32 tokens
    run = tmp_path / "run"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": text, "label": "positive"}) + "\n" + json.dumps({"text": "bad", "label": 0}))
    code, _, err = _run(*_train(artifact, data, run, "--steps", "1", "--max-seq-len", "24", "--eval-fraction", "0"))
    assert code == 0, err
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    trained = Tokenized(tokenizer, [Example(text, 1)], manifest.task, 24, manifest.pad_token_id, None).sequences[0]
    assert len(trained) == 24 and trained[-1] == tokenizer.token_to_id("[SEP]")  # cut by the tokenizer, [SEP] kept
    assert Predictor(run).encode([text])[0] == trained  # the run classifies at the length it trained at


def test_peft_loads_an_adapter_of_some_blocks_without_warnings(models, tmp_path):
    import warnings

    from peft import PeftModel

    from edge_peft.exporter.load import load_model_dir
    from helpers import train
    import toy

    from edge_peft.cli import main

    artifact = tmp_path / "artifact"  # export needs torch: in this process (the device commands run without it)
    main(["export", str(models["llama"]), "--out", str(artifact), "--layers", "top:1", "--rank", "2",
          "--max-seq-len", "32", "--quantize", "none"])
    data = toy.write_jsonl(tmp_path / "lm.jsonl", toy.lm_rows(16))
    train(artifact, data, tmp_path / "run", steps=2)
    code, _, err = _run("adapter", "save", tmp_path / "run", "--out", tmp_path / "adapter")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    assert config["base_model_name_or_path"] == str(models["llama"].resolve())
    base = load_model_dir(models["llama"], None).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    said = [str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert said == []  # e.g. PEFT's "Found missing adapter keys" when it wraps blocks the file does not hold
    wrapped = {n for n, _ in model.named_modules() if n.endswith("q_proj.lora_A")}
    assert wrapped and all(".layers.1." in n for n in wrapped)


def test_a_lora_adapter_is_refused_by_a_lora_fa_artifact_not_cut(artifacts, data, tmp_path):
    lora, lora_fa = artifacts("gpt2", "int8", "lora"), artifacts("gpt2", "int8")
    code, _, err = _run(*_train(lora, data["lm"], tmp_path / "run", "--steps", "4", "--lr", "1e-2"))
    assert code == 0, err
    code, _, err = _run("adapter", "save", tmp_path / "run", "--out", tmp_path / "adapter")
    assert code == 0, err
    for args in (("adapter", "load", lora_fa, tmp_path / "adapter"),
                 ("generate", lora_fa, "--prompt", "the cat", "--adapter", tmp_path / "adapter")):
        code, _, err = _run(*args)
        assert code == 2
        _one_line_error(err, "is not the frozen LoRA-FA A")


def test_eval_scores_a_whole_file_for_the_base_and_the_adapter(artifacts, data, tmp_path):
    from edge_peft.device.inference import Predictor

    lm, run = artifacts("gpt2", "int8"), tmp_path / "lm-run"
    code, _, err = _run(*_train(lm, data["lm"], run, "--steps", "30", "--lr", "1e-2"))
    assert code == 0, err
    scores = {}
    for which in ("base", "adapter"):
        code, out, err = _run("eval", run, "--data", data["lm"], "--json", tmp_path / f"{which}.json",
                              *(["--base"] if which == "base" else []))
        assert code == 0 and "perplexity" in out, err
        scores[which] = json.loads((tmp_path / f"{which}.json").read_text())
    assert scores["adapter"]["loss"] < 0.6 * scores["base"]["loss"]  # the toy text is learnable
    assert scores["adapter"]["perplexity"] == pytest.approx(np.exp(scores["adapter"]["loss"]))
    assert scores["base"]["tokens"] == scores["adapter"]["tokens"] > 0

    cls, run = artifacts("bert", "int8"), tmp_path / "cls-run"
    code, _, err = _run(*_train(cls, data["cls"], run, "--steps", "20", "--lr", "1e-2"))
    assert code == 0, err
    code, out, err = _run("eval", run, "--data", data["cls_eval"], "--json", tmp_path / "cls.json")
    assert code == 0 and "accuracy" in out, err
    scores = json.loads((tmp_path / "cls.json").read_text())
    rows = [json.loads(line) for line in data["cls_eval"].read_text().splitlines()]
    predicted = [label for label, _ in Predictor(run).classify([r["text"] for r in rows])]
    assert scores["accuracy"] == pytest.approx(np.mean([p == r["label"] for p, r in zip(predicted, rows)]))
    positive = scores["classes"]["positive"]
    hits = sum(p == r["label"] == "positive" for p, r in zip(predicted, rows))
    assert positive["recall"] == pytest.approx(hits / sum(r["label"] == "positive" for r in rows))
    assert positive["support"] + scores["classes"]["negative"]["support"] == len(rows) == scores["examples"]


def test_classify_reads_a_file_or_stdin_and_writes_json_lines(artifacts, data, tmp_path):
    artifact = artifacts("bert", "int8")
    rows = [json.loads(line) for line in data["cls_eval"].read_text().splitlines()][:5]
    proc = cli("classify", artifact, "--data", "-", stdin=__import__("subprocess").PIPE)
    out, err = proc.communicate("".join(json.dumps(r) + "\n" for r in rows) + "a plain line\n", timeout=120)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["text"] for x in lines] == [r["text"] for r in rows] + ["a plain line"]
    assert all(x["label"] in ("negative", "positive") and 0.5 <= x["probability"] <= 1 for x in lines)


@pytest.mark.parametrize("name", ["tokenizer.json", "inference_model.onnx", "training_model.onnx"])
def test_a_truncated_artifact_file_is_named_in_one_line(name, artifacts, data, tmp_path):
    import shutil

    artifact = tmp_path / "artifact"
    shutil.copytree(artifacts("bert", "int8"), artifact)
    path = artifact / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for args in (("classify", artifact, "--text", "good day"),
                 _train(artifact, data["cls"], tmp_path / "run", "--steps", "1")):
        code, _, err = _run(*args)
        assert code == 2
        _one_line_error(err, f"{path} is corrupt or truncated")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_prints_its_task_defaults_and_scores_the_held_out_set_before_step_1(artifacts, data, tmp_path):
    from edge_peft.device.defaults import TASK_DEFAULTS
    from edge_peft.device.evaluate import evaluate_file
    from edge_peft.device.inference import Predictor

    artifact, run, held = artifacts("gpt2", "int8"), tmp_path / "run", data["lm"]
    code, out, err = _run("train", artifact, "--data", data["lm"], "--eval-data", held, "--out", run, "--steps", "3",
                          "--batch-size", "4", "--eval-every", "3", "--threads", "1")
    assert code == 0, err
    lm = TASK_DEFAULTS["causal-lm"]
    assert f"defaults for a causal-lm artifact: --lr {lm.lr:g}" in err and "--steps" not in err.split("defaults")[1]
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["lr"] == lm.lr and config["steps"] == 3 and "held-out loss before training" in err

    summary = json.loads((run / "summary.json").read_text())
    base = Predictor(artifact)
    base.max_seq_len = config["max_seq_len"]
    assert summary["eval_loss_before"] == pytest.approx(evaluate_file(base, held)["loss"], rel=1e-4)  # whole file
    assert summary["eval_loss"] == pytest.approx(evaluate_file(Predictor(run), held)["loss"], rel=1e-4)
    assert f"held-out loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss']:.4f}" in out
