"""Hand-written kernels, opt-in: where the compiler cannot reach (issue 20).

Everything else in vitkit is plain PyTorch whose speed comes from ``torch.compile``. A kernel lives here only if it
is tested against the plain layer it replaces and a benchmark shows it beating that layer *compiled* on a CPU we
measured; :func:`vitkit.optimize` applies it explicitly, as one more candidate form that it times against the plain
compiled one on the machine at hand, so a kernel that loses on a CPU is not used there.

* :mod:`vitkit.kernels.halo`: fused halo attention (HaloNet), x86 with AVX2, built from C++ at first use.

:func:`apply` swaps a model's layers for their kernel versions in place (same parameters and state dict) and
returns how many it swapped; :func:`unavailable_reason` says why the kernels cannot be built here, or None.
"""

from __future__ import annotations

from torch import nn

from vitkit.layers.halo_attention import HaloAttention


def unavailable_reason() -> str | None:
    from vitkit.kernels.halo import unavailable_reason as halo_reason

    return halo_reason()


def _swappable(m: nn.Module) -> bool:  # a plain HaloAttention (not a subclass of the user's, not one swapped)
    return type(m) is HaloAttention


def applicable(model: nn.Module) -> int:
    """How many of ``model``'s layers :func:`apply` would swap (its plain ``HaloAttention`` layers)."""
    return sum(map(_swappable, model.modules()))


def apply(model: nn.Module) -> int:
    """Swap ``model``'s layers for their kernel versions, in place; builds the kernels first (``RuntimeError``
    with the reason where they cannot be built). Returns the number of layers swapped. For inference in this
    process, eager or ``torch.compile``d: the kernels are vitkit custom ops, which ONNX and the on-device exporters
    do not know, so export the plain model."""
    from vitkit.kernels.halo import FusedHaloAttention, _extension

    targets = [m for m in model.modules() if _swappable(m)]
    if targets:
        _extension()
    for m in targets:
        m.__class__ = FusedHaloAttention  # a subclass without state of its own: the same parameters and buffers
    return len(targets)
