"""What this machine's CPU can do, read from the machine and never assumed.

The project runs on CPUs that differ in what matters most for speed: an Intel Xeon with AVX-512 and AMX
runs bf16 matrix products several times faster than fp32, while an AVX2-only CPU (e.g. an AMD EPYC without
AVX-512 BF16) emulates them and runs bf16 about 100x *slower* than fp32. So:

* :func:`cpu_info` names the CPU (model string, the vector/matrix flags that decide the fast paths, torch's
  own ``torch.backends.cpu.get_cpu_capability()``, threads). Every recorded benchmark carries it.
* :func:`native_bf16` says whether bf16 matrix math has hardware support here: the ``avx512_bf16`` or
  ``amx_bf16`` flags on x86, ``bf16`` on Arm, or a CUDA device.
* :func:`bf16_note` is the warning ``vitkit bench --dtype bf16`` and ``train.amp=bf16`` print where it does not.
"""

from __future__ import annotations

import os
import platform
from functools import cache

import torch

# flags that decide which kernels run fast (x86 and Arm spellings from /proc/cpuinfo)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
               "bf16")  # fmt: skip
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot products that accumulate in 32 bits


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """``(model name, flags)`` from /proc/cpuinfo (Linux); elsewhere ``platform.processor()`` and no flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, frozenset(flags)


def cpu_info() -> dict:
    """The CPU in words and flags, for benchmark records: ``{"model", "flags", "capability", "native_bf16", ...}``."""
    model, flags = _cpuinfo()
    return {
        "model": model,
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def cpu_line() -> str:
    """One line for a README or a log: ``AMD EPYC (AVX2; flags avx2 fma; no native bf16), 2 threads, torch X``."""
    c = cpu_info()
    bf16 = "native bf16" if c["native_bf16"] else "no native bf16"
    return (
        f"{c['model']} ({c['capability']}; flags {' '.join(c['flags']) or '-'}; {bf16}), "
        f"{c['threads']} threads, torch {c['torch']}"
    )


def cpu_kind() -> str:
    """The key a benchmark record is filed under: the model name and the speed flags, ``AMD EPYC [avx2 fma]``.

    The model name alone does not tell CPU kinds apart (virtual machines report ``AMD EPYC`` for an AVX2-only Zen 3
    and for a Zen 4 with AVX-512, VNNI and bf16), and a record of one must never overwrite the other's."""
    c = cpu_info()
    return f"{c['model']} [{' '.join(c['flags'])}]"


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix math has hardware support on ``device`` (CUDA: always treated as yes)."""
    if torch.device(device).type == "cuda":
        return True
    return any(f in _cpuinfo()[1] for f in BF16_FLAGS)


def int8_dot_units() -> bool:
    """Whether int8 products accumulate without 16-bit saturation here: on x86, a CPU with VNNI or AMX (u8 x s8
    into 32-bit sums in one instruction); without them (AVX2 only) int8 GEMMs use ``vpmaddubsw``, whose pairwise
    sums saturate at 16 bits (see :func:`vitkit.export.quantize_onnx_int8`). True off x86, where that instruction
    is not used."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    return any(f in _cpuinfo()[1] for f in INT8_DOT_FLAGS)


def bf16_dot_product() -> bool:
    """Whether this x86 CPU has AVX-512 BF16's ``vdpbf16ps`` (with the AVX-512 BW/VL it is used with): bf16 pairs
    multiplied into fp32 sums, 32 multiply-adds a 512-bit instruction (what :mod:`vitkit.kernels.attention` runs
    on). Intel Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later."""
    return all(f in _cpuinfo()[1] for f in ("avx512_bf16", "avx512bw", "avx512vl"))


def int8_gemm_template() -> bool:
    """Whether Inductor's C++ GEMM template has a vector int8 kernel for this CPU: AVX-512 VNNI or AMX. Elsewhere
    it offers only a scalar reference GEMM, which ``max_autotune`` would time and discard at every compile."""
    return any(f in _cpuinfo()[1] for f in ("avx512_vnni", "amx_int8"))


def bf16_note(device: str | torch.device = "cpu") -> str | None:
    """A warning for bf16 work on a CPU without bf16 units, or None where bf16 is native."""
    if native_bf16(device):
        return None
    model = _cpuinfo()[0]
    return (
        f"this CPU ({model}, {torch.backends.cpu.get_cpu_capability()}) has no native bf16 matrix units "
        "(no avx512_bf16 / amx_bf16): bf16 is emulated and runs far slower than fp32 here (about 100x for large "
        "matrix products on an AVX2 CPU); use fp32 on this machine"
    )
