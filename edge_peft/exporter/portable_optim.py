"""The update half of the portable training-step graph: gradient accumulation, then AdamW as ORT's
training API runs it, in standard ONNX ops.

Same arithmetic as ORT's ``AdamWOptimizer`` in Hugging Face mode (``adam_mode=1``, bias correction
folded into the learning rate, decoupled weight decay applied after the update) preceded by
``ClipGradNorm`` (global L2 norm over all gradients, coefficient ``max_norm / (norm + 1e-6)`` capped at 1).
``step`` is the 1-based number of the update being made.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact.manifest import ADAMW_BETAS
from ..artifact.names import LR, STEP, accumulated, grad_name, moment_names, updated

EPS = 1e-8
CLIP_EPS = 1e-6
PREFIX = "adamw/"  # intermediate values, apart from the gradient half's names


def append_update(graph: onnx.GraphProto, shapes: dict[str, list[int]], weight_decay: float,
                  max_grad_norm: float) -> None:
    """Extend ``graph`` (whose values ``<name>.grad`` are this micro-batch's gradients) with the update.

    New inputs: lr, step, and per trainable tensor its accumulated gradient and two moments. New outputs:
    per tensor the accumulated gradient including this micro-batch, and the AdamW'd value and moments.
    The trainable tensors themselves are already inputs of ``graph``; its gradient outputs become internal.
    """
    kept = [o for o in graph.output if o.name not in {grad_name(name) for name in shapes}]
    del graph.output[:]
    graph.output.extend(kept)
    nodes: list[onnx.NodeProto] = []
    consts = {"b1": ADAMW_BETAS[0], "b2": ADAMW_BETAS[1], "1-b1": 1 - ADAMW_BETAS[0], "1-b2": 1 - ADAMW_BETAS[1], "one": 1.0, "eps": EPS,
              "clip_eps": CLIP_EPS, "max_norm": max_grad_norm, "wd": weight_decay}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), f"{PREFIX}{k}") for k, v in consts.items())
    c = {k: f"{PREFIX}{k}" for k in consts}
    graph.input.extend([helper.make_tensor_value_info(LR, TensorProto.FLOAT, []),
                        helper.make_tensor_value_info(STEP, TensorProto.INT64, [])])

    def op(kind: str, ins: list[str], out: str, **attrs) -> str:
        out = out if out.endswith(".new") else PREFIX + out
        nodes.append(helper.make_node(kind, ins, [out], **attrs))
        return out

    t = op("Cast", [STEP], "t", to=TensorProto.FLOAT)
    bc1 = op("Sub", [c["one"], op("Pow", [c["b1"], t], "b1^t")], "bc1")
    bc2 = op("Sub", [c["one"], op("Pow", [c["b2"], t], "b2^t")], "bc2")
    lr_c = op("Div", [op("Mul", [LR, op("Sqrt", [bc2], "sqrt_bc2")], "lr*sqrt_bc2"), bc1], "lr_corrected")
    lr_wd = op("Mul", [LR, c["wd"]], "lr*wd")
    grads = {}
    for name, shape in shapes.items():
        graph.input.append(helper.make_tensor_value_info(accumulated(name), TensorProto.FLOAT, shape))
        grads[name] = op("Add", [accumulated(name), grad_name(name)], updated(accumulated(name)))
        graph.output.append(helper.make_tensor_value_info(grads[name], TensorProto.FLOAT, shape))
    if max_grad_norm > 0:
        squares = [op("ReduceSumSquare", [g], f"{name}.sq", keepdims=0) for name, g in grads.items()]
        total = op("Sum", squares, "grad_sq_total") if len(squares) > 1 else squares[0]
        norm = op("Sqrt", [total], "grad_norm")
        coef = op("Min", [op("Div", [c["max_norm"], op("Add", [norm, c["clip_eps"]], "norm+eps")], "clip_raw"),
                          c["one"]], "clip_coef")
        grads = {name: op("Mul", [g, coef], f"{name}.clipped") for name, g in grads.items()}
    for name, shape in shapes.items():
        m, v = moment_names(name)
        graph.input.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, shape) for x in (m, v))
        g = grads[name]
        m_new = op("Add", [op("Mul", [c["b1"], m], f"{m}.decayed"), op("Mul", [c["1-b1"], g], f"{m}.in")], updated(m))
        g2 = op("Mul", [g, g], f"{name}.g2")
        v_new = op("Add", [op("Mul", [c["b2"], v], f"{v}.decayed"), op("Mul", [c["1-b2"], g2], f"{v}.in")], updated(v))
        denom = op("Add", [op("Sqrt", [v_new], f"{v}.sqrt"), c["eps"]], f"{name}.denom")
        delta = op("Div", [op("Mul", [lr_c, m_new], f"{name}.lr_m"), denom], f"{name}.delta")
        moved = op("Sub", [name, delta], f"{name}.moved")
        op("Sub", [moved, op("Mul", [lr_wd, moved], f"{name}.decay")], updated(name))
        graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)
                            for x in (updated(name), updated(m), updated(v)))
    graph.node.extend(nodes)
