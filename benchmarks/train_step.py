"""Training-step speed and memory: edge-peft (ORT training API and portable backend, fp32 and int8 bases, fp32 and
int8 products) vs PyTorch + PEFT, on all-MiniLM-L6-v2 (22.7 M, classifier) and SmolLM2-135M-Instruct (causal LM).

Per model: the same batch, sequence length, thread count, rank and targets; PyTorch with its default attention
(SDPA) is the reference, eager attention a second row; every configuration runs in its own process, and peak RSS
is that process's high-water mark (everything it imported included). All edge-peft rows of a model train one
artifact (``--backend both --compute int8``). The run also measures the machine's ceilings with onnxruntime
(fp32 ``MatMul`` and int8 ``MatMulInteger`` on 2048 x 2048) and reports each row's achieved model GFLOP/s:
forward and input gradient of every frozen linear layer, ``4 x linear parameters x tokens`` per step (attention
and the adapters left out, so it is a lower bound). Rows run at ``--threads`` and, for the reference, the fp32
and the int8 products, at 1 thread too.

Usage: ``python benchmarks/train_step.py [--json out.json] [--models minilm,smollm2]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, cpu_description, peak_rss_mb, print_table, run_worker, write_json,  # noqa: E402
                    write_smollm2_hf_dir)

LABELS = ["a", "b", "c", "d", "e"]
MODELS = {  # name -> (targets, batch size, sequence length, task)
    "minilm": (["query", "value"], 8, 128, "sequence-classification"),
    "smollm2": (["q_proj", "v_proj"], 4, 256, "causal-lm"),
}


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0, causal: bool = False):
    """(input_ids, attention_mask, labels): class labels, or for a causal LM every next token a target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    if causal:  # shifted as edge-peft's data code writes them: position t's target is token t + 1
        labels = np.concatenate([ids[:, 1:], np.full((batch, 1), -100, np.int64)], axis=1)
    else:
        labels = rng.integers(0, len(LABELS), size=batch, dtype=np.int64)
    return ids, np.ones_like(ids), labels


def edge_worker(artifact: str, args, backend_name: str = "ort", compute: str = "fp32") -> dict:
    """An edge-peft backend (ORT training API or portable graphs): forward+backward+AdamW per step, no torch."""
    from edge_peft.backends import open_backend
    from edge_peft.device.data import Batch
    from edge_peft.device.memory import reuse_freed_memory
    from edge_peft.artifact.manifest import load_manifest

    reuse_freed_memory()  # as `edge-peft train` does without a memory budget
    manifest = load_manifest(artifact)
    backend = open_backend(Path(artifact), manifest, threads=args.threads, choice=backend_name, compute=compute)
    batch = Batch(*random_batch(args.batch_size, args.seq_len, manifest.vocab_size, causal=manifest.task == "causal-lm"))
    return timed(lambda: (backend.start_step(1e-3), backend.forward_backward(batch), backend.optimizer_step()), args)


def torch_worker(model_dir: str, args, attention: str) -> dict:
    """PyTorch + Hugging Face PEFT LoRA with the same rank, alpha and targets; ``attention``: sdpa (PyTorch's
    default) or eager."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    targets, _, _, task = MODELS[args.model]
    causal = task == "causal-lm"
    torch.set_num_threads(args.threads)
    if causal:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS),
                                                                   attn_implementation=attention)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                             modules_to_save=None if causal else ["classifier"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, mask, labels = (torch.from_numpy(a) for a in random_batch(args.batch_size, args.seq_len,
                                                                    model.config.vocab_size, causal=causal))

    def step():
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return timed(step, args)


def ceiling_worker(_: str, args) -> dict:
    """onnxruntime's fp32 MatMul and uint8 x int8 MatMulInteger (zero point 128, what ``--compute int8`` runs)
    GFLOP/s on 2048 x 2048 at ``--threads``."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = 2048
    found = {}
    rng = np.random.default_rng(0)
    for name, op, a_type, b_type, out_type in (("fp32_matmul_gflops", "MatMul", TensorProto.FLOAT, TensorProto.FLOAT,
                                                TensorProto.FLOAT),
                                               ("int8_matmul_gops", "MatMulInteger", TensorProto.UINT8,
                                                TensorProto.INT8, TensorProto.INT32)):
        integer = op == "MatMulInteger"
        zero_point = [helper.make_tensor("zero_point", TensorProto.UINT8, [], [128])] if integer else []
        graph = helper.make_graph([helper.make_node(op, ["a", "b", *(["zero_point"] if integer else [])], ["c"])],
                                  "ceiling", [helper.make_tensor_value_info("a", a_type, [n, n]),
                                              helper.make_tensor_value_info("b", b_type, [n, n])],
                                  [helper.make_tensor_value_info("c", out_type, [n, n])], initializer=zero_point)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = ({"a": rng.integers(0, 256, (n, n)).astype(np.uint8), "b": rng.integers(-127, 128, (n, n)).astype(np.int8)}
                 if integer else {x: rng.standard_normal((n, n)).astype(np.float32) for x in "ab"})
        session.run(None, feeds)
        best = float("inf")
        for _ in range(5):  # the best of five: a ceiling, not an average under whatever else runs
            start = time.perf_counter()
            session.run(None, feeds)
            best = min(best, time.perf_counter() - start)
        found[name] = 2 * n ** 3 / best / 1e9
    return found


def timed(step, args) -> dict:
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.seq_len
    return {"tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps, "peak_rss_mb": peak_rss_mb()}


def export(model: str, model_dir: str, out: Path, quantize: str, rank: int) -> None:
    """Export in a subprocess of its own so the parent stays small (int8 bases also carry the int8 products)."""
    import subprocess

    targets, _, seq, task = MODELS[model]
    extra = ["--labels", ",".join(LABELS)] if task == "sequence-classification" else []
    extra += ["--compute", "int8"] if quantize == "int8" else []
    proc = subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", model_dir, "--out", str(out), "--rank",
                           str(rank), "--alpha", str(2 * rank), "--quantize", quantize, "--targets", ",".join(targets),
                           "--max-seq-len", str(max(seq, 128)), "--backend", "both", *extra],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export of {model} failed: {proc.stderr[-2000:]}")


def linear_parameters(model_dir: str) -> int:
    """Weights of every linear layer of the model (LM head included), from its safetensors header."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__" and name.endswith(".weight") and len(info["shape"]) == 2 \
                    and "embed" not in name and "position" not in name and "token_type" not in name:
                total += info["shape"][0] * info["shape"][1]
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("tie_word_embeddings") and config.get("model_type") != "bert":
        total += config["vocab_size"] * config["hidden_size"]  # the LM head reads the embedding table
    return total


def measure_ceilings(thread_counts: list[int], before: dict | None = None) -> dict[int, dict]:
    """The ceilings per thread count, each the best of this measurement and ``before``."""
    found = {t: run_worker(Path(__file__), ["ceiling", "-", f"--threads={t}", "--batch-size=0", "--seq-len=0"])
             for t in thread_counts}
    return {t: {k: max(v, (before or {}).get(t, {}).get(k, 0.0)) for k, v in found[t].items()} for t in found}


# (row name, worker kind, base quantization, compute, runs at 1 thread too)
CONFIGS = [
    ("edge-peft ORT API, fp32 base", "edge", "none", "fp32", False),
    ("edge-peft ORT API, int8 base", "edge", "int8", "fp32", True),
    ("edge-peft portable, fp32 base", "portable", "none", "fp32", False),
    ("edge-peft portable, int8 base", "portable", "int8", "fp32", True),
    ("edge-peft portable, int8 base, --compute int8", "portable", "int8", "int8", True),
    ("PyTorch + PEFT LoRA (SDPA, the default)", "torch-sdpa", None, None, True),
    ("PyTorch eager + PEFT LoRA", "torch-eager", None, None, False),
]
MODEL_LABELS = {"minilm": "all-MiniLM-L6-v2 (22.7 M)", "smollm2": "SmolLM2-135M-Instruct"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--models", default="minilm,smollm2", help="Comma list of: " + ", ".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="Timed steps (default: 20 for MiniLM, 5 for SmolLM2).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    for name in ("--model", "--batch-size", "--seq-len", "--compute"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, path = args.worker
        args.batch_size, args.seq_len = int(args.batch_size), int(args.seq_len)
        if kind == "ceiling":
            result = ceiling_worker(path, args)
        elif kind.startswith("torch-"):
            result = torch_worker(path, args, kind.split("-", 1)[1])
        else:
            result = edge_worker(path, args, "ort" if kind == "edge" else kind, args.compute)
        print(json.dumps(result))
        return

    from edge_peft.bundled import minilm_dir

    cpu = cpu_description()
    print(f"CPU: {cpu}", flush=True)
    ceilings = measure_ceilings(sorted({1, args.threads}))
    for threads, found in ceilings.items():
        print(f"onnxruntime ceilings at {threads} thread(s): fp32 MatMul {found['fp32_matmul_gflops']:.0f} GFLOP/s, "
              f"int8 MatMulInteger {found['int8_matmul_gops']:.0f} GOP/s", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            _, batch, seq, _ = MODELS[model]
            model_dir = str(minilm_dir()) if model == "minilm" else str(write_smollm2_hf_dir(Path(tmp) / "smollm2-hf"))
            flops_per_token = 4 * linear_parameters(model_dir)
            steps = args.steps or (20 if model == "minilm" else 5)
            rows = []
            for name, kind, quantize, compute, single in CONFIGS:
                if model == "smollm2" and quantize == "none":
                    continue  # the LLM rows compare int8 bases: an fp32-base export of it costs minutes more
                path = model_dir
                if quantize is not None:
                    path = str(Path(tmp) / f"{model}-{quantize}")
                    if not Path(path).exists():
                        print(f"exporting {model} ({quantize} base) ...", file=sys.stderr, flush=True)
                        export(model, model_dir, Path(path), quantize, args.rank)
                for threads in sorted({args.threads, *([1] if single else [])}, reverse=True):
                    print(f"running {model}: {name}, {threads} thread(s) ...", file=sys.stderr, flush=True)
                    found = run_worker(Path(__file__), [kind, path, f"--model={model}", f"--batch-size={batch}",
                                                        f"--seq-len={seq}", f"--threads={threads}",
                                                        f"--rank={args.rank}", f"--steps={steps}",
                                                        f"--warmup={args.warmup}", f"--compute={compute or 'fp32'}"])
                    rows.append({"model": model, "config": name, "threads": threads, **found,
                                 "model_gflops": flops_per_token * found["tokens_per_s"] / 1e9,
                                 "shape": f"batch {batch} x {seq} tokens, {steps} timed steps"})
            for r in rows:
                base = next(b for b in rows if "SDPA" in b["config"] and b["threads"] == r["threads"])
                r["speed_vs_torch"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["rss_vs_torch"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            results += rows
    ceilings = measure_ceilings(sorted({1, args.threads}), before=ceilings)  # again, on the machine as it is now
    for model in args.models.split(","):
        rows = [r for r in results if r["model"] == model]
        for r in rows:
            r["vs_fp32_ceiling"] = r["model_gflops"] / ceilings[r["threads"]]["fp32_matmul_gflops"]
        print(f"\n{MODEL_LABELS[model]}: {rows[0]['shape']}, rank {args.rank} on {'/'.join(MODELS[model][0])} "
              f"of every block; fp32 ceiling (best of two measurements) "
              + ", ".join(f"{c['fp32_matmul_gflops']:.0f} GFLOP/s at {t}" for t, c in ceilings.items()))
        print_table(rows, [("config", "configuration"), ("threads", "threads"), ("tokens_per_s", "tokens/s"),
                           ("peak_rss_mb", "peak RSS MB"), ("speed_vs_torch", "speed x"), ("rss_vs_torch", "RSS x"),
                           ("model_gflops", "model GFLOP/s"), ("vs_fp32_ceiling", "x fp32 ceiling")])
    write_json(args.json, {"cpu": cpu, "ceilings": {str(k): v for k, v in ceilings.items()},
                           "settings": {"threads": args.threads, "rank": args.rank, "warmup": args.warmup},
                           "results": results})


if __name__ == "__main__":
    main()
