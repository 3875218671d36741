"""Unit tests of the artifact contract: tensor and graph-value names, and manifest.json (schema 2) loading.

No export: manifests come from ``edge_peft.store.testing.make_manifest`` and are written by hand.
"""

from __future__ import annotations

import json

import pytest

from edge_peft.artifact.manifest import SCHEMA_VERSION, Manifest, load_manifest
from edge_peft.artifact.names import (PEFT_PREFIX, a_name, accumulated, b_name, grad_name, is_a, is_b, is_lora_factor,
                                      layer_index, lora_key, magnitude_name, moment_names, onnx_name, peft_key,
                                      updated)
from edge_peft.errors import UserError
from edge_peft.store.testing import make_manifest

LLAMA = "model.layers.3.self_attn.q_proj"
GPT2 = "transformer.h.11.attn.c_attn"
BERT = "bert.encoder.layer.0.attention.self.query"

# --- names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [a_name(LLAMA), b_name(GPT2), "classifier.weight", magnitude_name(BERT)])
def test_peft_key_and_onnx_name_round_trip(name):
    key = peft_key(name)
    assert key == "base_model.model." + name and key.startswith(PEFT_PREFIX)
    assert onnx_name(key) == name and onnx_name(name) == name  # a name without the prefix is kept as is


def test_factor_and_magnitude_names():
    assert a_name(LLAMA) == LLAMA + ".lora_A.weight" and b_name(LLAMA) == LLAMA + ".lora_B.weight"
    assert magnitude_name(LLAMA) == LLAMA + ".lora_magnitude_vector"
    assert lora_key(LLAMA, "A") == peft_key(a_name(LLAMA)) and lora_key(LLAMA, "B") == peft_key(b_name(LLAMA))
    with pytest.raises(KeyError):
        lora_key(LLAMA, "C")


def test_a_and_b_are_told_apart_by_onnx_name_or_peft_key():
    for a, b in ((a_name(GPT2), b_name(GPT2)), (lora_key(GPT2, "A"), lora_key(GPT2, "B"))):
        assert is_a(a) and not is_b(a) and is_b(b) and not is_a(b)
        assert is_lora_factor(a) and is_lora_factor(b)
    for other in (magnitude_name(GPT2), GPT2 + ".weight", "score.weight", GPT2 + ".lora_A.weight.adam_m"):
        assert not is_a(other) and not is_b(other) and not is_lora_factor(other)


@pytest.mark.parametrize("name,index", [
    (LLAMA, 3), (b_name(LLAMA), 3), (peft_key(a_name(LLAMA)), 3), ("model.layers.12.mlp.down_proj", 12),
    (GPT2, 11), ("transformer.h.0.mlp.c_fc", 0), (BERT, 0), ("bert.encoder.layer.5.output.dense", 5),
    ("lm_head", None), ("score.weight", None), ("bert.pooler.dense", None), ("model.embed_tokens", None),
    ("model.layers_extra.3.x", None),
])
def test_layer_index_of_llama_gpt2_and_bert_paths(name, index):
    assert layer_index(name) == index


def test_step_graph_value_names_are_distinct():
    names = [b_name(LLAMA), a_name(LLAMA), b_name(GPT2)]
    values = [v for n in names for v in (n, *moment_names(n), accumulated(n), updated(n), grad_name(n))]
    assert len(set(values)) == len(values) == 6 * len(names)
    m, v = moment_names(b_name(LLAMA))
    assert m != v and updated(m) not in values and updated(accumulated(LLAMA)) != accumulated(LLAMA)
    assert all(x.startswith(b_name(LLAMA)) for x in (m, v, accumulated(b_name(LLAMA)), updated(b_name(LLAMA))))


# --- manifest --------------------------------------------------------------------------------------------


def write(directory, data) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "manifest.json").write_text(data if isinstance(data, str) else json.dumps(data))


def refusal(directory) -> str:
    with pytest.raises(UserError) as caught:
        load_manifest(directory)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize("raw", [
    {"schema_version": 1},
    {"schema_version": 2},  # whole-model portable graphs, planned with other factors
    {"schema_version": 1, "rank": 4, "alpha": 8.0, "modules": [], "frozen_bytes": 0},  # the flat schema-1 layout
    {"adapter": {}, "memory": {}},  # no version at all
])
def test_other_schema_versions_are_refused_with_re_export(tmp_path, raw):
    write(tmp_path / "art", raw)
    message = refusal(tmp_path / "art")
    assert f"has schema version {raw.get('schema_version')!r}, this edge-peft reads version {SCHEMA_VERSION}" in message
    assert "re-export the artifact" in message and str(tmp_path / "art" / "manifest.json") in message


@pytest.mark.parametrize("content,expect", [("{not json", "is corrupt (JSONDecodeError"), ('{"schema_version": 2',
                                            "is corrupt"), ("[2]", "is not a JSON object"), ("", "is corrupt")])
def test_corrupt_manifest_is_refused(tmp_path, content, expect):
    write(tmp_path / "art", content)
    message = refusal(tmp_path / "art")
    assert expect in message and "re-export" in message


def test_missing_manifest_and_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "manifest.json is missing" in refusal(tmp_path / "empty")
    assert "is not a directory" in refusal(tmp_path / "gone")


def test_unknown_variant_is_refused(tmp_path):
    data = make_manifest().to_dict()
    data["adapter"]["variant"] = "nope"
    write(tmp_path / "art", data)
    message = refusal(tmp_path / "art")
    assert "is invalid (variant 'nope' is not supported)" in message and message.endswith("re-export the artifact")


@pytest.mark.parametrize("edit,expect", [
    (lambda d: d.pop("memory"), "is missing or has unexpected fields"),
    (lambda d: d.update(colour="red"), "is missing or has unexpected fields"),
    (lambda d: d["memory"].update(colour="red"), "the memory section has unexpected fields"),
    (lambda d: d["memory"].pop("frozen_bytes"), "the memory section is incomplete"),
    (lambda d: d["adapter"].pop("modules"), "the adapter section is malformed"),
    (lambda d: d.update(quantization="int3"), "quantization 'int3' not in"),
    (lambda d: d.update(quantization="int4"), "block size None does not fit quantization 'int4'"),
    (lambda d: d.update(backends=["cuda"]), "backends ['cuda'] not a non-empty subset"),
    (lambda d: d.update(weight_decay=-0.1), "weight decay -0.1 and max grad norm 1.0 must be >= 0"),
    (lambda d: d.update(max_grad_norm="1"), "weight decay 0.0 and max grad norm '1' must be >= 0"),
])
def test_damaged_sections_are_refused(tmp_path, edit, expect):
    data = make_manifest().to_dict()
    edit(data)
    write(tmp_path / "art", data)
    assert expect in refusal(tmp_path / "art")


@pytest.mark.parametrize("kw", [{}, {"labels": 3, "variant": "lora", "rank": 2}])
def test_to_dict_from_dict_round_trip(tmp_path, kw):
    manifest = make_manifest(**kw)
    data = manifest.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION == 4
    assert set(data["adapter"]) >= {"base_fingerprint", "variant", "modules"} and "frozen_bytes" in data["memory"]
    assert Manifest.from_dict(json.loads(json.dumps(data))) == manifest
    manifest.save(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest and loaded.to_dict() == data
    changed = Manifest.from_dict({**data, "max_seq_len": 64})
    assert changed != manifest and changed.max_seq_len == 64
