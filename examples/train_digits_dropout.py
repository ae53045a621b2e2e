"""Train a small CNN on scikit-learn's 8×8 digits with and without tensor dropout.

The data set (1,797 real 8×8 grey-scale digits, 10 classes) ships with scikit-learn,
so nothing is downloaded. The same network, initialisation, data order and optimiser
are trained with exact gradients and with tensor dropout on every convolution
(``backpack_tn.dropout.convert``); for each run it reports the test accuracy, the
bytes saved for backward by one training step (``saved_tensors_hooks``: the
convolutions' share and the whole model's unique storages), the process's peak
resident memory (VmHWM, Linux) and the training time.

``python examples/train_digits_dropout.py`` (``--quick`` for a tiny run, used by the
tests).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

from backpack_tn import dropout as tnd


def load(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def step_saved_bytes(model, x, y) -> dict:
    """Bytes saved for backward by one training step (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    in_conv = [False]
    records = []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            records.append((s.data_ptr(), s.nbytes(), in_conv[0]))
        return t

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(
                m.register_forward_pre_hook(lambda *_: in_conv.__setitem__(0, 1))
            )
            hooks.append(m.register_forward_hook(lambda *_: in_conv.__setitem__(0, 0)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    del loss
    conv = {p: n for p, n, c in records if c}
    return {
        "conv": sum(conv.values()),
        "total": sum(dict((p, n) for p, n, _ in records).values()),
    }


def vm_hwm_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def train(model, data, epochs: int, batch_size: int, seed: int = 0) -> dict:
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=order)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    model.train()
    saved = step_saved_bytes(model, x_tr[:batch_size], y_tr[:batch_size])
    return dict(accuracy=accuracy, time=elapsed, **saved)


RUNS = ("exact", "spatial", "channel")


def run_one(name: str, args) -> dict:
    data = load()
    if args.quick:
        data = tuple(t[:200] for t in data)
    model = make_model()
    if name != "exact":
        tnd.convert(model, args.keep_prob, name)
    torch.manual_seed(1)  # the dropout masks draw from torch's global RNG
    result = train(model, data, args.epochs, args.batch_size)
    result["vm_hwm_mib"] = vm_hwm_mib()
    result["sizes"] = (len(data[0]), len(data[2]))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keep-prob", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny run (for tests)")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:  # one configuration in this (fresh) process: print its result
        print(json.dumps(run_one(args.run, args)))
        return 0
    # Each run in a fresh process, so that its peak resident memory is its own.
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for name in RUNS:
        if args.quick:  # in-process (fast); the peak RSS is then shared
            results[name] = run_one(name, args)
            continue
        out = subprocess.run(
            [sys.executable, __file__, *forwarded, "--run", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    n_train, n_test = results["exact"]["sizes"]
    print(
        f"digits 8x8: {n_train} train / {n_test} test, {args.epochs} epochs, batch "
        f"{args.batch_size}, Adam lr 3e-3, keep_prob {args.keep_prob}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| run | test accuracy | conv saved / step (KiB) | model saved / step (KiB) "
        "| train time (s) | peak RSS, VmHWM (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        label = name if name == "exact" else f"{name} p={args.keep_prob}"
        print(
            f"| {label} | {r['accuracy']:.3f} | {r['conv'] / 1024:.0f} | "
            f"{r['total'] / 1024:.0f} | {r['time']:.1f} | {r['vm_hwm_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
