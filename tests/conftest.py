"""Session fixtures: tiny models, their exported artifacts, toy data. Built once, shared by tests.

They export or build models, so only tests marked ``slow`` may use them (the fast lane, ``-m "not slow"``,
must not trigger them). Shared functions live in ``helpers.py``, not here.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import toy  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {kind: toy.make_model(kind, root / kind) for kind in ("bert", "gpt2", "llama")}
    from edge_peft.bundled import minilm_dir

    made["minilm"] = minilm_dir()  # real pretrained MiniLM: random tiny encoders barely learn in few steps
    return made


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "cls": toy.write_jsonl(root / "cls.jsonl", toy.classification_rows(96, seed=1)),
        "cls_eval": toy.write_jsonl(root / "cls_eval.jsonl", toy.classification_rows(48, seed=2)),
        "lm": toy.write_jsonl(root / "lm.jsonl", toy.lm_rows(48)),
    }


@pytest.fixture(scope="session")
def artifacts(models, tmp_path_factory):
    """export(kind, quantize, variant, rank, backend, compute) -> artifact dir, exported once per combination for
    the whole run: pytest-xdist workers share one folder (the first exports under a lock, the others wait for it).
    Tests treat these artifacts as read-only (copy one before changing it)."""
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-artifacts"
    root.mkdir(exist_ok=True)

    def get(kind: str, quantize: str = "int8", variant: str = "lora-fa", rank: int = 4, backend: str = "ort",
            compute: str = "fp32") -> Path:
        key = (kind, quantize, variant, rank) + ((backend,) if backend != "ort" else ()) + (
            (compute,) if compute != "fp32" else ())
        out = root / "-".join(map(str, key))
        done = out.with_name(out.name + ".done")
        with open(out.with_name(out.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)  # a worker that failed mid-export leaves a partial folder
                labels = ["negative", "positive"] if kind == "minilm" else None
                export_artifact(models[kind], out, ExportOptions(rank=rank, alpha=8, quantize=quantize, variant=variant,
                                                                 max_seq_len=32, seed=7, labels=labels,
                                                                 targets=toy.TARGETS.get(kind), backend=backend,
                                                                 compute=compute),
                                quiet=True)
                done.touch()
        return out

    return get


# The fixtures above export models; a test that uses one (directly or through another fixture) must be
# marked slow, or the fast lane (`-m "not slow"`) would pay for the exports. Checked on every run.
SLOW_FIXTURES = ("models", "artifacts", "data")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    direct = getattr(getattr(item, "callspec", None), "params", {})  # a parametrized argument shadows the fixture
    used = [f for f in SLOW_FIXTURES if f in getattr(item, "fixturenames", ()) and f not in direct]
    if used and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} uses the session fixture(s) {', '.join(used)}: mark it @pytest.mark.slow",
                    pytrace=False)


# Real services on loopback (edge_peft/store/local_services.py), started once per session by the tests that
# need them. Locally a missing server binary skips those tests with the reason; CI sets
# EDGE_PEFT_REQUIRE_SERVICES=1 (.ci/run), which turns that skip into a failure.
REQUIRE_SERVICES = os.environ.get("EDGE_PEFT_REQUIRE_SERVICES") == "1"


def start_or_skip(start):
    """``start()``, or skip (fail when services are required) if its program is not installed."""
    try:
        return start()
    except FileNotFoundError as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"{exc}; EDGE_PEFT_REQUIRE_SERVICES=1 forbids skipping (run scripts/services.sh)", pytrace=False)
        pytest.skip(f"{exc}: run scripts/services.sh to install it")


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster on 127.0.0.1 (fsync off), stopped and deleted after the session."""
    from edge_peft.store.local_services import LocalPostgres

    server = start_or_skip(lambda: LocalPostgres(durable=False).start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; its endpoint and credentials are in os.environ for the session, so store
    processes started by tests reach it too."""
    from edge_peft.store.local_services import LocalS3

    server = start_or_skip(lambda: LocalS3().start())
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres+s3", marks=pytest.mark.slow)])  # services start in ~3 s
def store_location(request, tmp_path):
    """A fresh, empty store location on each backend: SQLite + blob directory, or PostgreSQL + S3 (a new
    database and bucket per test)."""
    from edge_peft.store.backends import StoreLocation

    if request.param == "sqlite":
        return StoreLocation(tmp_path / "store")
    postgres, s3 = request.getfixturevalue("postgres"), request.getfixturevalue("s3_server")
    name = "edge-peft-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]  # a valid database and bucket name
    return StoreLocation(tmp_path / "store", postgres.new_database(name), s3.new_bucket(name), s3.endpoint)
