"""A 256-entry lookup table on uint8 tensors, for the int8 route's activations (x86 with AVX2).

In an int8 model every value between two quantized ops is one of 256 codes, so an elementwise function of it, read
back into codes (``quantize(f(dequantize(x)))``), is a table of 256 bytes. :func:`lut_u8` applies such a table:
with AVX-512 VBMI two ``vpermi2b`` lookups and a blend per 64 bytes, with AVX2 sixteen ``vpshufb`` lookups per 32
bytes (one per high nibble), chosen when the op runs by what the CPU has; any memory format in, channels-last out
for 4-D tensors (the layout oneDNN's int8 convolutions read and write under ``torch.compile``, so Inductor copies
nothing around it) and contiguous otherwise.

Why it exists: SiLU, which MobileViT (and HaloNet-50ts, SE-HaloNet-33ts) apply after almost every convolution, and
GELU, in every transformer MLP, cost as much in an int8 model as in an fp32 one where they are evaluated (a
transcendental per value: oneDNN's ``swish`` or ``gelu_erf`` post-op on the int8 convolution's or linear's fp32
result, or Inductor's fused dequantize-activation-quantize). As a table on the producer's uint8 output it is a pass
over bytes (:func:`vitkit.routes.quantize_pt2e_int8` with ``tables=True``). Measured on the AVX-512 AMD EPYC (Zen
4), 1 thread: the lookup runs at a copy's speed (16.8 M bytes in 1.6 ms with VBMI, 5.7 ms on the AVX2 path);
MobileViT-XS's int8 forward takes 24.9 / 122.9 ms at batch 1 / 8 with the tables against 30.0 / 157.3 ms without,
ViT-S's 45.2 / 314.8 against 47.0 / 326.1 ms (``benchmarks/peers/README.md``). It is built from source at first use,
like :mod:`vitkit.kernels.halo`; loading it registers the op ``vitkit::lut_u8`` in C++ (a call from a compiled
program does not pass through Python), with a fake implementation, so ``torch.compile`` keeps one graph around it.
"""

from __future__ import annotations

import functools

import torch

from vitkit.kernels import unavailable_to_build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

__attribute__((target("avx512f,avx512bw,avx512vbmi")))
static void lut_vbmi(const uint8_t* x, uint8_t* y, int64_t n, const uint8_t* t) {
  const __m512i t0 = _mm512_loadu_si512(t), t1 = _mm512_loadu_si512(t + 64);
  const __m512i t2 = _mm512_loadu_si512(t + 128), t3 = _mm512_loadu_si512(t + 192);
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 k = n - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (n - i)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(k, x + i);
    const __m512i lo = _mm512_permutex2var_epi8(t0, v, t1);  // codes 0-127: bit 6 picks the register
    const __m512i hi = _mm512_permutex2var_epi8(t2, v, t3);  // codes 128-255
    _mm512_mask_storeu_epi8(y + i, k, _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi));
  }
}

__attribute__((target("avx2")))
static void lut_avx2(const uint8_t* x, uint8_t* y, int64_t n, const uint8_t* t) {
  __m256i rows[16];
  for (int h = 0; h < 16; h++) rows[h] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t + 16 * h)));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(x + i));
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    __m256i r = _mm256_setzero_si256();
    for (int h = 0; h < 16; h++) {
      const __m256i hit = _mm256_cmpeq_epi8(hi, _mm256_set1_epi8((char)h));
      r = _mm256_or_si256(r, _mm256_and_si256(hit, _mm256_shuffle_epi8(rows[h], lo)));
    }
    _mm256_storeu_si256((__m256i*)(y + i), r);
  }
  for (; i < n; i++) y[i] = t[x[i]];
}

// path: -1 the best this CPU has, 0 AVX2, 1 AVX-512 VBMI (tests take each)
torch::Tensor lut_u8(torch::Tensor x, torch::Tensor table, int64_t path) {
  TORCH_CHECK(x.scalar_type() == torch::kByte && table.scalar_type() == torch::kByte, "lut_u8: uint8 tensors");
  TORCH_CHECK(table.numel() == 256 && table.is_contiguous(), "lut_u8: a contiguous table of 256 entries");
  const bool cl = x.dim() == 4;
  x = cl ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto y = at::empty(x.sizes(), x.options().memory_format(fmt));
  const uint8_t* xs = x.data_ptr<uint8_t>();
  uint8_t* ys = y.data_ptr<uint8_t>();
  const uint8_t* t = table.data_ptr<uint8_t>();
  const bool has_vbmi = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
  TORCH_CHECK(path != 1 || has_vbmi, "lut_u8: this CPU has no AVX-512 VBMI");
  const bool vbmi = path == 1 || (path < 0 && has_vbmi);
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t a, int64_t b) {
    if (vbmi) lut_vbmi(xs + a, ys + a, b - a, t);
    else lut_avx2(xs + a, ys + a, b - a, t);
  });
  return y;
}

// The op itself, registered in C++ so that a compiled program calls the kernel without passing through Python
// (a Python custom op cost about 16 us a call, 33 calls in MobileViT-XS). flexible_layout: Inductor hands it the
// channels-last codes of oneDNN's convolutions as they are.
TORCH_LIBRARY_FRAGMENT(vitkit, m) {
  m.def("lut_u8(Tensor x, Tensor table) -> Tensor", {at::Tag::flexible_layout});
}
TORCH_LIBRARY_IMPL(vitkit, CPU, m) {
  m.impl("lut_u8", [](const torch::Tensor& x, const torch::Tensor& table) { return lut_u8(x, table, -1); });
}
"""
_FLAGS = ["-O3", "-fopenmp"]  # no ISA flag: each path carries its own target attribute and is picked at run time


unavailable_reason = unavailable_to_build  # (why the kernel cannot be built here, or None)


@functools.cache
def _extension():
    """The built kernel (pybind ``lut_u8(x, table, path)``, for tests); loading it registers the op
    ``vitkit::lut_u8`` in C++, whose fake implementation is registered here."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"vitkit.kernels.lut: the table kernel {reason}")
    from torch.utils import cpp_extension

    ext = cpp_extension.load_inline(
        "vitkit_lut_u8", cpp_sources=[_SOURCE], functions=["lut_u8"], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"]
    )

    @torch.library.register_fake("vitkit::lut_u8", allow_override=True)  # (a second load replaces it)
    def _(x, table):
        fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)

    return ext


def lut_u8(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[x]`` for a uint8 tensor ``x`` and a table of 256 uint8 entries; channels-last for a 4-D ``x``
    (any memory format in), contiguous otherwise. The op ``torch.ops.vitkit.lut_u8`` (builds the kernel at the
    first call)."""
    _extension()
    return torch.ops.vitkit.lut_u8.default(x, table)


def activation_table(
    fn, scale_in: float, zero_in: int, scale_out: float, zero_out: int, qmin: int = 0, qmax: int = 255
) -> torch.Tensor:
    """The 256 codes ``quantize(fn(dequantize(code)))`` of PT2E's per-tensor uint8 arithmetic (the
    ``quantized_decomposed`` ops themselves, so a lookup gives the same bytes as the three ops would in eager);
    ``qmin``/``qmax``: the output's code range (0-127 for the 7-bit activations of CPUs without VNNI/AMX; codes
    above it never come in, and their entries are computed all the same)."""
    q = torch.ops.quantized_decomposed
    codes = torch.arange(256, dtype=torch.uint8)
    x = q.dequantize_per_tensor.default(codes, scale_in, zero_in, 0, 255, torch.uint8)
    return q.quantize_per_tensor.default(fn(x), scale_out, zero_out, qmin, qmax, torch.uint8)


def _activation(node: torch.fx.Node):
    """The elementwise function a node computes, if it is one this module tabulates (SiLU, GELU), else None."""
    aten = torch.ops.aten
    if node.target in (aten.silu.default, aten.silu_.default):
        return torch.nn.functional.silu
    if node.target == aten.gelu.default:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return lambda x: torch.nn.functional.gelu(x, approximate=approximate)
    return None


def tabulable(model: torch.nn.Module) -> bool:
    """The model has an activation module this module tabulates (SiLU, GELU): its int8 form may use the tables."""
    return any(isinstance(m, (torch.nn.SiLU, torch.nn.GELU)) for m in model.modules())


def tables_apply(model: torch.nn.Module) -> bool:
    """The model's int8 form can use the tables here: it has an activation to tabulate (:func:`tabulable`) and the
    kernel can be built (:func:`unavailable_reason` is None)."""
    return tabulable(model) and unavailable_reason() is None


_PRODUCERS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_KEY = "quantization_annotation"  # where PT2E quantizers leave their annotations in a node's meta


def drop_inference_dropouts(gm: torch.fx.GraphModule) -> int:
    """Remove the exported program's ``aten.dropout`` nodes that are the identity (``train=False`` or ``p=0``:
    an ``nn.Dropout`` exported in eval mode), so that what a dropout separated (an MLP's activation and its second
    linear) is adjacent for :func:`annotate_activations_apart`. Returns how many."""
    gone = 0
    for node in list(gm.graph.nodes):
        if node.target == torch.ops.aten.dropout.default and (node.args[1] == 0 or not node.args[2]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gone += 1
    gm.graph.lint()
    gm.recompile()
    return gone


def annotate_activations_apart(gm: torch.fx.GraphModule) -> int:
    """After torchao's ``X86InductorQuantizer`` has annotated ``gm`` (PT2E, before ``prepare_pt2e`` inserts
    observers): every SiLU or GELU right after a quantized convolution or linear (the quantizer fuses it into the
    producer as oneDNN's ``swish`` or ``gelu_erf`` post-op, or leaves it to Inductor in fp32), whose output only
    ops that quantize it read, is annotated as an op of its own with its input quantized like the producer's (so
    the producer writes uint8 codes and the activation between codes becomes a table for
    :func:`tabulate_activations`). One whose result goes on in fp32 (into a mean, say) is left as it was. Returns
    the number of activations moved."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    moved = 0
    for node in gm.graph.nodes:
        src = node.args[0] if _activation(node) else None
        if src is None or src.target not in _PRODUCERS or _KEY not in src.meta or len(src.users) != 1:
            continue
        read_quantized = all(_KEY in u.meta and node in u.meta[_KEY].input_qspec_map for u in node.users)
        if not node.users or not read_quantized:
            continue
        spec = src.meta[_KEY].input_qspec_map.get(src.args[0])  # the activation's spec, as the quantizer chose it
        if spec is None:  # (a producer left in fp32)
            continue
        node.meta[_KEY] = QuantizationAnnotation(input_qspec_map={src: spec}, _annotated=True)
        moved += 1
    return moved


def tabulate_activations(gm: torch.fx.GraphModule) -> int:
    """In a converted PT2E program, replace each per-tensor uint8 ``quantize(f(dequantize(x)))`` whose ``f`` is a
    SiLU or GELU with :func:`lut_u8` of ``x`` and its table (a constant of ``gm``, :func:`activation_table`).
    Returns how many."""
    q = torch.ops.quantized_decomposed
    done = 0
    for node in list(gm.graph.nodes):
        fn = _activation(node)
        if fn is None or len(node.users) != 1:
            continue
        dq, (quant,) = node.args[0], node.users
        if dq.target != q.dequantize_per_tensor.default or quant.target != q.quantize_per_tensor.default:
            continue
        if len(dq.users) != 1 or dq.args[5] != torch.uint8 or quant.args[5] != torch.uint8:
            continue
        name = f"_vitkit_activation_table_{done}"
        table = activation_table(fn, *dq.args[1:3], *quant.args[1:5])
        gm.register_buffer(name, table)
        # (registers the op: a program that calls it, Inductor's on-disk cache included, is only ever built and
        # run after this pass has loaded the kernel in the same process)
        _extension()
        with gm.graph.inserting_before(quant):
            table = gm.graph.get_attr(name)
            lut = gm.graph.call_function(torch.ops.vitkit.lut_u8.default, (dq.args[0], table))
        lut.meta.update({k: v for k, v in quant.meta.items() if k not in ("val", "tensor_meta")})  # (not NCHW's)
        quant.replace_all_uses_with(lut)
        for dead in (quant, node, dq):
            gm.graph.erase_node(dead)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return done
