"""The training engine on real data: config validation, schedule, EMA, checkpoints, NaN handling, resume,
run folders, multi-scale batches, extra losses, eval/predict, and every shipped recipe in smoke mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from vitkit.cli import main as cli
from vitkit.config import ScheduleConfig, TrainConfig
from vitkit.data.datasets import Digits, load_image
from vitkit.models._checkpoint import find_checkpoint, read_state_dict
from vitkit.tasks import model_task, task_class
from vitkit.tasks.detection.data import write_mnist_detection
from vitkit.tasks.segmentation.data import write_mnist_segmentation
from vitkit.train import Trainer, TrainingAborted, load_config, load_run
from vitkit.train.optim import ModelEma, lr_at, param_groups
from vitkit.train.rundir import resolve_run_dir
from vitkit.train.state import save_checkpoint

TINY = [
    "model.kwargs={patch_size: 2, num_levels: 2, embed_dims: [32, 32], num_heads: [2, 2], depths: [1, 1]}",
    "data.train_split=train[:512]",
    "data.val_split=test[:128]",
    "data.batch_size=16",
    "train.progress=false",
]


def tiny_cfg(tmp_path: Path, *sets: str) -> TrainConfig:
    return load_config(None, TINY + [f"train.output={tmp_path / 'run'}", *sets])


# ---- config, schedule, optimizer --------------------------------------------------------------------


def test_config_validates_every_key(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "data.resolutions=[32, 64]", "optim.clip_grad=null"])
    assert cfg.optim.lr == 3e-4 and cfg.data.resolutions == [32, 64] and cfg.optim.clip_grad is None
    for bad, msg in [
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("optim.lr=fast", "optim.lr expects float"),
        ("data.batch_size=1.5", "data.batch_size expects int"),
        ("solver.lr=1", "not section.key"),
        ("optim.lr", "section.key=value"),
        ("optim.lr.x=1", "not a mapping"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_config(None, [bad])
    f = tmp_path / "r.yaml"
    f.write_text("optim: {lr: 0.01}\nbogus: {x: 1}\n")
    with pytest.raises(ValueError, match="unknown section 'bogus'"):
        load_config(f)
    f.write_text("optim: {lr: 0.01}\n")
    assert load_config(f, ["optim.lr=0.02"]).optim.lr == 0.02  # --set wins over the file
    # naming another model drops the default run's architecture overrides, unless they are given again
    assert load_config(None, ["model.name=vit_small_patch16_224"]).model.kwargs == {}
    f.write_text("model: {kwargs: {depth: 2}, name: vit_small_patch16_224}\n")
    assert load_config(f).model.kwargs == {"depth": 2}


def test_lr_schedule_shape():
    s = ScheduleConfig(epochs=10, warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [lr_at(i, 100, 10, 1e-3, s) for i in range(101)]
    assert lrs[0] == 1e-6 and lrs[10] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # halfway through the cosine


def test_no_weight_decay_groups_and_ema():
    import vitkit

    m = vitkit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias"} <= nd
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    ema = ModelEma(m, 0.9)
    before = ema.module.head.weight.clone()
    with torch.no_grad():
        m.head.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.module.head.weight, 0.9 * before + 0.1 * m.head.weight)


# ---- checkpoints and run folders --------------------------------------------------------------------


def test_checkpoint_folders_are_replaced_atomically(tmp_path):
    m = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, "last", m, None, {"step": 1})
    save_checkpoint(tmp_path, "last", m, None, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    # a crash between the two renames leaves only the previous complete folder: it is found
    (tmp_path / "last").rename(tmp_path / ".last.old")
    assert find_checkpoint(tmp_path) == tmp_path / ".last.old"
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        save_checkpoint(tmp_path, "best", m, None, {})
    assert not (tmp_path / "best").exists() and not list(tmp_path.glob(".best.tmp*"))


def test_run_folders_are_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [])
    (tmp_path / "runs" / "nest_tiny_cifar-digits").mkdir(parents=True)
    (tmp_path / "runs" / "nest_tiny_cifar-digits" / "config.yaml").write_text("x")
    assert resolve_run_dir(cfg, None)[0] == Path("runs/nest_tiny_cifar-digits-2")
    cfg.set("train.output", "runs/nest_tiny_cifar-digits")
    with pytest.raises(FileExistsError, match="--resume auto"):
        resolve_run_dir(cfg, None)


# ---- real training ----------------------------------------------------------------------------------


def test_training_learns_digits_and_writes_the_run(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, "sched.epochs=8", "sched.warmup_epochs=0.2", "train.log_every=4", "optim.lr=3e-3")
    s = Trainer(cfg).fit()
    run = Path(s["run_dir"])
    assert s["final_top1"] > 0.5 and s["global_step"] == 8 * 32  # 10 classes: chance is 0.1
    for f in ["config.yaml", "run.json", "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", "eval.json"]:
        assert (run / f).is_file(), f
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == list(range(1, 9))
    assert load_config(run / "config.yaml").to_dict() == cfg.to_dict()  # the resolved config reloads
    assert (run / "checkpoints" / "best" / "ema.safetensors").is_file()
    # eval and predict from the run folder
    ema = s["best_weights"] == "ema"
    assert cli(["eval", str(run), "--split", "test[:128]"] + ["--ema"] * ema) == 0
    assert json.loads((run / "eval" / "eval.json").read_text())["top1"] == pytest.approx(s["best_top1"])
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        img, _ = Digits("test")[i]
        img.resize((16, 16)).save(imgs / f"{i}.png")
    (imgs / "broken.png").write_bytes(b"nope")
    capsys.readouterr()
    assert cli(["predict", str(run), str(imgs), "--topk", "2", "--json"]) == 0
    preds = {Path(r["image"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert set(preds) == {"0.png", "1.png", "2.png", "broken.png"} and "error" in preds["broken.png"]
    loaded = load_run(run)
    tf = loaded.task.eval_transform(loaded.data_config)
    for i in range(3):
        top = preds[f"{i}.png"]["top"]
        assert len(top) == 2 and 1 >= top[0]["prob"] >= top[1]["prob"] > 0
        assert [t["class"] for t in top] == [str(t["index"]) for t in top]
        # the model's own ranking of the same file through the eval transform
        with torch.no_grad():
            probs = loaded.model(tf(load_image(imgs / f"{i}.png"), None, None, None)[0][None]).softmax(-1)[0]
        assert [t["index"] for t in top] == probs.topk(2).indices.tolist()
        assert top[0]["prob"] == pytest.approx(probs.max().item(), rel=1e-5)
    # nothing readable: a non-zero exit naming what failed
    assert cli(["predict", str(run), str(imgs / "broken.png")]) == 1
    assert "none of the 1 image(s) could be read" in capsys.readouterr().err


def test_resume_in_process_is_bitwise_identical(tmp_path):
    sets = ["sched.epochs=2", "model.drop_path_rate=0.1", "aug.mixup=0.8", "aug.cutmix=1.0", "aug.randaugment=rand-m9"]
    full = Trainer(load_config(None, TINY + sets + [f"train.output={tmp_path / 'a'}"])).fit()
    part = load_config(None, TINY + sets + [f"train.output={tmp_path / 'b'}", "train.max_steps=21"])
    Trainer(part).fit()  # stops mid-epoch 1 (32 steps per epoch) and saves where it stopped
    cfg = load_config(None, TINY + sets + [f"train.output={tmp_path / 'b'}"])
    resumed = Trainer(cfg, resume="auto")
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (0, 21, 21)
    resumed.fit()
    a = read_state_dict(Path(full["run_dir"]) / "checkpoints/last/model.safetensors")
    b = read_state_dict(tmp_path / "b" / "checkpoints/last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_losses_skip_then_abort(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "sched.epochs=1", "train.max_nonfinite=3"))
    real = trainer.step.losses
    calls = {"n": 0}

    def sometimes_nan(x, t):
        calls["n"] += 1
        terms = real(x, t)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] in (2, 5, 6) else terms

    trainer.step.losses = sometimes_nan
    s = trainer.fit()
    assert s["nonfinite_steps"] == 3 and s["global_step"] == 32 and s["final_top1"] is not None
    # inputs that are all Inf (std 0): every step is non-finite, the run stops, nothing non-finite is saved
    bad = Trainer(tiny_cfg(tmp_path / "bad", "data.std=[0.0]", "train.max_nonfinite=4"))
    with pytest.raises(TrainingAborted, match="4 optimizer steps in a row"):
        bad.fit()
    assert find_checkpoint(bad.ckpt_root) is None


def test_multiscale_sampler_and_extra_losses(tmp_path):
    ms = Trainer(
        tiny_cfg(
            tmp_path / "ms",
            "model.name=mobilevit_xxs",
            "model.kwargs={}",
            "model.img_size=64",
            "data.multiscale=true",
            "data.resolutions=[32, 64]",
            "data.batch_size=8",
            "train.max_steps=3",
            "data.val_split=test[:16]",
        )
    )
    shapes = {(len(b), b[0][2]) for b in ms._plan(0)}
    assert shapes >= {(8, 64)} and any(size == 32 and n == 32 for n, size in shapes)
    assert ms.fit()["global_step"] == 3
    lavit = tiny_cfg(
        tmp_path / "lv",
        "model.name=lavit_tiny",
        "model.kwargs={}",
        "model.img_size=32",
        "train.extra_loss_weights={dp: 1.0}",
        "train.max_steps=1",
    )
    t = Trainer(lavit)
    x = torch.randn(2, 1, 32, 32)
    t.model.train()
    terms = t.step.losses(x, torch.full((2, 10), 0.1))
    assert set(terms) == {"ce", "dp"} and math.isfinite(terms["dp"].item())
    t.cfg.train.extra_loss_weights = {"nope": 1.0}
    with pytest.raises(ValueError, match="extra_loss_weights names"):
        t.step.losses(x, torch.full((2, 10), 0.1))


RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def _smoke_data(cfg: TrainConfig, tmp_path: Path) -> list[str]:
    """Overrides that point a recipe at small offline data of its task: the bundled digits, or canvases of them."""
    task = cfg.task.name or model_task(cfg.model.name)
    if "digits" in task_class(task).datasets:  # classification and masked patch prediction
        return ["data.dataset=digits", "data.root=null", "data.train_split=train[:64]", "data.val_split=test[:16]"]
    ds = Digits("train")
    digits = np.stack([np.asarray(ds[i][0].resize((28, 28))) for i in range(200)])
    writers = {"segmentation": (write_mnist_segmentation, "voc"), "detection": (write_mnist_detection, "coco")}
    write, name = writers[task]
    root = write(digits, ds.labels[:200], tmp_path / task, n_train=8, n_val=4, train_digits=150)
    return [f"data.dataset={name}", f"data.root={root}", "data.train_split=train", "data.val_split=val"]


# the ImageNet-style classification recipes take 9-13 s each: mobilevit stands for them in the default run
SLOW_RECIPES = {"halonet", "lavit", "nest", "vit_deit", "mobilevit"}  # ImageNet-size recipes: the slow run


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_RECIPES else p for p in RECIPES],
    ids=[p.stem for p in RECIPES],
)
def test_recipe_opens_with_its_launch_command_and_runs(recipe, tmp_path):
    head = recipe.read_text().splitlines()[:4]
    assert any(line.startswith("#") and "vitkit train --config configs/" + recipe.name in line for line in head)
    cfg = load_config(recipe)
    # smoke mode on offline data at a small size: the recipe's model, optimizer, augmentation and losses
    size = cfg.model.img_size if cfg.model.img_size and cfg.model.img_size <= 64 else 64
    size = max(size, 96) if (cfg.task.name or model_task(cfg.model.name)) == "detection" else size
    cfg.override(
        _smoke_data(cfg, tmp_path)
        + [
            f"train.output={tmp_path / 'run'}",
            "data.batch_size=4",
            f"model.img_size={size}",
            "data.resolutions=[32, 64]",
            "train.max_steps=2",
            "train.progress=false",
            "data.mean=null",
            "data.std=null",
            "data.num_workers=0",
        ]
    )
    s = Trainer(cfg).fit()
    assert s["global_step"] == 2 and s[f"final_{s['score']}"] is not None


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """Two micro-batches of 8 step exactly like one batch of 16, up to summation order.

    The two runs add the same per-image gradients in another order (other GEMM shapes), so they agree only to
    rounding: about K * 2^-24 of the summed magnitudes for K-term reductions (K <= 16 images x 64 tokens here),
    i.e. < 1e-4 of a tensor's largest update. The check is on each tensor's update ``w - w0`` relative to its
    largest update, with SGD, whose update is linear in the gradient. (With AdamW the first update is
    ``lr * sign(g)``: a gradient that rounds to either side of 0 flips a whole lr-sized step, so a tolerance
    that held on one CPU's kernels failed on another's.) A wrong accumulation (a micro-batch lost, the loss not
    divided by the number of micro-batches) moves the updates by 50-100%.
    """
    common = ["train.max_steps=2", "train.ema_decay=0", "sched.warmup_epochs=0", "optim.name=sgd", "optim.lr=0.05"]
    big = Trainer(tiny_cfg(tmp_path / "big", *common, "data.batch_size=16"))
    w0 = {k: v.clone() for k, v in big.model.state_dict().items()}
    big.fit()
    acc = Trainer(tiny_cfg(tmp_path / "acc", *common, "data.batch_size=8", "optim.accum_steps=2"))
    acc.fit()
    b_sd, a_sd = big.model.state_dict(), acc.model.state_dict()
    for k in w0:
        if not w0[k].is_floating_point():
            continue
        du_big, du_acc = (b_sd[k] - w0[k]).double(), (a_sd[k] - w0[k]).double()
        scale = du_big.abs().max().item()
        assert (du_big - du_acc).abs().max().item() <= 1e-3 * scale + 1e-9, k


def test_channels_last_and_sgd_train(tmp_path):
    s = Trainer(
        tiny_cfg(tmp_path, "train.channels_last=true", "optim.name=sgd", "optim.lr=0.05", "train.max_steps=3")
    ).fit()
    assert s["global_step"] == 3 and s["final_top1"] is not None


def test_too_many_undecodable_images_abort_naming_them(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 200 if cls == "a" else 30).save(tmp_path / "data" / cls / "good.png")
        for i in range(12):
            (tmp_path / "data" / cls / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    cfg = tiny_cfg(
        tmp_path,
        "data.dataset=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.train_split=train",
        "data.val_split=",
        "data.batch_size=4",
        "data.max_bad_images=6",
        "model.kwargs.in_chans=1",
    )
    with pytest.raises(TrainingAborted, match=r"could not be decoded \(last: .*broken"):
        Trainer(cfg).fit()
