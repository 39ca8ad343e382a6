"""The Task interface is enough for a new task: a toy regression task written only as a Task subclass trains,
evaluates, resumes exactly and predicts through ``vitkit train/eval/predict`` with no edit to the loop. Plus task
selection and validation (model vs dataset vs task), task options, and the config as the run's truth."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit.cli import main as cli
from vitkit.config import load_config, value_range
from vitkit.data.datasets import DATASETS, Digits, build_dataset
from vitkit.data.loader import Failed
from vitkit.data.transforms import EvalTransform, place_on_canvas
from vitkit.models._checkpoint import read_state_dict
from vitkit.runtime import all_reduce_sum
from vitkit.tasks import Task, build_task
from vitkit.train import Trainer

TOY = "test_tasks:MeanPixelTask"
TINY = [
    "model.kwargs={patch_size: 2, num_levels: 2, embed_dims: [32, 32], num_heads: [2, 2], depths: [1, 1]}",
    "data.train_split=train[:192]",
    "data.val_split=test[:96]",
    "data.batch_size=16",
    "train.progress=false",
    "optim.lr=3e-3",
    "sched.warmup_epochs=0.2",
]


class MeanPixelTask(Task):
    """Regress the mean brightness of a digit drawn at a random scale and place on a blank canvas (0-1 over the
    canvas the model sees). A layer-normalised transformer cannot read brightness itself, but it can count ink
    tokens, and the scale makes that count vary 10x. The model predicts ``(brightness - offset) * scale``."""

    name = "mean_pixel"
    score = "r2"
    score_label = "R^2"
    metrics = ("r2", "mae", "mse")
    datasets = DATASETS
    model_tasks = ("classification",)

    @dataclass(frozen=True)
    class Options:
        min_side: float = field(default=0.33, metadata=value_range(0, 1, lo_open=True))
        scale: float = field(default=10.0, metadata=value_range(0, lo_open=True))
        offset: float = 0.1

    def dataset(self, split, download=False):
        return build_dataset(self.cfg.data.dataset, self.cfg.data.root, split)

    def resolve(self, dataset):
        super().resolve(dataset)
        self.cfg.model.num_classes = 1

    def train_transform(self, dc):
        tf = EvalTransform.from_data_config(dc)

        def sample(img, target, rng, size):
            h, w = size or dc["input_size"][1:]
            if rng is None:  # prediction: the image as given
                canvas = img.convert("L").resize((w, h), Image.BICUBIC)
            else:
                side = int(rng.integers(round(h * self.options.min_side), h + 1))
                canvas, _ = place_on_canvas(img.convert("L").resize((side, side), Image.BICUBIC), (h, w), rng)
            brightness = float(np.asarray(canvas, np.float32).mean() / 255)
            return tf(canvas), (brightness - self.options.offset) * self.options.scale

        return sample

    eval_transform = train_transform  # held-out canvases drawn with the view's (seed 0, index) generators

    @staticmethod
    def collate(samples):
        good = [s for s in samples if not isinstance(s, Failed)]
        bad = [s for s in samples if isinstance(s, Failed)]
        if not good:
            return None, None, bad
        return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), bad

    def losses(self, model, inputs, targets):
        return {"mse": F.mse_loss(model(inputs).squeeze(1).float(), targets)}

    @torch.no_grad()
    def evaluate(self, model, batches, ctx):
        sums = torch.zeros(5, dtype=torch.float64)
        for x, y, _ in batches:
            if x is not None:
                y = y.double() / self.options.scale
                err = model(x).squeeze(1).double() / self.options.scale - y
                n = torch.tensor(float(len(y)), dtype=torch.float64)
                sums += torch.stack([err.abs().sum(), (err**2).sum(), y.sum(), (y**2).sum(), n])
        abs_sum, sq_sum, y_sum, y2_sum, n = all_reduce_sum(sums, ctx.dist).tolist()
        var = y2_sum / n - (y_sum / n) ** 2
        return {"r2": 1 - sq_sum / n / var, "mae": abs_sum / n, "mse": sq_sum / n, "images": int(n)}

    def predict_batch(self, model, inputs, metas):
        o = self.options
        return [{"mean": v / o.scale + o.offset} for v in model(inputs).squeeze(1).tolist()]


def test_a_new_task_trains_evaluates_resumes_and_predicts_through_the_cli(tmp_path, capsys):
    sets = TINY + [f"task.name={TOY}", "task.min_side=0.4", "sched.epochs=3", "model.drop_path_rate=0.1"]
    args = ["train"] + [a for s in sets for a in ("--set", s)]
    assert cli(args + ["--output", str(tmp_path / "full")]) == 0
    # the same run stopped in epoch 2 (12 steps each) and resumed ends with the same weights, bit for bit
    assert cli(args + ["--output", str(tmp_path / "cut"), "--set", "train.max_steps=17"]) == 0
    assert cli(args + ["--output", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    a = read_state_dict(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = read_state_dict(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluation through the task: it learned (R^2 > 0: better than always predicting the mean)
    capsys.readouterr()
    run = tmp_path / "full"
    (run / "run.json").unlink()  # config.yaml alone rebuilds the model: run.json is never read back
    assert cli(["eval", str(run), "--which", "last"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert res["images"] == 96 and res["r2"] > 0.5, res
    assert "r2 " in capsys.readouterr().out
    test = Digits("test")
    # prediction through the task, on image files
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        test[i][0].resize((16, 16)).save(imgs / f"{i}.png")
    assert cli(["predict", str(run), str(imgs), "--json", "--out", str(tmp_path / "pred")]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [Path(p["image"]).name for p in preds] == ["0.png", "1.png", "2.png"]
    assert all(0.0 < p["mean"] < 1.0 for p in preds)
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == preds


def test_task_options_and_selection_are_validated(tmp_path):
    def task_for(*sets):
        return build_task(load_config(None, TINY + list(sets)))

    assert task_for().name == "classification"  # the model's own task
    assert task_for(f"task.name={TOY}", "task.scale=5").options.scale == 5.0
    with pytest.raises(ValueError, match="unknown key task.nope for task 'mean_pixel'; its options: min_side, scale"):
        task_for(f"task.name={TOY}", "task.nope=1")
    with pytest.raises(ValueError, match=r"task.min_side must be \(0, 1\]"):
        task_for(f"task.name={TOY}", "task.min_side=0")
    with pytest.raises(ValueError, match="task.scale expects float"):
        task_for(f"task.name={TOY}", "task.scale=wide")
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        task_for("task.name=detect")
    with pytest.raises(ValueError, match="could not be imported"):
        task_for("task.name=no_such_module:Task")


class BoxesTask(Task):
    name = "toy_boxes"
    datasets = ("toy_coco",)


def test_a_model_and_a_dataset_of_another_task_are_an_error_naming_both(monkeypatch):
    from vitkit import tasks

    monkeypatch.setitem(tasks.TASKS, "toy_boxes", BoxesTask)
    with pytest.raises(ValueError, match=r"dataset 'toy_coco' is a toy_boxes dataset, but model 'nest_tiny_cifar'"):
        build_task(load_config(None, TINY + ["data.dataset=toy_coco"]))
    with pytest.raises(ValueError, match=r"model 'nest_tiny_cifar' is a classification model, but the run's task"):
        build_task(load_config(None, TINY + ["task.name=toy_boxes", "data.dataset=toy_coco"]))


def test_overrides_are_order_independent_and_range_checked():
    a = load_config(None, ["model.kwargs.depth=2", "model.name=vit_small_patch16_224", "model.img_size=32"])
    b = load_config(None, ["model.img_size=32", "model.name=vit_small_patch16_224", "model.kwargs.depth=2"])
    assert a.to_dict() == b.to_dict() and a.model.kwargs == {"depth": 2} and a.model.img_size == 32
    assert load_config(None, ["model.img_size=32"]).model.kwargs["num_levels"] == 2  # the embedded run's model
    for bad, msg in [
        ("optim.lr=-1", r"optim.lr must be > 0, got -1.0"),
        ("model.num_classes=-1", r"model.num_classes must be >= 1"),
        ("data.batch_size=0", r"data.batch_size must be >= 1"),
        ("train.ema_decay=1.0", r"train.ema_decay must be \[0, 1\)"),
        ("aug.hflip=1.5", r"aug.hflip must be \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_config(None, [bad])


def test_in_chans_comes_from_the_dataset_or_the_config_and_must_agree(tmp_path):
    t = Trainer(load_config(None, TINY + [f"train.output={tmp_path / 'a'}", "train.max_steps=1"]))
    assert t.cfg.model.in_chans == 1 and t.model.in_chans == 1  # digits are grey: declared by the dataset
    assert t.cfg.model.num_classes == 10 and t.cfg.data.classes == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match=r"model.in_chans=3, but dataset 'digits' holds 1-channel images"):
        Trainer(load_config(None, TINY + [f"train.output={tmp_path / 'b'}", "model.in_chans=3"]))
    with pytest.raises(ValueError, match=r"model.num_classes=5, but dataset 'digits' has 10 classes"):
        Trainer(load_config(None, TINY + [f"train.output={tmp_path / 'c'}", "model.num_classes=5"]))
