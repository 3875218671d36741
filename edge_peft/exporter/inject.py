"""Find target modules in a transformers model and replace each with its variant's adapter layer."""

from __future__ import annotations

from torch import nn

from ..artifact.adapter_section import AdapterModule
from ..artifact.names import layer_index
from ..errors import UserError
from ..variants import Variant
from .adapter_layers import linear_shape
from .recipes import ALL_LINEAR, Recipe


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(model: nn.Module, targets: list[str], layers: set[int] | None = None) -> list[str]:
    """Module paths of linear layers whose last name component is in ``targets``."""
    linear_names = [name for name, mod in model.named_modules() if is_linear(mod)]
    wanted = set(targets)
    found = [n for n in linear_names if n.rsplit(".", 1)[-1] in wanted or n in wanted]
    if layers is not None:
        found = [n for n in found if layer_index(n) in layers]
    missing = sorted(t for t in wanted if not any(n.rsplit(".", 1)[-1] == t or n == t for n in found))
    if missing or not found:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear_names if layer_index(n) is not None})
        raise UserError(
            f"target module(s) {', '.join(missing) or ', '.join(targets)} match no linear layer: "
            f"choose --targets from {', '.join(available)}"
        )
    return found


def resolve_targets(model: nn.Module, recipe: Recipe, targets: list[str] | None,
                    layers: set[int] | None) -> tuple[list[str], list[str]]:
    """(target module names, module paths to adapt) for ``--targets`` (None: the recipe's; ``all-linear``: the
    recipe's attention and MLP projections, inside the transformer blocks only) and ``--layers``."""
    names = recipe.resolve_targets(targets)
    if targets == [ALL_LINEAR] and layers is None:
        layers = {layer_index(n) for n, _ in model.named_modules()} - {None}
    return names, find_targets(model, names, layers)


def inject_adapters(model: nn.Module, names: list[str], variant: Variant, rank: int, alpha: float,
                    seed: int) -> list[AdapterModule]:
    """Replace each named linear layer with ``variant``'s adapter layer; freeze everything, then let the
    variant's trained tensors train.

    The ``A`` of the i-th adapted module is drawn from seed ``seed + i``; both are written to the manifest.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    modules: list[AdapterModule] = []
    for i, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        in_f, out_f = linear_shape(base)
        if rank <= 0 or rank > min(in_f, out_f):
            raise UserError(f"--rank {rank} does not fit {name} ({in_f} -> {out_f}): choose 1..{min(in_f, out_f)}")
        module = AdapterModule(name=name, in_features=in_f, out_features=out_f, rank=rank, a_seed=seed + i)
        setattr(parent, child, variant.torch_layer(base, module, alpha))
        modules.append(module)
    params = dict(model.named_parameters())
    for m in modules:
        for tensor in variant.trained(m):
            params[tensor].requires_grad_(True)
    return modules
