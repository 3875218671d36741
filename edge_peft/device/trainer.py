"""A training run: the collaborators of the loop (``loop.train``) composed for one run directory.

``open_run`` loads and checks everything before the first step (manifest, backend, memory plan, data,
step hooks) and refuses an impossible budget before the model loads; ``TrainingRun.run`` trains.
The options (``TrainConfig``) are recorded as given; the memory plan is recorded beside them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters.ranks import NESTED_KEY
from ..artifact.files import CHECKPOINT, CHECKPOINT_STATE, RUN_INFO, SUMMARY, TOKENIZER
from ..artifact.manifest import Manifest, load_manifest
from ..backends import TrainingBackend, candidates, open_backend
from ..backends.compute import choose_compute, cpu_flags
from ..errors import UserError
from ..fileio import sha256_file
from .budget import MemoryWatch
from .callbacks import Checkpoints, MetricsLog, ProgressBar
from .chat_template import ChatTemplate
from .data import Batch, Tokenized, batch_indices, data_files, read_examples, split_holdout
from .defaults import with_task_defaults
from .hooks import HookFactory, StepHooks, build_hooks
from .loop import Callback, Schedule, targets, train, train_step
from .memory import MB, current_rss, huge_pages_active, peak_rss
from .memory_model import loaded_bytes
from .planner import DEFAULT_MARGIN, BudgetGuard, Plan, make_plan, parse_budget, plan_first_fit
from .privacy import DPSettings, dp_step
from .privacy import settings as dp_settings
from .run_dir import (Totals, create_run, read_checkpoint, read_run, read_summary, recover_checkpoint, start_over,
                      truncate_metrics, warm_start_of, write_adapter, write_checkpoint, write_run_info, write_summary)
from .schedule import learning_rate


@dataclass(frozen=True)
class TrainConfig:
    data: str
    steps: int | None = None  # None: the task's default (defaults.TASK_DEFAULTS), as lr and max_seq_len
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    max_seq_len: int | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.1
    eval_every: int = 50
    eval_batches: int | None = None  # None: the whole held-out set
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
    backend: str = "auto"  # auto | ort | portable (backends.candidates; a budget may pick another carried one)
    execution_provider: str = "CPUExecutionProvider"  # portable backend only; from --device-profile
    compute: str = "auto"  # frozen-base products: auto, fp32 or int8 (backends/compute.py)
    train_on_prompt: bool = False  # prompt/completion and chat data: train on every token, not the answers only
    pack: bool = False  # concatenate short examples into full sequences (data.Tokenized)
    dp_clip: float | None = None  # DP-SGD: bound on each example's gradient norm (device/privacy.py)
    noise_multiplier: float | None = None  # DP-SGD: noise std over dp_clip; or dp_epsilon calibrates it
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    schedule_start: int = 0  # steps of a longer schedule already taken (a federated round continues the federation's)
    schedule_steps: int | None = None  # that schedule's length (None: ``steps``)

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
            (self.eval_batches is None or self.eval_batches > 0,
             f"--eval-batches {self.eval_batches} must be positive (leave it out to score the whole held-out set)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps or self.steps

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.schedule_length // 20)


@dataclass
class RunData:
    """Tokenized training and held-out examples (the held-out pool may be a split of the training file)."""

    train: Tokenized
    train_pool: list[int]
    held: Tokenized
    held_pool: list[int]


def load_data(artifact: Path, manifest: Manifest, config: TrainConfig, seq_len: int) -> RunData:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artifact / TOKENIZER))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    chat = ChatTemplate.load(artifact)

    def tokenize(path: str | Path) -> Tokenized:
        return Tokenized(tokenizer, read_examples(path, manifest.task, manifest.labels), manifest.task, seq_len,
                         manifest.pad_token_id, manifest.eos_token_id, chat, config.train_on_prompt, config.pack)

    train_file, valid_file = data_files(config.data)
    train_set = tokenize(train_file)
    if config.eval_data or valid_file:
        held = tokenize(config.eval_data or valid_file)
        return RunData(train_set, list(range(len(train_set))), held, list(range(len(held))))
    pool, held_out = split_holdout(len(train_set), config.eval_fraction, config.seed)
    return RunData(train_set, pool, train_set, held_out)


@dataclass
class TrainingRun:
    """One run directory and everything its loop needs."""

    artifact: Path
    out: Path
    config: TrainConfig
    manifest: Manifest
    backend: TrainingBackend
    hooks: StepHooks
    data: RunData
    plan: Plan | None = None
    memory_notes: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # what the task's defaults filled in (defaults.with_task_defaults)
    start_step: int = 0
    eval_before: float | None = None  # held-out loss before step 1 (kept across --resume in summary.json)
    totals: Totals = field(default_factory=Totals)
    dp: DPSettings | None = None  # DP-SGD, when asked for

    @property
    def micro_batch_size(self) -> int:
        return self.plan.micro_batch if self.plan else (self.config.micro_batch_size or self.config.batch_size)

    def micro_batches(self, step: int) -> list[Batch]:
        """The step's batch split into micro-batches."""
        c = self.config
        batch = self.data.train.batch(batch_indices(self.data.train_pool, c.batch_size, c.seed, step))
        size = self.micro_batch_size
        return [batch.rows(i, i + size) for i in range(0, c.batch_size, size)]

    def lr(self, step: int) -> float:
        c = self.config
        return learning_rate(c.schedule_start + step, c.schedule_length, c.lr, c.warmup)

    def train_step(self, step: int) -> tuple[float, int, int]:
        """One optimizer step without callbacks (the layer probe's and tests' entry); (loss, tokens, samples)."""
        return train_step(self.backend, self.hooks, self.micro_batches(step), self.lr(step), step)

    def evaluate(self) -> float | None:
        """Mean held-out loss over the held-out set, or its first ``eval_batches`` batches (target-weighted)."""
        pool = self.data.held_pool
        if not pool:
            return None
        size = self.micro_batch_size
        limit = len(pool) if self.config.eval_batches is None else min(len(pool), size * self.config.eval_batches)
        total, weight = 0.0, 0
        for i in range(0, limit, size):
            batch = self.data.held.batch(pool[i : i + size])
            w = targets(batch)
            total += w * self.backend.eval_loss(batch)
            weight += w
        return total / weight if weight else None

    def checkpoint(self, step: int, last_loss: float, eval_loss: float | None) -> None:
        """Atomically replace checkpoint/, then adapter/ and summary.json."""
        write_checkpoint(self.out, self.backend, step, self.totals, self.hooks.state())
        write_adapter(self.out, self.manifest, self.backend.trainable(),
                      {"steps": step} | ({NESTED_KEY: True} if self.config.nested_ranks else {}))
        t = self.totals
        write_summary(self.out, {
            "steps": step, "samples": t.samples, "tokens": t.tokens, "final_loss": last_loss, "eval_loss": eval_loss,
            "eval_loss_before": self.eval_before,
            "peak_rss_mb": round(peak_rss() / MB, 1), "tokens_per_s": round(t.tokens / max(t.wall_s, 1e-9), 1),
            "wall_s": round(t.wall_s, 2), "huge_pages": huge_pages_active(), "parent": warm_start_of(self.artifact),
            **({"dp": self.dp.record(step)} if self.dp else {}),
        })

    def run(self, progress: bool = False, callbacks: list[Callback] | None = None) -> dict:
        """Train to ``config.steps`` (metrics, memory watch, checkpoints; a progress bar if asked); the summary."""
        c = self.config
        standard: list[Callback] = [MemoryWatch(BudgetGuard(self.manifest, self.plan) if self.plan else None,
                                                self.memory_notes),
                                    MetricsLog(self.out)]
        if progress:
            standard.append(ProgressBar(c.steps, self.start_step))
        standard.append(Checkpoints(c.checkpoint_every, c.steps, self.checkpoint))
        if self.start_step == 0 and c.eval_every:
            self.eval_before = self.evaluate()
        for callback in standard + list(callbacks or []):
            callback.on_train_begin(self.start_step, self.eval_before if self.start_step == 0 else None)
        train(self.backend, self.hooks, self.micro_batches, self.evaluate, self.lr, Schedule(c.steps, c.eval_every),
              standard + list(callbacks or []), self.start_step, self.totals,
              dp_step(self.dp.clip, self.dp.noise_multiplier) if self.dp else train_step)
        return read_summary(self.out)


def open_run(artifact: str | Path, config: TrainConfig, out: str | Path, resume: bool = False,
             extra_hooks: dict[str, HookFactory] | None = None) -> TrainingRun:
    """Compose a run: everything is checked and loaded here, an impossible budget refused before the model loads."""
    artifact, out = Path(artifact), Path(out)
    manifest = load_manifest(artifact)
    manifest.verify_files(artifact)
    config, defaults = with_task_defaults(config, manifest.task, manifest.max_seq_len)
    config.validate(manifest)
    if resume and not recover_checkpoint(out):
        read_run(out)  # a one-line error when ``out`` is no run at all
        start_over(out)
        resume = False
    state = out / CHECKPOINT / CHECKPOINT_STATE if resume else None
    backends = candidates(manifest, config.backend, state)
    backend_name = backends[0]
    seq_len = config.max_seq_len or manifest.max_seq_len
    plan = None
    if config.memory_budget:  # each backend has its own memory factors: a budget may pick the second one
        plan = plan_first_fit(manifest, parse_budget(config.memory_budget), config.batch_size, seq_len, backends,
                              config.memory_margin, config.micro_batch_size)
        backend_name, seq_len = plan.backend, plan.seq_len
    train_file = data_files(config.data)[0]
    data_sha = sha256_file(train_file) if train_file.is_file() else None
    data = load_data(artifact, manifest, config, seq_len)
    dp = dp_settings(config.dp_clip, config.noise_multiplier, config.dp_epsilon, config.dp_delta, config.batch_size,
                     len(data.train_pool), config.steps)
    start, totals, hook_state, eval_before = 0, Totals(), {}, None
    compute = choose_compute(config.compute, manifest.computes, backend_name, cpu_flags())
    info = {"artifact": str(artifact.resolve()), "data": str(Path(config.data).resolve()), "data_sha256": data_sha,
            "config": asdict(config), "task_defaults": sorted(defaults), "compute": compute}
    if resume:
        old, _ = read_run(out)
        if old.get("data_sha256") != data_sha:
            raise UserError(f"--data {config.data} differs from the data run {out} started with: "
                            "resume with the same file or start a new --out")
        saved = read_checkpoint(out)
        start, totals, hook_state, state = saved.step, saved.totals, saved.hooks, saved.state
        eval_before = read_summary(out).get("eval_loss_before") if (out / SUMMARY).is_file() else None
        truncate_metrics(out, start)
        info = old
    else:
        if (out / RUN_INFO).exists():
            recover_checkpoint(out)
        create_run(out, artifact, info)
    backend = open_backend(artifact, manifest, state, config.threads, backend_name, config.execution_provider,
                           compute, low_memory=plan is not None)
    hooks = build_hooks(config, manifest.adapter, backend, extra_hooks)
    hooks.load_state(hook_state)
    run = TrainingRun(artifact, out, config, manifest, backend, hooks, data, plan, defaults=defaults,
                      start_step=start, totals=totals, eval_before=eval_before, dp=dp)
    _replan_on_measured_rss(run, backend_name, seq_len)
    if plan is not None:
        write_run_info(out, {**info, "plan": _plan_record(run.plan)})
    return run


def _replan_on_measured_rss(run: TrainingRun, backend_name: str, seq_len: int) -> None:
    """Data and session are loaded: fold what RSS exceeds the prediction by into the plan (re-cut the data if
    the sequence got shorter). The overhead is noted for the first metrics line with or without a budget."""
    overhead = max(0, current_rss() - loaded_bytes(run.manifest, backend_name))
    run.memory_notes = {"memory_overhead_mb": round(overhead / MB, 1)}
    old, c = run.plan, run.config
    if old is None:
        return
    run.plan = make_plan(run.manifest, old.budget, c.batch_size, old.requested_seq_len, backend_name, old.margin,
                         c.micro_batch_size, overhead)
    if (run.plan.micro_batch, run.plan.seq_len) != (old.micro_batch, old.seq_len):
        run.memory_notes["memory_replan"] = {"micro_batch": run.plan.micro_batch, "max_seq_len": run.plan.seq_len}
    if run.plan.seq_len < seq_len:
        run.data = load_data(run.artifact, run.manifest, c, run.plan.seq_len)


def _plan_record(plan: Plan) -> dict:
    """The plan as recorded in run.json."""
    return {"budget_mb": round(plan.budget / MB, 1), "margin": plan.margin, "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation, "max_seq_len": plan.seq_len, "backend": plan.backend,
            "predicted_peak_mb": round(plan.prediction.total / MB, 1), "overhead_mb": round(plan.overhead / MB, 1)}
