"""``edge-peft export``: the whole workstation pipeline, written atomically into one artifact directory."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime

from ..artifact.adapter_section import AdapterSpec, ExtraTensor
from ..artifact.files import TOKENIZER
from ..artifact.manifest import QUANTIZATIONS, Manifest
from ..artifact.memory_section import MemoryFigures
from ..artifact.names import BATCH_INPUTS
from ..backends.compute import FP32, INT8, parse_export_computes
from ..backends.names import EXPORT_CHOICES, ORT, PORTABLE
from ..device.chat_template import ChatTemplate
from ..device.memory import available_memory, current_rss
from ..errors import UserError
from ..fileio import atomic_directory
from ..progress import Stages
from ..variants import DEFAULT as DEFAULT_VARIANT
from ..variants import get_variant
from . import graph, int4
from .artifacts import write_inference_model, write_training_artifacts
from .inject import inject_adapters, resolve_targets
from .kv_cache import export_generation_model
from .layer_selection import parse_layers
from .load import fingerprint, load_model_dir
from .loss_graph import LOSS_CHUNKS
from .onnx_files import WeightsFile
from .portable import write_portable_artifacts
from .to_onnx import OPSET, export_logits_model

WRAPPER_PREFIX = "model."


@dataclass
class ExportOptions:
    rank: int = 8
    alpha: float = 16.0
    quantize: str = "int8"
    variant: str = DEFAULT_VARIANT
    targets: list[str] | None = None
    layers: str | None = None  # see layer_selection: 0,2,4-6 | top:N | bottom:N
    seed: int = 0
    max_seq_len: int = 256
    labels: list[str] | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    memory: dict = field(default_factory=dict)  # what an export plan adds to the memory section
    backend: str = ORT  # a key of backends.names.EXPORT_CHOICES: which training graphs the artifact carries
    loss_chunks: int = LOSS_CHUNKS  # causal LMs: target-only LM head and loss in this many chunks (0: naive full logits)
    compute: str = FP32  # export --compute: fp32, int8 or fp32,int8 (backends/compute.py)
    checkpointing: bool = False  # recompute each block's activations in the backward (recompute.py, portable_blocks.py)
    attention_recompute: bool = True  # recompute attention probabilities in the backward (recompute.py)
    block_size: int = int4.DEFAULT_BLOCK_SIZE  # int4: values per block along the reduced axis (int4.py)


def export_artifact(model_dir: str | Path, out: str | Path, opts: ExportOptions, quiet: bool = False,
                    overwrite: bool = False) -> Manifest:
    """HF model dir -> artifact dir (manifest, ORT training artifacts, inference model, tokenizer)."""
    if opts.rank <= 0:
        raise UserError(f"--rank {opts.rank} must be a positive integer (typical: 4, 8, 16)")
    if opts.quantize not in QUANTIZATIONS:
        raise UserError(f"--quantize {opts.quantize} is not supported: use {' or '.join(QUANTIZATIONS)}")
    if opts.backend not in EXPORT_CHOICES:
        raise UserError(f"--backend {opts.backend} is not supported: use {', '.join(EXPORT_CHOICES)}")
    if opts.quantize == "int4":
        int4.check_block_size(opts.block_size)
    variant = get_variant(opts.variant)
    backends = EXPORT_CHOICES[opts.backend]
    computes = parse_export_computes(opts.compute, opts.quantize, backends)
    stages = Stages(5 + len(backends), quiet)
    with stages.stage(f"loading {model_dir}"):
        loaded = load_model_dir(model_dir, opts.labels, init_seed=opts.seed)
        model, recipe = loaded.model, loaded.recipe
        head_prefixes = tuple(f"{h}." for h in recipe.head)
        base_fp = fingerprint(model, exclude_prefixes=head_prefixes)
    available = available_memory()
    note = available is not None and memory_shortfall(sum(p.numel() for p in model.parameters()), current_rss(),
                                                      available)
    if note:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    with stages.stage(f"injecting {variant.title} adapters"):
        layers = parse_layers(opts.layers, _num_layers(model.config)) if opts.layers else None
        targets, names = resolve_targets(model, recipe, opts.targets, layers)
        modules = inject_adapters(model, names, variant, opts.rank, opts.alpha, opts.seed)
        for n, p in model.named_parameters():
            if n.startswith(head_prefixes):
                p.requires_grad_(True)
        trainable_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        heads = [ExtraTensor(n, list(p.shape)) for n, p in trainable_params.items() if n.startswith(head_prefixes)]
    config = model.config
    causal = loaded.task == "causal-lm"
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with stages.stage("exporting to ONNX"):
            proto = export_logits_model(model, causal, trainable_params)
            graph.strip_prefix(proto, WRAPPER_PREFIX)
            graph.expose_layernorm_stats(proto)
            trainable = list(trainable_params)
            missing = set(trainable) - {i.name for i in proto.graph.initializer}
            if missing:
                raise RuntimeError(f"trainable tensors lost in export: {sorted(missing)[:3]}")
        block = opts.block_size if opts.quantize == "int4" else 0
        with stages.stage(f"quantizing base weights to {opts.quantize}" if opts.quantize != "none"
                          else "preparing base weights"):
            frozen_list = graph.prepare_frozen(proto, trainable, opts.quantize, block)
            proto = graph.compacted(proto)  # frees the fp32 weights the quantization replaced
        train_nodes = head_slices = 0
        recomputed = []  # per training graph written: whether its attention probabilities are recomputed
        if ORT in backends:
            with stages.stage("generating ORT training artifacts"):
                train_nodes, head_slices, attentions = write_training_artifacts(
                    proto, trainable, frozen_list, tmp, opts.weight_decay, opts.max_grad_norm,
                    flatten_width=config.vocab_size if causal else None, loss_chunks=opts.loss_chunks,
                    hidden_size=_hidden_size(config), checkpointing=opts.checkpointing,
                    attention_recompute=opts.attention_recompute)
                recomputed.append(attentions > 0)
        step_nodes = step_frozen_bytes = 0
        with WeightsFile(tmp) as weights:  # the graphs' frozen tensors, each once
            if PORTABLE in backends:
                with stages.stage("exporting the portable training graphs"):
                    step_nodes, step_frozen_bytes, attentions = write_portable_artifacts(
                        model, causal, trainable, opts.quantize, block, opts.max_seq_len, tmp, weights,
                        int8_compute=INT8 in computes, checkpointing=opts.checkpointing,
                        loss_chunks=opts.loss_chunks if causal else 0, attention_recompute=opts.attention_recompute)
                    recomputed.append(attentions > 0 or opts.checkpointing)
            with stages.stage("writing inference model, tokenizer and manifest"):
                stored = {"frozen_bytes": graph.nbytes(proto, frozen_list),
                          "quantized_bytes": graph.quantized_nbytes(proto),
                          "quantized_values": graph.quantized_values(proto)}
                write_inference_model(proto, trainable, tmp, weights)
                del proto  # before the generation graph's trace: a large model's weights once at a time
                if causal:
                    export_generation_model(model, trainable_params, opts.quantize, block, _context_length(config),
                                            tmp, weights)
                loaded.tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER))
                ChatTemplate(loaded.tokenizer.chat_template, loaded.tokenizer.special_tokens_map).save(tmp)
                spec = AdapterSpec(base_fingerprint=base_fp, model_type=config.model_type,
                                   architecture=type(loaded.model).__name__, task=loaded.task, variant=variant.name,
                                   rank=opts.rank, alpha=float(opts.alpha), seed=opts.seed, target_modules=targets,
                                   modules=modules, modules_to_save=heads, base_model=str(Path(model_dir).resolve()))
                memory = MemoryFigures(
                    **stored, trainable_values=spec.trainable_values(), intermediate_size=_intermediate_size(config),
                    loss_chunks=opts.loss_chunks if causal else 0, checkpointing=opts.checkpointing,
                    step_nodes=step_nodes, step_frozen_bytes=step_frozen_bytes, train_nodes=train_nodes,
                    head_slices=head_slices, attention_recompute=all(recomputed), **opts.memory)
                manifest = _manifest(loaded, config, opts, spec, memory, backends)
                manifest.computes = computes
                weights.close()  # complete before its checksum is recorded
                manifest.record_files(tmp)
                manifest.save(tmp)
    return manifest


# An export's peak RSS: about 1.5 GB (torch, transformers, onnx) plus 2.7x the fp32 model (the model, its fp32
# initializers until they are quantized, the quantized graphs), above what was measured with both backends on
# 0.5 B and 1 B Llamas (5.7 and 11.2-12.9 GB).
EXPORT_BASE_BYTES, EXPORT_BYTES_PER_FP32_BYTE = 1.5e9, 2.7


def memory_shortfall(parameters: int, resident: int, available: int) -> str | None:
    """A one-line note when exporting a model of ``parameters`` is likely to need more memory than this process
    holds (``resident``) plus what the machine has ``available``; None when it fits."""
    need = EXPORT_BASE_BYTES + EXPORT_BYTES_PER_FP32_BYTE * 4 * parameters
    if need <= resident + available:
        return None
    return (f"exporting this model ({parameters / 1e9:.2f} B parameters) takes about {need / 1e9:.1f} GB of memory "
            f"and {(resident + available) / 1e9:.1f} GB is free for it: close other programs or export on a machine "
            "with more memory (the system kills an export that runs out)")


def _num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def _hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def _intermediate_size(config) -> int:
    return int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * _hidden_size(config))


def _context_length(config) -> int:
    """The longest sequence the model's positions cover (what generation may reach)."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


def _manifest(loaded, config, opts: ExportOptions, spec: AdapterSpec, memory: MemoryFigures,
              backends: list[str]) -> Manifest:
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or opts.max_seq_len
    return Manifest(
        adapter=spec,
        quantization=opts.quantize,
        max_seq_len=min(opts.max_seq_len, int(limit)),
        vocab_size=int(config.vocab_size),
        hidden_size=_hidden_size(config),
        num_layers=_num_layers(config),
        num_heads=int(getattr(config, "num_attention_heads", None) or config.n_head),
        input_names=list(BATCH_INPUTS),
        opset=OPSET,
        ort_version=onnxruntime.__version__,
        memory=memory,
        backends=list(backends),
        labels=loaded.labels,
        pad_token_id=int(pad),
        eos_token_id=tok.eos_token_id,
        block_size=opts.block_size if opts.quantize == "int4" else None,
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
    )
