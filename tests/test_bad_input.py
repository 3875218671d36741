"""Every bad input gets one clear line, exit status 2, no traceback, and leaves nothing partial."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import train

from edge_peft.cli import main
from edge_peft.fileio import sha256_file

pytestmark = pytest.mark.slow  # every test uses the exported toy models or artifacts


def run_cli(capsys, *args) -> str:
    """Run the CLI in-process; assert the user-error contract; return the message.

    Progress lines of stages that completed may precede it; the error itself is one last line.
    """
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, err
    assert all(ln.startswith("[") for ln in lines[:-1]), err
    return lines[-1]


def assert_nothing_left(path):
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")], "temp files left"


@pytest.fixture()
def bad_arch(models, tmp_path):
    model = tmp_path / "opt-model"
    shutil.copytree(models["gpt2"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "opt"}))
    return model


@pytest.mark.parametrize("case,expect", [
    ("missing", "is not a directory"),
    ("not-a-model", "no config.json"),
    ("bad-arch", "supported model types are"),
    ("bad-targets", "choose --targets from"),
    ("rank-zero", "must be a positive integer"),
    ("rank-too-big", "does not fit"),
])
def test_export_refuses(case, expect, models, bad_arch, tmp_path, capsys):
    out = tmp_path / "artifact"
    args = {"missing": [tmp_path / "nope"], "not-a-model": [tmp_path], "bad-arch": [bad_arch],
            "bad-targets": [models["gpt2"], "--targets", "q_proj"], "rank-zero": [models["gpt2"], "--rank", "0"],
            "rank-too-big": [models["gpt2"], "--rank", "1000"]}[case]
    err = run_cli(capsys, "export", *args, "--out", out)
    assert expect in err
    assert_nothing_left(out)


def test_unsupported_arch_lists_supported(bad_arch, tmp_path, capsys):
    err = run_cli(capsys, "export", bad_arch, "--out", tmp_path / "a")
    assert all(t in err for t in ("bert", "gpt2", "llama"))


@pytest.fixture()
def broken_artifacts(artifacts, tmp_path):
    good = artifacts("bert", "int8")
    made = {}
    for case in ("missing", "corrupt", "schema"):
        art = tmp_path / f"art-{case}"
        shutil.copytree(good, art)
        manifest = art / "manifest.json"
        if case == "missing":
            manifest.unlink()
        elif case == "corrupt":
            manifest.write_text(manifest.read_text()[:100])
        else:
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema_version": 99}))
        made[case] = art
    return made


@pytest.mark.parametrize("case,expect", [("missing", "manifest.json is missing"), ("corrupt", "is corrupt"),
                                         ("schema", "schema version 99")])
def test_train_refuses_bad_manifest(case, expect, broken_artifacts, data, tmp_path, capsys):
    out = tmp_path / "run"
    err = run_cli(capsys, "train", broken_artifacts[case], "--data", data["cls"], "--out", out)
    assert expect in err
    assert_nothing_left(out)


@pytest.mark.parametrize("content,expect", [
    ('{"text": "good day", "label": "positive"}\n{"text": broken\n', "bad.jsonl:2: malformed JSON"),
    ("\n\n", "holds no examples"),
    ('{"text": "good day", "label": "neutral"}\n', "label 'neutral' is not one of the model's classes"),
    ('{"txt": "good day"}\n', 'expected an object with a string "text" field'),
])
def test_train_refuses_bad_data(content, expect, artifacts, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    err = run_cli(capsys, "train", artifacts("bert", "int8"), "--data", bad, "--out", out)
    assert expect in err
    assert_nothing_left(out)


def test_adapter_load_refuses_other_base_and_other_shapes(artifacts, data, tmp_path, capsys):
    bert = artifacts("bert", "none")
    train(bert, data["cls"], tmp_path / "bert-run", steps=2)
    train(artifacts("gpt2", "none"), data["lm"], tmp_path / "gpt2-run", steps=2)
    target = tmp_path / "bert-r2"
    shutil.copytree(artifacts("bert", "none", rank=2), target)
    before = sha256_file(target / "checkpoint")

    err = run_cli(capsys, "adapter", "load", target, tmp_path / "gpt2-run" / "adapter")
    assert "use an adapter trained on the same base model" in err
    err = run_cli(capsys, "adapter", "load", target, tmp_path / "bert-run" / "adapter")
    assert "has shape [2, 4]" in err or "the base expects" in err
    assert sha256_file(target / "checkpoint") == before
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in bert.iterdir())


def test_adapter_load_warm_starts_training(artifacts, data, tmp_path, capsys):
    source = artifacts("bert", "none")
    train(source, data["cls"], tmp_path / "run", steps=4)
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    main(["adapter", "load", str(target), str(tmp_path / "run" / "adapter")])
    from edge_peft.device.inference import Predictor

    import numpy as np

    ids = np.array([[2, 5, 9, 3]], dtype=np.int64)
    np.testing.assert_allclose(Predictor(target).logits(ids, np.ones_like(ids)),
                               Predictor(tmp_path / "run").logits(ids, np.ones_like(ids)), rtol=1e-5)
