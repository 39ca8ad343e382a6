"""How fast a multiply-add fed by a broadcast from memory runs on this CPU: the register blocking of the halo kernel.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/halo/broadcast_rate.py

The halo kernel (``vitkit.kernels.halo``) keeps queries in vector lanes and broadcasts each key value from memory
(``vbroadcastss``) into a multiply-add. Three loops of 8 accumulators with the same number of multiply-adds, built
with the kernel's flags (AVX2 + FMA): *one vector, 8 keys*, one broadcast per multiply-add (the kernel until the
eleventh session); *two vectors, 4 keys*, one broadcast for two multiply-adds (the kernel since); *vector loads*,
the first loop with a plain vector load in place of each broadcast (the rate without broadcasts). Median of 7
calls of 200,000 passes over 192 keys of 8 channels (the first stage of HaloNet-H1: 12 KB, in L1), as GFLOP/s.
-> ``broadcast_rate.json``, one entry per CPU kind. On Intel cores a broadcast from memory is a load alone; on AMD's
Zen 4 it also takes a slot in the vector pipes, which is what the two-vector blocking is for.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from vitkit.kernels import halo
from vitkit.machine import cpu_kind, cpu_line

HERE = Path(__file__).resolve().parent
LOOPS = {0: "one vector, 8 keys (a broadcast per multiply-add)", 1: "two vectors, 4 keys (a broadcast per two)",
         2: "vector loads instead of broadcasts"}  # fmt: skip
SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>
template <int MODE>
double run(const float* k, const float* q, int64_t reps, float* out) {
  __m256 acc[8];
  for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; r++)
    for (int64_t j = 0; j < 192; j += 8) {
      const float* kb = k + j * 8;
      for (int d = 0; d < 8; d++) {
        const __m256 q0 = _mm256_loadu_ps(q + d * 8), q1 = _mm256_loadu_ps(q + 64 + d * 8);
        for (int u = 0; u < 8; u++) {
          if (MODE == 0) {
            acc[u] = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(kb + u * 8 + d), acc[u]);
          } else if (MODE == 1) {
            if (u < 4) {
              const __m256 b = _mm256_broadcast_ss(kb + u * 8 + d);
              acc[u] = _mm256_fmadd_ps(q0, b, acc[u]);
              acc[u + 4] = _mm256_fmadd_ps(q1, b, acc[u + 4]);
            }
          } else {
            acc[u] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kb + ((u * 8 + d) & ~7)), acc[u]);
          }
        }
      }
    }
  const auto t1 = std::chrono::steady_clock::now();
  for (int u = 0; u < 8; u++) _mm256_storeu_ps(out + u * 8, acc[u]);
  return std::chrono::duration<double>(t1 - t0).count();
}
double seconds(torch::Tensor k, torch::Tensor q, int64_t reps, int64_t mode) {
  auto out = torch::empty({64});
  float* o = out.data_ptr<float>();
  if (mode == 0) return run<0>(k.data_ptr<float>(), q.data_ptr<float>(), reps, o);
  if (mode == 1) return run<1>(k.data_ptr<float>(), q.data_ptr<float>(), reps, o);
  return run<2>(k.data_ptr<float>(), q.data_ptr<float>(), reps, o);
}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=200_000)
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "broadcast_rate.json")
    args = p.parse_args(argv)
    ext = halo.build("vitkit_broadcast_rate", SOURCE, functions=("seconds",))  # the kernel's compiler flags
    k, q = torch.randn(200 * 8), torch.randn(128)
    flops = args.reps * 24 * 8 * 8 * 16  # passes x key blocks x d x 8 multiply-adds x 16 flops
    times: dict[int, list[float]] = {m: [] for m in LOOPS}
    for _ in range(args.calls):  # interleaved
        for m in LOOPS:
            times[m].append(ext.seconds(k, q, args.reps, m))
    rows = {LOOPS[m]: round(flops / statistics.median(t) / 1e9, 1) for m, t in times.items()}
    print(json.dumps(rows, indent=1))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[cpu_kind()] = {"cpu": cpu_line(), "torch": torch.__version__, "gflops": rows}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
