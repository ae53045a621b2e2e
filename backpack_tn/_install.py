"""One switch for both integrations: BackPACK extensions and curvlinops operators."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def install() -> None:
    """Route BackPACK and curvlinops through the tensor-network engine.

    * BackPACK extensions constructed from now on compute their ``Conv{1,2,3}d``
      quantities with TNs (:func:`backpack_tn.extensions.install`);
    * curvlinops' own ``KFACLinearOperator``/``EKFACLinearOperator`` compute their
      convolution statistics with TNs and accept ``Conv1d``/``Conv3d``
      (:func:`backpack_tn.linops.install_curvlinops`).

    Code that builds these objects itself (e.g. laplace-torch) benefits unchanged.
    """
    from backpack_tn.extensions import install as install_backpack
    from backpack_tn.linops import install_curvlinops

    install_backpack()
    install_curvlinops()


def uninstall() -> None:
    """Restore stock BackPACK and curvlinops."""
    from backpack_tn.extensions import uninstall as uninstall_backpack
    from backpack_tn.linops import uninstall_curvlinops

    uninstall_backpack()
    uninstall_curvlinops()


def is_installed() -> bool:
    """Whether :func:`install` is in effect for both libraries."""
    from backpack_tn.extensions import is_installed as backpack_installed
    from backpack_tn.linops import curvlinops_is_installed

    return backpack_installed() and curvlinops_is_installed()


@contextmanager
def enabled() -> Iterator[None]:
    """Context in which BackPACK and curvlinops use the TN engine.

    Yields:
        Nothing.
    """
    was_installed = is_installed()
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()
