"""KFAC and EKFAC for Conv1d and Conv3d models with ``backpack_tn.linops``.

``backpack_tn.linops.KFACLinearOperator`` / ``EKFACLinearOperator`` are drop-in
subclasses of curvlinops' operators whose convolution statistics (the KFAC input
covariance, EKFAC's per-example gradients) are tensor-network contractions. Stock
curvlinops 3.0 supports only ``Linear`` and ``Conv2d``; the TN operators also take
``Conv1d`` and ``Conv3d``. This script

1. shows stock curvlinops refusing a Conv1d and a Conv3d model (exception caught);
2. builds TN KFAC and EKFAC for both models (MSE regression, float64, exact GGN
   factors ``fisher_type='type-2'``) and checks them:

   * Conv1d: against stock curvlinops on a ``Conv2d`` twin (kernel ``1×K`` on a
     height-1 input, same weights): matrix-vector products (KFAC-expand,
     KFAC-reduce, EKFAC), trace and log-determinant;
   * Conv3d: the input covariance of every convolution against patches extracted
     independently here with ``Tensor.unfold`` (curvlinops' conventions: divide by
     the number of data and of output positions);

3. forms the inverse-KFAC preconditioned gradient ``(K + λI)⁻¹ g`` with
   ``curvlinops.KFACInverseLinearOperator`` (exact damping) and checks
   ``(K + λI) x = g``; prints trace and log-determinant.

``python examples/curvlinops_kfac.py`` (``--quick`` for a tiny run).
"""

from __future__ import annotations

import argparse
import time

import curvlinops
import torch
from curvlinops import KFACInverseLinearOperator
from torch import nn

from backpack_tn.linops import EKFACLinearOperator, KFACLinearOperator

DTYPE = torch.float64


def conv1d_model(channels: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(3, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, dilation=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(channels, outputs),
    )


def conv2d_twin(model: nn.Sequential) -> nn.Sequential:
    """The Conv1d model as a Conv2d model on ``[N, C, 1, L]`` inputs, same weights."""
    layers = []
    for m in model:
        if isinstance(m, nn.Conv1d):
            twin = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                (1, m.kernel_size[0]),
                stride=(1, m.stride[0]),
                padding=(0, m.padding[0]),
                dilation=(1, m.dilation[0]),
                bias=m.bias is not None,
            ).to(m.weight.dtype)
            with torch.no_grad():
                twin.weight.copy_(m.weight.unsqueeze(2))
                twin.bias.copy_(m.bias)
            layers.append(twin)
        elif isinstance(m, nn.AdaptiveAvgPool1d):
            layers.append(nn.AdaptiveAvgPool2d(1))
        else:
            layers.append(m)
    return nn.Sequential(*layers)


def conv3d_model(channels: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(2, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(channels, channels, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(channels, outputs),
    )


def make_data(shape, outputs: int, num_data: int, batch_size: int):
    """Random regression data as a list of ``(X, y)`` batches."""
    X = torch.randn(num_data, *shape, dtype=DTYPE)
    y = torch.randn(num_data, outputs, dtype=DTYPE)
    return list(zip(X.split(batch_size), y.split(batch_size)))


def try_stock(model, loss, data) -> None:
    """Stock curvlinops refuses layers other than Linear/Conv2d."""
    params = list(model.parameters())
    try:
        curvlinops.KFACLinearOperator(model, loss, params, data)
    except NotImplementedError as e:
        print(f"  stock curvlinops.KFACLinearOperator refuses: {type(e).__name__}: {e}")
    else:
        raise AssertionError("stock curvlinops accepted the model")


def kfac_ops(model, loss, data, kfac_approx: str = "expand"):
    """TN KFAC and EKFAC (exact GGN factors), built and timed."""
    params = list(model.parameters())
    # check_deterministic=True would compute the factors in the constructor, and a
    # later compute_kronecker_factors() would add to them (curvlinops 3.0.1 does not
    # reset the factors): compute them once, explicitly, to time them.
    kwargs = dict(fisher_type="type-2", check_deterministic=False)
    start = time.perf_counter()
    K = KFACLinearOperator(model, loss, params, data, kfac_approx=kfac_approx, **kwargs)
    K.compute_kronecker_factors()
    t_kfac = time.perf_counter() - start
    start = time.perf_counter()
    E = EKFACLinearOperator(model, loss, params, data, **kwargs)
    E.compute_kronecker_factors()
    E.compute_eigenvalue_correction()
    t_ekfac = time.perf_counter() - start
    print(f"  TN KFAC factors: {t_kfac * 1e3:.0f} ms, EKFAC: {t_ekfac * 1e3:.0f} ms")
    return K, E


def gradient(model, loss, data) -> list:
    """The gradient of the data set's loss (the mean over batches of equal size)."""
    params = list(model.parameters())
    grads = [torch.zeros_like(p) for p in params]
    for X, y in data:
        for g, gb in zip(grads, torch.autograd.grad(loss(model(X), y), params)):
            g.add_(gb, alpha=1 / len(data))
    return grads


def precondition(op, g: list, damping: float, name: str) -> float:
    """``x = (op + λI)⁻¹ g`` with curvlinops' KFAC inverse; returns the residual."""
    inv = KFACInverseLinearOperator(op, damping=damping, use_exact_damping=True)
    x = inv @ g
    Ax = op @ x
    residual = max(
        ((a + damping * xi - gi).norm() / gi.norm()).item()
        for a, xi, gi in zip(Ax, x, g)
    )
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([t.flatten() for t in x]), torch.cat([t.flatten() for t in g]), 0
    ).item()
    print(
        f"  {name}: preconditioned gradient ‖(K+λI)⁻¹g‖ = "
        f"{torch.cat([t.flatten() for t in x]).norm():.3e}, cos(x, g) = {cos:.3f}, "
        f"relative residual of (K+λI)x = g: {residual:.1e}"
    )
    return residual


def max_rel(a: list, b: list) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


def patches_3d(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``[N·O, C_in·K³]`` patches by padding and ``Tensor.unfold`` (independent ref)."""
    p, k, s, d = conv.padding, conv.kernel_size, conv.stride, conv.dilation
    x = torch.nn.functional.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]))
    for dim in range(3):
        span = d[dim] * (k[dim] - 1) + 1
        x = x.unfold(2 + dim, span, s[dim])[..., :: d[dim]]
    # [N, C, O1, O2, O3, K1, K2, K3] -> [N·O, C·K]
    n, c = x.shape[:2]
    return x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, c * k[0] * k[1] * k[2])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-data", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="Conv1d input length")
    parser.add_argument("--size", type=int, default=12, help="Conv3d input side")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_data, args.batch_size, args.channels = 32, 16, 4
        args.length, args.size = 16, 6

    torch.manual_seed(0)
    outputs = 3
    loss = nn.MSELoss()
    results = {}

    # --- Conv1d -------------------------------------------------------------
    print("Conv1d model")
    model = conv1d_model(args.channels, outputs).to(DTYPE)
    data = make_data((3, args.length), outputs, args.num_data, args.batch_size)
    try_stock(model, loss, data)
    K, E = kfac_ops(model, loss, data)

    # check against stock curvlinops on the Conv2d twin
    twin = conv2d_twin(model)
    twin_data = [(X.unsqueeze(2), y) for X, y in data]
    twin_params = list(twin.parameters())
    K_ref = curvlinops.KFACLinearOperator(
        twin, loss, twin_params, twin_data, fisher_type="type-2"
    )
    E_ref = curvlinops.EKFACLinearOperator(
        twin, loss, twin_params, twin_data, fisher_type="type-2"
    )
    K_red = KFACLinearOperator(
        model,
        loss,
        list(model.parameters()),
        data,
        fisher_type="type-2",
        kfac_approx="reduce",
    )
    K_red_ref = curvlinops.KFACLinearOperator(
        twin, loss, twin_params, twin_data, fisher_type="type-2", kfac_approx="reduce"
    )
    v = [torch.randn_like(p) for p in model.parameters()]
    v_twin = [vi.reshape(p.shape) for vi, p in zip(v, twin_params)]
    diffs = {
        "KFAC @ v": max_rel(
            [x.reshape(p.shape) for x, p in zip(K @ v, twin_params)], K_ref @ v_twin
        ),
        "KFAC-reduce @ v": max_rel(
            [x.reshape(p.shape) for x, p in zip(K_red @ v, twin_params)],
            K_red_ref @ v_twin,
        ),
        "EKFAC @ v": max_rel(
            [x.reshape(p.shape) for x, p in zip(E @ v, twin_params)], E_ref @ v_twin
        ),
        "KFAC trace": abs(K.trace / K_ref.trace - 1).item(),
        "KFAC logdet": abs(K.logdet - K_ref.logdet).item(),
        "EKFAC trace": abs(E.trace / E_ref.trace - 1).item(),
        "EKFAC logdet": abs(E.logdet - E_ref.logdet).item(),
    }
    print("  TN Conv1d vs stock on the Conv2d twin (relative; logdet absolute):")
    for k, d in diffs.items():
        print(f"    {k:15s} {d:.1e}")
    print(
        f"  trace: KFAC {K.trace:.4e}, EKFAC {E.trace:.4e}; "
        f"logdet: KFAC {K.logdet:.4e}, EKFAC {E.logdet:.4e}"
    )
    g = gradient(model, loss, data)
    res = [
        precondition(K, g, args.damping, "KFAC"),
        precondition(E, g, args.damping, "EKFAC"),
    ]
    results["conv1d"] = max(diffs.values())

    # --- Conv3d -------------------------------------------------------------
    print("\nConv3d model")
    model = conv3d_model(args.channels, outputs).to(DTYPE)
    data = make_data((2, args.size, args.size, args.size), outputs, args.num_data, 8)
    try_stock(model, loss, data)
    K, E = kfac_ops(model, loss, data)

    # input covariances of the convolutions against explicit patches
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, inp: inputs.setdefault(m, []).append(inp[0])
        )
        for m in model
        if isinstance(m, nn.Conv3d)
    ]
    with torch.no_grad():
        for X, _ in data:
            model(X)
    for h in hooks:
        h.remove()
    covariances = K.state_dict()["input_covariances"]
    names = {m: n for n, m in model.named_modules()}
    cov_diff = 0.0
    for m, xs in inputs.items():
        u = patches_3d(torch.cat(xs), m)
        positions = u.shape[0] // args.num_data
        ref = u.T @ u / (args.num_data * positions)
        cov_diff = max(
            cov_diff, ((covariances[names[m]] - ref).norm() / ref.norm()).item()
        )
    print(
        f"  TN input covariances vs explicit unfold: max relative diff {cov_diff:.1e}"
    )
    print(
        f"  trace: KFAC {K.trace:.4e}, EKFAC {E.trace:.4e}; "
        f"logdet: KFAC {K.logdet:.4e}, EKFAC {E.logdet:.4e}"
    )
    g = gradient(model, loss, data)
    res += [
        precondition(K, g, args.damping, "KFAC"),
        precondition(E, g, args.damping, "EKFAC"),
    ]
    results["conv3d"] = cov_diff
    results["residual"] = max(res)

    worst = max(results.values())
    assert worst < 1e-8, results
    print(f"\nOK: TN operators match the references (max relative diff {worst:.1e})")
    return results


if __name__ == "__main__":
    main()
