"""The ``edge-peft`` command line: thin click wrappers that parse, call and print."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .artifact.manifest import QUANTIZATIONS
from .backends.compute import TRAIN_CHOICES as COMPUTE_CHOICES
from .backends.names import EXPORT_CHOICES, ORT, TRAIN_CHOICES
from .errors import UserError
from .variants import DEFAULT as DEFAULT_VARIANT
from .variants import REGISTRY as VARIANTS

EXIT_USER_ERROR = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-peft")
def main_group() -> None:
    """Personalise models on the device: export, train LoRA-FA adapters, share them."""


def _blocks(manifest) -> set[int]:
    from .artifact.names import layer_index

    return {layer_index(m.name) for m in manifest.adapter.modules}


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main_group.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifact directory to write.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scaling alpha/r).")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default="int8", show_default=True,
              help="Storage of the frozen base weights.")
@click.option("--block-size", default=32, show_default=True,
              help="--quantize int4: values per block (32, 64 or 128) along each weight's reduced axis.")
@click.option("--variant", type=click.Choice(list(VARIANTS)), default=DEFAULT_VARIANT, show_default=True,
              help="; ".join(f"{name}: {v.description}" for name, v in VARIANTS.items()) + ".")
@click.option("--targets", help="Comma-separated module names to adapt, or all-linear (every attention and MLP "
              "projection of the selected blocks); default: the family's recipe in export/.")
@click.option("--labels", help="Comma-separated class names for a new classification head.")
@click.option("--seed", default=0, show_default=True, help="Seed of the frozen A matrices (recorded in the manifest).")
@click.option("--max-seq-len", default=256, show_default=True, help="Longest sequence the device may train on.")
@click.option("--weight-decay", default=0.0, show_default=True, help="AdamW weight decay (baked into the optimizer).")
@click.option("--max-grad-norm", default=1.0, show_default=True, help="Gradient clipping norm (0 disables).")
@click.option("--layers", help="Blocks to adapt: 0,2,4-6 | top:N | bottom:N | auto:N (probe --probe-data) | auto "
              "(as many as --memory-budget allows, probed; default: all).")
@click.option("--probe-data", type=click.Path(path_type=Path), help="Data for --layers auto:N (.jsonl/.txt).")
@click.option("--probe-steps", default=8, show_default=True, help="Steps of the --layers auto:N probe.")
@click.option("--memory-budget", help="Peak RSS a minimal run (micro-batch 1, 256 tokens) must fit: chooses rank, "
              "layers, quantization and (causal LMs) checkpointing, e.g. 512MB.")
@click.option("--device-profile", help="Plan for the budget and margin of devices/NAME.toml (see `edge-peft devices`).")
@click.option("--loss-chunks", default=8, show_default=True,
              help="Causal LMs: LM head and loss on target tokens only, in this many chunks (0: naive full logits); "
                   "the portable step reads the head in this many row slices.")
@click.option("--backend", type=click.Choice(list(EXPORT_CHOICES)), default=ORT, show_default=True,
              help="Training graphs to write: ORT's training API, the portable ones (plain onnxruntime), or both.")
@click.option("--compute", default="fp32", show_default=True,
              help="Frozen-base products of the portable step: fp32, or int8 (adds an int8-product graph beside "
                   "the fp32 one; train picks per CPU). bf16 is refused: onnxruntime's CPU provider has no bf16 "
                   "MatMul.")
@click.option("--checkpointing", is_flag=True,
              help="Recompute each transformer block's activations in the backward (both backends): less memory, "
                   "about a third more compute per step.")
@click.option("--attention-recompute/--keep-attention", default=True, show_default=True,
              help="Recompute each attention's probabilities (heads x T x T a row) in the backward from its queries "
                   "and keys instead of keeping them from the forward: far less memory at long sequences, one more "
                   "score product per trained block.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def export(model_dir: Path, out: Path, rank: int, alpha: float, quantize: str, block_size: int, variant: str,
           targets: str | None, labels: str | None, seed: int, max_seq_len: int, weight_decay: float,
           max_grad_norm: float,
           layers: str | None, probe_data: Path | None, probe_steps: int, memory_budget: str | None,
           device_profile: str | None, loss_chunks: int, backend: str, compute: str, checkpointing: bool,
           attention_recompute: bool, force: bool) -> None:
    """Export a local Hugging Face MODEL_DIR to an on-device training artifact."""
    from .exporter.layer_selection import auto_count
    from .exporter.pipeline import ExportOptions, export_artifact

    opts = ExportOptions(rank=rank, alpha=alpha, quantize=quantize, block_size=block_size, variant=variant,
                         targets=_csv(targets), seed=seed, max_seq_len=max_seq_len, labels=_csv(labels),
                         weight_decay=weight_decay, max_grad_norm=max_grad_norm, layers=layers, backend=backend,
                         loss_chunks=loss_chunks,
                         compute=compute, checkpointing=checkpointing, attention_recompute=attention_recompute)
    if memory_budget or device_profile:
        opts = _plan_export(model_dir, opts, memory_budget, device_profile)
    best = auto_count(opts.layers)
    if best is not None:
        from .exporter.layer_probe import export_best_layers

        manifest = export_best_layers(model_dir, out, opts, best, probe_data, probe_steps, overwrite=force)
        click.echo(f"the probe chose blocks {sorted(_blocks(manifest))} (scores in {out / 'layer_probe.json'})")
    else:
        manifest = export_artifact(model_dir, out, opts, overwrite=force)
    spec = manifest.adapter
    click.echo(f"artifact written to {out}: {spec.architecture}, {len(spec.modules)} adapted modules, "
               f"{spec.kind.title} rank {spec.rank}, base {manifest.quantization}, fingerprint {spec.base_fingerprint}")


@main_group.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", required=True,
              help=".jsonl lines of one shape ({\"text\"}, {\"prompt\",\"completion\"}, {\"messages\"} or "
                   "{\"text\",\"label\"}), .txt, or a directory holding train.jsonl and valid.jsonl.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--steps", type=int, help="Optimizer steps (default per task: 60 classifier, 200 causal LM).")
@click.option("--batch-size", default=8, show_default=True, help="Examples per optimizer step.")
@click.option("--micro-batch-size", type=int, help="Examples per forward pass (gradient accumulation).")
@click.option("--lr", type=float,
              help="Peak learning rate, warm-up then cosine decay (default per task: 1e-2 classifier, 2e-2 causal LM).")
@click.option("--warmup-steps", type=int, help="Warm-up steps (default: 5% of --steps).")
@click.option("--max-seq-len", type=int,
              help="Truncate/cut sequences to this many tokens (default per task: 128 classifier, 256 causal LM).")
@click.option("--train-on-prompt", is_flag=True,
              help="Prompt/completion and chat data: train on every token, not only completions and assistant turns.")
@click.option("--pack", is_flag=True,
              help="Concatenate short examples into full --max-seq-len sequences (each attends to those before it).")
@click.option("--eval-data", help="Held-out file (default: --data's valid.jsonl, else --eval-fraction of --data).")
@click.option("--eval-fraction", default=0.1, show_default=True,
              help="Share of --data held out for evaluation when no --eval-data is given.")
@click.option("--eval-every", default=50, show_default=True,
              help="Score the held-out set before step 1 and every N steps (0: never).")
@click.option("--eval-batches", type=int, help="Score only this many held-out batches (default: the whole set).")
@click.option("--checkpoint-every", default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--seed", default=0, show_default=True, help="Data order and split seed.")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads (0: all cores).")
@click.option("--adaptive-rank", is_flag=True,
              help="AdaLoRA-style: prune rank channels of low importance across layers down to --target-rank.")
@click.option("--target-rank", type=int, help="Average rank per module that --adaptive-rank ends at (default: half).")
@click.option("--nested-ranks", is_flag=True,
              help="DyLoRA-style: train random rank prefixes so `adapter save --rank k` works for any k.")
@click.option("--layer-lr-decay", default=1.0, show_default=True,
              help="Learning-rate multiplier per layer below the top one (0.8: each lower layer gets 0.8x).")
@click.option("--lr-ratio-b", default=1.0, show_default=True,
              help="LoRA+: B's learning rate over A's (--variant lora artifacts only).")
@click.option("--memory-budget", help="Peak RSS the run must stay under, e.g. 512MB: sets micro-batch and max-seq-len.")
@click.option("--memory-margin", type=float, help="Safety margin on the predicted peak (default 0.15, or the profile's).")
@click.option("--device-profile", help="Threads, budget and margin from devices/NAME.toml (see `edge-peft devices`).")
@click.option("--backend", type=click.Choice(TRAIN_CHOICES), default="auto", show_default=True,
              help="auto: ORT's training API where installed, else the portable graphs (plain onnxruntime).")
@click.option("--compute", type=click.Choice(COMPUTE_CHOICES), default="auto", show_default=True,
              help="Frozen-base products (portable backend): auto takes int8 where the artifact carries it and the "
                   "CPU has int8 dot-product instructions (VNNI, AMX, Arm dot product), else fp32.")
@click.option("--max-grad-norm", "--dp-clip", "dp_clip", type=float,
              help="DP-SGD: clip each example's adapter gradient to this L2 norm (with --noise-multiplier or --dp-epsilon).")
@click.option("--noise-multiplier", type=float, help="DP-SGD: Gaussian noise std as a multiple of --max-grad-norm.")
@click.option("--dp-epsilon", type=float,
              help="DP-SGD: calibrate the noise so that --steps steps spend this epsilon (RDP accountant).")
@click.option("--dp-delta", default=1e-5, show_default=True, help="DP-SGD: the delta of (epsilon, delta); below 1/N.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx: click.Context, artifact: Path, out: Path, resume: bool, quiet: bool, device_profile: str | None,
          **options) -> None:
    """Fine-tune the adapters of ARTIFACT on local data (no torch needed)."""
    from .device.memory import configure_allocator
    from .device.defaults import describe
    from .device.trainer import TrainConfig, open_run

    _apply_profile(device_profile, options)
    if options["memory_budget"]:
        _restart_with_huge_pages(ctx)
    configure_allocator(budgeted=bool(options["memory_budget"]))
    run = open_run(artifact, TrainConfig(**options), out, resume=resume)
    if run.defaults:
        click.echo(describe(run.manifest.task, run.defaults), err=True)
    summary = run.run(progress=not quiet)
    eval_loss, before = summary["eval_loss"], summary.get("eval_loss_before")
    click.echo(f"trained {summary['steps']} steps: loss {summary['final_loss']:.4f}"
               + (f", held-out loss {before:.4f} -> {eval_loss:.4f}" if None not in (eval_loss, before) else
                  f", held-out loss {eval_loss:.4f}" if eval_loss is not None else "")
               + f", {summary['tokens_per_s']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB; "
               f"adapter in {out / 'adapter'}")


def _restart_with_huge_pages(ctx: click.Context) -> None:
    """Re-execute this command line with malloc's huge pages on (``memory.huge_pages_env``: read only at
    process start) where they apply; only for a real command line, never for an in-process call."""
    import os

    from .device.memory import huge_pages_env

    argv = (ctx.find_root().obj or {}).get("argv")
    env = huge_pages_env(os.environ)
    if argv and env:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "edge_peft.cli", *argv], env)


def _plan_export(model_dir: Path, opts, memory_budget: str | None, device_profile: str | None):
    """``opts`` with rank, layers and quantization chosen for the budget (the command line's, else the profile's)."""
    from .device.planner import parse_budget
    from .exporter.export_plan import plan_export

    options = {"memory_budget": memory_budget}
    _apply_profile(device_profile, options)
    planned = plan_export(model_dir, opts, parse_budget(options["memory_budget"]), options["memory_margin"],
                          device_profile)
    chosen = planned.memory["export_plan"]
    click.echo(f"planned for {options['memory_budget']}: rank {chosen['rank']}, layers {chosen['layers']}, "
               f"{chosen['quantize']} base{', checkpointing' if chosen['checkpointing'] else ''}, predicted peak {chosen['predicted_peak_mb']:.0f} MB at micro-batch 1 x "
               f"{chosen['seq_len']} tokens")
    return planned


def _apply_profile(name: str | None, options: dict) -> None:
    """Fill threads, memory budget and margin from a device profile where the command line left them unset."""
    from .device.planner import DEFAULT_MARGIN

    if name:
        from .device.profiles import load_profile, resolve_provider

        profile = load_profile(name)
        options["execution_provider"] = resolve_provider(profile)
        if options.get("backend") == "auto":
            options["backend"] = profile.backend
        options["threads"] = options.get("threads") or profile.threads
        options["memory_budget"] = options.get("memory_budget") or profile.memory_budget
        options["memory_margin"] = options.get("memory_margin") or profile.margin
    if options.get("memory_margin") is None:
        options["memory_margin"] = DEFAULT_MARGIN


@main_group.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--memory-budget", help="Peak RSS to plan for, e.g. 512MB (default: the device profile's).")
@click.option("--batch-size", default=8, show_default=True, help="Examples per optimizer step.")
@click.option("--micro-batch-size", type=int, help="Largest micro-batch to consider.")
@click.option("--max-seq-len", type=int, help="Longest sequence wanted (default: the artifact's).")
@click.option("--memory-margin", type=float, help="Safety margin on the predicted peak (default 0.15).")
@click.option("--device-profile", help="Budget and margin from devices/NAME.toml.")
@click.option("--backend", type=click.Choice(TRAIN_CHOICES), default="auto", show_default=True,
              help="The training backend to plan for (each has its own memory factors).")
def plan(artifact: Path, device_profile: str | None, batch_size: int, micro_batch_size: int | None,
         max_seq_len: int | None, **options) -> None:
    """Print the micro-batch, accumulation and sequence length that fit a memory budget, without training."""
    from .artifact.manifest import load_manifest
    from .backends import candidates
    from .device.planner import parse_budget, plan_first_fit

    _apply_profile(device_profile, options)
    if not options.get("memory_budget"):
        raise UserError("plan needs --memory-budget (e.g. 512MB) or --device-profile")
    manifest = load_manifest(artifact)
    seq_len = min(max_seq_len or manifest.max_seq_len, manifest.max_seq_len)
    chosen = plan_first_fit(manifest, parse_budget(options["memory_budget"]), batch_size, seq_len,
                            candidates(manifest, options["backend"]), options["memory_margin"], micro_batch_size)
    click.echo("\n".join(chosen.describe()))


@main_group.command()
def devices() -> None:
    """List the device profiles (devices/*.toml)."""
    from .device.profiles import list_profiles

    for p in list_profiles():
        click.echo(f"{p.name:<18}{p.memory_budget:>6} budget, {p.margin:.0%} margin, "
                   f"{p.threads or 'all'} threads, {p.execution_provider}: {p.description}")


def _sampling_options(func):
    """The options of how generate and chat choose each token."""
    options = [
        click.option("--temperature", default=0.0, show_default=True,
                     help="0: greedy; > 0: sample from softmax(logits / temperature)."),
        click.option("--top-k", default=0, show_default=True, help="With --temperature: sample among the k likeliest "
                                                                   "(0: all)."),
        click.option("--top-p", default=1.0, show_default=True,
                     help="With --temperature: sample from the smallest set of tokens holding this probability."),
        click.option("--seed", default=0, show_default=True, help="Seed of the sampling."),
        click.option("--adapter", type=click.Path(path_type=Path), help="PEFT adapter to use instead of the run's."),
        click.option("--threads", default=0, show_default=True, help="Intra-op threads (0: all cores)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main_group.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=40, show_default=True, help="Tokens to generate at most.")
@_sampling_options
def generate(source: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
             adapter: Path | None, threads: int) -> None:
    """Continue PROMPT with the model of a run (or artifact) SOURCE, printing tokens as they come."""
    from .device.generation import Sampling
    from .device.inference import Predictor

    sampling = Sampling(temperature, top_k, top_p, seed)
    predictor = Predictor(source, adapter, threads)
    pieces = predictor.stream(prompt, max_new_tokens, sampling)
    click.echo(prompt, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@main_group.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--system", help="A system message opening the conversation.")
@click.option("--max-new-tokens", default=256, show_default=True, help="Tokens per reply at most.")
@_sampling_options
def chat(source: Path, system: str | None, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
         seed: int, adapter: Path | None, threads: int) -> None:
    """Talk with the model of a run (or artifact) SOURCE through its chat template: each line read from stdin is
    a user message, the reply streams to stdout; end of input (Ctrl-D) ends the conversation."""
    from .device.chat_template import ChatTemplate
    from .device.generation import Conversation, Sampling
    from .device.inference import Predictor

    sampling = Sampling(temperature, top_k, top_p, seed)
    predictor = Predictor(source, adapter, threads)
    template = ChatTemplate.load(predictor.artifact)
    if template is None or not template.template:
        raise UserError(f"{predictor.artifact} has no chat template (the model's tokenizer has none, or it was "
                        "exported before templates were carried): use `edge-peft generate --prompt`")
    conversation = Conversation(predictor.generator, template, system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            for piece in conversation.reply(line.strip(), max_new_tokens, sampling):
                click.echo(piece, nl=False)
            click.echo()


@main_group.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, help="Text to classify (repeatable).")
@click.option("--data", type=click.File("r", encoding="utf-8"),
              help="Classify every line of this file (- for stdin): JSON objects with a \"text\" or plain text; "
                   "writes one JSON line per input.")
@click.option("--adapter", type=click.Path(path_type=Path), help="PEFT adapter to use instead of the run's.")
def classify(source: Path, texts: tuple[str, ...], data, adapter: Path | None) -> None:
    """Classify texts with the model of a run (or artifact) SOURCE."""
    import json

    from .device.inference import Predictor

    if bool(texts) == bool(data):
        raise UserError("pass the texts to classify with --text (repeatable) or --data FILE (- for stdin), not both")
    if texts:
        for text, (label, prob) in zip(texts, Predictor(source, adapter).classify(list(texts))):
            click.echo(f"{label}\t{prob:.3f}\t{text[:80]}")
        return
    inputs = [_text_of(line, n) for n, line in enumerate(data, start=1) if line.strip()]
    for text, (label, prob) in zip(inputs, Predictor(source, adapter).classify(inputs)):
        click.echo(json.dumps({"text": text, "label": label, "probability": round(prob, 6)}))


def _text_of(line: str, lineno: int) -> str:
    """The text of one --data line: a JSON object's "text", else the line itself."""
    import json

    if line.lstrip().startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--data line {lineno}: malformed JSON ({exc.msg}): one object or one text per line") from None
        if not isinstance(obj.get("text"), str):
            raise UserError(f'--data line {lineno}: expected a string "text" field')
        return obj["text"]
    return line.rstrip("\n")


@main_group.command("eval")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Labelled .jsonl for a classifier; for a causal LM a .jsonl/.txt file of any train --data shape "
                   "(the whole file is scored, on the tokens training would train).")
@click.option("--adapter", type=click.Path(path_type=Path), help="PEFT adapter to score instead of the run's.")
@click.option("--base", is_flag=True, help="Score the base model: no adapter (zero B, the export's head).")
@click.option("--batch-size", default=16, show_default=True, help="Examples per inference batch.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the scores as JSON here.")
def eval_command(source: Path, data: Path, adapter: Path | None, base: bool, batch_size: int,
                 json_path: Path | None) -> None:
    """Score the model of a run (or artifact) SOURCE on a data file: accuracy and per-class precision/recall,
    or mean loss and perplexity."""
    from .device.evaluate import evaluate_file
    from .device.inference import Predictor
    from .device.run_dir import artifact_of, is_run
    from .fileio import atomic_write_json

    if base and adapter:
        raise UserError("--base scores the model without an adapter: drop --adapter or --base")
    predictor = Predictor(artifact_of(source) if base and is_run(source) else source, adapter)
    scores = evaluate_file(predictor, data, batch_size)
    if "accuracy" in scores:
        click.echo(f"accuracy {scores['accuracy']:.1%} on {scores['examples']} examples")
        for label, c in scores["classes"].items():
            precision = "-" if c["precision"] is None else f"{c['precision']:.1%}"
            recall = "-" if c["recall"] is None else f"{c['recall']:.1%}"
            click.echo(f"  {label:<20} precision {precision:>6}  recall {recall:>6}  support {c['support']}")
    else:
        click.echo(f"loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f} over {scores['tokens']} target "
                   f"tokens of {scores['examples']} examples")
    if json_path:
        atomic_write_json(json_path, scores)


@main_group.group()
def adapter() -> None:
    """Save a run's adapter in PEFT format, load one into an artifact, or merge one into its base model."""


@adapter.command("save")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PEFT adapter directory to write.")
@click.option("--rank", type=int,
              help="Write the rank-RANK adapter of a run trained with --nested-ranks (its first RANK channels).")
def adapter_save(run: Path, out: Path, rank: int | None) -> None:
    """Write RUN's adapter as adapter_config.json + adapter_model.safetensors."""
    from .device.adapter_io import save_run_adapter

    click.echo(f"PEFT adapter written to {save_run_adapter(run, out, rank)}")


@adapter.command("load")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("adapter_dir", type=click.Path(path_type=Path))
def adapter_load(artifact: Path, adapter_dir: Path) -> None:
    """Warm-start ARTIFACT from the PEFT adapter in ADAPTER_DIR (same base, same shapes): rewrites ARTIFACT's
    initial adapter in place (copy the artifact first to keep the untouched one)."""
    from .device.adapter_io import load_into_artifact

    count = load_into_artifact(artifact, adapter_dir)
    click.echo(f"changed {artifact} in place: its initial adapter is now {adapter_dir} ({count} tensors); new runs "
               "of it start from them")


@adapter.command("merge")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Hugging Face model directory to write.")
@click.option("--base", type=click.Path(path_type=Path),
              help="The original base model directory (default: the one the artifact was exported from).")
@click.option("--adapter", "adapter_dir", type=click.Path(path_type=Path),
              help="PEFT adapter to merge instead of the run's.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def adapter_merge(run: Path, out: Path, base: Path | None, adapter_dir: Path | None, force: bool) -> None:
    """Merge RUN's adapter into the original fp32 base weights (workstation: needs the [export] extra) and write a
    Hugging Face model directory (safetensors, config, tokenizer)."""
    try:
        from .exporter.merge import merge_run_adapter
    except ImportError as exc:
        raise UserError(f"adapter merge needs torch, transformers and peft ({exc.name} is missing): run it on the "
                        "workstation, or pip install 'edge-peft[export]'") from None
    click.echo(f"merged model written to {merge_run_adapter(run, out, base, adapter_dir, overwrite=force)}")


@main_group.command()
@click.option("--workdir", default="edge-peft-demo", show_default=True, type=click.Path(path_type=Path),
              help="Where the artifact, run, adapter and store go (replaced).")
@click.option("--llm", is_flag=True,
              help="Instruction-tune SmolLM2-135M-Instruct to write BBC headlines instead (chat data, KV-cache generation).")
@click.option("--steps", type=int, help="Training steps (default 60).")
@click.option("--per-class-train", type=int, help="Training articles per topic (default 40).")
@click.option("--per-class-test", type=int, help="Held-out articles per topic (default 40; --llm: 8).")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default="int8", show_default=True,
              help="Storage of the frozen base weights.")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads (0: all cores).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the numbers as JSON here.")
def demo(workdir: Path, llm: bool, json_path: Path | None, **settings) -> None:
    """The whole job on the bundled default: real MiniLM + BBC News, export -> train -> before/after -> store
    (--llm: SmolLM2-135M-Instruct learns to write BBC headlines)."""
    from .fileio import atomic_write_json

    given = {k: v for k, v in settings.items() if v is not None}
    if llm:
        from .llm_demo import LlmDemoSettings, run_llm_demo

        result = run_llm_demo(workdir, LlmDemoSettings(**given))
    else:
        from .demo import DemoSettings, run_demo

        result = run_demo(workdir, DemoSettings(**given))
    if json_path:
        atomic_write_json(json_path, result)


@main_group.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write (default: RUN/report.html); one PNG per chart goes beside it.")
@click.option("--watch", type=click.FloatRange(min=1), help="Rewrite every this many seconds until the run finishes.")
def report(run: Path, out: Path | None, watch: float | None) -> None:
    """Plot RUN's loss, held-out loss, tokens/s, RSS against its memory budget, learning rate and total rank
    (the [report] extra); works on a run still training."""
    from .report.report import watch_report, write_report

    out = out or run / "report.html"
    if watch:
        watch_report(run, out, watch, lambda paths, done: click.echo(f"wrote {paths[0]} ({'finished' if done else 'in progress'})"))
    else:
        click.echo(f"wrote {', '.join(map(str, write_report(run, out)))}")


def _register_optional_commands() -> None:
    """Store commands live in edge_peft.store (the `store` extra); register them when present."""
    try:
        from .store import cli as store_cli
    except ImportError:
        return
    for name in ("serve", "store", "push", "pull", "sync"):
        command = getattr(store_cli, name, None)
        if command is not None:
            main_group.add_command(command, name)


_register_optional_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        command_line = argv is None or list(argv) == sys.argv[1:]  # else an in-process call (tests, scripts)
        main_group.main(args=argv, standalone_mode=False, obj={"argv": sys.argv[1:] if command_line else None})
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
