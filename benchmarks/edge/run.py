"""Every family x every deployment format: converts? verified max relative error, batch-1 latency (issue 23).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edge/run.py --threads 1            # -> results.json, table.md
    .venv/bin/python benchmarks/edge/run.py --models mobilevit_xxs --formats openvino executorch
    .venv/bin/python benchmarks/edge/run.py --formats coreml --merge                 # redo one column

For each model (random weights, its default input size): the eager model's batch-1 latency, then for each
format ``vitkit.export.export_model`` (the one verification path: batches 1 and 2 against eager, relative error)
and, where the format's runtime runs here, that runtime's batch-1 latency on the exported artefact (ONNX Runtime,
ExecuTorch with XNNPACK, OpenVINO's CPU plugin). ExecuTorch and Core ML are exported as a phone runs them (batch
1, a static shape). Core ML converts here but runs only on macOS, so its cell says what was checked instead. A
cell that fails carries the converter's or runtime's own message. Latencies are the median of interleaved
rounds (one call of each runtime per round), so other load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import vitkit
from vitkit import export
from vitkit.bench.speed import interleaved
from vitkit.machine import cpu_line

HERE = Path(__file__).resolve().parent
MODELS = [
    "vit_tiny_patch16_224",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "nest_tiny",
    "halonet26t",
    "lavit_tiny",
    "ssdlite_mobilevit_xxs",
    "deeplabv3_mobilevit_xxs",
]
FORMATS = ["onnx", "executorch", "openvino", "coreml"]
PHONE = ("executorch", "coreml")  # exported static at batch 1


def measure(name: str, formats: list[str], rounds: int, tmp: Path) -> dict:
    model = vitkit.create_model(name).eval()
    chw = tuple(model.pretrained_cfg["input_size"])
    reference = export.exportable(model).eval()
    runners = {"eager": lambda x: reference(x)}
    row = {"model": name, "input": list(chw), "formats": {}}
    for fmt in formats:
        t0 = time.perf_counter()
        try:
            # the phone formats as a phone runs them (batch 1, static); the others with a dynamic batch
            res = export.export_model(
                model, tmp / f"{name}{export.SUFFIX[fmt]}", fmt, dynamic_batch=fmt not in PHONE, check_batches=(1, 2)
            )
            cell = {
                "converts": True,
                "verified": res["verified"],
                "max_rel_err": max(res["max_rel_err"].values()),
                "ran": res["ran"],
            }
            if "coreml" in res:
                cell["coreml_ops"] = res["coreml"]["ops"]
            if export.REGISTRY[fmt].runner is not None and res["verified"]:
                runners[fmt] = export.load(res["path"], fmt)
        except Exception as e:  # noqa: BLE001 - a failing converter is a result, recorded with its message
            cell = {"converts": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        cell["export_s"] = round(time.perf_counter() - t0, 1)
        row["formats"][fmt] = cell
        print(f"  {name} {fmt}: {cell}", flush=True)
    x = torch.randn(1, *chw)
    row["latency_ms"] = {k: round(v, 2) for k, v in interleaved(runners, x, rounds).items()}
    print(f"  {name} latency ms: {row['latency_ms']}", flush=True)
    return row


def table(rows: list[dict], formats: list[str]) -> str:
    head = "| model | eager ms (a merged run's eager) | " + " | ".join(formats) + " |"
    lines = [head, "|" + " --- |" * (2 + len(formats))]
    for r in rows:
        cells = []
        for fmt in formats:
            c = r["formats"].get(fmt, {})
            if not c.get("converts"):
                cells.append(f"fails: {c.get('error', 'not run')[:120]}")
            elif "macOS" in c["ran"]:
                cells.append(f"converts; program {c['max_rel_err']:.1e}; not run (macOS only)")
            else:
                ms = r["latency_ms"].get(fmt)
                ok = "verified" if c["verified"] else "NOT verified"
                cells.append(f"{ok} {c['max_rel_err']:.1e}; {ms} ms")
        eager = r["latency_ms"]["eager"]
        rerun = f" ({r['latency_ms']['eager_rerun']})" if "eager_rerun" in r["latency_ms"] else ""
        lines.append(f"| {r['model']} | {eager}{rerun} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--formats", nargs="+", default=FORMATS, choices=export.FORMATS)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--merge", action="store_true", help="update these formats' cells in --out, keep the rest")
    args = p.parse_args()
    previous = {r["model"]: r for r in json.loads(Path(args.out).read_text())["rows"]} if args.merge else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = cpu_line()
    print(machine, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = measure(name, args.formats, args.rounds, Path(tmp))
            if name in previous:  # the earlier run's other formats and their latencies; this run's eager as eager_rerun
                old = previous[name]
                row["formats"] = {**old["formats"], **row["formats"]}
                new = {f: ms for f, ms in row["latency_ms"].items() if f in args.formats}
                row["latency_ms"] = {**old["latency_ms"], **new, "eager_rerun": row["latency_ms"]["eager"]}
            rows.append(row)
            out = {"machine": machine, "threads": torch.get_num_threads(), "rows": rows}
            Path(args.out).write_text(json.dumps(out, indent=1))  # after every model: a partial run keeps its rows
    formats = [f for f in FORMATS if any(f in r["formats"] for r in rows)] + [
        f for f in args.formats if f not in FORMATS
    ]
    md = table(rows, formats)
    Path(args.out).with_suffix(".md").write_text(f"{machine}, {torch.get_num_threads()} thread(s)\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
