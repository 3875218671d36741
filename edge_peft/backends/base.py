"""The interface every training backend implements, and its fitted memory factors.

The device loop, the step hooks, the planner, inference and ``adapter load`` talk only to this
interface; nothing outside ``backends/`` compares backend names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..artifact.manifest import Manifest
    from ..artifact.memory_section import MemoryFigures
    from ..device.data import Batch


@dataclass(frozen=True)
class MemoryFactors:
    """One backend's fitted memory-model constants (``benchmarks/calibrate_memory.py --fit``; 2 threads)."""

    runtime: int  # RSS after importing edge_peft, numpy, tokenizers and onnxruntime
    session: int  # load intercept: session, graphs, kernels
    weight_load: float  # load slope per byte of frozen weights and trainable values
    step: int  # step intercept
    dequant: float  # per fp32 byte of one block's worth of the quantized base, dequantized
    token: float  # per byte of the 9h + 2i token activations
    score: float  # per byte of heads x T^2 attention scores
    logit: float  # per byte of B x T x V logits
    chunked_logit: float  # the same with the target-only LM head and loss in 8 chunks
    fp32_floor: float = 0.8  # a step of an fp32 base never costs less than this x its weights
    dequantized_head: float = 0.0  # per fp32 byte of a quantized causal LM head (vocab x hidden; a slice if chunked)
    block_input: float = 0.0  # per byte of the blocks' inputs kept between the passes of a checkpointed step
    int4_block: float = 0.0  # bytes an int4 base adds to a step per block beyond the dequantized terms (measured)
    node_load: float = 0.0  # load bytes per node of the training graph the backend loads (memory_model.load_terms)


class TrainingBackend(Protocol):
    """What the device loop needs from a backend. One optimizer step is ``start_step(lr)``, then
    ``forward_backward`` per micro-batch, then ``optimizer_step()``.

    Class-level members describe the backend without opening a session: its name, memory factors,
    whether it trains with the chunked LM loss, whether its runtime is installed, how its saved state
    and an artifact's initial trainable tensors are read and written."""

    name: ClassVar[str]
    memory_factors: ClassVar[MemoryFactors]
    names: list[str]  # ONNX names of the trainable tensors, in the backend's order

    @classmethod
    def installed(cls) -> bool:
        """Whether this backend's runtime can be imported here."""

    @classmethod
    def chunked_loss(cls, loss_chunks: int) -> bool:
        """Whether this backend trains with the target-only chunked LM loss an artifact exported with
        ``loss_chunks`` (manifest ``memory.loss_chunks``) carries."""

    @classmethod
    def head_slices(cls, loss_chunks: int, memory: MemoryFigures | None = None) -> int:
        """In how many row slices this backend's chunked LM loss reads a quantized head (1: whole, each chunk): as
        an export with ``loss_chunks`` writes it, or as the artifact whose ``memory`` section is given has it."""

    @classmethod
    def graph_nodes(cls, memory: MemoryFigures) -> int:
        """The nodes of the training graph(s) this backend loads, as the export recorded them (0: unknown)."""

    @classmethod
    def estimated_nodes(cls, layers: int, checkpointing: bool, int4: bool) -> int:
        """The nodes this backend would load for a Llama-shaped model, before its graphs exist (export-time
        planning, older manifests)."""

    @classmethod
    def frozen_bytes(cls, memory: MemoryFigures) -> int:
        """The bytes of frozen tensors this backend's training graph reads (what the memory model's weights term
        counts), from an artifact's memory section."""

    @classmethod
    def owns_state(cls, path: Path) -> bool:
        """Whether the saved training state at ``path`` was written by this backend."""

    @classmethod
    def initial_trainable(cls, artifact: Path, manifest: "Manifest") -> dict[str, np.ndarray]:
        """The trainable tensors (ONNX names) a fresh run of ``artifact`` starts from."""

    @classmethod
    def write_initial_trainable(cls, artifact: Path, manifest: "Manifest", tensors: dict[str, np.ndarray]) -> list[str]:
        """Replace the start values of the named trainable tensors in ``artifact``; returns the names written."""

    def start_step(self, lr: float) -> None:
        """Begin an optimizer step at learning rate ``lr`` (no gradients accumulated yet)."""

    def forward_backward(self, batch: "Batch", scale: float = 1.0) -> float:
        """Mean loss of ``batch``; ``scale`` times its gradient is added to the accumulated one."""

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients with AdamW and clear them."""

    def eval_loss(self, batch: "Batch") -> float:
        """Loss of ``batch`` without touching gradients or weights."""

    def trainable(self) -> dict[str, np.ndarray]:
        """Current trainable tensors by ONNX name (copies)."""

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors by name."""

    def frozen(self, name: str) -> np.ndarray:
        """A frozen tensor by name (a copy)."""

    def gradients(self, names: list[str]) -> dict[str, np.ndarray]:
        """Gradients accumulated so far in this step, by name (read between backward and the update)."""

    def clear_gradients(self) -> None:
        """Drop the gradients accumulated so far in this step: the next ``forward_backward`` starts from zero."""

    def set_gradients(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace accumulated gradients by name (after a ``forward_backward``, before ``optimizer_step``): the
        update is made of these (DP-SGD's clipped and noised sum, ``device/privacy.py``)."""

    def gate_channels(self, gains: dict[str, np.ndarray]) -> None:
        """Scale rank channels for this step (``gains``: module -> a float per channel; call before the
        first ``forward_backward``): channel k adds ``gains[k]`` times its update to the forward pass, as
        if the module's ``alpha / r`` were that much larger (exact when A is frozen; a trained A takes
        its AdamW step on the scaled rows, see ``adapters.channels.ungate``). Gain-0 channels sit the
        step out: they keep their values through ``optimizer_step`` and their AdamW moments decay as for
        a zero gradient."""

    def save_state(self, path: Path, include_optimizer: bool = True) -> None:
        """Write the training state (weights, and AdamW moments and step unless told not) to ``path``."""
