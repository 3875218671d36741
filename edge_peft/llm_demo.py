"""``edge-peft demo --llm``: instruction-tune SmolLM2-135M-Instruct on the device to write BBC headlines.

Real model (SmolLM2-135M-Instruct, a 4-bit GGUF from PyPI) and real data (BBC News, article -> its headline
as a chat: the user gives the article, the assistant answers with the headline): export with an int8 base ->
held-out completion loss and greedy headlines before -> on-device training (assistant turns only) -> the same
after, with ROUGE-L of the greedy headlines against the real ones.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from .bundled import bbc_headline_split, smollm2_dir, write_jsonl

PROMPT = "Write a headline for this news article.\n\n{body}"


@dataclass
class LlmDemoSettings:
    per_class_train: int = 40
    per_class_test: int = 8
    steps: int = 60
    batch_size: int = 4
    lr: float | None = None  # the causal-LM default (device/defaults.py)
    max_seq_len: int = 256
    rank: int = 8
    quantize: str = "int8"
    threads: int = 0
    shown: int = 3


def headline_chat(row: dict) -> dict:
    """One article as a training conversation."""
    return {"messages": [{"role": "user", "content": PROMPT.format(body=row["body"])},
                         {"role": "assistant", "content": row["title"]}]}


def headlines(source: Path, rows: list[dict], threads: int) -> list[str]:
    """Greedy headlines of ``source`` (an artifact or a run) for ``rows``, through the model's chat template."""
    from .device.chat_template import ChatTemplate
    from .device.inference import Predictor

    predictor = Predictor(source, threads=threads)
    template = ChatTemplate.load(predictor.artifact)
    generator = predictor.generator
    stop = {generator.tokenizer.token_to_id(template.special_tokens.get("eos_token", ""))} - {None}
    out = []
    for row in rows:
        ids = template.encode(generator.tokenizer, [headline_chat(row)["messages"][0]], add_generation_prompt=True)
        out.append("".join(generator.stream(ids, 32, stop=stop)).strip())
    return out


def run_llm_demo(workdir: Path, settings: LlmDemoSettings) -> dict:
    """Run every stage in ``workdir`` (replaced if present); returns the measured numbers."""
    from . import export, train
    from .device.evaluate import evaluate_file, rouge_l

    s = settings
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    train_rows, test_rows = bbc_headline_split(s.per_class_train, s.per_class_test)
    click.echo(f"[data] BBC News as article -> headline chats: {len(train_rows)} train / {len(test_rows)} held-out")
    train_file = write_jsonl(workdir / "train.jsonl", [headline_chat(r) for r in train_rows])
    test_file = write_jsonl(workdir / "valid.jsonl", [headline_chat(r) for r in test_rows])

    click.echo(f"[export] SmolLM2-135M-Instruct -> LoRA-FA rank {s.rank}, {s.quantize} base (loading the GGUF "
               "takes about half a minute)")
    artifact = workdir / "artifact"
    export(smollm2_dir(), artifact, quiet=False, rank=s.rank, alpha=2.0 * s.rank, quantize=s.quantize,
           max_seq_len=s.max_seq_len)

    def scores(source: Path, when: str) -> dict:
        from .device.inference import Predictor

        loss = evaluate_file(Predictor(source, threads=s.threads), test_file)["loss"]
        made = headlines(source, test_rows, s.threads)
        rouge = sum(rouge_l(r["title"], h) for r, h in zip(test_rows, made)) / len(test_rows)
        click.echo(f"[{when}] held-out completion loss {loss:.3f}, ROUGE-L of greedy headlines {rouge:.3f}")
        for row, made_one in list(zip(test_rows, made))[: s.shown]:
            click.echo(f"    {made_one[:70]!r:<74} (true: {row['title']!r})")
        return {"loss": loss, "rouge_l": rouge, "headlines": made}

    before = scores(artifact, "before")
    click.echo(f"[train] {s.steps} steps x {s.batch_size} chats on the device loop (no torch), assistant turns only")
    run = workdir / "run"
    start = time.perf_counter()
    summary = train(artifact, train_file, run, progress=True, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                    max_seq_len=s.max_seq_len, eval_fraction=0.0, eval_every=0, checkpoint_every=20,
                    threads=s.threads)
    train_s = time.perf_counter() - start
    after = scores(run, "after")
    click.echo(f"\nheld-out completion loss {before['loss']:.3f} -> {after['loss']:.3f}, ROUGE-L "
               f"{before['rouge_l']:.3f} -> {after['rouge_l']:.3f} on {len(test_rows)} BBC articles; "
               f"{summary['tokens_per_s']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB, "
               f"{train_s:.0f} s of training")
    return {"before": before, "after": after, "steps": summary["steps"], "train_s": round(train_s, 1),
            "tokens_per_s": summary["tokens_per_s"], "peak_rss_mb": summary["peak_rss_mb"]}
