"""Order bias of the benchmark's interleaved timing, old and new warm-up.

Two calls of the same torch kernel (MobileNet-v2's 3×3 stride-2 depthwise input VJP,
batch 8: ``backpack_tn``'s, which runs torch's kernel there, and
``torch.nn.grad.conv2d_input``) are timed in interleaved rounds next to a heavy call
that allocates and frees 65 MB (as einconv does), in both listing orders, with the
warm-up rule before this session (as many untimed calls as the sample has, up to
five) and the current one (``bench.measure.WARM_SECONDS``). Run from the repository
root, pinned to one core::

    taskset -c 0 python docs/bench/check_7e72224/warmup_bias.py
"""

from __future__ import annotations

import torch

from backpack_tn import functional as tnf
from backpack_tn.bench import measure


def _old_rule(single: float, loops: int) -> int:
    return min(loops, 5) if single < measure.WARM_BELOW_SECONDS else 0


def main() -> None:
    """Print the medians in ms per rule and order (three rounds, as the tables)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, c, size = 8, 144, 56
    g = torch.randn(n, c, size // 2, size // 2)
    w = torch.randn(c, 1, 3, 3)
    shape = (n, c, size, size)
    calls = {
        "tn": lambda: tnf.input_vjp(g, w, shape, stride=2, padding=1, groups=c),
        "torch": lambda: torch.nn.grad.conv2d_input(shape, w, g, 2, 1, 1, c),
        "heavy": lambda: torch.randn(8, 144, 56, 56, 9).sum(),
    }
    new_rule = measure._warm_calls
    for rule_name, rule in (("old", _old_rule), ("new", new_rule)):
        measure._warm_calls = rule
        for order in (("tn", "torch", "heavy"), ("torch", "tn", "heavy")):
            fns = {name: calls[name] for name in order}
            for _ in range(2):
                medians = measure.interleaved_medians(fns, torch.device("cpu"), 3)
                shown = ", ".join(f"{k} {1e3 * medians[k]:.2f}" for k in order[:2])
                print(f"{rule_name} warm-up, {order[0]} listed first: {shown}")
    measure._warm_calls = new_rule


if __name__ == "__main__":
    main()
