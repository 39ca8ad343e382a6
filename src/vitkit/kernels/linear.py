"""Linears through oneDNN with the weight packed once, for compiled inference at a static batch size.

Inductor lowers an fp32 ``nn.Linear`` to MKL's packed GEMM (``mkl._mkl_linear``) when the batch size is static and
to oneDNN's (``mkldnn._linear_pointwise``) only when it is a symbol, where it also packs every convolution's weight
on each call instead of once (``vitkit.routes.compile_frozen``'s ``symbolic_batch``). :class:`OneDnnLinear` gives a
static-shape program oneDNN's linears: its weight is packed into oneDNN's layout when the layer is swapped in (a
buffer that is not saved: the state dict is unchanged), and under ``compile_frozen`` that buffer becomes a constant
of the program and Inductor fuses a following GELU into the linear as a oneDNN post-op.

Measured (1 thread, the AVX-512 AMD EPYC Zen 4; ``benchmarks/speed/symbolic_batch.py``): oneDNN ran ViT's linear
shapes at 85-103 GFLOP/s against MKL's 64-77, and the compiled models with this layer against the plain static
compile: ViT-S 1.12x / 1.29x (batch 1 / 8), ViT-B 1.45x / 1.29x, NesT-T 1.13x / 1.23x, MobileViT-XS 0.97x / 1.08x:
about as fast as the symbolic batch on the ViTs, and faster where there are convolutions to keep packed.
:func:`vitkit.optimize` times it against the plain forms on the machine at hand.

The layer falls back to ``nn.Linear``'s own forward where the packed op does not apply: gradients wanted (the op has
no backward for the packed weight), an input that is not float32 on the CPU, CPU autocast. In eager mode a weight
changed or replaced after the swap is packed again before use; a compiled program keeps the weights
it was compiled with, like every frozen program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.kernels import _autocast_cpu


def unavailable_reason() -> str | None:
    """Why oneDNN linears cannot run here, or None."""
    if not torch.backends.mkldnn.is_available():
        return "needs PyTorch built with oneDNN (torch.backends.mkldnn.is_available() is False)"
    return None


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` computed by oneDNN with the weight packed once (see the module docstring); made by swapping a
    plain layer's class and calling :meth:`pack`, which :func:`vitkit.kernels.apply` does."""

    def pack(self) -> None:
        """Pack the weight into oneDNN's layout (an opaque ``torch._mkldnn`` tensor); None for a weight that is not
        float32 on the CPU (the layer then computes ``F.linear``)."""
        packed = None
        if self.weight.dtype == torch.float32 and self.weight.device.type == "cpu":
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self.register_buffer("packed_weight", packed, persistent=False)
        self._packed_from = (self.weight, _version(self.weight))

    def stale(self) -> bool:
        """The weight was replaced, or changed in place through autograd-visible ops (``load_state_dict``, ``mul_``
        under ``no_grad``), since it was packed. Edits through ``.data`` bypass the version counter: call
        :meth:`pack` after them."""
        source, version = self._packed_from or (None, None)
        return source is not self.weight or version != _version(self.weight)

    def _apply(self, fn, recurse=True):  # .to(), .float(), .bfloat16(): convert the weight, then pack it again
        self._buffers["packed_weight"] = None  # (an opaque tensor: no dtype or device conversion applies to it)
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def __getstate__(self):  # copies and pickles carry the weight, not its opaque packed form (packed again on use)
        state = self.__dict__.copy()
        state["_buffers"] = {**self._buffers, "packed_weight": None}
        state["_packed_from"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if torch.compiler.is_compiling():
            if not _freezing():  # Inductor lowers the packed op only with the packed weight a constant of the program
                return F.linear(x, self.weight, self.bias)
        elif self.stale():
            self.pack()
        if grad or x.dtype != torch.float32 or self.packed_weight is None or x.device.type != "cpu" or _autocast_cpu():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version  # (inference tensors keep no version counter)


def _freezing() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)
