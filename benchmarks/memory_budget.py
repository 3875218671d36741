"""--memory-budget on the benchmark model (all-MiniLM-L6-v2, int8, BBC News): plan, predicted vs measured peak, tokens/s.

The causal-LM rows compare the naive training graph (full logits, ``--loss-chunks 0``) with the target-only
chunked LM head and loss (the default) on a random 4-layer GPT-2 with MiniLM's 30522-token vocabulary,
trained on the same BBC News text: at each budget, the micro-batch x sequence each plan fits and the peak.

Each budget (and the LoRA-FA vs LoRA pair at one fixed setting) trains in its own process through
``edge-peft train``; the measured peak is that process's VmHWM. "predicted" is the memory model plus the
overhead the run measured after loading (tokenizer and data: what the trainer plans with). Full fine-tuning is
not a mode of the exporter, so it has no row. tokens/s on a shared machine are indicative only. Budgeted runs
start with malloc's huge pages on where they apply (``memory.huge_pages_env``; the "huge pages" column says
whether they were): ``benchmarks/huge_pages.py`` compares on and off.
Usage: ``python benchmarks/memory_budget.py [--artifact-dir DIR] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, print_table, run_worker, write_json  # noqa: E402

BUDGETS = ["256MB", "512MB", "1024MB", "2048MB"]
LM_BUDGETS = ["384MB", "512MB", "1024MB"]  # naive vs target-only chunked loss on the causal LM
LM_LOSSES = {"gpt2 naive": "0", "gpt2 chunked": "8"}  # --loss-chunks
PORTABLE = "lora-fa portable"  # the portable training-step graph (plain onnxruntime) on the same model
LM_PORTABLE = "gpt2 portable"  # the causal LM on the portable graph (full logits)
PORTABLE_BUDGETS = ["512MB", "1024MB"]
FULL = "full fine-tuning (PyTorch)"
# The fixed setting (8 x 256) is run under a budget that does not bind, so that it plans and allocates as
# every budgeted run does (``memory.predictable_memory``), which is what the memory model describes.
FIXED = "4GB"
FIXED_ARGS = ["--memory-budget", FIXED, "--micro-batch-size", "8", "--max-seq-len", "256"]
# Budgeted rows ask for up to 512 tokens (the per-task defaults are shorter: 128 for a classifier, 256 for a causal
# LM), so that the budget, not the default, bounds the sequence.
FULL_LENGTH = ["--max-seq-len", "512"]


def export(out: Path, variant: str, backend: str = "ort") -> Path:
    from edge_peft.bundled import BBC_LABELS, minilm_dir

    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", str(minilm_dir()), "--out", str(out),
                        "--labels", ",".join(BBC_LABELS), "--variant", variant, "--max-seq-len", "512",
                        "--quantize", "int8", "--backend", backend], check=True, capture_output=True)
    return out


def export_lm(out: Path, loss_chunks: str, backend: str = "ort") -> Path:
    """The calibration-sized causal LM (random GPT-2: 4 layers, h 256, 30522-token MiniLM vocabulary), int8."""
    if (out / "manifest.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from edge_peft.bundled import minilm_dir

    model = out.parent / "gpt2-model"
    if not (model / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        tokenizer.save_pretrained(model)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=256, n_layer=4, n_head=4, n_positions=512,
                                   bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                   pad_token_id=0)).save_pretrained(model)
    subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", str(model), "--out", str(out), "--max-seq-len",
                    "512", "--targets", "c_attn", "--loss-chunks", loss_chunks, "--backend", backend], check=True,
                   capture_output=True)
    return out


def full_finetune_worker(data: str, steps: int) -> dict:
    """PyTorch eager full fine-tuning of MiniLM at 8 x 256 (run in its own process): peak RSS and tokens/s."""
    import time

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edge_peft.bundled import BBC_LABELS, minilm_dir

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(BBC_LABELS))
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][:8]
    batch = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=256,
                      return_tensors="pt")
    labels = torch.tensor([BBC_LABELS.index(r["label"]) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    start = time.perf_counter()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"peak_rss_mb": peak_rss_mb(), "tokens_per_s": steps * 8 * 256 / (time.perf_counter() - start)}


def train(artifact: Path, data: Path, run: Path, extra: list[str], steps: int, env: dict | None = None) -> dict:
    """One ``edge-peft train`` process (``env`` added to its environment); returns its summary plus the plan."""
    proc = subprocess.run([sys.executable, "-m", "edge_peft.cli", "train", str(artifact), "--data", str(data),
                           "--out", str(run), "--steps", str(steps), "--batch-size", "16", "--eval-every", "0",
                           "--threads", "2", "--quiet", *extra], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode == 2:
        return {"refused": proc.stderr.strip().removeprefix("error: ")}
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    summary = json.loads((run / "summary.json").read_text())
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    plan = json.loads((run / "run.json").read_text())["plan"]
    return {**summary, "overhead_mb": first.get("memory_overhead_mb", 0.0), "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact-dir", type=Path, help="Where to keep the exported artifacts (default: temporary).")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", choices=["all", "minilm", "lm", "portable"], default="all", help="Which rows to run.")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # full fine-tuning of this data file
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(full_finetune_worker(args.worker, args.steps)))
        return
    from edge_peft.bundled import bbc_news_split, write_jsonl
    from edge_peft.device.memory_model import MB, predict
    from edge_peft.device.planner import parse_budget
    from edge_peft.artifact.manifest import load_manifest

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.artifact_dir or tmp
        data = write_jsonl(tmp / "train.jsonl", bbc_news_split(20, 0)[0])
        rows = []
        settings = [("lora-fa", b, ["--memory-budget", b, *FULL_LENGTH]) for b in BUDGETS]
        settings += [(v, FIXED, FIXED_ARGS) for v in ("lora-fa", "lora")] + [(FULL, "none", [])]
        settings += [(v, b, ["--memory-budget", b, *FULL_LENGTH]) for b in LM_BUDGETS for v in LM_LOSSES]
        settings += [(v, FIXED, FIXED_ARGS) for v in LM_LOSSES]
        settings += [(PORTABLE, b, ["--memory-budget", b, "--backend", "portable", *FULL_LENGTH])
                     for b in PORTABLE_BUDGETS]
        settings += [(PORTABLE, FIXED, FIXED_ARGS + ["--backend", "portable"])]
        settings += [(LM_PORTABLE, b, ["--memory-budget", b, "--backend", "portable", *FULL_LENGTH])
                     for b in PORTABLE_BUDGETS]
        if args.rows != "all":
            group = {"lm": set(LM_LOSSES), "portable": {PORTABLE, LM_PORTABLE},
                     "minilm": {"lora-fa", "lora", FULL}}[args.rows]
            settings = [row for row in settings if row[0] in group]
        for n, (variant, budget, extra) in enumerate(settings):
            if variant == FULL:
                result = run_worker(Path(__file__), [str(data), f"--steps={args.steps}"])
                rows.append({"variant": variant, "budget_mb": budget, "micro_batch": 8, "seq_len": 256,
                             "peak_mb": round(result["peak_rss_mb"], 1), "tokens_per_s": round(result["tokens_per_s"], 1)})
                print(rows[-1], file=sys.stderr, flush=True)
                continue
            if variant in LM_LOSSES:
                artifact = export_lm(root / variant.replace(" ", "-"), LM_LOSSES[variant])
            elif variant == LM_PORTABLE:
                artifact = export_lm(root / "gpt2-portable", "0", "portable")
            elif variant == PORTABLE:
                artifact = export(root / "minilm-int8-portable", "lora-fa", "portable")
            else:
                artifact = export(root / f"minilm-int8-{variant}", variant)
            manifest = load_manifest(artifact)
            result = train(artifact, data, tmp / f"run{n}", extra, args.steps)
            row = {"variant": variant, "budget_mb": budget, "huge_pages": result.get("huge_pages")}
            if "refused" in result:
                row["note"] = result["refused"]
            else:
                overhead = int(result["overhead_mb"] * MB)  # what the run measured after loading, as it plans
                plan = result["plan"]  # the plan the run recorded (run.json)
                micro, seq = plan["micro_batch"], plan["max_seq_len"]
                predicted = (predict(manifest, micro, seq, plan["backend"]).total + overhead) / MB
                row.update(micro_batch=micro, seq_len=seq, predicted_mb=round(predicted, 1),
                           peak_mb=result["peak_rss_mb"], tokens_per_s=result["tokens_per_s"],
                           error_pct=round(100 * (predicted - result["peak_rss_mb"]) / result["peak_rss_mb"], 1))
                row["within_budget"] = result["peak_rss_mb"] <= parse_budget(budget) / MB
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print_table(rows, [("variant", "variant"), ("budget_mb", "budget"), ("micro_batch", "micro"), ("seq_len", "seq"),
                       ("predicted_mb", "predicted MB"), ("peak_mb", "measured MB"), ("error_pct", "error %"),
                       ("within_budget", "<= budget"), ("tokens_per_s", "tokens/s"), ("huge_pages", "huge pages"),
                       ("note", "note")])
    if args.json and args.rows != "all" and Path(args.json).is_file():  # keep the other groups' rows
        ran = {row["variant"] for row in rows}
        rows = [r for r in json.loads(Path(args.json).read_text())["rows"] if r["variant"] not in ran] + rows
    write_json(args.json, {"rows": rows, "note": "2 shared cores: tokens/s are contaminated by other jobs"})


if __name__ == "__main__":
    main()
