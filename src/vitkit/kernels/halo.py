"""A fused halo attention kernel for CPU inference (x86 with AVX2), and the layer that uses it.

``HaloAttention``'s plain core builds the relative-logit bias ``rh[ky] + rw[kx]`` for every query and window key
(6.4 M values per layer in HaloNet-H1's first stage at 256 px) and hands it to ``F.scaled_dot_product_attention``.
Under ``torch.compile`` that bias is one scalar loop (Inductor does not vectorise an index divided by the window
side) and SDPA's CPU kernel reads it back, and the layer's query blocks, key windows (3x the key/value map) and
output are permuted copies. This kernel does everything between the two 1x1 convolutions on the maps as they are
(NCHW; the key/value map halo-padded): one task is a group of 8 queries of one block of one head, **one query per
vector lane** (AVX2 + FMA). The relative-logit factors are formed inside, from ``PosEmbedRel``'s tables and the
unscaled query; a key's logits for the 8 queries are one vector started from ``rh[ky] + rw[kx]`` (two vector loads:
no bias row), 8 keys at a time with ``k`` broadcast from where it lies in the map; the softmax's max and sum run down
the keys (no reduction across lanes); the value product keeps the queries in lanes, 8 channels at a time with ``v``
broadcast from the map, so a channel's result is 8 pixels of the output, stored in place. Lanes past the last query
are zeros, so any block size works. ``at::parallel_for`` splits the groups; each is computed whole, in one order, so
the thread count does not change a bit of the result. The arithmetic is the same attention in fp32 with the sums in
another order and ATen's ``exp_u20`` (an exponential within 20 ulp, as in PyTorch's own CPU flash attention).

It is built from source at first use by ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are
needed; the build is cached under ``TORCH_EXTENSIONS_DIR``) and registered as the custom op
``vitkit::halo_attention`` with a fake implementation, so ``torch.compile`` keeps the model in one graph.
:class:`FusedHaloAttention` takes it only where it applies (fp32 CPU input, no autocast, no autograd, the fused route)
and runs the plain layer otherwise; ``attn_probs`` hooks still see the eager route.

Measured (``benchmarks/halo/fused_kernel.py``, AMD EPYC, AVX2, 1 thread): see ``benchmarks/halo/README.md``
("A fused kernel"); ``optimize`` measures the kernel form against the plain compiled one before it keeps it.
"""

from __future__ import annotations

import functools
import os
import shutil

import torch
import torch.nn.functional as F
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
constexpr int64_t VL = Vec::size();  // queries per lane group: 8 (built for AVX2) or 16 (built for AVX-512)
// the few vector operations the kernel uses, at the width it is built for
#if defined(CPU_CAPABILITY_AVX512)
using V = __m512;
constexpr int KB = 8;  // keys per register block of the logits
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V vset1(float a) { return _mm512_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
// lanes 8s .. 8s + 7 from / to the 8 consecutive floats at p + off[8s] (rows of 8 pixels of a map)
inline V vload_rows(const float* p, const int64_t* off) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p + off[0])), _mm256_loadu_ps(p + off[8]), 1);
}
inline void vstore_rows(float* p, const int64_t* off, V a) {
  _mm256_storeu_ps(p + off[0], _mm512_castps512_ps256(a));
  _mm256_storeu_ps(p + off[8], _mm512_extractf32x8_ps(a, 1));
}
#else
using V = __m256;
constexpr int KB = 8;
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V vset1(float a) { return _mm256_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V vload_rows(const float* p, const int64_t* off) { return _mm256_loadu_ps(p + off[0]); }
inline void vstore_rows(float* p, const int64_t* off, V a) { _mm256_storeu_ps(p + off[0], a); }
#endif

// For K rows i0 .. i0 + K of a matrix whose row i starts at base + off[i], elements dstride apart: emit(i, init(i) +
// q . row_i), the queries in lanes (qT: (D, VL)) and the K sums in registers.
template <int K, class Init, class Emit>
inline void dot_rows(const float* qT, const float* base, const int64_t* off, int64_t dstride, int64_t D, int64_t i0,
                     Init init, Emit emit) {
  V acc[K];
  const float* r[K];
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) { acc[u] = init(i0 + u); r[u] = base + off[i0 + u]; }
  for (int64_t d = 0; d < D; d++) {
    const V qd = vload(qT + d * VL);
    #pragma GCC unroll 8
    for (int u = 0; u < K; u++) acc[u] = vfma(qd, vset1(r[u][d * dstride]), acc[u]);
  }
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) emit(i0 + u, acc[u]);
}

template <class Init, class Emit>
inline void dot_all(const float* qT, const float* base, const int64_t* off, int64_t dstride, int64_t D, int64_t n,
                    Init init, Emit emit) {
  int64_t i = 0;
  for (; i + KB <= n; i += KB) dot_rows<KB>(qT, base, off, dstride, D, i, init, emit);
  for (; i < n; i++) dot_rows<1>(qT, base, off, dstride, D, i, init, emit);
}

// p (W, VL): probabilities, queries in lanes; v: value channel e of key j at v + e * dstride + off[j]. Emits
// (e, sum_j p[j] v[j][e]) for channels e0 .. e0 + EB, the sums (queries in lanes) in registers.
template <int EB, class Emit>
inline void prob_v(const float* p, const float* v, const int64_t* off, int64_t dstride, int64_t W, int64_t e0,
                   Emit emit) {
  V acc[EB];
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++) acc[u] = vset1(0.f);
  const float* ve = v + e0 * dstride;
  for (int64_t j = 0; j < W; j++) {
    const V pj = vload(p + j * VL);
    const float* vj = ve + off[j];
    #pragma GCC unroll 8
    for (int u = 0; u < EB; u++) acc[u] = vfma(pj, vset1(vj[u * dstride]), acc[u]);
  }
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++) emit(e0 + u, acc[u]);
}

// q (B, heads * D, Hq, Wq): the queries, Hq = nh * bs, Wq = nw * bs; kv (B, heads * (D + E), nh * b + 2 * halo,
// nw * b + 2 * halo): each head's D channels of k then E of v (b = block), the map padded by the halo; height_rel,
// width_rel (2 * win - 1, D), win = b + 2 * halo; key_bias (nh * nw, win * win) or empty. Block (by, bx) of a head:
// its bs x bs queries attend to the win x win keys from row by * b, column bx * b of kv, with logits q . k * scale +
// q . height_rel[ky - y + win - 1] + q . width_rel[kx - x + win - 1] + key_bias, (y, x) the query's place in its
// block. Returns the attention output (B, heads * E, Hq, Wq).
torch::Tensor halo_attention(torch::Tensor q, torch::Tensor kv, torch::Tensor height_rel, torch::Tensor width_rel,
                             torch::Tensor key_bias, int64_t heads, int64_t block, int64_t halo, double scale) {
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 4 && height_rel.dim() == 2 && width_rel.dim() == 2,
              "halo_attention: q, kv 4-D (NCHW); height_rel, width_rel 2-D");
  for (const auto& t : {q, kv, height_rel, width_rel})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "halo_attention: float32 CPU tensors only");
  q = q.contiguous(); kv = kv.contiguous(); height_rel = height_rel.contiguous(); width_rel = width_rel.contiguous();
  TORCH_CHECK(heads > 0 && block > 0 && halo >= 0, "halo_attention: heads, block > 0 and halo >= 0");
  TORCH_CHECK(q.size(1) % heads == 0 && kv.size(1) % heads == 0 && kv.size(0) == q.size(0),
              "halo_attention: q and kv channels must split into heads, and their batch sizes agree");
  const int64_t B = q.size(0), D = q.size(1) / heads, C = kv.size(1) / heads, E = C - D, win = block + 2 * halo;
  const int64_t Hq = q.size(2), Wq = q.size(3), Hk = kv.size(2), Wk = kv.size(3);
  const int64_t nh = (Hk - 2 * halo) / block, nw = (Wk - 2 * halo) / block;
  TORCH_CHECK(E > 0 && nh > 0 && nw > 0 && Hk == nh * block + 2 * halo && Wk == nw * block + 2 * halo,
              "halo_attention: kv must be (B, heads * (D + E), nh * block + 2 * halo, nw * block + 2 * halo), E > 0");
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
  auto out = torch::empty({B, heads * E, Hq, Wq}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kvp = kv.data_ptr<float>();
  const float* hrel = height_rel.data_ptr<float>(); const float* wrel = width_rel.data_ptr<float>();
  const float* kbp = masked ? key_bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t W = win * win, Q = bs * bs, G = (Q + VL - 1) / VL, T = 2 * win - 1;
  const int64_t blocks = nh * nw, QP = Hq * Wq, KP = Hk * Wk;
  const V sc = vset1((float)scale);
  std::vector<int64_t> ky(W), kx(W), koff(W), toff(T);  // key j: window row, column, offset in a channel plane
  for (int64_t j = 0; j < W; j++) { ky[j] = j / win; kx[j] = j % win; koff[j] = ky[j] * Wk + kx[j]; }
  for (int64_t t = 0; t < T; t++) toff[t] = t * D;  // table rows
  const auto zero = [](int64_t) { return vset1(0.f); };
  // one task: a group of VL queries of one block of one head, the queries in vector lanes (lanes past Q are zeros)
  at::parallel_for(0, B * heads * blocks * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qT(D * VL), qTs(D * VL), ph(T * VL), pw(T * VL), rhT(win * VL), rwT(win * VL), s(W * VL);
    int64_t qoff[VL];  // each lane's pixel in a q / output channel plane
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t / G, i0 = (t % G) * VL, nq = std::min(VL, Q - i0);
      const int64_t bh = n / blocks, blk = n % blocks, by = blk / nw, bx = blk % nw;
      const float* qb = qp + bh * D * QP;
      const float* win0 = kvp + bh * C * KP + by * block * Wk + bx * block;  // the window's top-left key, channel 0
      float* outb = op + bh * E * QP;
      for (int64_t l = 0; l < nq; l++) qoff[l] = (by * bs + (i0 + l) / bs) * Wq + bx * bs + (i0 + l) % bs;
      const bool row = nq == VL && bs % 8 == 0;  // the group is rows of 8 pixels: whole-vector loads and stores
      if (nq < VL) std::fill(qT.begin(), qT.end(), 0.f);
      for (int64_t d = 0; d < D; d++) {  // q transposed, one lane per query; scaled for the logits
        if (row) vstore(qT.data() + d * VL, vload_rows(qb + d * QP, qoff));
        else for (int64_t l = 0; l < nq; l++) qT[d * VL + l] = qb[d * QP + qoff[l]];
        vstore(qTs.data() + d * VL, vmul(sc, vload(qT.data() + d * VL)));
      }
      // relative logits, from the unscaled query as in the reference: q against every table row, then each query's
      // rows by its place (y, x) in the block: rh[ky] = q . height_rel[ky - y + win - 1], rw[kx] likewise
      dot_all(qT.data(), hrel, toff.data(), 1, D, T, zero,
              [&](int64_t i, V a) { vstore(ph.data() + i * VL, a); });
      dot_all(qT.data(), wrel, toff.data(), 1, D, T, zero,
              [&](int64_t i, V a) { vstore(pw.data() + i * VL, a); });
      for (int64_t l = 0; l < VL; l++) {
        const int64_t i = l < nq ? i0 + l : 0, y = i / bs, x = i % bs;
        for (int64_t k = 0; k < win; k++) {
          rhT[k * VL + l] = ph[(k - y + win - 1) * VL + l];
          rwT[k * VL + l] = pw[(k - x + win - 1) * VL + l];
        }
      }
      const float* kb = masked ? kbp + blk * W : nullptr;
      // logits (q . k * scale + rh[ky] + rw[kx] + key_bias), KB keys at a time, and each query's max
      V mx = vset1(-std::numeric_limits<float>::infinity());
      dot_all(qTs.data(), win0, koff.data(), KP, D, W,
              [&](int64_t j) {
                const V b = vadd(vload(rhT.data() + ky[j] * VL), vload(rwT.data() + kx[j] * VL));
                return masked ? vadd(b, vset1(kb[j])) : b;
              },
              [&](int64_t j, V a) { vstore(s.data() + j * VL, a); mx = vmax(mx, a); });
      Vec sum(0.f), vmx(mx);  // softmax numerators in place, then each query's 1 / sum
      for (int64_t j = 0; j < W; j++) {
        const Vec p = (Vec::loadu(s.data() + j * VL) - vmx).exp_u20();
        p.store(s.data() + j * VL);
        sum = sum + p;
      }
      const V inv = Vec(1.f) / sum;
      // probabilities times v, VL channels at a time; each channel's VL queries go to their pixels
      const auto emit = [&](int64_t e, V a) {
        float* dst = outb + e * QP;
        a = vmul(a, inv);
        if (row) { vstore_rows(dst, qoff, a); return; }
        float lanes[VL];
        vstore(lanes, a);
        for (int64_t l = 0; l < nq; l++) dst[qoff[l]] = lanes[l];
      };
      const float* v0 = win0 + D * KP;
      int64_t e = 0;
      for (; e + VL <= E; e += VL) prob_v<VL>(s.data(), v0, koff.data(), KP, W, e, emit);
      for (; e < E; e++) prob_v<1>(s.data(), v0, koff.data(), KP, W, e, emit);
    }
  });
  return out;
}
"""
_FLAGS = {  # the same source at two vector widths; ATen's Vectorized<float> follows CPU_CAPABILITY
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
}  # fmt: skip


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


def widths() -> list[str]:
    """The builds this CPU can run: ``["avx2"]``, or ``["avx2", "avx512"]`` where torch's own kernels use AVX-512."""
    return ["avx2", "avx512"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else ["avx2"]


def width() -> str:
    """The build :func:`halo_attention` uses: ``VITKIT_HALO_WIDTH`` (``avx2`` or ``avx512``) if set, else the widest
    this CPU runs (``benchmarks/halo/fused_kernel.py`` measures the two against each other)."""
    chosen = os.environ.get("VITKIT_HALO_WIDTH") or widths()[-1]
    if chosen not in widths():
        raise ValueError(f"VITKIT_HALO_WIDTH={chosen!r}: this CPU runs {widths()}")
    return chosen


@functools.cache
def _extension(isa: str | None = None):
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"vitkit.kernels.halo: the fused kernel {reason}")
    isa = isa or width()
    return cpp_extension.load_inline(
        f"vitkit_halo_attention_{isa}",
        cpp_sources=[_SOURCE],
        functions=["halo_attention"],
        extra_cflags=["-O3", "-fopenmp", *_FLAGS[isa]],
        extra_ldflags=["-fopenmp"],
    )


@torch.library.custom_op("vitkit::halo_attention", mutates_args=())
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
    convolutions: q (B, heads * D, Hq, Wq) from the query convolution; kv (B, heads * (D + E), Hp + 2 * halo,
    Wp + 2 * halo) from the key/value one (each head's k then v channels) on the map padded to whole ``block``s, then
    zero-padded by the halo; ``height_rel``/``width_rel`` (2 * win - 1, D), ``PosEmbedRel``'s tables; key_bias
    (blocks, win * win) or empty. Each ``block`` x ``block`` block's queries (``Hq / (Hp / block)`` to a side: fewer
    for strided queries) attend to the window of ``win = block + 2 * halo`` around it. Returns (B, heads * E, Hq,
    Wq)."""
    return _extension().halo_attention(q, kv, height_rel, width_rel, key_bias, heads, block, halo, scale)


@halo_attention.register_fake
def _(q, kv, height_rel, width_rel, key_bias, heads, block, halo, scale):
    return q.new_empty(q.shape[0], kv.shape[1] - q.shape[1], q.shape[2], q.shape[3])


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
        kv = F.pad(self.kv(x), (h, h, h, h))
        return halo_attention(self.q(x), kv, *tables, key_bias, self.num_heads, self.block_size, h, self.scale)
