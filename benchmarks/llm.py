"""A small instruction LLM end to end: SmolLM2-135M-Instruct learns BBC article -> headline (chat format).

Every configuration runs in its own process with the same data order, steps, batch, sequence length, rank,
targets and layers, learning-rate schedule (warm-up, cosine to 10 %) and AdamW (no weight decay, gradient
norm clipped to 1.0); loss on the assistant turns only. Default rows:

- base: the exported int8 artifact with zero adapters;
- edge-peft with its causal-LM defaults (LoRA-FA on every linear layer, train's lr), int8 base, on the ORT
  training API and on the portable backend (one export carrying both; the portable row runs in
  ``.venv-portable``: plain onnxruntime, no torch), and ``--variant lora``;
- PyTorch + PEFT LoRA on the fp32 model with the same targets, PyTorch's default (SDPA) attention.

``--mlx`` adds MLX-LM's LoRA trainer on the CPU (``.venv-mlx``: ``pip install "mlx[cpu]" mlx-lm``) for
``--mlx-steps`` steps (mlx's CPU backend multiplies matrices at a few GFLOP/s on x86 Linux, so a step takes
minutes); ``--configs all`` adds it and the comparison rows behind the defaults (q/v only, rank 16, LoRA on q/v).

Rows: held-out completion loss, ROUGE-L of greedy headlines, training tokens/s (real tokens per second of
training, padding excluded), peak RSS of the process, upload size (trained values, fp32); generation tokens/s
at 200 new tokens (edge-peft's KV-cache graph vs PyTorch ``generate`` on the merged model).

Usage: ``python benchmarks/llm.py [--json benchmarks/results/llm.json] [--work DIR] [--configs all]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_description, peak_rss_mb, print_table, write_json, write_smollm2_hf_dir  # noqa: E402

from edge_peft.device.defaults import TASK_DEFAULTS  # noqa: E402

MAX_NEW = 32  # headline generation
GEN_TOKENS = 200  # generation speed


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- workers (each in its own process) -----------------------------------------------------------------------

def edge_scores(source: str, test: str) -> dict:
    from edge_peft.device.evaluate import evaluate_file, rouge_l
    from edge_peft.device.inference import Predictor
    from edge_peft.llm_demo import headlines

    rows = read_rows(test)
    made = headlines(Path(source), [_row_of(r) for r in rows], threads=0)
    rouge = sum(rouge_l(_row_of(r)["title"], h) for r, h in zip(rows, made)) / len(rows)
    return {"loss": evaluate_file(Predictor(source), test)["loss"], "rouge_l": rouge}


def _row_of(chat: dict) -> dict:
    """{"title", "body"} back from a headline chat."""
    from edge_peft.llm_demo import PROMPT

    prefix = PROMPT.split("{body}")[0]
    return {"body": chat["messages"][0]["content"][len(prefix):], "title": chat["messages"][1]["content"]}


def base_worker(args) -> dict:
    return {**edge_scores(args.artifact, args.test), "peak_rss_mb": peak_rss_mb()}


def edge_worker(args) -> dict:
    from edge_peft.artifact.files import RUN_INFO
    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.device.trainer import TrainConfig, open_run

    shutil.rmtree(args.run, ignore_errors=True)
    config = TrainConfig(data=args.train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         max_seq_len=args.seq, eval_fraction=0.0, eval_every=0, checkpoint_every=0,
                         backend=args.backend)
    summary = open_run(args.artifact, config, args.run).run()
    train_peak = peak_rss_mb()
    assert "torch" not in sys.modules, "the device loop imported torch"
    scores = edge_scores(args.run, args.test)
    generation = edge_generation(args.run) if args.generation else {}
    upload_kb = load_manifest(args.artifact).adapter.trainable_values() * 4 / 1024
    compute = json.loads((Path(args.run) / RUN_INFO).read_text())["compute"]
    return {**scores, "tokens_per_s": summary["tokens_per_s"], "peak_rss_mb": train_peak, "upload_kb": upload_kb,
            "compute": compute, **generation}


def edge_generation(source: str) -> dict:
    from edge_peft.device.inference import Predictor

    predictor = Predictor(source)
    ids = predictor.prompt_ids("The history of the city begins")
    predictor.generator.eos_ids = set()  # GEN_TOKENS new tokens, as PyTorch's min_new_tokens
    start = time.perf_counter()
    made = sum(1 for _ in predictor.generator.stream_ids(ids, GEN_TOKENS))
    return {"gen_tokens": made, "gen_tokens_per_s": made / (time.perf_counter() - start)}


def torch_worker(args) -> dict:
    """PyTorch + PEFT LoRA on the same batches (edge-peft's own data code builds them), default attention."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.device.schedule import learning_rate

    torch.set_num_threads(os.cpu_count() or 1)
    manifest = load_manifest(args.artifact)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    spec = manifest.adapter
    layers = sorted({int(m.name.split(".layers.")[1].split(".")[0]) for m in spec.modules})
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(spec.target_modules),
                        layers_to_transform=layers, layers_pattern="layers")
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=1e-8, weight_decay=0.0)
    train_set, test_set = _tokenized(args.artifact, args.train, args.seq), _tokenized(args.artifact, args.test, args.seq)
    from edge_peft.device.data import batch_indices

    pool = list(range(len(train_set)))
    warmup = max(1, args.steps // 20)
    tokens, wall = 0, 0.0
    model.train()
    for step in range(args.steps):
        batch = train_set.batch(batch_indices(pool, args.batch_size, 0, step))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup)
        start = time.perf_counter()
        loss = _torch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall += time.perf_counter() - start
        tokens += batch.tokens
    train_peak = peak_rss_mb()
    model.eval()
    with torch.no_grad():
        total, count = 0.0, 0
        for i in range(0, len(test_set), 4):
            batch = test_set.batch(list(range(i, min(i + 4, len(test_set)))))
            n = int((batch.labels != -100).sum())
            total += float(_torch_loss(model, batch)) * n
            count += n
    merged = model.merge_and_unload()
    rouge, generation = _torch_generation(merged, args.artifact, args.test)
    return {"loss": total / count, "rouge_l": rouge, "tokens_per_s": tokens / wall, "peak_rss_mb": train_peak,
            "upload_kb": sum(p.numel() for p in params) * 4 / 1024, **generation}


def _tokenized(artifact: str, path: str, seq: int):
    from tokenizers import Tokenizer

    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.device.chat_template import ChatTemplate
    from edge_peft.device.data import Tokenized, read_examples

    manifest = load_manifest(artifact)
    tokenizer = Tokenizer.from_file(str(Path(artifact) / "tokenizer.json"))
    examples = read_examples(path, manifest.task, manifest.labels)
    return Tokenized(tokenizer, examples, manifest.task, seq, manifest.pad_token_id, manifest.eos_token_id,
                     chat=ChatTemplate.load(Path(artifact)))


def _torch_loss(model, batch):
    import torch

    ids, mask, labels = (torch.from_numpy(x) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _torch_generation(model, artifact: str, test: str) -> tuple[float, dict]:
    import torch
    from tokenizers import Tokenizer

    from edge_peft.device.chat_template import ChatTemplate
    from edge_peft.device.evaluate import rouge_l

    tokenizer = Tokenizer.from_file(str(Path(artifact) / "tokenizer.json"))
    template = ChatTemplate.load(Path(artifact))
    eos = tokenizer.token_to_id(template.special_tokens["eos_token"])
    rows = read_rows(test)
    score = 0.0
    with torch.no_grad():
        for chat in rows:
            ids = template.encode(tokenizer, chat["messages"][:1], add_generation_prompt=True)
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)
            score += rouge_l(chat["messages"][1]["content"], tokenizer.decode(out[0, len(ids):].tolist()).strip())
        ids = tokenizer.encode("The history of the city begins").ids
        start = time.perf_counter()
        out = model.generate(torch.tensor([ids]), max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                             do_sample=False, pad_token_id=eos)
        made = out.shape[1] - len(ids)
        gen = {"gen_tokens": made, "gen_tokens_per_s": made / (time.perf_counter() - start)}
    return score / len(rows), gen


MLX_DRIVER = """
import json, resource, sys, types
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Speeds(TrainingCallback):
    def __init__(self):
        self.reports = []
    def on_train_loss_report(self, info):
        self.reports.append(info)

options = {**lora.CONFIG_DEFAULTS, **json.loads(sys.argv[1])}
speeds = Speeds()
lora.run(types.SimpleNamespace(**options), speeds)
later = speeds.reports[1:] or speeds.reports  # the first report holds the compilation warm-up
print(json.dumps({"tokens_per_s": sum(r["tokens_per_second"] for r in later) / len(later),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def mlx_worker(args) -> dict:
    """MLX-LM's LoRA trainer (its Python entry, in .venv-mlx) on the fp32 model folder: same data, batch,
    sequence length, rank, scale, layers, steps and schedule; AdamW without weight decay; prompt masked."""
    shutil.rmtree(args.run, ignore_errors=True)
    data = Path(args.run) / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text(Path(args.train).read_text())
    (data / "valid.jsonl").write_text(Path(args.test).read_text())
    from edge_peft.artifact.manifest import load_manifest

    steps = args.mlx_steps
    warmup = max(1, args.steps // 20)
    modules = sorted({m.name.rsplit(".", 2)[-2] + "." + m.name.rsplit(".", 1)[-1]
                      for m in load_manifest(args.artifact).adapter.modules})  # e.g. self_attn.q_proj
    options = {
        "model": args.hf_dir, "train": True, "data": str(data), "fine_tune_type": "lora", "mask_prompt": True,
        "num_layers": args.layers, "batch_size": args.batch_size, "iters": steps, "learning_rate": args.lr,
        "max_seq_length": args.seq, "steps_per_report": 1, "steps_per_eval": 10 ** 6, "val_batches": 1,
        "save_every": 10 ** 6, "adapter_path": str(Path(args.run) / "adapters"), "seed": 0, "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "lr_schedule": {"name": "cosine_decay", "warmup": warmup,
                        "arguments": [args.lr, args.steps - warmup, 0.1 * args.lr]},
        "lora_parameters": {"rank": args.rank, "scale": args.alpha / args.rank, "dropout": 0.0, "keys": modules}}
    python = ROOT / ".venv-mlx" / "bin" / "python"
    proc = subprocess.run([str(python), "-c", MLX_DRIVER, json.dumps(options)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (row name, export options over the recipe's defaults, training backend). The default artifact carries both
# backends' graphs, so its ORT and portable rows train the same export; the first row is the base (zero
# adapters). EXTRA_CONFIGS compare other choices for the causal-LM defaults: run them with --configs.
DEFAULT = {"backend": "both"}
EDGE_CONFIGS = [
    ("base", DEFAULT, "ort"),
    ("edge-peft defaults (lora-fa all-linear) on ort", DEFAULT, "ort"),
    ("edge-peft defaults (lora-fa all-linear) on portable", DEFAULT, "portable"),
    ("edge-peft lora all-linear on ort", {"variant": "lora"}, "ort"),
    ("edge-peft defaults on portable, int8 products where the CPU has VNNI/AMX", {"backend": "both", "compute": "int8"},
     "portable"),
]
QV = {"targets": ["q_proj", "v_proj"]}
EXTRA_CONFIGS = [
    ("edge-peft lora-fa q/v on ort", QV, "ort"),
    ("edge-peft lora q/v on ort", {**QV, "variant": "lora"}, "ort"),
    ("edge-peft lora-fa all-linear rank 16 on ort", {"rank": 16}, "ort"),
]
BASE_ROW, TORCH_ROW, MLX_ROW = "base (int8, zero adapters)", "PyTorch + PEFT lora all-linear (SDPA)", "MLX-LM lora all-linear (CPU)"

WORKERS = {"base": base_worker, "edge": edge_worker, "torch": torch_worker, "mlx": mlx_worker}


# --- driver --------------------------------------------------------------------------------------------------

def run(kind: str, args: argparse.Namespace, python: Path | None = None, **extra) -> dict:
    """Run one worker in a fresh interpreter; its last stdout line is its JSON result."""
    argv = ["--worker", kind, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq", str(args.seq),
            "--lr", str(args.lr), "--rank", str(args.rank), "--alpha", str(args.alpha), "--layers", str(args.layers)]
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(python or sys.executable), __file__, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"{kind} failed: {proc.stderr[-1500:]}", file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=TASK_DEFAULTS["causal-lm"].lr, help="Default: train's.")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--layers", type=int, default=4, help="Adapt the top N blocks.")
    parser.add_argument("--train-articles", type=int, default=40, help="Per topic.")
    parser.add_argument("--test-articles", type=int, default=3, help="Per topic.")
    parser.add_argument("--mlx-steps", type=int, default=2,
                        help="Steps of the MLX-LM row (its tokens/s are those after the first step).")
    parser.add_argument("--work", help="Keep exports and measured rows here (a rerun measures only what is missing).")
    parser.add_argument("--configs", help="Comma list of row names to run, or 'all' (default: all but the extra "
                                          "comparison rows and the MLX-LM row).")
    parser.add_argument("--mlx", action="store_true", help="Add the MLX-LM row to the default rows.")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for name in ("--artifact", "--train", "--test", "--run", "--backend", "--hf-dir"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--generation", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    from edge_peft import export
    from edge_peft.bundled import bbc_headline_split, write_jsonl
    from edge_peft.llm_demo import headline_chat

    began = time.perf_counter()
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    every = [*EDGE_CONFIGS, *EXTRA_CONFIGS]
    if args.configs == "all":
        wanted = {BASE_ROW, TORCH_ROW, MLX_ROW, *(n for n, _, _ in every)}
    elif args.configs:
        wanted = set(args.configs.split(","))
    else:
        wanted = {BASE_ROW, TORCH_ROW, *(n for n, _, _ in EDGE_CONFIGS), *([MLX_ROW] if args.mlx else [])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_rows, test_rows = bbc_headline_split(args.train_articles, args.test_articles)
        train = str(write_jsonl(work / "train.jsonl", [headline_chat(r) for r in train_rows]))
        test = str(write_jsonl(work / "test.jsonl", [headline_chat(r) for r in test_rows]))
        portable = ROOT / ".venv-portable" / "bin" / "python"
        hf_dir = work / "smollm2-hf"  # SmolLM2 as an fp32 safetensors folder: every export and reference loads it
        write_smollm2_hf_dir(hf_dir)
        done = work / "rows.jsonl"
        measured = {r["config"]: r for r in map(json.loads, done.read_text().splitlines())} if done.is_file() else {}
        rows = []

        def measure(name: str, work_fn) -> None:
            """Run one row unless it is not wanted or ``work/rows.jsonl`` already holds it."""
            if name not in wanted:
                return
            row = measured.get(name) or {"config": name, **work_fn()}
            if name not in measured and "error" not in row:
                with done.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(json.dumps(row), flush=True)

        def artifact(export_options: dict) -> Path:
            tag = "-".join(f"{k}={v}" for k, v in sorted(export_options.items())).replace("'", "")
            out = work / f"artifact-{tag}"
            if not (out / "manifest.json").is_file():
                start = time.perf_counter()
                options = {"rank": args.rank, "alpha": args.alpha, "variant": "lora-fa", "backend": "ort",
                           **export_options}
                export(hf_dir, out, quantize="int8", layers=f"top:{args.layers}", max_seq_len=args.seq, **options)
                print(f"exported {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
            return out

        for name, export_options, backend in every:
            row_name = BASE_ROW if name == "base" else name
            if row_name not in wanted or row_name in measured:
                measure(row_name, dict)
                continue
            out = artifact(export_options)
            if name == "base":
                measure(row_name, lambda: run("base", args, artifact=out, test=test))
                continue
            python = portable if backend == "portable" else None
            if python is not None and not python.exists():
                measure(name, lambda: {"error": "no .venv-portable: run scripts/portable_venv.sh"})
                continue
            tag = out.name.removeprefix("artifact-")
            measure(name, lambda: run("edge", args, python, artifact=out, train=train, test=test,
                                      run=work / f"run-{backend}-{tag}", backend=backend,
                                      generation=name == EDGE_CONFIGS[1][0]))
        measure(TORCH_ROW, lambda: run("torch", args, artifact=artifact(DEFAULT), train=train, test=test,
                                       hf_dir=hf_dir))
        mlx = ROOT / ".venv-mlx" / "bin" / "python"

        def mlx_row() -> dict:
            if not mlx.exists():
                return {"error": "not installed: python -m venv .venv-mlx && .venv-mlx/bin/pip install 'mlx[cpu]' mlx-lm"}
            return run("mlx", args, artifact=artifact(DEFAULT), train=train, test=test, run=work / "mlx",
                       hf_dir=hf_dir)

        measure(MLX_ROW, mlx_row)
    print_table(rows, [("config", "configuration"), ("loss", "held-out loss"), ("rouge_l", "ROUGE-L"),
                       ("tokens_per_s", "train tokens/s"), ("compute", "products"), ("peak_rss_mb", "peak RSS MB"),
                       ("upload_kb", "upload KB"), ("gen_tokens_per_s", "gen tokens/s"), ("error", "error")])
    minutes = (time.perf_counter() - began) / 60
    print(f"{minutes:.1f} minutes")
    write_json(args.json, {"cpu": cpu, "minutes": round(minutes, 1), "settings": {
        k: v for k, v in vars(args).items() if k not in (
            "worker", "artifact", "train", "test", "run", "backend", "hf_dir", "generation", "json")}, "rows": rows})


if __name__ == "__main__":
    main()
