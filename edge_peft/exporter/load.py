"""Load a local Hugging Face model directory (safetensors, or a single GGUF file in it) or a ``.gguf`` file for export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from optimum.exporters.tasks import TasksManager
from torch import nn

from ..errors import UserError
from .recipes import Recipe, recipe_for


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    recipe: Recipe
    task: str
    labels: list[str]


def _gguf_file(model_dir: Path) -> str | None:
    ggufs = sorted(p.name for p in model_dir.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def load_model_dir(model_dir: str | Path, labels: list[str] | None = None, init_seed: int = 0) -> LoadedModel:
    """Load model + tokenizer with eager attention; a one-line error for anything that is not a model.

    ``model_dir`` is a model directory or a ``.gguf`` file. ``init_seed`` seeds the initialisation of any new
    head, so an export is reproducible."""
    from transformers import AutoTokenizer

    model_dir, config, kwargs = _read_config(model_dir)
    recipe = recipe_for(config.model_type)
    auto_class = TasksManager.get_model_class_for_task(TasksManager.map_from_synonym(recipe.task), framework="pt")
    load_kwargs: dict = {"dtype": torch.float32, "attn_implementation": "eager", **kwargs}
    labels = _head_labels(model_dir, config, recipe, labels, load_kwargs)
    if labels and len(labels) != getattr(config, "num_labels", len(labels)):
        load_kwargs["ignore_mismatched_sizes"] = True  # a new head of another size replaces the saved one
    torch.manual_seed(init_seed)
    try:
        model = auto_class.from_pretrained(model_dir, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir} could not be loaded ({str(exc).splitlines()[0]}): check the weights and tokenizer files") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # GGUF weights are already expanded to fp32
    model.eval()
    return LoadedModel(model, tokenizer, recipe, recipe.task, list(labels or []))


def meta_model(model_dir: str | Path, labels: list[str] | None = None) -> LoadedModel:
    """The model's architecture on the meta device (shapes, no weights, no tokenizer): cheap, for planning."""
    _, config, _ = _read_config(model_dir)
    recipe = recipe_for(config.model_type)
    auto_class = TasksManager.get_model_class_for_task(TasksManager.map_from_synonym(recipe.task), framework="pt")
    config_kwargs: dict = {}
    labels = _head_labels(model_dir, config, recipe, labels, config_kwargs)
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto_class.from_config(config, attn_implementation="eager")
    return LoadedModel(model, None, recipe, recipe.task, list(labels or []))


def _read_config(model_dir: str | Path) -> tuple[Path, object, dict]:
    """(directory, config, extra from_pretrained kwargs) of a model directory or ``.gguf`` file; one-line errors
    for anything else."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.suffix == ".gguf":
        model_dir, gguf = model_dir.parent, model_dir.name
    elif not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a directory nor a .gguf file: pass a local Hugging Face model directory")
    else:
        gguf = None if (model_dir / "config.json").is_file() else _gguf_file(model_dir)
    if not (model_dir / "config.json").is_file() and gguf is None:
        raise UserError(f"{model_dir} has no config.json (nor a single .gguf file): it is not a Hugging Face model "
                        "directory; save one with save_pretrained()")
    kwargs = {"gguf_file": gguf} if gguf else {}
    if gguf:
        _prepare_gguf_reader()
    try:
        config = AutoConfig.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir / (gguf or 'config.json')} could not be read ({exc}): fix or re-save the model") from None
    return model_dir, config, kwargs


def _prepare_gguf_reader() -> None:
    """Quiet and cache transformers' GGUF reader (idempotent).

    Its tqdm bar per tensor is silenced (the export's stage line already says it loads). Its metadata-only
    reads are cached per file: loading one model parses the file's header (the whole vocabulary, in Python)
    for the config twice and for the tokenizer once more, 8 s each for SmolLM2-135M. gguf-py's tensor name
    map, which transformers builds again for every module of the model, is built once per architecture."""
    from functools import lru_cache, partial

    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if hasattr(gguf_utils, "tqdm") and not isinstance(gguf_utils.tqdm, partial):
        gguf_utils.tqdm = partial(gguf_utils.tqdm, disable=True)
    if not hasattr(gguf_utils.load_gguf_checkpoint, "metadata_cache"):
        gguf_utils.load_gguf_checkpoint = _cached_metadata(gguf_utils.load_gguf_checkpoint)
    if not hasattr(gguf.get_tensor_name_map, "cache_info"):
        gguf.get_tensor_name_map = lru_cache(maxsize=4)(gguf.get_tensor_name_map)


def _cached_metadata(read):
    """``read`` (transformers' ``load_gguf_checkpoint``) with its ``return_tensors=False`` answers cached per
    (path, size, mtime); each caller gets its own deep copy."""
    import copy
    import os
    from functools import lru_cache

    @lru_cache(maxsize=2)
    def metadata(path: str, size: int, mtime: int) -> dict:
        return read(path, return_tensors=False)

    def cached(gguf_checkpoint_path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return read(gguf_checkpoint_path, return_tensors, *args, **kwargs)
        stat = os.stat(gguf_checkpoint_path)
        return copy.deepcopy(metadata(os.fspath(gguf_checkpoint_path), stat.st_size, stat.st_mtime_ns))

    cached.metadata_cache = metadata
    return cached


def _head_labels(model_dir, config, recipe: Recipe, labels: list[str] | None, kwargs: dict) -> list[str] | None:
    """A classifier's labels (given or already in the config); adds the head's size and names to ``kwargs``."""
    if recipe.task != "sequence-classification":
        return labels
    labels = labels or _config_labels(config)
    if not labels:
        raise UserError(f"{model_dir} has no classification labels: pass --labels a,b,c for the new head")
    kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={lab: i for i, lab in enumerate(labels)})
    return labels


def _config_labels(config) -> list[str]:
    """Labels of an already fine-tuned classifier (not the generic LABEL_0.. placeholders)."""
    id2label = getattr(config, "id2label", None) or {}
    labels = [str(id2label[i]) for i in sorted(id2label)]
    if not labels or all(lab.startswith("LABEL_") for lab in labels):
        return []
    return labels


def fingerprint(model: nn.Module, exclude_prefixes: tuple[str, ...] = ()) -> str:
    """sha256 over the frozen base weights: sorted (name, dtype, shape, bytes) of the state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(exclude_prefixes):
            continue
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
