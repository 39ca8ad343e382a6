"""vitkit against timm on the same CPU, the same weights and the same torch, in one process (issue 20).

Run with the throwaway venv that has timm (it needs the CUDA build of torch, which runs on the CPU) and onnxruntime,
importing vitkit from this checkout (vitkit is pure Python; nothing is installed into the project's venv):

    python3 -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm onnxruntime==1.32.0 onnx onnxscript
    PYTHONPATH=src /tmp/timmvenv/bin/python benchmarks/peers/run.py                       # -> results.json
    PYTHONPATH=src /tmp/timmvenv/bin/python benchmarks/peers/run.py --models vit_small_patch16_224 --batches 8

For each model: timm's model with random weights, its state_dict loaded into vitkit's model (vitkit's checkpoint
converter; outputs compared, the parity is recorded), then, at each batch size, every route timed *interleaved*
(one call of each route per round, the median over rounds), so load from other processes falls on all routes
alike: timm eager, timm + ``torch.compile`` (Inductor, freezing, static shapes), ONNX Runtime on timm's ONNX export,
vitkit eager, vitkit compiled (``vitkit.routes.compile_frozen``, the same options), the same with
``vitkit.kernels`` applied first (the halo kernel, oneDNN linears), both libraries' plain compiled routes also with a
symbolic batch (``symbolic_batch=True``: oneDNN linears, convolution weights packed per call; timm's too, so a lead
that comes from the compile option alone shows as none), ONNX Runtime on vitkit's export, and vitkit's
int8 routes (ONNX Runtime static quantization, and PT2E where torchao is installed; speed only here, accuracy in
``int8_mnist.py``; ``--no-int8`` skips them). Every route's output is checked against timm's eager output first
(1e-4 relative; int8 reported, not checked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from vitkit.bench.speed import interleaved
from vitkit.routes import SYMBOLIC, rel_err

HERE = Path(__file__).resolve().parent
MODELS = [
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "mobilevit_xs",
    "halonet26t",
    "halonet_h1",
    "nest_tiny_jx",
]


def build_routes(
    name: str, x: torch.Tensor, first: torch.Tensor, folder: Path, notes: dict, int8: bool = True, skip: tuple = ()
) -> dict:
    """Every route of ``name`` but those in ``skip``. ``x`` (batch 2: a batch of 1 would fix the export's batch size)
    is the export's example, ``first`` the first batch to be timed: the compiled routes are compiled (static shapes)
    at its size."""
    import timm

    import vitkit
    from vitkit import kernels
    from vitkit.export import OnnxRunner, export_onnx, quantize_onnx_int8
    from vitkit.kernels import lut
    from vitkit.routes import compile_frozen, compile_with_kernels, pt2e_kernel_options, quantize_pt2e_int8

    torch.manual_seed(0)
    ref_model = timm.create_model(name, pretrained=False).eval()
    path = folder / f"{name}.pth"
    torch.save(ref_model.state_dict(), path)
    ours = vitkit.create_model(name, checkpoint_path=str(path)).eval()
    routes = {"timm eager": ref_model, "vitkit eager": ours}
    calib = [torch.randn(4, *x.shape[1:]) for _ in range(8)]  # int8 calibration (random weights: speed only)
    with torch.no_grad():
        notes["parity_rel"] = rel_err(ours(x), ref_model(x))

    def compiled(route: str, build) -> None:  # a compiled route, specialised on ``first``; why not, in the notes
        if route in skip:
            notes[route] = "skipped (--skip)"
            return
        t0 = time.perf_counter()
        try:
            fn = build()
            with torch.no_grad():
                fn(first)
            routes[route] = fn
            notes[f"{route}_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - record why a route is missing
            notes[route] = f"{type(e).__name__}: {str(e)[:300]}"

    for label, model in (("timm", ref_model), ("vitkit", ours)):
        compiled(f"{label} compile", lambda m=model: compile_frozen(m, dynamic=False))  # one program per batch size
        compiled(f"{label} compile{SYMBOLIC}", lambda m=model: compile_frozen(m, dynamic=False, symbolic_batch=True))
        if label == "vitkit" and kernels.applicable(model):  # vitkit.kernels on a copy, compiled the same way
            compiled("vitkit compile+kernels", lambda m=model: compile_with_kernels(m, dynamic=False))
        if f"{label} onnxruntime" in skip:
            notes[f"{label} onnx"] = "skipped (--skip)"
            continue
        try:
            onnx = export_onnx(model, folder / f"{label}-{name}.onnx", tuple(x.shape[1:]))
            routes[f"{label} onnxruntime"] = OnnxRunner(onnx)
            if label == "vitkit" and int8:
                q = quantize_onnx_int8(onnx, folder / f"{name}-int8.onnx", calib)
                routes["vitkit int8 (onnxruntime)"] = OnnxRunner(q)
        except Exception as e:  # noqa: BLE001
            notes[f"{label} onnx"] = f"{type(e).__name__}: {str(e)[:300]}"
    if int8 and importlib.util.find_spec("torchao"):  # vitkit's other int8 backend (PT2E; one program per batch size)
        tables = [("vitkit int8 (pt2e+kernels)", pt2e_kernel_options())] if lut.tabulable(ours) else []
        for label, kw in [("vitkit int8 (pt2e)", {})] + tables:
            try:
                routes[label] = quantize_pt2e_int8(ours, first, calib, **kw)
            except Exception as e:  # noqa: BLE001
                notes[label] = f"{type(e).__name__}: {str(e)[:300]}"
    return routes


def measure(routes: dict, x: torch.Tensor, rounds: int, ref: torch.Tensor) -> dict:
    out = {}
    with torch.no_grad():
        for label, fn in list(routes.items()):
            y = fn(x)
            err = rel_err(y if isinstance(y, torch.Tensor) else y[0], ref)
            out[label] = {"rel_err": err}
            if "int8" not in label and err > 1e-4:
                out[label]["refused"] = f"output differs from timm eager by {err:.3g}"
                routes.pop(label)
    for label, ms in interleaved(routes, x, rounds, warmup=1).items():  # (a compiled route specialises here)
        out[label]["ms"] = round(ms, 2)
    return out


ROUTES = ["timm eager", "timm compile", f"timm compile{SYMBOLIC}", "timm onnxruntime", "vitkit eager", "vitkit compile",
          f"vitkit compile{SYMBOLIC}", "vitkit compile+kernels", "vitkit onnxruntime", "vitkit int8 (onnxruntime)",
          "vitkit int8 (pt2e)", "vitkit int8 (pt2e+kernels)"]  # fmt: skip
INT8 = ["vitkit int8 (onnxruntime)", "vitkit int8 (pt2e)", "vitkit int8 (pt2e+kernels)"]
OURS = ["vitkit eager", "vitkit compile", f"vitkit compile{SYMBOLIC}", "vitkit compile+kernels"]


def _best(ms: dict, *routes: str) -> float | None:
    v = [ms[r] for r in routes if ms[r]]
    return min(v) if v else None


def markdown_tables(results: dict) -> str:
    """Markdown tables from results.json: ms per route and the ratios the targets are stated in."""
    head = " | ".join(f"{r} ms" for r in ROUTES)
    lines = []
    for t in results.values():
        lines += [f"### {t['cpu']}", "", f"| model | batch | {head} | vitkit best / timm best (eager or compiled) "
                  f"| the same, timm compiled with a symbolic batch too | the same, ONNX Runtime included "
                  f"| vitkit's best fp32 (ONNX Runtime included) / its best int8 |",
                  "|" + " --- |" * (len(ROUTES) + 6)]  # fmt: skip
        for name, m in t["models"].items():
            for b, row in m["batches"].items():
                ms = {r: row.get(r, {}).get("ms") for r in ROUTES}
                ours, ours_all = _best(ms, *OURS), _best(ms, *OURS, "vitkit onnxruntime")
                theirs = _best(ms, "timm eager", "timm compile")
                theirs_sym = _best(ms, "timm eager", "timm compile", f"timm compile{SYMBOLIC}")
                theirs_all = _best(ms, "timm eager", "timm compile", f"timm compile{SYMBOLIC}", "timm onnxruntime")
                int8 = _best(ms, *INT8)
                ratios = [f"{a / b:.2f}x" if a and b else "-" for a, b in
                          ((theirs, ours), (theirs_sym, ours), (theirs_all, ours_all), (ours_all, int8))]  # fmt: skip
                cells = [str(ms[r]) if ms[r] else row.get(r, {}).get("refused", "-") for r in ROUTES]
                lines.append(f"| {name} | {b} | " + " | ".join(cells + ratios) + " |")
            for k, v in m["notes"].items():
                if isinstance(v, str):  # one table cell: no line breaks or terminal colour codes
                    text = re.sub(r"\x1b\[[0-9;]*m", "", v).replace("\n", " ").replace("|", "/")
                    lines.append(f"| {name} | note | {k}: {text[:300]} |" + " |" * (len(ROUTES) + 3))
        lines.append("")
    return "\n".join(lines)


def merge(files: list[Path], out_path: Path) -> None:
    """Rows of ``files`` into ``out_path``: per CPU kind, per model, per batch (a later file's row wins)."""
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for f in files:
        for key, t in json.loads(f.read_text()).items():
            table = results.setdefault(key, {"models": {}})
            table.update({k: v for k, v in t.items() if k != "models"})  # cpu, cpu_info, torch: the newest file's
            for name, m in t["models"].items():
                mine = table["models"].setdefault(name, {"notes": {}, "batches": {}})
                mine["notes"].update(m["notes"])
                mine["batches"].update(m["batches"])
    out_path.write_text(json.dumps(results, indent=1))
    print(f"merged {len(files)} files into {out_path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 routes (their quantization takes minutes)")
    p.add_argument("--skip", nargs="+", default=[], help="routes not built where time is short: timm compile, "
                   "timm onnxruntime, vitkit compile, vitkit compile+kernels, vitkit onnxruntime")  # fmt: skip
    p.add_argument("--merge", nargs="+", type=Path, help="merge these results files (one per process: per_core.sh) "
                   "into --out, model by model and batch by batch, and exit")  # fmt: skip
    args = p.parse_args()
    if args.table:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return 0
    if args.merge:
        merge(args.merge, Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    from vitkit.bench.allocator import tune_allocator
    from vitkit.machine import cpu_info, cpu_kind, cpu_line

    tune_allocator()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    cpu = cpu_line()
    key = cpu_kind()  # one table per CPU kind: never overwrite one with another
    table = results.setdefault(key, {"cpu": cpu, "cpu_info": cpu_info(), "torch": torch.__version__, "models": {}})
    table.update(cpu=cpu, cpu_info=cpu_info())
    for name in args.models:
        notes: dict = {}
        rows: dict = {}
        table["models"][name] = {"notes": notes, "batches": rows}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                import timm

                size = timm.get_pretrained_cfg(name).input_size  # each model at its own size (halonet26t: 256)
                notes["input_size"] = list(size)
                x = torch.randn(max(2, *args.batches), *size)
                first = x[: args.batches[0]]
                routes = build_routes(name, x[:2], first, Path(tmp), notes, not args.no_int8, tuple(args.skip))
                for b in args.batches:
                    xb = x[:b].contiguous()
                    with torch.no_grad():
                        ref = routes["timm eager"](xb)
                    rows[str(b)] = measure(dict(routes), xb, args.rounds, ref)
                    print(name, b, json.dumps(rows[str(b)]), flush=True)
                    out_path.write_text(json.dumps(results, indent=1))  # each batch kept as soon as it is measured
        except Exception:  # noqa: BLE001
            notes["error"] = traceback.format_exc()[-800:]
        out_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
