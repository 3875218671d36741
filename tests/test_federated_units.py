"""Federated parts without training: int8 updates (bound, refusals) and per-channel averaging of nested prefixes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_peft.adapters import compressed
from edge_peft.artifact.names import lora_key
from edge_peft.errors import UserError
from edge_peft.store.aggregate import AggregationPolicy, Source, aggregate
from edge_peft.store.testing import make_manifest, random_tensors

FEDAVG = AggregationPolicy(min_devices=1, weighting="samples", sample_cap=10**9, clip_norm="off")


def trained(spec, tensors):
    shapes = spec.expected_shapes(with_frozen=False)
    return {k: tensors[k] for k in shapes}, shapes


def test_int8_round_trip_is_within_half_a_step_and_averages_within_the_stated_bound():
    spec = make_manifest(labels=3).adapter
    rng = np.random.default_rng(0)
    adapters = [trained(spec, random_tensors(spec, rng, scale=s))[0] for s in (0.01, 0.05, 0.2)]
    shapes = trained(spec, adapters[0])[1]
    weights = np.array([10, 30, 60]) / 100
    sent = [compressed.encode(a, compressed.INT8) for a in adapters]
    fp32_bytes = compressed.nbytes(compressed.encode(adapters[0], compressed.FP32))
    assert compressed.nbytes(sent[0]) < fp32_bytes / 3.5  # int8 plus a few scales
    decoded = [compressed.decode(shapes, s, compressed.INT8, "device") for s in sent]
    bounds = [compressed.error_bound(shapes, s) for s in sent]
    for a, d, b in zip(adapters, decoded, bounds):
        for k in shapes:
            assert np.all(np.abs(d[k] - a[k]) <= b[k] * (1 + 1e-6) + 1e-12), k
            assert np.abs(d[k] - a[k]).max() > 0 or a[k].ndim == 1  # matrices really were quantized
    for k in shapes:
        exact = sum(w * a[k].astype(np.float64) for w, a in zip(weights, adapters))
        approx = sum(w * d[k].astype(np.float64) for w, d in zip(weights, decoded))
        bound = sum(w * b[k].astype(np.float64) for w, b in zip(weights, bounds))
        assert np.all(np.abs(approx - exact) <= bound * (1 + 1e-6) + 1e-12)
    zero = {k: np.zeros_like(v) for k, v in adapters[0].items()}  # an all-zero channel has scale 0 and decodes to 0
    assert all(np.all(v == 0) for v in compressed.decode(shapes, compressed.encode(zero, "int8"), "int8", "d").values())


@pytest.mark.parametrize("damage, message", [
    (lambda s, b: s.pop(b), "has no tensor"),
    (lambda s, b: s.update({b + ".extra": s[b]}), "unexpected tensor"),
    (lambda s, b: s.update({b: s[b].astype(np.float32)}), "expected int8"),
    (lambda s, b: s.update({b + compressed.SCALE_SUFFIX: np.full_like(s[b + compressed.SCALE_SUFFIX], np.nan)}),
     "NaN or Inf"),
    (lambda s, b: s.update({b + compressed.SCALE_SUFFIX: -s[b + compressed.SCALE_SUFFIX]}), "negative scale"),
    (lambda s, b: s.update({b: (s[b] // 2).astype(np.int8)}), "wrongly scaled"),  # scales 2x too small for the values
    (lambda s, b: s.update({b + compressed.SCALE_SUFFIX: s[b + compressed.SCALE_SUFFIX][:-1]}), "expected float32"),
])
def test_a_corrupted_or_wrongly_scaled_update_is_refused(damage, message):
    spec = make_manifest().adapter
    tensors, shapes = trained(spec, random_tensors(spec, np.random.default_rng(1)))
    sent = compressed.encode(tensors, compressed.INT8)
    damage(sent, lora_key(spec.modules[0].name, "B"))
    with pytest.raises(UserError, match=message):
        compressed.decode(shapes, sent, compressed.INT8, "node 7")


def test_nested_prefixes_average_each_channel_over_the_devices_that_sent_it():
    spec = make_manifest(rank=4).adapter
    rng = np.random.default_rng(2)
    full = [random_tensors(spec, rng) for _ in range(3)]
    ranks, samples = [4, 2, 1], [10, 20, 30]
    for tensors, k in zip(full, ranks):  # a device holding k channels sends zeros beyond them
        for m in spec.modules:
            tensors[lora_key(m.name, "B")][:, k:] = 0
    sources = [Source(f"d{i}", n, lambda t=t: t, {m.name: k for m in spec.modules})
               for i, (t, n, k) in enumerate(zip(full, samples, ranks))]
    merged, _ = aggregate(spec, sources, FEDAVG)
    for m in spec.modules:
        b = lora_key(m.name, "B")
        got = merged[b].astype(np.float64)
        all_three = sum(n * t[b][:, 0] for t, n in zip(full, samples)) / 60
        np.testing.assert_allclose(got[:, 0], all_three, rtol=1e-6, atol=1e-9)  # every device holds channel 0
        np.testing.assert_allclose(got[:, 1], (10 * full[0][b][:, 1] + 20 * full[1][b][:, 1]) / 30, rtol=1e-6,
                                   atol=1e-9)
        np.testing.assert_allclose(got[:, 2:], full[0][b][:, 2:], rtol=1e-6, atol=1e-9)
        # the weight update of the shared channel equals the average of the devices' updates on it
        a = merged[lora_key(m.name, "A")]
        np.testing.assert_allclose(np.outer(got[:, 0], a[0]),
                                   sum(n * np.outer(t[b][:, 0], a[0]) for t, n in zip(full, samples)) / 60,
                                   rtol=1e-6, atol=1e-9)
    with pytest.raises(UserError, match="needs every device to hold every rank channel"):
        aggregate(spec, sources, AggregationPolicy(min_devices=1, method="median", clip_norm="off"))
    bad = sources[:2] + [Source("d9", 5, lambda: full[2], {m.name: 9 for m in spec.modules})]
    with pytest.raises(UserError, match="holds 9 channels"):
        aggregate(spec, bad, FEDAVG)


def test_full_rank_sources_aggregate_as_before():
    spec = make_manifest().adapter
    rng = np.random.default_rng(3)
    full = [random_tensors(spec, rng) for _ in range(3)]
    plain, _ = aggregate(spec, [Source(f"d{i}", 1, lambda t=t: t) for i, t in enumerate(full)], FEDAVG)
    marked, _ = aggregate(spec, [Source(f"d{i}", 1, lambda t=t: t, {m.name: 4 for m in spec.modules})
                                 for i, t in enumerate(full)], FEDAVG)
    for k in plain:
        np.testing.assert_allclose(marked[k], plain[k], rtol=1e-6, atol=1e-9)


def test_the_strategy_average_decodes_int8_prefixes_and_refuses_what_does_not_fit():
    from edge_peft.federated.average import Received, average
    from edge_peft.federated.device_round import trained_shapes

    spec = make_manifest(rank=4, labels=2).adapter
    rng = np.random.default_rng(4)
    ranks, samples = [4, 2, 4], [10, 20, 30]
    full = [trained(spec, random_tensors(spec, rng))[0] for _ in ranks]
    replies = []
    for i, (t, k) in enumerate(zip(full, ranks)):
        shapes = trained_shapes(spec, k)
        sent = {key: np.ascontiguousarray(t[key][:, :k]) if key.endswith("lora_B.weight") else t[key] for key in shapes}
        replies.append(Received(f"node {i}", spec.base_fingerprint, "int8", k, samples[i],
                                compressed.encode(sent, "int8")))
    alien = Received("node 9", "sha256:" + "0" * 64, "fp32", 4, 5, compressed.encode(full[0], "fp32"))
    broken = compressed.encode(full[1], "int8")
    b0 = lora_key(spec.modules[0].name, "B")
    broken[b0 + compressed.SCALE_SUFFIX] = broken[b0 + compressed.SCALE_SUFFIX] * 0.5  # scales that do not fit
    broken[b0] = (broken[b0] // 2).astype(np.int8)
    damaged = Received("node 8", spec.base_fingerprint, "int8", 4, 5, broken)
    merged, report, refused = average(spec, replies + [alien, damaged])
    assert report["devices"] == 3 and len(refused) == 2
    assert "node 9 sent an adapter for base" in refused[0] and "node 8" in refused[1]
    for m in spec.modules:
        b = lora_key(m.name, "B")
        exact0 = sum(n * t[b][:, 0] for t, n in zip(full, samples)) / 60  # every node sent channel 0
        exact3 = (10 * full[0][b][:, 3] + 30 * full[2][b][:, 3]) / 40  # node 1 sent 2 channels
        bound = 0.5 * max(np.abs(t[b]).max() / 127 for t in full)
        assert np.abs(merged[b][:, 0] - exact0).max() <= bound and np.abs(merged[b][:, 3] - exact3).max() <= bound
    with pytest.raises(UserError, match="no update fits"):
        average(spec, [alien])


def test_topk_deltas_round_trip_within_the_bound_and_refuse_what_does_not_fit():
    from edge_peft.adapters import sparse

    spec = make_manifest(labels=3).adapter
    rng = np.random.default_rng(6)
    start, shapes = trained(spec, random_tensors(spec, rng))
    now = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in start.items()}
    sent = sparse.encode_delta(now, start, 0.1)
    dense = compressed.nbytes(compressed.encode(now, "fp32"))
    assert compressed.nbytes(sent) < dense / 7  # a tenth of the entries at 1 byte + a 4-byte index
    back = sparse.decode_delta(shapes, sent, start, 0.1, "node 3")
    bound = sparse.error_bound(shapes, sent)
    for k in shapes:
        assert np.abs(back[k] - now[k]).max() <= bound[k] * (1 + 1e-5) + 1e-6, k
    b = lora_key(spec.modules[0].name, "B")
    for damage, message in [
        (lambda s: s.update({b + sparse.INDEX_SUFFIX: s[b + sparse.INDEX_SUFFIX][::-1].copy()}), "increasing"),
        (lambda s: s.update({b + sparse.INDEX_SUFFIX: s[b + sparse.INDEX_SUFFIX] + np.uint16(60000)}),
         "inside the matrix"),
        (lambda s: s.update({b: (s[b] // 2).astype(np.int8)}), "does not belong"),
        (lambda s: s.update({b: np.concatenate([s[b], s[b]])}), "expected int8"),  # more entries than top-k allows
    ]:
        broken = {k: v.copy() for k, v in sent.items()}
        damage(broken)
        with pytest.raises(UserError, match=message):
            sparse.decode_delta(shapes, broken, start, 0.1, "node 3")


def test_the_strategy_average_adds_topk_deltas_to_the_round_s_global():
    from edge_peft.adapters import sparse
    from edge_peft.federated.average import Received, average
    from edge_peft.federated.device_round import trained_shapes

    spec = make_manifest(rank=4).adapter
    rng = np.random.default_rng(7)
    start, _ = trained(spec, random_tensors(spec, rng))
    devices = [{k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in start.items()}
               for _ in range(2)]
    replies = [Received(f"node {i}", spec.base_fingerprint, sparse.TOPK, 4, 10, sparse.encode_delta(d, start, 1.0))
               for i, d in enumerate(devices)]  # every entry sent: only int8 rounding remains
    merged, _, refused = average(spec, replies, reference=start, topk=1.0)
    assert not refused
    bounds = [sparse.error_bound(trained_shapes(spec), r.tensors) for r in replies]
    for k in start:
        gap = np.abs(merged[k] - (devices[0][k] + devices[1][k]) / 2).max()
        assert gap <= (bounds[0][k] + bounds[1][k]) / 2 * (1 + 1e-5) + 1e-7, k
    with pytest.raises(UserError, match="no global version"):
        average(spec, replies)
