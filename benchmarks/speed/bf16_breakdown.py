"""Why a model's bf16 speed-up is what it is: per-operator time in fp32 and bf16, and the operators alone.

    .venv/bin/python benchmarks/speed/bf16_breakdown.py nest_tiny_jx     # prints markdown, writes bf16_<model>.md

Part 1: time per forward of each kind of sublayer (the Transformer blocks' LayerNorms, attention, MLP, per
level, and everything else), fp32 against bf16 weights (the faster bf16 mode for NesT), batch-16 inference,
measured with timing hooks on those modules (the hooks do not change which kernels run), 3 forwards after 2
warm-ups. torch.profiler is not used: on this VM it inflated some operators several times over (NesT-T's
linear layers read 133 ms per bf16 forward under it, against 64 ms timed).
Part 2: the operators that cap the ratio, alone at NesT-T's first-level shapes (50,176 tokens of 96 channels,
768 attention problems of 196 tokens x 32 dims), median of timed repeats.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import allocator
from vitkit.bench.speed import timeit

HERE = Path(__file__).resolve().parent


def _sublayers(name: str, dtype: torch.dtype) -> dict[str, float]:
    """ms per forward of each sublayer kind (per level), and the rest of the model."""
    model = vitkit.create_model(name).eval().to(dtype)
    x = torch.randn(16, *model.pretrained_cfg["input_size"], dtype=dtype)
    kinds = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if parts[-1] in ("norm1", "norm2", "attn", "mlp"):
            level = parts[1] if parts[0] == "levels" else "-"
            kinds[module] = f"{'LayerNorm' if parts[-1].startswith('norm') else parts[-1]} (level {level})"
    start, spent = {}, {}

    def before(module, args):
        start[module] = time.perf_counter()

    def after(module, args, out):
        spent[kinds[module]] = spent.get(kinds[module], 0.0) + time.perf_counter() - start[module]

    for module in kinds:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(3):
            model(x)
        total = (time.perf_counter() - t0) / 3 * 1e3
    out = {k: v / 3 * 1e3 for k, v in spent.items()}
    out["everything else"] = total - sum(out.values())
    out["whole forward"] = total
    return out


def _ms(fn) -> float:
    return timeit(fn, warmup=3, repeats=20) * 1e3


def _ops_alone(dtype: torch.dtype) -> dict[str, float]:
    x = torch.randn(50176, 96, dtype=dtype)
    w, b, w2 = torch.randn(96, dtype=dtype), torch.randn(96, dtype=dtype), torch.randn(96, 384, dtype=dtype)
    q, k, v = (torch.randn(256, 3, 196, 32, dtype=dtype) for _ in range(3))
    scores = torch.randn(32, 196, 196, dtype=dtype)
    with torch.inference_mode():
        return {
            "LayerNorm (50,176 x 96)": _ms(lambda: F.layer_norm(x, (96,), w, b, 1e-6)),
            "residual add (50,176 x 96)": _ms(lambda: x + x),
            "softmax (32 x 196 x 196 scores)": _ms(lambda: scores.softmax(-1)),
            "flash SDPA (768 x 196 x 32, first level)": _ms(lambda: F.scaled_dot_product_attention(q, k, v)),
            "matmul (50,176 x 96 -> 384)": _ms(lambda: x @ w2),
        }


def _alone() -> list[tuple[str, float, float]]:
    fp32, bf16 = _ops_alone(torch.float32), _ops_alone(torch.bfloat16)
    return [(op, t, bf16[op]) for op, t in fp32.items()]


def main(name: str = "nest_tiny_jx") -> None:
    torch.set_num_threads(2)
    allocator.tune_allocator()
    fp32, bf16 = _sublayers(name, torch.float32), _sublayers(name, torch.bfloat16)
    lines = [
        f"python benchmarks/speed/bf16_breakdown.py {name}  (torch {torch.__version__}, 2 threads)",
        "",
        "| sublayer (ms per batch-16 forward) | fp32 | bf16 weights | fp32 / bf16 | share of bf16 time |",
        "|---|---|---|---|---|",
    ]
    for kind in fp32:
        a, b = fp32[kind], bf16[kind]
        share = 100 * b / bf16["whole forward"]
        lines.append(f"| {kind} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {share:.0f}% |")
    lines.append("")
    lines += ["| operator alone (ms) | fp32 | bf16 | fp32 / bf16 |", "|---|---|---|---|"]
    lines += [f"| {op} | {a:.2f} | {b:.2f} | {a / b:.2f}x |" for op, a, b in _alone()]
    text = "\n".join(lines) + "\n"
    (HERE / f"bf16_{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:2])
