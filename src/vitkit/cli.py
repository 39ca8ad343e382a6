"""The ``vitkit`` command.

    vitkit models [PATTERN] [--family F]     list registered models with parameter counts
    vitkit info [NAME] [--img-size S]        config, parameters, MACs, feature_info and a timed forward pass

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
from vitkit.bench import count_macs, count_params

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


_SUBCOMMANDS: list[Callable] = [_add_models, _add_info]


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
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"vitkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
