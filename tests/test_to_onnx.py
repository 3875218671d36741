"""The legacy trace runs without the weights and gives them back from the module afterwards: every initializer
holds the module's tensor bit for bit (trainable ones their true values, not the shifted ones the trace saw), a
tied head is read from the embedding table once, equal-valued frozen tensors each have their own initializer,
and the graph's inputs are only the data inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

pytestmark = pytest.mark.filterwarnings("ignore")


def _model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edge_peft.exporter.inject import inject_adapters
    from edge_peft.variants import get_variant

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    inject_adapters(model, names, get_variant("lora-fa"), 4, 8.0, 0)
    with torch.no_grad():  # B starts at zero: make the adapters count in the logits
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    return model


def test_weightless_trace_holds_the_modules_tensors_exactly():
    from edge_peft.exporter.to_onnx import export_logits_model

    model = _model()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    proto = export_logits_model(model, True, trainable)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for name, value in values.items():
        np.testing.assert_array_equal(value, tensors[name.removeprefix("model.")].detach().numpy(), err_msg=name)
    assert {f"model.{n}" for n in trainable} <= set(values)
    # the layer norms start equal (all ones): each keeps its own initializer, so each gets its own gradient
    norms = [n for n in values if n.endswith("layernorm.weight")]
    assert len(norms) == 4
    # the tied head is the embedding table, read once
    assert "model.lm_head.weight" not in values and "model.model.embed_tokens.weight" in values

    ids = np.array([[1, 5, 9, 3, 7, 2]], np.int64)
    mask = np.ones_like(ids)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_compacted_keeps_the_graph():
    from edge_peft.exporter import graph
    from edge_peft.exporter.to_onnx import export_logits_model

    model = _model()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    proto = export_logits_model(model, True, trainable)
    graph.prepare_frozen(proto, [f"model.{n}" for n in trainable], "int8")
    assert graph.compacted(proto).SerializeToString() == proto.SerializeToString()
