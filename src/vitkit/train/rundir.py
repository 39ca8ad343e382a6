"""Run folders: where a run is written, what describes it, and finding one again.

``runs/<model>-<dataset>`` (``-2``, ``-3`` ... so nothing is overwritten) holds ``config.yaml`` (the resolved
config: the run's truth, enough to rebuild its model and data), ``run.json`` (only what a config cannot say:
versions, machine, command, world size, image counts; never read back to rebuild anything), metrics, figures and
``checkpoints/{last,best}/``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
import yaml

from vitkit.config import TrainConfig
from vitkit.machine import cpu_info
from vitkit.models._checkpoint import MODEL_FILE, find_checkpoint


def resolve_run_dir(cfg: TrainConfig, resume: str | None) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint folder to resume from or None)``. Never reuses a folder that holds a run
    unless asked to resume it; the default folder gets a ``-N`` suffix instead."""
    explicit = cfg.train.output is not None
    base = Path(cfg.train.output) if explicit else Path("runs") / f"{cfg.model.name}-{cfg.data.dataset}"
    if resume not in (None, "auto"):
        path = Path(resume)
        ckpt = path if (path / "state.pt").is_file() else find_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--resume {resume!r}: no checkpoint found there")
        return ckpt.parent.parent, ckpt
    candidates = [base] if explicit else [base, *sorted(base.parent.glob(base.name + "-*"))]
    if resume == "auto":
        found = [(c, find_checkpoint(c / "checkpoints")) for c in candidates if c.is_dir()]
        found = [(c, k) for c, k in found if k is not None]
        if found:
            return max(found, key=lambda ck: (ck[1] / "state.pt").stat().st_mtime)
        if explicit:
            return base, None
    if not base.exists() or not any(base.iterdir()):
        return base, None
    if explicit:
        raise FileExistsError(
            f"run folder {str(base)!r} already holds a run; pass --resume auto to continue it, or another --output"
        )
    n = 2
    while (base.parent / f"{base.name}-{n}").exists():
        n += 1
    return base.parent / f"{base.name}-{n}", None


def write_run_files(run_dir: Path, cfg: TrainConfig, facts: dict) -> None:
    """``config.yaml`` (the resolved config) and ``run.json`` (``facts`` plus command, versions and machine)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info = dict(
        facts,
        command=" ".join(sys.argv),
        machine={"platform": platform.platform(), "torch": torch.__version__, "cpu": cpu_info()},
    )
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


def locate(path: str | Path, which: str = "best") -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` from a run folder or a checkpoint folder."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path.parent.parent, path
    ckpt = find_checkpoint(path / "checkpoints", which) or find_checkpoint(path / "checkpoints", "last")
    if ckpt is None:
        raise FileNotFoundError(f"{str(path)!r} is neither a vitkit run folder nor a checkpoint folder")
    return path, ckpt


def read_run_config(run_dir: Path, ckpt: Path) -> TrainConfig:
    """A run's ``config.yaml``. Runs written before the config recorded ``model.num_classes``/``in_chans``/
    ``data.classes`` get them from the checkpoint's state and the old ``run.json``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: cannot tell which model {ckpt} belongs to")
    cfg = TrainConfig.from_dict(yaml.safe_load(path.read_text()))
    if cfg.model.num_classes is None or cfg.model.in_chans is None:  # an older run folder
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        old = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        cfg.data.classes = cfg.data.classes or list(state.get("classes") or old.get("classes") or [])
        cfg.model.num_classes = cfg.model.num_classes or old.get("num_classes") or len(cfg.data.classes)
        cfg.model.in_chans = cfg.model.in_chans or (old.get("data_config") or {}).get("input_size", [3])[0]
    return cfg
