"""The block-wise portable step graph (``exporter/portable_blocks.py``): each distinct block traced once and
repeated, checkpointing and the chunked target-only loss written into the stitched graph. Its loss and every
adapter gradient equal PyTorch autograd's on the same model and batch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from families import make_family_model

from edge_peft.artifact.names import grad_name
from edge_peft.exporter import portable
from edge_peft.exporter.inject import inject_adapters, resolve_targets
from edge_peft.exporter.layer_selection import parse_layers
from edge_peft.exporter.load import load_model_dir
from edge_peft.exporter.portable_blocks import BlockwiseExport
from edge_peft.exporter.portable_trace import mean_cross_entropy
from edge_peft.variants import get_variant

pytestmark = pytest.mark.slow  # traces models


def _adapted(family: str, tmp_path, layers: str | None):
    loaded = load_model_dir(make_family_model(family, tmp_path / family), None, init_seed=0)
    model = loaded.model
    chosen = parse_layers(layers, model.config.num_hidden_layers) if layers else None
    _, names = resolve_targets(model, loaded.recipe, ["all-linear"], chosen)
    inject_adapters(model, names, get_variant("lora-fa"), 4, 8.0, 0)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, so every gradient path carries signal
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval(), [n for n, p in model.named_parameters() if p.requires_grad]


def _batch(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    labels = rng.integers(5, vocab, (2, 11)).astype(np.int64)
    mask[1, 8:], labels[1, 8:], labels[:, :3] = 0, -100, -100  # padding and prompt tokens are not targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_scale": np.array(0.5, np.float32)}


@pytest.mark.parametrize("family,checkpointing,chunks,layers", [
    ("gemma2", True, 4, None),   # two kinds of block (sliding, global), soft-capped chunked loss, recomputed blocks
    ("llama", False, 0, "top:1"),  # the naive traced loss; the unadapted block below runs forward only
])
def test_stitched_step_equals_pytorch_autograd(family, checkpointing, chunks, layers, tmp_path):
    model, trainable = _adapted(family, tmp_path, layers)
    export = BlockwiseExport(model, True, trainable, 64, chunks)
    assert len(export.groups) == 2  # Gemma 2: sliding and global blocks; Llama: the adapted block and the other
    proto = export.export(portable.batch_inputs(True), checkpointing)
    params = dict(model.named_parameters())
    portable._inputs_to_initializers(proto, {n: p.detach().numpy() for n, p in params.items() if n not in trainable})
    feed = _batch(model.config.vocab_size)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed.update({n: params[n].detach().numpy() for n in trainable if n in wanted})
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: v for k, v in feed.items() if k in wanted})))

    out = model(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"]),
                use_cache=False)
    loss = mean_cross_entropy(out.logits, torch.from_numpy(feed["labels"]))
    (loss * 0.5).backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name in trainable:
        np.testing.assert_allclose(got[grad_name(name)], params[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert any(np.abs(params[n].grad.numpy()).max() > 0 for n in trainable)
