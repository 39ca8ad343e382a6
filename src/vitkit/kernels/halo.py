"""A fused halo attention kernel for CPU inference (x86 with AVX2), and the layer that uses it.

``HaloAttention``'s plain core builds the relative-logit bias ``rh[ky] + rw[kx]`` for every query and window key
(6.4 M values per layer in HaloNet-H1's first stage at 256 px) and hands it to ``F.scaled_dot_product_attention``.
Under ``torch.compile`` that bias is one scalar loop (Inductor does not vectorise an index divided by the window
side) and SDPA's CPU kernel reads it back. This kernel never writes it: per block of 4 queries it forms the
logits against the window's keys (transposed once per block), adds each query's two factor rows, and takes the
softmax and the value product in registers (ATen's ``Vectorized<float>``, one block of queries per thread at a
time, ``at::parallel_for`` over blocks). The arithmetic is the same attention in fp32, summed in another order.

It is built from source at first use by ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are
needed; the build is cached under ``TORCH_EXTENSIONS_DIR``) and registered as the custom op
``vitkit::halo_attention`` with a fake implementation, so ``torch.compile`` keeps the model in one graph.
:class:`FusedHaloAttention` takes it only where it applies (fp32 CPU tensors, no autograd, the fused route, query
blocks of a multiple of 4 pixels) and runs the plain core otherwise; ``attn_probs`` hooks still see the eager route.

Measured (``benchmarks/halo/fused_kernel.py``, AMD EPYC, AVX2, 1 thread): H1's stage-0 attention 12.7 ms against
38.4 ms for the compiled plain core; the whole compiled HaloNet-H1 1.37x (batch 1) / 1.50x (batch 8) faster,
HaloNet-26T a tie (1.03x / 0.98x), which is why ``optimize`` measures before it keeps the kernel form.
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
#include <algorithm>
#include <limits>
#include <vector>
using Vec = at::vec::Vectorized<float>;
constexpr int QB = 4;  // queries per register block

// q (N, Q, D); kv (N, W, D + E): each window key's k then v; rh, rw (N, Q, win) with W = win * win; key_bias
// (blocks, W) added to every query's logits of block n % blocks, or empty. Returns (N, Q, E).
torch::Tensor halo_attention(torch::Tensor q, torch::Tensor kv, torch::Tensor rh, torch::Tensor rw,
                             torch::Tensor key_bias, int64_t blocks, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3 && rh.dim() == 3 && rw.dim() == 3, "halo_attention: 3-D tensors");
  for (const auto& t : {q, kv, rh, rw})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "halo_attention: float32 CPU tensors only");
  q = q.contiguous(); kv = kv.contiguous(); rh = rh.contiguous(); rw = rw.contiguous();
  const int64_t N = q.size(0), Q = q.size(1), D = q.size(2), W = kv.size(1), E = kv.size(2) - D, win = rh.size(2);
  TORCH_CHECK(win * win == W && kv.size(0) == N && E > 0, "halo_attention: kv must be (N, win*win, D + E)");
  TORCH_CHECK(rh.sizes() == rw.sizes() && rh.size(0) == N && rh.size(1) == Q, "halo_attention: rh, rw (N, Q, win)");
  TORCH_CHECK(Q % QB == 0, "halo_attention: queries per block must be a multiple of 4, got ", Q);
  TORCH_CHECK(blocks > 0 && N % blocks == 0, "halo_attention: N must be a multiple of blocks");
  const bool masked = key_bias.numel() > 0;
  if (masked) {
    TORCH_CHECK(key_bias.scalar_type() == at::kFloat && key_bias.numel() == blocks * W, "halo_attention: key_bias");
    key_bias = key_bias.contiguous();
  }
  auto out = torch::empty({N, Q, E}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kvp = kv.data_ptr<float>();
  const float* rhp = rh.data_ptr<float>(); const float* rwp = rw.data_ptr<float>();
  const float* kbp = masked ? key_bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  constexpr int64_t VL = Vec::size();
  const int64_t Wp = (W + VL - 1) / VL * VL, Ep = (E + VL - 1) / VL * VL, C = D + E;
  const float sc = (float)scale, ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kT(D * Wp, 0.f), s(QB * Wp), vp(W * Ep, 0.f);
    for (int64_t n = begin; n < end; n++) {
      const float* kvb = kvp + n * W * C;
      for (int64_t j = 0; j < W; j++) {  // k transposed (keys padded to whole vectors), v rows padded
        for (int64_t d = 0; d < D; d++) kT[d * Wp + j] = kvb[j * C + d];
        for (int64_t e = 0; e < E; e++) vp[j * Ep + e] = kvb[j * C + D + e];
      }
      const float* kb = masked ? kbp + (n % blocks) * W : nullptr;
      for (int64_t i0 = 0; i0 < Q; i0 += QB) {
        for (int r = 0; r < QB; r++) {  // each query's bias row: rh[ky] + rw[kx] (+ the key mask)
          const float* rhi = rhp + (n * Q + i0 + r) * win; const float* rwi = rwp + (n * Q + i0 + r) * win;
          float* sr = s.data() + r * Wp;
          for (int64_t ky = 0; ky < win; ky++)
            for (int64_t kx = 0; kx < win; kx++) sr[ky * win + kx] = rhi[ky] + rwi[kx];
          if (masked) for (int64_t j = 0; j < W; j++) sr[j] += kb[j];
          for (int64_t j = W; j < Wp; j++) sr[j] = ninf;
        }
        Vec mx[QB];
        for (int r = 0; r < QB; r++) mx[r] = Vec(ninf);
        for (int64_t j = 0; j < Wp; j += VL) {  // logits: q . k * scale + bias
          Vec acc[QB];
          for (int r = 0; r < QB; r++) acc[r] = Vec::loadu(s.data() + r * Wp + j);
          for (int64_t d = 0; d < D; d++) {
            Vec kd = Vec::loadu(kT.data() + d * Wp + j);
            for (int r = 0; r < QB; r++) acc[r] = at::vec::fmadd(Vec(qp[(n * Q + i0 + r) * D + d] * sc), kd, acc[r]);
          }
          for (int r = 0; r < QB; r++) {
            acc[r].store(s.data() + r * Wp + j);
            mx[r] = at::vec::maximum(mx[r], acc[r]);
          }
        }
        float inv[QB];
        for (int r = 0; r < QB; r++) {  // softmax numerators in place, 1 / their sum
          float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mx[r]);
          Vec sum(0.f), vm(m);
          float* sr = s.data() + r * Wp;
          for (int64_t j = 0; j < Wp; j += VL) {
            Vec p = (Vec::loadu(sr + j) - vm).exp_u20();
            p.store(sr + j);
            sum = sum + p;
          }
          inv[r] = 1.f / at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
        }
        for (int64_t e = 0; e < Ep; e += VL) {  // probabilities times v
          Vec acc[QB];
          for (int r = 0; r < QB; r++) acc[r] = Vec(0.f);
          for (int64_t j = 0; j < W; j++) {
            Vec vj = Vec::loadu(vp.data() + j * Ep + e);
            for (int r = 0; r < QB; r++) acc[r] = at::vec::fmadd(Vec(s[r * Wp + j]), vj, acc[r]);
          }
          for (int r = 0; r < QB; r++)
            (acc[r] * Vec(inv[r])).store(op + (n * Q + i0 + r) * E + e, std::min(VL, E - e));
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
    rh: torch.Tensor,
    rw: torch.Tensor,
    key_bias: torch.Tensor,
    blocks: int,
    scale: float,
) -> torch.Tensor:
    """Softmax(q k^T * scale + rh[ky] + rw[kx] + key_bias) v for N windows: q (N, Q, D), kv (N, W, D + E) (each
    key's k then v), rh/rw (N, Q, win), key_bias (blocks, W) or empty; returns (N, Q, E)."""
    return _extension().halo_attention(q, kv, rh, rw, key_bias, blocks, scale)


@halo_attention.register_fake
def _(q, kv, rh, rw, key_bias, blocks, scale):
    return q.new_empty(q.shape[0], q.shape[1], kv.shape[2] - q.shape[2])


class FusedHaloAttention(HaloAttention):
    """``HaloAttention`` whose fused route calls :func:`halo_attention` (see the module docstring)."""

    def _attend(self, q, kv, key_bias):
        BH, blocks, L, dqk = q.shape
        if not (self.use_fused() and L % 4 == 0 and q.dtype == torch.float32 and q.device.type == "cpu"):
            return super()._attend(q, kv, key_bias)
        tables = (self.pos_embed.height_rel, self.pos_embed.width_rel)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, kv, *tables)):
            return super()._attend(q, kv, key_bias)  # the kernel has no backward
        rh, rw = self.pos_embed.factors(q)
        empty = q.new_empty(0)
        out = halo_attention(
            q.reshape(BH * blocks, L, dqk),
            kv.reshape(BH * blocks, kv.shape[2], kv.shape[3]),
            rh.reshape(BH * blocks, L, -1),
            rw.reshape(BH * blocks, L, -1),
            empty if key_bias is None else key_bias,
            blocks,
            self.scale,
        )
        return out.reshape(BH, blocks, L, self.dim_head_v)
