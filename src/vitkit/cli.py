"""The ``vitkit`` command.

    vitkit models [PATTERN] [--family F]     list registered models with parameter counts
    vitkit info [NAME] [--img-size S]        config, parameters, MACs, feature_info and a timed forward pass
    vitkit train [--config F] [--set k=v]    train (default: a small NesT on the bundled digits, offline)
    vitkit eval RUN [--ema]                  top-1/top-5, per-class accuracy, confusion matrix of a run
    vitkit eval RUN --linear-probe 1 5 10    few-shot linear evaluation on the run's frozen features
    vitkit predict RUN IMAGE|FOLDER ...      top-k classes with names
    vitkit bench NAME ... [--img-size S ...]  params, GMACs, images/s, latency, peak memory, MFU vs matmul peak
    vitkit export NAME|RUN --format F        ONNX, torch.export, ExecuTorch, OpenVINO, Core ML; verified vs eager
    vitkit explain NAME|RUN --image I --method M   attention maps, rollout, CAM, GradCAT, distances (PNG + .npy)
    vitkit data mnist-segmentation|mnist-detection OUT   offline datasets of real MNIST digits on canvases
    vitkit serve RUN|NAME [--host H --port P]  a local web explorer: predictions, attention, CAM, boxes, masks

Each subcommand lives in its own function and registers its parser in ``_SUBCOMMANDS``; training,
evaluation, benchmarking, export and explanation commands plug in the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

import vitkit
from vitkit.bench import allocator, count_macs, count_params

DEFAULT_MODEL = "vit_tiny_patch16_224"


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return vitkit.create_model(name, **kwargs)


def cmd_models(args: argparse.Namespace) -> int:
    names = vitkit.list_models(args.pattern, family=args.family)
    if not names:
        print(f"no registered model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        entry = vitkit.get_model_entry(name)
        model = _meta_model(name)
        size = "x".join(str(s) for s in entry.default_cfg["input_size"][1:])
        rows.append((name, entry.family, f"{count_params(model) / 1e6:.2f}M", size, ",".join(entry.pretrained) or "-"))
    widths = [max(len(r[i]) for r in rows + [("model", "family", "params", "input", "weights")]) for i in range(5)]
    header = ("model", "family", "params", "input", "weights")
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = _meta_model(args.name, **kwargs)
    entry = vitkit.get_model_entry(args.name)
    cfg = model.pretrained_cfg
    macs = count_macs(model)
    info = {
        "model": args.name,
        "family": entry.family,
        "params": count_params(model),
        "gmacs": round(macs / 1e9, 4),
        "num_features": model.num_features,
        "num_classes": model.num_classes,
        "data_config": vitkit.resolve_data_config(model),
        "feature_info": [dict(f) for f in model.feature_info],
        "pretrained_tags": list(entry.pretrained),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=list))
    else:
        print(f"{args.name}  ({entry.family})")
        print(f"  params        {info['params']:,}")
        print(f"  GMACs         {info['gmacs']} at {cfg['input_size'][1]}x{cfg['input_size'][2]}")
        print(f"  num_features  {info['num_features']}   num_classes {info['num_classes']}")
        print(f"  data config   {info['data_config']}")
        print(f"  weights       {', '.join(info['pretrained_tags']) or '-'}")
        print("  feature_info")
        for i, f in enumerate(model.feature_info):
            print(f"    [{i}] {f['module']:<24} channels {f['num_chs']:<5} reduction {f['reduction']}")
    if args.forward:
        real = vitkit.create_model(args.name, **kwargs).eval()
        x = torch.randn(1, *cfg["input_size"])
        with torch.inference_mode():
            real(x)  # warm-up
            t0 = time.perf_counter()
            out = real(x)
            dt = time.perf_counter() - t0
        print(
            f"  forward       batch 1 -> {tuple(out.shape)} in {dt * 1e3:.1f} ms "
            f"(fp32, {torch.get_num_threads()} threads, random weights)"
        )
    return 0


def _train_config(args: argparse.Namespace):
    from vitkit.config import load_config

    flags = [
        ("task", "task.name"),
        ("model", "model.name"),
        ("dataset", "data.dataset"),
        ("data_root", "data.root"),
        ("epochs", "sched.epochs"),
        ("output", "train.output"),
        ("amp", "train.amp"),
    ]
    sets = [f"{key}={getattr(args, flag)}" for flag, key in flags if getattr(args, flag) is not None]
    if args.smoke:  # two optimizer steps and an evaluation
        sets += ["train.max_steps=2", "sched.epochs=1", "train.progress=false"]
    return load_config(args.config, sets + args.set)


def cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import train

    summary = train(_train_config(args), resume=args.resume)
    score = summary["score"]
    if summary[f"final_{score}"] is not None:
        ema = summary[f"final_ema_{score}"]
        ema = f" (EMA {ema:.4f})" if ema is not None else ""
        print(
            f"held-out {summary['score_label']} {summary[f'final_{score}']:.4f}{ema}"
            f", best {summary[f'best_{score}']:.4f} at epoch {summary['best_epoch']}; {summary['seconds']:.0f}s, "
            f"{summary['img_per_s']:.0f} img/s; run in {summary['run_dir']}"
        )  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitkit.train import evaluate, load_run

    run = load_run(args.run, args.which, ema=args.ema, compile=args.compile)
    if args.dataset:
        run.cfg.set("data.dataset", args.dataset)
    if args.data_root:
        run.cfg.set("data.root", args.data_root)
    split = args.split or run.cfg.data.val_split
    if not split:
        raise ValueError(f"run {str(run.run_dir)!r} has no held-out split (data.val_split); pass --split")
    out = Path(args.out) if args.out else run.run_dir / "eval"
    if args.linear_probe:
        from vitkit.tasks.classification.linear_probe import format_probe, write_probe
        from vitkit.train import linear_probe

        shot_split = args.probe_split or run.cfg.data.train_split
        res = linear_probe(run.task, run.model, run.task.dataset(shot_split), run.task.dataset(split), run.data_config,
                           args.linear_probe, args.probe_seeds, args.probe_l2, args.batch_size)  # fmt: skip
        path = write_probe(dict(res, checkpoint=str(run.checkpoint), shot_split=shot_split, split=split), out)
        print(f"{run.checkpoint}: " + format_probe(res))
        print(f"wrote {path}")
        return 0
    res = evaluate(run.task, run.model, run.task.dataset(split), run.data_config, args.batch_size)
    title = f"{run.cfg.model.name}: {run.task.score_label} {res[run.task.score]:.4f}"
    files = run.task.write_eval(dict(res, checkpoint=str(run.checkpoint), split=split), out, title)
    print(f"{run.checkpoint}: " + run.task.format_eval(res))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vitkit.train import load_run, predict

    run = load_run(args.run, args.which, ema=args.ema, compile=args.compile)
    options = {"classification": {"topk": args.topk}, "detection": {"score": args.score}}.get(run.task.name, {})
    results = predict(run, args.images, **options)
    failed = [r for r in results if "error" in r]
    if args.out:
        from pathlib import Path

        files = run.task.save_predictions([r for r in results if "error" not in r], Path(args.out))
        print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in results], indent=2))
    else:
        for r in results:
            text = f"could not be read ({r['error']})" if "error" in r else run.task.format_prediction(r)
            print(f"{r['image']}: {text}")
    if len(failed) == len(results):
        print(f"vitkit: error: none of the {len(results)} image(s) could be read", file=sys.stderr)
        return 1
    if failed:
        print(f"vitkit: {len(failed)} of {len(results)} image(s) could not be read", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vitkit.bench.speed import bench_model, matmul_peak
    from vitkit.machine import bf16_note

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "bf16" and (note := bf16_note(args.device)):
        print(f"vitkit bench --dtype bf16: {note}", file=sys.stderr)
    names = [n for pattern in args.names for n in (vitkit.list_models(pattern) if "*" in pattern else [pattern])]
    if not names:
        raise ValueError(f"no registered model matches {args.names}")
    tune_malloc = allocator.choice(args.malloc) == "speed"
    rows = []
    for name in names:
        for size in args.img_size or [None]:
            row = bench_model(
                name,
                img_size=size,
                batch=args.batch,
                dtype=args.dtype,
                layout=args.layout,
                fuse_bn=args.fuse_bn,
                compile=args.compile,
                train=args.train,
                runtime=args.runtime,
                repeats=args.repeats,
                device=args.device,
                in_chans=3,
                tune_malloc=tune_malloc,
            )
            rows.append(row.as_dict())
            if args.format == "table":
                print(_bench_line(row.as_dict(), header=len(rows) == 1), flush=True)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    else:
        print(
            f"matmul peak ({args.dtype}, {torch.get_num_threads()} threads): "
            f"{matmul_peak(args.dtype, device=args.device) / 1e9:.0f} GFLOP/s; mfu = 2 x MACs x img/s / peak"
        )
    if args.plot:
        _plot_sweep(rows, args.plot)
    return 0


_BENCH_COLS = [
    ("model", 26),
    ("img_size", 5),
    ("batch", 5),
    ("dtype", 5),
    ("params", 11),
    ("gmacs", 8),
    ("img_per_s", 9),
    ("latency_ms", 10),
    ("peak_mem_mb", 11),
    ("mfu", 6),
    ("train_img_per_s", 9),
    ("eager_img_per_s", 9),  # --compile: eager and compiled side by side
    ("compile_s", 9),
]


def _bench_line(row: dict, header: bool = False) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))

    line = "  ".join(fmt(row[k]).rjust(w) if k != "model" else fmt(row[k]).ljust(w) for k, w in _BENCH_COLS)
    if header:
        head = "  ".join(k.rjust(w) if k != "model" else k.ljust(w) for k, w in _BENCH_COLS)
        return head + "\n" + line
    return line


def _plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["img_size"])
        a.plot([r["img_size"] for r in rs], [r["img_per_s"] for r in rs], marker="o", label=name)
        b.plot([r["img_size"] for r in rs], [r["latency_ms"] for r in rs], marker="o", label=name)
    a.set_xlabel("input size (px)")
    a.set_ylabel(f"images/s (batch {rows[0]['batch']})")
    b.set_xlabel("input size (px)")
    b.set_ylabel("latency at batch 1 (ms)")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitkit.export import SUFFIX, export_model

    run = None
    if Path(args.name).is_dir():  # a training run: its model, weights and input size
        from vitkit.train import load_run

        run = load_run(args.name, args.which, ema=args.ema)
        model, chw, stem = run.model, run.data_config["input_size"], run.run_dir.name
    else:
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model = vitkit.create_model(args.name, checkpoint_path=args.checkpoint, **kwargs).eval()
        chw, stem = model.pretrained_cfg["input_size"], args.name
    out = args.output or f"{stem}{SUFFIX[args.format]}"
    if args.int8:
        return _export_int8(args, run, model, chw, out)
    res = export_model(
        model, out, args.format, dynamic_batch=args.dynamic_batch, sizes=args.sizes, precision=args.precision,
        input_chw=chw,
    )  # fmt: skip
    errs = [f"batch {b}: {e:.2e}" for b, e in res["max_rel_err"].items()]
    errs += [f"{s}x{s}: {e:.2e}" for s, e in res["size_rel_err"].items()]
    print(f"wrote {res['path']} ({args.format}, {args.precision}); ran {res['ran']}")
    print(f"max |exported - eager| / max |eager|: {', '.join(errs)}")
    if "coreml" in res:
        print(f"Core ML inputs: {res['coreml']['inputs']}; ops: {', '.join(res['coreml']['ops'])}")
    tol = args.tolerance if args.tolerance is not None else res["tolerance"]
    worst = max([*res["max_rel_err"].values(), *res["size_rel_err"].values()])
    if worst > tol:
        print(f"vitkit: error: the export differs from the eager model by {worst:.2e} > {tol:.0e}", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitkit.data.images import load_image
    from vitkit.data.transforms import EvalTransform
    from vitkit.interpret import explain
    from vitkit.train import load_run

    if Path(args.model).is_dir():
        run = load_run(args.model, args.which, ema=args.ema)
        model, data_config = run.model, run.data_config
    else:
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model = vitkit.create_model(args.model, checkpoint_path=args.checkpoint, **kwargs)
        data_config = vitkit.resolve_data_config(model)
    model.eval()
    if args.image:
        x = EvalTransform.from_data_config(data_config)(load_image(args.image))[None]
    else:
        if args.method != "posembed":
            raise ValueError(f"--method {args.method} needs --image")
        x = torch.zeros(1, *data_config["input_size"])
    query = tuple(args.query) if args.query else None
    written = explain(model, x, args.method, args.out, target=args.target, query=query)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from vitkit.data.mnist import MNIST

    ds = MNIST(args.mnist, args.split)
    kw = dict(n_train=args.train, n_val=args.val, train_digits=args.train_digits, size=args.size, seed=args.seed)
    if args.kind == "mnist-segmentation":
        from vitkit.tasks.segmentation.data import write_mnist_segmentation

        out = write_mnist_segmentation(ds.images, ds.labels, args.out, **kw)
        layout = "VOC-style segmentation (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)"
    elif args.kind == "mnist-detection":
        from vitkit.tasks.detection.data import write_mnist_detection

        out = write_mnist_detection(ds.images, ds.labels, args.out, **kw)
        layout = "COCO detection (train/, val/, annotations/instances_{train,val}.json)"
    else:
        raise ValueError(f"unknown dataset kind {args.kind!r}")
    print(f"wrote {args.train} train and {args.val} held-out canvases to {out}: {layout}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from vitkit.serve import Explorer, Limits, serve
    except ImportError as e:
        raise ImportError(f"vitkit serve needs the serve extra (pip install 'vitkit[serve]'): {e}") from None

    limits = Limits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, max_waiting=args.max_waiting)
    kwargs = dict(checkpoint=args.checkpoint, img_size=args.img_size, num_classes=args.num_classes)
    explorer = Explorer.load(args.model, which=args.which, ema=args.ema, limits=limits, **kwargs)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vitkit: warning: serving on {args.host}, reachable from other machines", file=sys.stderr)
    name = explorer.name
    serve(explorer, args.host, args.port, announce=lambda url: print(f"vitkit serve: {name} at {url}", flush=True))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="write an offline dataset built from the real MNIST digits")
    p.add_argument("kind", choices=["mnist-segmentation", "mnist-detection"], help="what to write")
    p.add_argument("out", help="output folder")
    p.add_argument("--mnist", default="../shared/data/mnist", help="folder holding the MNIST IDX files")
    p.add_argument("--split", default="test", help="MNIST split to draw digits from (the shared folder has 'test')")
    p.add_argument("--train", type=int, default=2000, help="training canvases")
    p.add_argument("--val", type=int, default=500, help="held-out canvases")
    p.add_argument("--train-digits", type=int, default=8000, help="digits reserved for training canvases (rest: val)")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit_*'")
    p.add_argument("--family", default=None, help=f"only this family ({', '.join(vitkit.list_families())})")
    p.set_defaults(func=cmd_models)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe one model")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"registered model name (default {DEFAULT_MODEL})")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="skip the timed forward pass")
    p.set_defaults(func=cmd_info)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default: NesT on the bundled digits, offline)",
        description="Train from a recipe (configs/*.yaml) with validated overrides.",
    )
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml); defaults apply without one")
    p.add_argument("--task", default=None, help="task.name (default: the model's own task, e.g. classification)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--model", default=None, help="registered model name (model.name)")
    p.add_argument("--dataset", default=None, help="digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder")
    p.add_argument("--data-root", default=None, help="dataset folder (data.root)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"])
    p.add_argument("--output", default=None, help="run folder (default runs/<model>-<dataset>[-N])")
    p.add_argument("--resume", default=None, help="'auto' (latest run's last checkpoint) or a run/checkpoint folder")
    p.add_argument("--smoke", action="store_true", help="two optimizer steps and an evaluation, to check a recipe")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run with its task's metrics (classification: top-1/top-5)")
    p.add_argument("run", help="run folder (runs/...) or checkpoint folder")
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--dataset", default=None, help="default: the run's dataset")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default=None, help="default: the run's held-out split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument(
        "--linear-probe",
        type=int,
        nargs="+",
        action="extend",
        metavar="K",
        help="instead: few-shot linear evaluation with K labelled images per class (several: '1 5 10', or the flag "
        "again) on frozen features, regularised least squares to {-1,+1} (ViT paper); classification and "
        "masked_patch runs",
    )
    p.add_argument("--probe-split", default=None, help="the K-shot images' split (default: the run's train split)")
    p.add_argument("--probe-seeds", type=int, default=3, help="draws of the K-shot images, averaged (default 3)")
    p.add_argument("--probe-l2", type=float, default=2.0**10, help="least-squares regularisation (default 2**10)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (checked against eager first: vitkit.optimize)"
    )
    p.set_defaults(func=cmd_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict images or folders of images with a trained run (classification: top-k)")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=5, help="classification: how many classes to list")
    p.add_argument("--score", type=float, default=0.3, help="detection: the lowest score drawn and listed")
    p.add_argument("--out", default=None, help="folder for predictions.json (and the task's drawings)")
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--ema", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (checked against eager first: vitkit.optimize)"
    )
    p.set_defaults(func=cmd_predict)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="params, GMACs, speed, latency, peak memory and MFU of models")
    p.add_argument("names", nargs="+", help="model names or shell patterns ('nest_*')")
    p.add_argument("--img-size", type=int, nargs="*", default=None, help="one or more sizes (a sweep)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: the faster of autocast/weights")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "nchw", "channels_last"],
        help="input/weight memory layout; auto times both and keeps the faster (reported)",
    )
    p.add_argument("--channels-last", dest="layout", action="store_const", const="channels_last")
    p.add_argument("--fuse-bn", action="store_true", help="fold BatchNorm into convolutions (inference)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--train", action="store_true", help="also measure training-step throughput")
    p.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "torchscript", "onnxruntime", "openvino", "executorch"],
        help="torch: eager (add --compile for torch.compile); onnxruntime, openvino (CPU plugin), executorch "
        "(XNNPACK): the fp32 export in that runtime, checked against eager first; "
        "torchscript: traced, frozen, oneDNN Graph fuser (deprecated: torch.jit.trace is deprecated in torch 2.13)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument(
        "--malloc",
        default=None,
        choices=["speed", "default"],
        help="glibc malloc policy for the process (vitkit.bench.allocator): speed keeps freed tensor memory for reuse, "
        "default is glibc's own; default: $VITKIT_MALLOC, else speed",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", default=None, help="write a PNG of a resolution sweep")
    p.set_defaults(func=cmd_bench)


def _export_int8(args: argparse.Namespace, run, model, chw, out: str) -> int:
    """``--int8``: the fp32 ONNX export quantized by ONNX Runtime (:func:`vitkit.export.quantize_onnx_int8`),
    calibrated on the run's own training images. The op sets in ``vitkit.export.INT8_OP_SETS`` are each tried and
    the one with the smallest error against eager on other training images (not calibrated on) is kept
    (:func:`vitkit.export.quantize_onnx_int8_best`); for a classifier the held-out top-1 of fp32 and int8 is then
    reported."""
    import tempfile
    from pathlib import Path

    from vitkit.export import OnnxRunner, export_onnx, quantize_onnx_int8_best
    from vitkit.routes import Optimized, OptimizeReport
    from vitkit.train import evaluate
    from vitkit.train.inference import calibration_batches

    if run is None or args.format != "onnx":
        raise ValueError("--int8 quantizes an ONNX export calibrated on a run's training images: pass a run folder "
                         "and --format onnx")  # fmt: skip
    calib = calibration_batches(run, args.calibration)
    check = calibration_batches(run, min(64, args.calibration), start=args.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "fp32.onnx", chw)
        kept = quantize_onnx_int8_best(
            model, Path(tmp) / "fp32.onnx", out, calib, check, reduce_range=args.int8_weight_bits == 7
        )
    for label, err in kept["errors"].items():
        print(f"int8, {label} quantized: max relative error {err:.2e}")
    runner = OnnxRunner(out)
    print(f"wrote {out} (int8, {args.int8_weight_bits}-bit weights, calibrated on {args.calibration} training "
          f"images); max relative error {kept['max_rel_err']:.2e}")  # fmt: skip
    if run.cfg.task.name in (None, "classification") and run.cfg.data.val_split:
        held_out = run.task.dataset(run.cfg.data.val_split)
        int8 = Optimized(model, runner, OptimizeReport(route="int8", dtype="fp32"))
        top1 = [evaluate(run.task, m, held_out, run.data_config, 250)["top1"] for m in (model, int8)]
        print(f"held-out top-1: fp32 {100 * top1[0]:.2f}%, int8 {100 * top1[1]:.2f}%")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model or a run for deployment and verify it against eager")
    p.add_argument("name", help="a registered model name, or a training run's folder")
    p.add_argument(
        "--format",
        required=True,
        choices=["onnx", "export", "torchscript", "executorch", "openvino", "coreml"],
        help="onnx (run in onnxruntime), export (torch.export .pt2), executorch (.pte with the XNNPACK delegate, "
        "run in ExecuTorch), openvino (IR, run on OpenVINO's CPU plugin), coreml (.mlpackage; runs on macOS only, "
        "so here the converted program's shapes and ops are checked), torchscript (deprecated)",
    )
    p.add_argument("--which", default="best", help="for a run: best or last checkpoint")
    p.add_argument("--ema", action="store_true", help="for a run: its EMA weights")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="other square input sizes the artefact must take")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="fp16: coreml and openvino")
    p.add_argument("--int8", action="store_true", help="a run's ONNX export, statically quantized (ONNX Runtime)")
    p.add_argument("--calibration", type=int, default=256, help="--int8: training images to calibrate on")
    p.add_argument(
        "--int8-weight-bits",
        type=int,
        default=7,
        choices=[7, 8],
        help="--int8: 7 (default) runs accurately on any x86 CPU; 8 only where every target CPU has VNNI/AMX "
        "(AVX2-only CPUs saturate 8-bit weights)",
    )
    p.add_argument("--checkpoint", default=None, help="weights to load (vitkit or timm format)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis")
    p.add_argument("--output", default=None)
    p.add_argument(
        "--tolerance", type=float, default=None, help="relative error allowed (default 1e-4 fp32, 1e-2 fp16)"
    )
    p.set_defaults(func=cmd_export)


def _add_explain(sub) -> None:
    from vitkit.interpret.explain import METHODS

    p = sub.add_parser("explain", help="attention maps, rollout, CAM, GradCAT, distances: PNG figures + .npy arrays")
    p.add_argument("model", help="a registered model name, or a run folder from vitkit train")
    p.add_argument("--checkpoint", default=None, help="weights for a model name (vitkit or timm format)")
    p.add_argument("--image", default=None, help="the image to explain")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the prediction)")
    p.add_argument(
        "--query", type=int, nargs=2, metavar=("Y", "X"), default=None, help="attention: query pixel (default centre)"
    )
    p.add_argument("--out", default="explain", help="output folder")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--ema", action="store_true")
    p.set_defaults(func=cmd_explain)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web explorer of a run or model (needs: pip install 'vitkit[serve]')")
    p.add_argument("model", help="a run folder from vitkit train, or a registered model name")
    p.add_argument("--checkpoint", default=None, help="weights for a model name (vitkit or timm format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one; the URL is printed)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--ema", action="store_true")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (MiB)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest decoded image (width x height)")
    p.add_argument("--max-waiting", type=int, default=4, help="requests queued behind the one computing; more: 503")
    p.set_defaults(func=cmd_serve)


_SUBCOMMANDS: list[Callable] = [
    _add_models,
    _add_info,
    _add_train,
    _add_eval,
    _add_predict,
    _add_bench,
    _add_export,
    _add_explain,
    _add_data,
    _add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description=vitkit.__doc__)
    parser.add_argument("--version", action="version", version=f"vitkit {vitkit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "bench":  # bench sets the policy itself (--malloc): glibc cannot go back to its default
            allocator.tune_from_env()  # the CLI owns its process: keep freed tensor memory for reuse (see allocator)
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"vitkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
