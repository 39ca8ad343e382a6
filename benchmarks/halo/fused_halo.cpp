// A prototype fused halo attention kernel for one thread (issue 20's "kernels only where the compiler cannot
// reach"): the relative logits rh[ky] + rw[kx] are added per query row as the logits are formed, never
// materialised as a (queries x window) bias; softmax and the value product follow in registers. Built and timed by
// fused_kernel.py; not part of vitkit (no custom op, no threads, no key-padding mask, AVX2 only).
#include <torch/extension.h>
#include <ATen/cpu/vec/vec.h>
#include <vector>
#include <limits>
#ifndef CPU_CAPABILITY_AVX2
#error "no avx2"
#endif
using Vec = at::vec::Vectorized<float>;
constexpr int QB = 4;  // queries per register block

// q (N, Q, D), k (N, W, D), v (N, W, E), rh (N, Q, win), rw (N, Q, win); W = win*win; Q % QB == 0. Returns (N, Q, E).
torch::Tensor halo_attn(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor rh, torch::Tensor rw, double scale) {
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous(); rh = rh.contiguous(); rw = rw.contiguous();
  const int64_t N = q.size(0), Q = q.size(1), D = q.size(2), W = k.size(1), E = v.size(2), win = rh.size(2);
  TORCH_CHECK(Q % QB == 0, "queries per block must be a multiple of 4");
  auto out = torch::empty({N, Q, E}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  const float* rhp = rh.data_ptr<float>(); const float* rwp = rw.data_ptr<float>(); float* op = out.data_ptr<float>();
  constexpr int64_t VL = Vec::size();
  const int64_t Wp = (W + VL - 1) / VL * VL;
  const int64_t Ep = (E + VL - 1) / VL * VL;
  std::vector<float> kT(D * Wp), s(QB * Wp), vpad(W * Ep);
  const float sc = (float)scale;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t n = 0; n < N; n++) {
    const float* kb = kp + n * W * D; const float* vb = vp + n * W * E;
    for (int64_t j = 0; j < W; j++)
      for (int64_t d = 0; d < D; d++) kT[d * Wp + j] = kb[j * D + d];
    for (int64_t d = 0; d < D; d++)
      for (int64_t j = W; j < Wp; j++) kT[d * Wp + j] = 0.f;
    const float* vv = vb;
    if (Ep != E) {  // rows padded to whole vectors
      for (int64_t j = 0; j < W; j++) {
        for (int64_t e = 0; e < E; e++) vpad[j * Ep + e] = vb[j * E + e];
        for (int64_t e = E; e < Ep; e++) vpad[j * Ep + e] = 0.f;
      }
      vv = vpad.data();
    }
    for (int64_t i0 = 0; i0 < Q; i0 += QB) {
      // bias rows rh[ky] + rw[kx] for QB queries
      for (int r = 0; r < QB; r++) {
        const float* rhi = rhp + (n * Q + i0 + r) * win; const float* rwi = rwp + (n * Q + i0 + r) * win;
        float* sr = s.data() + r * Wp;
        for (int64_t ky = 0; ky < win; ky++)
          for (int64_t kx = 0; kx < win; kx++) sr[ky * win + kx] = rhi[ky] + rwi[kx];
        for (int64_t j = W; j < Wp; j++) sr[j] = ninf;
      }
      Vec mx[QB];
      for (int r = 0; r < QB; r++) mx[r] = Vec(ninf);
      for (int64_t j = 0; j < Wp; j += VL) {
        Vec acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = Vec::loadu(s.data() + r * Wp + j);
        for (int64_t d = 0; d < D; d++) {
          Vec kv = Vec::loadu(kT.data() + d * Wp + j);
          for (int r = 0; r < QB; r++) acc[r] = at::vec::fmadd(Vec(qp[(n * Q + i0 + r) * D + d] * sc), kv, acc[r]);
        }
        for (int r = 0; r < QB; r++) { acc[r].store(s.data() + r * Wp + j); mx[r] = at::vec::maximum(mx[r], acc[r]); }
      }
      float inv[QB];
      for (int r = 0; r < QB; r++) {
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
      for (int64_t e = 0; e < Ep; e += VL) {
        Vec acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = Vec(0.f);
        for (int64_t j = 0; j < W; j++) {
          Vec vj = Vec::loadu(vv + j * Ep + e);
          for (int r = 0; r < QB; r++) acc[r] = at::vec::fmadd(Vec(s[r * Wp + j]), vj, acc[r]);
        }
        for (int r = 0; r < QB; r++) {
          float* oi = op + (n * Q + i0 + r) * E;
          (acc[r] * Vec(inv[r])).store(oi + e, std::min(VL, E - e));
        }
      }
    }
  }
  return out;
}
