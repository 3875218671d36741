"""The on-device training loop: data -> micro-batches -> backend steps, with eval, checkpoints and resume."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.numpy import load_file, save

from ..adapters.ranks import NESTED_KEY
from ..errors import UserError
from ..fileio import atomic_directory, atomic_write_bytes, atomic_write_json, sha256_file
from ..manifest import IGNORE_INDEX, Manifest, load_manifest
from .backend import TrainingBackend, open_backend, resolve_backend
from .data import Batch, Tokenized, batch_indices, read_examples, split_holdout
from .memory import MB, current_rss, huge_pages_active, peak_rss, predictable_memory, reuse_freed_memory
from .memory_model import loaded_bytes
from .planner import DEFAULT_MARGIN, BudgetGuard, make_plan, parse_budget
from .run_dir import HOOKS_FILE, RUN_FILE, WARM_START_FILE, read_run, write_adapter, write_run_info
from .schedule import learning_rate
from .step_hooks import build_hooks


@dataclass
class TrainConfig:
    data: str
    steps: int = 200
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float = 2e-3
    warmup_steps: int | None = None
    max_seq_len: int | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.1
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0
    memory_budget: str | None = None
    memory_margin: float = DEFAULT_MARGIN
    adaptive_rank: bool = False
    target_rank: int | None = None
    nested_ranks: bool = False
    layer_lr_decay: float = 1.0
    lr_ratio_b: float = 1.0
    backend: str = "auto"  # auto | ort | portable (backend.open_backend)
    execution_provider: str = "CPUExecutionProvider"  # portable backend only; from --device-profile

    def validate(self, manifest: Manifest) -> None:
        checks = [
            (self.steps > 0, f"--steps {self.steps} must be positive"),
            (self.batch_size > 0, f"--batch-size {self.batch_size} must be positive"),
            (self.micro_batch_size is None or 0 < self.micro_batch_size <= self.batch_size,
             f"--micro-batch-size {self.micro_batch_size} must be between 1 and --batch-size"),
            (self.lr > 0, f"--lr {self.lr} must be positive"),
            (0 <= self.eval_fraction < 1, f"--eval-fraction {self.eval_fraction} must be in [0, 1)"),
            (self.max_seq_len is None or 2 <= self.max_seq_len <= manifest.max_seq_len,
             f"--max-seq-len {self.max_seq_len} must be between 2 and the artifact's {manifest.max_seq_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


class Trainer:
    """Owns one run directory; ``run()`` trains to ``config.steps`` from scratch or from its checkpoint."""

    def __init__(self, artifact: str | Path, config: TrainConfig, out: str | Path, resume: bool = False,
                 show_progress: bool = True):
        self.artifact, self.out, self.config = Path(artifact), Path(out), config
        self.manifest = load_manifest(self.artifact)
        config.validate(self.manifest)
        self.show_progress = show_progress
        self.seq_len = config.max_seq_len or self.manifest.max_seq_len
        saved_state = self.out / "checkpoint" / "state" if resume else None
        self.backend_name = resolve_backend(self.manifest, config.backend, saved_state)  # memory factors differ
        self.guard = self._plan_memory()  # refuses an impossible budget before anything is loaded
        if self.guard is None:  # glibc's treatment of freed memory (memory.py): speed, or a peak that is predictable
            reuse_freed_memory()
        else:
            predictable_memory()
        self.warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 20)
        self.data_sha = sha256_file(config.data) if Path(config.data).is_file() else None
        self.train_set, self.train_pool, self.eval_set, self.eval_pool = self._load_data()
        self.start_step, self.totals = 0, {"samples": 0, "tokens": 0, "wall_s": 0.0}
        self._resumed_hook_state: dict = {}
        state_path = self._prepare_run_dir(resume)
        self.backend: TrainingBackend = open_backend(self.artifact, self.manifest, state_path, config.threads,
                                                     self.backend_name, config.execution_provider)
        self.hooks = build_hooks(config, self.manifest, self.backend)
        self.hooks.load_state(self._resumed_hook_state)
        self._replan_on_measured_rss()

    # -- setup ---------------------------------------------------------------------------------
    def _plan_memory(self) -> BudgetGuard | None:
        """With --memory-budget: fix micro-batch and sequence length to the plan; None without one."""
        c = self.config
        if not c.memory_budget:
            return None
        plan = make_plan(self.manifest, parse_budget(c.memory_budget), c.batch_size, self.seq_len,
                         c.memory_margin, c.micro_batch_size, backend=self.backend_name)
        c.micro_batch_size, self.seq_len = plan.micro_batch, plan.seq_len
        self._parts: list[Batch] = []
        return BudgetGuard(self.manifest, plan)

    def _replan_on_measured_rss(self) -> None:
        """Data and session are loaded: fold what RSS exceeds the prediction by into the plan (re-cut data if needed).

        The overhead is recorded in metrics.jsonl with or without a budget."""
        overhead = max(0, current_rss() - loaded_bytes(self.manifest, self.backend_name))
        self._memory_note = {"memory_overhead_mb": round(overhead / MB, 1)}
        if self.guard is None:
            return
        old, c = self.guard.plan, self.config
        plan = make_plan(self.manifest, old.budget, c.batch_size, old.requested_seq_len, old.margin,
                         c.micro_batch_size, overhead, self.backend_name)
        if (plan.micro_batch, plan.seq_len) != (old.micro_batch, old.seq_len):
            self._memory_note.update(memory_replan={"micro_batch": plan.micro_batch, "max_seq_len": plan.seq_len})
        c.micro_batch_size, self.guard.plan = plan.micro_batch, plan
        if plan.seq_len < self.seq_len:
            self.seq_len = plan.seq_len
            self.train_set, self.train_pool, self.eval_set, self.eval_pool = self._load_data()

    def _memory_record(self, peak_before: int) -> dict:
        """Memory notes and budget adaptations of the last step, for metrics.jsonl (empty when there were none)."""
        record, self._memory_note = self._memory_note, {}
        if self.guard is None:
            return record
        planned = -(-self.config.batch_size // self.guard.plan.micro_batch)
        if len(self._parts) > planned:
            record["memory_split"] = len(self._parts) - planned
        peak = peak_rss()
        if peak > peak_before and self.guard.observe(self._parts, peak):
            record["memory_correction_mb"] = round(self.guard.correction / MB, 1)
        return record

    def _load_data(self):
        from tokenizers import Tokenizer

        m, c = self.manifest, self.config
        tokenizer = Tokenizer.from_file(str(self.artifact / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()

        def tokenize(path: str) -> Tokenized:
            return Tokenized(tokenizer, read_examples(path, m.task, m.labels), m.task, self.seq_len,
                             m.pad_token_id, m.eos_token_id)

        train = tokenize(c.data)
        if c.eval_data:
            held = tokenize(c.eval_data)
            return train, list(range(len(train))), held, list(range(len(held)))
        pool, held_out = split_holdout(len(train), c.eval_fraction, c.seed)
        return train, pool, train, held_out

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        out = self.out
        if resume:
            info, _ = read_run(out)
            if info.get("data_sha256") != self.data_sha:
                raise UserError(f"--data {self.config.data} differs from the data run {out} started with: "
                                "resume with the same file or start a new --out")
            state = out / "checkpoint" / "state"
            if not state.is_file():
                raise UserError(f"{out} has no checkpoint yet: start it again without --resume")
            trainer_state = json.loads((out / "checkpoint" / "trainer.json").read_text())
            self.start_step = trainer_state["step"]
            self.totals = trainer_state["totals"]
            hooks = out / "checkpoint" / HOOKS_FILE
            self._resumed_hook_state = load_file(hooks) if hooks.is_file() else {}
            self._truncate_metrics(self.start_step)
            return state
        if (out / RUN_FILE).exists():
            raise UserError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty: choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.artifact / "manifest.json", out / "manifest.json")
        write_run_info(out, {"artifact": str(self.artifact.resolve()), "data": str(Path(self.config.data).resolve()),
                             "data_sha256": self.data_sha, "config": asdict(self.config)})
        return None

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())

    # -- loop ----------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[tuple[Batch, float]]:
        """The step's batch split into micro-batches, each with its share of the step's targets."""
        c = self.config
        batch = self.train_set.batch(batch_indices(self.train_pool, c.batch_size, c.seed, step))
        size = c.micro_batch_size or c.batch_size
        parts = [batch.rows(i, i + size) for i in range(0, c.batch_size, size)]
        if self.guard is not None:  # a long example: split further so the step stays in the budget
            parts = self._parts = [q for p in parts for q in self.guard.split(p)]
        weights = [_targets(p) for p in parts]
        total = sum(weights) or 1
        return [(p, w / total) for p, w in zip(parts, weights)]

    def train_step(self, step: int) -> tuple[float, int, int]:
        """One optimizer step; returns (loss, tokens, samples)."""
        loss, tokens, samples = 0.0, 0, 0
        self.backend.start_step(self.lr(step))
        self.hooks.before_step(step)
        for part, share in self.micro_batches(step):
            if share == 0:
                continue
            loss += share * self.backend.forward_backward(part, share)
            tokens += part.tokens
            samples += part.input_ids.shape[0]
        self.hooks.after_backward(step)
        self.backend.optimizer_step()
        self.hooks.after_update(step)
        return loss, tokens, samples

    def lr(self, step: int) -> float:
        return learning_rate(step, self.config.steps, self.config.lr, self.warmup)

    def evaluate(self) -> float | None:
        """Mean held-out loss over up to ``eval_batches`` batches (target-weighted)."""
        if not self.eval_pool:
            return None
        size = self.config.micro_batch_size or self.config.batch_size
        total, weight = 0.0, 0
        for i in range(0, min(len(self.eval_pool), size * self.config.eval_batches), size):
            batch = self.eval_set.batch(self.eval_pool[i : i + size])
            w = _targets(batch)
            total += w * self.backend.eval_loss(batch)
            weight += w
        return total / weight if weight else None

    def checkpoint(self, step: int, last_loss: float, eval_loss: float | None) -> None:
        """Atomically replace checkpoint/, then adapter/ and summary.json."""
        with atomic_directory(self.out / "checkpoint", overwrite=True) as tmp:
            self.backend.save_state(tmp / "state")
            atomic_write_json(tmp / "trainer.json", {"step": step, "totals": self.totals})
            hook_state = self.hooks.state()
            if hook_state:
                atomic_write_bytes(tmp / HOOKS_FILE, save(hook_state))
        write_adapter(self.out, self.manifest, self.backend.trainable(),
                      {"steps": step} | ({NESTED_KEY: True} if self.config.nested_ranks else {}))
        warm = self.artifact / WARM_START_FILE
        atomic_write_json(self.out / "summary.json", {
            "steps": step, "samples": self.totals["samples"], "tokens": self.totals["tokens"],
            "final_loss": last_loss, "eval_loss": eval_loss, "peak_rss_mb": round(peak_rss() / MB, 1),
            "tokens_per_s": round(self.totals["tokens"] / max(self.totals["wall_s"], 1e-9), 1),
            "wall_s": round(self.totals["wall_s"], 2), "huge_pages": huge_pages_active(),
            "parent": json.loads(warm.read_text()) if warm.is_file() else None,
        })

    def run(self) -> dict:
        """Train to ``config.steps``; returns the summary."""
        from tqdm import tqdm

        c = self.config
        metrics = (self.out / "metrics.jsonl").open("a")
        bar = tqdm(total=c.steps, initial=self.start_step, disable=not self.show_progress, file=sys.stderr,
                   unit="step", dynamic_ncols=True)
        loss, eval_loss = float("nan"), None
        try:
            for step in range(self.start_step, c.steps):
                start = time.perf_counter()
                peak_before = peak_rss()
                loss, tokens, samples = self.train_step(step)
                elapsed = time.perf_counter() - start
                self.totals["samples"] += samples
                self.totals["tokens"] += tokens
                self.totals["wall_s"] += elapsed
                record = {"step": step, "loss": round(loss, 6), "lr": self.lr(step),
                          "tokens_per_s": round(tokens / elapsed, 1), "rss_mb": round(current_rss() / MB, 1),
                          "peak_rss_mb": round(peak_rss() / MB, 1), **self.hooks.metrics(step)}
                record.update(self._memory_record(peak_before))
                done = step + 1
                if c.eval_every and (done % c.eval_every == 0 or done == c.steps):
                    eval_loss = self.evaluate()
                    record["eval_loss"] = eval_loss
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                peak=f"{record['peak_rss_mb']:.0f}MB", refresh=False)
                bar.update(1)
                if (c.checkpoint_every and done % c.checkpoint_every == 0) or done == c.steps:
                    self.checkpoint(done, loss, eval_loss)
        finally:
            bar.close()
            metrics.close()
        return json.loads((self.out / "summary.json").read_text())


def _targets(batch: Batch) -> int:
    """Number of loss targets in a batch (tokens with a label, or rows for classification)."""
    if batch.labels.ndim == 2:
        return int((batch.labels != IGNORE_INDEX).sum())
    return int(batch.labels.shape[0])
