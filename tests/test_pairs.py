"""Two-operand einsums as one batched GEMM (``tn.pairs``) against torch.einsum."""

from __future__ import annotations

import random

import pytest
import torch

from backpack_tn.tn.pairs import compile_pair

# the contractions the engine's plans run, and the cases of the layout rules
EQUATIONS = [
    "nko,nco->nck",  # per-sample gradient: batch, rows, columns, inner
    "nko,nco->nkc",  # the same, the result's axes in the operands' order
    "vnko,vnco->nck",  # summed over the classes (shared, not kept): inner
    "nio,njo->ij",  # KFAC-expand Gram: the batch is inner too
    "ni,nj->ij",
    "abc,c->ab",  # matrix-vector: no columns
    "a,b->ab",  # outer product: no inner axes
    "ab,ab->",  # full contraction: a scalar
    "abc,abd->abcd",  # batch only, no inner axes
    "abcd,dc->ab",  # inner axes in another order in each operand
    "xabc,cd->abd",  # an axis of one operand summed first
    "abc,cde->eab",  # the result's axes in the second operand's order first
    "ab,bc->ca",  # columns before rows: the operands swap
]


def _random_layout(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values in a random memory order (a permuted contiguous copy)."""
    order = list(range(t.dim()))
    rng.shuffle(order)
    inverse = [order.index(i) for i in range(t.dim())]
    return t.permute(order).contiguous().permute(inverse)


def _operands(equation: str, rng: random.Random, sizes=(1, 2, 3, 4, 5)):
    inputs = equation.split("->")[0].split(",")
    size = {c: rng.choice(sizes) for c in set("".join(inputs))}
    shapes = [[size[c] for c in term] for term in inputs]
    return [torch.randn(s, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize("equation", EQUATIONS)
def test_pair_equals_einsum(equation: str, layout: str):
    rng = random.Random(equation + layout)
    torch.manual_seed(0)
    for _ in range(5):
        a, b = _operands(equation, rng)
        if layout == "permuted":
            a, b = _random_layout(a, rng), _random_layout(b, rng)
        pair = compile_pair(equation, a, b, allow_copy=True)
        assert pair is not None
        # planned on a and b, run on new operands of their shapes and other layouts
        for x, y in [(a, b), (torch.randn_like(a), _random_layout(b.clone(), rng))]:
            expected = torch.einsum(equation, x, y)
            result = pair(x, y)
            assert result.shape == expected.shape
            torch.testing.assert_close(result, expected)


def test_random_equations_equal_einsum():
    """Random equations over up to seven axes, each axis in one or both operands."""
    rng = random.Random(0)
    torch.manual_seed(0)
    letters = "abcdefg"
    for _ in range(400):
        axes = rng.sample(letters, rng.randint(1, 7))
        first = [c for c in axes if rng.random() < 0.7] or axes[:1]
        second = [c for c in axes if rng.random() < 0.7] or axes[-1:]
        rng.shuffle(first)
        rng.shuffle(second)
        union = sorted(set(first) | set(second))
        rng.shuffle(union)
        out = [c for c in union if rng.random() < 0.5]
        equation = f"{''.join(first)},{''.join(second)}->{''.join(out)}"
        a, b = (_random_layout(t, rng) for t in _operands(equation, rng, (1, 2, 3)))
        pair = compile_pair(equation, a, b, allow_copy=True)
        assert pair is not None, equation
        torch.testing.assert_close(pair(a, b), torch.einsum(equation, a, b))


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("aab,bc->ac", [(2, 2, 3), (3, 4)]),  # a diagonal
        ("ab,bc->acc", [(2, 3), (3, 4)]),  # an output axis twice
        ("ab,bc->ad", [(2, 3), (3, 4)]),  # an output axis of neither operand
        ("ab,bc->ac", [(2, 1), (3, 4)]),  # broadcast size-1 axis
    ],
    ids=["diagonal", "repeated-output", "unknown-output", "broadcast"],
)
def test_left_to_einsum(equation, shapes):
    """What a single ``bmm`` does not express is left to ``torch.einsum``."""
    a, b = (torch.randn(s) for s in shapes)
    assert compile_pair(equation, a, b, allow_copy=True) is None


def test_swapped_result_is_contiguous():
    """Where the result lists the second operand's axes first, no copy is needed."""
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    result = compile_pair("ab,bc->ca", a, b, allow_copy=True)(a, b)
    assert result.is_contiguous()
    torch.testing.assert_close(result, (a @ b).T)


@pytest.mark.parametrize(
    "equation, shapes, planned",
    [
        # a small per-sample gradient: both operands are matrices as they lie
        ("nko,nco->nck", [(2, 36, 16), (2, 4, 16)], True),
        # large: left to torch.einsum unless a batched dot product
        ("nko,nco->nck", [(32, 864, 256), (32, 96, 256)], False),
        ("nabc,nabc->n", [(32, 96, 16, 16), (32, 96, 16, 16)], True),
        # the per-sample axis (shared, kept) last in memory: a strided batch
        ("ko,co->ck", [(36, 16), (4, 16)], True),
        ("kon,con->nck", [(36, 16, 2), (4, 16, 2)], False),
        # the inner axes of one operand in another order than the other's: a copy
        ("abcd,dc->ab", [(2, 3, 4, 5), (5, 4)], False),
    ],
    ids=["small", "large", "large-dot", "no-batch", "batch-last", "copy"],
)
def test_engine_plans_small_views_only(equation, shapes, planned):
    """By default a pair is planned only where the measurements favoured the ``bmm``:
    small, the batch outermost and both operands viewed as they lie."""
    a, b = (torch.randn(s, dtype=torch.float64) for s in shapes)
    pair = compile_pair(equation, a, b)
    assert (pair is not None) == planned
    if pair is not None:
        torch.testing.assert_close(pair(a, b), torch.einsum(equation, a, b))


def test_plans_run_first_in_several_threads_at_once(monkeypatch):
    """Two first runs of one contraction plan, interleaved so that both plan its first
    step before either reaches the second, give the right results, and so does a
    later run.

    Each first run plans its own pairs and the plan keeps one complete set: with a
    list shared by the runs and appended to step by step, the second thread here ran
    the first step's ``bmm`` as the second step (found by a review)."""
    import importlib
    import threading
    import time

    ev = importlib.import_module("backpack_tn.tn.evaluate")
    both_planning = threading.Barrier(2, timeout=10)
    early_done, late_done = threading.Event(), threading.Event()
    late = threading.local()

    def planned_together(equation, a, b):
        if not hasattr(late, "value"):  # the first step, in each thread
            late.value = both_planning.wait() == 1
            if late.value:  # returns after the other thread has kept its first pair
                early_done.wait(10)
                time.sleep(0.05)
                late_done.set()
            else:
                early_done.set()
        elif not late.value:  # the early thread's second step waits for the late one
            late_done.wait(10)
            time.sleep(0.05)
        return compile_pair(equation, a, b)

    monkeypatch.setattr(ev, "compile_pair", planned_together)
    equation = "ab,bc,cd->da"
    ops = [torch.randn(4, 5), torch.randn(5, 6), torch.randn(6, 4)]
    ev._PLANS.clear()
    plan = ev._plan(equation, [tuple(o.shape) for o in ops], ops[0].dtype, None)
    expected = torch.einsum(equation, *ops)
    results = [None, None]

    def work(i):
        results[i] = plan.expression(*ops)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for result in results + [plan.expression(*ops)]:  # and a later call
        torch.testing.assert_close(result, expected)
