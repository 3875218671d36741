"""Helpers shared by test files: run training, read losses, run the CLI without torch, the PyTorch reference.

Test files import from here (``from helpers import train``), never from each other or from conftest.
``toy.py`` builds the tiny models and data; ``conftest.py`` holds the session fixtures.
Heavy modules (torch, the exporter) are imported inside the functions that need them, so importing
this module costs nothing in the fast lane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def data_for(kind: str, data: dict[str, Path]) -> Path:
    """The toy data set a model kind trains on: labelled rows for classifiers, sentences for causal LMs."""
    return data["cls"] if kind in ("bert", "minilm") else data["lm"]


def losses(run) -> list[float]:
    """The per-step losses a run wrote to ``metrics.jsonl``."""
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(artifact, data_path, out, steps=30, **kw) -> list[float]:
    """Train ``artifact`` in-process for ``steps`` steps (batch 8) into ``out``; return its losses."""
    from edge_peft.device.trainer import TrainConfig, open_run

    config = TrainConfig(data=str(data_path), steps=steps, batch_size=8, lr=kw.pop("lr", 1e-2), eval_every=0,
                         checkpoint_every=kw.pop("checkpoint_every", steps), threads=kw.pop("threads", 2), **kw)
    open_run(artifact, config, out).run()
    return losses(out)


NO_TORCH = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, Block())\n"
    "from edge_peft.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch was imported'\n"
)


def cli(*args: str, **kw) -> subprocess.Popen:
    """Run ``edge-peft ARGS`` in a fresh interpreter where ``import torch`` fails."""
    return subprocess.Popen([sys.executable, "-c", NO_TORCH, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def budgeted_train(artifact, data_path, run: Path, budget_mb: int, steps: int, batch_size: int,
                   timeout: int) -> tuple[dict, dict]:
    """``edge-peft train --memory-budget`` in a fresh torch-free process (2 threads, no evaluation); asserts it
    succeeded and returns the run's ``summary.json`` and ``run.json``."""
    proc = cli("train", artifact, "--data", data_path, "--out", run, "--steps", str(steps), "--batch-size",
               str(batch_size), "--memory-budget", f"{budget_mb}MB", "--eval-every", "0", "--threads", "2", "--quiet")
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads((run / "summary.json").read_text()), json.loads((run / "run.json").read_text())


def reference_model(model_dir, artifact, base=None):
    """The torch model with the same LoRA-FA adapters and the artifact's initial trainable values; ``base`` (name ->
    array) replaces frozen parameters (a quantized artifact's dequantized weights)."""
    import numpy as np
    import torch

    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.backends.runtime import training_api
    from edge_peft.exporter.inject import inject_adapters
    from edge_peft.exporter.load import load_model_dir

    manifest = load_manifest(artifact)
    model = load_model_dir(model_dir, manifest.labels or None).model
    spec = manifest.adapter
    inject_adapters(model, [m.name for m in spec.modules], spec.kind, spec.rank, spec.alpha, spec.seed)
    state = training_api().CheckpointState.load_checkpoint(os.fspath(artifact / "checkpoint"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in (base or {}).items():
            params[name].copy_(torch.from_numpy(value))
    trainable = []
    for name, p in state.parameters:
        if p.requires_grad:
            with torch.no_grad():
                params[name].copy_(torch.from_numpy(np.array(p.data)))
            params[name].requires_grad_(True)
            trainable.append(params[name])
    return model, trainable, manifest


def reference_losses(model_dir, artifact, data_path, steps: int, out, base=None) -> list[float]:
    """The first ``steps`` losses of the PyTorch reference: the artifact's adapters and initial values, the device
    loop's own batches and learning rates (a run opened in ``out``), gradient clipping at 1.0 and HF AdamW;
    ``base`` as in ``reference_model``."""
    import torch

    from edge_peft.artifact.manifest import IGNORE_INDEX
    from edge_peft.device.trainer import TrainConfig, open_run

    config = TrainConfig(data=str(data_path), steps=steps, batch_size=8, lr=1e-2, eval_every=0,
                         checkpoint_every=steps, threads=1)
    batches = open_run(artifact, config, out)
    model, params, _ = reference_model(model_dir, artifact, base)
    adam: dict = {}
    losses = []
    for step in range(steps):
        batch, = batches.micro_batches(step)
        logits = model(input_ids=torch.from_numpy(batch.input_ids),
                       attention_mask=torch.from_numpy(batch.attention_mask)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(batch.labels.reshape(-1)), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        hf_adamw_step(params, adam, batches.lr(step), step + 1)
        losses.append(loss.item())
    return losses


def hf_adamw_step(params, state, lr, step, betas=(0.9, 0.999), eps=1e-8):
    """ORT's AdamWOptimizer in adam_mode=1 (Hugging Face AdamW): bias correction folded into the step size."""
    import torch

    b1, b2 = betas
    for p in params:
        m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        step_size = lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
        with torch.no_grad():
            p.add_(-step_size * m / (v.sqrt() + eps))
        p.grad = None


def forward_of(model, loss: str) -> tuple[list, dict, set[int]]:
    """A training graph's nodes (one list, so their ids stay valid), each output's producer, and the ids of the
    forward: every node ``loss`` depends on."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    forward, stack = set(), [producer[loss]]
    while stack:
        node = stack.pop()
        if id(node) not in forward:
            forward.add(id(node))
            stack.extend(producer[i] for i in node.input if i in producer)
    return nodes, producer, forward
