"""Export recipes (``export/*.toml``): which modules to adapt for each model family."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from ..datafiles import data_dir
from ..errors import UserError


@dataclass(frozen=True)
class Recipe:
    family: str
    model_types: tuple[str, ...]
    task: str
    targets: tuple[str, ...]
    head: tuple[str, ...] = field(default=())


def load_recipes() -> dict[str, Recipe]:
    """model_type -> Recipe, from every TOML file in the recipes folder."""
    recipes: dict[str, Recipe] = {}
    folder = data_dir("export")
    for path in sorted(folder.glob("*.toml")):
        try:
            raw = tomllib.loads(path.read_text())
            recipe = Recipe(raw["family"], tuple(raw["model_types"]), raw["task"], tuple(raw["targets"]),
                            tuple(raw.get("head", ())))
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"recipe {path} is invalid ({exc}): fix the file (keys: family, model_types, task, targets)") from None
        for model_type in recipe.model_types:
            recipes[model_type] = recipe
    return recipes


def recipe_for(model_type: str) -> Recipe:
    """The recipe of a transformers ``model_type``, or a one-line error listing the supported ones."""
    recipes = load_recipes()
    if model_type not in recipes:
        raise UserError(f"architecture {model_type!r} is not supported: supported model types are "
                        f"{', '.join(sorted(recipes))} (add a recipe in export/ to support more)")
    return recipes[model_type]
