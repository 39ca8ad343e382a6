"""Masked patch prediction (the ViT paper's self-supervision, appendix B.1.2) as a ``vitkit train`` task.

``task.name: masked_patch`` with any ViT (``vit_*``, ``deit_*``, hybrids) on any classification dataset, whose
labels are not used. Each image's target is the quantised mean colour of every patch: each channel's mean over
the patch's pixels in [0, 1] (after augmentation, before normalisation) cut into ``2 ** 3 = 8`` levels
(``min(floor(8 * mean), 7)``), the channels combined as the digits of a base-8 number, first channel most
significant. That is 8 ** C classes for C channels: 512 for RGB, as in the paper; 8 for grey images such as MNIST
(the run's ``model.num_classes`` is resolved to it: the size of the per-patch classifier).
The corruption of each training batch is drawn in :meth:`MaskedPatchTask.prepare` from the loop's keyed generator
(so a resumed run draws the same); the loss is the cross-entropy of the corrupted patches only, averaged over
them. Evaluation corrupts the held-out images with a fixed generator per batch and reports the colour accuracy on
the corrupted patches (per kind of corruption too) and the accuracy of always answering the most common colour.

Fine-tuning from a run: ``model.checkpoint: <run folder>`` in a classification config with the same model
arguments; the few-shot linear probe: ``vitkit eval RUN --linear-probe 1 5 10``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.config import value_range
from vitkit.data.datasets import DATASETS, build_dataset
from vitkit.data.transforms import EvalTransform, TrainTransform
from vitkit.models import create_model, get_model_entry
from vitkit.runtime import all_reduce_sum
from vitkit.tasks.base import EvalContext, Task
from vitkit.tasks.masked_patch.model import KINDS, UNTOUCHED, MaskedPatchViT, draw_corruption

BITS = 3  # the paper's 3-bit mean colour
LEVELS = 2**BITS
VIT_FAMILIES = ("vit", "vit_hybrid")


def mean_colour_classes(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """The 3-bit mean colour class of every patch: ``(B, C, H, W)`` in [0, 1] -> ``(B, N)`` int64 in [0, 8 ** C).

    Patches are numbered row by row, as the patch embedding flattens them.
    """
    b, c = images.shape[:2]
    means = F.avg_pool2d(images.double(), patch, patch)  # (B, C, H/p, W/p): each channel's mean per patch
    levels = torch.floor(means * LEVELS).clamp_(0, LEVELS - 1).long()
    weights = LEVELS ** torch.arange(c - 1, -1, -1)  # first channel most significant: (r, g, b) -> 64r + 8g + b
    return (levels * weights.view(1, c, 1, 1)).sum(1).flatten(1)


def masked_patch_loss(logits: torch.Tensor, colours: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the corrupted patches only (``mode != UNTOUCHED``), averaged over them."""
    hit = mode != UNTOUCHED
    return F.cross_entropy(logits[hit].float(), colours[hit])


class _ColourTargets:
    """A sample transform: the image transform run to [0, 1] pixels, whose patch colours are the target, then the
    normalisation (so the targets see exactly the pixels the model sees)."""

    def __init__(self, transform, mean, std, patch: tuple[int, int]):
        self.transform, self.mean, self.std, self.patch = transform, list(mean), list(std), patch

    def __call__(self, img, target, rng=None, size=None):
        raw = self.transform(img, rng, size)  # (C, H, W) in [0, 1]
        c = raw.shape[0]
        # per channel, as vitkit.data.transforms.to_tensor reads them (a single value serves every channel)
        mean, std = ((v[:c] if len(v) >= c else v * c)[:c] for v in (self.mean, self.std))
        x = (raw - torch.tensor(mean).view(c, 1, 1)) / torch.tensor(std).view(c, 1, 1)
        return x, mean_colour_classes(raw[None], self.patch)[0]


class MaskedPatchTask(Task):
    name = "masked_patch"
    score = "colour_acc"
    score_label = "colour accuracy"
    metrics = ("colour_acc", "loss")
    datasets = DATASETS
    model_tasks = ("classification",)  # ViTs are registered as classifiers

    @dataclass(frozen=True)
    class Options:
        corrupt: float = field(default=0.5, metadata=value_range(0, 1, lo_open=True))  # fraction of patches
        mask_prob: float = field(default=0.8, metadata=value_range(0, 1))  # of the corrupted: [mask] embedding
        random_prob: float = field(default=0.1, metadata=value_range(0, 1))  # a random other patch; the rest kept

    def __init__(self, cfg):
        super().__init__(cfg)
        o, name = self.options, cfg.model.name
        if o.mask_prob + o.random_prob > 1:
            raise ValueError(f"task.mask_prob + task.random_prob must be <= 1, got {o.mask_prob} + {o.random_prob}")
        if get_model_entry(name).family not in VIT_FAMILIES:
            raise ValueError(f"task masked_patch trains ViTs (vit_*, deit_*), got model {name!r}")
        a = cfg.aug
        label_mixing = {"aug.mixup": a.mixup, "aug.cutmix": a.cutmix, "aug.label_smoothing": a.label_smoothing}
        used = [f"{k}={v}" for k, v in {**label_mixing, "aug.erasing": a.erasing}.items() if v]
        if used:
            raise ValueError(f"config: {', '.join(used)} do not apply to masked_patch (they mix labels or pixels)")

    # ---- data ---------------------------------------------------------------------------------------

    def dataset(self, split: str, download: bool = False):
        d = self.cfg.data
        return build_dataset(d.dataset, d.root, split, download=download)

    def resolve(self, dataset) -> None:
        """Channels (see :meth:`Task.resolve`), then ``model.num_classes`` = the colour classes per patch, 8 ** C
        (the dataset's labels are not used)."""
        super().resolve(dataset)
        m, colours = self.cfg.model, LEVELS**self.cfg.model.in_chans
        if m.num_classes not in (None, colours):
            raise ValueError(
                f"config: model.num_classes={m.num_classes}, but masked_patch predicts {LEVELS} ** in_chans = "
                f"{colours} mean colours per patch of {m.in_chans}-channel images; leave it unset"
            )
        m.num_classes = colours

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The configured ViT without a classifier (``model.checkpoint`` may be a ViT or a masked_patch run)
        inside :class:`MaskedPatchViT`."""
        m = self.cfg.model
        backbone = create_model(
            m.name,
            pretrained=m.pretrained and initial_weights,
            checkpoint_path=m.checkpoint if initial_weights else None,
            num_classes=0,
            in_chans=m.in_chans if m.in_chans is not None else 3,
            img_size=m.img_size,
            drop_path_rate=m.drop_path_rate,
            **m.kwargs,
        )
        return MaskedPatchViT(backbone, m.num_classes or LEVELS**backbone.in_chans)

    def data_config(self, model: nn.Module) -> dict:
        return dict(super().data_config(model.backbone), patch_size=model.patch_size)

    def train_transform(self, data_config: dict):
        a = self.cfg.aug
        c, h, w = data_config["input_size"]
        unit = ([0.0] * c, [1.0] * c)  # to [0, 1] pixels; _ColourTargets normalises
        tf = TrainTransform((h, w), *unit, c, a.crop, tuple(a.scale), a.pad, a.hflip, a.randaugment, 0.0,
                            data_config["interpolation"])  # fmt: skip
        return _ColourTargets(tf, data_config["mean"], data_config["std"], data_config["patch_size"])

    def eval_transform(self, data_config: dict):
        c = data_config["input_size"][0]
        tf = EvalTransform.from_data_config(dict(data_config, mean=[0.0] * c, std=[1.0] * c))
        return _ColourTargets(tf, data_config["mean"], data_config["std"], data_config["patch_size"])

    # ---- training -----------------------------------------------------------------------------------

    def corruption(self, colours: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Targets with a corruption drawn from ``rng``: ``{"colour", "mode", "source"}``, all ``(B, N)``."""
        o = self.options
        mode, source = draw_corruption(*colours.shape, rng, o.corrupt, o.mask_prob, o.random_prob)
        return {"colour": colours, "mode": mode.to(colours.device), "source": source.to(colours.device)}

    def prepare(self, inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator):
        return inputs, self.corruption(targets, rng)

    def losses(self, model: nn.Module, inputs: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        logits = model(inputs, targets["mode"], targets["source"])
        return {"mpp": masked_patch_loss(logits, targets["colour"], targets["mode"])}

    def features(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model.features(inputs)

    # ---- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, ctx: EvalContext) -> dict:
        """Colour accuracy on the corrupted patches of the held-out images, each batch corrupted by a generator of
        its own (the same every evaluation)."""
        k = self.cfg.model.num_classes
        # counts: [loss sum, hits, patches] per kind (mask, random, keep), then target colours, then failures
        counts = torch.zeros(3 * len(KINDS) + k + 1, dtype=torch.float64)
        images = 0
        for i, (x, y, failed) in enumerate(batches):
            counts[-1] += len(failed)
            if x is None:
                continue
            t = self.corruption(y, np.random.default_rng([ctx.dist.rank, i, 5]))
            with ctx.autocast():
                logits = model(x, t["mode"], t["source"]).float()
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
            hit = logits.argmax(-1) == y
            for j, kind in enumerate(KINDS):
                sel = t["mode"] == kind
                counts[3 * j : 3 * j + 3] += torch.stack([loss[sel].sum(), hit[sel].sum(), sel.sum()]).double().cpu()
            counts[3 * len(KINDS) : -1] += torch.bincount(y[t["mode"] != UNTOUCHED].cpu(), minlength=k).double()
            images += len(x)
        counts = all_reduce_sum(counts, ctx.dist)
        images = int(all_reduce_sum(torch.tensor([images], dtype=torch.float64), ctx.dist).item())
        per_kind = counts[: 3 * len(KINDS)].view(len(KINDS), 3)
        loss_sum, hits, n = per_kind.sum(0).tolist()
        colours = counts[3 * len(KINDS) : -1]
        return {
            "colour_acc": hits / max(n, 1),
            "loss": loss_sum / max(n, 1),
            "majority_acc": colours.max().item() / max(n, 1),  # always answering the most common colour
            "per_kind_acc": {name: h / max(c, 1) for name, (_, h, c) in zip(KINDS.values(), per_kind.tolist())},
            "corrupted_patches": int(n),
            "images": images,
            "failed_images": int(counts[-1].item()),
            "colour_counts": colours.long().tolist(),
        }

    def format_eval(self, results: dict) -> str:
        kinds = ", ".join(f"{k} {v:.4f}" for k, v in results["per_kind_acc"].items())
        return (
            f"colour accuracy {results['colour_acc']:.4f} on {results['corrupted_patches']} corrupted patches of "
            f"{results['images']} images ({kinds}); most common colour alone {results['majority_acc']:.4f}; "
            f"loss {results['loss']:.4f} ({results['failed_images']} undecodable)"
        )

    # ---- prediction ---------------------------------------------------------------------------------

    @torch.no_grad()
    def predict_batch(self, model: nn.Module, inputs: torch.Tensor, metas: list) -> list[dict]:
        """Per image: its patches corrupted as in evaluation, the predicted and the true colour of each corrupted
        patch (patch index -> colour class) and the fraction predicted right."""
        colours = torch.stack(list(metas)).to(inputs.device)
        t = self.corruption(colours, np.random.default_rng([0, 0, 5]))
        pred = model(inputs, t["mode"], t["source"]).argmax(-1)
        out = []
        for p, y, m in zip(pred.tolist(), colours.tolist(), t["mode"].tolist()):
            idx = [i for i, v in enumerate(m) if v != UNTOUCHED]
            right = sum(p[i] == y[i] for i in idx)
            out.append({"corrupted": idx, "predicted": [p[i] for i in idx], "true": [y[i] for i in idx],
                        "right": right, "accuracy": right / max(len(idx), 1)})  # fmt: skip
        return out

    def format_prediction(self, result: dict) -> str:
        return f"{result['right']} of {len(result['corrupted'])} corrupted patches' mean colours predicted right"
