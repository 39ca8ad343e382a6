"""ONNX Runtime quantizer settings compared on one trained run: held-out top-1 and batch-8 speed per setting.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/int8_variants.py runs/peers-int8/mnist_mobilevit
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/int8_variants.py runs/peers-int8/mnist_vit --ops
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/int8_variants.py runs/peers-int8/mnist_vit --calib

The runs are the ones ``int8_mnist.py`` trains. Every setting quantizes the same pre-processed fp32 export
(QDQ, weights int8 per channel, 256 calibration digits through the eval transform) and is evaluated with
``vitkit.train.evaluate`` on the run's 2,000 held-out digits; speed is the median of 15 interleaved rounds at batch
8, 1 thread. This is the sweep behind :func:`vitkit.export.quantize_onnx_int8`'s choice of uint8 activations with
7-bit weights on CPUs without VNNI (results in ``int8_variants.json``, keyed by run and CPU model).

``--calib`` compares calibration methods (MinMax, 99.99-percentile, entropy) on MatMul+Gemm with 8-bit and 7-bit
weights. On a CPU without VNNI/AMX the 8-bit rows are *emulated*: the same quantized graph run with ONNX Runtime's
graph optimizations off, so each QuantizeLinear/DequantizeLinear is its own float op and ``vpmaddubsw``'s
saturation cannot occur (a VNNI/AMX CPU's arithmetic up to float rounding); their top-1 is what such a CPU would
get, their speed means nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from vitkit.bench.speed import interleaved
from vitkit.export import OnnxRunner, export_onnx, preprocess_for_int8
from vitkit.machine import cpu_kind, cpu_line, int8_dot_units
from vitkit.train import evaluate, load_run
from vitkit.train.inference import calibration_batches

HERE = Path(__file__).resolve().parent


class _AsModule(nn.Module):  # evaluate() takes a module
    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, x):
        return self.runner(x)


def variants(ops: bool, calib: bool = False) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    u8, s8 = QuantType.QUInt8, QuantType.QInt8
    if calib:  # calibration methods with the kept op set, 8-bit and 7-bit weights
        methods = {"MinMax": (CalibrationMethod.MinMax, {}), "entropy": (CalibrationMethod.Entropy, {}),
                   "99.99-percentile": (CalibrationMethod.Percentile, {"CalibPercentile": 99.99})}  # fmt: skip
        return {f"{name}, {8 - rr}-bit weights": {"activation_type": u8, "reduce_range": rr, "calibrate_method": m,
                "extra_options": extra, "op_types_to_quantize": ["MatMul", "Gemm"]}
                for name, (m, extra) in methods.items() for rr in (False, True)}  # fmt: skip
    if ops:  # which ops to quantize, with the kept setting
        return {f"u8, 7-bit weights, {'+'.join(o) if o else 'every op'}": {"activation_type": u8, "reduce_range": True,
                "op_types_to_quantize": o} for o in (None, ["MatMul", "Gemm", "Conv"], ["MatMul", "Gemm"])}  # fmt: skip
    return {
        "s8 symmetric activations": {"activation_type": s8, "extra_options": {"ActivationSymmetric": True}},
        "u8 activations, 8-bit weights": {"activation_type": u8},
        "u8 activations, 7-bit weights (reduce_range)": {"activation_type": u8, "reduce_range": True},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--ops", action="store_true", help="compare op sets instead of number formats")
    p.add_argument("--calib", action="store_true", help="compare calibration methods instead of number formats")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    run = load_run(args.run, "best")
    held_out = run.task.dataset(run.cfg.data.val_split)
    calib = calibration_batches(run, 256, 32)
    x8 = calib[0][:8]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x.numpy()}

    rows, models = {}, {"fp32 eager": run.model.eval()}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(run.model, Path(tmp) / "fp32.onnx", tuple(x8.shape[1:]))
        preprocess_for_int8(fp32, Path(tmp) / "pre.onnx")  # (onnxruntime 1.30's shape inference fallback)
        models["fp32 onnxruntime"] = _AsModule(OnnxRunner(fp32))
        for i, (name, kw) in enumerate(variants(args.ops, args.calib).items()):
            dst = Path(tmp) / f"{i}.onnx"
            quantize_static(str(Path(tmp) / "pre.onnx"), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, **kw)  # fmt: skip
            emulate = not kw.get("reduce_range") and not int8_dot_units()  # 8-bit weights without VNNI/AMX
            name += " (emulated: top-1 only)" if emulate else ""
            models[name] = _AsModule(OnnxRunner(dst, graph_optimizations=not emulate))  # (emulated: Q/DQ in float)
        with torch.no_grad():
            for name, m in models.items():
                rows[name] = {"top1": evaluate(run.task, m, held_out, run.data_config, 250)["top1"]}
        for name, ms in interleaved(models, x8, args.rounds).items():
            rows[name]["batch8_ms"] = round(ms, 2)
            print(f"{name}: top-1 {100 * rows[name]['top1']:.2f}%, {rows[name]['batch8_ms']} ms", flush=True)
    out_path = HERE / "int8_variants.json"
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    # one entry per run, setting list and CPU kind: a run elsewhere never overwrites this one's
    flag = " --ops" if args.ops else " --calib" if args.calib else ""
    out[f"{args.run.name}{flag} ({cpu_kind()})"] = {
        "cpu": cpu_line(),
        "model": run.cfg.model.name,
        "rows": rows,
    }
    out_path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
