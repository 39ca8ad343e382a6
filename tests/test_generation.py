"""The gan task and its generators: NesT block de-aggregation against aggregation and a naive reference, the
generator's block tree, Frechet distances against closed forms, GAN losses, and training through the one loop
(two phases, EMA, sample grids, bit-identical resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from conftest import MNIST
from vitkit.models._checkpoint import read_state_dict
from vitkit.models.nest import blockify, unblockify
from vitkit.models.nest_gen import BlockDeaggregation, aggregate_blocks, deaggregate_blocks
from vitkit.tasks import model_task
from vitkit.tasks.generation import (
    SNDiscriminator,
    discriminator_loss,
    frechet_distance,
    generator_loss,
    image_grid,
)
from vitkit.train import Trainer, load_config

# ---- block de-aggregation ------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, block", [((1, 1), (4, 4)), ((2, 2), (2, 3)), ((2, 4), (3, 2))])
def test_deaggregation_and_aggregation_are_inverse_rearrangements(grid, block):
    torch.manual_seed(0)
    parents = torch.randn(2, grid[0] * grid[1], block[0] * block[1], 12)
    children = deaggregate_blocks(parents, grid, block)
    fine = (2 * grid[0], 2 * grid[1])
    assert children.shape == (2, 4 * grid[0] * grid[1], block[0] * block[1], 3)  # 4x the blocks, channels / 4
    assert torch.equal(aggregate_blocks(children, fine, block), parents)  # unblockify -> unshuffle -> blockify
    other = torch.randn_like(children)
    assert torch.equal(deaggregate_blocks(aggregate_blocks(other, fine, block), grid, block), other)


def test_deaggregation_matches_a_naive_reference_and_splits_each_block_into_its_four_children():
    grid, block, c = (2, 3), (2, 2), 2
    parents = torch.randn(1, 6, 4, 4 * c)
    children = deaggregate_blocks(parents, grid, block)
    bh, bw = block
    fine_w = 2 * grid[1]
    for t in range(6):
        gy, gx = divmod(t, grid[1])
        for n in range(bh * bw):
            y, x = gy * bh + n // bw, gx * bw + n % bw  # the token's place on the coarse image plane
            for i in range(2):
                for j in range(2):
                    fy, fx = 2 * y + i, 2 * x + j  # its (i, j) sub-pixel on the fine plane
                    child = (fy // bh) * fine_w + fx // bw
                    assert (fy // bh) // 2 == gy and (fx // bw) // 2 == gx  # a child of block t
                    token = (fy % bh) * bw + fx % bw
                    expect = parents[0, t, n, [4 * k + 2 * i + j for k in range(c)]]
                    assert torch.equal(children[0, child, token], expect)
    # changing one parent block changes exactly its 2x2 children
    bumped = parents.clone()
    bumped[0, 4] += 1  # block (1, 1)
    changed = (deaggregate_blocks(bumped, grid, block) != children).flatten(2).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == [2 * fine_w + 2, 2 * fine_w + 3, 3 * fine_w + 2, 3 * fine_w + 3]


def test_the_generators_image_plane_deaggregation_gives_the_deaggregated_blocks():
    torch.manual_seed(0)
    grid, block = (2, 2), (3, 2)
    m = BlockDeaggregation(8, 4)
    x = torch.randn(2, 8, grid[0] * block[0], grid[1] * block[1])
    out = blockify(m(x).permute(0, 2, 3, 1), block)  # what the next level sees
    conv = blockify(m.conv(x).permute(0, 2, 3, 1), block)
    expect = F.layer_norm(deaggregate_blocks(conv, grid, block), (4,), m.norm.weight, m.norm.bias, 1e-6)
    torch.testing.assert_close(out, expect)
    assert torch.equal(unblockify(blockify(x.permute(0, 2, 3, 1), block), grid, block), x.permute(0, 2, 3, 1))


def test_nest_generator_levels_hold_four_times_the_blocks_of_the_level_above():
    torch.manual_seed(0)
    g = vitkit.create_model("nest_gen_tiny", in_chans=1, img_size=(32, 64))
    assert model_task("nest_gen_tiny") == "gan" and model_task("dcgan_gen_tiny") == "gan"
    block = (4, 8)  # img / (patch 2 * 2^2)
    seen = []
    hooks = [
        lvl.transformer_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape)) for lvl in g.levels
    ]
    z = torch.randn(3, g.latent_dim)
    maps = g.forward_levels(z)
    for h in hooks:
        h.remove()
    for lvl, (dim, shape, m) in enumerate(zip(g.embed_dims, seen, maps)):
        assert g.levels[lvl].pos_embed.shape == (1, 4**lvl, block[0] * block[1], dim)
        assert shape == (3 * 4**lvl, block[0] * block[1], dim)  # every block a sequence of the local Transformer
        assert m.shape == (3, dim, 2**lvl * block[0], 2**lvl * block[1])
    img = g(z)
    assert img.shape == (3, 1, 32, 64) and img.abs().max() <= 1
    assert not torch.allclose(img[0], img[1])  # the noise matters
    img.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())
    with pytest.raises(ValueError, match=r"^nest_gen_tiny: img_size=36: each side must be a multiple of .* = 8"):
        vitkit.create_model("nest_gen_tiny", img_size=36)
    with pytest.raises(ValueError, match=r"expected noise of shape \(B, 128\), got \(3, 64\)"):
        g(torch.randn(3, 64))


def test_generators_are_comparable_and_the_discriminator_is_spectrally_normalised():
    n, d = (vitkit.create_model(f"{k}_gen_tiny", in_chans=1) for k in ("nest", "dcgan"))
    pn, pd = (sum(p.numel() for p in m.parameters()) for m in (n, d))
    assert abs(pn - pd) / pd < 0.1  # benchmarks/generation compares them at about the same size
    torch.manual_seed(0)
    disc = SNDiscriminator((32, 32), 1, (8, 16, 32))
    x = torch.randn(4, 1, 32, 32)
    for _ in range(30):  # power iterations in training mode
        disc(x)
    disc.eval()
    for m in (*disc.features, disc.head):
        if hasattr(m, "parametrizations"):
            w = m.weight.flatten(1)
            assert torch.linalg.matrix_norm(w, 2).item() == pytest.approx(1.0, abs=0.02)


# ---- losses and Frechet distances ------------------------------------------------------------------


def test_gan_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    h = discriminator_loss("hinge", real, fake)
    assert h["d_real"].item() == pytest.approx((0 + 0.5 + 2) / 3) and h["d_fake"].item() == pytest.approx(
        (0 + 1 + 4) / 3
    )
    ns = discriminator_loss("ns", real, fake)
    assert ns["d_real"].item() == pytest.approx(-torch.log(torch.sigmoid(real)).mean().item(), rel=1e-6)
    assert ns["d_fake"].item() == pytest.approx(-torch.log(1 - torch.sigmoid(fake)).mean().item(), rel=1e-6)
    assert generator_loss("hinge", fake).item() == pytest.approx(-1 / 3)
    assert generator_loss("ns", fake).item() == pytest.approx(-torch.log(torch.sigmoid(fake)).mean().item(), rel=1e-6)


def _with_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` samples whose sample mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    x -= x.mean(0)
    white = torch.linalg.cholesky(torch.cov(x.T))
    x = torch.linalg.solve_triangular(white, x.T, upper=False).T  # sample covariance exactly I
    return x @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_is_zero_on_itself_grows_with_a_shift_and_matches_the_gaussian_closed_form():
    scipy = pytest.importorskip("scipy.linalg")
    torch.manual_seed(0)
    d = 6
    a_ = torch.randn(d, d, dtype=torch.float64)
    b_ = torch.randn(d, d, dtype=torch.float64)
    s1, s2 = a_ @ a_.T + 0.1 * torch.eye(d), b_ @ b_.T + 0.1 * torch.eye(d)
    m1, m2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    x, y = _with_moments(500, m1, s1, 1), _with_moments(400, m2, s2, 2)
    root = scipy.sqrtm((s1 @ s2).numpy())
    closed = float((m1 - m2).square().sum() + torch.trace(s1 + s2) - 2 * np.trace(root).real)
    assert frechet_distance(x, y) == pytest.approx(closed, rel=1e-4)
    assert abs(frechet_distance(x, x)) < 1e-3 * closed
    shifts = [frechet_distance(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([d * s**2 for s in (0.5, 1.0, 2.0)], rel=1e-4)  # |shift|^2, covariance equal


def test_image_grid_places_every_image():
    imgs = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 3, 2)
    grid = image_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 3 + 1) and grid.dtype == np.uint8
    values = [grid[1 + 4 * (i // 2), 1 + 3 * (i % 2)] for i in range(5)]  # top-left pixel of each image, row-major
    assert values == [0, 64, 128, 191, 255]
    assert (grid[9:12, 4:6] == 128).all() and (grid[0] == 128).all()  # the empty slot and the padding


# ---- training through the loop -------------------------------------------------------------------------

TINY_GAN = [
    "task.name=gan",
    "model.name=nest_gen_tiny",
    "model.img_size=16",
    "model.kwargs={latent_dim: 16, embed_dims: [32, 16, 8], num_heads: [2, 1, 1], depths: [1, 1, 1]}",
    "task.disc_width=8",
    "task.sample_every=2",
    "data.dataset=digits",
    "data.root=null",
    "data.train_split=train[:48]",
    "data.val_split=test[:32]",
    "data.batch_size=16",
    "sched.epochs=2",
    "optim.lr=2e-4",
    "optim.weight_decay=0",
    "train.ema_decay=0.9",
    "train.progress=false",
]


def test_gan_training_resumes_bit_identically_and_writes_sample_grids(tmp_path):
    full = Trainer(load_config(None, TINY_GAN + [f"train.output={tmp_path / 'a'}"])).fit()
    assert full["global_step"] == 6 and full["nonfinite_steps"] == 0 and -full["final_neg_fid"] > 0
    Trainer(load_config(None, TINY_GAN + [f"train.output={tmp_path / 'b'}", "train.max_steps=2"])).fit()  # mid-epoch
    resumed = Trainer(load_config(None, TINY_GAN + [f"train.output={tmp_path / 'b'}"]), resume="auto")
    assert resumed.global_step == 2
    resumed.fit()
    for f in ("model.safetensors", "ema.safetensors"):  # G, D and the EMA pair
        a = read_state_dict(tmp_path / "a" / "checkpoints/last" / f)
        b = read_state_dict(tmp_path / "b" / "checkpoints/last" / f)
        assert any(k.startswith("generator.") for k in a) and any(k.startswith("discriminator.") for k in a)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    grids = sorted(p.name for p in (tmp_path / "a" / "samples").glob("*.png"))
    assert grids == [f"step_{s:06d}.png" for s in range(2, 7, 2)]
    # the last grid is the final EMA generator's images from the fixed noise
    kwargs = dict(latent_dim=16, embed_dims=(32, 16, 8), num_heads=(2, 1, 1), depths=(1, 1, 1))  # TINY_GAN's
    gen = vitkit.create_model("nest_gen_tiny", in_chans=1, img_size=16, **kwargs).eval()
    ema = read_state_dict(tmp_path / "a" / "checkpoints/last/ema.safetensors")
    gen.load_state_dict({k.removeprefix("generator."): v for k, v in ema.items() if k.startswith("generator.")})
    with torch.no_grad():
        expect = image_grid(gen(gen.sample_latent(64, torch.Generator().manual_seed(0))))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "samples" / "step_000006.png")), expect)


def test_gan_phases_step_only_their_own_parameters(tmp_path):
    from vitkit.train.step import TrainStep

    trainer = Trainer(load_config(None, TINY_GAN + [f"train.output={tmp_path / 'r'}"]))
    step = trainer.step
    assert list(step.optimizers) == ["discriminator", "generator"]
    pair = trainer.model
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    # the discriminator phase alone: the generator is untouched
    only_d = TrainStep(pair, trainer.task, {"discriminator": step.optimizers["discriminator"]}, trainer.cfg.train,
                       trainer.cfg.optim, torch.device("cpu"))  # fmt: skip
    r = only_d([(x, torch.zeros(8))], 1e-3, (0, 0, 0))
    assert r.skipped is None and set(r.terms) == {"d_real", "d_fake"}
    after = pair.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("generator."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("discriminator."))
    assert all(p.requires_grad for p in pair.parameters())  # the frozen phase is thawed again
    r = step([(x, torch.zeros(8))], 1e-3, (0, 0, 1))
    assert set(r.terms) == {"d_real", "d_fake", "g"} and r.stepped


@pytest.mark.slow
@pytest.mark.skipif(
    not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason=f"real MNIST digits not found at {MNIST}"
)
def test_gan_learns_real_digits(tmp_path):
    """Both generators, 200 steps on real MNIST digits: the pixel Frechet distance to held-out digits falls far
    below the untrained generator's."""
    for name in ("dcgan_gen_tiny", "nest_gen_tiny"):
        sets = [f"model.name={name}", f"data.root={MNIST}", "data.train_split=test[:3200]",
                "data.val_split=test[9500:]", "sched.epochs=2", "train.max_steps=200",
                f"train.output={tmp_path / name}", "train.progress=false", "task.sample_every=0"]  # fmt: skip
        cfg = load_config(Path(__file__).parents[1] / "configs" / "gan_nest_mnist.yaml", sets)
        trainer = Trainer(cfg)
        start = trainer._eval_models()["model"]["fid"]  # the untrained generator, as the loop evaluates it
        s = trainer.fit()
        assert -s["final_neg_fid"] < 0.5 * start, (name, start, -s["final_neg_fid"])
