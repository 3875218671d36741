"""Calibrate ``edge_peft.device.memory_model``: measure the peak RSS of real training steps, fit the factors.

Method: every point (artifact, micro-batch B, sequence length T, threads) runs in its own fresh
process (no torch, glibc set up as for a budgeted run: ``memory.predictable_memory``), which records
its RSS after the imports, after loading the training session, and its high-water mark (VmHWM) after
three full steps (forward+backward+AdamW) on random tokens of exactly B x T. Then ``fit``:

- runtime: the mean RSS after the imports;
- load: least squares of ``loaded - imports = SESSION + WEIGHT_LOAD x (frozen bytes + 4 x trainable values)
  + NODE_LOAD x nodes of the training graph the backend loads`` (``memory_model.load_terms``);
- step: least squares, with non-negative factors, of ``peak - loaded - 12 x trainable values`` (AdamW's
  gradient and moments) ``= STEP + sum factor_k x term_k`` over ``memory_model.step_terms`` (one block's
  dequantized base, token activations, checkpointed blocks' inputs, attention scores, full or chunked logits,
  the dequantized head, and a cost per block of an int4 base).

The fitted constants and the data points are copied into ``memory_model.py``.
Usage: ``python benchmarks/calibrate_memory.py ARTIFACT [ARTIFACT...] [--points 1x128,8x128,...] [--json out.json]``
or ``python benchmarks/calibrate_memory.py --fit measured.json`` (rows of an earlier run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_worker, write_json  # noqa: E402

DEFAULT_POINTS = "1x32,1x128,8x32,8x128,4x256,16x128,2x512"


def worker(artifact: str, batch: int, seq: int, threads: int, backend_name: str) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np
    import tokenizers  # noqa: F401  (what a real run has imported too)

    import edge_peft.cli  # noqa: F401
    import edge_peft.device.trainer  # noqa: F401
    from edge_peft.backends import open_backend
    from edge_peft.device.data import Batch
    from edge_peft.device.memory import MB, current_rss, peak_rss, predictable_memory
    from edge_peft.device.memory_model import predict
    from edge_peft.artifact.manifest import load_manifest

    predictable_memory()  # as every budgeted run
    after_imports = current_rss()
    manifest = load_manifest(artifact)
    backend = open_backend(Path(artifact), manifest, threads=threads, choice=backend_name, low_memory=True)
    after_load = current_rss()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, manifest.vocab_size, size=(batch, seq), dtype=np.int64)
    labels = (rng.integers(0, len(manifest.labels), size=batch, dtype=np.int64) if manifest.labels
              else rng.integers(5, manifest.vocab_size, size=(batch, seq), dtype=np.int64))
    started = 0.0
    for step in range(3):
        if step == 1:
            started = time.perf_counter()
        backend.start_step(1e-3)
        backend.forward_backward(Batch(ids, np.ones_like(ids), labels))
        backend.optimizer_step()
    step_s = (time.perf_counter() - started) / 2
    return {"artifact": Path(artifact).name, "path": str(Path(artifact).resolve()), "backend": backend_name, "batch": batch, "seq": seq, "threads": threads,
            "after_imports_mb": round(after_imports / MB, 1), "after_load_mb": round(after_load / MB, 1),
            "peak_mb": round(peak_rss() / MB, 1), "tokens_per_s": round(batch * seq / step_s, 1),
            "predicted_mb": round(predict(manifest, batch, seq, backend_name).total / MB, 1)}


def fit(rows: list[dict]) -> dict[str, float]:
    """The memory model's constants from measured rows (see the module docstring); MB for the intercepts."""
    import numpy as np

    from edge_peft.device.memory_model import FLOAT, MB, ModelFigures, load_terms, step_terms
    from edge_peft.artifact.manifest import load_manifest

    figures = {r["path"]: ModelFigures.of(load_manifest(r["path"]), r.get("backend", "ort")) for r in rows}
    imports = np.array([r["after_imports_mb"] for r in rows]) * MB
    loaded = np.array([r["after_load_mb"] for r in rows]) * MB
    peak = np.array([r["peak_mb"] for r in rows]) * MB
    load = [load_terms(figures[r["path"]]) for r in rows]
    columns = [np.ones(len(rows)), np.array([t["weights"] for t in load], float)]
    columns.append(np.array([t["nodes"] for t in load], float))  # the training graph's (per-node structures)
    (session, weight_load, node_load), *_ = np.linalg.lstsq(np.stack(columns, 1), loaded - imports, rcond=None)
    terms = [step_terms(figures[r["path"]], r["batch"], r["seq"]) for r in rows]
    names = [k for k in terms[0] if any(t[k] for t in terms)]
    optimizer = np.array([3 * FLOAT * figures[r["path"]].trainable_values for r in rows])
    target = peak - loaded - optimizer
    active = ["step", *names]
    while True:  # non-negative least squares by dropping the most negative factor (few columns)
        x = np.stack([np.ones(len(rows)) if k == "step" else np.array([t[k] for t in terms], float) for k in active], 1)
        coef, *_ = np.linalg.lstsq(x, target, rcond=None)
        if coef.min() >= 0:
            break
        active.pop(int(np.argmin(coef)))
    factors = dict.fromkeys(names, 0.0) | dict(zip(active, map(float, coef)))
    return {"runtime_mb": float(imports.mean() / MB), "session_mb": float(session / MB), "weight_load": float(weight_load),
            "node_load": float(node_load),
            "step_mb": factors.pop("step", 0.0) / MB, "int4_block_mb": factors.pop("int4_blocks", 0.0) / MB, **factors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*")
    parser.add_argument("--fit", help="Fit the constants to the rows of this earlier --json output, measure nothing.")
    parser.add_argument("--points", default=DEFAULT_POINTS, help="comma-separated BxT")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=["ort", "portable"], default="ort")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        artifact, batch, seq = args.artifacts[0], *map(int, args.points.split("x"))
        print(json.dumps(worker(artifact, batch, seq, args.threads, args.backend)))
        return
    if args.fit:
        rows = json.loads(Path(args.fit).read_text())["rows"]
        print(json.dumps(fit(rows), indent=2))
        return
    rows = []
    for artifact in args.artifacts:
        for point in args.points.split(","):
            row = run_worker(Path(__file__), [artifact, "--points", point, "--threads", str(args.threads),
                                              "--backend", args.backend])
            row["error_pct"] = round(100 * (row["predicted_mb"] - row["peak_mb"]) / row["peak_mb"], 1)
            rows.append(row)
            print(row, flush=True)
    print_table(rows, [("artifact", "artifact"), ("batch", "B"), ("seq", "T"), ("after_imports_mb", "imports MB"),
                       ("after_load_mb", "loaded MB"), ("peak_mb", "peak MB"), ("predicted_mb", "predicted MB"),
                       ("error_pct", "error %")])
    write_json(args.json, {"rows": rows, "fit": fit(rows)})


if __name__ == "__main__":
    main()
