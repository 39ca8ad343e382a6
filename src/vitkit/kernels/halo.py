"""A fused halo attention kernel for CPU inference (x86 with AVX2), and the layer that uses it.

``HaloAttention``'s plain core builds the relative-logit bias ``rh[ky] + rw[kx]`` for every query and window key
(6.4 M values per layer in HaloNet-H1's first stage at 256 px) and hands it to ``F.scaled_dot_product_attention``.
Under ``torch.compile`` that bias is one scalar loop (Inductor does not vectorise an index divided by the window
side) and SDPA's CPU kernel reads it back. This kernel never writes it. One task is a group of 8 queries of one
window, **one query per vector lane** (ATen's ``Vectorized<float>``, AVX2 + FMA): a key's logit for the 8 queries
is one vector, started from the factor rows ``rh[ky] + rw[kx]`` (two vector loads: no per-key bias row) and 8 keys
at a time take their FMAs from broadcasts of ``k`` read in place; the softmax's max and sum run down the keys
(vertical: no reduction across lanes); the value product puts the values in lanes instead (8 queries x 1 vector,
or 4 queries x 2 vectors, the sums kept in registers). Lanes past the last query are zeros, so any block size
works. ``at::parallel_for`` splits the groups; each is computed whole, in one order, so the thread count does not
change a bit of the result. The arithmetic is the same attention in fp32, summed in another order.

It is built from source at first use by ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are
needed; the build is cached under ``TORCH_EXTENSIONS_DIR``) and registered as the custom op
``vitkit::halo_attention`` with a fake implementation, so ``torch.compile`` keeps the model in one graph.
:class:`FusedHaloAttention` takes it only where it applies (fp32 CPU tensors, no autograd, the fused route) and runs
the plain core otherwise; ``attn_probs`` hooks still see the eager route.

Measured (``benchmarks/halo/fused_kernel.py``, AMD EPYC, AVX2, 1 thread): see ``benchmarks/halo/README.md``
("A fused kernel"); ``optimize`` measures the kernel form against the plain compiled one before it keeps it.
"""

from __future__ import annotations

import functools
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

// p (W, VL): one group's probabilities, queries in lanes; vp (W, Ep): the window's values, rows padded to whole
// vectors. Writes out rows (E values each) of queries r0 .. r0 + R that exist (nq in the group), value vectors
// e .. e + EV: inv[r] * sum_j p[j][r] v[j].
template <int R, int EV>
inline void prob_v(const float* p, const float* vp, const float* inv, float* out, int64_t W, int64_t Ep, int64_t E,
                   int64_t e, int64_t r0, int64_t nq) {
  __m256 acc[R][EV];  // raw registers: GCC keeps an array of Vectorized in memory here
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++)
    #pragma GCC unroll 8
    for (int u = 0; u < EV; u++) acc[r][u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < W; j++) {
    __m256 v[EV];
    #pragma GCC unroll 8
    for (int u = 0; u < EV; u++) v[u] = _mm256_loadu_ps(vp + j * Ep + e + u * VL);
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m256 pj = _mm256_broadcast_ss(p + j * VL + r0 + r);
      #pragma GCC unroll 8
      for (int u = 0; u < EV; u++) acc[r][u] = _mm256_fmadd_ps(pj, v[u], acc[r][u]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++)
    #pragma GCC unroll 8
    for (int u = 0; u < EV; u++) {
      const int64_t e0 = e + u * VL;
      if (r0 + r < nq && e0 < E)
        (Vec(acc[r][u]) * Vec(inv[r0 + r])).store(out + (r0 + r) * E + e0, std::min(VL, E - e0));
    }
}

// For rows i0 .. i0 + K of a matrix (row i at rows + i * stride, D values), queries in lanes (qT: (D, VL)):
// emit(i, init(i) + q . row_i), the K sums in registers.
template <int K, class Init, class Emit>
inline void dot_rows(const float* qT, const float* rows, int64_t stride, int64_t D, int64_t i0, Init init, Emit emit) {
  __m256 acc[K];
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) acc[u] = init(i0 + u);
  const float* r = rows + i0 * stride;
  for (int64_t d = 0; d < D; d++) {
    const __m256 qd = _mm256_loadu_ps(qT + d * VL);
    #pragma GCC unroll 8
    for (int u = 0; u < K; u++) acc[u] = _mm256_fmadd_ps(qd, _mm256_broadcast_ss(r + u * stride + d), acc[u]);
  }
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++) emit(i0 + u, acc[u]);
}

template <class Init, class Emit>
inline void dot_all(const float* qT, const float* rows, int64_t stride, int64_t D, int64_t n, Init init, Emit emit) {
  int64_t i = 0;
  for (; i + KB <= n; i += KB) dot_rows<KB>(qT, rows, stride, D, i, init, emit);
  for (; i < n; i++) dot_rows<1>(qT, rows, stride, D, i, init, emit);
}

// q (N, Q, D) with Q = bs * bs queries per block (row-major in the block); kv (N, W, D + E): each window key's k
// then v, W = win * win; height_rel, width_rel (2 * win - 1, D); key_bias (blocks, W) added to every query's logits
// of block n % blocks, or empty. Returns softmax(q . k * scale + q . height_rel[ky - y + win - 1]
// + q . width_rel[kx - x + win - 1] + key_bias) v, (N, Q, E).
torch::Tensor halo_attention(torch::Tensor q, torch::Tensor kv, torch::Tensor height_rel, torch::Tensor width_rel,
                             torch::Tensor key_bias, int64_t blocks, int64_t bs, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3 && height_rel.dim() == 2 && width_rel.dim() == 2,
              "halo_attention: q, kv 3-D; height_rel, width_rel 2-D");
  for (const auto& t : {q, kv, height_rel, width_rel})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "halo_attention: float32 CPU tensors only");
  q = q.contiguous(); kv = kv.contiguous(); height_rel = height_rel.contiguous(); width_rel = width_rel.contiguous();
  const int64_t N = q.size(0), Q = q.size(1), D = q.size(2), W = kv.size(1), E = kv.size(2) - D;
  const int64_t win = (height_rel.size(0) + 1) / 2;
  TORCH_CHECK(win * win == W && kv.size(0) == N && E > 0, "halo_attention: kv must be (N, win*win, D + E)");
  TORCH_CHECK(height_rel.sizes() == width_rel.sizes() && height_rel.size(0) == 2 * win - 1 && height_rel.size(1) == D,
              "halo_attention: height_rel, width_rel must be (2*win - 1, D)");
  TORCH_CHECK(bs > 0 && bs <= win && bs * bs == Q, "halo_attention: Q must be bs*bs queries with bs <= win, got Q = ",
              Q, ", bs = ", bs);
  TORCH_CHECK(blocks > 0 && N % blocks == 0, "halo_attention: N must be a multiple of blocks");
  const bool masked = key_bias.numel() > 0;
  if (masked) {
    TORCH_CHECK(key_bias.scalar_type() == at::kFloat && key_bias.numel() == blocks * W, "halo_attention: key_bias");
    key_bias = key_bias.contiguous();
  }
  auto out = torch::empty({N, Q, E}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kvp = kv.data_ptr<float>();
  const float* hrel = height_rel.data_ptr<float>(); const float* wrel = width_rel.data_ptr<float>();
  const float* kbp = masked ? key_bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t C = D + E, Ep = (E + VL - 1) / VL * VL, G = (Q + VL - 1) / VL, T = 2 * win - 1;
  const __m256 sc = _mm256_set1_ps((float)scale);
  std::vector<int64_t> ky(W), kx(W);  // key j's window row and column
  for (int64_t j = 0; j < W; j++) { ky[j] = j / win; kx[j] = j % win; }
  const auto zero = [](int64_t) { return _mm256_setzero_ps(); };
  // one task: a group of VL queries of one window, the queries in vector lanes (lanes past Q are zeros)
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qT(D * VL), qTs(D * VL), ph(T * VL), pw(T * VL), rhT(win * VL), rwT(win * VL);
    std::vector<float> s(W * VL), vp(W * Ep, 0.f);
    float inv[VL];
    int64_t window = -1;
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t / G, i0 = (t % G) * VL, nq = std::min(VL, Q - i0);
      const float* kvb = kvp + n * W * C;
      if (n != window) {  // the window's values, rows padded to whole vectors
        for (int64_t j = 0; j < W; j++) std::copy(kvb + j * C + D, kvb + (j + 1) * C, vp.data() + j * Ep);
        window = n;
      }
      if (nq < VL) std::fill(qT.begin(), qT.end(), 0.f);
      for (int64_t l = 0; l < nq; l++)  // q transposed, one lane per query
        for (int64_t d = 0; d < D; d++) qT[d * VL + l] = qp[(n * Q + i0 + l) * D + d];
      for (int64_t d = 0; d < D; d++)
        _mm256_storeu_ps(qTs.data() + d * VL, _mm256_mul_ps(sc, _mm256_loadu_ps(qT.data() + d * VL)));
      // relative logits, from the unscaled query as in the reference: q against every table row, then each query's
      // rows by its place (y, x) in the block: rh[ky] = q . height_rel[ky - y + win - 1], rw[kx] likewise
      dot_all(qT.data(), hrel, D, D, T, zero, [&](int64_t i, __m256 a) { _mm256_storeu_ps(ph.data() + i * VL, a); });
      dot_all(qT.data(), wrel, D, D, T, zero, [&](int64_t i, __m256 a) { _mm256_storeu_ps(pw.data() + i * VL, a); });
      for (int64_t l = 0; l < VL; l++) {
        const int64_t i = l < nq ? i0 + l : 0, y = i / bs, x = i % bs;
        for (int64_t k = 0; k < win; k++) {
          rhT[k * VL + l] = ph[(k - y + win - 1) * VL + l];
          rwT[k * VL + l] = pw[(k - x + win - 1) * VL + l];
        }
      }
      const float* kb = masked ? kbp + (n % blocks) * W : nullptr;
      // logits (q . k * scale + rh[ky] + rw[kx] + key_bias), KB keys at a time, and each query's max
      __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      dot_all(qTs.data(), kvb, C, D, W,
              [&](int64_t j) {
                const __m256 b = _mm256_add_ps(_mm256_loadu_ps(rhT.data() + ky[j] * VL),
                                               _mm256_loadu_ps(rwT.data() + kx[j] * VL));
                return masked ? _mm256_add_ps(b, _mm256_set1_ps(kb[j])) : b;
              },
              [&](int64_t j, __m256 a) { _mm256_storeu_ps(s.data() + j * VL, a); mx = _mm256_max_ps(mx, a); });
      Vec sum(0.f), vmx(mx);  // softmax numerators in place; 1 / their sums
      for (int64_t j = 0; j < W; j++) {
        const Vec p = (Vec::loadu(s.data() + j * VL) - vmx).exp_u20();
        p.store(s.data() + j * VL);
        sum = sum + p;
      }
      (Vec(1.f) / sum).store(inv);
      float* ob = op + (n * Q + i0) * E;  // probabilities times v
      if (Ep == VL) {
        prob_v<VL, 1>(s.data(), vp.data(), inv, ob, W, Ep, E, 0, 0, nq);
      } else {
        for (int64_t e = 0; e < Ep; e += 2 * VL)
          for (int64_t r0 = 0; r0 < nq; r0 += 4) {
            if (e + VL == Ep)  // the last, odd vector: 4 queries x 2 vectors would leave half the sums idle
              prob_v<4, 1>(s.data(), vp.data(), inv, ob, W, Ep, E, e, r0, nq);
            else
              prob_v<4, 2>(s.data(), vp.data(), inv, ob, W, Ep, E, e, r0, nq);
          }
      }
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
    blocks: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Halo attention of N windows with its relative logits: q (N, Q, D), the ``block_size``^2 queries of a block
    row by row; kv (N, W, D + E), each of the ``win x win`` window keys' k then v; ``height_rel``/``width_rel``
    (2 * win - 1, D), :class:`~vitkit.layers.halo_attention.PosEmbedRel`'s tables; key_bias (blocks, W) or empty.
    Returns softmax(q k^T * scale + rh[ky] + rw[kx] + key_bias) v, (N, Q, E), the factors from the unscaled query."""
    return _extension().halo_attention(q, kv, height_rel, width_rel, key_bias, blocks, block_size, scale)


@halo_attention.register_fake
def _(q, kv, height_rel, width_rel, key_bias, blocks, block_size, scale):
    return q.new_empty(q.shape[0], q.shape[1], kv.shape[2] - q.shape[2])


class FusedHaloAttention(HaloAttention):
    """``HaloAttention`` whose fused route calls :func:`halo_attention` (see the module docstring)."""

    def _attend(self, q, kv, key_bias):
        BH, blocks, L, dqk = q.shape
        if not (self.use_fused() and q.dtype == torch.float32 and q.device.type == "cpu"):
            return super()._attend(q, kv, key_bias)
        tables = (self.pos_embed.height_rel, self.pos_embed.width_rel)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, kv, *tables)):
            return super()._attend(q, kv, key_bias)  # the kernel has no backward
        out = halo_attention(
            q.reshape(BH * blocks, L, dqk),
            kv.reshape(BH * blocks, kv.shape[2], kv.shape[3]),
            *tables,
            q.new_empty(0) if key_bias is None else key_bias,
            blocks,
            self.pos_embed.block_size,
            self.scale,
        )
        return out.reshape(BH, blocks, L, self.dim_head_v)
