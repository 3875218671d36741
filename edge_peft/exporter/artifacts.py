"""ORT on-device training artifacts (training/eval/optimizer models + checkpoint) and the inference model."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from ..artifact.files import INFERENCE_MODEL, ORT_EVAL_MODEL, ORT_TRAINING_MODEL
from ..artifact.manifest import ADAMW_BETAS, IGNORE_INDEX
from ..artifact.names import LABELS, LOSS_SCALE
from ..errors import UserError
from . import graph, int4, recompute
from .loss_graph import target_loss_graph
from .onnx_files import WeightsFile


def _scaled_cross_entropy():
    """Mean cross-entropy (labels -100 ignored) times a ``loss_scale`` input.

    The device loop feeds ``loss_scale`` = this micro-batch's share of the optimizer step's targets,
    so gradients accumulated over micro-batches equal the gradient of one large batch exactly.
    """
    from onnxruntime.training import onnxblock

    class ScaledCrossEntropy(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self._ce = onnxblock.loss.CrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX)
            self._mul = onnxblock.blocks.Mul()

        def build(self, logits_name: str) -> str:
            loss = self._ce(logits_name, LABELS)
            self.base.graph.input.append(onnx.helper.make_tensor_value_info(LOSS_SCALE, onnx.TensorProto.FLOAT, []))
            return self._mul(loss, LOSS_SCALE)

    return ScaledCrossEntropy()


def _scaled_loss():
    """The graph's own loss output (``loss_graph.target_loss_graph``) times a ``loss_scale`` input."""
    from onnxruntime.training import onnxblock

    class ScaledLoss(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self._mul = onnxblock.blocks.Mul()

        def build(self, loss_name: str) -> str:
            self.base.graph.input.append(onnx.helper.make_tensor_value_info(LOSS_SCALE, onnx.TensorProto.FLOAT, []))
            return self._mul(loss_name, LOSS_SCALE)

    return ScaledLoss()


def write_training_artifacts(proto: onnx.ModelProto, trainable: list[str], frozen: list[str], out: Path,
                             weight_decay: float, max_grad_norm: float, flatten_width: int | None,
                             loss_chunks: int = 0, hidden_size: int = 0, checkpointing: bool = False,
                             attention_recompute: bool = True) -> tuple[int, int, int]:
    """Loss = scaled mean cross-entropy; optimizer = AdamW (HF mode) with gradient clipping by norm. Returns the
    training model's node count (what its session's load grows with; manifest ``memory.train_nodes``), the
    vocabulary slices its LM head is read in (manifest ``memory.head_slices``; 1: whole, or no chunked loss) and
    the attentions whose probabilities it recomputes in the backward (``attention_recompute``).

    A causal LM (``flatten_width`` = vocabulary) with ``loss_chunks`` > 0 gets the target-only, chunked LM
    head and loss of ``loss_graph``; with 0 the naive full-logits loss. An int4 base's products become ``Gemm``
    (``int4.products_as_gemm``). The training and eval models then dequantize quantized weights where they read
    them; the training model recomputes attention probabilities in the backward (``attention_recompute``) and, with
    ``checkpointing``, each block's activations (``recompute.py``).
    """
    import onnxruntime
    from onnxruntime.training import artifacts, onnxblock

    onnxruntime.set_default_logger_severity(3)
    training = copy.deepcopy(proto)
    head_slices = 1
    if flatten_width is not None and loss_chunks > 0:
        head_slices = target_loss_graph(training, hidden_size, loss_chunks)
        loss = _scaled_loss()
    else:
        if flatten_width is not None:
            graph.flatten_logits(training, flatten_width)
        loss = _scaled_cross_entropy()
    int4.products_as_gemm(training)
    optimizer = onnxblock.optim.AdamW(betas=ADAMW_BETAS, eps=1e-8, weight_decay=weight_decay,
                                      clip_grad=onnxblock.optim.ClipGradNorm(max_grad_norm) if max_grad_norm > 0 else None)
    with _native_stderr_captured():
        artifacts.generate_artifacts(training, requires_grad=trainable, frozen_params=frozen, loss=loss,
                                     optimizer=optimizer, artifact_directory=str(out))
    _recompute(out / ORT_EVAL_MODEL)
    nodes, attentions = _recompute(out / ORT_TRAINING_MODEL, training=True, checkpointing=checkpointing,
                                   attention=attention_recompute)
    return nodes, head_slices, attentions


def _recompute(path: Path, training: bool = False, checkpointing: bool = False, attention: bool = False
               ) -> tuple[int, int]:
    """Rewrite a generated model: quantized weights dequantized at each use; a ``training`` model's attention
    probabilities recomputed in the backward (``attention``), its blocks with ``checkpointing``, and its weight
    gradients accumulated in the backward's order. Returns its node count and the attentions recomputed."""
    model = onnx.load(str(path))
    nodes = len(model.graph.node)
    changed = recompute.dequantize_at_use(model)
    attentions = recompute.recompute_attention(model, model.graph.output[0].name) if attention else 0
    changed += attentions
    if checkpointing and not recompute.checkpoint_blocks(model, model.graph.output[0].name):
        raise UserError("--checkpointing found no transformer blocks (nodes scoped /layers.N/) in this model's "
                        "training graph: export without it")
    if training:
        changed += recompute.accumulate_in_backward_order(model)
    if changed or checkpointing:
        onnx.save(model, str(path))
        nodes = len(model.graph.node)
    return nodes, attentions


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """Hold back what native code writes to fd 2 (ORT's gradient builder logs every graph transformer at
    info level whatever the logger severity); replay it only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def write_inference_model(proto: onnx.ModelProto, trainable: list[str], out: Path, weights: WeightsFile) -> None:
    """The forward graph with the trainable tensors as inputs, so any adapter can be fed at run time; ``proto``
    is rewritten so, in place (no second copy of a large model's weights), and its weights go to ``weights``."""
    graph.initializers_to_inputs(proto, trainable)
    weights.save(proto, out / INFERENCE_MODEL)
