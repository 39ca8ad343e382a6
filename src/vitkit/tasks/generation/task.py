"""Unconditional image generation by a GAN as a ``vitkit train`` task: ``task.name: gan`` (the task of every
registered generator, ``nest_gen_*`` and ``dcgan_gen_*``).

The run's model is a :class:`~vitkit.tasks.generation.models.GanPair`: the configured generator and a spectral-norm
conv discriminator (:class:`~vitkit.tasks.generation.models.SNDiscriminator`, ``task.disc_width``), the same for
every generator. Each optimizer step has two phases (:meth:`GanTask.optim_phases`), each with its own optimizer built
from the ``optim`` section: first the discriminator (learning rate x ``task.d_lr_scale``) on the real batch and as
many generated images, then the generator on as many fresh samples, against the updated discriminator. Loss:
``task.loss`` 'hinge' (D: ``relu(1 - D(x)) + relu(1 + D(G(z)))``, G: ``-D(G(z))``) or 'ns' (non-saturating:
D: ``softplus(-D(x)) + softplus(D(G(z)))``, G: ``softplus(-D(G(z)))``). The noise of both phases is drawn in
:meth:`GanTask.prepare` from the loop's keyed generator, so a resumed run draws the same. ``train.ema_decay``
keeps the usual EMA of the whole pair; its generator is the EMA generator (its discriminator is not used).

Data: any image dataset (labels unused), each image unscaled at the centre of a ``model.img_size`` canvas (MNIST's
28x28 digits get 2 pixels of black border at 32x32; larger images are shrunk to fit), in [-1, 1]; 1 or 3 channels
as the dataset has them (MNIST: 1).

Evaluation: the Frechet distance between the held-out images and as many generated ones (fixed noise, the same
at every evaluation) on ``task.fid_model``'s features: a classification run folder, e.g. the digit classifier of
``configs/gan_fid_classifier_mnist.yaml`` (MNIST-FID); without one, on 2x2-pooled pixels (pixel FD). See
:mod:`vitkit.tasks.generation.fid`: these are not Inception FIDs. Lower is better; the score that picks the best
checkpoint is ``neg_fid``.

Samples: every ``task.sample_every`` steps, a grid of 8x8 images from 64 fixed noise vectors (the EMA generator
when there is one) in ``<run>/samples/step_<N>.png``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitkit.config import value_range
from vitkit.data.datasets import DATASETS, build_dataset
from vitkit.data.transforms import EvalTransform
from vitkit.models import create_model
from vitkit.tasks.base import EvalContext, Phase, Task
from vitkit.tasks.generation.fid import PixelFeatures, classifier_features, frechet_metric
from vitkit.tasks.generation.models import GanPair, SNDiscriminator

LOSSES = ("hinge", "ns")


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The discriminator's terms on real and generated logits: hinge or non-saturating (logistic)."""
    if kind == "hinge":
        return {"d_real": F.relu(1 - real_logits).mean(), "d_fake": F.relu(1 + fake_logits).mean()}
    return {"d_real": F.softplus(-real_logits).mean(), "d_fake": F.softplus(fake_logits).mean()}


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> an ``nrow``-wide uint8 grid ``(rows*(H+pad)+pad, nrow*(W+pad)+pad[, 3])``."""
    b, c, h, w = images.shape
    rows = -(-b // nrow)
    grid = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=np.uint8)
    pix = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    for i in range(b):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, y : y + h, x : x + w] = pix[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


class _Centred:
    """The sample transform: the image at the centre of the canvas, in [-1, 1]; the label passes through."""

    def __init__(self, size: tuple[int, int], in_chans: int, interp: str):
        self.tf = EvalTransform(size, [0.5] * in_chans, [0.5] * in_chans, in_chans, 1.0, interp, canvas=True)

    def __call__(self, img, target, rng=None, size=None):
        return self.tf(img, rng, size), target


class GanTask(Task):
    name = "gan"
    score = "neg_fid"
    score_label = "-FID"
    metrics = ("fid", "neg_fid")
    datasets = DATASETS

    @dataclass(frozen=True)
    class Options:
        loss: str = "hinge"  # 'hinge' or 'ns' (non-saturating)
        d_lr_scale: float = field(default=1.0, metadata=value_range(0, lo_open=True))  # D's lr / the schedule's
        disc_width: int = field(default=32, metadata=value_range(1))  # D's widths: w, 2w, 4w
        sample_every: int = field(default=500, metadata=value_range(0))  # steps between sample grids (0: none)
        fid_model: str = ""  # a classification run folder whose pre-logits are the FID features ('': pixels)
        eval_seed: int = 0  # the noise of the evaluation samples

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.options.loss not in LOSSES:
            raise ValueError(f"task.loss must be one of {', '.join(LOSSES)}, got {self.options.loss!r}")
        a = cfg.aug
        used = {"aug.mixup": a.mixup, "aug.cutmix": a.cutmix, "aug.label_smoothing": a.label_smoothing}
        used = [f"{k}={v}" for k, v in used.items() if v]
        if used:
            raise ValueError(f"config: {', '.join(used)} do not apply to the gan task (they mix labels)")
        self._features = None
        self.latent_dim = None  # the generator's, set by build_model

    # ---- data ---------------------------------------------------------------------------------------

    def dataset(self, split: str, download: bool = False):
        d = self.cfg.data
        return build_dataset(d.dataset, d.root, split, download=download)

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The configured generator (``model.checkpoint`` may be a generator's weights) and the discriminator."""
        m = self.cfg.model
        extra = {"drop_path_rate": m.drop_path_rate} if m.drop_path_rate is not None else {}
        gen = create_model(
            m.name,
            checkpoint_path=m.checkpoint if initial_weights else None,
            in_chans=m.in_chans if m.in_chans is not None else 3,
            img_size=m.img_size,
            **extra,
            **m.kwargs,
        )
        w, self.latent_dim = self.options.disc_width, gen.latent_dim
        return GanPair(gen, SNDiscriminator(gen.img_size, gen.in_chans, (w, 2 * w, 4 * w)))

    def data_config(self, model: nn.Module) -> dict:
        """The generator's data config; pixels are always in [-1, 1] (``data.mean`` / ``data.std`` must not say
        otherwise)."""
        d = self.cfg.data
        for key, v in (("mean", d.mean), ("std", d.std)):
            if v is not None and any(x != 0.5 for x in v):
                raise ValueError(f"config: data.{key}={v}; the gan task's images are in [-1, 1] (0.5), leave it unset")
        return super().data_config(model.generator)

    def train_transform(self, data_config: dict):
        c, h, w = data_config["input_size"]
        return _Centred((h, w), c, data_config["interpolation"])

    eval_transform = train_transform

    # ---- training -----------------------------------------------------------------------------------

    def optim_phases(self, model: nn.Module) -> dict[str, Phase]:
        """The discriminator's step, then the generator's."""
        return {
            "discriminator": Phase(model.discriminator, self.options.d_lr_scale),
            "generator": Phase(model.generator),
        }

    def prepare(self, inputs: torch.Tensor, targets, rng: np.random.Generator):
        """Labels dropped; the noise of both phases drawn from the loop's keyed ``rng``."""
        if self.latent_dim is None:
            raise RuntimeError("gan task: prepare() needs the generator's latent size; build_model() first")
        shape = (2, len(inputs), self.latent_dim)
        z = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(inputs.device)
        return inputs, {"z_d": z[0], "z_g": z[1]}

    def losses(self, model: nn.Module, inputs: torch.Tensor, targets: dict, phase: str = "generator"):
        pair, kind = _unwrap(model), self.options.loss
        if phase == "discriminator":
            with torch.no_grad():
                fake = pair.generator(targets["z_d"])
            logits = pair.discriminator(torch.cat([inputs, fake]))  # one batch: real then generated
            return discriminator_loss(kind, logits[: len(inputs)], logits[len(inputs) :])
        if phase == "generator":
            return {"g": generator_loss(kind, pair.discriminator(pair.generator(targets["z_g"])))}
        raise ValueError(f"gan task: unknown phase {phase!r}")

    def example_targets(self, inputs: torch.Tensor):
        raise NotImplementedError("the gan task's steps need the model's latent size; time them with vitkit train")

    def after_step(self, model: nn.Module, ema: nn.Module | None, step: int, run_dir: Path) -> None:
        every = self.options.sample_every
        if every and step % every == 0:
            self.write_samples((ema or model).generator, run_dir / "samples" / f"step_{step:06d}.png")

    @torch.no_grad()
    def write_samples(self, generator: nn.Module, path: Path, n: int = 64) -> Path:
        """An 8-wide grid of ``n`` images from fixed noise (a private generator: the global RNG is untouched)."""
        z = generator.sample_latent(n, torch.Generator(device="cpu").manual_seed(self.options.eval_seed))
        was = generator.training
        generator.eval()
        try:
            images = generator(z)
        finally:
            generator.train(was)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images)).save(path)
        return path

    # ---- evaluation ---------------------------------------------------------------------------------

    def feature_extractor(self, in_chans: int, img_size: tuple[int, int]) -> tuple[nn.Module, str]:
        """The FID features (built once) and what they are."""
        if self._features is None:
            path = self.options.fid_model
            if path:
                self._features = (classifier_features(path, in_chans, img_size), f"MNIST-FID: pre-logits of {path}")
            else:
                self._features = (PixelFeatures(in_chans, img_size), "pixel FD: 2x2-average-pooled pixels")
        return self._features

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, ctx: EvalContext) -> dict:
        """The Frechet distance between the held-out images and as many generated ones; batch ``i``'s noise comes
        from a generator seeded ``(task.eval_seed, i)``, the same at every evaluation."""
        if ctx.dist.enabled:
            raise NotImplementedError("the gan task evaluates on one process")
        pair = _unwrap(model)
        gen = pair.generator
        features, what = self.feature_extractor(gen.in_chans, gen.img_size)
        metric = frechet_metric(features.to(ctx.device))
        images = failed = 0
        for i, (x, _, bad) in enumerate(batches):
            failed += len(bad)
            if x is None:
                continue
            z = gen.sample_latent(len(x), torch.Generator().manual_seed(self.options.eval_seed * 1_000_003 + i))
            with ctx.autocast():
                fake = gen(z.to(ctx.device)).float()
            metric.update(x.float(), real=True)
            metric.update(fake, real=False)
            images += len(x)
        if images < 2:
            raise ValueError(f"gan task: the Frechet distance needs at least 2 held-out images, got {images}")
        fid = float(metric.compute())
        return {"fid": fid, "neg_fid": -fid, "features": what, "images": images, "failed_images": failed}

    def format_eval(self, results: dict) -> str:
        return f"FID {results['fid']:.3f} ({results['features']}; {results['images']} real vs as many generated)"

    def predict_batch(self, model: nn.Module, inputs: torch.Tensor, metas: list, **options) -> list[dict]:
        """The discriminator's logit for each image (higher: more like the training images)."""
        logits = _unwrap(model).discriminator(inputs)
        return [{"d_logit": float(v)} for v in logits]


def _unwrap(model: nn.Module) -> GanPair:
    """The :class:`GanPair` inside a compiled (``_orig_mod``) or DDP (``module``) wrapper."""
    for attr in ("_orig_mod", "module"):
        model = getattr(model, attr, model)
    return model
