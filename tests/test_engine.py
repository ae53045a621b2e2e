"""The TN engine: simplifications fire where they should, caches, strategies."""

from __future__ import annotations

import functools
import importlib
import math
import time

import pytest
import torch
import torch.nn.functional as F

from backpack_tn import functional as tnf
from backpack_tn.tn import (
    cache_stats,
    clear_caches,
    evaluate,
    get_memory_budget,
    index_pattern,
    make_geometry,
    networks,
    set_memory_budget,
)
from backpack_tn.tn.cache import LRUCache
from backpack_tn.tn.evaluate import candidates, force_strategy
from tests.cases import CASES, Case, reference_unfold
from tests.test_functional import close, forward_with_grads, per_sample_grads

# (input size, kernel, stride, padding, dilation) -> expected kind per dimension
STRUCTURES = [
    ((8,), 1, 1, 0, 1, "identity"),
    ((8,), 1, 2, 0, 1, "downsample"),
    ((8,), 1, 3, 0, 2, "downsample"),
    ((8,), 2, 2, 0, 1, "dense"),
    ((8,), 4, 4, 0, 1, "dense"),  # patchify stem
    ((9,), 4, 4, 0, 1, "dense"),  # needs a crop of the last row
    ((8,), 2, 3, 0, 1, "dense"),  # gap between windows, needs zero padding to O·S
    ((9,), 3, 3, 1, 2, "crop"),  # rows 7, 8 are never read
    ((8,), 3, 1, 1, 1, "general"),
    ((8,), 2, 2, 1, 1, "general"),  # padded: not dense
    ((9,), 2, 2, 0, 2, "general"),  # dilated: not dense
    ((8,), 2, 2, 0, 2, "crop"),  # dilated, last row unread
]


@pytest.mark.parametrize(
    "size,kernel,stride,padding,dilation,kind",
    STRUCTURES,
    ids=[f"I{s[0][0]}-k{s[1]}-s{s[2]}-p{s[3]}-d{s[4]}-{s[5]}" for s in STRUCTURES],
)
def test_simplification_fires(size, kernel, stride, padding, dilation, kind):
    geometry = make_geometry(size, kernel, stride, padding, dilation)
    net, *window = networks("weight_vjp", geometry, simplify=True, per_sample=True)
    assert net.kinds == (kind,)
    # a strided-window variant exists where a pattern survives, and for
    # non-overlapping kernels (materialised in GEMM layout instead of a permuted view)
    assert [w.kinds for w in window] == (
        [("window",)] if kind in ("crop", "general", "dense") else []
    )
    patterns = [op for op in net.operands if op.source is None]
    if kind in ("identity", "downsample", "dense"):
        assert patterns == []  # the pattern is eliminated
    else:
        (pattern,) = patterns
        start, stop = pattern.pattern.rows
        assert (stop - start < size[0]) == (kind == "crop")
    if kind in ("identity", "downsample"):
        assert "k1" in net.dropped and "k1" not in net.equation  # size-1 axis gone
    # the unsimplified network always contracts the full pattern
    (plain,) = networks("weight_vjp", geometry, simplify=False, per_sample=True)
    assert plain.kinds == ("general",)
    (pattern,) = [op for op in plain.operands if op.source is None]
    assert pattern.pattern.rows == (0, size[0])


def test_reduce_precontracts_pattern():
    geometry = make_geometry((9, 9), 3, 1, 1)
    net, _window_variant = networks("kfac_input", geometry, approx="reduce")
    patterns = [op for op in net.operands if op.source is None]
    assert patterns and all(op.pattern.reduced for op in patterns)
    assert all(len(op.axes) == 2 for op in patterns)  # Π̄[i, k]: no output axis
    reduced = index_pattern(geometry.dims[0], reduced=True, dtype=torch.float64)
    full = index_pattern(geometry.dims[0], dtype=torch.float64)
    torch.testing.assert_close(reduced, full.sum(1))


def test_describe_uses_named_axes():
    geometry = make_geometry((8, 8), (1, 3), 1, (0, 1))
    net, window = networks("forward", geometry)
    assert window.describe() == "x[n g o1 o2 c k2], w[g d c k2] -> n g d o1 o2"
    assert net.describe() == "x[n g c o1 i2], Π[i2 o2 k2], w[g d c k2] -> n g d o1 o2"


def test_patterns_for_padding_modes():
    """Padded positions point at the input element they copy."""
    for mode, expected_first_row in [
        ("zeros", None),
        ("reflect", 1),
        ("replicate", 0),
        ("circular", 4),
    ]:
        (dim,) = make_geometry((5,), 3, padding=1, padding_mode=mode).dims
        pattern = index_pattern(dim, dtype=torch.float64)  # [i, o, k]
        column = pattern[:, 0, 0]  # output 0 reads padded position -1 at tap 0
        if expected_first_row is None:
            assert column.sum() == 0
        else:
            assert column.nonzero().flatten().tolist() == [expected_first_row]
        assert pattern.sum() == (15 if mode != "zeros" else 13)


def test_pattern_cache_per_device_and_dtype():
    (dim,) = make_geometry((6,), 3, padding=1).dims
    a = index_pattern(dim, dtype=torch.float32)
    assert index_pattern(dim, dtype=torch.float32) is a
    b = index_pattern(dim, dtype=torch.float64)
    assert b.dtype == torch.float64 and b is not a


@pytest.mark.parametrize("strategy", [None, "pattern", "window"])
def test_second_call_hits_every_cache(strategy, monkeypatch):
    ev = importlib.import_module("backpack_tn.tn.evaluate")
    monkeypatch.setattr(ev, "_OVER_CALLS_SECONDS", math.inf)  # decided in one call
    x = torch.randn(4, 3, 10, 11)
    kwargs = dict(stride=2, padding=1, approx="expand")
    caches = ["prepared", "networks"] + (["patterns"] if strategy == "pattern" else [])
    clear_caches()
    with force_strategy(strategy):
        expected = tnf.kfac_input_factor(x, 3, **kwargs)
        first = cache_stats()
        assert all(first[name].misses >= 1 for name in caches)
        # the second call runs the call's plan: the prepared choice, which holds its
        # contraction plan, without the engine's look-ups
        close(tnf.kfac_input_factor(x, 3, **kwargs), expected)
    second = cache_stats()
    for name in caches + ["contractions"]:
        assert second[name].misses == first[name].misses, name  # nothing re-planned
    assert second["call-plans"].hits == first["call-plans"].hits + 1


def test_lru_cache_is_bounded():
    cache = LRUCache("test-bounded", maxsize=2)
    for key in range(5):
        cache.get_or_create(key, lambda k=key: k * 10)
    assert len(cache) == 2
    assert cache.get_or_create(4, lambda: -1) == 40  # most recent kept
    assert cache.get_or_create(0, lambda: -1) == -1  # oldest evicted
    with pytest.raises(ValueError, match="maxsize"):
        LRUCache("test-invalid", maxsize=0)


CHUNK_CASES = [
    c for c in CASES if c.name in ("k3-s2-p1", "k2-s2-patchify", "k3-s1-p1-reflect")
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: c.id)
def test_batch_chunking_matches(case: Case, monkeypatch):
    """A tiny memory budget forces chunking over the batch; results are unchanged."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    execute, chunk_counts = engine._execute, []

    def spy(candidate, tensors, chunks):
        chunk_counts.append(chunks)
        return execute(candidate, tensors, chunks)

    monkeypatch.setattr(engine, "_execute", spy)
    clear_caches()
    module, x, out, grad_out, _, gw = forward_with_grads(case)
    grads = per_sample_grads(case, module, x, grad_out)
    S = torch.randn(2, *out.shape, dtype=out.dtype)
    old = get_memory_budget()
    try:
        set_memory_budget(64)
        per_sample = tnf.weight_vjp(
            x, grad_out, case.kernel_size, per_sample=True, **case.hyper
        )
        summed = tnf.weight_vjp(x, grad_out, case.kernel_size, **case.hyper)
        diag_chunked = tnf.diag_ggn_weight(x, S, case.kernel_size, **case.hyper)
        set_memory_budget(None)
        diag = tnf.diag_ggn_weight(x, S, case.kernel_size, **case.hyper)
    finally:
        set_memory_budget(old)
    close(per_sample, grads)
    close(summed, gw)
    close(diag_chunked, diag)
    assert max(chunk_counts) > 1  # some computation did run in chunks
    with pytest.raises(ValueError, match="memory budget"):
        set_memory_budget(0)


@pytest.mark.parametrize("case", [c for c in CASES if c.dims == 2], ids=lambda c: c.id)
def test_batch_l2_formulations_agree(case: Case):
    """Both batch-L2 formulations (per-sample and Gram) are right."""
    module, x, _, grad_out, _, _ = forward_with_grads(case)
    expected = per_sample_grads(case, module, x, grad_out).pow(2).flatten(1).sum(1)
    geometry = case.geometry()
    g = case.groups
    tensors = {
        "x": x.reshape(x.shape[0], g, -1, *x.shape[2:]),
        "v": grad_out.reshape(grad_out.shape[0], g, -1, *grad_out.shape[2:]),
    }
    formulations = networks("batch_l2", geometry)
    labels = [f.label for f in formulations]
    assert labels[:2] == ["per_sample", "gram"] and len(labels) in (2, 4)
    for net in formulations:
        close(evaluate((net,), tensors).reshape(-1), expected)


def test_gram_form_cheapest_for_small_spatial_size():
    """Few output positions, many channels: the Gram form is estimated cheapest."""

    def cheapest(size, channels_in, channels_out):
        geometry = make_geometry((size, size), 3, 1, 1)
        shapes = {
            "x": (8, 1, channels_in, size, size),
            "v": (8, 1, channels_out, size, size),
        }
        options = candidates(
            networks("batch_l2", geometry), shapes, torch.float32, torch.device("cpu")
        )
        return min(options, key=lambda c: c.cost).network.label

    assert cheapest(4, 256, 256) == "gram"
    assert cheapest(64, 3, 8) == "per_sample"


LAYOUT_CASES = [
    c for c in CASES if c.name in ("k3-s2-p1", "k3-s1-p1-groups2", "k2-s2-patchify")
]


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize(
    "case", [c for c in LAYOUT_CASES if c.dims > 1], ids=lambda c: c.id
)
def test_memory_layouts(case: Case, layout: str):
    module, x, out, grad_out, gx, gw = forward_with_grads(case)
    if layout == "channels_last":
        fmt = torch.channels_last if case.dims == 2 else torch.channels_last_3d
        x_in, g_in = x.to(memory_format=fmt), grad_out.to(memory_format=fmt)
        assert not x_in.is_contiguous()
    else:  # a transposed copy transposed back: same values, permuted strides
        x_in = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        g_in = grad_out.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x_in.is_contiguous()
    w = module.weight.detach()
    close(tnf.conv(x_in, w, module.bias.detach(), **case.hyper), out)
    close(tnf.weight_vjp(x_in, g_in, case.kernel_size, **case.hyper), gw)
    close(tnf.input_vjp(g_in, w, x.shape, **case.hyper), gx)
    close(
        tnf.unfold(
            x_in,
            case.kernel_size,
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            padding_mode=case.padding_mode,
        ),
        reference_unfold(case, x),
    )


FLOAT32_CASES = [
    c
    for c in CASES
    if c.name in ("k3-s2-p1", "k3-s1-p1-groups2", "k1-s2-downsample", "k2-same-reflect")
]


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda c: c.id)
def test_float32(case: Case):
    dtype = torch.float32
    module, x, out, grad_out, gx, gw = forward_with_grads(case, dtype)
    w = module.weight.detach()
    close(tnf.conv(x, w, module.bias.detach(), **case.hyper), out, dtype)
    close(tnf.input_vjp(grad_out, w, x.shape, **case.hyper), gx, dtype)
    close(tnf.weight_vjp(x, grad_out, case.kernel_size, **case.hyper), gw, dtype)
    grads = per_sample_grads(case, module, x, grad_out)
    close(
        tnf.weight_vjp(x, grad_out, case.kernel_size, per_sample=True, **case.hyper),
        grads,
        dtype,
    )
    u = reference_unfold(case, x).reshape(
        x.shape[0], case.groups, -1, out.shape[2:].numel()
    )
    expected = torch.einsum("ngio,ngjo->gij", u, u) / x.shape[0]
    factor = tnf.kfac_input_factor(
        x, case.kernel_size, groups_mode="separate", **case.hyper
    )
    close(factor, expected, dtype)


def test_higher_dimensional_conv():
    """Four spatial dimensions (no torch conv4d): compare with an explicit unfold."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 3, 5, 4, dtype=torch.float64)
    w = torch.randn(3, 2, 2, 1, 3, 2, dtype=torch.float64)
    out = tnf.conv(x, w, stride=(1, 1, 2, 1), padding=(0, 0, 1, 1))
    xp = F.pad(x, (1, 1, 1, 1))
    # explicit loop over output positions
    expected = torch.zeros(2, 3, 3, 3, 3, 5, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                for d in range(5):
                    patch = xp[:, :, a : a + 2, b : b + 1, 2 * c : 2 * c + 3, d : d + 2]
                    expected[:, :, a, b, c, d] = torch.einsum(
                        "ncijkl,ocijkl->no", patch, w
                    )
    close(out, expected)
    unfolded = tnf.unfold(x, (2, 1, 3, 2), stride=(1, 1, 2, 1), padding=(0, 0, 1, 1))
    assert unfolded.shape == (2, 2 * 12, 3 * 3 * 3 * 5)


def test_only_padding_is_read():
    """A dilated kernel that only ever lands on zero padding contributes nothing."""
    x = torch.randn(2, 3, 1, dtype=torch.float64)
    w = torch.randn(4, 3, 2, dtype=torch.float64)
    out = tnf.conv(x, w, padding=2, dilation=3)
    expected = F.conv1d(x, w, padding=2, dilation=3)
    close(out, expected)
    assert expected.abs().max() == 0


def test_taps_candidate_exists_where_applicable():
    geometry = make_geometry((9, 9), 3, 1, 1)
    shapes = {"x": (2, 1, 4, 9, 9), "v": (2, 1, 6, 9, 9)}
    args = (shapes, torch.float64, torch.device("cpu"))
    per_sample = networks("weight_vjp", geometry, per_sample=True)
    assert {c.strategy for c in candidates(per_sample, *args)} == {
        "pattern",
        "window",
        "taps",
    }
    # the input appears twice in a Kronecker factor: no taps
    kfac = networks("kfac_input", geometry, approx="expand")
    assert "taps" not in {
        c.strategy for c in candidates(kfac, {"x": shapes["x"]}, *args[1:])
    }


TUNE_CASES = [c for c in CASES if c.name in ("k3-s2-p1", "k3-s1-p1-reflect")]


@pytest.mark.parametrize("case", TUNE_CASES, ids=lambda c: c.id)
def test_autotune_picks_once_and_stays_correct(case: Case):
    from backpack_tn.tn.evaluate import get_autotune, set_autotune, set_native

    module, x, _, grad_out, _, _ = forward_with_grads(case)
    expected = per_sample_grads(case, module, x, grad_out)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        set_autotune(True, min_flops=0)  # measure even these tiny problems
        set_native(False)  # the engine's candidates only (no torch kernel)
        first = tnf.weight_vjp(
            x, grad_out, case.kernel_size, per_sample=True, **case.hyper
        )
        tuned = cache_stats()
        second = tnf.weight_vjp(
            x, grad_out, case.kernel_size, per_sample=True, **case.hyper
        )
        again = cache_stats()
    finally:
        set_autotune(enabled, threshold)
        set_native(True)
    close(first, expected)
    close(second, expected)
    assert tuned["autotune"].size == 1
    # the second call runs the call's plan (the prepared choice): no measurement
    assert again["autotune"].misses == tuned["autotune"].misses
    assert again["call-plans"].hits == tuned["call-plans"].hits + 1


def test_autotune_choice_is_per_geometry():
    """Strides 1 and 2 over one input share equations and input shapes, not a choice.

    (A stride-1 layer's choice was once reused for the stride-2 layer after it, 4x
    slower there.)
    """
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        set_autotune(True, min_flops=0)
        results = {}
        for stride in (1, 2):
            results[stride] = tnf.kfac_input_factor(
                x, 3, stride=stride, padding=1, simplify=True
            )
        tuned = cache_stats()["autotune"]
    finally:
        set_autotune(enabled, threshold)
    for stride, result in results.items():
        u = F.unfold(x, 3, padding=1, stride=stride)
        close(result, torch.einsum("nio,njo->ij", u, u) / x.shape[0])
    assert tuned.size == 2


def test_choice_survives_a_noisy_spell(monkeypatch):
    """A slow spell at the start must not decide the choice for the whole process.

    The two runs are timed in interleaved rounds, so a spell that slows the first two
    calls hits both; timed one after the other (as once done), the spell made the
    faster run look 16x slower and the slower one won. (One Inception-v3 layer ran
    its per-sample gradients 2.4x slower than unfold for the rest of a benchmark.)
    """
    import importlib

    from backpack_tn.tn.evaluate import fastest

    # the rounds within one call (the spell makes the first run look long enough to
    # be measured over calls otherwise)
    engine = importlib.import_module("backpack_tn.tn.evaluate")
    monkeypatch.setattr(engine, "_OVER_CALLS_SECONDS", math.inf)
    calls = []

    def run(name: str, seconds: float):
        def timed():
            spell = 0.015 if len(calls) < 2 else 0.0
            calls.append(name)
            time.sleep(seconds + spell)
            return torch.tensor(float(len(calls)))

        return timed

    clear_caches()
    runs = [run("fast", 0.001), run("slow", 0.012)]
    result = fastest(("noisy-spell-test",), runs, torch.device("cpu"))
    # a first run tells short problems from long ones; then, in each round, every
    # run is called twice (the second call timed); each run follows the other: no
    # run is always measured first
    assert calls[:9] == ["fast"] * 3 + ["slow"] * 4 + ["fast"] * 2
    # the winner's own result comes back (from its fastest, i.e. a post-spell, run)
    assert calls[int(result) - 1] == "fast" and int(result) > 2
    # the slow run stops after the minimum rounds; the cheap one runs until 20 ms
    assert calls.count("slow") == 4 and calls.count("fast") > 4
    # and the choice is kept
    calls.clear()
    fastest(("noisy-spell-test",), runs, torch.device("cpu"))
    assert calls == ["fast"]


@pytest.mark.parametrize("groups, c_in", [(1, 2), (8, 8)], ids=["narrow", "depthwise"])
def test_per_sample_kernel_choice_is_measured_once(groups, c_in):
    """Few channels per group: TN vs BackPACK's grouped-conv trick, timed once."""
    torch.manual_seed(0)
    x = torch.randn(3, c_in, 10, 9, dtype=torch.float64)
    conv = torch.nn.Conv2d(c_in, 8, 3, stride=2, padding=1, groups=groups).double()
    grad_out = torch.randn_like(conv(x))
    # reference: autograd, one example at a time
    expected = torch.stack(
        [
            torch.autograd.grad(conv(x[n : n + 1]), conv.weight, grad_out[n : n + 1])[0]
            for n in range(3)
        ]
    )
    hyper = dict(stride=2, padding=1, groups=groups)
    clear_caches()
    first = tnf.weight_vjp(x, grad_out, 3, per_sample=True, **hyper)
    chosen = cache_stats()
    second = tnf.weight_vjp(x, grad_out, 3, per_sample=True, **hyper)
    again = cache_stats()
    close(first, expected)
    close(second, expected)
    assert chosen["kernel-choice"].size == 1
    # the second call runs the call's plan, the chosen computation: nothing measured
    assert again["kernel-choice"].misses == chosen["kernel-choice"].misses
    assert again["call-plans"].hits == chosen["call-plans"].hits + 1


def test_no_reference_keeps_inputs_alive():
    """Caches hold patterns and plans only: inputs are freed after a call."""
    import gc
    import weakref

    x = torch.randn(3, 4, 9, 9)
    v = torch.randn(3, 6, 9, 9)
    refs = [weakref.ref(x), weakref.ref(v)]
    for strategy in (None, "pattern", "window", "taps"):
        with force_strategy(strategy):
            tnf.weight_vjp(x, v, 3, padding=1, per_sample=True)
            tnf.kfac_input_factor(x, 3, padding=1)
            tnf.diag_ggn_weight(x, v.unsqueeze(0), 3, padding=1)
    del x, v
    gc.collect()
    assert all(ref() is None for ref in refs)


@pytest.mark.parametrize("case", FLOAT32_CASES[:2], ids=lambda c: c.id)
def test_bfloat16(case: Case):
    """bf16 runs and matches the float64 result to bf16 precision."""
    module, x, out, grad_out, _, gw = forward_with_grads(case)
    w = module.weight.detach()
    bf = torch.bfloat16
    result = tnf.conv(x.to(bf), w.to(bf), **case.hyper)
    assert result.dtype == bf
    torch.testing.assert_close(
        result.double(),
        out - module.bias.detach().reshape(1, -1, *[1] * case.dims),
        rtol=0.05,
        atol=0.05 * out.abs().max().item(),
    )
    grad = tnf.weight_vjp(x.to(bf), grad_out.to(bf), case.kernel_size, **case.hyper)
    torch.testing.assert_close(
        grad.double(), gw, rtol=0.05, atol=0.05 * gw.abs().max().item()
    )


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_native_dispatch_only_where_torch_computes_the_same(padding_mode, monkeypatch):
    """Plain zero-padded conv/VJPs run torch's kernels; everything else stays a TN."""
    import backpack_tn.functional as tnf_module
    from backpack_tn.tn.evaluate import set_native

    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    v = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    hyper = dict(stride=2, padding=1, groups=2, padding_mode=padding_mode)

    def compute():
        return (
            tnf.conv(x, w, **hyper),
            tnf.input_vjp(v, w, x.shape, **hyper),
            tnf.weight_vjp(x, v, (3, 3), **hyper),
        )

    set_native(False)
    try:
        tn_results = compute()
    finally:
        set_native(True)
    calls = []
    real_conv = tnf_module._TORCH_CONV[2]
    monkeypatch.setitem(
        tnf_module._TORCH_CONV, 2, lambda *a, **k: calls.append(1) or real_conv(*a, **k)
    )
    for native, tn in zip(compute(), tn_results):
        torch.testing.assert_close(native, tn, rtol=1e-10, atol=1e-12)
    assert len(calls) == (1 if padding_mode == "zeros" else 0)


@pytest.mark.parametrize("op", ["forward", "input_vjp", "weight_vjp"])
def test_torch_kernel_measured_against_the_tn(op, monkeypatch):
    """Above the autotuning threshold torch's kernel and the TN are both candidates."""
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    hyper = dict(stride=4, groups=2)  # a patchify stem, grouped
    v = torch.randn(2, 6, 2, 2, dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = F.conv2d(x, w, b, **hyper)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), v)
    x, w = x.detach(), w.detach()
    run, expected = {
        "forward": (lambda: tnf.conv(x, w, b, **hyper), out.detach()),
        "input_vjp": (lambda: tnf.input_vjp(v, w, x.shape, **hyper), grad_x),
        "weight_vjp": (lambda: tnf.weight_vjp(x, v, 4, **hyper), grad_w),
    }[op]
    seen = []

    def each(key, runs, device, choose=None):
        results = [r() for r in runs]
        seen.append((key[0], len(results)))
        # the kernel stays unless the TN is clearly faster
        assert choose is not None and choose([1.0, 0.95]) == 0
        close(results[1], results[0])  # the TN equals torch's kernel
        return results[1]

    monkeypatch.setattr(tnf, "fastest", each)
    enabled, threshold = get_autotune()
    try:
        set_autotune(True, min_flops=0)
        close(run(), expected)
        assert seen == [(op, 2)]
        set_autotune(True, min_flops=1e12)  # too small to measure: the kernel
        close(run(), expected)
        set_autotune(False)
        close(run(), expected)
        assert seen == [(op, 2)]
    finally:
        set_autotune(enabled, threshold)


def test_prepared_calls_follow_setting_changes(monkeypatch):
    """A prepared call is per settings: changing one re-decides (and stays exact)."""
    from backpack_tn.tn import windows
    from backpack_tn.tn.evaluate import get_memory_budget, set_memory_budget

    x = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    u = F.unfold(x, 3, padding=1, stride=2)
    expected = torch.einsum("nio,njo->ij", u, u) / x.shape[0]
    unfolds = []
    unfold = F.unfold

    def counted(*args, **kwargs):
        unfolds.append(1)
        return unfold(*args, **kwargs)

    monkeypatch.setattr(windows.F, "unfold", counted)
    budget = get_memory_budget()
    clear_caches()
    results = []
    try:
        with force_strategy("window"):
            for step in ("first", "prepared", "per-tap loop", "chunked"):
                if step == "per-tap loop":
                    monkeypatch.setattr(windows, "SMALL_WINDOW_ELEMENTS_PER_TAP", 0)
                if step == "chunked":
                    set_memory_budget(64)
                before = len(unfolds)
                results.append(tnf.kfac_input_factor(x, 3, stride=2, padding=1))
                assert (len(unfolds) > before) == (step in ("first", "prepared")), step
    finally:
        set_memory_budget(budget)
    assert cache_stats()["call-plans"].hits == 1  # the "prepared" step
    for result in results:
        close(result, expected)


def test_autotune_measures_results_in_their_final_layout(monkeypatch):
    """A candidate whose einsum result is strided pays its copy in the measurement."""
    import importlib

    from backpack_tn.functional import _x_and_output
    from backpack_tn.tn.conv import networks

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    torch.manual_seed(0)
    x, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    geometry, arrange, _ = _x_and_output(x, g, "grad_output", 1, 3, 1, 1, 1, 2, "zeros")
    tensors = arrange(x, g)
    nets = networks("weight_vjp", geometry, True, per_sample=True)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    options = ev.candidates(nets, shapes, x.dtype, x.device)
    raw = [ev._execute(c, tensors, 1) for c in options]
    strided = [i for i, r in enumerate(raw) if not r.is_contiguous()]
    assert strided  # some candidate's einsum result is a strided view
    strided_options = [options[i] for i in strided]
    for candidate, expected in zip(strided_options, (raw[i] for i in strided)):
        result = ev._measured_run(candidate, tensors, shapes)()
        # measured with the copy the caller's reshape makes
        assert result.is_contiguous()
        close(result, expected)
    clear_caches()
    monkeypatch.setattr(ev, "_OVER_CALLS_SECONDS", math.inf)  # within this call
    result, _, pick = ev._tune(
        ("final-layout",), strided_options, 0, tensors, shapes, x.device
    )
    assert result.is_contiguous()  # the first call's result, from whichever ran
    assert pick is not None  # a small problem: chosen on its first call


@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per_sample"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_diag_ggn_candidate_is_right(case: Case, per_sample: bool):
    """Each way of evaluating the diagonal GGN — the one-contraction-per-class loop
    included — equals the reference from explicit per-(class, sample) gradients."""
    import importlib

    from backpack_tn.functional import _x_and_output
    from tests.test_functional import _random_S, _reference_sqrt_ggn

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    _, x, out, *_ = forward_with_grads(case)
    S = _random_S(case, out)
    sqrt = _reference_sqrt_ggn(case, x, S)
    expected = sqrt.pow(2).sum(0) if per_sample else sqrt.pow(2).sum((0, 1))
    geometry, arrange, _ = _x_and_output(x, S, "S", 2, case.kernel_size, **case.hyper)
    tensors = arrange(x, S)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    nets = networks("diag_ggn", geometry, True, per_sample=per_sample)
    options = ev.candidates(nets, shapes, x.dtype, x.device)
    assert "per_class" in {c.executor for c in options}
    for option in options:
        result = ev._execute(option, tensors, 1)
        close(result.reshape(expected.shape), expected)
    # chunked over the batch, too
    per_class = next(c for c in options if c.executor == "per_class")
    close(ev._execute(per_class, tensors, 2).reshape(expected.shape), expected)


def test_per_class_only_for_squared_sums_over_classes():
    """Without the square-sum over ``v`` (square root of the GGN) there is nothing
    to accumulate per class: no such candidate."""
    geometry = make_geometry((9, 9), 3, 1, 1)
    shapes = {"x": (2, 1, 4, 9, 9), "s": (3, 2, 1, 6, 9, 9)}
    args = (shapes, torch.float64, torch.device("cpu"))
    for net, expected in (
        (networks("sqrt_ggn", geometry, True, sum_batch=False), False),
        (networks("diag_ggn", geometry, True, per_sample=False), True),
    ):
        executors = {c.executor for c in candidates(net, *args)}
        assert ("per_class" in executors) is expected


@pytest.mark.parametrize("classes", [1, 3], ids=["V1", "V3"])
def test_per_class_strategy_through_the_functional_api(classes: int):
    """Forced, the per-class executor serves ``diag_ggn_weight`` — also for an ``S``
    stored sample-major (a strided view); with one class it is not offered and the
    others run."""
    from tests.test_functional import _random_S, _reference_sqrt_ggn

    case = next(c for c in CASES if c.dims == 2 and c.name == "k3-s2-p1")
    _, x, out, *_ = forward_with_grads(case)
    S = _random_S(case, out, classes)
    sample_major = S.transpose(0, 1).contiguous().transpose(0, 1)
    assert classes == 1 or not sample_major.is_contiguous()
    sqrt = _reference_sqrt_ggn(case, x, S)
    for per_sample in (False, True):
        expected = sqrt.pow(2).sum(0) if per_sample else sqrt.pow(2).sum((0, 1))
        with force_strategy("per_class"):
            for factor in (S, sample_major):
                result = tnf.diag_ggn_weight(
                    x, factor, case.kernel_size, per_sample=per_sample, **case.hyper
                )
                close(result, expected)


@pytest.mark.parametrize(
    "times, memory, expected",
    [
        ([1.0, 1.05], [100, 50], 1),  # tied, half the memory: the leaner one
        ([1.0, 1.2], [100, 50], 0),  # 20 % slower: not a tie, the fastest
        ([1.0, 1.05], [100, 90], 0),  # tied but saves only 10 %: the fastest
        ([1.0, 1.08, 1.02], [100, 20, 60], 1),  # the leanest of the tied ones
        ([1.1, 1.0, 1.5], [10, 100, 1], 0),  # the slower one, 10 % slower, tied
        ([2.0, 1.0], [1, 100], 1),  # no memory saving buys a 2x slowdown
    ],
    ids=["tie-lean", "slower", "small-saving", "three", "slower-first", "2x"],
)
def test_prefer_memory_rule(times, memory, expected):
    from backpack_tn.tn.evaluate import prefer_memory

    assert prefer_memory(times, memory, tie=0.1, saving=0.75) == expected


class FakeClock:
    """``time.perf_counter`` stand-in: runs advance it by their nominal duration."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def fake_runs(clock: FakeClock, durations: dict, calls: list) -> list:
    """Zero-argument runs that take ``durations[name]`` on the fake clock."""

    def run(name: str, seconds: float):
        def timed():
            calls.append(name)
            clock.now += seconds
            return torch.tensor(float(len(calls)))

        return timed

    return [run(name, seconds) for name, seconds in durations.items()]


def cold_runs(clock: FakeClock, durations: dict, calls: list) -> list:
    """Like :func:`fake_runs`, with ``durations[name] = (first run, later runs)``."""

    def run(name: str, cold: float, warm: float):
        def timed():
            clock.now += cold if name not in calls else warm
            calls.append(name)
            return torch.tensor(float(len(calls)))

        return timed

    return [run(name, *seconds) for name, seconds in durations.items()]


@pytest.mark.parametrize("lean_seconds, expected", [(1.05, "lean"), (1.2, "fat")])
def test_tied_runs_keep_the_leaner_one(lean_seconds, expected, monkeypatch):
    """About equally fast runs: the one estimated to need less memory is kept."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    runs = fake_runs(clock, {"fat": 1.0, "lean": lean_seconds}, calls)
    choose = functools.partial(engine.prefer_memory, memory=[100, 40])
    result, index = engine._time_interleaved(runs, torch.device("cpu"), choose)
    assert ["fat", "lean"][index] == expected
    # the result comes from a run of the chosen one (for "lean": one more run, as
    # the fat one was the fastest measured)
    assert calls[int(result) - 1] == expected
    assert (calls[-1] == "lean") == (expected == "lean")


@pytest.mark.parametrize(
    "durations, expected_calls, winner",
    [
        # long runs are their own samples: one run per candidate and round
        ({"a": 1.0, "b": 1.1}, ["a", "b", "b", "a"], "a"),
        ({"a": 1.0, "b": 2.0, "c": 1.05}, ["a", "b", "c", "c", "b", "a"], "a"),
        # short runs warm up first: two calls per candidate and round
        ({"a": 0.03, "b": 0.04}, ["a", "a", "b", "b", "b", "b", "a", "a"], "a"),
    ],
    ids=["long", "long-three", "short"],
)
def test_long_candidates_are_measured_without_warm_up(
    durations, expected_calls, winner, monkeypatch
):
    """First calls of long candidates: one timed run per round, no warm-up run."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    runs = fake_runs(clock, durations, calls)
    result, index = engine._time_interleaved(runs, torch.device("cpu"))
    assert calls == expected_calls
    assert list(durations)[index] == winner
    assert calls[int(result) - 1] == winner  # the winner's own result comes back


def test_a_cold_first_run_does_not_decide(monkeypatch):
    """A long candidate whose first (cold) run was slow still wins on its second:
    every candidate gets two samples, and its fastest counts."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)

    runs = cold_runs(clock, {"fast": (0.11, 0.06), "slow": (0.07, 0.07)}, calls)
    result, index = engine._time_interleaved(runs, torch.device("cpu"))
    assert index == 0 and calls == ["fast", "slow", "slow", "fast"]
    assert calls[int(result) - 1] == "fast"


def test_autotuning_caches_the_memory_choice(monkeypatch):
    """evaluate() passes each candidate's memory estimate to the choice and keeps
    the chosen candidate (not the fastest) for later calls."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    torch.manual_seed(0)
    x = torch.randn(4, 16, 20, 20, dtype=torch.float64)
    v = torch.randn(4, 24, 20, 20, dtype=torch.float64)
    seen, prepared = [], []

    def leanest(times, memory):  # stands in for the rule: least memory, any time
        seen.append(list(memory))
        return min(range(len(memory)), key=memory.__getitem__)

    def spy(candidate, *args):
        prepared.append(candidate)
        return make(candidate, *args)

    make = engine._prepared
    monkeypatch.setattr(engine, "prefer_memory", leanest)
    monkeypatch.setattr(engine, "_prepared", spy)
    enabled, threshold = engine.get_autotune()
    clear_caches()
    try:
        engine.set_autotune(True, min_flops=0)
        first = tnf.weight_vjp(x, v, 3, padding=1, per_sample=True)
        second = tnf.weight_vjp(x, v, 3, padding=1, per_sample=True)
    finally:
        engine.set_autotune(enabled, threshold)
    weight = torch.zeros(24, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    expected = torch.stack(  # autograd, one sample at a time
        [
            torch.autograd.grad(F.conv2d(x[n], weight, padding=1), weight, v[n])[0]
            for n in range(4)
        ]
    )
    close(first, expected)
    close(second, expected)
    assert len(seen) == 1 and len(seen[0]) >= 2
    assert len(prepared) == 1 and prepared[0].memory == min(seen[0])


@pytest.fixture
def long_runs(monkeypatch):
    """Every problem counts as long: its choice is measured over its first calls.

    Only the engine's own candidates compete (no torch kernel), and even tiny
    problems are measured.
    """
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    monkeypatch.setattr(engine, "_OVER_CALLS_SECONDS", 0.0)
    monkeypatch.setattr(engine, "_LONG_RUN_SECONDS", 0.0)  # one first run
    monkeypatch.setattr(engine, "_MIN_MEASURE_SECONDS", 0.0)  # two rounds only
    enabled, threshold = engine.get_autotune()
    clear_caches()
    engine.set_autotune(True, min_flops=0)
    engine.set_native(False)
    yield engine
    engine.set_autotune(enabled, threshold)
    engine.set_native(True)
    clear_caches()


def test_long_problems_are_measured_over_their_calls(long_runs, monkeypatch):
    """A long problem's first call runs the cheapest estimate only; each later call
    runs one candidate (A B C, C B A) until each has two samples, then the choice
    is fixed and prepared. Every call's result is right."""
    engine = long_runs
    torch.manual_seed(0)
    x = torch.randn(4, 16, 12, 12, dtype=torch.float64)
    v = torch.randn(4, 24, 12, 12, dtype=torch.float64)
    weight = torch.zeros(24, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    expected = torch.stack(  # autograd, one sample at a time
        [
            torch.autograd.grad(F.conv2d(x[n], weight, padding=1), weight, v[n])[0]
            for n in range(4)
        ]
    )
    ran, chosen_from = [], []
    execute, rule = engine._execute, engine.prefer_memory

    def spy_execute(candidate, *args):
        ran.append(candidate)
        return execute(candidate, *args)

    def spy_rule(times, memory, *args):
        chosen_from.append(list(times))
        return rule(times, memory, *args)

    monkeypatch.setattr(engine, "_execute", spy_execute)
    monkeypatch.setattr(engine, "prefer_memory", spy_rule)
    explored, tuned = [], []
    for _ in range(12):
        before = engine.exploration_runs()
        close(tnf.weight_vjp(x, v, 3, padding=1, per_sample=True), expected)
        explored.append(engine.exploration_runs() - before)
        tuned.append(cache_stats()["autotune"].size)
    calls = explored.index(0)  # the first call that measured nothing
    distinct = list(dict.fromkeys(ran[:calls]))
    assert len(distinct) >= 2 and calls == 2 * len(distinct)
    assert ran[:calls] == distinct + distinct[::-1]  # one candidate per call
    assert distinct[0].cost == min(c.cost for c in distinct)  # first: cheapest
    assert explored == [1] * calls + [0] * (12 - calls)
    assert tuned == [0] * (calls - 1) + [1] * (13 - calls)  # chosen on the last
    assert len(chosen_from) == 1 and len(chosen_from[0]) == len(distinct)


@pytest.mark.parametrize(
    "durations, keep_first, schedule",
    [
        ({"a": 1.0, "b": 0.5, "c": 0.8}, False, ["a", "b", "c", "c", "b", "a"]),
        ({"a": 1.0, "b": 0.95}, True, ["a", "b", "b", "a"]),  # tied: the kernel stays
        ({"a": 1.0, "b": 0.5}, True, ["a", "b", "b", "a"]),
        # under 50 ms: every call runs its candidate twice, timing the second (the
        # first pays one-time costs); a has spent 16 ms after two rounds: a third
        # round for a alone
        ({"a": 0.008, "b": 0.012}, False, ["aa", "bb", "bb", "aa", "aa"]),
    ],
    ids=["fastest", "keep-first-tie", "keep-first-beaten", "short-more-rounds"],
)
def test_long_runs_of_a_choice_are_measured_over_calls(
    durations, keep_first, schedule, monkeypatch
):
    """fastest() with long runs: one run per call (``schedule``), in the rounds
    A B C, C B A, ... (more for runs that have spent under 20 ms), then the choice
    alone."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    runs = fake_runs(clock, durations, calls)
    key, names = ("test-long-choice", keep_first), list(durations)
    times = {n: durations[n] for n in names}
    if keep_first:
        winner = "a" if times["b"] > 0.9 * times["a"] else "b"
    else:
        winner = min(names, key=times.__getitem__)
    choose = engine.keep_first if keep_first else None
    clear_caches()
    try:
        chosen = []
        for _ in schedule:
            result = engine.fastest(key, runs, torch.device("cpu"), choose)
            assert int(result) == len(calls)  # this call's own run
            chosen.append(engine.fastest_choice(key))
        engine.fastest(key, runs, torch.device("cpu"), choose)
    finally:
        clear_caches()
    assert "".join(calls) == "".join(schedule) + winner
    assert chosen == [None] * (len(schedule) - 1) + [names.index(winner)]


def test_measuring_over_calls_restarts_when_the_runs_change(monkeypatch):
    """A key whose list of runs changed mid-measurement starts afresh (no index
    into the old list)."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    three = fake_runs(clock, {"a": 1.0, "b": 0.5, "c": 0.8}, calls)
    clear_caches()
    try:
        engine.fastest(("test-restart",), three, torch.device("cpu"))
        engine.fastest(("test-restart",), three, torch.device("cpu"))
        for _ in range(4):
            engine.fastest(("test-restart",), three[:2], torch.device("cpu"))
        choice = engine.fastest_choice(("test-restart",))
    finally:
        clear_caches()
    assert "".join(calls) == "ab" + "abba" and choice == 1


def test_a_failing_run_ends_the_measuring(monkeypatch):
    """A run that raises while a choice is measured over calls (e.g. out of memory)
    leaves no half-done state: once the error is gone, calls work again."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    a, b = fake_runs(clock, {"a": 1.0, "b": 0.5}, calls)
    failing = [True]

    def flaky():
        if failing[0]:
            raise RuntimeError("out of memory")
        return b()

    key, cpu = ("test-failing-run",), torch.device("cpu")
    clear_caches()
    try:
        engine.fastest(key, [a, flaky], cpu)  # measuring over calls begins
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.fastest(key, [a, flaky], cpu)
        failing[0] = False
        for _ in range(5):
            engine.fastest(key, [a, flaky], cpu)
        choice = engine.fastest_choice(key)
    finally:
        clear_caches()
    # afresh after the failure: a b b a, then the choice
    assert "".join(calls) == "a" + "abba" + "b" and choice == 1


@pytest.mark.parametrize(
    "kernel_seconds, outer_choice",
    [(0.008, "tn"), (0.001, "kernel")],
    ids=["outer-over-calls", "outer-within-call"],
)
def test_a_nested_choice_is_measured_before_the_outer_one_times_it(
    kernel_seconds, outer_choice, monkeypatch
):
    """A choice inside another's run (the TN's contraction inside kernel vs TN):
    the outer choice times the inner one's choice, not unchosen inner candidates
    and not a run that measured them. Over calls, the inner one is measured over
    the outer one's runs; inside a measurement within one call, within it."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    inner = fake_runs(clock, {"x": 0.012, "y": 0.012, "z": 0.004}, calls)
    (kernel,) = fake_runs(clock, {"kernel": kernel_seconds}, calls)
    cpu = torch.device("cpu")

    def tn():
        return engine.fastest(("test-inner",), inner, cpu)

    clear_caches()
    try:
        for _ in range(40):  # runs under 20 ms: up to ten rounds each
            engine.fastest(("test-outer",), [kernel, tn], cpu)
        outer = engine.fastest_choice(("test-outer",))
        nested = engine.fastest_choice(("test-inner",))
        exploring = cache_stats()["exploring"].size
    finally:
        clear_caches()
    assert (outer, nested, exploring) == (["kernel", "tn"].index(outer_choice), 2, 0)


def test_a_cold_first_run_does_not_make_a_problem_long(monkeypatch):
    """A first run of 5-50 ms runs again: if the warm run is short, all candidates
    are measured within the first call."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)

    runs = cold_runs(clock, {"a": (0.02, 0.002), "b": (0.003, 0.003)}, calls)
    clear_caches()
    try:
        engine.fastest(("test-cold-first",), runs, torch.device("cpu"))
        choice = engine.fastest_choice(("test-cold-first",))
        exploring = cache_stats()["exploring"].size
    finally:
        clear_caches()
    assert calls[:2] == ["a", "a"] and choice == 0 and exploring == 0


def test_short_problems_are_measured_on_their_first_call(monkeypatch):
    """Below the long-run threshold every candidate is measured within the first
    call: nothing is left to measure over later calls."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    monkeypatch.setattr(engine, "_OVER_CALLS_SECONDS", math.inf)
    x = torch.randn(2, 8, 6, 6)
    enabled, threshold = engine.get_autotune()
    clear_caches()
    try:
        engine.set_autotune(True, min_flops=0)
        before = engine.exploration_runs()
        tnf.kfac_input_factor(x, 3, padding=1)
        tuned = cache_stats()["autotune"].size
    finally:
        engine.set_autotune(enabled, threshold)
        clear_caches()
    assert engine.exploration_runs() == before and tuned == 1


# (N, C_in, C_out, size, kernel, stride, padding): AlexNet's and Inception-v3's
# layers whose per-sample gradients the benchmark showed at 1.4-1.6x unfold's memory
# when the index-pattern contraction won the timing by a few per cent
MEMORY_LAYERS = [(2, 64, 192, 27, 5, 1, 2), (2, 96, 96, 35, 3, 1, 1)]


@pytest.mark.skipif(
    not __import__("backpack_tn.bench.measure").bench.measure.cpu_memory_supported(),
    reason="peak resident memory is measured through Linux /proc only",
)
@pytest.mark.parametrize("layer", MEMORY_LAYERS, ids=["alexnet-5x5", "incept-3x3"])
@pytest.mark.parametrize("op", ["per_sample", "diag_ggn_per_sample"])
def test_memory_estimates_match_measured_peaks(layer, op, monkeypatch):
    """Each contraction's memory estimate against its measured peak (MiB-sized cases).

    The estimates only rank candidates, but they must rank them as measured: index
    patterns above windows on these layers. The per-tap loop is left out: its peak
    of a few MiB (estimated 4, measured 4 in a fresh process) doubles after other
    candidates ran (allocator state), which no estimate of the loop itself can know.
    """
    import importlib

    from backpack_tn.bench.measure import peak_memory

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    n, c_in, c_out, size, k, stride, pad = layer
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size)
    out = (size + 2 * pad - k) // stride + 1
    v = torch.randn(n, c_out, out, out)
    S = torch.randn(3, n, c_out, out, out)
    hyper = dict(stride=stride, padding=pad)

    def compute():
        if op == "per_sample":
            return tnf.weight_vjp(x, v, k, per_sample=True, **hyper)
        return tnf.diag_ggn_weight(x, S, k, per_sample=True, **hyper)

    ranked = []
    rank = engine._rank

    def spy(*args):
        ranking = rank(*args)
        ranked.append(ranking[1])
        return ranking

    clear_caches()
    monkeypatch.setattr(engine, "_rank", spy)
    compute()
    # without autotuning a forced strategy runs its cheapest candidate (per-class
    # contractions come in a pattern and a window variant)
    estimates = {}
    for c in sorted(ranked[-1], key=lambda c: c.cost):
        if c.strategy != "taps":
            estimates.setdefault(c.strategy, c.memory * 4)  # float32 bytes
    measured = {}
    enabled, threshold = engine.get_autotune()
    try:
        engine.set_autotune(False)
        for strategy in estimates:
            with force_strategy(strategy):
                compute()  # plans and patterns are cached, not counted
                measured[strategy] = min(
                    peak_memory(compute, torch.device("cpu")) for _ in range(2)
                )
    finally:
        engine.set_autotune(enabled, threshold)
    for strategy, estimate in estimates.items():
        assert 0.7 <= measured[strategy] / estimate <= 1.4, (strategy, measured)
    assert estimates["pattern"] > 1.25 * estimates["window"]
    assert measured["pattern"] > 1.25 * measured["window"]


@pytest.mark.parametrize(
    "times, expected",
    [([1.0, 0.95], 0), ([1.0, 0.85], 1), ([1.0, 1.5], 0), ([1.2, 1.1, 1.0], 2)],
    ids=["tie", "clearly-faster", "first-fastest", "third"],
)
def test_keep_first_rule(times, expected):
    from backpack_tn.tn.evaluate import keep_first

    assert keep_first(times, tie=0.1) == expected


@pytest.mark.parametrize("tn_seconds, expected", [(0.00095, "kernel"), (0.0008, "tn")])
def test_torch_kernel_kept_unless_the_tn_is_clearly_faster(
    tn_seconds, expected, monkeypatch
):
    """Kernel vs TN: a TN only a few per cent faster does not replace the kernel.

    Short runs, measured within the first call (long ones:
    ``test_long_runs_of_a_choice_are_measured_over_calls``).
    """
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    clock, calls = FakeClock(), []
    monkeypatch.setattr(engine, "time", clock)
    runs = fake_runs(clock, {"kernel": 0.001, "tn": tn_seconds}, calls)
    clear_caches()
    key = ("keep-first-test", tn_seconds)
    result = engine.fastest(key, runs, torch.device("cpu"), choose=engine.keep_first)
    assert calls[int(result) - 1] == expected
    calls.clear()
    engine.fastest(key, runs, torch.device("cpu"), choose=engine.keep_first)
    assert calls == [expected]


def test_chunked_memory_estimate():
    """Batch chunks shrink a candidate's temporaries, not its result, which is
    held twice (the pieces and their concatenation)."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    geometry = make_geometry((12, 12), 3, padding=1)
    shapes = {"x": (8, 1, 6, 12, 12), "v": (8, 1, 10, 12, 12)}
    nets = networks("weight_vjp", geometry, per_sample=True)
    for c in candidates(nets, shapes, torch.float32, torch.device("cpu")):
        result = 8 * 10 * 6 * 9  # [N, O, C, K·K]
        assert c.memory > result
        assert engine.chunked_memory(c, shapes, 1) == c.memory
        chunked = engine.chunked_memory(c, shapes, 4)
        assert chunked == pytest.approx(2 * result + (c.memory - result) / 4)


def test_repeated_kernel_calls_follow_settings_and_shapes(monkeypatch):
    """A repeated call goes straight to torch's kernel, per call signature.

    The signature holds the shapes, hyper-parameters, dtype, device and settings: a
    forced strategy must still run the TN, and a call with other shapes is validated.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    hyper = dict(stride=2, padding=1, groups=2)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = F.conv2d(x, w, b, **hyper)
    v = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), v)
    x, w, out = x.detach(), w.detach(), out.detach()
    runs = [
        (lambda: tnf.conv(x, w, b, **hyper), out),
        (lambda: tnf.input_vjp(v, w, x.shape, **hyper), grad_x),
        (lambda: tnf.weight_vjp(x, v, 3, **hyper), grad_w),
    ]
    clear_caches()
    for run, expected in runs:
        close(run(), expected)
        close(run(), expected)
    stats = cache_stats()["call-plans"]
    assert (stats.size, stats.hits) == (3, 3)
    # a list is unhashable: the full path runs, nothing is stored
    close(tnf.conv(x, w, b, stride=[2, 2], padding=[1, 1], groups=2), out)
    assert cache_stats()["call-plans"].size == 3
    # other shapes are a new signature: validated as before
    with pytest.raises(ValueError, match="spatial size"):
        tnf.input_vjp(v[..., :-1], w, x.shape, **hyper)
    # equal to a remembered call but of another type (1.0 == 1 == True): validated
    with pytest.raises(ValueError):
        tnf.conv(x, w, b, stride=2, padding=1, groups=2.0)
    with pytest.raises(ValueError):
        tnf.weight_vjp(x, v, 3.0, **hyper)
    # the input shape may be any iterable of ints
    close(tnf.input_vjp(v, w, iter(x.shape), **hyper), grad_x)

    def no_kernel(*args, **kwargs):
        raise AssertionError("torch's kernel ran under a forced strategy")

    monkeypatch.setitem(tnf._TORCH_CONV, 2, no_kernel)
    monkeypatch.setattr(tnf, "_convolution_backward", no_kernel)
    with force_strategy("pattern"):
        for run, expected in runs:
            close(run(), expected)


def test_gpu_cost_model_prefers_few_calls(monkeypatch):
    """On CUDA the cost model counts torch calls as launches (device_costs)."""
    import importlib

    from backpack_tn.tn import gram

    # the module (``backpack_tn.tn.evaluate`` is also the name of a function)
    ev = importlib.import_module("backpack_tn.tn.evaluate")

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # the CPU's constants are read at call time (the calibration patches them)
    monkeypatch.setattr(ev, "CALL_COST", 123.0)
    assert ev.device_costs(cpu).call == 123.0
    assert ev.device_costs(cuda).call == ev.CUDA_COSTS.call
    # a Gram matrix is one GEMM on a GPU, blocks on a CPU
    u = torch.randn(1, 1024, 4096, dtype=torch.float64)
    assert gram.default_blocks(1024, 4096, cpu) > 1
    assert gram.default_blocks(1024, 4096, cuda) == 1
    assert gram.product_fraction(1024, 4096, cuda) == 1.0
    torch.testing.assert_close(
        gram.symmetric_gram(u), u @ u.transpose(1, 2), rtol=1e-12, atol=1e-9
    )
    # AlexNet's 11×11 stem: the CPU builds its unfolded input tap by tap (121 taps),
    # a GPU with one F.unfold (and at most one permuted copy)
    geometry = make_geometry((224, 224), 11, 4, 2, 1, 1, "zeros")
    shapes = {"x": (8, 1, 3, 224, 224)}
    calls = []
    for net in networks("kfac_input", geometry, True, approx="expand"):
        for op in net.operands:
            if not op.layout or not ev._direct_windows(
                net, op, ev._operand_key(net, op)[1]
            ):
                continue
            shape = ev._operand_shape(net, op, shapes)
            calls.append(
                tuple(
                    ev._window_cost(net, op, shapes["x"], shape, device)[0]
                    for device in (cpu, cuda)
                )
            )
    # F.unfold's layout is not the contraction's here: unfold plus a permuted copy
    assert calls and set(calls) == {(121, 2)}
    # priced by its calls, that window candidate is the cheapest on the GPU
    options = ev.candidates(
        networks("kfac_input", geometry, True, approx="expand"),
        shapes,
        torch.float32,
        cuda,
    )
    assert min(options, key=lambda c: c.cost).strategy == "window"


def test_axes_of_one_operand_are_priced_as_summed_first():
    """torch.einsum sums an operand's private axes before any product; so does the
    cost model (the window network of a KFAC-reduce factor was priced 2000× high)."""
    import importlib

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    equation = "abcdefg,ahijekl->abcdhij"
    shapes = [(1, 16, 3, 3, 4, 5, 5)] * 2
    reduced, reduced_shapes, presum = ev._presummed(equation, shapes)
    assert reduced == "abcde,ahije->abcdhij"
    assert reduced_shapes == ((1, 16, 3, 3, 4),) * 2
    assert presum == 2 * 1 * 16 * 3 * 3 * 4 * 5 * 5
    # nothing to sum first: unchanged
    assert ev._presummed("ab,bc->ac", [(2, 3), (3, 4)]) == (
        "ab,bc->ac",
        ((2, 3), (3, 4)),
        0.0,
    )
    plan = ev._plan(equation, shapes, torch.float64, torch.device("cpu"))
    # a GEMM over the 144 rows with inner dimension 4, plus the sums
    assert plan.flops <= 2 * (2 * 144 * 144 * 4) + presum
    a = torch.randn(*shapes[0], dtype=torch.float64)
    b = torch.randn(*shapes[1], dtype=torch.float64)
    torch.testing.assert_close(plan.expression(a, b), torch.einsum(equation, a, b))


def test_kernel_placeholder_from_inference_mode_serves_autograd():
    """The cached stand-in tensor of torch's VJP kernels is made outside inference
    mode: a first call under ``torch.inference_mode()`` must not break a later call
    whose result autograd records."""
    from backpack_tn.functional import _placeholder

    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    v = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    clear_caches()
    _placeholder.cache_clear()
    with torch.inference_mode():
        tnf.input_vjp(v, w, x.shape, padding=1)
        tnf.weight_vjp(x, v, 3, padding=1)
    w_grad, x_grad = w.clone().requires_grad_(), x.clone().requires_grad_()
    grad_x = tnf.input_vjp(v, w_grad, x.shape, padding=1)
    grad_w = tnf.weight_vjp(x_grad, v, 3, padding=1)
    # second-order use: differentiate the VJPs again
    (gw_of_x,) = torch.autograd.grad(grad_x.sum(), w_grad)
    (gx_of_w,) = torch.autograd.grad(grad_w.sum(), x_grad)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = F.conv2d(xr, wr, padding=1)
    (ref_x,) = torch.autograd.grad(out, xr, v, create_graph=True)
    (ref_gw,) = torch.autograd.grad(ref_x.sum(), wr)
    close(gw_of_x, ref_gw)
    assert gx_of_w.shape == x.shape


@pytest.fixture
def gpu_rules(monkeypatch):
    """The engine's GPU rules on the CPU: CUDA cost constants, F.unfold for window
    operands at any size, one GEMM per Gram matrix (caches cleared around).

    The cost constants decide which candidates are measured and chosen, not the
    values; with them, what runs here is what a GPU would choose between.
    """
    import importlib

    from backpack_tn.tn import gram, windows

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    clear_caches()
    monkeypatch.setattr(ev, "device_costs", lambda device: ev.CUDA_COSTS)
    limit = windows.SMALL_WINDOW_ELEMENTS_PER_TAP_CUDA
    monkeypatch.setattr(windows, "small_window_limit", lambda device=None: limit)
    monkeypatch.setattr(gram, "default_blocks", lambda rows, inner, device=None: 1)
    yield
    clear_caches()


# 2d/1d: large enough that the CPU rules differ, with more than 16k unfolded elements
# per tap (per-tap copies on a CPU) and KFAC Grams of 288/320 rows (row blocks);
# depthwise: values only (its Gram has 9 rows, one GEMM under either rule)
GPU_RULE_CASES = [
    Case(
        "k3-s1-p1-wide", 2, 3, padding=1, c_in=32, c_out=8, batch=4, input_size=(20, 20)
    ),
    Case("k3-s2-p1-wide", 2, 3, 2, 1, c_in=32, c_out=8, batch=8, input_size=(21, 20)),
    Case("k5-p2-1d", 1, 5, padding=2, c_in=64, c_out=4, batch=4, input_size=(300,)),
    Case(
        "k3-depthwise",
        2,
        3,
        padding=1,
        groups=32,
        c_in=32,
        c_out=32,
        batch=4,
        input_size=(20, 20),
    ),
]


@pytest.mark.parametrize("strategy", [None, "window"], ids=["auto", "window"])
@pytest.mark.parametrize("case", GPU_RULE_CASES, ids=lambda c: c.id)
def test_gpu_rules_on_the_cpu_match_references(case, strategy, gpu_rules, monkeypatch):
    """What a GPU runs (other candidates, windows unfolded by F.unfold at any size,
    single-GEMM Grams) gives the same numbers; checked without a GPU."""
    from backpack_tn.tn import gram, windows
    from tests.cases import grouped_unfold
    from tests.test_functional import _random_S, _reference_sqrt_ggn

    calls = []

    def counted(name, function):
        def run(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(windows.F, "unfold", counted("unfold", windows.F.unfold))
    monkeypatch.setattr(gram.torch, "bmm", counted("bmm", gram.torch.bmm))
    module, x, out, grad_out, _, _ = forward_with_grads(case)
    k, hyper = case.kernel_size, case.hyper
    grads = per_sample_grads(case, module, x, grad_out)
    S = _random_S(case, out)
    sqrt = _reference_sqrt_ggn(case, x, S)
    u = grouped_unfold(case, x).mean(1, keepdim=True)
    with force_strategy(strategy):
        close(tnf.weight_vjp(x, grad_out, k, per_sample=True, **hyper), grads)
        close(
            tnf.batch_l2_weight(x, grad_out, k, **hyper),
            grads.pow(2).flatten(1).sum(1),
        )
        for approx in ("expand", "reduce"):
            v = u.mean(-1, keepdim=True) if approx == "reduce" else u
            expected = torch.einsum("ngio,ngjo->gij", v, v)[0] / x.shape[0]
            calls.clear()
            close(tnf.kfac_input_factor(x, k, approx=approx, **hyper), expected)
            if strategy == "window" and approx == "expand" and case.groups == 1:
                # the CPU's rules: per-tap copies and 2 GEMMs over row blocks
                assert calls == ["unfold", "bmm"]
        close(tnf.diag_ggn_weight(x, S, k, **hyper), sqrt.pow(2).sum((0, 1)))
        close(
            tnf.diag_ggn_weight(x, S, k, per_sample=True, **hyper),
            sqrt.pow(2).sum(0),
        )


@pytest.mark.parametrize("strategy", [None, "pattern", "window", "taps"])
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("k3-s2-p1", "k3-s1-p1-reflect")], ids=str
)
def test_first_call_in_inference_mode_then_differentiable_calls(case, strategy):
    """Tensors the engine caches for a first call under ``torch.inference_mode()``
    (patterns, gather indices) serve later calls that autograd records."""
    from tests.cases import grouped_unfold

    x = case.input()
    torch.manual_seed(1)
    funcs = {
        "unfold": (
            lambda x: tnf.unfold(x, case.kernel_size, **case.hyper),
            lambda x: reference_unfold(case, x),
        ),
        "kfac": (
            lambda x: tnf.kfac_input_factor(
                x, case.kernel_size, groups_mode="separate", **case.hyper
            ),
            lambda x: (
                torch.einsum(
                    "ngio,ngjo->gij", grouped_unfold(case, x), grouped_unfold(case, x)
                )
                / x.shape[0]
            ),
        ),
    }
    clear_caches()
    with force_strategy(strategy):
        for run, reference in funcs.values():
            with torch.inference_mode():
                run(x)
            ours = x.clone().requires_grad_(True)
            theirs = x.clone().requires_grad_(True)
            result = run(ours)
            weights = torch.randn_like(result)
            (grad,) = torch.autograd.grad((result * weights).sum(), ours)
            (expected,) = torch.autograd.grad(
                (reference(theirs) * weights).sum(), theirs
            )
            close(grad, expected)


def _tn_measured_faster(monkeypatch) -> list:
    """Make every kernel-vs-TN choice see the TN at half the kernel's time.

    Every candidate runs (the TN decides its own contraction, so its memory estimate
    is known), then the choice rule picks; the picks are appended to the returned list.
    """
    chosen = []

    def fastest(key, runs, device, choose=None):
        for run in runs:
            run()
        chosen.append(choose([1.0, 0.5]))
        return runs[chosen[-1]]()

    monkeypatch.setattr(tnf, "fastest", fastest)
    return chosen


@pytest.mark.parametrize(
    "layer, tn_kept",
    [
        # ConvNeXt's depthwise 7×7 on a 7² map: the TN's index-pattern contraction
        # holds 7 taps × the input, twice (estimated 5.3 MB, measured 5.2-5.7 MB),
        # against 0.9 MB of tensors and result
        ((8, 256, 7, 7, 3, 256), False),
        # a patchify stem: the TN is a GEMM of the reshaped input, no larger
        ((8, 16, 16, 4, 0, 1), True),
    ],
    ids=["depthwise-7x7-at-7x7", "patchify-4x4"],
)
@pytest.mark.parametrize("op", ["forward", "input_vjp", "weight_vjp"])
def test_tn_replaces_the_kernel_only_within_its_memory_bound(
    layer, tn_kept, op, monkeypatch
):
    """A TN that measured faster replaces torch's kernel only if its estimated memory
    is at most ``TN_MEMORY_FACTOR`` times the call's tensors and result."""
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    n, c, size, k, padding, groups = layer
    stride = k if padding == 0 else 1
    hyper = dict(stride=stride, padding=padding, groups=groups)
    torch.manual_seed(0)
    x = torch.randn(n, c, size, size).requires_grad_(True)
    w = torch.randn(c, c // groups, k, k).requires_grad_(True)
    out = F.conv2d(x, w, **hyper)
    v = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), v)
    x, w, out = x.detach(), w.detach(), out.detach()
    run, expected = {
        "forward": (lambda: tnf.conv(x, w, **hyper), out),
        "input_vjp": (lambda: tnf.input_vjp(v, w, x.shape, **hyper), grad_x),
        "weight_vjp": (lambda: tnf.weight_vjp(x, v, k, **hyper), grad_w),
    }[op]
    chosen = _tn_measured_faster(monkeypatch)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        set_autotune(True, min_flops=0)
        torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4)
    finally:
        set_autotune(enabled, threshold)
    assert chosen == [1 if tn_kept else 0]


@pytest.mark.skipif(
    not __import__("backpack_tn.bench.measure").bench.measure.cpu_memory_supported(),
    reason="peak resident memory is measured through Linux /proc only",
)
@pytest.mark.parametrize("op", ["forward", "input_vjp", "weight_vjp"])
def test_kernel_memory_bound_uses_a_realistic_estimate(op):
    """The estimate the kernel-vs-TN memory bound reads (``chosen_memory``) against
    the TN's measured peak, on the depthwise layer where the bound refuses the TN."""
    import importlib

    from backpack_tn.bench.measure import peak_memory

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    torch.manual_seed(0)
    x = torch.randn(8, 256, 7, 7)
    w = torch.randn(256, 1, 7, 7)
    v = torch.randn(8, 256, 7, 7)
    hyper = dict(padding=3, groups=256)
    run = {
        "forward": lambda: tnf.conv(x, w, **hyper),
        "input_vjp": lambda: tnf.input_vjp(v, w, x.shape, **hyper),
        "weight_vjp": lambda: tnf.weight_vjp(x, v, 7, **hyper),
    }[op]
    clear_caches()
    native = engine._SETTINGS["native"]
    engine.set_native(False)  # the TN itself
    try:
        run()
        run()  # plans and patterns are cached, not counted
        measured = min(peak_memory(run, torch.device("cpu")) for _ in range(2))
        estimates = [p.memory for p in engine._PREPARED._data.values()]
    finally:
        engine.set_native(native)
        clear_caches()
    assert len(estimates) == 1
    assert 0.7 <= measured / estimates[0] <= 1.4, (measured, estimates)
    tensors = (2 * 8 * 256 * 49 + 256 * 49) * 4  # inputs and result: two maps, a kernel
    assert estimates[0] > 2 * tensors


def test_kernel_kept_where_the_tns_memory_is_unknown(monkeypatch):
    """If the TN's estimate is gone when the choice is made (its prepared entry
    evicted between the measuring calls), torch's kernel stays."""
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16)
    w = torch.randn(16, 16, 4, 4)
    chosen = _tn_measured_faster(monkeypatch)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        set_autotune(True, min_flops=0)
        tnf.conv(x, w, stride=4)  # the patchify stem: within the bound
        monkeypatch.setattr(tnf._Network, "memory", lambda self, *tensors: None)
        clear_caches()
        out = tnf.conv(x, w, stride=4)
    finally:
        set_autotune(enabled, threshold)
        clear_caches()
    assert chosen == [1, 0]
    torch.testing.assert_close(out, F.conv2d(x, w, stride=4))


@pytest.mark.parametrize(
    "per_sample, chunked", [(False, False), (True, True)], ids=["summed", "per-sample"]
)
def test_chunks_only_where_the_batch_is_in_the_largest_intermediate(
    per_sample, chunked, monkeypatch
):
    """A depthwise 7×7 weight VJP at 7² by index patterns contracts the samples
    early: its largest intermediate has no batch axis, and chunks would repeat it
    (measured: a 1 MB budget took the peak from 5.2 to 8.2 MB). Per-sample gradients
    keep the batch in it: there the budget chunks."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    geometry = make_geometry((7, 7), 7, padding=3, groups=256)
    shapes = {"x": (64, 256, 1, 7, 7), "v": (64, 256, 1, 7, 7)}
    nets = networks("weight_vjp", geometry, per_sample=per_sample)
    (pattern,) = [
        c
        for c in candidates(nets, shapes, torch.float32, torch.device("cpu"))
        if c.strategy == "pattern" and c.executor == "einsum"
    ]
    monkeypatch.setitem(engine._SETTINGS, "budget", 10**6)
    assert pattern.largest_intermediate * 4 > 10**6
    assert (engine._chunks(pattern, shapes, torch.float32) > 1) == chunked


def test_memory_bound_keeps_the_kernel_for_the_h200s_wrong_choice(monkeypatch):
    """All-CNN-C's 3×3 stride-2 96→96 input VJP: the H200 ran the TN at 2.3× the
    kernel's time and 6× its memory (72 vs 12 MiB at batch 32). The TN's estimate
    is 2.4× the call's tensors and result at any batch size: the bound keeps the
    kernel, whatever the timing says (here: the TN measured 2× faster)."""
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    torch.manual_seed(0)
    x = torch.randn(4, 96, 32, 32, requires_grad=True)
    w = torch.randn(96, 96, 3, 3)
    out = F.conv2d(x, w, stride=2, padding=1)
    v = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, v)
    chosen = _tn_measured_faster(monkeypatch)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        set_autotune(True, min_flops=0)
        result = tnf.input_vjp(v, w, x.shape, stride=2, padding=1)
    finally:
        set_autotune(enabled, threshold)
        clear_caches()
    assert chosen == [0]
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_no_chunks_where_the_result_is_most_of_the_memory(monkeypatch):
    """Per-sample gradients whose result dominates: chunks hold it twice (pieces and
    their concatenation), so a budget below the largest intermediate must not chunk
    (measured before: an 8 MB budget took the peak from 21 to 37 MiB)."""
    import importlib

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    geometry = make_geometry((4, 4), 3, padding=1)
    shapes = {"x": (32, 1, 128, 4, 4), "v": (32, 1, 128, 4, 4)}
    nets = networks("weight_vjp", geometry, per_sample=True)
    monkeypatch.setitem(engine._SETTINGS, "budget", 8 * 10**6)
    for c in candidates(nets, shapes, torch.float32, torch.device("cpu")):
        result = 32 * 128 * 128 * 9
        assert c.largest_intermediate * 4 > 8 * 10**6 and c.memory < 1.5 * result
        assert engine._chunks(c, shapes, torch.float32) == 1


@pytest.mark.parametrize("op", ["forward", "forward-bias", "input_vjp"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pointwise_matmul_candidate_for_1x1_convolutions(op, dims, monkeypatch):
    """1×1 convolutions (stride 1, one group) get a third candidate, a batched matmul
    with the kernel broadcast over the samples; where it measures fastest it runs,
    and repeated calls run it too. Results against torch's convolution and autograd."""
    from backpack_tn.tn.evaluate import get_autotune, set_autotune

    torch.manual_seed(0)
    size = (5, 4, 3)[:dims]
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    x = torch.randn(3, 6, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, *([1] * dims), dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if op == "forward-bias" else None
    out = conv(x, w, b)
    v = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, v)
    x = x.detach()
    if op == "input_vjp":
        run, expected = (lambda: tnf.input_vjp(v, w, x.shape)), grad_x
    else:
        run, expected = (lambda: tnf.conv(x, w, b)), out.detach()
    seen = []

    def pointwise_fastest(key, runs, device, choose=None):
        results = [r() for r in runs]
        seen.append(len(runs))
        for result in results[1:]:  # every candidate computes the same
            close(result, results[0])
        return results[choose([1.0, 1.0, 0.5])]

    monkeypatch.setattr(tnf, "fastest", pointwise_fastest)
    monkeypatch.setattr(tnf, "fastest_choice", lambda key: 2)
    enabled, threshold = get_autotune()
    clear_caches()
    try:
        set_autotune(True, min_flops=0)
        close(run(), expected)
        calls = []
        matmul = torch.matmul
        monkeypatch.setattr(torch, "matmul", lambda *a: calls.append(1) or matmul(*a))
        close(run(), expected)  # the remembered plan: the matmul again
    finally:
        set_autotune(enabled, threshold)
        clear_caches()
    assert seen == [3] and calls == [1]


def test_no_pointwise_candidate_beyond_1x1_stride_1_single_group():
    from backpack_tn.functional import _pointwise

    for hyper in [
        dict(kernel_size=(1, 1), stride=2),
        dict(kernel_size=(1, 1), groups=2),
        dict(kernel_size=(1, 1), padding=1),
        dict(kernel_size=(3, 1)),
    ]:
        k = hyper.pop("kernel_size")
        geometry = make_geometry((6, 6), k, **hyper)
        assert _pointwise(geometry, transposed=False) is None
        assert _pointwise(geometry, transposed=True) is None
    assert _pointwise(make_geometry((6, 6), 1), transposed=True) is not None
