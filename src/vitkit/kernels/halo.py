"""A fused halo attention kernel for CPU inference (x86 with AVX2), and the layer that uses it.

``HaloAttention``'s plain core builds the relative-logit bias ``rh[ky] + rw[kx]`` for every query and window key
(6.4 M values per layer in HaloNet-H1's first stage at 256 px) and hands it to ``F.scaled_dot_product_attention``.
Under ``torch.compile`` that bias is one scalar loop (Inductor does not vectorise an index divided by the window
side) and SDPA's CPU kernel reads it back, and the layer's query blocks, key windows (3x the key/value map) and
output are permuted copies. This kernel does everything between the two 1x1 convolutions on the maps as they are,
**channels-last** (the layout oneDNN's convolutions hand over under ``torch.compile``; the op is registered with a
flexible layout, so Inductor passes its buffers without the copies to NCHW it would otherwise make, and the halo
padding is never materialised). One block's window of keys, every head's, is packed once (zeros beyond the map: the
halo), read from the map in order; then one task is a group of up to 16 queries of the block for one head, **one
query per vector lane**, two vectors of 8 (AVX2 + FMA; the queries moved into lanes by 8 x 8 register transposes).
The relative-logit factors are formed inside, from ``PosEmbedRel``'s tables (only the rows the group's lanes need)
and the unscaled query; a key's logits for 8 queries are one vector started from ``rh[ky] + rw[kx]`` (two vector
loads: no bias row), 4 keys at a time with each ``k`` value broadcast from the packed window once for both query
vectors (a broadcast from memory takes a vector-pipe slot on AMD's Zen cores: one per multiply-add ran at half the
rate); the softmax's max and sum run down the keys (no reduction across lanes); the value product keeps the queries
in lanes, 4 channels of both vectors at a time, and is transposed back to 8 pixels' channels for the store. Lanes
past the last query are zeros, so any block size works. ``at::parallel_for`` splits the groups; each is computed
whole, in one order, so the thread count does not change a bit of the result. The arithmetic is the same attention
in fp32 with the sums in another order and the arithmetic of ATen's ``exp_u20`` (an exponential within 20 ulp, as in
PyTorch's own CPU flash attention) without its range masks, which a softmax's non-positive arguments do not need
(masked keys weigh exactly 0 and NaN propagates, as before; in the unmasked op a logit more than 80 below its
row's maximum weighs exp(-80) instead of less).

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

import torch
from torch.utils import cpp_extension

from vitkit.kernels import _autocast_cpu, unavailable_to_build
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

// exp(x) for the softmax's x = logit - max <= 0: the arithmetic of ATen's exp_u20 (2^n times its degree-5
// polynomial of r = x - n ln 2, n = x log2 e rounded) without its range masks. n is rounded by adding 1.5 * 2^23 + 127,
// which leaves n + 127 in the sum's low bits, ready to shift into a float's exponent. x is clamped at -80, so no
// denormal is formed: below it the result is exp(-80) ~ 2e-35 (nothing a sum of at least 1 can see), or exactly 0
// with ZERO_BELOW (the masked op: a masked key weighs 0, as with exp_u20, which returns 0 below ln FLT_MIN = -87.3;
// the two operations that cost were 6% of the unmasked op). A NaN stays NaN (as a row whose keys are all -inf
// gives). 11 vector operations (13) against exp_u20's 17; over every float in [-80, 0] the same bits but for 16
// arguments, 1 ulp apart (where x log2 e lies just below a half: exp_u20's floor(y + 0.5) rounds up, the added
// constant down).
template <bool ZERO_BELOW>
inline __m256 softmax_exp(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582912.f + 127.f), lo = _mm256_set1_ps(-80.f);
  const __m256 x0 = x;
  x = _mm256_max_ps(lo, x);  // (max returns its second operand, x, where x is NaN)
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 r = _mm256_fnmadd_ps(_mm256_sub_ps(t, magic), _mm256_set1_ps(0.693147180559945f), x);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.166676521f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.499991506f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.999999701f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.f));
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  return ZERO_BELOW ? _mm256_and_ps(p, _mm256_cmp_ps(x0, lo, _CMP_NLT_UQ)) : p;  // x >= -80 or NaN: kept
}

// The products below take NV vectors of queries (NV * VL queries, one per lane) against K rows at a time: each row
// value is broadcast once for NV multiply-adds. A broadcast from memory takes a slot of the vector pipes on AMD's Zen
// cores (one per multiply-add halves the rate: 41-48 against 80-88 GFLOP/s measured on a Zen 4), so two query vectors
// per broadcast (NV = 2) run near the multiply-add rate.
//
// For K rows i0 .. i0 + K of a matrix whose row i holds D values from base + i * ld: emit(i, v, init(i, v) + q_v .
// row_i) for the NV query vectors v, q_v's channel d at qT + d * qs + v * VL; the K x NV sums in registers.
template <int NV, int K, class Init, class Emit>
inline void dot_rows(const float* qT, int64_t qs, const float* base, int64_t ld, int64_t D, int64_t i0, Init init,
                     Emit emit) {
  __m256 acc[K][NV];
  const float* r = base + i0 * ld;
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++)
    for (int v = 0; v < NV; v++) acc[u][v] = init(i0 + u, v);
  for (int64_t d = 0; d < D; d++) {
    __m256 qd[NV];
    for (int v = 0; v < NV; v++) qd[v] = _mm256_loadu_ps(qT + d * qs + v * VL);
    #pragma GCC unroll 8
    for (int u = 0; u < K; u++) {
      const __m256 b = _mm256_broadcast_ss(r + u * ld + d);
      for (int v = 0; v < NV; v++) acc[u][v] = _mm256_fmadd_ps(qd[v], b, acc[u][v]);
    }
  }
  #pragma GCC unroll 8
  for (int u = 0; u < K; u++)
    for (int v = 0; v < NV; v++) emit(i0 + u, v, acc[u][v]);
}

// rows i0 .. i0 + n, 8 / NV at a time (8 accumulators)
template <int NV, class Init, class Emit>
inline void dot_all(const float* qT, int64_t qs, const float* base, int64_t ld, int64_t D, int64_t i0, int64_t n,
                    Init init, Emit emit) {
  constexpr int K = 8 / NV;
  int64_t i = i0;
  for (; i + K <= i0 + n; i += K) dot_rows<NV, K>(qT, qs, base, ld, D, i, init, emit);
  for (; i < i0 + n; i++) dot_rows<NV, 1>(qT, qs, base, ld, D, i, init, emit);
}

// p (W, NV * VL): probabilities, queries in lanes; value channel e of key j at v[j * ld + e]. Emits (e, v, sum_j
// p[j][v] v[j][e]) for channels e0 .. e0 + EB and the NV query vectors, the sums in registers.
template <int NV, int EB, class Emit>
inline void prob_v(const float* p, const float* v, int64_t ld, int64_t W, int64_t e0, Emit emit) {
  __m256 acc[EB][NV];
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++)
    for (int w = 0; w < NV; w++) acc[u][w] = _mm256_setzero_ps();
  for (int64_t j = 0; j < W; j++) {
    __m256 pj[NV];
    for (int w = 0; w < NV; w++) pj[w] = _mm256_loadu_ps(p + (j * NV + w) * VL);
    const float* vj = v + j * ld + e0;
    #pragma GCC unroll 8
    for (int u = 0; u < EB; u++) {
      const __m256 b = _mm256_broadcast_ss(vj + u);
      for (int w = 0; w < NV; w++) acc[u][w] = _mm256_fmadd_ps(pj[w], b, acc[u][w]);
    }
  }
  #pragma GCC unroll 8
  for (int u = 0; u < EB; u++)
    for (int w = 0; w < NV; w++) emit(e0 + u, w, acc[u][w]);
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
  constexpr int64_t NL = 2 * VL;  // queries per task: two lane vectors (one where at most VL are left)
  const int64_t W = win * win, Q = bs * bs, G = (Q + NL - 1) / NL;
  const int64_t blocks = nh * nw, QP = Hq * Wq, KP = Hk * Wk, CQ = heads * D, CK = heads * C, CO = heads * E;
  const __m256 sc = _mm256_set1_ps((float)scale);
  std::vector<int64_t> ky(W), kx(W);  // key j's window row and column
  for (int64_t j = 0; j < W; j++) { ky[j] = j / win; kx[j] = j % win; }
  const float* hrel = height_rel.data_ptr<float>(); const float* wrel = width_rel.data_ptr<float>();
  const auto zero = [](int64_t, int) { return _mm256_setzero_ps(); };
  // one task: up to NL queries of one block of one head, the queries in vector lanes (lanes past Q are zeros)
  at::parallel_for(0, B * heads * blocks * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qT(D * NL), qTs(D * NL), ph((2 * win - 1) * NL), pw((2 * win - 1) * NL), rhT(win * NL),
        rwT(win * NL), s(W * NL), oT(E * NL);
    // the block's window, every head's keys packed head after head, key after key (k then v channels): in the map
    // a window's keys lie a pixel's channels apart; packed, each is read from memory once, in order, for all heads
    std::vector<float> kw(heads * W * C);
    int64_t qpix[NL], window = -1;  // each lane's pixel; the block whose window kw holds
    for (int64_t t = begin; t < end; t++) {
      const int64_t n = t / G, i0 = (t % G) * NL, nq = std::min(NL, Q - i0);
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
      // the group's rows of its block: the relative-logit table rows it needs run from the last row's to the first's
      const int64_t ylo = i0 / bs, yhi = (i0 + nq - 1) / bs;
      const int64_t xlo = yhi > ylo ? 0 : i0 % bs, xhi = yhi > ylo ? bs - 1 : (i0 + nq - 1) % bs;
      const auto group = [&](auto nv) {  // the task with NV lane vectors
        constexpr int NV = decltype(nv)::value;
        constexpr int64_t L = NV * VL;  // lanes; q's channel d of lane vector v at qT + (d * NV + v) * VL
        // q transposed, one lane per query (VL pixels x VL channels at a time in registers), and scaled for the logits
        for (int v = 0; v < NV; v++) {
          const int64_t* pix = qpix + v * VL;
          const int64_t m = std::min<int64_t>(VL, nq - v * VL);
          int64_t d = 0;
          for (; m == VL && d + VL <= D; d += VL) {
            __m256 r[VL];
            for (int64_t l = 0; l < VL; l++) r[l] = _mm256_loadu_ps(qb + pix[l] * CQ + d);
            transpose8(r);
            for (int64_t u = 0; u < VL; u++) {
              _mm256_storeu_ps(qT.data() + ((d + u) * NV + v) * VL, r[u]);
              _mm256_storeu_ps(qTs.data() + ((d + u) * NV + v) * VL, _mm256_mul_ps(sc, r[u]));
            }
          }
          for (; d < D; d++) {
            float lanes[VL] = {};
            for (int64_t l = 0; l < m; l++) lanes[l] = qb[pix[l] * CQ + d];
            const __m256 r = _mm256_loadu_ps(lanes);
            _mm256_storeu_ps(qT.data() + (d * NV + v) * VL, r);
            _mm256_storeu_ps(qTs.data() + (d * NV + v) * VL, _mm256_mul_ps(sc, r));
          }
        }
        // relative logits, from the unscaled query as in the reference: rh[ky] = q . height_rel[ky - y + win - 1],
        // rw[kx] = q . width_rel[kx - x + win - 1], (y, x) the query's place in its block: only the table rows some
        // lane needs (two rows of 8 pixels: 15 of 27 height rows, 21 of 27 width rows at win 14), then each lane's
        const int64_t h0 = win - 1 - yhi, nhr = win + yhi - ylo, w0 = win - 1 - xhi, nwr = win + xhi - xlo;
        const auto put = [](float* dst, int64_t first) {
          return [dst, first](int64_t i, int v, __m256 a) { _mm256_storeu_ps(dst + ((i - first) * NV + v) * VL, a); };
        };
        dot_all<NV>(qT.data(), L, hrel, D, D, h0, nhr, zero, put(ph.data(), h0));
        dot_all<NV>(qT.data(), L, wrel, D, D, w0, nwr, zero, put(pw.data(), w0));
        for (int64_t l = 0; l < L; l++) {
          const int64_t i = l < nq ? i0 + l : i0, y = i / bs - ylo, x = i % bs - xlo;
          for (int64_t k = 0; k < win; k++) {  // table row k - y + win - 1 is row k + yhi - ylo - y of ph
            rhT[k * L + l] = ph[(k + yhi - ylo - y) * L + l];
            rwT[k * L + l] = pw[(k + xhi - xlo - x) * L + l];
          }
        }
        const float* kb = masked ? kbp + blk * W : nullptr;
        // logits (q . k * scale + rh[ky] + rw[kx] + key_bias), 8 / NV keys at a time, and each query's max
        __m256 mx[NV];
        for (int v = 0; v < NV; v++) mx[v] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        dot_all<NV>(qTs.data(), L, kh, C, D, 0, W,
                    [&](int64_t j, int v) {
                      const __m256 b = _mm256_add_ps(_mm256_loadu_ps(rhT.data() + ky[j] * L + v * VL),
                                                     _mm256_loadu_ps(rwT.data() + kx[j] * L + v * VL));
                      return masked ? _mm256_add_ps(b, _mm256_set1_ps(kb[j])) : b;
                    },
                    [&](int64_t j, int v, __m256 a) {
                      _mm256_storeu_ps(s.data() + (j * NV + v) * VL, a);
                      mx[v] = _mm256_max_ps(mx[v], a);
                    });
        __m256 sum[NV], inv[NV];  // softmax numerators in place, then each query's 1 / sum
        for (int v = 0; v < NV; v++) sum[v] = _mm256_setzero_ps();
        const auto numerators = [&](auto zero_below) {  // masked: a masked key's weight is exactly 0
          for (int64_t j = 0; j < W; j++)
            for (int v = 0; v < NV; v++) {
              float* sj = s.data() + (j * NV + v) * VL;
              const __m256 p = softmax_exp<decltype(zero_below)::value>(_mm256_sub_ps(_mm256_loadu_ps(sj), mx[v]));
              _mm256_storeu_ps(sj, p);
              sum[v] = _mm256_add_ps(sum[v], p);
            }
        };
        if (masked) numerators(std::true_type{});
        else numerators(std::false_type{});
        for (int v = 0; v < NV; v++) inv[v] = _mm256_div_ps(_mm256_set1_ps(1.f), sum[v]);
        // probabilities times v, 8 / NV channels at a time, then each query's E channels to its pixel
        const auto emit = [&](int64_t e, int v, __m256 a) {
          _mm256_storeu_ps(oT.data() + (e * NV + v) * VL, _mm256_mul_ps(a, inv[v]));
        };
        constexpr int EB = 8 / NV;
        int64_t e = 0;
        for (; e + EB <= E; e += EB) prob_v<NV, EB>(s.data(), kh + D, C, W, e, emit);
        for (; e < E; e++) prob_v<NV, 1>(s.data(), kh + D, C, W, e, emit);
        for (int v = 0; v < NV; v++) {
          const int64_t* pix = qpix + v * VL;
          const int64_t m = std::min<int64_t>(VL, nq - v * VL);
          for (e = 0; m == VL && e + VL <= E; e += VL) {  // back to channels-last, VL channels x VL pixels at a time
            __m256 r[VL];
            for (int64_t u = 0; u < VL; u++) r[u] = _mm256_loadu_ps(oT.data() + ((e + u) * NV + v) * VL);
            transpose8(r);
            for (int64_t l = 0; l < VL; l++) _mm256_storeu_ps(outb + pix[l] * CO + e, r[l]);
          }
          for (; e < E; e++)
            for (int64_t l = 0; l < m; l++) outb[pix[l] * CO + e] = oT[(e * NV + v) * VL + l];
        }
      };
      if (nq > VL) group(std::integral_constant<int, 2>{});
      else group(std::integral_constant<int, 1>{});
    }
  });
  return out;
}
"""
_FLAGS = ["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-fopenmp"]


unavailable_reason = unavailable_to_build  # (why the kernel cannot be built here, or None)


def build(name: str = "vitkit_halo_attention", source: str = _SOURCE, functions: tuple[str, ...] = ("halo_attention",)):
    """Build (or load from ``TORCH_EXTENSIONS_DIR``) the C++ of ``halo_attention`` as extension ``name`` with the
    kernel's flags; a different ``source`` under its own name (an earlier version, for
    ``benchmarks/halo/layout_ab.py``; a microbenchmark exporting other ``functions``, for ``broadcast_rate.py``)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"vitkit.kernels.halo: the fused kernel {reason}")
    return cpp_extension.load_inline(
        name, cpp_sources=[source], functions=list(functions), extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"]
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
