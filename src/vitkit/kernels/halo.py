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

Measured (``benchmarks/halo/fused_kernel.py``, 1 thread, on an AVX2 AMD EPYC, an AVX-512 AMD EPYC and an Intel
Xeon with AMX): see ``benchmarks/halo/README.md`` ("A fused kernel"); ``optimize`` measures the kernel form against
the plain compiled one before it keeps it. The AVX2 build runs on the AVX-512 CPUs too: a 16-lane AVX-512 build of
the same source was a tie there (HaloNet-H1 within 5% either way; commit 78a5f7d, ``fused_kernel_widths.json``) and
was not kept.
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
constexpr int64_t VL = Vec::size();  // queries per lane group (8: the file is built for AVX2)
constexpr int KB = 8;                // keys per register block of the logits

// For K rows i0 .. i0 + K of a matrix whose row i starts at base + off[i], elements dstride apart: emit(i, init(i) +
// q . row_i), the queries in lanes (qT: (D, VL)) and the K sums in registers.
template <int K, class Init, class Emit>
inline void dot_rows(const float* qT, const float* base, const int64_t* off, int64_t dstride, int64_t D, int64_t i0,
                     Init init, Emit emit) {
  __m256 acc[K];
  const float* r[K];
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) { acc[u] = init(i0 + u); r[u] = base + off[i0 + u]; }
  for (int64_t d = 0; d < D; d++) {
    const __m256 qd = _mm256_loadu_ps(qT + d * VL);
    #pragma GCC unroll 8
    for (int u = 0; u < K; u++) acc[u] = _mm256_fmadd_ps(qd, _mm256_broadcast_ss(r[u] + d * dstride), acc[u]);
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
  __m256 acc[EB];
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++) acc[u] = _mm256_setzero_ps();
  const float* ve = v + e0 * dstride;
  for (int64_t j = 0; j < W; j++) {
    const __m256 pj = _mm256_loadu_ps(p + j * VL);
    const float* vj = ve + off[j];
    #pragma GCC unroll 8
    for (int u = 0; u < EB; u++) acc[u] = _mm256_fmadd_ps(pj, _mm256_broadcast_ss(vj + u * dstride), acc[u]);
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
  const __m256 sc = _mm256_set1_ps((float)scale);
  std::vector<int64_t> ky(W), kx(W), koff(W), toff(T);  // key j: window row, column, offset in a channel plane
  for (int64_t j = 0; j < W; j++) { ky[j] = j / win; kx[j] = j % win; koff[j] = ky[j] * Wk + kx[j]; }
  for (int64_t t = 0; t < T; t++) toff[t] = t * D;  // table rows
  const auto zero = [](int64_t) { return _mm256_setzero_ps(); };
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
      const bool row = nq == VL && bs % VL == 0;  // the group is VL pixels of one row: whole-vector loads and stores
      if (nq < VL) std::fill(qT.begin(), qT.end(), 0.f);
      for (int64_t d = 0; d < D; d++) {  // q transposed, one lane per query; scaled for the logits
        if (row) _mm256_storeu_ps(qT.data() + d * VL, _mm256_loadu_ps(qb + d * QP + qoff[0]));
        else for (int64_t l = 0; l < nq; l++) qT[d * VL + l] = qb[d * QP + qoff[l]];
        _mm256_storeu_ps(qTs.data() + d * VL, _mm256_mul_ps(sc, _mm256_loadu_ps(qT.data() + d * VL)));
      }
      // relative logits, from the unscaled query as in the reference: q against every table row, then each query's
      // rows by its place (y, x) in the block: rh[ky] = q . height_rel[ky - y + win - 1], rw[kx] likewise
      dot_all(qT.data(), hrel, toff.data(), 1, D, T, zero,
              [&](int64_t i, __m256 a) { _mm256_storeu_ps(ph.data() + i * VL, a); });
      dot_all(qT.data(), wrel, toff.data(), 1, D, T, zero,
              [&](int64_t i, __m256 a) { _mm256_storeu_ps(pw.data() + i * VL, a); });
      for (int64_t l = 0; l < VL; l++) {
        const int64_t i = l < nq ? i0 + l : 0, y = i / bs, x = i % bs;
        for (int64_t k = 0; k < win; k++) {
          rhT[k * VL + l] = ph[(k - y + win - 1) * VL + l];
          rwT[k * VL + l] = pw[(k - x + win - 1) * VL + l];
        }
      }
      const float* kb = masked ? kbp + blk * W : nullptr;
      // logits (q . k * scale + rh[ky] + rw[kx] + key_bias), KB keys at a time, and each query's max
      __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      dot_all(qTs.data(), win0, koff.data(), KP, D, W,
              [&](int64_t j) {
                const __m256 b = _mm256_add_ps(_mm256_loadu_ps(rhT.data() + ky[j] * VL),
                                               _mm256_loadu_ps(rwT.data() + kx[j] * VL));
                return masked ? _mm256_add_ps(b, _mm256_set1_ps(kb[j])) : b;
              },
              [&](int64_t j, __m256 a) { _mm256_storeu_ps(s.data() + j * VL, a); mx = _mm256_max_ps(mx, a); });
      Vec sum(0.f), vmx(mx);  // softmax numerators in place, then each query's 1 / sum
      for (int64_t j = 0; j < W; j++) {
        const Vec p = (Vec::loadu(s.data() + j * VL) - vmx).exp_u20();
        p.store(s.data() + j * VL);
        sum = sum + p;
      }
      const __m256 inv = Vec(1.f) / sum;
      // probabilities times v, VL channels at a time; each channel's VL queries go to their pixels
      const auto emit = [&](int64_t e, __m256 a) {
        float* dst = outb + e * QP;
        a = _mm256_mul_ps(a, inv);
        if (row) { _mm256_storeu_ps(dst + qoff[0], a); return; }
        float lanes[VL];
        _mm256_storeu_ps(lanes, a);
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


@functools.cache
def _extension():
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"vitkit.kernels.halo: the fused kernel {reason}")
    return cpp_extension.load_inline(
        "vitkit_halo_attention",
        cpp_sources=[_SOURCE],
        functions=["halo_attention"],
        extra_cflags=_FLAGS,
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
