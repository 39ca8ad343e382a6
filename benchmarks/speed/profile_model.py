"""Where the time goes: torch.profiler op table for one model's fp32 inference (default batch 16, 2 threads), or
for its int8 PT2E program.

python benchmarks/speed/profile_model.py mobilevit_xxs          # prints the top ops, writes profile_<model>.txt
python benchmarks/speed/profile_model.py halonet_h1 1 1         # batch 1, 1 thread -> profile_halonet_h1_b1_t1.txt
python benchmarks/speed/profile_model.py mobilevit_xs 1 1 int8  # -> profile_mobilevit_xs_int8_b1_t1.txt

``int8``: the program of ``vitkit.routes.quantize_pt2e_int8`` (activation tables where the model has SiLU or GELU;
calibrated on random batches: speed only), run by Inductor's Python wrapper with its kernels profiled
(``cpp.enable_kernel_profile``) so that each generated kernel and library op shows; 20 forwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vitkit
from vitkit.machine import cpu_line

HERE = Path(__file__).resolve().parent


def _int8_program(model: torch.nn.Module, x: torch.Tensor):
    import torch._inductor.config as inductor_config

    from vitkit.bench.allocator import tune_allocator
    from vitkit.kernels import lut
    from vitkit.routes import quantize_pt2e_int8

    tune_allocator()  # as vitkit bench and the peers benchmark run
    inductor_config.cpp.enable_kernel_profile = True
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, *x.shape[1:], generator=g) for _ in range(3)]
    tables = lut.tables_apply(model)
    return quantize_pt2e_int8(model, x, calibration, tables=tables, cpp_wrapper=False)


def main(name: str, batch: int = 16, threads: int = 2, form: str = "fp32") -> None:
    batch, threads = int(batch), int(threads)
    torch.set_num_threads(threads)
    model = vitkit.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    fn, forwards = (_int8_program(model, x), 20) if form == "int8" else (model, 3)
    with torch.no_grad() if form == "int8" else torch.inference_mode():  # (a compiled program: under no_grad)
        for _ in range(3):
            fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                fn(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15 if form == "fp32" else 30)
    default = (batch, threads, form) == (16, 2, "fp32")
    tag = "" if form == "fp32" else f"_{form}"
    out = HERE / (f"profile_{name}.txt" if default else f"profile_{name}{tag}_b{batch}_t{threads}.txt")
    args = "" if default else f" {batch} {threads}" + ("" if form == "fp32" else f" {form}")
    out.write_text(f"python benchmarks/speed/profile_model.py {name}{args}\n"
                   f"{cpu_line()}, batch {batch}, {forwards} forwards\n\n{table}\n")  # fmt: skip
    print(table)


if __name__ == "__main__":
    main(*sys.argv[1:5])
