"""Unit tests of the device's data path and learning-rate schedule: numpy and tokenizers only, no export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import toy

from edge_peft.artifact.manifest import IGNORE_INDEX
from edge_peft.device.data import Batch, Example, Tokenized, batch_indices, read_examples, split_holdout
from edge_peft.device.schedule import learning_rate
from edge_peft.errors import UserError

LM, CLS = "causal-lm", "sequence-classification"
LABELS = ["negative", "positive"]


def one_line_error(call, *args) -> str:
    with pytest.raises(UserError) as caught:
        call(*args)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


# --- read_examples ---------------------------------------------------------------------------------------


def test_jsonl_causal_lm_rows_skip_blank_lines(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "the cat sat"}\n\n   \n{"text": "we saw a film", "label": "ignored"}\n')
    assert read_examples(path, LM, []) == [Example("the cat sat"), Example("we saw a film")]


def test_jsonl_classifier_labels_by_name_or_index(tmp_path):
    path = tmp_path / "cls.jsonl"
    path.write_text('{"text": "good day", "label": "positive"}\n{"text": "bad day", "label": 0}\n')
    assert read_examples(path, CLS, LABELS) == [Example("good day", 1), Example("bad day", 0)]


@pytest.mark.parametrize("lines,line,expect", [
    (['{"text": "ok", "label": "positive"}', '{"text": broken'], 2, "malformed JSON"),
    (['["text", "a list"]'], 1, 'expected an object with a string "text" field'),
    (['{"text": "ok", "label": "positive"}', "", '{"text": 5, "label": "positive"}'], 3,
     'expected an object with a string "text" field'),
    (['{"text": "ok", "label": "neutral"}'], 1, "label 'neutral' is not one of the model's classes (negative, positive)"),
    (['{"text": "ok", "label": 2}'], 1, "label 2 is not one of the model's classes"),
    (['{"text": "ok", "label": true}'], 1, "label True is not one of the model's classes"),
    (['{"text": "ok"}'], 1, "label None is not one of the model's classes"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, line, expect):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = one_line_error(read_examples, path, CLS, LABELS)
    assert message.startswith(f"{path}:{line}: ") and expect in message, message


def test_txt_blocks_are_examples_for_a_causal_lm(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first block\nstill first\n\n\n  second block  \n\n")
    assert read_examples(path, LM, []) == [Example("first block\nstill first"), Example("second block")]


@pytest.mark.parametrize("name,content,task,expect", [
    ("notes.txt", "some text", CLS, "a classifier needs labels"),
    ("data.csv", "text,label", LM, "has suffix '.csv': use .jsonl or .txt"),
    ("empty.jsonl", "\n  \n", LM, "holds no examples"),
    ("empty.txt", "\n\n\n", LM, "holds no examples"),
    ("latin.txt", b"caf\xe9 au lait", LM, "is not UTF-8 text"),
])
def test_unusable_files_are_refused(tmp_path, name, content, task, expect):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = one_line_error(read_examples, path, task, LABELS)
    assert str(path) in message and expect in message, message


def test_missing_file_is_refused(tmp_path):
    message = one_line_error(read_examples, tmp_path / "nope.jsonl", LM, [])
    assert "nope.jsonl does not exist" in message and "--data" in message


# --- Tokenized and Batch ---------------------------------------------------------------------------------


def word_tokenizer(classifier: bool):
    """The toy models' word-level vocabulary as a bare ``tokenizers.Tokenizer`` (no transformers)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(toy.vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if classifier:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok, vocab


def test_causal_windows_and_labels_shifted_by_one():
    tok, vocab = word_tokenizer(classifier=False)
    words = "the cat sat on the mat".split()
    ids = [vocab[w] for w in words] + [vocab["<eos>"]]  # eos appended: 7 tokens
    data = Tokenized(tok, [Example(" ".join(words))], LM, max_seq_len=4, pad_id=0, eos_id=vocab["<eos>"])
    # windows of max_seq_len + 1 tokens starting every max_seq_len: [0:5], [4:7]
    assert data.sequences == [ids[0:5], ids[4:7]]
    batch = data.batch([0, 1])
    np.testing.assert_array_equal(batch.input_ids, [ids[0:4], ids[4:6] + [0, 0]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch.labels, [ids[1:5], ids[5:7] + [IGNORE_INDEX, IGNORE_INDEX]])
    assert batch.tokens == 6
    targets = batch.labels[batch.labels != IGNORE_INDEX]
    assert targets.tolist() == ids[1:]  # every next token is predicted exactly once across the windows


def test_eos_is_added_once_and_one_token_documents_are_dropped():
    tok, vocab = word_tokenizer(classifier=False)
    eos = vocab["<eos>"]
    data = Tokenized(tok, [Example("the cat <eos>"), Example("cat")], LM, max_seq_len=8, pad_id=0, eos_id=eos)
    assert data.sequences == [[vocab["the"], vocab["cat"], eos], [vocab["cat"], eos]]
    bare = Tokenized(tok, [Example("cat"), Example("the cat")], LM, max_seq_len=8, pad_id=0, eos_id=None)
    assert bare.sequences == [[vocab["the"], vocab["cat"]]]  # nothing to predict from one token alone


def test_classifier_truncates_keeping_its_special_tokens_and_pads_with_labels_per_row():
    tok, vocab = word_tokenizer(classifier=True)
    examples = [Example("good day film was it", 1), Example("bad", 0)]
    data = Tokenized(tok, examples, CLS, max_seq_len=4, pad_id=vocab["[PAD]"], eos_id=None)
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    assert data.sequences == [[cls, vocab["good"], vocab["day"], sep], [cls, vocab["bad"], sep]]  # cut before [SEP]
    assert data.targets == [1, 0]
    batch = data.batch([1, 0])
    np.testing.assert_array_equal(batch.input_ids, [[cls, vocab["bad"], sep, vocab["[PAD]"]], data.sequences[0]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch.labels, [0, 1])
    assert batch.labels.dtype == np.int64 and batch.input_ids.dtype == np.int64


def test_batch_rows_trim_to_their_longest_example():
    ids = np.arange(15, dtype=np.int64).reshape(3, 5)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=np.int64)
    labels = np.where(mask == 1, ids + 100, IGNORE_INDEX)
    batch = Batch(ids, mask, labels)
    tail = batch.rows(1, 3)
    np.testing.assert_array_equal(tail.input_ids, ids[1:3, :2])
    np.testing.assert_array_equal(tail.attention_mask, mask[1:3, :2])
    np.testing.assert_array_equal(tail.labels, labels[1:3, :2])
    assert batch.rows(1, 2).input_ids.shape == (1, 1) and batch.rows(0, 3).input_ids.shape == (3, 3)
    classifier = Batch(ids, mask, np.array([0, 1, 1]))
    np.testing.assert_array_equal(classifier.rows(0, 2).labels, [0, 1])  # 1-D labels are not trimmed
    empty = Batch(ids[:1], np.zeros((1, 5), dtype=np.int64), labels[:1])
    assert empty.rows(0, 1).input_ids.shape == (1, 1)  # never zero-width


# --- split_holdout and batch_indices ---------------------------------------------------------------------


@pytest.mark.parametrize("n,fraction,n_eval", [(100, 0.1, 10), (10, 0.25, 2), (10, 0.01, 1), (10, 0.0, 0),
                                               (10, 1.0, 9), (1, 0.5, 0), (2, 0.5, 1)])
def test_holdout_split_is_deterministic_disjoint_and_complete(n, fraction, n_eval):
    train, held = split_holdout(n, fraction, seed=3)
    assert (train, held) == split_holdout(n, fraction, seed=3)
    assert len(held) == n_eval and not set(train) & set(held)
    assert sorted(train + held) == list(range(n))
    assert train == sorted(train) and held == sorted(held)


def test_holdout_split_depends_on_the_seed():
    assert split_holdout(100, 0.2, seed=0)[1] != split_holdout(100, 0.2, seed=1)[1]


def test_batch_indices_are_a_pure_function_of_seed_and_step():
    pool = [3, 8, 13, 21, 34, 55, 89, 144]
    first = [batch_indices(pool, 4, seed=5, micro_step=s) for s in range(6)]
    assert first == [batch_indices(list(pool), 4, seed=5, micro_step=s) for s in range(6)]
    assert [batch_indices(pool, 4, seed=5, micro_step=s) for s in (4, 2, 0)] == [first[4], first[2], first[0]]
    assert first != [batch_indices(pool, 4, seed=6, micro_step=s) for s in range(6)]


def test_each_epoch_covers_the_pool_once_in_a_new_order():
    pool = list(range(100, 112))  # 12 examples, batch 4: 3 micro-batches per epoch
    epochs = [[i for s in range(3 * e, 3 * e + 3) for i in batch_indices(pool, 4, 9, s)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == pool
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_uneven_and_small_pools():
    pool = list(range(10))  # batch 4: 2 micro-batches per epoch, 8 distinct examples each epoch
    epoch = batch_indices(pool, 4, 1, 0) + batch_indices(pool, 4, 1, 1)
    assert len(set(epoch)) == 8 and set(epoch) <= set(pool)
    small = [7, 9, 11]  # fewer examples than the batch: each batch wraps around the whole pool
    for step in range(3):
        picks = batch_indices(small, 5, 1, step)
        assert len(picks) == 5 and set(picks) == set(small)


# --- learning-rate schedule ------------------------------------------------------------------------------


def test_warm_up_is_linear_up_to_the_peak():
    rates = [learning_rate(s, total=100, peak=1e-2, warmup=10) for s in range(10)]
    np.testing.assert_allclose(rates, [1e-2 * (s + 1) / 10 for s in range(10)], rtol=1e-12)
    np.testing.assert_allclose(np.diff(rates), 1e-3, rtol=1e-9)
    assert learning_rate(10, 100, 1e-2, 10) == pytest.approx(1e-2)  # decay starts at the peak


def test_cosine_decay_reaches_the_floor_and_stays_there():
    peak, floor = 1e-2, 0.1
    assert learning_rate(100, 100, peak, 10, floor) == pytest.approx(peak * floor)
    assert learning_rate(250, 100, peak, 10, floor) == pytest.approx(peak * floor)
    middle = learning_rate(55, 100, peak, 10, floor)  # halfway through the 90 decay steps
    assert middle == pytest.approx(peak * (floor + (1 - floor) * 0.5))
    quarter = learning_rate(10 + 90 // 4, 100, peak, 10, floor)
    assert quarter == pytest.approx(peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 22 / 90))))
    assert learning_rate(100, 100, peak, 10, floor_ratio=0.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_schedule_is_monotone_after_warm_up(warmup):
    rates = [learning_rate(s, 60, 3e-3, warmup) for s in range(70)]
    assert max(rates) == pytest.approx(3e-3)
    after = rates[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert after[0] > after[-1] and all(r >= 3e-4 - 1e-15 for r in rates)
    if warmup:
        assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup]))
