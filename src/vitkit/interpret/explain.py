"""``vitkit explain``: one image (or a model's weights) in, PNG figures and the raw ``.npy`` arrays out.

Methods: ``attention`` (the last layer's attention of one query pixel, painted on the image), ``rollout``
(ViT), ``cam`` (exact CAM where the head is GAP + linear, Grad-CAM otherwise), ``gradcat`` (NesT),
``distance`` (mean attention distance per layer and head; ViT tokens exactly, other families through the
image-coordinate maps), ``posembed`` (ViT position-embedding similarity and patch-filter principal
components), ``similarity`` (attention cosine similarity between layers, per head: of rows, and of columns as
DeepViT defines it, with the layer from which adjacent layers stay 0.9 alike marked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.interpret.attention import (
    attention_rollout,
    capture_attention,
    mean_attention_distance,
    pos_embed_similarity,
)
from vitkit.interpret.cam import CamResult, class_activation_map, grad_cam, gradcat, patch_embed_pca
from vitkit.interpret.geometry import attention_to_image, mean_attention_distance_image
from vitkit.interpret.similarity import attention_similarity_matrix, saturation_layer

METHODS = ("attention", "rollout", "cam", "gradcat", "distance", "posembed", "similarity")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show_image(ax, x: torch.Tensor) -> None:
    img = x.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    arr = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()
    ax.imshow(arr, cmap="gray" if img.shape[0] == 1 else None)
    ax.axis("off")


def _vit_grid(model: nn.Module, x: torch.Tensor) -> tuple[tuple[int, int], int]:
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "blocks"):
        raise ValueError(f"{type(model).__name__}: this method reads ViT tokens (a ViT with patch_embed and blocks)")
    p = pe.patch_size[0]
    return (x.shape[-2] // p, x.shape[-1] // p), p


def rollout_map(model: nn.Module, x: torch.Tensor, records: list) -> torch.Tensor:
    """Attention rollout of a ViT's first token over its patch grid, ``(gh, gw)``, from the ``records`` of one
    image ``x`` (``(1, C, H, W)``) captured by :func:`vitkit.interpret.capture_attention`."""
    grid, _ = _vit_grid(model, x)
    roll = attention_rollout([r.probs for r in records])[0, 0, model.num_prefix_tokens :]
    return roll.reshape(grid)


def attention_distances(model: nn.Module, x: torch.Tensor, records: list) -> torch.Tensor:
    """Mean attention distance in pixels per layer and head, ``(layers, heads)`` (NaN where a layer has fewer
    heads): ViT tokens exactly (token centres), every other family through the image-coordinate maps."""
    try:
        grid, p = _vit_grid(model, x)
    except ValueError:  # not ViT tokens: every other family, through the image-coordinate maps
        dist = [mean_attention_distance_image(model, r, tuple(x.shape[-2:])) for r in records]
    else:  # ViT tokens: exact, token centres
        dist = [mean_attention_distance(r.probs, grid, p, model.num_prefix_tokens) for r in records]
    heads = max(len(d) for d in dist)
    return torch.stack([F.pad(d.float(), (0, heads - len(d)), value=float("nan")) for d in dist])


def cam_map(model: nn.Module, x: torch.Tensor, target=None) -> tuple[CamResult, str]:
    """Exact CAM where the head is global average pooling + linear, Grad-CAM otherwise; and which one ran."""
    try:
        return class_activation_map(model, x, target), "CAM"
    except ValueError:
        return grad_cam(model, x, target), "Grad-CAM"


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    out_dir: str | Path,
    target=None,
    query: tuple[int, int] | None = None,
) -> dict[str, Path]:
    """Run ``method`` on ``x`` (``(1, C, H, W)``, preprocessed) and write figures and arrays to ``out_dir``.

    ``attention`` paints the last attention layer's attention of the token holding pixel ``query`` (default:
    the image centre) onto the image, per head (:func:`vitkit.interpret.attention_to_image`), and saves every
    layer's raw probabilities.
    """
    if method not in METHODS:
        raise ValueError(f"explain: method must be one of {METHODS}, got {method!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    plt = _plt()
    written: dict[str, Path] = {}

    def save(name: str, arr) -> None:
        path = out / f"{method}_{name}.npy"
        np.save(path, np.asarray(arr.detach().cpu().float() if torch.is_tensor(arr) else arr))
        written[name] = path

    fig = None
    if method in ("attention", "rollout", "distance", "similarity"):
        with torch.no_grad(), capture_attention(model) as records:
            model(x)
        for i, r in enumerate(records):
            save(f"layer{i:02d}_{r.layer.replace('.', '_')}", r.probs)
        if method == "attention":
            size = tuple(x.shape[-2:])
            q = query or (size[0] // 2, size[1] // 2)
            heat = attention_to_image(model, records[-1], size, q)[0]  # (heads, H, W)
            save("image_map", heat)
            heads = heat[:8]
            fig, axes = plt.subplots(1, len(heads) + 1, figsize=(2.4 * (len(heads) + 1), 2.6))
            _show_image(axes[0], x[0])
            axes[0].plot(q[1], q[0], "r+", ms=12)
            axes[0].set_title(f"query {q}", fontsize=7)
            for i, (ax, m) in enumerate(zip(axes[1:], heads)):
                _show_image(ax, x[0])
                ax.imshow(m.cpu().numpy(), cmap="jet", alpha=0.55)
                ax.plot(q[1], q[0], "w+", ms=10)
                ax.set_title(f"{records[-1].layer} h{i}", fontsize=6)
        elif method == "similarity":
            sim = attention_similarity_matrix([r.probs for r in records])  # (heads, L, L)
            save("matrix", sim)
            column = attention_similarity_matrix([r.probs for r in records], axis="column")  # DeepViT's definition
            save("matrix_column", column)
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
            im = axes[0].imshow(sim.nanmean(0).numpy(), vmin=0, vmax=1, cmap="viridis")
            axes[0].set_xlabel("layer")
            axes[0].set_ylabel("layer")
            axes[0].set_title("attention cosine similarity (mean over heads)", fontsize=8)
            fig.colorbar(im, ax=axes[0], fraction=0.046)
            steps = torch.arange(1, sim.shape[1])
            for h in range(sim.shape[0]):
                axes[1].plot(steps.numpy(), sim[h, steps - 1, steps].numpy(), marker=".", lw=1, label=f"head {h}")
            adjacent = column.nanmean(0)[steps - 1, steps]
            axes[1].plot(steps.numpy(), adjacent.numpy(), "k--", lw=1.5, label="columns (DeepViT), mean")
            sat = saturation_layer(adjacent, 0.9)
            if sat is not None:  # from this layer on, every layer's columns are >= 0.9 alike its predecessor's
                axes[1].axvline(int(steps[sat]), color="k", ls=":", lw=1)
            axes[1].set_xlabel("layer l")
            axes[1].set_ylabel("similarity to layer l-1")
            low = min(0.0, float(sim.nan_to_num(1).min()), float(adjacent.nan_to_num(1).min()))
            axes[1].set_ylim(low, 1.02)
            if sim.shape[0] <= 12:
                axes[1].legend(fontsize=6)
        elif method == "rollout":
            heat = rollout_map(model, x, records)
            save("map", heat)
            fig, axes = plt.subplots(1, 2, figsize=(6, 3))
            _show_image(axes[0], x[0])
            _show_image(axes[1], x[0])
            axes[1].imshow(_upsample(heat, x.shape[-2:]), cmap="jet", alpha=0.5)
        else:
            dist = attention_distances(model, x, records)
            save("pixels", dist)  # (layers, heads)
            fig, ax = plt.subplots(figsize=(5, 4))
            for layer, d in enumerate(dist):
                ax.scatter([layer + 1] * len(d), d.cpu().numpy(), s=12)
            ax.set_xlabel("layer")
            ax.set_ylabel("mean attention distance (pixels)")
    elif method == "cam":
        res, kind = cam_map(model, x, target)
        save("map", res.maps[0])
        fig, axes = plt.subplots(1, 2, figsize=(6, 3))
        _show_image(axes[0], x[0])
        _show_image(axes[1], x[0])
        axes[1].imshow(res.maps[0].cpu().numpy(), cmap="jet", alpha=0.5)
        axes[1].plot(int(res.peaks[0, 1]), int(res.peaks[0, 0]), "w+", ms=12)
        axes[1].set_title(f"{kind}, class {int(res.target[0])}", fontsize=8)
    elif method == "gradcat":
        res = gradcat(model, x, target)
        for lv, s in enumerate(res.scores):
            save(f"level{lv}_scores", s[0])
        save("boxes", np.array(res.boxes[0]))
        fig, axes = plt.subplots(1, 2, figsize=(6, 3))
        _show_image(axes[0], x[0])
        _show_image(axes[1], x[0])
        for i, (y0, x0, y1, x1) in enumerate(res.boxes[0]):
            axes[1].add_patch(
                plt.Rectangle(
                    (x0 - 0.5, y0 - 0.5),
                    x1 - x0,
                    y1 - y0,
                    fill=False,
                    lw=2 - i * 0.4,
                    edgecolor=plt.cm.autumn(i / max(1, len(res.boxes[0]) - 1)),
                )
            )
        axes[1].plot(int(res.peaks[0, 1]), int(res.peaks[0, 0]), "c+", ms=12)
        axes[1].set_title(f"GradCAT, class {int(res.target[0])}", fontsize=8)
    else:  # posembed
        grid, _ = _vit_grid(model, x)
        sim = pos_embed_similarity(model.pos_embed.detach(), model.patch_embed.grid_size, model.num_prefix_tokens)
        pcs = patch_embed_pca(model)
        save("similarity", sim)
        save("patch_pca", pcs)
        gh, gw = sim.shape[:2]
        fig, axes = plt.subplots(gh, gw, figsize=(gw * 0.6 + 1, gh * 0.6 + 1))
        for i in range(gh):
            for j in range(gw):
                ax = axes[i][j] if gh > 1 else axes[j]
                ax.imshow(sim[i, j].cpu().numpy(), vmin=-1, vmax=1, cmap="viridis")
                ax.axis("off")
        fig.suptitle("position-embedding cosine similarity")
        _save(_pca_figure(pcs, plt), out / "posembed_pca.png", plt)
        written["pca_figure"] = out / "posembed_pca.png"
    if fig is not None:
        _save(fig, out / f"{method}.png", plt)
        written["figure"] = out / f"{method}.png"
    return written


def _upsample(m: torch.Tensor, size) -> np.ndarray:
    return torch.nn.functional.interpolate(m[None, None].float(), size=tuple(size), mode="bilinear")[0, 0].cpu().numpy()


def _pca_figure(pcs: torch.Tensor, plt):
    k = len(pcs)
    cols = min(7, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            pc = pcs[i]
            pc = (pc - pc.min()) / (pc.max() - pc.min()).clamp_min(1e-8)
            arr = (pc[0] if pc.shape[0] == 1 else pc.permute(1, 2, 0)).numpy()
            ax.imshow(arr, cmap="gray" if pc.shape[0] == 1 else None)
    fig.suptitle("patch-embedding filters: principal components")
    return fig


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
