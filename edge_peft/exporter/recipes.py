"""Export recipes (``export/*.toml``): which modules to adapt for each model family."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from ..datafiles import data_dir
from ..errors import UserError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Recipe:
    family: str
    model_types: tuple[str, ...]
    task: str
    targets: tuple[str, ...]
    head: tuple[str, ...] = field(default=())
    all_linear: tuple[str, ...] = field(default=())  # every linear projection of a block (attention and MLP)

    def resolve_targets(self, targets: list[str] | None) -> list[str]:
        """The module names ``--targets`` means: the recipe's default (which may itself be ``all-linear``),
        ``all-linear`` or an explicit list."""
        targets = list(targets or self.targets)
        if targets == [ALL_LINEAR]:
            return list(self.all_linear or self.targets)
        if ALL_LINEAR in targets:
            raise UserError(f"--targets {','.join(targets)}: {ALL_LINEAR} stands alone (it adapts every linear "
                            "projection of the selected blocks)")
        return list(targets)


def load_recipes() -> tuple[dict[str, Recipe], dict[str, str]]:
    """(model_type -> Recipe, refused model_type -> what to do instead), from every TOML file in the recipes folder."""
    recipes: dict[str, Recipe] = {}
    refused: dict[str, str] = {}
    folder = data_dir("export")
    for path in sorted(folder.glob("*.toml")):
        try:
            raw = tomllib.loads(path.read_text())
            recipe = Recipe(raw["family"], tuple(raw["model_types"]), raw["task"], tuple(raw["targets"]),
                            tuple(raw.get("head", ())), tuple(raw.get("all_linear", ())))
            refused.update({str(k): str(v) for k, v in raw.get("refuse", {}).items()})
        except (tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"recipe {path} is invalid ({exc}): fix the file (keys: family, model_types, task, "
                            "targets; optional: head, all_linear, refuse)") from None
        for model_type in recipe.model_types:
            recipes[model_type] = recipe
    return recipes, refused


def recipe_for(model_type: str) -> Recipe:
    """The recipe of a transformers ``model_type``, or a one-line error listing the supported ones."""
    recipes, refused = load_recipes()
    if model_type in refused:
        raise UserError(f"architecture {model_type!r} is not supported: {refused[model_type]}")
    if model_type not in recipes:
        raise UserError(f"architecture {model_type!r} is not supported: supported model types are "
                        f"{', '.join(sorted(recipes))} (add a recipe in export/ to support more)")
    return recipes[model_type]
