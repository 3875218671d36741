"""KV-cache generation, streaming, chat and adapter merge (issue 15, points 3 and 4)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from helpers import cli, train

from edge_peft.artifact.manifest import load_manifest
from edge_peft.device.chat_template import ChatTemplate
from edge_peft.device.generation import Sampling
from edge_peft.device.inference import Predictor

PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def trained(artifacts, data, tmp_path_factory):
    """kind -> (run, adapter dir) of a fp32 artifact trained a few steps (its B are nonzero)."""
    from edge_peft.device.adapter_io import save_run_adapter

    root = tmp_path_factory.mktemp("trained")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            run = root / kind
            train(artifacts(kind, quantize="none"), data["lm"], run, steps=8, lr=3e-2)
            cache[kind] = run, save_run_adapter(run, root / f"{kind}-adapter")
        return cache[kind]

    return get


def _recompute_greedy(predictor: Predictor, ids: list[int], n: int) -> list[int]:
    """Greedy continuation through the full-sequence inference model, the whole prefix each token."""
    out = list(ids)
    for _ in range(n):
        arr = np.array([out], np.int64)
        token = int(predictor.logits(arr, np.ones_like(arr))[0, -1].argmax())
        if token == predictor.manifest.eos_token_id:
            break
        out.append(token)
    return out[len(ids):]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_generation_equals_full_recompute(artifacts, kind):
    predictor = Predictor(artifacts(kind))  # int8 base
    rng = np.random.default_rng(0)
    for name, value in predictor.tensors.items():
        if name.endswith("lora_B.weight"):  # an adapter that changes the output
            value[...] = rng.normal(0, 0.3, value.shape)
    ids = predictor.prompt_ids(PROMPT)
    cached = list(predictor.generator.stream_ids(ids, 16))
    assert cached == _recompute_greedy(predictor, ids, 16)
    assert len(cached) >= 1
    # a longer prompt sharing the cached prefix feeds only its new tokens and continues the same way
    longer = ids + cached[:2]
    assert list(predictor.generator.stream_ids(longer, 8)) == _recompute_greedy(predictor, longer, 8)
    # sampling is seeded
    sampled = [list(predictor.generator.stream_ids(ids, 8, Sampling(temperature=1.0, top_p=0.9, seed=3)))
               for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_equals_pytorch_generate_with_merged_peft_adapter(models, trained, kind, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edge_peft.exporter.merge import merge_run_adapter

    run, adapter = trained(kind)
    predictor = Predictor(run)
    assert any(np.abs(v).max() > 0 for n, v in predictor.tensors.items() if n.endswith("lora_B.weight"))
    ids = predictor.prompt_ids(PROMPT)
    ours = list(predictor.generator.stream_ids(ids, 12))
    merged = AutoModelForCausalLM.from_pretrained(merge_run_adapter(run, tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        out = merged.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    eos = predictor.manifest.eos_token_id
    assert ours == (out[: out.index(eos)] if eos in out else out)
    assert "".join(predictor.stream(PROMPT, 12)) == predictor.tokenizer.decode(ids + ours)[len(PROMPT):]


@pytest.mark.slow
def test_merged_model_logits_equal_base_plus_adapter(models, trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_peft.errors import UserError
    from edge_peft.exporter.load import load_model_dir
    from edge_peft.exporter.merge import merge_run_adapter

    run, adapter = trained("llama")
    out = merge_run_adapter(run, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ids = torch.tensor([[5, 9, 12, 7, 30, 11]])
    with torch.no_grad():
        reference = PeftModel.from_pretrained(load_model_dir(models["llama"]).model, str(adapter)).eval()(ids).logits
        base = load_model_dir(models["llama"]).model(ids).logits
        logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(logits, reference, atol=1e-4)
    assert not torch.allclose(logits, base, atol=1e-3)  # the adapter is in the merged weights
    with pytest.raises(UserError, match="fingerprint"):  # another base is refused
        merge_run_adapter(run, tmp_path / "other", base=models["gpt2"])


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}the {% endif %}")


@pytest.mark.slow
def test_chat_holds_a_two_turn_conversation_and_streams(artifacts, tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(artifacts("llama"), artifact)
    ChatTemplate(CHAT_TEMPLATE, {"eos_token": "<eos>"}).save(artifact)
    manifest = load_manifest(artifact)
    manifest.record_files(artifact)
    manifest.save(artifact)
    proc = cli("chat", artifact, "--max-new-tokens", "6", stdin=subprocess.PIPE)
    proc.stdin.write("the cat sat on the mat\n")
    proc.stdin.flush()
    first = proc.stdout.readline()  # the first reply arrives while the conversation is still open
    proc.stdin.write("we saw a film\n")
    proc.stdin.close()
    rest, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert first.strip() and rest.strip() and not err
    assert len((first + rest).strip().splitlines()) == 2


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(artifacts, trained, tmp_path, capsys):
    checks = [
        (["generate", tmp_path / "missing", "--prompt", "x"], "missing"),
        (["chat", artifacts("llama"), "--adapter", tmp_path / "nope"], "does not exist"),
        (["chat", artifacts("llama")], "chat template"),
        (["generate", artifacts("llama"), "--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p"),
    ]
    for args, needle in checks:
        proc = cli(*args, stdin=subprocess.DEVNULL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    from edge_peft.cli import main

    run, _ = trained("llama")
    merges = [([tmp_path / "missing"], "not a training run"), ([run, "--adapter", tmp_path / "nope"], "does not exist"),
              ([run, "--base", tmp_path], "no config.json")]
    for args, needle in merges:
        with pytest.raises(SystemExit) as exit_:
            main(["adapter", "merge", *map(str, args), "--out", str(tmp_path / "merged")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
