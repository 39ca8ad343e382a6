"""int8 accuracy on real data: the MNIST recipes' models, fp32 vs vitkit's int8 route, on the held-out digits.

    .venv/bin/python benchmarks/peers/int8_mnist.py            # -> int8_mnist.json (trains the runs it lacks)

The results are kept per CPU kind (one entry per CPU model name; a run on another kind adds its own entry and never
overwrites one measured elsewhere).

For each recipe (configs/mnist_vit.yaml, configs/mnist_mobilevit.yaml) a run is trained with a shortened schedule
(``--epochs``; the recipe otherwise as it is) on the first 8,000 digits of ../shared/data/mnist, or reused if its
folder holds a finished run. The int8 model is ``vitkit.optimize(model, route="int8")``: the ONNX export quantized by
ONNX Runtime (static, QDQ, weights per channel), calibrated on ``--calib`` training digits through the eval
transform. Both are evaluated with the same ``vitkit.train.evaluate`` on the 2,000 held-out digits; the target is
int8 top-1 within 0.5 points of fp32. Where torchao is installed (the ``int8`` extra) the PT2E backend
(``int8_backend="pt2e"``) is checked the same way, under "pt2e", and PT2E with the SiLU/GELU tables of
``vitkit.kernels.lut`` (``int8_backend="pt2e+kernels"``; with the bf16 attention of ``vitkit.kernels.attention``
where the CPU has AVX-512 BF16, ``bf16_attention`` in the record), under "pt2e+kernels".
Speed at batch 8 on these small models is recorded too (interleaved rounds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from vitkit.bench.speed import interleaved
from vitkit.config import load_config
from vitkit.kernels import attention, lut
from vitkit.machine import cpu_kind, cpu_line
from vitkit.routes import compile_frozen, optimize
from vitkit.train import Trainer, evaluate, load_run
from vitkit.train.inference import calibration_batches

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECIPES = {"mnist_vit": 4, "mnist_mobilevit": 2}  # recipe -> epochs


def train(recipe: str, epochs: int, args) -> Path:
    run = args.work / recipe
    if (run / "eval.json").is_file():
        return run
    sets = [f"data.root={args.mnist}", f"sched.epochs={epochs}", f"train.output={run}",
            f"train.threads={args.threads}", "train.progress=false"]  # fmt: skip
    Trainer(load_config(REPO / "configs" / f"{recipe}.yaml", sets)).fit()
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "peers-int8")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=HERE / "int8_mnist.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"cpu": cpu_line(), "command": " ".join(["python", *sys.argv]), "recipes": {}}
    for recipe, epochs in RECIPES.items():
        run = load_run(train(recipe, epochs, args), "best")
        held_out = run.task.dataset(run.cfg.data.val_split)
        calib = calibration_batches(run, args.calib, 32)
        t0 = time.perf_counter()
        int8 = optimize(run.model, calib[0][:2], route="int8", calibration=calib, int8_backend="onnxruntime")
        quant_s = time.perf_counter() - t0
        fp32 = evaluate(run.task, run.model, held_out, run.data_config, 250)["top1"]
        q8 = evaluate(run.task, int8, held_out, run.data_config, 250)["top1"]
        x = calib[0][:8]
        compiled = compile_frozen(run.model, dynamic=False)
        routes = {"fp32 eager": run.model, "fp32 compiled": compiled, "int8 onnxruntime": int8}
        checks = {"pt2e": {}}  # PT2E backend -> the same checks (empty without torchao)
        backends = ["pt2e"] + (["pt2e+kernels"] if lut.tabulable(run.model) else [])
        for backend in backends if importlib.util.find_spec("torchao") else []:  # the other int8 backend(s)
            t0 = time.perf_counter()
            routes[f"int8 {backend}"] = q = optimize(
                run.model, x, route="int8", calibration=calib, int8_backend=backend
            )
            c = checks[backend] = {"quantize_s": round(time.perf_counter() - t0, 1)}
            c["int8_top1"] = evaluate(run.task, q, held_out, run.data_config, 250)["top1"]
            c.update(drop_points=round(100 * (fp32 - c["int8_top1"]), 2), int8_output_rel_err=q.report.max_rel_err)
            c["within_0.5_points"] = c["drop_points"] <= 0.5
            if backend == "pt2e+kernels":  # (optimize applies the bf16 attention where the CPU has AVX-512 BF16)
                c["bf16_attention"] = attention.usable()
        ms = {k: round(v, 3) for k, v in interleaved(routes, x, args.rounds).items()}
        for backend, c in checks.items():
            c["int8_speedup_vs_best_fp32"] = round(
                min(ms["fp32 eager"], ms["fp32 compiled"]) / ms[f"int8 {backend}"], 2
            )
        out["recipes"][recipe] = {
            "model": run.cfg.model.name, "kwargs": run.cfg.model.kwargs, "img_size": run.cfg.model.img_size,
            "epochs": epochs, "fp32_top1": fp32, "int8_top1": q8, "drop_points": round(100 * (fp32 - q8), 2),
            "within_0.5_points": 100 * (fp32 - q8) <= 0.5, "calibration_images": args.calib,
            "int8_output_rel_err": int8.report.max_rel_err, "int8_ops": int8.report.note,
            "quantize_s": round(quant_s, 1),
            "batch8_ms": ms, "int8_speedup_vs_best_fp32": round(min(ms["fp32 eager"], ms["fp32 compiled"])
                                                                / ms["int8 onnxruntime"], 2),
            **checks,  # "pt2e" and "pt2e+kernels" (activation tables): the same checks
        }  # fmt: skip
        print(recipe, json.dumps(out["recipes"][recipe]), flush=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[cpu_kind()] = out  # one entry per CPU kind, as benchmarks/peers/run.py keeps them
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
