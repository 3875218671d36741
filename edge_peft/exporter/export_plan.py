"""``export --memory-budget`` / ``--device-profile``: choose rank, layers and quantization before exporting.

The memory model (``device/memory_model.py``) is applied to figures computed from the model's config
on the meta device (shapes only, no weights loaded), for a minimal useful run: micro-batch 1 at
``min(256, max_seq_len)`` tokens. Preference: int8 base (int4 when ``--quantize int4`` asks for it); all of the
recipe's layers, then fewer
(``top:N``; with ``--layers auto``: the most blocks, ``auto:N``, the probe then choosing which); for
each, the requested rank, then halves of it. The first choice that fits wins.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..artifact.adapter_section import AdapterModule
from ..backends import backend_class
from ..backends.names import EXPORT_CHOICES, ORT
from ..device.memory_model import FLOAT, MB, ModelFigures, predict_figures
from ..device.planner import MIN_USEFUL_SEQ_LEN
from ..errors import UserError
from ..variants import get_variant
from .adapter_layers import linear_shape
from .graph import INT8_MIN_ELEMENTS
from .inject import resolve_targets
from .layer_selection import AUTO, auto_count, parse_layers
from .load import LoadedModel, meta_model

PLAN_SEQ_LEN = 256


def model_figures(meta: LoadedModel, opts, rank: int, layers: str | None, quantize: str,
                  backend: str = ORT) -> ModelFigures:
    """Memory-model figures of the artifact ``opts`` (with this rank, layers, quantization) would produce,
    trained on ``backend``."""
    model, config = meta.model, meta.model.config
    num_layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    best = auto_count(layers)
    if best is not None:  # the probe picks which N blocks later; blocks have equal shapes, so plan for top:N
        layers = f"top:{best}"
    chosen = parse_layers(layers, num_layers) if layers else None
    _, names = resolve_targets(model, meta.recipe, opts.targets, chosen)
    shapes = [linear_shape(model.get_submodule(n)) for n in names]
    head = tuple(f"{h}." for h in meta.recipe.head)
    variant = get_variant(opts.variant)
    modules = [AdapterModule(n, inp, out, rank, 0) for n, (inp, out) in zip(names, shapes)]
    tensors = {name: shape for m in modules for name, shape in variant.tensor_shapes(m).items()}
    trained = {name for m in modules for name in variant.trained(m)}
    trainable = sum(int(np.prod(shape)) for name, shape in tensors.items() if name in trained)
    frozen = quantized = values = 0
    for name, p in model.named_parameters():
        if name.startswith(head):
            trainable += p.numel()
        elif quantize != "none" and p.dim() == 2 and p.numel() >= INT8_MIN_ELEMENTS:
            values += p.numel()
            # int8: a byte a value and an fp32 scale a channel; int4: half a byte, and per block (int4.py)
            # an fp32 scale and a uint8 zero point
            quantized += (p.numel() + FLOAT * p.shape[0] if quantize == "int8"
                          else p.numel() // 2 + (FLOAT + 1) * (p.numel() // opts.block_size))
        else:
            frozen += FLOAT * p.numel()
    causal = meta.task == "causal-lm"
    frozen += sum(FLOAT * int(np.prod(shape)) for name, shape in tensors.items() if name not in trained)  # frozen A
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    kind, loss_chunks = backend_class(backend), opts.loss_chunks if causal else 0
    return ModelFigures(frozen_bytes=frozen + quantized, quantized_bytes=quantized, trainable_values=trainable,
                        layers=num_layers, hidden=hidden,
                        intermediate=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                         or 4 * hidden),
                        heads=int(getattr(config, "num_attention_heads", None) or config.n_head),
                        vocab=int(config.vocab_size), causal=causal, backend=backend,
                        chunked_loss=kind.chunked_loss(loss_chunks), quantized_values=values,
                        checkpointed=opts.checkpointing, attention_recomputed=opts.attention_recompute,
                        head_slices=kind.head_slices(loss_chunks),
                        int4=quantize == "int4",
                        nodes=kind.estimated_nodes(num_layers, opts.checkpointing, quantize == "int4"))


def _needed(figures: ModelFigures, seq_len: int, margin: float) -> float:
    return predict_figures(figures, 1, seq_len).total * (1 + margin)


def plan_export(model_dir: str | Path, opts, budget: int, margin: float, profile: str | None = None):
    """``opts`` with the rank, layers and quantization that fit ``budget``, the plan recorded in ``opts.memory``.

    Raises UserError (before anything is exported) when no choice fits, naming the numbers and the cheapest fix.
    """
    meta = meta_model(model_dir, opts.labels)
    config = meta.model.config
    num_layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(PLAN_SEQ_LEN, opts.max_seq_len, int(positions or opts.max_seq_len))
    if opts.layers == AUTO:  # as many blocks as fit, the probe choosing which
        layer_choices = [f"auto:{n}" for n in range(num_layers, 0, -1)]
    elif opts.layers:
        layer_choices = [opts.layers]
    else:
        layer_choices = [None] + [f"top:{n}" for n in range(num_layers - 1, 0, -1)]
    ranks = [opts.rank]
    while ranks[-1] > 1:
        ranks.append(ranks[-1] // 2)
    smallest = None
    modes = _modes(opts, meta.task == "causal-lm")
    for layers in layer_choices:
        for rank in ranks:
            for quantize, checkpointing in modes:
                chosen = dataclasses.replace(opts, checkpointing=checkpointing)
                # the backend(s) the artifact will carry; with both, the costlier one must fit
                figures = max((model_figures(meta, chosen, rank, layers, quantize, b)
                               for b in EXPORT_CHOICES[opts.backend]), key=lambda f: _needed(f, seq_len, margin))
                needed = _needed(figures, seq_len, margin)
                if needed <= budget:
                    plan = {"quantize": quantize, "checkpointing": checkpointing, "rank": rank,
                            "layers": layers or "all", "micro_batch": 1, "seq_len": seq_len,
                            "predicted_peak_mb": round(needed / (1 + margin) / MB, 1)}
                    memory = {**opts.memory, "budget_mb": round(budget / MB, 1), "margin": margin,
                              "profile": profile, "export_plan": plan}
                    return dataclasses.replace(chosen, rank=rank, layers=layers, quantize=quantize, memory=memory)
                smallest = figures
    quantize, checkpointing = modes[-1]
    base = f"{quantize}, checkpointing" if checkpointing else quantize
    raise UserError(_refusal(smallest, budget, margin, seq_len, ranks[-1], layer_choices[-1], base))


def _modes(opts, causal: bool) -> list[tuple[str, bool]]:
    """(quantization, checkpointing) in the order a budget tries them at each rank and depth, cheapest in quality
    first: int8 (int4 when asked for), then a causal LM's blocks recomputed in the backward (slower, same
    result), then its base in int4."""
    quantize = "int4" if opts.quantize == "int4" else "int8"
    modes = [(quantize, opts.checkpointing)]
    if causal and not opts.checkpointing:
        modes.append((quantize, True))
    if causal and quantize == "int8":
        modes.append(("int4", True))
    return modes


def _refusal(figures: ModelFigures, budget: int, margin: float, seq_len: int, rank: int, layers: str | None,
             base: str) -> str:
    needed = _needed(figures, seq_len, margin)
    fix = f"a --memory-budget of at least {needed / MB:.0f}MB"
    shorter = [t for t in range(seq_len - 1, MIN_USEFUL_SEQ_LEN - 1, -1) if _needed(figures, t, margin) <= budget]
    if shorter:
        fix = f"--max-seq-len {shorter[0]}, or {fix}"
    return (f"--memory-budget {budget / MB:.0f} MB cannot be met at export: the smallest choice ({base}, "
            f"rank {rank}, layers {layers or 'all'}, micro-batch 1 x {seq_len} tokens) needs {needed / MB:.0f} MB "
            f"with the {margin:.0%} margin; try {fix}")
