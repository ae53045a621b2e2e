"""Laplace approximations with laplace-torch 0.3, stock vs ``backpack_tn.install()``.

laplace-torch builds its BackPACK extensions and curvlinops operators itself, so it
cannot be handed ``backpack_tn``'s classes. ``backpack_tn.install()`` routes every
BackPACK extension constructed afterwards, and curvlinops' own
``KFACLinearOperator``, through the tensor-network engine; laplace-torch then uses
it unchanged. This script trains a small Conv2d CNN and a Conv1d model (digits'
rows as channels) on scikit-learn's 8×8 digits for a few epochs (float64), then fits

* a diagonal Laplace approximation with ``BackPackGGN`` (``DiagGGNExact``) and
  ``BackPackEF`` (``SumGradSquared``),
* a Kronecker-factored one with ``BackPackGGN`` (``KFLR``), ``CurvlinopsGGN`` and
  ``CurvlinopsEF`` (curvlinops' ``KFACLinearOperator``, exact / empirical Fisher),

once with stock BackPACK/curvlinops and once after ``backpack_tn.install()``, and
prints side by side the fit time, the peak extra memory of a fit, the number of TN
contractions the fit ran (zero for stock, checked), the log marginal likelihood
(prior precision 1) and the largest relative difference of the posterior precision
(diagonal, or Kronecker factors). Stock curvlinops refuses the Conv1d model; with
``backpack_tn`` it works.
(laplace-torch's *diagonal* curvlinops backends use ``torch.func`` Jacobians, not
curvlinops operators, so they are not affected by ``backpack_tn`` and not shown.)

Needs the optional extra: ``pip install -e ".[laplace]"`` (laplace-torch 0.3).

``python examples/laplace_with_backpack_tn.py`` (``--quick`` for a tiny run).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from functools import partial

import torch
from torch import nn

import backpack_tn
from backpack_tn.bench.measure import peak_memory

warnings.filterwarnings("ignore", "Full backward hook is firing")
warnings.filterwarnings("ignore", category=FutureWarning)
DTYPE = torch.float64


def load(num_train: int | None = None):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=DTYPE).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    if num_train is not None:
        x, y = x[:num_train], y[:num_train]
    return x, y


def conv2d_model(channels: int) -> nn.Sequential:
    """Input ``[N, 1, 8, 8]``."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 16, 10),
    )


def conv1d_model(channels: int) -> nn.Sequential:
    """Input ``[N, 8, 8]``: the 8 image rows as channels, the columns as length."""
    return nn.Sequential(
        nn.Conv1d(8, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 4, 10),
    )


def train(model: nn.Module, x, y, epochs: int, batch_size: int = 64) -> float:
    """A few epochs of Adam (a MAP estimate for the Laplace approximation)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def contractions() -> int:
    """Look-ups of the engine's plans so far (evidence that the TN engine ran).

    Every call of ``backpack_tn.functional`` first looks for its call's plan, and
    every TN evaluation outside such a plan for its prepared contraction (plan
    once, run many).
    """
    stats = backpack_tn.cache_stats()
    return sum(stats[n].hits + stats[n].misses for n in ("call-plans", "prepared"))


def fit(model, loader, structure: str, backend, tn: bool):
    """Fit a Laplace approximation; returns ``(la, seconds)`` or the refusal."""
    from laplace import Laplace

    if tn:
        backpack_tn.install()
    try:
        la = Laplace(
            copy.deepcopy(model),  # BackPACK extends the model it is given
            "classification",
            subset_of_weights="all",
            hessian_structure=structure,
            backend=backend,
        )
        start = time.perf_counter()
        la.fit(loader)
        return la, time.perf_counter() - start
    except NotImplementedError as e:
        return f"{type(e).__name__}: {e}", None
    finally:
        if tn:
            backpack_tn.uninstall()


def precision(la) -> list:
    """The fitted curvature: the diagonal, or every Kronecker factor."""
    H = la.H
    if isinstance(H, torch.Tensor):
        return [H]
    # after fit, laplace keeps the eigendecomposed factors Q diag(λ) Qᵀ
    return [
        (Q * lam) @ Q.T
        for Qs, lams in zip(H.eigenvectors, H.eigenvalues)
        for Q, lam in zip(Qs, lams)
    ]


def mib(num_bytes) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def rel_diff(a: list, b: list) -> float:
    return max(
        ((x - y).norm() / y.norm().clamp_min(1e-300)).item() for x, y in zip(a, b)
    )


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.epochs, args.channels, args.batch_size = 128, 1, 4, 64

    from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN

    torch.manual_seed(0)
    x, y = load(args.num_train)
    models = {
        "Conv2d CNN": (conv2d_model(args.channels).to(DTYPE), x),
        "Conv1d model": (conv1d_model(args.channels).to(DTYPE), x.squeeze(1)),
    }
    runs = [
        ("diag", BackPackGGN),
        ("diag", BackPackEF),
        ("kron", BackPackGGN),
        ("kron", CurvlinopsGGN),
        ("kron", CurvlinopsEF),
    ]
    prior = torch.tensor(1.0, dtype=DTYPE)
    rows = []
    for name, (model, inputs) in models.items():
        acc = train(model, inputs, y, args.epochs)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params} parameters, train accuracy {acc:.3f}")
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(inputs, y), batch_size=args.batch_size
        )
        for structure, backend in runs:
            before = contractions()
            stock, t_stock = fit(model, loader, structure, backend, tn=False)
            assert contractions() == before, "stock run used the TN engine"
            tn, t_tn = fit(model, loader, structure, backend, tn=True)
            n_tn = contractions() - before
            if isinstance(tn, str):
                raise RuntimeError(f"backpack_tn failed on {name}: {tn}")
            assert n_tn > 0, "the TN run did not use the TN engine"
            lml_tn = tn.log_marginal_likelihood(prior).item()
            # peak extra memory of a second fit each (after the timed ones)
            cpu = torch.device("cpu")
            mem_tn = peak_memory(
                partial(fit, model, loader, structure, backend, True), cpu
            )
            row = dict(
                mem_tn=mem_tn,
                model=name,
                structure=structure,
                backend=backend.__name__,
                t_tn=t_tn,
                lml_tn=lml_tn,
                n_tn=n_tn,
            )
            if isinstance(stock, str):
                row.update(stock=stock)
            else:
                row.update(
                    mem_stock=peak_memory(
                        partial(fit, model, loader, structure, backend, False), cpu
                    ),
                    t_stock=t_stock,
                    lml_stock=stock.log_marginal_likelihood(prior).item(),
                    diff=rel_diff(precision(tn), precision(stock)),
                )
            rows.append(row)

    print(
        "\n| model | Hessian | backend | stock fit [s] | TN fit [s] | "
        "stock peak [MiB] | TN peak [MiB] | "
        "TN contractions | log marg. lik. stock | log marg. lik. TN | "
        "max rel. diff of precision |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['model']} | {r['structure']} | {r['backend']} |"
        if "stock" in r:
            print(
                f"{head} refused | {r['t_tn']:.3f} | — | {mib(r['mem_tn'])} | "
                f"{r['n_tn']} | — | {r['lml_tn']:.4f} | — |"
            )
        else:
            print(
                f"{head} {r['t_stock']:.3f} | {r['t_tn']:.3f} | "
                f"{mib(r['mem_stock'])} | {mib(r['mem_tn'])} | {r['n_tn']} | "
                f"{r['lml_stock']:.4f} | {r['lml_tn']:.4f} | {r['diff']:.1e} |"
            )
    for r in rows:
        if "stock" in r:
            print(
                f"stock, {r['model']} / {r['backend']} ({r['structure']}): {r['stock']}"
            )

    compared = [r for r in rows if "diff" in r]
    worst = max(r["diff"] for r in compared)
    lml = max(abs(r["lml_tn"] - r["lml_stock"]) / abs(r["lml_stock"]) for r in compared)
    assert worst < 1e-8 and lml < 1e-8, (worst, lml)
    print(
        f"OK: stock and TN posteriors agree (precision {worst:.1e}, "
        f"log marginal likelihood {lml:.1e} relative)"
    )
    return rows


if __name__ == "__main__":
    main()
