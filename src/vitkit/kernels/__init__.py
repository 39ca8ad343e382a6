"""Hand-written kernels, opt-in: where the compiler cannot reach (issue 20).

Everything else in vitkit is plain PyTorch whose speed comes from ``torch.compile``. A kernel lives here only if it
is tested against the plain layer it replaces and a benchmark shows it beating that layer *compiled* on a CPU we
measured; :func:`vitkit.optimize` applies it explicitly, as one more candidate form that it times against the plain
compiled one on the machine at hand, so a kernel that loses on a CPU is not used there.

* :mod:`vitkit.kernels.halo`: fused halo attention (HaloNet), x86 with AVX2, built from C++ at first use.
* :mod:`vitkit.kernels.linear`: ``nn.Linear`` through oneDNN with the weight packed once (every family), which
  Inductor does not choose at a static batch size.
* :mod:`vitkit.kernels.lut`: a 256-byte table on uint8 codes, which the int8 route (PT2E) uses for SiLU and GELU
  between quantized ops (``optimize(route="int8")``'s ``"pt2e+kernels"`` form), x86 with AVX2, built from C++.
* :mod:`vitkit.kernels.attention`: softmax attention with its products in bf16 (AVX-512 BF16), which the same int8
  form uses for the attention that PT2E leaves in fp32, built from C++.

:func:`apply` swaps a model's layers for their kernel versions in place (same parameters and state dict) and
returns how many it swapped; :func:`unavailable_reason` says why a kernel cannot be built here, or None.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from vitkit.layers.halo_attention import HaloAttention


def _autocast_cpu() -> bool:
    """CPU autocast is on (a kernel would be handed bfloat16, or asked for it: both fall back to the plain layer)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


def unavailable_to_build() -> str | None:
    """Why a C++ kernel of this package (:mod:`~vitkit.kernels.halo`, :mod:`~vitkit.kernels.lut`,
    :mod:`~vitkit.kernels.attention`) cannot be built here, or None: they need an x86 CPU with AVX2, a C++ compiler
    and ninja (``torch.utils.cpp_extension``). The attention kernel needs AVX-512 BF16 besides, which
    :func:`vitkit.kernels.attention.unavailable_reason` checks, not this."""
    from torch.utils import cpp_extension

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU with AVX2 (this one: {torch.backends.cpu.get_cpu_capability()})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"needs a C++ compiler ({compiler!r} not found; set CXX)"
    if not cpp_extension.is_ninja_available():
        return "needs ninja to build the C++ extension (pip install vitkit[kernels], or ninja)"
    return None


def unavailable_reason() -> str | None:
    """Why some kernel cannot be built or run here (the first reason found), or None."""
    from vitkit.kernels.halo import unavailable_reason as halo_reason
    from vitkit.kernels.linear import unavailable_reason as linear_reason

    return halo_reason() or linear_reason()


def _targets(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The plain ``HaloAttention`` and ``nn.Linear`` layers of ``model`` (not subclasses, not ones swapped)."""
    mods = list(model.modules())
    return [m for m in mods if type(m) is HaloAttention], [m for m in mods if type(m) is nn.Linear]


def applicable(model: nn.Module) -> int:
    """How many of ``model``'s layers :func:`apply` would swap (its plain ``HaloAttention`` and ``nn.Linear``)."""
    return sum(map(len, _targets(model)))


def apply(model: nn.Module) -> int:
    """Swap ``model``'s layers for their kernel versions, in place; builds the kernels first (``RuntimeError``
    with the reason where one cannot be built or run, before any layer is swapped). Returns the number of layers
    swapped. For inference in this process, eager or ``torch.compile``d (the oneDNN linears only under Inductor's
    freezing, :func:`vitkit.routes.compile_frozen`; a plain ``torch.compile`` runs them as ``F.linear``): the kernels
    are vitkit custom ops and oneDNN's private ones, which ONNX and the on-device exporters do not know, so export
    the plain model."""
    from vitkit.kernels import linear

    halos, linears = _targets(model)
    reason = linear.unavailable_reason() if linears else None
    if reason:  # (checked before anything is swapped: never a half-swapped model)
        raise RuntimeError(f"vitkit.kernels.linear: {reason}")
    if halos:
        from vitkit.kernels.halo import FusedHaloAttention, _extension

        _extension()
        for m in halos:
            m.__class__ = FusedHaloAttention  # a subclass without state of its own: the same parameters and buffers
    for m in linears:
        m.__class__ = linear.OneDnnLinear  # the same parameters; a packed copy of the weight, not saved
        m.pack()
    return len(halos) + len(linears)
