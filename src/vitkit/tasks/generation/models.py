"""The gan task's models: a DCGAN-style conv generator (the baseline), the spectral-norm conv discriminator both
generators are trained against, and :class:`GanPair` (the one module the training loop holds).

Generators are registered models (``create_model("dcgan_gen_tiny")``, ``create_model("nest_gen_tiny")``, whose
registry config says ``task="gan"``); the discriminator is the task's choice (``task.disc_width``), not a registered
model, so both generators meet the same one.

* :class:`DCGANGenerator` (Radford et al., arXiv 1511.06434): noise -> linear to a 4x4 map -> transposed convs
  (4x4, stride 2) with BatchNorm and ReLU, halving the width and doubling the side each time -> 3x3 conv -> tanh.
  Widths are chosen so that ``dcgan_gen_tiny`` has about the parameters and multiply-adds of ``nest_gen_tiny``.
* :class:`SNDiscriminator` (Miyato et al., arXiv 1802.05957, the small "standard CNN" scaled down): 4x4 stride-2
  convs with spectral normalisation and LeakyReLU(0.2), no normalisation layers, a spectrally normalised linear
  to one logit. No BatchNorm, so a batch of real and fake images can go through it together.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from vitkit.models._base import check_img_size
from vitkit.models._registry import register_variant
from vitkit.models.nest_gen import generator_cfg  # (importing it registers the nest_gen_* generators)


class DCGANGenerator(nn.Module):
    """Noise -> ``(B, in_chans, H, W)`` in [-1, 1] by transposed convolutions from a ``H/2^n x W/2^n`` map."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        in_chans: int = 3,
        latent_dim: int = 128,
        widths: tuple[int, ...] = (256, 128, 64, 32),
        drop_path_rate: float | None = None,
    ):
        """
        Args:
            img_size: generated image size; each side a multiple of ``2^(len(widths)-1)``.
            in_chans: channels of the generated images.
            widths: channels of the first map and after each upsampling (``len(widths) - 1`` doublings).
            drop_path_rate: accepted for the common model arguments; must be 0/None (no residual branches).
        """
        super().__init__()
        name = "DCGANGenerator"
        if drop_path_rate:
            raise ValueError(f"{name}: drop_path_rate must be 0 (no residual branches to drop), got {drop_path_rate}")
        self.in_chans, self.latent_dim = in_chans, latent_dim
        self.input_multiple = 2 ** (len(widths) - 1)
        self.img_size = check_img_size(name, img_size, self.input_multiple, "2^(len(widths)-1)")
        self.start = (self.img_size[0] // self.input_multiple, self.img_size[1] // self.input_multiple)
        self.widths = tuple(widths)
        self.stem = nn.Sequential(nn.Linear(latent_dim, widths[0] * self.start[0] * self.start[1]))
        self.stem_norm = nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU())
        ups = []
        for a, b in zip(widths[:-1], widths[1:]):
            ups += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.ups = nn.Sequential(*ups)
        self.head = nn.Conv2d(widths[-1], in_chans, 3, padding=1)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self.head.weight.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            name = getattr(self, "model_name", "") or type(self).__name__
            raise ValueError(f"{name}: expected noise of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        x = self.stem(z).view(len(z), self.widths[0], *self.start)  # (B, C0, H/2^n, W/2^n)
        return torch.tanh(self.head(self.ups(self.stem_norm(x))))  # (B, C, H, W)


class SNDiscriminator(nn.Module):
    """``(B, C, H, W)`` in [-1, 1] -> ``(B,)`` logits: spectrally normalised 4x4 stride-2 convs, LeakyReLU(0.2)."""

    def __init__(self, img_size: tuple[int, int], in_chans: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers, c = [], in_chans
        for w in widths:
            layers += [spectral_norm(nn.Conv2d(c, w, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c = w
        self.features = nn.Sequential(*layers)
        r = 2 ** len(widths)
        if img_size[0] % r or img_size[1] % r:
            raise ValueError(
                f"SNDiscriminator: img_size sides must be multiples of 2^len(widths) = {r}, got {img_size}"
            )
        self.head = spectral_norm(nn.Linear(c * (img_size[0] // r) * (img_size[1] // r), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)  # (B,)


class GanPair(nn.Module):
    """Generator and discriminator held as one module (one state dict, one EMA); ``forward(z)`` generates."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


# ---- registrations ------------------------------------------------------------------------------------
# widths: dcgan_gen_tiny ~ nest_gen_tiny in parameters and multiply-adds at 32x32 (benchmarks/generation)
_DCGAN = {"tiny": (256, 128, 64, 32), "small": (512, 256, 128, 64)}
for _size, _widths in _DCGAN.items():
    register_variant(
        f"dcgan_gen_{_size}", DCGANGenerator, dict(widths=_widths), family="dcgan_gen", cfg=generator_cfg()
    )
