"""Import ONNX Runtime, and its on-device training API, without torch.

- ``import onnxruntime.training`` pulls torch in through its ``optim`` module; the ``api`` subpackage
  itself needs only the native extension. We register a bare ``onnxruntime.training`` package object
  so that importing ``onnxruntime.training.api`` skips that ``__init__``.
- ``import onnxruntime`` itself imports torch whenever torch is merely installed (its ``tools``
  package loads PyTorch export helpers): a few hundred MB of resident memory for nothing the device
  uses. ``onnxruntime_module()`` hides torch during that one import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ..errors import UserError


def onnxruntime_module() -> types.ModuleType:
    """``onnxruntime``, imported without letting it import torch (unless torch is loaded already)."""
    if "onnxruntime" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # find_spec("torch") now answers None
        try:
            importlib.import_module("onnxruntime")
        finally:
            if sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    return importlib.import_module("onnxruntime")


def training_api_installed() -> bool:
    """Whether ONNX Runtime's training API can be imported here (without importing it)."""
    onnxruntime_module()
    try:
        spec = importlib.util.find_spec("onnxruntime.training")
    except ImportError:
        return False
    return spec is not None and bool(spec.submodule_search_locations)


def training_api() -> types.ModuleType:
    """The ``onnxruntime.training.api`` module (CheckpointState, Module, Optimizer)."""
    onnxruntime_module()
    if "onnxruntime.training" not in sys.modules:
        try:
            spec = importlib.util.find_spec("onnxruntime.training")
        except ImportError:
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise UserError("ONNX Runtime's training API is not installed: pip install 'edge-peft[device]' "
                            "(onnxruntime-training-cpu==1.19.2, Python <= 3.12, x86-64/macOS/Windows)")
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["onnxruntime.training"] = package
    return importlib.import_module("onnxruntime.training.api")


def quiet_logs() -> None:
    """Only warnings and errors from ONNX Runtime's native logger."""
    onnxruntime_module().set_default_logger_severity(3)


def session_options(threads: int = 0):
    """ORT session options shared by training and inference sessions.

    QDQ transformers are disabled: they would move our weight-only ``DequantizeLinear`` across
    transposes by inserting uint8 ``QuantizeLinear`` nodes, which ORT 1.19 then rejects for int8.
    """
    options = onnxruntime_module().SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options
