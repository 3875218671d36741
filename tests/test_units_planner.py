"""Unit tests of the memory planner on a synthetic manifest: budgets parsed, plans that fit, refusals, the guard.

The manifest comes from ``edge_peft.store.testing.make_manifest`` with a realistic memory section (a 40 MB
frozen base, an 8k vocabulary, 256 positions); nothing is exported or loaded.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_peft.device.data import Batch
from edge_peft.device.memory_model import MB, predict
from edge_peft.device.planner import (DEFAULT_MARGIN, MIN_USEFUL_SEQ_LEN, BudgetGuard, make_plan, parse_budget,
                                     plan_first_fit)
from edge_peft.errors import UserError
from edge_peft.store.testing import make_manifest

SEQ = 256


def manifest(quantization: str = "none"):
    m = make_manifest(layers=4, hidden=256, rank=8)
    memory = replace(m.memory, frozen_bytes=40 * MB, quantized_bytes=30 * MB if quantization == "int8" else 0,
                     intermediate_size=1024)
    return replace(m, vocab_size=8000, max_seq_len=SEQ, quantization=quantization, memory=memory)


def needed(m, rows: int, width: int, backend: str = "ort", margin: float = DEFAULT_MARGIN) -> float:
    return predict(m, rows, width, backend).total * (1 + margin)


@pytest.mark.parametrize("text,mb", [("512MB", 512), ("1.5GB", 1536), ("2048K", 2), ("2048kb", 2),
                                     ("1GiB", 1024), (" 256 mb ", 256), ("0.5G", 512), ("300MiB", 300)])
def test_parse_budget_units(text, mb):
    assert parse_budget(text) == mb * MB


@pytest.mark.parametrize("text", ["lots", "-1MB", "0", "0MB", "12XB", "", "MB", "1.2.3GB", "5 TB"])
def test_parse_budget_refuses_what_is_not_a_size(text):
    with pytest.raises(UserError) as caught:
        parse_budget(text)
    assert str(caught.value) == f"--memory-budget {text!r} is not a memory size: write e.g. 512MB or 2GB"


@pytest.mark.parametrize("backend", ["ort", "portable"])
def test_plan_takes_the_largest_micro_batch_that_fits(backend):
    m = manifest()
    budget = int((needed(m, 3, SEQ, backend) + needed(m, 4, SEQ, backend)) / 2)
    plan = make_plan(m, budget, batch_size=8, seq_len=SEQ, backend=backend)
    assert (plan.micro_batch, plan.accumulation, plan.seq_len) == (3, 3, SEQ)
    assert plan.prediction == predict(m, 3, SEQ, backend) and plan.backend == backend
    assert plan.prediction.total * (1 + plan.margin) <= budget
    assert predict(m, 4, SEQ, backend).total * (1 + plan.margin) > budget
    assert plan.describe()[0].startswith(f"memory budget {budget / MB:.0f} MB, safety margin 15%: micro-batch 3 x 3 "
                                         "accumulation = batch 8, max-seq-len 256")


def test_ample_budget_keeps_the_batch_and_micro_batch_caps_it():
    m = manifest()
    plan = make_plan(m, 4096 * MB, batch_size=8, seq_len=SEQ, backend="ort")
    assert (plan.micro_batch, plan.accumulation, plan.seq_len) == (8, 1, SEQ)
    capped = make_plan(m, 4096 * MB, batch_size=8, seq_len=SEQ, backend="ort", micro_batch=3)
    assert (capped.micro_batch, capped.accumulation) == (3, 3)


def test_margin_and_overhead_count_against_the_budget():
    m = manifest()
    budget = int(needed(m, 4, SEQ) + 1)
    assert make_plan(m, budget, 8, SEQ, "ort").micro_batch == 4
    assert make_plan(m, budget, 8, SEQ, "ort", margin=0.5).micro_batch < 4
    tight = make_plan(m, budget, 8, SEQ, "ort", overhead=20 * MB)
    assert tight.micro_batch < 4 and (tight.prediction.total + 20 * MB) * 1.15 <= budget


def test_plan_cuts_the_sequence_when_one_row_does_not_fit():
    m = manifest("int8")  # an fp32 base's step sits under its workspace floor at these lengths: no slope to cut on
    budget = int((needed(m, 1, 64) + needed(m, 1, 128)) / 2)
    plan = make_plan(m, budget, batch_size=8, seq_len=SEQ, backend="ort")
    assert plan.micro_batch == 1 and plan.accumulation == 8
    assert 64 <= plan.seq_len < 128
    assert needed(m, 1, plan.seq_len) <= budget < needed(m, 1, plan.seq_len + 1)  # the longest that fits
    assert "(cut from 256)" in plan.describe()[0]


def test_a_budget_picks_the_first_backend_that_keeps_the_sequence():
    m = replace(manifest("int8"), vocab_size=32000)  # full logits: the backends' logit factors differ
    need = {b: needed(m, 1, SEQ, b) for b in ("ort", "portable")}
    costly, cheap = sorted(need, key=need.get, reverse=True)
    assert need[costly] > need[cheap] + 20 * MB
    preferred = [costly, cheap]
    roomy = plan_first_fit(m, int(need[costly]) + MB, batch_size=8, seq_len=SEQ, backends=preferred)
    assert roomy.backend == costly and roomy.seq_len == SEQ  # the preferred one, when it fits
    between = int((need[costly] + need[cheap]) / 2)
    chosen = plan_first_fit(m, between, batch_size=8, seq_len=SEQ, backends=preferred)
    assert chosen.backend == cheap and chosen.seq_len == SEQ  # the preferred one would have cut the sequence
    assert make_plan(m, between, 8, SEQ, costly).seq_len < SEQ
    assert plan_first_fit(m, between, 8, SEQ, [costly]).backend == costly  # a named backend is kept
    floor = min(needed(m, 1, MIN_USEFUL_SEQ_LEN, b) for b in preferred)
    with pytest.raises(UserError, match="cannot be met") as caught:
        plan_first_fit(m, int(floor) - MB, 8, SEQ, preferred)
    assert str(caught.value).endswith(f"at least {floor / MB:.0f}MB")  # what the cheaper backend needs


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_impossible_budget_is_refused_in_one_line_with_the_fix(quantization):
    m = manifest(quantization)
    floor = needed(m, 1, MIN_USEFUL_SEQ_LEN)
    make_plan(m, int(floor) + 1, 8, SEQ, "ort")  # just enough: micro-batch 1 at the shortest useful length
    budget = int(floor) - MB
    with pytest.raises(UserError) as caught:
        make_plan(m, budget, batch_size=8, seq_len=SEQ, backend="ort")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--memory-budget {budget / MB:.0f} MB cannot be met: micro-batch 1 at 32 tokens needs "
                              f"{floor / MB:.0f} MB with the 15% margin (")
    assert message.endswith(f"a --memory-budget of at least {floor / MB:.0f}MB")
    assert ("--quantize int8 at export" in message) == (quantization == "none")


def test_short_sequences_are_planned_at_their_own_length():
    m = manifest()
    plan = make_plan(m, int(needed(m, 1, 16)) + 1, batch_size=4, seq_len=16, backend="ort")
    assert plan.seq_len == 16 and plan.requested_seq_len == 16 and "cut from" not in plan.describe()[0]


def guarded(rows_fit: int):
    """A guard whose plan fits exactly ``rows_fit`` rows of 256 tokens."""
    m = manifest()
    budget = int((needed(m, rows_fit, SEQ) + needed(m, rows_fit + 1, SEQ)) / 2)
    plan = make_plan(m, budget, batch_size=8, seq_len=SEQ, backend="ort")
    assert plan.micro_batch == rows_fit
    return BudgetGuard(m, plan)


def full_batch(rows: int, lengths=None) -> Batch:
    lengths = lengths or [SEQ] * rows
    mask = np.array([[1] * n + [0] * (SEQ - n) for n in lengths], dtype=np.int64)
    ids = np.arange(rows * SEQ, dtype=np.int64).reshape(rows, SEQ) * mask
    return Batch(ids, mask, np.where(mask == 1, ids, -100))


def test_guard_keeps_a_batch_that_fits():
    guard = guarded(3)
    batch = full_batch(3)
    assert guard.fits(batch) and guard.split(batch)[0] is batch and len(guard.split(batch)) == 1
    assert not guard.fits(full_batch(4))


def test_guard_halves_until_every_part_fits():
    guard = guarded(3)
    batch = full_batch(8)
    parts = guard.split(batch)
    assert [p.input_ids.shape[0] for p in parts] == [2, 2, 2, 2]  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    assert all(guard.fits(p) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p.input_ids for p in parts]), batch.input_ids)
    odd = guard.split(full_batch(5))
    assert [p.input_ids.shape[0] for p in odd] == [3, 2]


def test_guard_parts_are_trimmed_and_short_rows_fit_together():
    guard = guarded(3)
    lengths = [256, 250, 240, 200, 20, 10, 10, 5]
    parts = guard.split(full_batch(8, lengths))
    assert [p.input_ids.shape for p in parts] == [(2, 256), (2, 240), (4, 20)]  # the short half fits whole
    assert sum(p.tokens for p in parts) == sum(lengths)


def test_guard_learns_from_the_measured_peak():
    guard = guarded(3)
    parts = [full_batch(2), full_batch(1)]
    predicted = predict(guard.manifest, 2, SEQ, "ort").total
    assert guard.observe(parts, predicted - MB) is False and guard.correction == 0
    assert guard.observe(parts, predicted + 5 * MB) is True and guard.correction == 5 * MB
    assert guard.observe(parts, predicted + 4 * MB) is False and guard.correction == 5 * MB
    guard.correction = 10**12  # measured far above prediction: nothing fits any more but single rows
    assert [p.input_ids.shape[0] for p in guard.split(full_batch(4))] == [1, 1, 1, 1]


def test_parse_budget_refuses_a_bare_number():
    with pytest.raises(UserError, match=r"--memory-budget '512' has no unit: write 512MB or 512GB"):
        parse_budget("512")


def test_the_portable_backend_counts_only_the_frozen_bytes_its_step_reads():
    """An ORT graph may hold a tied int8 head twice; the portable step reads it once (``step_frozen_bytes``), and
    only the portable prediction's weights term shrinks, by the load factor times the bytes it does not read."""
    from edge_peft.backends import memory_factors

    m = manifest("int8")
    read = replace(m, memory=replace(m.memory, step_frozen_bytes=32 * MB))
    for backend in ("ort", "portable"):
        full, less = predict(m, 2, SEQ, backend), predict(read, 2, SEQ, backend)
        saved = full.weights - less.weights
        expected = memory_factors(backend).weight_load * 8 * MB if backend == "portable" else 0
        assert saved == pytest.approx(expected, abs=1) and full.total - less.total == pytest.approx(saved, abs=2)
