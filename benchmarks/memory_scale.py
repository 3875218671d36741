"""Peak memory of a training step as the model grows: edge-peft's artifacts (fp32 / int8 / int4 base, block
checkpointing off / on, ORT and portable backends) against PyTorch + PEFT LoRA on the same model and settings.

Models: SmolLM2-135M (the bundled GGUF as an fp32 folder) and random Llama-shaped models built with
``transformers`` from a config (SmolLM2's tokenizer and vocabulary; no download). Every row is its own
process: edge-peft rows load the artifact without torch and run three steps of batch x sequence random
tokens (``calibrate_memory.worker``: VmHWM, the memory model's prediction); the PyTorch row runs three
steps of PEFT LoRA (rank 8, all linear projections, default SDPA attention, AdamW) on the same shapes, and the
QLoRA row the same with the base loaded 4-bit by bitsandbytes (NF4; 0.50.2 runs it on CPU).

Usage: ``python benchmarks/memory_scale.py --json PATH [--models smollm2,llama-0.5b,llama-1b] [--seq 512]
[--configs int8,int8-ckpt,int4-ckpt] [--backends ort,portable] [--references lora,qlora|none] [--merge]``.
``--merge`` keeps the rows already in ``--json`` that this run does not measure again (large models one at a time). With only the portable backend asked
for, the export writes only the portable graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_description, print_table, run_worker, write_json, write_smollm2_hf_dir  # noqa: E402

# Llama-shaped sizes with SmolLM2's vocabulary (49,152) and tied embeddings: hidden, layers, MLP, heads, kv heads.
SHAPES = {"llama-0.4b": (1152, 24, 3072, 16, 4),
          "llama-0.5b": (1280, 24, 3584, 20, 4),  # 0.49 B parameters
          "llama-1b": (2048, 16, 8192, 32, 8)}  # Llama-3.2-1B's blocks: 1.07 B parameters
CONFIGS = {"int8": ("int8", False), "int8-ckpt": ("int8", True), "int4-ckpt": ("int4", True)}  # (quantize, ckpt)
BACKENDS = ("ort", "portable")
TORCH_CONFIG = "PyTorch + PEFT LoRA (SDPA)"
REFERENCES = {"lora": TORCH_CONFIG, "qlora": "PyTorch + PEFT QLoRA (bitsandbytes nf4, SDPA)"}


def model_dir(name: str, work: Path) -> Path:
    """The model folder of ``name``, built once under ``work``."""
    smollm2 = write_smollm2_hf_dir(work / "smollm2")
    if name == "smollm2":
        return smollm2
    out = work / name
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        hidden, layers, mlp, heads, kv = SHAPES[name]
        tok = AutoTokenizer.from_pretrained(smollm2)
        config = LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def export(name: str, quantize: str, checkpointing: bool, seq: int, work: Path, backend: str) -> tuple[Path, dict]:
    """The artifact of one configuration (rank 8, all-linear, ``backend``: both or portable), exported once by
    ``edge-peft export`` in its own process; and that export's wall seconds and peak RSS."""
    out = work / "artifacts" / f"{name}-{quantize}{'-ckpt' if checkpointing else ''}-{backend}"
    record = out.parent / f"{out.name}.export.json"  # not with_suffix: "llama-0.5b-..." has a dot
    if not (out / "manifest.json").is_file():
        command = [sys.executable, "-m", "edge_peft.cli", "export", str(model_dir(name, work)), "--out", str(out),
                   "--rank", "8", "--quantize", quantize, "--targets", "all-linear", "--max-seq-len", str(seq),
                   "--backend", backend, "--force", *(["--checkpointing"] if checkpointing else [])]
        start = time.perf_counter()
        log = out.parent / f"{out.name}.export.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as sink:
            child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
        text = log.read_text(errors="replace")
        if status:
            raise SystemExit(f"export of {out.name} failed: {text[-2000:]}")
        portable = re.search(r"exporting the portable training graphs \.\.\..*?done \(([\d.]+) s\)", text, re.S)
        record.write_text(json.dumps({"export_s": round(time.perf_counter() - start, 1),
                                      "portable_export_s": float(portable.group(1)),
                                      "export_peak_mb": round(usage.ru_maxrss / 1024, 1)}))
    return out, json.loads(record.read_text())


def torch_worker(model: str, batch: int, seq: int, threads: int, qlora: bool) -> dict:
    """Peak RSS and tokens/s of three PEFT LoRA steps (rank 8, all linear projections) in this process; with
    ``qlora`` the base is loaded 4-bit by bitsandbytes (NF4, fp32 compute; no gradient checkpointing, as the
    LoRA row)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_peft.device.memory import MB, peak_rss

    torch.set_num_threads(threads)
    extra = {}
    if qlora:
        from transformers import BitsAndBytesConfig

        extra = {"device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)}
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **extra)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.from_numpy(np.random.default_rng(0).integers(5, base.config.vocab_size, size=(batch, seq)))
    start = None
    for step in range(3):
        if step == 1:
            start = time.perf_counter()
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"peak_mb": round(peak_rss() / MB, 1), "tokens_per_s": round(2 * batch * seq / (time.perf_counter() - start), 1)}


def edge_row(artifact: Path, batch: int, seq: int, threads: int, backend: str) -> dict:
    """``calibrate_memory.worker`` in a fresh process: load without torch, three steps, VmHWM and prediction."""
    return run_worker(ROOT / "benchmarks" / "calibrate_memory.py",
                      [str(artifact), "--points", f"{batch}x{seq}", "--threads", str(threads), "--backend", backend])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama-0.5b,llama-1b")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--merge", action="store_true", help="Keep --json's rows this run does not measure again.")
    parser.add_argument("--references", default="lora,qlora",
                        help="PyTorch rows to measure: lora, qlora (bitsandbytes 4-bit), or none; edge-peft rows are "
                             "compared with the LoRA row, measured now or already in --json")
    parser.add_argument("--qlora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--work", help="Keep models and exports here (a rerun exports only what is missing).")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "BxT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        batch, seq = map(int, args.worker[1].split("x"))
        print(json.dumps(torch_worker(args.worker[0], batch, seq, args.threads, args.qlora)))
        return
    print(cpu_description())
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(args.work or tmp))
    if args.merge and args.json and Path(args.json).is_file():
        measured = {(r["model"], r["config"]) for r in rows}
        rows = [r for r in json.loads(Path(args.json).read_text())["rows"]
                if (r["model"], r["config"]) not in measured] + rows
    print_table(rows, [("model", "model"), ("config", "configuration"), ("export_s", "export s"),
                       ("portable_export_s", "portable graphs s"), ("export_peak_mb", "export peak MB"),
                       ("loaded_mb", "loaded MB"), ("peak_mb", "peak MB"), ("predicted_mb", "predicted MB"),
                       ("vs_torch", "x PyTorch"), ("tokens_per_s", "tokens/s")])
    write_json(args.json, {"cpu": cpu_description(), "batch": args.batch, "seq": args.seq, "threads": args.threads,
                           "rows": rows})


def earlier_torch_row(args, name: str) -> dict | None:
    """The PyTorch LoRA row of ``name`` already in ``--json``, if there is one."""
    if not (args.json and Path(args.json).is_file()):
        return None
    return next((r for r in json.loads(Path(args.json).read_text())["rows"]
                 if r["model"] == name and r["config"] == TORCH_CONFIG), None)


def measure(args, work: Path) -> list[dict]:
    """Every model's PyTorch row, then its edge-peft configurations."""
    rows = []
    for name in args.models.split(","):
        measured = {}
        for ref in (r for r in args.references.split(",") if r != "none"):
            measured[ref] = run_worker(Path(__file__), [str(model_dir(name, work)), f"{args.batch}x{args.seq}",
                                                        "--threads", str(args.threads), *(["--qlora"] * (ref == "qlora"))])
            rows.append({"model": name, "config": REFERENCES[ref], **measured[ref]})
            print(rows[-1], flush=True)
        torch_row = measured.get("lora") or earlier_torch_row(args, name)
        backends = args.backends.split(",")
        for quantize, checkpointing in (CONFIGS[c] for c in args.configs.split(",") if c):
            artifact, exported = export(name, quantize, checkpointing, args.seq, work,
                                        "both" if "ort" in backends else "portable")
            for backend in backends:
                row = edge_row(artifact, args.batch, args.seq, args.threads, backend)
                rows.append({"model": name, "config": f"edge-peft {backend} {quantize}"
                                                      f"{' checkpointing' if checkpointing else ''}",
                             **exported, "peak_mb": row["peak_mb"], "predicted_mb": row["predicted_mb"],
                             "loaded_mb": row["after_load_mb"], "tokens_per_s": row["tokens_per_s"],
                             "vs_torch": round(row["peak_mb"] / torch_row["peak_mb"], 2) if torch_row else None})
                print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
