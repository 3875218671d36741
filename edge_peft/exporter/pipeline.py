"""``edge-peft export``: the whole workstation pipeline, written atomically into one artifact directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime

from ..adapters.inject import find_targets, inject_lora
from ..errors import UserError
from ..fileio import atomic_directory
from ..manifest import TRAINING_INPUTS, ExtraTensor, Manifest
from ..progress import Stages
from . import graph
from .artifacts import write_inference_model, write_training_artifacts
from .layer_selection import parse_layers
from .load import fingerprint, load_model_dir
from .loss_graph import LOSS_CHUNKS
from .portable import write_portable_artifacts
from .to_onnx import OPSET, export_logits_model

WRAPPER_PREFIX = "model."
EXPORT_BACKENDS = {"ort": ["ort-training"], "portable": ["portable"], "both": ["ort-training", "portable"]}


@dataclass
class ExportOptions:
    rank: int = 8
    alpha: float = 16.0
    quantize: str = "int8"
    variant: str = "lora-fa"
    targets: list[str] | None = None
    layers: str | None = None  # see layer_selection: 0,2,4-6 | top:N | bottom:N
    seed: int = 0
    max_seq_len: int = 256
    labels: list[str] | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    memory: dict = field(default_factory=dict)
    backend: str = "ort"  # ort | portable | both: which training graphs the artifact carries
    loss_chunks: int = LOSS_CHUNKS  # causal LMs: target-only LM head and loss in this many chunks (0: naive full logits)


def export_artifact(model_dir: str | Path, out: str | Path, opts: ExportOptions, quiet: bool = False,
                    overwrite: bool = False) -> Manifest:
    """HF model dir -> artifact dir (manifest, ORT training artifacts, inference model, tokenizer)."""
    if opts.rank <= 0:
        raise UserError(f"--rank {opts.rank} must be a positive integer (typical: 4, 8, 16)")
    if opts.quantize not in ("none", "int8"):
        raise UserError(f"--quantize {opts.quantize} is not supported: use none or int8")
    if opts.backend not in EXPORT_BACKENDS:
        raise UserError(f"--backend {opts.backend} is not supported: use {', '.join(EXPORT_BACKENDS)}")
    backends = EXPORT_BACKENDS[opts.backend]
    stages = Stages(5 + len(backends), quiet)
    with stages.stage(f"loading {model_dir}"):
        loaded = load_model_dir(model_dir, opts.labels, init_seed=opts.seed)
        model, recipe = loaded.model, loaded.recipe
        head_prefixes = tuple(f"{h}." for h in recipe.head)
        base_fp = fingerprint(model, exclude_prefixes=head_prefixes)
    with stages.stage("injecting LoRA-FA adapters" if opts.variant == "lora-fa" else "injecting LoRA adapters"):
        targets = list(opts.targets or recipe.targets)
        layers = parse_layers(opts.layers, _num_layers(model.config)) if opts.layers else None
        names = find_targets(model, targets, layers)
        modules = inject_lora(model, names, opts.rank, opts.alpha, opts.seed, train_a=opts.variant == "lora")
        trainable_params = {n: p for n, p in model.named_parameters() if ".lora_B." in n
                            or (opts.variant == "lora" and ".lora_A." in n) or n.startswith(head_prefixes)}
        for p in trainable_params.values():
            p.requires_grad_(True)
        heads = [ExtraTensor(n, list(p.shape)) for n, p in trainable_params.items() if n.startswith(head_prefixes)]
    config = model.config
    causal = loaded.task == "causal-lm"
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with stages.stage("exporting to ONNX"):
            proto = export_logits_model(model, causal, trainable_params, tmp / "forward.onnx")
            (tmp / "forward.onnx").unlink()
            graph.strip_prefix(proto, WRAPPER_PREFIX)
            graph.expose_layernorm_stats(proto)
            trainable = list(trainable_params)
            missing = set(trainable) - {i.name for i in proto.graph.initializer}
            if missing:
                raise RuntimeError(f"trainable tensors lost in export: {sorted(missing)[:3]}")
        with stages.stage("quantizing base weights to int8" if opts.quantize == "int8" else "preparing base weights"):
            frozen = set(graph.weight_names(proto)) - set(trainable)
            frozen_base = {n for n in frozen if not n.endswith(".lora_A.weight")}
            folded = graph.fold_transposes(proto, frozen_base)
            frozen_base = (frozen_base - set(folded)) | set(folded.values())
            if opts.quantize == "int8":
                graph.quantize_int8(proto, frozen_base)
            frozen_list = [n for n in graph.weight_names(proto) if n not in set(trainable)]
        if "ort-training" in backends:
            with stages.stage("generating ORT training artifacts"):
                write_training_artifacts(proto, trainable, frozen_list, tmp, opts.weight_decay, opts.max_grad_norm,
                                         flatten_width=config.vocab_size if causal else None,
                                         loss_chunks=opts.loss_chunks, hidden_size=_hidden_size(config))
        if "portable" in backends:
            with stages.stage("exporting the portable training graphs"):
                write_portable_artifacts(model, causal, trainable, opts.quantize == "int8", opts.max_seq_len,
                                         opts.weight_decay, opts.max_grad_norm, tmp)
        with stages.stage("writing inference model, tokenizer and manifest"):
            write_inference_model(proto, trainable, tmp)
            loaded.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
            manifest = _manifest(loaded, config, opts, targets, modules, heads, base_fp, graph.nbytes(proto, frozen_list))
            manifest.backends = list(backends)
            manifest.save(tmp)
    return manifest


def _num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def _hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def _manifest(loaded, config, opts: ExportOptions, targets, modules, heads, base_fp, frozen_bytes: int) -> Manifest:
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or opts.max_seq_len
    return Manifest(
        base_fingerprint=base_fp,
        model_type=config.model_type,
        architecture=type(loaded.model).__name__,
        task=loaded.task,
        variant=opts.variant,
        rank=opts.rank,
        alpha=float(opts.alpha),
        seed=opts.seed,
        target_modules=targets,
        modules=modules,
        quantization=opts.quantize,
        max_seq_len=min(opts.max_seq_len, int(limit)),
        vocab_size=int(config.vocab_size),
        hidden_size=_hidden_size(config),
        num_layers=_num_layers(config),
        num_heads=int(getattr(config, "num_attention_heads", None) or config.n_head),
        input_names=TRAINING_INPUTS,
        opset=OPSET,
        ort_version=onnxruntime.__version__,
        labels=loaded.labels,
        modules_to_save=heads,
        pad_token_id=int(pad),
        eos_token_id=tok.eos_token_id,
        memory={"frozen_weight_bytes": frozen_bytes, "intermediate_size": int(
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size),
            "loss_chunks": opts.loss_chunks if loaded.task == "causal-lm" else 0,
            **opts.memory},
    )
