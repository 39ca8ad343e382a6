"""A fused halo attention kernel for CPU inference (x86 with AVX2), and the layer that uses it.

``HaloAttention``'s plain core builds the relative-logit bias ``rh[ky] + rw[kx]`` for every query and window key
(6.4 M values per layer in HaloNet-H1's first stage at 256 px) and hands it to ``F.scaled_dot_product_attention``.
Under ``torch.compile`` that bias is one scalar loop (Inductor does not vectorise an index divided by the window
side) and SDPA's CPU kernel reads it back, and the layer's query blocks, key windows (3x the key/value map) and
output are permuted copies. This kernel does everything between the two 1x1 convolutions on the maps as they are,
**channels-last** (the layout oneDNN's convolutions hand over under ``torch.compile``; the op is registered with a
flexible layout, so Inductor passes its buffers without the copies to NCHW it would otherwise make, and the halo
padding is never materialised). One block's window of keys, every head's, is packed once (zeros beyond the map: the
halo), read from the map in order; then one task is a group of 8 queries of the block for one head, **one query per
vector lane** (AVX2 + FMA; the queries moved into lanes by 8 x 8 register transposes). The relative-logit factors are
formed inside, from ``PosEmbedRel``'s tables and the unscaled query; a key's logits for the 8 queries are one vector
started from ``rh[ky] + rw[kx]`` (two vector loads: no bias row), 8 keys at a time with ``k`` broadcast from the
packed window; the softmax's max and sum run down the keys (no reduction across lanes); the value product keeps the
queries in lanes, 8 channels at a time, and is transposed back to 8 pixels' channels for the store. Lanes past the
last query are zeros, so any block size works. ``at::parallel_for`` splits the groups; each is computed whole, in
one order, so the thread count does not change a bit of the result. The arithmetic is the same attention in fp32
with the sums in another order and ATen's ``exp_u20`` (an exponential within 20 ulp, as in PyTorch's own CPU flash
attention).

It is built from source at first use by ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are
needed; the build is cached under ``TORCH_EXTENSIONS_DIR``) and registered as the custom op
``vitkit::halo_attention`` with a fake implementation, so ``torch.compile`` keeps the model in one graph.
:class:`FusedHaloAttention` takes it only where it applies (fp32 CPU input, no autocast, no autograd, the fused route)
and runs the plain layer otherwise; ``attn_probs`` hooks still see the eager route.

Measured (``benchmarks/halo/fused_kernel.py``, 1 thread, on an AVX2 AMD EPYC, an AVX-512 AMD EPYC and an Intel
Xeon with AMX): see ``benchmarks/halo/README.md`` ("A fused kernel"); ``optimize`` measures the kernel form against
the plain compiled one before it keeps it. The AVX2 build runs on the AVX-512 CPUs too: a 16-lane AVX-512 build of
the same source was a tie there (HaloNet-H1 within 5% either way; commit 78a5f7d, ``fused_kernel_widths.json``) and
was not kept.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil

import torch
from torch.utils import cpp_extension

from vitkit.layers.halo_attention import HaloAttention

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>
using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();  // queries per lane group (8: the file is built for AVX2)
constexpr int KB = 8;                // keys per register block of the logits

// 8 x 8 transpose in registers: lane j of r[i] goes to lane i of r[j]
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// For K rows i0 .. i0 + K of a matrix whose row i holds D values from base + i * ld: emit(i, init(i) + q . row_i),
// the queries in lanes (qT: (D, VL)) and the K sums in registers.
template <int K, class Init, class Emit>
inline void dot_rows(const float* qT, const float* base, int64_t ld, int64_t D, int64_t i0, Init init, Emit emit) {
  __m256 acc[K];
  const float* r = base + i0 * ld;
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) acc[u] = init(i0 + u);
  for (int64_t d = 0; d < D; d++) {
    const __m256 qd = _mm256_loadu_ps(qT + d * VL);
    #pragma GCC unroll 8
    for (int u = 0; u < K; u++) acc[u] = _mm256_fmadd_ps(qd, _mm256_broadcast_ss(r + u * ld + d), acc[u]);
  }
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) emit(i0 + u, acc[u]);
}

template <class Init, class Emit>
inline void dot_all(const float* qT, const float* base, int64_t ld, int64_t D, int64_t n, Init init, Emit emit) {
  int64_t i = 0;
  for (; i + KB <= n; i += KB) dot_rows<KB>(qT, base, ld, D, i, init, emit);
  for (; i < n; i++) dot_rows<1>(qT, base, ld, D, i, init, emit);
}

// p (W, VL): probabilities, queries in lanes; value channel e of key j at v[j * ld + e]. Emits (e, sum_j p[j]
// v[j][e]) for channels e0 .. e0 + EB, the sums (queries in lanes) in registers.
template <int EB, class Emit>
inline void prob_v(const float* p, const float* v, int64_t ld, int64_t W, int64_t e0, Emit emit) {
  __m256 acc[EB];
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++) acc[u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < W; j++) {
    const __m256 pj = _mm256_loadu_ps(p + j * VL);
    const float* vj = v + j * ld + e0;
    #pragma GCC unroll 8
    for (int u = 0; u < EB; u++) acc[u] = _mm256_fmadd_ps(pj, _mm256_broadcast_ss(vj + u), acc[u]);
  }
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++) emit(e0 + u, acc[u]);
}

// q (B, heads * D, Hq, Wq): the queries, Hq = nh * bs, Wq = nw * bs; kv (B, heads * (D + E), nh * b, nw * b): each
// head's D channels of k then E of v (b = block); height_rel, width_rel (2 * win - 1, D), win = b + 2 * halo;
// key_bias (nh * nw, win * win) or empty. Block (by, bx) of a head: its bs x bs queries attend to the win x win keys
// from row by * b - halo, column bx * b - halo of kv, keys outside the map being zeros (the halo padding), with logits
// q . k * scale + q . height_rel[ky - y + win - 1] + q . width_rel[kx - x + win - 1] + key_bias, (y, x) the query's
// place in its block. Works on channels-last maps (the layout oneDNN's convolutions give under torch.compile; others
// are copied to it); returns the attention output (B, heads * E, Hq, Wq), channels-last.
torch::Tensor halo_attention(torch::Tensor q, torch::Tensor kv, torch::Tensor height_rel, torch::Tensor width_rel,
                             torch::Tensor key_bias, int64_t heads, int64_t block, int64_t halo, double scale) {
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 4 && height_rel.dim() == 2 && width_rel.dim() == 2,
              "halo_attention: q, kv 4-D (B, C, H, W); height_rel, width_rel 2-D");
  for (const auto& t : {q, kv, height_rel, width_rel})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "halo_attention: float32 CPU tensors only");
  q = q.contiguous(at::MemoryFormat::ChannelsLast); kv = kv.contiguous(at::MemoryFormat::ChannelsLast);
  height_rel = height_rel.contiguous(); width_rel = width_rel.contiguous();
  TORCH_CHECK(heads > 0 && block > 0 && halo >= 0, "halo_attention: heads, block > 0 and halo >= 0");
  TORCH_CHECK(q.size(1) % heads == 0 && kv.size(1) % heads == 0 && kv.size(0) == q.size(0),
              "halo_attention: q and kv channels must split into heads, and their batch sizes agree");
  const int64_t B = q.size(0), D = q.size(1) / heads, C = kv.size(1) / heads, E = C - D, win = block + 2 * halo;
  const int64_t Hq = q.size(2), Wq = q.size(3), Hk = kv.size(2), Wk = kv.size(3), nh = Hk / block, nw = Wk / block;
  TORCH_CHECK(E > 0 && nh > 0 && nw > 0 && Hk == nh * block && Wk == nw * block,
              "halo_attention: kv must be (B, heads * (D + E), nh * block, nw * block), E > 0");
  const int64_t bs = Hq / nh;
  TORCH_CHECK(bs > 0 && bs <= block && Hq == nh * bs && Wq == nw * bs,
              "halo_attention: q must be (B, heads * D, nh * bs, nw * bs) for kv's nh x nw blocks, bs <= block");
  TORCH_CHECK(height_rel.sizes() == width_rel.sizes() && height_rel.size(0) == 2 * win - 1 && height_rel.size(1) == D,
              "halo_attention: height_rel, width_rel must be (2*win - 1, D)");
  const bool masked = key_bias.numel() > 0;
  if (masked) {
    TORCH_CHECK(key_bias.scalar_type() == at::kFloat && key_bias.numel() == nh * nw * win * win,
                "halo_attention: key_bias must be (nh * nw, win * win)");
    key_bias = key_bias.contiguous();
  }
  auto out = torch::empty({B, heads * E, Hq, Wq}, q.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* qp = q.data_ptr<float>(); const float* kvp = kv.data_ptr<float>();
  const float* kbp = masked ? key_bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t W = win * win, Q = bs * bs, G = (Q + VL - 1) / VL, T = 2 * win - 1;
  const int64_t blocks = nh * nw, QP = Hq * Wq, KP = Hk * Wk, CQ = heads * D, CK = heads * C, CO = heads * E;
  const __m256 sc = _mm256_set1_ps((float)scale);
  std::vector<int64_t> ky(W), kx(W);  // key j's window row and column
  for (int64_t j = 0; j < W; j++) { ky[j] = j / win; kx[j] = j % win; }
  const float* hrel = height_rel.data_ptr<float>(); const float* wrel = width_rel.data_ptr<float>();
  const auto zero = [](int64_t) { return _mm256_setzero_ps(); };
  // one task: a group of VL queries of one block of one head, the queries in vector lanes (lanes past Q are zeros)
  at::parallel_for(0, B * heads * blocks * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qT(D * VL), qTs(D * VL), ph(T * VL), pw(T * VL), rhT(win * VL), rwT(win * VL), s(W * VL);
    // the block's window, every head's keys packed head after head, key after key (k then v channels): in the map
    // a window's keys lie a pixel's channels apart; packed, each is read from memory once, in order, for all heads
    std::vector<float> oT(E * VL), kw(heads * W * C);
    int64_t qpix[VL], window = -1;  // each lane's pixel; the block whose window kw holds
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t / G, i0 = (t % G) * VL, nq = std::min(VL, Q - i0);
      // blocks outermost, heads within
      const int64_t bb = n / heads, h = n % heads, b = bb / blocks, blk = bb % blocks, by = blk / nw, bx = blk % nw;
      if (bb != window) {  // rows by * block - halo .., columns bx * block - halo ..; zeros beyond the map (the halo)
        for (int64_t j = 0; j < W; j++) {
          const int64_t y = by * block - halo + ky[j], x = bx * block - halo + kx[j];
          const bool inside = y >= 0 && y < Hk && x >= 0 && x < Wk;
          const float* src = inside ? kvp + (b * KP + y * Wk + x) * CK : nullptr;  // (no pointer off the map)
          for (int64_t hh = 0; hh < heads; hh++) {
            float* dst = kw.data() + (hh * W + j) * C;
            int64_t c = 0;
            if (inside) {
              for (; c + VL <= C; c += VL) _mm256_storeu_ps(dst + c, _mm256_loadu_ps(src + hh * C + c));
              for (; c < C; c++) dst[c] = src[hh * C + c];
            } else {
              for (; c < C; c++) dst[c] = 0.f;
            }
          }
        }
        window = bb;
      }
      const float* kh = kw.data() + h * W * C;  // this head's keys: k of key j at kh + j * C, v at kh + j * C + D
      const float* qb = qp + b * QP * CQ + h * D;
      float* outb = op + b * QP * CO + h * E;
      for (int64_t l = 0; l < nq; l++) qpix[l] = (by * bs + (i0 + l) / bs) * Wq + bx * bs + (i0 + l) % bs;
      // q transposed, one lane per query (VL pixels x VL channels at a time in registers), and scaled for the logits
      const bool whole = nq == VL;
      int64_t d = 0;
      for (; whole && d + VL <= D; d += VL) {
        __m256 r[VL];
        for (int64_t l = 0; l < VL; l++) r[l] = _mm256_loadu_ps(qb + qpix[l] * CQ + d);
        transpose8(r);
        for (int64_t u = 0; u < VL; u++) {
          _mm256_storeu_ps(qT.data() + (d + u) * VL, r[u]);
          _mm256_storeu_ps(qTs.data() + (d + u) * VL, _mm256_mul_ps(sc, r[u]));
        }
      }
      for (; d < D; d++) {
        float lanes[VL] = {};
        for (int64_t l = 0; l < nq; l++) lanes[l] = qb[qpix[l] * CQ + d];
        const __m256 r = _mm256_loadu_ps(lanes);
        _mm256_storeu_ps(qT.data() + d * VL, r);
        _mm256_storeu_ps(qTs.data() + d * VL, _mm256_mul_ps(sc, r));
      }
      // relative logits, from the unscaled query as in the reference: rh[ky] = q . height_rel[ky - y + win - 1],
      // rw[kx] = q . width_rel[kx - x + win - 1], (y, x) the query's place in its block
      const auto put = [](float* dst) { return [dst](int64_t i, __m256 a) { _mm256_storeu_ps(dst + i * VL, a); }; };
      if (whole && bs % VL == 0) {  // the group is VL pixels of one row: y shared, x = x0 .. x0 + VL - 1
        const int64_t y = i0 / bs, x0 = i0 % bs;
        dot_all(qT.data(), hrel + (win - 1 - y) * D, D, D, win, zero, put(rhT.data()));  // the win rows of row y
        dot_all(qT.data(), wrel + (win - VL - x0) * D, D, D, win + VL - 1, zero, put(pw.data()));  // every lane's
        for (int64_t l = 0; l < VL; l++)
          for (int64_t k = 0; k < win; k++) rwT[k * VL + l] = pw[(k + VL - 1 - l) * VL + l];
      } else {  // every table row, then each lane's rows
        dot_all(qT.data(), hrel, D, D, T, zero, put(ph.data()));
        dot_all(qT.data(), wrel, D, D, T, zero, put(pw.data()));
        for (int64_t l = 0; l < VL; l++) {
          const int64_t i = l < nq ? i0 + l : 0, y = i / bs, x = i % bs;
          for (int64_t k = 0; k < win; k++) {
            rhT[k * VL + l] = ph[(k - y + win - 1) * VL + l];
            rwT[k * VL + l] = pw[(k - x + win - 1) * VL + l];
          }
        }
      }
      const float* kb = masked ? kbp + blk * W : nullptr;
      // logits (q . k * scale + rh[ky] + rw[kx] + key_bias), KB keys at a time, and each query's max
      __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      dot_all(qTs.data(), kh, C, D, W,
              [&](int64_t j) {
                const __m256 b = _mm256_add_ps(_mm256_loadu_ps(rhT.data() + ky[j] * VL),
                                               _mm256_loadu_ps(rwT.data() + kx[j] * VL));
                return masked ? _mm256_add_ps(b, _mm256_set1_ps(kb[j])) : b;
              },
              [&](int64_t j, __m256 a) { _mm256_storeu_ps(s.data() + j * VL, a); mx = _mm256_max_ps(mx, a); });
      Vec sum(0.f), vmx(mx);  // softmax numerators in place, then each query's 1 / sum
      for (int64_t j = 0, nk = W; j < nk; j++) {
        const Vec p = (Vec::loadu(s.data() + j * VL) - vmx).exp_u20();
        p.store(s.data() + j * VL);
        sum = sum + p;
      }
      const __m256 inv = Vec(1.f) / sum;
      // probabilities times v, VL channels at a time (queries in lanes), then each query's E channels to its pixel
      const auto emit = [&](int64_t e, __m256 a) { _mm256_storeu_ps(oT.data() + e * VL, _mm256_mul_ps(a, inv)); };
      int64_t e = 0;
      for (; e + VL <= E; e += VL) prob_v<VL>(s.data(), kh + D, C, W, e, emit);
      for (; e < E; e++) prob_v<1>(s.data(), kh + D, C, W, e, emit);
      for (e = 0; whole && e + VL <= E; e += VL) {  // back to channels-last, VL channels x VL pixels at a time
        __m256 r[VL];
        for (int64_t u = 0; u < VL; u++) r[u] = _mm256_loadu_ps(oT.data() + (e + u) * VL);
        transpose8(r);
        for (int64_t l = 0; l < VL; l++) _mm256_storeu_ps(outb + qpix[l] * CO + e, r[l]);
      }
      for (; e < E; e++)
        for (int64_t l = 0; l < nq; l++) outb[qpix[l] * CO + e] = oT[e * VL + l];
    }
  });
  return out;
}
"""
_FLAGS = ["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-fopenmp"]


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU with AVX2 (this one: {torch.backends.cpu.get_cpu_capability()})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"needs a C++ compiler ({compiler!r} not found; set CXX)"
    if not cpp_extension.is_ninja_available():
        return "needs ninja to build the C++ extension (pip install vitkit[kernels], or ninja)"
    return None


def build(name: str = "vitkit_halo_attention", source: str = _SOURCE):
    """Build (or load from ``TORCH_EXTENSIONS_DIR``) the C++ of ``halo_attention`` as extension ``name``; a
    different ``source`` (an earlier version, for ``benchmarks/halo/layout_ab.py``) under its own name."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"vitkit.kernels.halo: the fused kernel {reason}")
    return cpp_extension.load_inline(
        name, cpp_sources=[source], functions=["halo_attention"], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"]
    )


@functools.cache
def _extension():
    return build()


# flexible_layout: Inductor hands the op its buffers as they are (channels-last from oneDNN's convolutions), not copied
# to the strides an eager run would have had; the op copies any other layout to channels-last itself. (A torch
# without the tag on custom ops gets the default constraint: correct, with Inductor's copies to NCHW.)
_LAYOUT = (
    {"tags": (torch.Tag.flexible_layout,)}
    if hasattr(torch.Tag, "flexible_layout") and "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


@torch.library.custom_op("vitkit::halo_attention", mutates_args=(), **_LAYOUT)
def halo_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    height_rel: torch.Tensor,
    width_rel: torch.Tensor,
    key_bias: torch.Tensor,
    heads: int,
    block: int,
    halo: int,
    scale: float,
) -> torch.Tensor:
    """Halo attention on maps, as :class:`~vitkit.layers.halo_attention.HaloAttention` computes it between its 1x1
    convolutions: q (B, heads * D, Hq, Wq) from the query convolution; kv (B, heads * (D + E), Hp, Wp) from the
    key/value one (each head's k then v channels) on the map padded to whole ``block``s; ``height_rel``/``width_rel``
    (2 * win - 1, D), ``PosEmbedRel``'s tables; key_bias (blocks, win * win) or empty. Each ``block`` x ``block``
    block's queries (``Hq / (Hp / block)`` to a side: fewer for strided queries) attend to the window of ``win = block
    + 2 * halo`` around it, keys beyond the map being zeros (the reference's halo padding, never materialised here).
    Any memory format in; returns (B, heads * E, Hq, Wq) channels-last."""
    return _extension().halo_attention(q, kv, height_rel, width_rel, key_bias, heads, block, halo, scale)


@halo_attention.register_fake
def _(q, kv, height_rel, width_rel, key_bias, heads, block, halo, scale):
    shape = (q.shape[0], kv.shape[1] - q.shape[1], q.shape[2], q.shape[3])
    return torch.empty(shape, dtype=q.dtype, device=q.device, memory_format=torch.channels_last)


def _autocast_cpu() -> bool:
    """CPU autocast is on (the convolutions would hand the op bfloat16)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


class FusedHaloAttention(HaloAttention):
    """``HaloAttention`` whose fused route between the two 1x1 convolutions is :func:`halo_attention` (see the
    module docstring): no query blocks, key windows or output permutation are materialised."""

    def _attend(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        fp32 = x.dtype == torch.float32 and x.device.type == "cpu" and not _autocast_cpu()
        if grad or not (fp32 and self.use_fused()):
            return super()._attend(x, H, W)  # the kernel has no backward; other dtypes (autocast too), devices, eager
        h, key_bias = self.halo_size, self._key_bias(H, W, x.shape[2], x.shape[3], x)
        key_bias = x.new_empty(0) if key_bias is None else key_bias
        tables = (self.pos_embed.height_rel, self.pos_embed.width_rel)
        x = x.contiguous(memory_format=torch.channels_last)  # eager: the convolutions then leave channels-last maps
        return halo_attention(self.q(x), self.kv(x), *tables, key_bias, self.num_heads, self.block_size, h, self.scale)
