"""The benchmark suite: layer extraction, baselines agree with the TN, report logic.

Timings are not asserted (they belong to benchmarks); what is tested is that the
suite measures the right things: the zoo's layers are the models' convolutions, every
stock implementation computes the same quantity as ``backpack_tn`` (so a speed-up
compares like with like), and the report picks the fastest stock implementation.
"""

from __future__ import annotations

import json
import platform
import time

import pytest
import torch
from torch import nn

from backpack_tn.bench import measure, report
from backpack_tn.bench.__main__ import main as bench_main
from backpack_tn.bench.baselines import (
    OPERATIONS,
    STOCK,
    check,
    make_problem,
    tn_implementation,
)
from backpack_tn.bench.layers import Layer
from backpack_tn.bench.measure import (
    calls_per_sample,
    interleaved_medians,
    median_time,
)
from backpack_tn.bench.zoo import ZOO, model_layers


@pytest.mark.parametrize("name", ["3c3d", "2c2d", "allcnnc", "resnet18"])
def test_zoo_layers_are_the_models_convolutions(name):
    """Each extracted layer reproduces a conv of the model with its real input shape."""
    build, input_shape = ZOO[name]
    model = build().eval()
    seen = set()

    def record(module, inputs):
        seen.add((module.in_channels, module.out_channels, tuple(inputs[0].shape[2:])))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    layers = model_layers(name)
    assert {
        (lay.in_channels, lay.out_channels, lay.input_size) for lay in layers
    } == seen
    for layer in layers:  # the declared output size is the module's
        out = layer.module()(torch.zeros(1, layer.in_channels, *layer.input_size))
        assert tuple(out.shape[2:]) == layer.output_size


@pytest.mark.parametrize(
    "layer, category",
    [
        (Layer("a", "", 4, 4, (8, 8), 3, 1, 1), "general"),
        (Layer("b", "", 4, 4, (8, 8), 1), "dense"),
        (Layer("c", "", 4, 4, (8, 8), 4, 4), "dense"),
        (Layer("d", "", 4, 4, (8, 8), 1, 2), "down-sampling"),
        (Layer("e", "", 4, 4, (8, 8), (1, 7), 1, (0, 3)), "mixed-dense"),
    ],
    ids=["3x3", "1x1", "patchify", "1x1-s2", "1x7"],
)
def test_layer_categories(layer, category):
    assert layer.category == category


LAYERS = [
    Layer("g", "", 4, 6, (9, 8), 3, 2, 1, 1, 2),
    Layer("m", "", 3, 4, (8, 9), (1, 3), 1, (0, 1)),
]


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("layer", LAYERS, ids=["grouped-s2", "1x3"])
def test_stock_implementations_compute_the_same_quantity(op, layer):
    problem = make_problem(layer, 3, 2, torch.float64, torch.device("cpu"))
    for name, impl in STOCK[op].items():
        if not impl.available(problem):
            continue
        reference = tn_implementation(op, True, impl.groups_mode)(problem)
        # einconv 0.1.0 builds its KFAC factors in float32 whatever the input dtype
        tolerance = 1e-6 if name == "einconv" else 1e-10
        assert check(impl.fn(problem), reference) < tolerance, name


def test_report_compares_with_the_fastest_stock_implementation():
    def row(impl, seconds, memory):
        return dict(
            layer="L",
            description="d",
            operation="op",
            implementation=impl,
            time_s=seconds,
            memory_bytes=memory,
            category="general",
        )

    rows = report.comparisons(
        [row("tn", 2.0, 10), row("unfold", 4.0, 5), row("torch", 1.0, 20)]
        + [row("einconv", 8.0, 1)]
    )
    (r,) = rows
    assert r["fastest"] == "torch" and r["speedup"] == 0.5
    assert r["leanest"] == "unfold" and r["stock_memory"] == 5  # einconv not stock
    assert r["einconv_speedup"] == 4.0
    assert r["unfold_speedup"] == 2.0
    text = report.summary(rows)
    assert "op on L (d): 0.50× vs torch" in text
    assert "| 4.00× | 2.00× |" in text  # vs einconv (min), vs unfold (median)


def test_bench_command_runs_on_a_zoo_layer(tmp_path, capsys):
    out = tmp_path / "run.json"
    status = bench_main(
        [
            "--models",
            "2c2d",
            "--max-layers",
            "1",
            "--ops",
            "kfac_reduce",
            "per_sample_grad",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--no-memory",
            "--no-plain",
            "--json",
            str(out),
        ]
    )
    assert status == 0  # every implementation agreed with the TN result
    results = json.loads(out.read_text())["results"]
    assert {r["implementation"] for r in results} >= {"tn", "unfold", "backpack"}
    assert "geo-mean speed-up" in capsys.readouterr().out


def test_bench_json_is_saved_after_every_layer(tmp_path, monkeypatch):
    """A run stopped at a time limit keeps the layers it finished."""
    from backpack_tn.bench import __main__ as bench_module

    snapshots = []
    save = bench_module.save_json

    def recording(results, path, meta):
        save(results, path, meta)
        snapshots.append(json.loads(open(path).read())["results"])

    monkeypatch.setattr(bench_module, "save_json", recording)
    out = tmp_path / "run.json"
    argv = ["--models", "2c2d", "--ops", "kfac_reduce", "--batch-size", "2"]
    argv += ["--repeats", "1", "--memory-rounds", "1", "--no-plain", "--json", str(out)]
    assert bench_main(argv) == 0
    layers = [layer.name for layer in model_layers("2c2d")]
    # timings layer by layer, then memory layer by layer, then the final file
    assert len(snapshots) == 2 * len(layers) + 1
    first = snapshots[0]
    assert {r["layer"] for r in first} == {layers[0]}
    assert all(r["memory_bytes"] is None for r in first)  # memory comes after timing
    assert all(r["memory_bytes"] is not None for r in snapshots[-2])
    assert snapshots[-2] == snapshots[-1] == json.loads(out.read_text())["results"]


def test_short_calls_are_timed_in_batches():
    calls = []

    def fn():
        calls.append(None)

    median_time(fn, torch.device("cpu"), repeats=2, warmup=1, loops=3)
    assert len(calls) == 1 + 2 * 3

    def slow():
        time.sleep(0.002)

    # a ≥ 2 ms call needs at most 5 calls for a 10 ms sample; a no-op needs many
    assert 1 <= calls_per_sample(slow, torch.device("cpu"), 0.01) <= 5
    assert calls_per_sample(fn, torch.device("cpu"), 0.01) > 5
    medians = interleaved_medians({"fast": fn, "slow": slow}, torch.device("cpu"), 2)
    assert medians["slow"] >= 0.002 > medians["fast"]


@pytest.mark.parametrize(
    "single, loops, expected",
    [(0.003, 4, 17), (0.0002, 50, 50), (0.03, 1, 2), (0.2, 1, 0), (0.06, 1, 1)],
    ids=["3ms", "0.2ms-capped", "30ms", "long", "60ms"],
)
def test_short_samples_warm_up_for_a_while(single, loops, expected):
    """Before each timed sample, short calls are repeated untimed for at least
    WARM_SECONDS (at most _MAX_WARM_CALLS calls); long ones are not."""
    assert measure.WARM_SECONDS == 0.05 and measure._MAX_WARM_CALLS == 50
    assert measure._warm_calls(single, loops) == expected


def test_interleaved_samples_start_after_the_warm_up(monkeypatch):
    """Each sample of a short call follows its warm-up calls (a fake clock: each
    call of ``short`` takes 3 ms, of ``long`` 200 ms)."""
    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def runner(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds

        return run

    monkeypatch.setattr(measure.time, "perf_counter", clock)
    fns = {"short": runner("short", 0.003), "long": runner("long", 0.2)}
    medians = interleaved_medians(fns, torch.device("cpu"), repeats=2)
    assert medians == pytest.approx({"short": 0.003, "long": 0.2})
    # per round: 17 untimed calls (51 ms) and a sample of 4 calls (12 ms)
    rounds = "".join("s" if c == "short" else "l" for c in calls)
    assert rounds.count("s" * (17 + 4)) == 2


def test_round_order_balances_predecessors():
    names = ["a", "b", "c"]
    follows = {}
    for r in range(12):
        order = measure._round_order(names, r)
        assert sorted(order) == names  # every function once per round
        for before, after in zip(order, order[1:]):
            follows[(before, after)] = follows.get((before, after), 0) + 1
    # plain rotation would only ever produce a→b, b→c, c→a within rounds
    assert len(follows) == 6 and max(follows.values()) == min(follows.values())


def test_memory_is_the_least_reading_over_rotated_rounds(monkeypatch):
    """Each function is read once per round, orders rotate, the least reading stays."""
    calls, readings = [], {"a": [30, 10], "b": [20, 25], "c": [5, 50]}

    def fake_peak(fn, device):
        name = fn()
        calls.append(name)
        return readings[name][sum(c == name for c in calls) - 1]

    monkeypatch.setattr(measure, "peak_memory", fake_peak)
    fns = {name: (lambda n=name: n) for name in "abc"}
    peaks = measure.min_peak_memories(fns, torch.device("cpu"), rounds=2)
    assert peaks == {"a": 10, "b": 20, "c": 5}
    assert calls[:3] == measure._round_order(list("abc"), 0)
    assert calls[3:] == measure._round_order(list("abc"), 1) != calls[:3]
    # a platform without measurement gives None, not a number
    monkeypatch.setattr(measure, "peak_memory", lambda fn, device: None)
    assert measure.min_peak_memories(fns, torch.device("cpu")) == dict.fromkeys("abc")
    with pytest.raises(ValueError, match="rounds"):
        measure.min_peak_memories(fns, torch.device("cpu"), rounds=0)


def test_warm_up_and_memory_readings_wait_for_the_engines_choice(monkeypatch):
    """A long problem's first calls each run one candidate under measurement: the
    warm-up goes on until a call measures nothing, and a memory reading taken while
    the engine still measures is taken again."""
    import importlib

    from backpack_tn import functional as tnf
    from backpack_tn.tn import cache_stats, clear_caches

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    monkeypatch.setattr(engine, "_OVER_CALLS_SECONDS", 0.0)  # every problem is long
    monkeypatch.setattr(engine, "_MIN_MEASURE_SECONDS", 0.0)  # two rounds each
    x, v = torch.randn(4, 16, 12, 12), torch.randn(4, 24, 12, 12)
    calls = []

    def fn():
        calls.append(None)
        return tnf.weight_vjp(x, v, 3, padding=1, per_sample=True)

    enabled, threshold = engine.get_autotune()
    try:
        engine.set_autotune(True, min_flops=0)
        engine.set_native(False)
        clear_caches()
        assert measure.settle(fn) == len(calls) >= 5  # 2 samples of >= 2, then one
        before = engine.exploration_runs()
        fn()
        assert engine.exploration_runs() == before  # settled: the choice runs
        clear_caches()
        calls.clear()
        measure.min_peak_memories({"tn": fn}, torch.device("cpu"), rounds=1)
        assert len(calls) >= 5 and cache_stats()["exploring"].size == 0
    finally:
        engine.set_autotune(enabled, threshold)
        engine.set_native(True)
        clear_caches()
    plain = []
    assert measure.settle(lambda: plain.append(None)) == 1 == len(plain)


def test_bench_command_measures_memory_per_implementation(tmp_path):
    """Memory rows land on their own implementation; real readings on Linux."""
    out = tmp_path / "run.json"
    argv = ["--models", "2c2d", "--max-layers", "1", "--ops", "forward"]
    argv += ["--batch-size", "4", "--repeats", "1", "--no-plain", "--json", str(out)]
    assert bench_main([*argv, "--memory-rounds", "2"]) == 0
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"tn", "torch", "einconv"}
    if not measure.cpu_memory_supported():
        assert all(r["memory_bytes"] is None for r in rows.values())
        return
    # the forward's result alone is 4·32·28·28 floats; einconv's einsum holds more
    result_bytes = 4 * 32 * 28 * 28 * 4
    for row in rows.values():
        assert row["memory_bytes"] >= 0.9 * result_bytes
    assert rows["einconv"]["memory_bytes"] > rows["torch"]["memory_bytes"]


def _saved_row(layer, op, impl, seconds, memory, description="5x5 s1 p2 1→32 @28x28"):
    return dict(
        layer=layer,
        description=description,
        operation=op,
        implementation=impl,
        time_s=seconds,
        memory_bytes=memory,
        rel_error=0.0,
        category="general",
    )


def _run_file(path, times, layers=("a",), batch_size=8, operations=("kfac_expand",)):
    results = [
        _saved_row(layer, operation, impl, t, None, "3x3")
        for layer in layers
        for operation in operations
        for impl, t in zip(("tn", "unfold"), times)
    ]
    meta = {"command": "bench", "batch_size": batch_size}
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return str(path)


def test_merge_takes_the_minimum_over_runs_and_concatenates_parts(tmp_path):
    from backpack_tn.bench.merge import main as merge_main

    one = _run_file(tmp_path / "1.json", (2.0, 3.0))
    two = _run_file(tmp_path / "2.json", (1.0, 4.0))
    out, md = tmp_path / "min.json", tmp_path / "min.md"
    assert merge_main([str(out), one, two, "--markdown", str(md)]) == 0
    merged = json.loads(out.read_text())
    assert [r["time_s"] for r in merged["results"]] == [1.0, 3.0]
    assert merged["meta"]["runs"] == 2
    assert "| a (3x3) | kfac_expand | unfold | 3000.00 | 3.00 |" in md.read_text()

    other = _run_file(tmp_path / "3.json", (5.0, 6.0), layers=("b",))
    with pytest.raises(ValueError, match="--concat"):
        merge_main([str(out), one, other])
    assert merge_main([str(out), "--concat", one, other, "--command", "x"]) == 0
    merged = json.loads(out.read_text())
    assert [r["layer"] for r in merged["results"]] == ["a", "a", "b", "b"]
    assert merged["meta"]["command"] == "x" and merged["meta"]["parts"] == 2
    with pytest.raises(ValueError, match="overlap"):
        merge_main([str(out), "--concat", one, two])
    shorter = _run_file(tmp_path / "4.json", (1.0, 1.0), layers=())
    with pytest.raises(ValueError, match="different things"):
        merge_main([str(out), one, shorter])
    batch_16 = _run_file(tmp_path / "5.json", (1.0, 1.0), batch_size=16)
    with pytest.raises(ValueError, match="different settings"):
        merge_main([str(out), one, batch_16])
    with pytest.raises(SystemExit):
        merge_main([str(out), one, two, "--command", "x"])


def test_candidates_command_times_every_kfac_expand_candidate(capsys):
    from backpack_tn.bench.candidates import main as candidates_main

    layers = ["2x32x6x6:k3:s1:p1", "2x32x6x6:k3:s2:p1", "2x3x12x12:k7:s2:p3"]
    assert candidates_main(["--layer", *layers, "--repeats", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    # stride 1: the TN and the shift Gram; 3×3 stride 2: the TN only; 7×7 stride 2:
    # the TN and the polyphase Gram
    assert [row.count("—") for row in rows] == [1, 2, 1]
    assert rows[0].split("|")[4].strip() == "—"  # no polyphase Gram at stride 1
    assert rows[2].split("|")[3].strip() == "—"  # no shift Gram at stride 2
    with pytest.raises(ValueError, match="expected"):
        candidates_main(["--layer", "2x4x6x6:s2"])


def test_calibration_regret_follows_the_choice_rule():
    """Hand-made rows: the cheapest estimate below the threshold, the fastest
    plausible candidate above it."""
    from backpack_tn.bench.calibrate import regret

    # candidate 0: 100 FLOPs, no calls, 1 s; candidate 1: 50 FLOPs, 10 calls, 2 s
    rows = [dict(terms=[[100.0, 0.0, 0.0], [50.0, 10.0, 0.0]], times=[1.0, 2.0])]
    assert regret(rows, call=0.0, copy=0.0, threshold=1e3) == [2.0]  # model: 1
    assert regret(rows, call=10.0, copy=0.0, threshold=1e3) == [1.0]  # model: 0
    # autotuned: both plausible (100 <= 2 * 50), the measured fastest wins
    assert regret(rows, 0.0, 0.0, threshold=0.0, prune=2.0, slack=0.0) == [1.0]
    # not within 1.5x or 10 FLOPs of the cheapest: only candidate 1 is measured
    assert regret(rows, 0.0, 0.0, threshold=0.0, prune=1.5, slack=10.0) == [2.0]
    assert regret(rows, 0.0, 0.0, threshold=0.0, prune=1.5, slack=50.0) == [1.0]
    # with the memory rule: a leaner candidate within 10 % of the fastest is kept
    lean = [dict(rows[0], times=[1.0, 1.05], memory=[100, 10])]
    args = dict(threshold=0.0, prune=2.0, slack=0.0)
    assert regret(lean, 0.0, 0.0, **args) == [1.0]  # the cost model's regret
    assert regret(lean, 0.0, 0.0, **args, memory_rule=True) == [1.05]
    fat = [dict(rows[0], times=[1.0, 1.05], memory=[10, 100])]
    assert regret(fat, 0.0, 0.0, **args, memory_rule=True) == [1.0]
    # only candidate 1 measured (indices map back): the leaner candidate 0 is not
    assert regret(lean, 0.0, 0.0, 0.0, 1.5, 10.0, memory_rule=True) == [1.05]


def test_calibrate_command_times_the_candidates_of_a_zoo_layer(tmp_path, capsys):
    from backpack_tn.bench.calibrate import main as calibrate_main

    out = tmp_path / "cal.json"
    args = ["--models", "2c2d", "--max-layers", "1", "--batch-size", "2"]
    assert calibrate_main([*args, "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["operation"] for r in rows} >= {"diag_ggn", "per_sample_grad"}
    for row in rows:
        assert len(row["candidates"]) == len(row["times"]) == len(row["terms"]) >= 2
        assert len(row["memory"]) == len(row["times"])
        assert all(m > 0 for m in row["memory"])
        assert all(t > 0 for t in row["times"])
    diag = next(r for r in rows if r["operation"] == "diag_ggn")
    assert any(name.startswith("per_class/") for name in diag["candidates"])
    assert "(current)" in capsys.readouterr().out
    assert calibrate_main(["--analyse", str(out)]) == 0
    with pytest.raises(SystemExit):
        calibrate_main([])


def test_merge_update_replaces_the_re_run_operations_only(tmp_path):
    from backpack_tn.bench.merge import main as merge_main

    ops = ("kfac_expand", "diag_ggn")
    base = _run_file(tmp_path / "base.json", (2.0, 3.0), ("a", "b"), operations=ops)
    rerun = _run_file(tmp_path / "new.json", (1.0, 5.0), ("b",), operations=ops[1:])
    out = tmp_path / "out.json"
    assert merge_main([str(out), "--update", base, rerun, "--command", "x; y"]) == 0
    merged = json.loads(out.read_text())
    rows = [(r["layer"], r["operation"], r["time_s"]) for r in merged["results"]]
    assert rows == [
        ("a", "kfac_expand", 2.0),
        ("a", "kfac_expand", 3.0),
        ("a", "diag_ggn", 2.0),
        ("a", "diag_ggn", 3.0),
        ("b", "kfac_expand", 2.0),
        ("b", "kfac_expand", 3.0),
        ("b", "diag_ggn", 1.0),  # re-run
        ("b", "diag_ggn", 5.0),
    ]
    assert merged["meta"]["command"] == "x; y"
    unknown = _run_file(tmp_path / "c.json", (1.0, 1.0), ("c",))
    with pytest.raises(ValueError, match="no measurement"):
        merge_main([str(out), "--update", base, unknown, "--command", "x"])
    with pytest.raises(SystemExit):  # --update needs --command
        merge_main([str(out), "--update", base, rerun])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_calibration_cost_terms_reproduce_the_engines_costs(device):
    """FLOPs, calls and copies recorded per candidate give back the engine's own cost
    with each device's constants (no GPU needed: costs are computed, not run)."""
    import importlib

    from backpack_tn.bench.calibrate import _cost_terms, current_constants
    from backpack_tn.tn import make_geometry, networks

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    geometry = make_geometry((14, 14), 3, 2, 1, 1, 1, "zeros")
    formulations = networks("batch_l2", geometry, True)
    shapes = {"x": (8, 1, 16, 14, 14), "v": (8, 1, 32, 7, 7)}
    dev = torch.device(device)
    before = current_constants(device), ev.CUDA_COSTS, ev.CALL_COST, ev.COPY_COST
    terms = _cost_terms(formulations, shapes, torch.float32, dev)
    # the constants patched while separating the terms are restored
    assert (
        current_constants(device),
        ev.CUDA_COSTS,
        ev.CALL_COST,
        ev.COPY_COST,
    ) == before
    costs = [c.cost for c in ev.candidates(formulations, shapes, torch.float32, dev)]
    call, copy, *_ = current_constants(device)
    assert len(terms) == len(costs) >= 2
    for (flops, calls, copies), cost in zip(terms, costs):
        assert flops + call * calls + copy * copies == pytest.approx(cost, rel=1e-9)
        # the terms are separated, not lumped into the FLOPs: every candidate makes
        # torch calls
        assert calls >= 1 and 0 < flops < cost
    assert any(copies > 0 for *_, copies in terms)  # window candidates copy


def test_calibration_summary_per_device():
    import importlib

    from backpack_tn.bench.calibrate import summary

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    # candidate 1 has fewer FLOPs but many calls: with the GPU's constants only 0 is
    # plausible enough to be measured (the faster one), with the CPU's only 1
    row = dict(
        layer="l",
        operation="op",
        candidates=["a", "b"],
        terms=[[1.2e10, 2.0, 0.0], [5e9, 40.0, 0.0]],
        times=[1.0, 2.0],
    )
    text = summary([dict(row, device="cuda")])
    assert f"{ev.CUDA_COSTS.call:.0e} (current)" in text and "(cuda)" in text
    cpu_text = summary([row])  # rows without a device: CPU
    assert f"{ev.CALL_COST:.0e} (current)" in cpu_text
    current = [line for line in text.splitlines() if "(current)" in line][0]
    cpu_current = [line for line in cpu_text.splitlines() if "(current)" in line][0]
    assert current.split("|")[6].strip() == "1.000"  # regret of choosing 0
    assert cpu_current.split("|")[6].strip() == "2.000"
    with pytest.raises(ValueError, match="device types"):
        summary([row, dict(row, device="cuda")])


@pytest.mark.parametrize("device, bound", [("cpu", 1e9), ("cuda", 1e11)])
def test_calibrate_max_cost_default_per_device(device, bound, monkeypatch, tmp_path):
    """On a GPU every call is priced at 1e9: the CPU's bound would skip everything."""
    from backpack_tn.bench import calibrate

    seen = {}
    row = dict(
        layer="l",
        operation="op",
        device=torch.device(device).type,
        candidates=["a", "b"],
        terms=[[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]],
        times=[1.0, 1.0],
    )

    def fake_record(*args, on_layer=None):
        seen["max_cost"] = args[4]
        on_layer([row])  # saved after every layer
        return [row]

    monkeypatch.setattr(calibrate, "record", fake_record)
    out = tmp_path / "cal.json"
    args = ["--models", "2c2d", "--device", device, "--json", str(out)]
    assert calibrate.main(args) == 0
    assert seen["max_cost"] == bound
    assert json.loads(out.read_text())["rows"] == [row]
    assert calibrate.main([*args[:-2], "--max-cost", "5"]) == 0
    assert seen["max_cost"] == 5.0


def test_model_bench_reports_first_calls(capsys, monkeypatch):
    """Model level: every pass is timed on its first call and in steady state;
    backpack_tn's first call of each extension starts from empty caches."""
    import importlib

    from backpack_tn.bench import models
    from backpack_tn.tn import clear_caches

    engine = importlib.import_module("backpack_tn.tn.evaluate")
    # every problem measured over calls, two rounds: later passes still measure
    monkeypatch.setattr(engine, "_OVER_CALLS_SECONDS", 0.0)
    monkeypatch.setattr(engine, "_LONG_RUN_SECONDS", 0.0)
    monkeypatch.setattr(engine, "_MIN_MEASURE_SECONDS", 0.0)
    cleared = []

    def clear():
        cleared.append(True)
        clear_caches()

    monkeypatch.setattr(models, "clear_caches", clear)
    argv = ["--model", "allcnnc", "--batch-size", "2", "--repeats", "1"]
    argv += ["--extensions", "BatchGrad", "SumGradSquared", "--no-memory"]
    assert models.main(argv) == 0
    assert len(cleared) == 2  # once per backpack_tn extension, never for stock
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| extension"))
    assert header.split("|")[-4:-1] == [
        " stock first call [ms] ",
        " backpack_tn first call [ms] ",
        " backpack_tn later passes measuring ",
    ]
    row = next(line for line in lines if line.startswith("| BatchGrad"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert all(float(c) > 0 for c in cells[1:3] + cells[-3:-1])  # times in ms
    passes, seconds = cells[-1].split(" ", 1)  # e.g. "3 (0.2 s)"
    assert int(passes) >= 1 and seconds.startswith("(") and seconds.endswith(" s)")


@pytest.mark.parametrize("suite", ["models", "kfac"])
def test_model_level_memory_is_read_per_pass(suite, capsys, monkeypatch):
    """Both model-level suites read memory in rotated rounds, one column per pass."""
    import importlib

    module = importlib.import_module(f"backpack_tn.bench.{suite}")
    seen = []

    def fake(fns, device, rounds):  # records what is measured, returns its index
        seen.append((sorted(fns), rounds))
        return {key: (key + 1) * 2**20 for key in fns}

    monkeypatch.setattr(module, "min_peak_memories", fake)
    argv = ["--model", "allcnnc", "--batch-size", "2", "--repeats", "1"]
    argv += ["--memory-rounds", "3"]
    if suite == "models":
        argv += ["--extensions", "BatchGrad"]  # jobs: plain, stock, backpack_tn
    else:
        argv += ["--jobs", "KFAC-reduce"]  # jobs: curvlinops, backpack_tn
    assert module.main(argv) == 0
    jobs = 3 if suite == "models" else 2
    assert seen == [(list(range(jobs)), 3)]
    lines = capsys.readouterr().out.splitlines()
    row = next(
        r for r in lines if r.startswith("| BatchGrad" if jobs == 3 else "| KFAC")
    )
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # stock and backpack_tn peaks: the readings of the last two jobs, in MiB
    assert cells[4:6] == [str(jobs - 1), str(jobs)]


def test_pairs_command_times_the_engines_planned_steps(capsys):
    from backpack_tn.bench.pairs import main as pairs_main

    assert pairs_main(["--models", "2c2d", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "distinct two-operand steps" in out and "| einsum / bmm |" in out
    timed = int(out.split(" timed as a bmm")[0].split(", ")[-1])
    assert timed >= 1  # small layers: the engine plans some steps as a bmm
    assert out.count("` | (") == timed  # one table row per timed step


def test_recheck_finds_the_rows_that_missed():
    """A miss: slower than the fastest stock by more than the tolerance, or more
    memory than the leanest by more than the tolerance and the minimum bytes."""
    from backpack_tn.bench.recheck import find_layer, misses

    mib = 1 << 20
    rows = report.comparisons(
        [
            _saved_row("L", "slow", "tn", 1.1, mib, "d"),
            _saved_row("L", "slow", "unfold", 1.0, mib, "d"),
            _saved_row("L", "noise", "tn", 1.04, mib, "d"),
            _saved_row("L", "noise", "torch", 1.0, mib, "d"),
            _saved_row("L", "fat", "tn", 1.0, 2 * mib, "d"),
            _saved_row("L", "fat", "backpack", 2.0, mib, "d"),
            _saved_row("L", "tiny", "tn", 1.0, 40_000, "d"),  # 2x, but 20 kB
            _saved_row("L", "tiny", "unfold", 1.0, 20_000, "d"),
            _saved_row("L", "both", "tn", 2.0, 2 * mib, "d"),
            _saved_row("L", "both", "unfold", 1.0, mib, "d"),
            _saved_row("L", "einconv-only", "tn", 2.0, 2 * mib, "d"),
            _saved_row("L", "einconv-only", "einconv", 1.0, mib, "d"),
        ]
    )
    assert misses(rows) == {
        ("L", "slow"): ["time"],
        ("L", "fat"): ["memory"],
        ("L", "both"): ["time", "memory"],
    }
    assert misses(rows, tolerance=1.2) == {
        ("L", "fat"): ["memory"],
        ("L", "both"): ["time", "memory"],
    }
    assert ("L", "tiny") in misses(rows, min_memory=0)
    assert find_layer("2c2d-1").in_channels == 32
    assert find_layer("3x3-s1").name == "3x3-s1"
    with pytest.raises(ValueError, match="Unknown benchmark layer"):
        find_layer("2c2d-99")


def test_recheck_command_re_runs_only_the_missed_rows(tmp_path, capsys):
    """Only the missed (layer, operation) pairs run again, with the saved file's
    batch size; the re-run is saved under the same name, compared row by row, and
    merges back into the saved file. Without memory readings, rows that missed only
    by memory are not re-run (and not counted as fixed); unknown layers are skipped.
    """
    from backpack_tn.bench.merge import update
    from backpack_tn.bench.recheck import main as recheck_main

    mib = 1 << 20
    layer1 = "5x5 s1 p2 32→64 @14x14"
    saved = tmp_path / "zoo_2c2d.json"
    saved.write_text(
        json.dumps(
            {
                "meta": {
                    "batch_size": 2,
                    "classes": 3,
                    "dtype": "float32",
                    # this machine's: a re-run merges into a run of the same settings
                    "device": platform.processor() or platform.machine(),
                    "threads": 1,
                    "torch": torch.__version__,
                },
                "results": [
                    # per-sample gradients: slower than unfold (a miss)
                    _saved_row("2c2d-0", "per_sample_grad", "tn", 2.0, mib),
                    _saved_row("2c2d-0", "per_sample_grad", "unfold", 1.0, mib),
                    # KFAC-reduce: faster and leaner (no miss)
                    _saved_row("2c2d-0", "kfac_reduce", "tn", 1.0, mib),
                    _saved_row("2c2d-0", "kfac_reduce", "unfold", 2.0, mib),
                    # batch L2 on the second layer: more memory (a miss)
                    _saved_row("2c2d-1", "batch_l2", "tn", 1.0, 3 * mib, layer1),
                    _saved_row("2c2d-1", "batch_l2", "unfold", 2.0, mib, layer1),
                    # a layer of no known model: skipped
                    _saved_row("mynet-3", "forward", "tn", 2.0, mib),
                    _saved_row("mynet-3", "forward", "torch", 1.0, mib),
                ],
            }
        )
    )
    out = tmp_path / "out"
    args = [str(saved), "--json-dir", str(out), "--repeats", "1"]
    assert recheck_main(args + ["--no-memory"]) == 0  # implementations agreed
    rerun = json.loads((out / "zoo_2c2d.json").read_text())
    assert rerun["meta"]["batch_size"] == 2 and rerun["meta"]["rechecked"] == str(saved)
    assert {(r["layer"], r["operation"]) for r in rerun["results"]} == {
        ("2c2d-0", "per_sample_grad")
    }
    assert {r["implementation"] for r in rerun["results"]} >= {"tn", "unfold"}
    captured = capsys.readouterr()
    text = captured.out
    assert "- missed by time: 2 before; re-measured 1, of which " in text
    assert "1 not re-measured" in text  # mynet-3's forward
    assert "- missed by memory: 1 before; re-measured 0, of which 0 still miss" in text
    assert "| 2c2d-0 (5x5 s1 p2 1→32 @28x28) | per_sample_grad | time | 0.50× " in text
    assert f"| 2c2d-1 ({layer1}) | batch_l2 | memory | 3.00× " in text
    assert "Unknown benchmark layer 'mynet-3'" in captured.err
    # the re-run replaces the saved rows it re-measured, the others stay; without
    # memory readings of its own, a re-run row keeps the saved one's
    merged = update([str(saved), str(out / "zoo_2c2d.json")], "test")
    assert len(merged["results"]) == len(rerun["results"]) + 6
    replaced = [r for r in merged["results"] if r["operation"] == "per_sample_grad"]
    assert {r["implementation"]: r["memory_bytes"] for r in replaced}["tn"] == mib
    assert all(r["time_s"] != 2.0 for r in replaced if r["implementation"] == "tn")
    # two files of the same name would write one output
    other = tmp_path / "other"
    other.mkdir()
    (other / "zoo_2c2d.json").write_text(saved.read_text())
    with pytest.raises(SystemExit):
        recheck_main(args + [str(other / "zoo_2c2d.json")])


def test_per_layer_operations_time_everything_before_any_memory(monkeypatch):
    """``run_layers(layer_operations=...)`` runs each layer's own operations, and
    every timing before the first memory reading (which changes malloc's state)."""
    from backpack_tn.bench import run as bench_run

    events = []

    def timed(fns, device, repeats):
        events.append(("time", len(fns)))
        return {name: 1.0 for name in fns}

    def peaks(fns, device, rounds):
        events.append(("memory", len(fns)))
        return {name: 1 for name in fns}

    monkeypatch.setattr(bench_run, "interleaved_medians", timed)
    monkeypatch.setattr(bench_run, "min_peak_memories", peaks)
    layers = [model_layers("2c2d")[0], model_layers("2c2d")[1]]
    results = bench_run.run_layers(
        layers,
        (),
        2,
        3,
        torch.float32,
        torch.device("cpu"),
        1,
        with_plain=False,
        layer_operations={"2c2d-0": ["forward"], "2c2d-1": ["batch_l2", "kfac_reduce"]},
    )
    assert {(r.layer, r.operation) for r in results} == {
        ("2c2d-0", "forward"),
        ("2c2d-1", "batch_l2"),
        ("2c2d-1", "kfac_reduce"),
    }
    kinds = [kind for kind, _ in events]
    assert kinds == ["time"] * 3 + ["memory"] * 3
    assert all(r.memory_bytes == 1 for r in results)


def test_timing_and_memory_set_their_own_allocator_state(monkeypatch):
    """Timing fixes glibc's thresholds (blocks below 32 MiB from the heap, freed
    memory kept) whatever ran before; a memory reading switches to its own state
    (64 KiB and up by mmap, the heap trimmed)."""
    settings = []

    class FakeLibc:
        def mallopt(self, option, value):
            settings.append((option, value))
            return 1

        def malloc_trim(self, pad):
            settings.append(("trim", pad))
            return 1

    monkeypatch.setattr(measure, "_libc", FakeLibc)
    interleaved_medians({"f": lambda: None}, torch.device("cpu"), repeats=1)
    assert settings[:2] == [(-3, 32 << 20), (-1, 256 << 20)]
    settings.clear()
    if measure.cpu_memory_supported():
        measure.peak_memory(lambda: torch.zeros(10), torch.device("cpu"))
        assert settings == [(-3, 64 << 10), (-1, 128 << 10), ("trim", 0)]
    settings.clear()
    median_time(lambda: None, torch.device("cpu"), repeats=1, warmup=0)
    assert settings == [(-3, 32 << 20), (-1, 256 << 20)]
