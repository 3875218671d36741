"""The training backends' names: the one vocabulary of manifests, the command line, profiles and the planner.

``ort``: ONNX Runtime's on-device training API (``onnxruntime-training-cpu==1.19.2``).
``portable``: one plain ONNX graph per training step, on any current ``onnxruntime``.
``auto`` (train) and ``both`` (export) are selections, not backends.
"""

from __future__ import annotations

ORT = "ort"
PORTABLE = "portable"
BACKENDS = (ORT, PORTABLE)
AUTO = "auto"
TRAIN_CHOICES = (AUTO, *BACKENDS)  # train --backend, profiles' ``backend`` key, plan --backend
EXPORT_CHOICES = {ORT: [ORT], PORTABLE: [PORTABLE], "both": [ORT, PORTABLE]}  # export --backend -> carried backends
