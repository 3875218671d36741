"""Unit tests of adapter tensors: rank channels, compact/expanded ranks, nested prefixes, the variant registry.

numpy only: synthetic manifests and adapters from ``edge_peft.store.testing``, no export.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_peft.adapters.channels import copy_channels, gate, ungate, zero_channels
from edge_peft.adapters.peft_format import complete_tensors
from edge_peft.adapters.ranks import (CHANNELS_KEY, NESTED_KEY, compact, expand, keep_channels, nested_gain,
                                      nested_prefix, surviving_channels)
from edge_peft.artifact.names import a_name, b_name, is_a, is_b, lora_key
from edge_peft.errors import UserError
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.variants import REGISTRY, get_variant, lora_a_from_seed

MODULE = "model.layers.0.self_attn.q_proj"
RANK, IN, OUT = 4, 5, 3


@pytest.fixture
def factors():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(OUT, RANK)).astype(np.float32) + 2  # no zero entries
    a = rng.normal(size=(RANK, IN)).astype(np.float32) + 2
    return b, a


# --- channels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b_name(MODULE), lora_key(MODULE, "B")])
def test_zero_and_copy_channels_work_on_columns_of_b(factors, name):
    b, _ = factors
    chosen = np.array([False, True, False, True])
    zeroed = zero_channels(b, name, chosen)
    assert not zeroed[:, chosen].any()
    np.testing.assert_array_equal(zeroed[:, ~chosen], b[:, ~chosen])
    assert b.all()  # the input is not modified
    copied = copy_channels(zeroed, b * 10, name, chosen)
    np.testing.assert_array_equal(copied[:, chosen], 10 * b[:, chosen])
    np.testing.assert_array_equal(copied[:, ~chosen], b[:, ~chosen])
    assert not zeroed[:, chosen].any()


@pytest.mark.parametrize("name", [a_name(MODULE), lora_key(MODULE, "A")])
def test_zero_and_copy_channels_work_on_rows_of_a(factors, name):
    _, a = factors
    chosen = np.array([True, False, False, True])
    zeroed = zero_channels(a, name, chosen)
    assert not zeroed[chosen, :].any()
    np.testing.assert_array_equal(zeroed[~chosen, :], a[~chosen, :])
    copied = copy_channels(zeroed, -a, name, chosen)
    np.testing.assert_array_equal(copied[chosen, :], -a[chosen, :])
    np.testing.assert_array_equal(copied[~chosen, :], a[~chosen, :])


def test_gate_zeroes_b_columns_and_scales_a_rows(factors):
    b, a = factors
    gains = np.array([2.0, 0.0, 1.0, 0.0], dtype=np.float32)
    gated_b = gate(b, b_name(MODULE), gains)
    np.testing.assert_array_equal(gated_b, b * (gains != 0))  # B is not scaled, only switched off
    gated_a = gate(a, a_name(MODULE), gains)
    np.testing.assert_array_equal(gated_a, a * gains[:, None])
    assert gated_a.dtype == a.dtype


def test_ungate_keeps_gain_zero_channels_and_takes_the_step_elsewhere(factors):
    b, a = factors
    gains = np.array([2.0, 0.0, 1.0, 0.0], dtype=np.float32)
    off = gains == 0
    gated_b, gated_a = gate(b, b_name(MODULE), gains), gate(a, a_name(MODULE), gains)
    stepped_b, stepped_a = gated_b + 0.5, gated_a + 0.25  # the optimizer moved every value, gated ones too
    new_b = ungate(b, gated_b, stepped_b, b_name(MODULE), gains)
    np.testing.assert_array_equal(new_b[:, off], b[:, off])
    np.testing.assert_array_equal(new_b[:, ~off], stepped_b[:, ~off])
    new_a = ungate(a, gated_a, stepped_a, a_name(MODULE), gains)
    np.testing.assert_array_equal(new_a[off, :], a[off, :])
    np.testing.assert_allclose(new_a[~off, :], a[~off, :] + 0.25, rtol=1e-6)  # the change on top of A's own values
    frozen = ungate(a, gated_a, gated_a.copy(), a_name(MODULE), gains)
    np.testing.assert_array_equal(frozen, a)  # a frozen A that did not move is the old A again


# --- ranks -----------------------------------------------------------------------------------------------


def pruned(variant: str, seed: int = 0):
    """A spec and full-rank tensors whose modules keep different channels (dropped ones: zero B columns)."""
    spec = make_manifest(layers=2, hidden=16, rank=4, variant=variant).adapter
    tensors = random_tensors(spec, np.random.default_rng(seed))
    dropped = {0: [1, 3], 1: [0], 2: [], 3: [0, 1, 2]}
    for i, m in enumerate(spec.modules):
        tensors[lora_key(m.name, "B")][:, dropped[i]] = 0
    return spec, tensors, dropped


@pytest.mark.parametrize("variant", ["lora-fa", "lora"])
def test_compact_then_expand_round_trips(variant):
    spec, tensors, dropped = pruned(variant)
    channels = surviving_channels(spec, tensors)
    assert [channels[m.name] for m in spec.modules] == [[0, 2], [1, 2, 3], [0, 1, 2, 3], [3]]
    small, pattern = compact(spec, tensors, channels)
    assert pattern == {m.name: len(channels[m.name]) for m in spec.modules}
    for m in spec.modules:
        kept = channels[m.name]
        assert small[lora_key(m.name, "B")].shape == (m.out_features, len(kept))
        np.testing.assert_array_equal(small[lora_key(m.name, "A")], tensors[lora_key(m.name, "A")][kept, :])
    full = complete_tensors(spec, expand(spec, small, channels, "test adapter"))
    assert full.keys() == tensors.keys()
    for m in spec.modules:
        key_a, key_b = lora_key(m.name, "A"), lora_key(m.name, "B")
        np.testing.assert_array_equal(full[key_b], tensors[key_b])  # dropped channels come back as zero columns
        np.testing.assert_array_equal(full[key_b] @ full[key_a], tensors[key_b] @ tensors[key_a])
        if variant == "lora-fa":  # the seeded A is regenerated whole, bit for bit
            np.testing.assert_array_equal(full[key_a], tensors[key_a])
        else:  # a trained A keeps its surviving rows; dropped rows (zero B columns) come back as zeros
            kept = channels[m.name]
            np.testing.assert_array_equal(full[key_a][kept], tensors[key_a][kept])
            assert not np.delete(full[key_a], kept, axis=0).any()


def test_keep_channels_leaves_a_full_adapter_alone_and_compacts_otherwise():
    spec, tensors, _ = pruned("lora-fa")
    everything = {m.name: list(range(spec.rank)) for m in spec.modules}
    same, meta, pattern = keep_channels(spec, tensors, everything, {"a": 1, CHANNELS_KEY: {"stale": [0]}})
    assert pattern is None and meta == {"a": 1} and same.keys() == tensors.keys()
    channels = surviving_channels(spec, tensors)
    small, meta, pattern = keep_channels(spec, tensors, channels, {"a": 1})
    assert meta == {"a": 1, CHANNELS_KEY: channels} and sum(pattern.values()) == 10


def test_expand_refuses_malformed_channels_and_a_foreign_seeded_a():
    spec, tensors, _ = pruned("lora-fa")
    channels = surviving_channels(spec, tensors)
    small, _ = compact(spec, tensors, channels)
    partial = dict(list(channels.items())[:-1])
    with pytest.raises(UserError, match="malformed rank channels metadata"):
        expand(spec, small, partial, "f.safetensors")
    repeated = {**channels, spec.modules[0].name: [0, 0]}
    with pytest.raises(UserError, match="must be distinct integers in 0..3"):
        expand(spec, small, repeated, "f.safetensors")
    foreign = dict(small)
    key = lora_key(spec.modules[0].name, "A")
    foreign[key] = foreign[key] + 1
    with pytest.raises(UserError, match="is not the seeded LoRA-FA A of this base"):
        expand(spec, foreign, channels, "f.safetensors")


def test_surviving_channels_keeps_channel_zero_of_an_all_zero_module():
    spec, tensors, _ = pruned("lora")
    tensors[lora_key(spec.modules[2].name, "B")][:] = 0
    assert surviving_channels(spec, tensors)[spec.modules[2].name] == [0]


def test_nested_gain_is_sqrt_of_rank_over_prefix():
    assert nested_gain(8, 2) == pytest.approx(2.0) and nested_gain(4, 1) == pytest.approx(2.0)
    assert nested_gain(6, 6) == 1.0 and nested_gain(8, 4) == pytest.approx(np.sqrt(2))
    gains = [nested_gain(8, k) for k in range(1, 9)]
    assert all(a > b for a, b in zip(gains, gains[1:]))


def test_nested_prefix_scales_b_and_drops_the_nested_mark():
    spec, tensors, _ = pruned("lora-fa")
    meta = {NESTED_KEY: True, "steps": 5}
    scaled, channels, new_meta = nested_prefix(spec, tensors, meta, 1)
    assert channels == {m.name: [0] for m in spec.modules} and new_meta == {"steps": 5}
    for key, value in tensors.items():
        factor = np.float32(2.0) if is_b(key) else 1  # sqrt(4 / 1)
        np.testing.assert_array_equal(scaled[key], value * factor)
    same, channels, new_meta = nested_prefix(spec, tensors, meta, spec.rank)
    assert new_meta == meta and all(np.array_equal(same[k], v) for k, v in tensors.items())
    assert channels == {m.name: [0, 1, 2, 3] for m in spec.modules}


def test_nested_prefix_refuses_a_non_nested_adapter_and_bad_ranks():
    spec, tensors, _ = pruned("lora")
    with pytest.raises(UserError, match="needs an adapter trained with --nested-ranks") as caught:
        nested_prefix(spec, tensors, {"steps": 5}, 2)
    assert "\n" not in str(caught.value)
    for k in (0, spec.rank + 1):
        with pytest.raises(UserError, match=f"--rank {k} must be between 1 and the exported rank 4"):
            nested_prefix(spec, tensors, {NESTED_KEY: True}, k)


# --- variants --------------------------------------------------------------------------------------------


def test_registry_lists_lora_fa_and_lora():
    assert {"lora-fa", "lora"} <= set(REGISTRY)
    assert all(get_variant(name) is variant and variant.name == name for name, variant in REGISTRY.items())
    assert get_variant("lora-fa").trains_a is False and get_variant("lora").trains_a is True


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_variant_has_consistent_shapes_and_trained_tensors(name):
    variant = REGISTRY[name]
    spec = make_manifest(hidden=16, rank=4, variant=name).adapter
    module = spec.modules[0]
    shapes = variant.tensor_shapes(module)
    assert shapes[a_name(module.name)] == (module.rank, module.in_features)
    assert shapes[b_name(module.name)] == (module.out_features, module.rank)
    trained = variant.trained(module)
    assert set(trained) <= set(shapes) and b_name(module.name) in trained
    assert (a_name(module.name) in trained) == variant.trains_a
    assert set(shapes) - set(trained) == (set() if variant.trains_a else {a_name(module.name)})
    assert variant.is_seeded(a_name(module.name)) == (not variant.trains_a)
    assert not variant.is_seeded(b_name(module.name))
    assert variant.exact_average or variant.inexact_because  # the store says why it will not average
    assert not (variant.exact_average and variant.trains_a)
    assert spec.trainable_values() == sum(int(np.prod(shapes[n])) for n in trained) * len(spec.modules)


def test_lora_fa_completes_a_from_its_seed_and_lora_refuses_a_missing_a():
    for name, trains_a in (("lora-fa", False), ("lora", True)):
        spec = make_manifest(hidden=16, rank=4, variant=name).adapter
        tensors = random_tensors(spec, np.random.default_rng(1))
        without_a = {k: v for k, v in tensors.items() if not is_a(k)}
        if trains_a:
            with pytest.raises(UserError, match="only variants with a frozen A may omit it"):
                spec.kind.complete(spec.modules, without_a)
        else:
            full = spec.kind.complete(spec.modules, without_a)
            m = spec.modules[1]
            np.testing.assert_array_equal(full[lora_key(m.name, "A")], lora_a_from_seed(m.a_seed, m.rank, m.in_features))


def test_unknown_variant_lists_the_registered_ones():
    with pytest.raises(UserError) as caught:
        get_variant("nope")
    message = str(caught.value)
    assert message.startswith("variant 'nope' is not supported") and "\n" not in message
    assert all(name in message for name in REGISTRY)
