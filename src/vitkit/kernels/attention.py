"""Attention with bf16 dot products (x86 with AVX-512 BF16), for the int8 route's attention.

torchao's PT2E flow quantizes convolutions and linears; attention stays in fp32 (``F.scaled_dot_product_attention``
between the dequantized Q, K and V), except on AMX CPUs, where torchao has an int8 SDPA template. On a CPU without
AMX that fp32 attention is a large part of an int8 model's time: in MobileViT-XS at batch 1, 4.9 of 21 ms, second to
the int8 convolutions (Zen 4, 1 thread, ``benchmarks/speed/profile_mobilevit_xs_int8_b1_t1.txt``).
:func:`attention_bf16` computes the same softmax attention with its two products in bf16 on ``vdpbf16ps`` (AVX-512
BF16: 32 multiply-adds a 512-bit instruction against an fp32 FMA's 16, into fp32 sums):

* Q (times the scale and log2 e) and K rounded to bf16, the scores ``Q K^T`` summed in fp32, 16 keys a register;
* the softmax in fp32, exp2 by a cubic on the fraction (relative error at most 1.5e-4) and ``vscalefps``, the
  probabilities left unnormalised in (0, 1] and rounded to bf16;
* ``P V`` with V rounded to bf16, summed in fp32, divided at the end by the sum of the rounded probabilities (so
  each output is a weighted mean of V's rows).

Each bf16 rounding is relative (at most 2^-8), so small probabilities keep their digits; the result is as close to
fp32 attention as bf16 inputs allow (the bound in ``tests/test_kernels_attention.py``), closer than the int8
activations around it. Threads take a head each (packed and computed while it is in cache); with fewer heads
than threads, every head is packed first and blocks of 32 query rows are split between the threads.

Measured against PyTorch's SDPA on the models' shapes on the AVX-512 AMD EPYC (Zen 4), 1 thread, interleaved
(``benchmarks/speed/attention_shapes.py``): MobileViT-XS 1.9-2.4x at batch 1 (2.0x on its largest stage, 4 x 4
heads x 256 tokens x 24 channels), 1.75-2.3x at batch 8; ViT-S (6 heads x 197 x 64) 2.0x / 1.75x. In the int8
programs: ``benchmarks/speed/attention_bf16.py``. :func:`vitkit.routes.quantize_pt2e_int8` with
``bf16_attention=True`` swaps each plain SDPA of the converted program for it (:func:`replace_sdpa`).

Built from source at first use like :mod:`vitkit.kernels.lut`; the op ``vitkit::attention_bf16`` is registered in
C++ (a compiled program calls it without Python) with a fake implementation, so ``torch.compile`` keeps one graph.
"""

from __future__ import annotations

import functools

import torch

from vitkit.kernels import unavailable_to_build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

static inline __mmask16 first(int64_t n) { return (__mmask16)((1u << std::min<int64_t>(16, n)) - 1); }

// 2^t for t <= 0: a cubic on the fraction (relative error 1.5e-4 at most), scaled by 2^floor(t) with vscalefps
BF16_TARGET static inline __m512 exp2_neg(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.0794402384f), _mm512_set1_ps(0.224494337f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.696065642f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One head's operands in bf16: Q rows (times scale * log2 e) padded to DP pairs; K in blocks of 16 keys
// [block][pair][key][2]; V per pair of keys [pair][channel][2], CB blocks of 16 channels then, if T8, 8 more
struct Layout {
  int64_t N, M, D, DP, NB, NP, CB, T8, VS, QN, KN, VN;
  Layout(int64_t N_, int64_t M_, int64_t D_) : N(N_), M(M_), D(D_) {
    DP = (D + 1) / 2; NB = (M + 15) / 16; NP = NB * 16;
    CB = D / 16 + (D % 16 > 8); T8 = D % 16 > 0 && D % 16 <= 8; VS = CB * 32 + T8 * 16;
    QN = N * DP * 2; KN = NB * DP * 32; VN = NP / 2 * VS;  // uint16 entries per head
  }
};

static inline int32_t load32(const uint16_t* p) { int32_t x; std::memcpy(&x, p, 4); return x; }

BF16_TARGET static void pack(const Layout& L, uint16_t* Q, uint16_t* K, uint16_t* V, const float* q, int64_t qs,
                             const float* k, int64_t ks, const float* v, int64_t vs, float scale) {
  const int64_t D = L.D, DP = L.DP;
  std::fill(Q, Q + L.QN, 0); std::fill(K, K + L.KN, 0); std::fill(V, V + L.VN, 0);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < L.N; i++)
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(first(D - d), q + i * qs + d), sc);
      _mm256_mask_storeu_epi16(Q + i * DP * 2 + d, first(D - d), (__m256i)_mm512_cvtneps_pbh(x));
    }
  std::vector<uint16_t> row(DP * 2 + 16);  // one key in bf16 (zero past D), then its pairs scattered into K
  for (int64_t j = 0; j < L.M; j++) {
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256((__m256i*)(row.data() + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(first(D - d), k + j * ks + d)));
    uint16_t* dst = K + (j / 16) * DP * 32 + (j % 16) * 2;
    for (int64_t dp = 0; dp < DP; dp++) std::memcpy(dst + dp * 32, row.data() + dp * 2, 4);
  }
  // [a0..a15 b0..b15] -> [a0 b0 a1 b1 ...]: channel c of keys j and j + 1 side by side
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < L.M; j += 2)
    for (int64_t cb = 0; cb < L.CB + L.T8; cb++) {
      const int64_t c = cb * 16;
      const __m512 a = _mm512_maskz_loadu_ps(first(D - c), v + j * vs + c);
      const __m512 b = j + 1 < L.M ? _mm512_maskz_loadu_ps(first(D - c), v + (j + 1) * vs + c) : _mm512_setzero_ps();
      const __m512i ab = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      uint16_t* dst = V + (j / 2) * L.VS + c * 2;
      if (cb < L.CB) _mm512_storeu_si512(dst, ab);
      else _mm256_storeu_si256((__m256i*)dst, _mm512_castsi512_si256(ab));
    }
}

// R query rows of one head from row i: scores, softmax, P V into out (row stride D). S and P: scratch of R * NP
template <int R>
BF16_TARGET static void rows(const Layout& L, const uint16_t* Q, const uint16_t* K, const uint16_t* V, int64_t i,
                             float* S, uint16_t* P, float* out) {
  const int64_t DP = L.DP, NB = L.NB, NP = L.NP, M = L.M, D = L.D;
  const uint16_t* q = Q + i * DP * 2;
  for (int64_t jb = 0; jb < NB; jb++) {
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const uint16_t* kb = K + jb * DP * 32;
    for (int64_t dp = 0; dp < DP; dp++) {
      const __m512bh kz = (__m512bh)_mm512_loadu_si512(kb + dp * 32);
      for (int r = 0; r < R; r++)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(load32(q + r * DP * 2 + dp * 2)), kz);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(S + r * NP + jb * 16, acc[r]);
  }
  float inv[R];
  for (int r = 0; r < R; r++) {
    float* s = S + r * NP;
    uint16_t* p = P + r * NP;
    for (int64_t j = M; j < NP; j++) s[j] = -INFINITY;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t jb = 0; jb < NB; jb++) m = _mm512_max_ps(m, _mm512_loadu_ps(s + jb * 16));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t jb = 0; jb < NB; jb++) {
      const __m512 t = _mm512_sub_ps(_mm512_loadu_ps(s + jb * 16), mx);
      const __m256i e = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(first(M - jb * 16), exp2_neg(t)));
      // the sum of the bf16 probabilities P V is weighted with, so each output is a weighted mean of V's rows
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(e), 16)));
      _mm256_storeu_si256((__m256i*)(p + jb * 16), e);
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
  for (int64_t cb = 0; cb < L.CB; cb++) {
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < NP / 2; jp++) {
      const __m512bh vz = (__m512bh)_mm512_loadu_si512(V + jp * L.VS + cb * 32);
      for (int r = 0; r < R; r++)  // the probabilities of keys 2 jp and 2 jp + 1
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(load32(P + r * NP + jp * 2)), vz);
    }
    for (int r = 0; r < R; r++)
      _mm512_mask_storeu_ps(out + r * D + cb * 16, first(D - cb * 16), _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r])));
  }
  if (L.T8) {  // the last 1-8 channels in 256-bit registers
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t jp = 0; jp < NP / 2; jp++) {
      const __m256bh vz = (__m256bh)_mm256_loadu_si256((const __m256i*)(V + jp * L.VS + L.CB * 32));
      for (int r = 0; r < R; r++)
        acc[r] = _mm256_dpbf16_ps(acc[r], (__m256bh)_mm256_set1_epi32(load32(P + r * NP + jp * 2)), vz);
    }
    const int64_t c = L.CB * 16;
    const __mmask8 mk = (__mmask8)((1u << (D - c)) - 1);
    for (int r = 0; r < R; r++)
      _mm256_mask_storeu_ps(out + r * D + c, mk, _mm256_mul_ps(acc[r], _mm256_set1_ps(inv[r])));
  }
}

torch::Tensor attention_bf16(const torch::Tensor& q_, const torch::Tensor& k_, const torch::Tensor& v_,
                             std::optional<double> scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), "attention_bf16: this CPU has no AVX-512 BF16");
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4,
              "attention_bf16: q, k, v of shape [B, heads, tokens, dim]");
  const auto f32 = torch::kFloat;
  TORCH_CHECK(q_.scalar_type() == f32 && k_.scalar_type() == f32 && v_.scalar_type() == f32,
              "attention_bf16: float32 q, k, v");
  TORCH_CHECK(q_.device().is_cpu() && k_.device().is_cpu() && v_.device().is_cpu(), "attention_bf16: CPU tensors");
  const int64_t B = q_.size(0), H = q_.size(1), N = q_.size(2), D = q_.size(3), M = k_.size(2);
  TORCH_CHECK(k_.size(0) == B && k_.size(1) == H && k_.size(3) == D && v_.sizes() == k_.sizes(),
              "attention_bf16: k and v of shape [B, heads, keys, dim] with q's B, heads and dim; got q ", q_.sizes(),
              ", k ", k_.sizes(), ", v ", v_.sizes());
  TORCH_CHECK(M > 0 && D > 0, "attention_bf16: at least one key and one channel");
  auto inner = [](const torch::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const torch::Tensor q = inner(q_), k = inner(k_), v = inner(v_);
  auto out = at::empty({B, H, N, D}, q.options());
  if (N == 0 || B * H == 0) return out;
  const float s = (scale.has_value() ? *scale : 1.0 / std::sqrt((double)D)) * 1.4426950408889634;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Layout L(N, M, D);
  auto head = [&](int64_t t, uint16_t* Q, uint16_t* K, uint16_t* V) {
    const int64_t bi = t / H, hi = t % H;
    pack(L, Q, K, V, qp + bi * q.stride(0) + hi * q.stride(1), q.stride(2), kp + bi * k.stride(0) + hi * k.stride(1),
         k.stride(2), vp + bi * v.stride(0) + hi * v.stride(1), v.stride(2), s);
  };
  auto block = [&](int64_t t, int64_t i0, int64_t i1, const uint16_t* Q, const uint16_t* K, const uint16_t* V,
                   float* S, uint16_t* P) {
    float* o = op + t * N * D;
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) rows<8>(L, Q, K, V, i, S, P, o + i * D);
    for (; i + 4 <= i1; i += 4) rows<4>(L, Q, K, V, i, S, P, o + i * D);
    for (; i < i1; i++) rows<1>(L, Q, K, V, i, S, P, o + i * D);
  };
  if (B * H >= at::get_num_threads()) {  // a head per task, packed and computed while its operands are in cache
    at::parallel_for(0, B * H, 1, [&](int64_t a, int64_t b) {
      std::vector<uint16_t> Q(L.QN), K(L.KN), V(L.VN), P(8 * L.NP);
      std::vector<float> S(8 * L.NP);
      for (int64_t t = a; t < b; t++) {
        head(t, Q.data(), K.data(), V.data());
        block(t, 0, N, Q.data(), K.data(), V.data(), S.data(), P.data());
      }
    });
    return out;
  }
  // fewer heads than threads: every head packed, then blocks of 32 query rows split between threads
  std::vector<uint16_t> Qs(B * H * L.QN), Ks(B * H * L.KN), Vs(B * H * L.VN);
  at::parallel_for(0, B * H, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) head(t, Qs.data() + t * L.QN, Ks.data() + t * L.KN, Vs.data() + t * L.VN);
  });
  const int64_t RB = 32, blocks = (N + RB - 1) / RB;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t a, int64_t b) {
    std::vector<float> S(8 * L.NP);
    std::vector<uint16_t> P(8 * L.NP);
    for (int64_t task = a; task < b; task++) {
      const int64_t t = task / blocks, i0 = task % blocks * RB;
      block(t, i0, std::min(N, i0 + RB), Qs.data() + t * L.QN, Ks.data() + t * L.KN, Vs.data() + t * L.VN,
            S.data(), P.data());
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(vitkit, m) {
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(vitkit, CPU, m) {
  m.impl("attention_bf16", &attention_bf16);
}
"""
_FLAGS = ["-O3", "-fopenmp"]  # no ISA flag: the kernel carries its own target attribute and checks the CPU first


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or run here, or None: it needs what :mod:`vitkit.kernels` needs to build and
    a CPU with AVX-512 BF16 (``avx512_bf16``: Intel Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later)."""
    from vitkit.machine import bf16_dot_product, cpu_line

    if not bf16_dot_product():
        return f"needs an x86 CPU with AVX-512 BF16 (avx512_bf16, avx512bw, avx512vl); this one: {cpu_line()}"
    return unavailable_to_build()


def usable() -> bool:
    """The kernel runs here: :func:`unavailable_reason` is None and it builds (what ``optimize`` asks before
    putting it in the int8 form, so a compiler that cannot build it leaves that form without it)."""
    try:
        _extension()  # (raises with unavailable_reason() where that is not None)
    except Exception:  # noqa: BLE001 - no AVX-512 BF16 or a failed build: the form goes on with PyTorch's attention
        return False
    return True


@functools.cache
def _extension():
    """The built kernel; loading it registers the op ``vitkit::attention_bf16`` in C++, whose fake implementation
    is registered here."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"vitkit.kernels.attention: the bf16 attention kernel {reason}")
    from torch.utils import cpp_extension

    ext = cpp_extension.load_inline(
        "vitkit_attention_bf16",
        cpp_sources=[_SOURCE],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )

    @torch.library.register_fake("vitkit::attention_bf16", allow_override=True)  # (a second load replaces it)
    def _(q, k, v, scale=None):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    return ext


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for float32 ``q`` [B, heads, N, D] and ``k``, ``v`` [B, heads, M, D] (any
    strides), with the products in bf16 and the sums in fp32; ``scale`` defaults to ``D ** -0.5`` as in
    ``F.scaled_dot_product_attention``. Returns a contiguous float32 [B, heads, N, D]. The op
    ``torch.ops.vitkit.attention_bf16`` (builds the kernel at the first call)."""
    _extension()
    return torch.ops.vitkit.attention_bf16.default(q, k, v, scale)


def _plain_sdpa(node: torch.fx.Node) -> bool:
    """``node`` is an ``aten.scaled_dot_product_attention`` on 4-D float32 tensors with no mask, dropout, causal
    mask or grouped heads, and K and V of one shape with Q's batch, heads and channels: what
    :func:`attention_bf16` computes."""
    if node.op != "call_function" or node.target != torch.ops.aten.scaled_dot_product_attention.default:
        return False
    given = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:]), **node.kwargs)
    if given.get("attn_mask") is not None or any(given.get(k) for k in ("dropout_p", "is_causal", "enable_gqa")):
        return False
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in node.args[:3]]
    if any(v is None or v.dtype != torch.float32 or v.dim() != 4 for v in vals):
        return False
    (b, h, _, d), k = vals[0].shape, vals[1].shape  # (no broadcast batch or heads, at least one key and channel)
    return vals[1].shape == vals[2].shape and (b, h, d) == (k[0], k[1], k[3]) and k[2] != 0 and d != 0


def replace_sdpa(gm: torch.fx.GraphModule) -> int:
    """In an exported (or converted PT2E) program, replace each plain fp32 ``scaled_dot_product_attention`` (no mask,
    dropout or causal mask; K and V of one shape) with :func:`attention_bf16`. Returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if not _plain_sdpa(node):
            continue
        _extension()  # (registers the op before a program that calls it is built)
        with gm.graph.inserting_before(node):
            args = (*node.args[:3], node.kwargs.get("scale"))  # (scale is keyword-only in SDPA's schema)
            new = gm.graph.call_function(torch.ops.vitkit.attention_bf16.default, args)
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return done
