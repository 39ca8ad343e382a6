"""Masked patch prediction (ViT paper, appendix B.1.2) and the few-shot linear probe: the corruption's proportions
and what each corrupted embedding holds, the 3-bit mean-colour targets, a loss over the corrupted patches only, the
closed-form probe against a least-squares solver, fine-tuning from a self-supervised run, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit.cli import main as cli
from vitkit.config import load_config
from vitkit.models._checkpoint import read_state_dict
from vitkit.models.vit import masked_patch_backbone
from vitkit.tasks import build_task
from vitkit.tasks.classification.linear_probe import BIAS_CONSTANT, few_shot_indices, fit_least_squares
from vitkit.tasks.masked_patch import (
    MaskedPatchViT,
    corrupt_embeddings,
    draw_corruption,
    masked_patch_loss,
    mean_colour_classes,
)
from vitkit.tasks.masked_patch.model import KEPT, MASKED, RANDOM, UNTOUCHED
from vitkit.train import Trainer

ARCH = ["model.name=vit_tiny_patch16_224", "model.img_size=16",
        "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"]  # fmt: skip
TINY = ARCH + ["data.train_split=train[:200]", "data.val_split=test[:60]", "data.batch_size=16",
               "train.progress=false", "train.max_steps=2"]  # fmt: skip
SSL = TINY + ["task.name=masked_patch"]


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
    """Two optimizer steps of masked patch prediction on the bundled digits, through ``vitkit train``."""
    run = tmp_path_factory.mktemp("ssl") / "run"
    assert cli(["train", *_sets(SSL), "--output", str(run)]) == 0
    return run


def _tiny_vit(**kw) -> MaskedPatchViT:
    torch.manual_seed(0)
    vit = vitkit.create_model("vit_tiny_patch16_224", img_size=16, in_chans=1, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, num_classes=0, **kw)  # fmt: skip
    return MaskedPatchViT(vit, 8)


# ---- the corruption -----------------------------------------------------------------------------------------------


def test_corruption_proportions_over_many_draws():
    """Exactly half of each image's patches (round(0.5 N)) are corrupted, uniformly over positions; of those, the
    counts of [mask] / random / keep are Binomial(M, 0.8 / 0.1 / 0.1) over M corrupted patches. The bounds are 5
    standard deviations (a fair draw fails one with probability < 1e-6): with M = 50,000, +-447 for mask (0.9% of
    its 40,000), +-335 for random and keep (6.7% of 5,000)."""
    b, n = 2000, 49
    mode, source = draw_corruption(b, n, np.random.default_rng(0))
    corrupted = mode != UNTOUCHED
    assert (corrupted.sum(1) == 25).all()  # round(24.5) = 25: half, rounded half up
    m = int(corrupted.sum())
    for kind, p in ((MASKED, 0.8), (RANDOM, 0.1), (KEPT, 0.1)):
        count = int((mode == kind).sum())
        assert abs(count - p * m) <= 5 * math.sqrt(m * p * (1 - p)), (kind, count, p * m)
    # every position is corrupted with probability 25/49: Binomial(2000, 25/49) per position
    per_position = corrupted.sum(0).double()
    q = 25 / n
    assert (per_position - b * q).abs().max() <= 5 * math.sqrt(b * q * (1 - q))
    # a random replacement comes from another patch of the image, any other one; elsewhere the source is the patch
    own = torch.arange(n).expand(b, n)
    rnd = mode == RANDOM
    assert (source[rnd] != own[rnd]).all() and (source[~rnd] == own[~rnd]).all()
    assert set(source[rnd].tolist()) == set(range(n))
    # other fractions round the same way, and a draw is a function of the generator alone
    assert ((draw_corruption(3, 4, np.random.default_rng(1))[0] != UNTOUCHED).sum(1) == 2).all()
    again = draw_corruption(b, n, np.random.default_rng(0))
    assert torch.equal(again[0], mode) and torch.equal(again[1], source)


def test_corrupted_embeddings_are_the_mask_the_original_or_another_patch_of_the_same_image():
    """Through the model's own embedding path: [mask] positions hold the learned mask embedding, kept and untouched
    positions their own patch embedding, random ones the embedding of another patch of the same image, bit for bit;
    the position embedding is added after the corruption, so a replaced patch keeps its position."""
    model = _tiny_vit()
    vit = model.backbone
    x = torch.randn(64, 1, 16, 16)
    mode, source = draw_corruption(64, 16, np.random.default_rng(3))
    with torch.no_grad():
        patches = vit.patch_embed(x)  # (B, N, C): what the corruption acts on
        pos = vit.pos_embed[:, 1:]
        got = model.backbone._embed(x, lambda t: corrupt_embeddings(t, mode, source, model.mpp.mask_token))[0][
            :, 1:
        ]  # after + pos_embed
    for b in range(64):
        for i in range(16):
            if mode[b, i] == MASKED:
                want = model.mpp.mask_token
            elif mode[b, i] == RANDOM:
                j = int(source[b, i])
                assert j != i
                want = patches[b, j]
                # it is a patch of this image, and of no other image
                assert not any(torch.equal(patches[c, j], want) for c in range(64) if c != b)
            else:
                want = patches[b, i]
            assert torch.equal(got[b, i], want + pos[0, i]), (b, i, int(mode[b, i]))
    assert {MASKED, RANDOM, KEPT, UNTOUCHED} <= set(mode.flatten().tolist())


# ---- targets and loss ---------------------------------------------------------------------------------------------


def _rgb_example() -> tuple[np.ndarray, list[int]]:
    """An 8x8 RGB image of four 4x4 patches and their classes worked out by hand: per channel the mean in [0, 1],
    level floor(8 * mean) capped at 7, class = 64 R + 8 G + B."""
    img = np.zeros((8, 8, 3), np.uint8)
    # patch 0 (top left): R 1.0 -> 8 -> capped 7; G half 255, half 0 = exactly 0.5 -> 4; B 31/255 = 0.122 -> 0.97 -> 0
    img[:4, :4, 0], img[:2, :4, 1], img[:4, :4, 2] = 255, 255, 31
    # patch 1 (top right): R 0 -> 0; G 96/255 = 0.376 -> 3.01 -> 3; B half 200, half 100: 150/255 = 0.588 -> 4.7 -> 4
    img[:4, 4:, 1], img[:4, 4:6, 2], img[:4, 6:, 2] = 96, 200, 100
    # patch 2 (bottom left): black -> 0.  patch 3 (bottom right): R 128/255 = 0.502 -> 4.02 -> 4; G 0; B 1.0 -> 7
    img[4:, 4:, 0], img[4:, 4:, 2] = 128, 255
    return img, [7 * 64 + 4 * 8 + 0, 3 * 8 + 4, 0, 4 * 64 + 7]  # [480, 28, 0, 263]


def test_mean_colour_targets_match_a_hand_computed_example():
    img, want = _rgb_example()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    assert mean_colour_classes(x, (4, 4)).tolist() == [want]
    # grey: 8 classes. 3/4 of the pixels white: exactly 0.75 -> 6; 31 -> 0; 224/255 = 0.878 -> 7.03 -> 7;
    # 32/255 -> 1.004 -> 1
    grey = np.zeros((8, 8), np.uint8)
    grey[:3, :4], grey[:4, 4:], grey[4:, :4], grey[4:, 4:] = 255, 31, 224, 32
    assert mean_colour_classes(torch.from_numpy(grey)[None, None].float() / 255, (4, 4)).tolist() == [[6, 0, 7, 1]]
    # the task's eval transform computes them from the pixels before normalising, and normalises as configured
    cfg = load_config(None, ["task.name=masked_patch", "model.name=vit_tiny_patch16_224"])
    task = build_task(cfg)
    dc = {"input_size": (3, 8, 8), "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5], "crop_pct": 1.0,
          "interpolation": "bicubic", "patch_size": (4, 4)}  # fmt: skip
    x, target = task.eval_transform(dc)(Image.fromarray(img), 3)
    assert target.tolist() == want
    raw = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(
        x, (raw - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor([0.2, 0.25, 0.5])[:, None, None]
    )


def test_the_loss_is_over_the_corrupted_patches_only():
    mode, _ = draw_corruption(8, 16, np.random.default_rng(0))
    colours = torch.randint(0, 512, (8, 16))
    logits = torch.randn(8, 16, 512, requires_grad=True)
    loss = masked_patch_loss(logits, colours, mode)
    hit = mode != UNTOUCHED
    # the mean cross-entropy of the corrupted patches, computed patch by patch
    by_hand = torch.stack([F.cross_entropy(logits[b, i][None], colours[b, i][None]) for b, i in hit.nonzero()])
    torch.testing.assert_close(loss, by_hand.mean())
    loss.backward()
    assert (logits.grad[~hit] == 0).all() and (logits.grad[hit].abs().sum(-1) > 0).all()
    # what the model says about an untouched patch does not matter
    other = logits.detach().clone()
    other[~hit] = torch.randn(int((~hit).sum()), 512) * 10
    assert masked_patch_loss(other, colours, mode).item() == loss.item()
    # the task's loss runs the model on the corrupted input and scores it so
    task = build_task(load_config(None, SSL))
    model = _tiny_vit()
    t = task.prepare(torch.randn(8, 1, 16, 16), torch.randint(0, 8, (8, 16)), np.random.default_rng(1))[1]
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        want = masked_patch_loss(model(x, t["mode"], t["source"]), t["colour"], t["mode"])
        assert task.losses(model, x, t)["mpp"].item() == want.item()


# ---- the linear probe ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(40, 12), (10, 32)])  # more images than dimensions, and fewer
def test_the_closed_form_probe_is_the_least_squares_solution(n, d):
    """W minimises |Z W - T|^2 + l2 |W|^2: the solution of the stacked system [Z; sqrt(l2) I] W = [T; 0] that
    torch.linalg.lstsq finds, with Z the whitened features and a bias column of 100, T in {-1, +1}."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1, torch.arange(n) % 5
    for l2 in (1e-3, 1.0, 2.0**10):
        probe = fit_least_squares(x, y, 5, l2)
        xn = x.numpy()
        z = (xn - xn.mean(0)) / (xn.std(0) + 1e-5)  # whitened independently, in NumPy
        z = torch.from_numpy(np.hstack([z, np.full((n, 1), BIAS_CONSTANT)]))
        t = torch.where(F.one_hot(y, 5).bool(), 1.0, -1.0).double()
        stacked = torch.cat([z, math.sqrt(l2) * torch.eye(d + 1, dtype=torch.float64)])
        want = torch.linalg.lstsq(stacked, torch.cat([t, torch.zeros(d + 1, 5, dtype=torch.float64)])).solution
        torch.testing.assert_close(probe.weight, want, rtol=1e-7, atol=1e-9)


def test_the_probe_separates_a_linearly_separable_set():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=g) * 10
    labels = torch.arange(400) % 4
    x = centres[labels] + torch.randn(400, 16, generator=g)
    train = few_shot_indices(labels.numpy(), 4, [1, 5], seed=0)
    assert sorted(labels[train[5]].tolist()) == sorted([0, 1, 2, 3] * 5) and set(train[1]) <= set(train[5])
    for k, idx in train.items():
        probe = fit_least_squares(x[idx], labels[idx], 4)
        test = np.setdiff1d(np.arange(400), idx)
        assert (probe.predict(x[test]) == labels[test]).all(), k


# ---- fine-tuning from a self-supervised run, and the CLI ----------------------------------------------------------


def test_a_ssl_run_folder_initialises_a_classifier_backbone_bitwise_with_a_fresh_head(ssl_run):
    saved = read_state_dict(ssl_run)  # the run's best weights
    assert any(k.startswith("mpp.") for k in saved) and all(k.startswith(("backbone.", "mpp.")) for k in saved)
    cfg = load_config(None, TINY + [f"model.checkpoint={ssl_run}"])  # the path `vitkit train` takes
    task = build_task(cfg)
    task.resolve(task.dataset(cfg.data.train_split))
    torch.manual_seed(5)
    tuned = task.build_model()
    own = tuned.state_dict()
    backbone = {k[len("backbone.") :]: v for k, v in saved.items() if k.startswith("backbone.")}
    assert set(own) == set(backbone) | {"head.weight", "head.bias"}
    assert all(torch.equal(own[k], v) for k, v in backbone.items())
    task.cfg.model.checkpoint = None
    torch.manual_seed(5)
    fresh = task.build_model()  # the same seed without the checkpoint: the head the classifier starts from
    assert tuned.head.out_features == 10 and torch.equal(tuned.head.weight, fresh.head.weight)
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
    # anything beside the two prefixes is refused, naming it
    with pytest.raises(ValueError, match=r"keys outside backbone\.\* \(extra.weight\)"):
        masked_patch_backbone(dict(saved, **{"extra.weight": torch.zeros(1)}), "vit_tiny_patch16_224")


def test_train_resumes_exactly_and_eval_runs_the_linear_probe(ssl_run, tmp_path, capsys):
    cfg = (ssl_run / "config.yaml").read_text()
    assert "name: masked_patch" in cfg and "num_classes: 8" in cfg  # 8 ** 1 grey colours, resolved
    capsys.readouterr()
    assert cli(["eval", str(ssl_run), "--linear-probe", "1", "5", "--probe-seeds", "2"]) == 0
    out = capsys.readouterr().out
    res = json.loads((ssl_run / "eval" / "linear_probe.json").read_text())
    assert set(res["shots"]) == {"1", "5"} and res["eval_images"] == 60 and res["classes"] == 10
    assert res["shot_images"] <= 2 * 50 and len(res["shots"]["5"]["per_seed"]) == 2
    assert all(0 <= r["accuracy"] <= 1 for r in res["shots"].values()) and "5-shot" in out
    assert cli(["eval", str(ssl_run)]) == 0  # the task's own metrics: colour accuracy of the corrupted patches
    ev = json.loads((ssl_run / "eval" / "eval.json").read_text())
    assert ev["corrupted_patches"] == 60 * 8 and 0 <= ev["colour_acc"] <= 1
    # fine-tuning from the run through `vitkit train`, and the probe of a classification run
    tuned = tmp_path / "tuned"
    assert cli(["train", *_sets(TINY + [f"model.checkpoint={ssl_run}"]), "--output", str(tuned)]) == 0
    assert cli(["eval", str(tuned), "--linear-probe", "2", "--probe-seeds", "1"]) == 0
    res = json.loads((tuned / "eval" / "linear_probe.json").read_text())
    assert res["feature_dim"] == 32 and res["shot_images"] == 20 and res["shots"]["2"]["per_seed"]
    # the corruption comes from the loop's keyed generator: 2 + 2 steps resumed end where 4 steps end, bit for bit
    four = _sets(SSL + ["train.max_steps=4", "sched.epochs=1"])
    assert cli(["train", *four, "--output", str(tmp_path / "full")]) == 0
    assert cli(["train", *_sets(SSL + ["sched.epochs=1"]), "--output", str(tmp_path / "cut")]) == 0
    assert cli(["train", *four, "--output", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    a, b = (read_state_dict(tmp_path / r / "checkpoints" / "last" / "model.safetensors") for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_task_checks_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="task masked_patch trains ViTs .* got model 'nest_tiny_cifar'"):
        build_task(load_config(None, ["task.name=masked_patch"]))
    with pytest.raises(ValueError, match=r"aug.mixup=0.8 do not apply to masked_patch"):
        build_task(load_config(None, SSL + ["aug.mixup=0.8"]))
    with pytest.raises(ValueError, match=r"model.num_classes=10, but masked_patch predicts 8 \*\* in_chans = 8"):
        Trainer(load_config(None, SSL + ["model.num_classes=10", f"train.output={tmp_path / 'r'}"]))
