"""Detectors: RetinaNet + FPN on any backbone (LaViT's detection setting) and SSDLite on MobileViT (the paper's).

The contract (torchvision-style): ``model(images, targets)`` in training mode returns a dict of losses;
``model(images)`` in eval mode returns one ``{"boxes" (N, 4) xyxy in input pixels, "scores", "labels"}`` per
image, after a score threshold and class-wise NMS. ``model.forward_raw(images)`` gives the raw head outputs
``(class logits (B, A, K'), box deltas (B, A, 4))`` over all anchors: that part exports (ONNX, torch.export);
:meth:`Detector.postprocess` (decode + NMS) is the documented step that follows it.

**RetinaNet** (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002), as in
mmdetection's ``retinanet_*_fpn`` configs that LaViT/PVT use: FPN P3-P5 from the backbone's strides 8/16/32 plus
P6 (3x3 stride-2 conv on C5) and P7 (on ReLU(P6)), 256 channels; class and box towers of four 3x3 conv + ReLU,
shared across levels; 9 anchors per location (sizes ``anchor_scale * stride * 2^{0,1/3,2/3}``, aspect ratios
1:2, 1:1, 2:1), centred on each cell (ours: mmdetection puts them on the cell corner); an anchor is positive at
IoU >= 0.5 with a box, negative below 0.4, and every box's best anchors are positive too; sigmoid focal loss
(alpha 0.25, gamma 2) and L1 on the deltas (or GIoU on the decoded boxes), both over the number of positives;
prior-probability bias init (pi = 0.01). Inference: per level the top 1000 scores above 0.05, class-wise NMS at
IoU 0.5, 100 detections.

**SSDLite** as ml-cvnets builds it for MobileViT (``cvnets/models/detection/ssd.py``, ``modules/ssd_heads.py``,
``anchor_generator/ssd_anchor_generator.py``, ``loss_fn/detection/ssd_multibox_loss.py``): the backbone's stride-16
and stride-32 maps, three extra separable stride-2 layers (dw 3x3 + BN, pw 1x1 + BN + ReLU; 256, 128, 128
channels) and a global 1x1 (average pool, 1x1 conv to 64 + ReLU); per level a 1x1 projection (+BN+ReLU) to
``proj_channels`` where the width differs, then a separable predictor (dw 3x3 + BN, pw 1x1 with bias) or, on the
1x1 level, a 1x1 conv, giving ``A * (4 + C)`` per location with C = classes + background; anchors ``2 + 2 *
len(ratios)`` per cell with scales ``linspace(0.1, 1.05, 7)`` of the input (min s_i, max sqrt(s_i s_{i+1})) and
ratios {2, 3} ({2} on the last level); matching at IoU 0.5 with every box forcing its best anchor; centre/size
variances 0.1/0.2; smooth-L1 + cross-entropy with 3:1 hard-negative mining over the number of positives;
inference: softmax, per class scores above 0.05 (cvnets v0.1's threshold; HEAD uses 0.01), top 400, class-wise
NMS 0.5, 200 detections. Both detectors cap the candidates entering NMS at the 1,000 best over all classes and
levels (ours: it bounds the cost of an untrained model's thousands of low scores). Deviations from cvnets: none
in the layers; ``num_classes`` counts the object classes (80 for COCO) and the background column is
added inside, so the 81-way head of the paper is ``num_classes=80``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.fpn import FPN
from vitkit.models._builder import create_model
from vitkit.models._pyramid import PyramidBackbone
from vitkit.models._registry import default_cfg, get_model_entry, register_model
from vitkit.tasks.detection.boxes import BoxCoder, batched_nms, box_iou, clip_boxes, generalized_box_iou


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, pos: float, neg: float) -> torch.Tensor:
    """Per anchor: the index of its box (>= 0), -1 background or -2 ignored. Positive at IoU >= ``pos``,
    background below ``neg``; every box's best anchors (all that tie, IoU > 0) are positive for it."""
    match = torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    if len(boxes) == 0:
        return match
    iou = box_iou(anchors, boxes)  # (A, G)
    best, idx = iou.max(1)
    match[best >= pos] = idx[best >= pos]
    match[(best >= neg) & (best < pos)] = -2
    per_box = iou.max(0).values
    a, g = torch.nonzero((iou == per_box[None]) & (per_box[None] > 0), as_tuple=True)
    match[a] = g
    return match


class Detector(nn.Module):
    """Shared detector plumbing: the train/eval forward around ``heads`` (raw outputs and the level map sizes),
    anchors cached per level sizes, decode + NMS in :meth:`postprocess`."""

    num_classes: int
    in_chans: int = 3

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """``(class logits (B, A, K'), box deltas (B, A, 4), [(h, w) per level])``."""
        raise NotImplementedError

    def make_anchors(self, shapes: list[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exportable part: class logits and box deltas over all anchors, before decoding and NMS."""
        cls, reg, _ = self.heads(x)
        return cls, reg

    def anchors(self, shapes: list[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
        """(A, 4) xyxy anchors in input pixels, in the order of the raw outputs."""
        key = (tuple(map(tuple, shapes)), tuple(size))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = self.make_anchors(shapes, size)
        return self._anchor_cache[key]

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None):
        cls, reg, shapes = self.heads(x)
        size = tuple(x.shape[-2:])
        anchors = self.anchors(shapes, size).to(reg)
        if self.training:
            if targets is None:
                raise ValueError(f"{type(self).__name__}: training mode needs targets (a list of box/label dicts)")
            return self.loss(cls, reg, anchors, targets)
        return self.postprocess(cls, reg, anchors, size, shapes)

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError


# ---- RetinaNet ----------------------------------------------------------------------------------------


def grid_anchors(shapes, strides, sizes_per_level, ratios) -> torch.Tensor:
    """(sum_l H_l * W_l * A, 4) anchors, level by level, row-major cells, anchors innermost (ratio-major)."""
    out = []
    for (h, w), s, sizes in zip(shapes, strides, sizes_per_level):
        base = torch.tensor(
            [
                [-sz / math.sqrt(r) / 2, -sz * math.sqrt(r) / 2, sz / math.sqrt(r) / 2, sz * math.sqrt(r) / 2]
                for r in ratios
                for sz in sizes
            ]  # fmt: skip
        )
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * s, (torch.arange(w) + 0.5) * s, indexing="ij")
        centres = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
        out.append((centres + base[None]).reshape(-1, 4))
    return torch.cat(out)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Summed focal loss (Lin et al. 2017) of sigmoid ``logits`` against 0/1 ``targets``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * ce * (1 - p_t) ** gamma).sum()


class RetinaNet(Detector):
    strides = (8, 16, 32, 64, 128)
    ratios = (0.5, 1.0, 2.0)

    def __init__(
        self,
        backbone: str = "lavit_tiny",
        num_classes: int = 80,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 512,
        drop_path_rate: float = 0.0,
        fpn_channels: int = 256,
        num_convs: int = 4,
        anchor_scale: float = 4.0,
        box_loss: str = "l1",
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        if box_loss not in ("l1", "smooth_l1", "giou"):
            raise ValueError(f"RetinaNet: box_loss must be 'l1', 'smooth_l1' or 'giou', got {box_loss!r}")
        kw = dict(backbone_kwargs or {}, in_chans=in_chans, drop_path_rate=drop_path_rate)
        kw["img_size"] = img_size  # the backbone is built for the detector's input size (fixed-size ViT, LaViT)
        self.backbone = PyramidBackbone(backbone, (8, 16, 32), **kw)
        self.fpn = FPN(self.backbone.channels, fpn_channels, extra_levels=2)
        self.sizes = [[anchor_scale * s * 2 ** (k / 3) for k in range(3)] for s in self.strides]
        self.num_anchors = len(self.ratios) * 3

        def tower():
            return nn.Sequential(*[m for _ in range(num_convs) for m in (nn.Conv2d(fpn_channels, fpn_channels, 3,
                                                                                   padding=1), nn.ReLU())])  # fmt: skip

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_out = nn.Conv2d(fpn_channels, self.num_anchors * num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(fpn_channels, self.num_anchors * 4, 3, padding=1)
        for m in [*self.cls_tower, *self.box_tower, self.cls_out, self.box_out]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        self.num_classes, self.in_chans, self.box_loss = num_classes, in_chans, box_loss
        self.score_thresh, self.nms_thresh, self.max_detections = score_thresh, nms_thresh, max_detections
        self.coder = BoxCoder()
        self._anchor_cache: dict = {}

    def reset_classifier(self, num_classes: int) -> None:
        c = self.cls_out
        self.cls_out = nn.Conv2d(c.in_channels, self.num_anchors * num_classes, 3, padding=1)
        nn.init.normal_(self.cls_out.weight, std=0.01)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))
        self.num_classes = num_classes

    def heads(self, x: torch.Tensor):
        feats = self.fpn(self.backbone(x))
        B, K = x.shape[0], self.num_classes
        # (B, A*K, H, W) per level -> (B, H*W*A, K), levels concatenated (the anchors' order)
        cls = [self.cls_out(self.cls_tower(f)).permute(0, 2, 3, 1).reshape(B, -1, K) for f in feats]
        reg = [self.box_out(self.box_tower(f)).permute(0, 2, 3, 1).reshape(B, -1, 4) for f in feats]
        return torch.cat(cls, 1), torch.cat(reg, 1), [tuple(f.shape[-2:]) for f in feats]

    def make_anchors(self, shapes, size) -> torch.Tensor:
        return grid_anchors(shapes, self.strides, self.sizes, self.ratios)

    def loss(self, cls, reg, anchors, targets) -> dict[str, torch.Tensor]:
        cls_loss, box_loss, num_pos = cls.new_zeros(()), reg.new_zeros(()), 0
        for c, r, t in zip(cls, reg, targets):
            boxes, labels = t["boxes"].to(r), t["labels"].to(r.device)
            match = match_anchors(anchors, boxes, 0.5, 0.4).to(r.device)
            pos, valid = match >= 0, match != -2
            onehot = torch.zeros_like(c)
            onehot[pos, labels[match[pos]]] = 1.0
            cls_loss = cls_loss + sigmoid_focal_loss(c[valid].float(), onehot[valid])
            if pos.any():
                gt = boxes[match[pos]]
                if self.box_loss == "giou":
                    pred = self.coder.decode(r[pos].float(), anchors[pos])
                    box_loss = box_loss + (1 - generalized_box_iou(pred, gt).diagonal()).sum()
                else:
                    delta = self.coder.encode(gt, anchors[pos])
                    fn = F.l1_loss if self.box_loss == "l1" else lambda a, b, reduction: F.smooth_l1_loss(
                        a, b, beta=1 / 9, reduction=reduction)  # fmt: skip
                    box_loss = box_loss + fn(r[pos].float(), delta, reduction="sum")
            num_pos += int(pos.sum())
        n = max(num_pos, 1)
        return {"cls": cls_loss / n, "box": box_loss / n}

    @torch.no_grad()
    def postprocess(self, cls, reg, anchors, size, shapes) -> list[dict]:
        """Per level the top 1000 scores above ``score_thresh``, decoded and clipped; class-wise NMS; the top
        ``max_detections``. ``shapes``: the level map sizes (from :meth:`heads`)."""
        out = []
        per_level = [h * w * self.num_anchors for h, w in shapes]
        for c, r in zip(cls.float(), reg.float()):
            boxes, scores, labels, start = [], [], [], 0
            for n in per_level:
                s = c[start : start + n].sigmoid().flatten()
                keep = (s > self.score_thresh).nonzero().squeeze(1)
                top = s[keep].topk(min(1000, len(keep))).indices
                idx = keep[top]
                a_idx, k = idx // self.num_classes + start, idx % self.num_classes
                boxes.append(self.coder.decode(r[a_idx], anchors[a_idx]))
                scores.append(s[idx])
                labels.append(k)
                start += n
            out.append(_nms_top(torch.cat(boxes), torch.cat(scores), torch.cat(labels), size, self.nms_thresh,
                                self.max_detections))  # fmt: skip
        return out


PRE_NMS_TOP = 1000  # candidates over all classes and levels that enter NMS (ours: bounds an untrained model's cost)


def _nms_top(boxes, scores, labels, size, iou: float, top: int) -> dict:
    if len(scores) > PRE_NMS_TOP:
        best = scores.topk(PRE_NMS_TOP).indices
        boxes, scores, labels = boxes[best], scores[best], labels[best]
    boxes = clip_boxes(boxes, size)
    keep = batched_nms(boxes, scores, labels, iou)[:top]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


# ---- SSDLite ------------------------------------------------------------------------------------------


def separable(cin: int, cout: int, stride: int = 1, norm_act: bool = True) -> nn.Sequential:
    """cvnets' SeparableConv2d: depthwise 3x3 + BN (no activation), then pointwise 1x1 (+ BN + ReLU, or a bias)."""
    layers = [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
              nn.Conv2d(cin, cout, 1, bias=not norm_act)]  # fmt: skip
    if norm_act:
        layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SSDLite(Detector):
    def __init__(
        self,
        backbone: str = "mobilevit_s",
        num_classes: int = 80,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 320,
        drop_path_rate: float = 0.0,
        extra_channels: tuple[int, int, int] = (256, 128, 128),
        global_channels: int = 64,
        proj_channels: tuple[int, ...] = (512, 256, 256, 128, 128, 64),
        ratios: tuple[tuple[int, ...], ...] = ((2, 3),) * 5 + ((2,),),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        max_detections: int = 200,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        kw = dict(backbone_kwargs or {}, in_chans=in_chans, drop_path_rate=drop_path_rate)
        kw["img_size"] = img_size  # the backbone is built for the detector's input size (fixed-size ViT, LaViT)
        with torch.device("meta"):
            info = list(create_model(backbone, **kw).feature_info)
        take = [max(i for i, f in enumerate(info) if f["reduction"] == s) for s in (16, 32)]
        self.backbone = create_model(backbone, features_only=True, out_indices=take, **kw)
        chs = [info[i]["num_chs"] for i in take]
        extra = []
        for c in extra_channels:
            extra.append(separable(chs[-1], c, stride=2))
            chs.append(c)
        self.extra = nn.ModuleList(extra)
        self.global_conv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(chs[-1], global_channels, 1, bias=False),
                                         nn.ReLU(inplace=True))  # fmt: skip
        chs.append(global_channels)
        self.ratios = ratios
        self.anchors_per_cell = [2 + 2 * len(set(r)) for r in ratios]
        C = num_classes + 1  # background at index 0
        proj, heads = [], []
        for i, (cin, p, a) in enumerate(zip(chs, proj_channels, self.anchors_per_cell)):
            last = i == len(chs) - 1
            proj.append(nn.Sequential(nn.Conv2d(cin, p, 1, bias=False), nn.BatchNorm2d(p), nn.ReLU(inplace=True))
                        if p != cin and not last else nn.Identity())  # fmt: skip
            width = cin if last or p == cin else p
            heads.append(nn.Conv2d(width, a * (4 + C), 1) if last else separable(width, a * (4 + C), norm_act=False))
        self.proj, self.predictors = nn.ModuleList(proj), nn.ModuleList(heads)
        for m in [*self.extra.modules(), *self.global_conv.modules(), *self.proj.modules(), *self.predictors.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        s = [0.1 + (1.05 - 0.1) * i / len(chs) for i in range(len(chs) + 1)]  # linspace(0.1, 1.05, levels + 1)
        self.scales = [(s[i], math.sqrt(s[i] * s[i + 1])) for i in range(len(chs))]
        self.num_classes, self.in_chans = num_classes, in_chans
        self.score_thresh, self.nms_thresh, self.max_detections = score_thresh, nms_thresh, max_detections
        self.coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
        self._anchor_cache: dict = {}

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError("SSDLite predicts boxes and classes in one layer per level: build a new model")

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = list(self.backbone(x))
        for layer in self.extra:
            maps.append(layer(maps[-1]))
        maps.append(self.global_conv(maps[-1]))
        return maps

    def heads(self, x: torch.Tensor):
        B, C = x.shape[0], self.num_classes + 1
        maps = self._maps(x)
        outs = [head(p(m)).permute(0, 2, 3, 1).reshape(B, -1, 4 + C) for m, p, head in
                zip(maps, self.proj, self.predictors)]  # fmt: skip
        out = torch.cat(outs, 1)  # (B, anchors, [4 box deltas | C class logits])
        return out[..., 4:], out[..., :4], [tuple(m.shape[-2:]) for m in maps]

    def make_anchors(self, shapes, size) -> torch.Tensor:
        """cvnets' SSD anchors on the level maps: normalised (cx, cy, w, h) clamped to [0, 1], returned as xyxy in
        input pixels."""
        out = []
        for (h, w), (lo, hi), ratios in zip(shapes, self.scales, self.ratios):
            cell = [(lo, lo), (hi, hi)]
            for r in sorted(set(ratios)):
                cell += [(lo * math.sqrt(r), lo / math.sqrt(r)), (lo / math.sqrt(r), lo * math.sqrt(r))]
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            wh = torch.tensor(cell)  # (A, 2)
            cxcy = torch.stack([xs, ys], -1).reshape(-1, 1, 2).expand(-1, len(cell), 2)
            out.append(torch.cat([cxcy, wh[None].expand(len(cxcy), -1, -1)], -1).reshape(-1, 4).clamp(0, 1))
        a = torch.cat(out)
        scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
        return torch.cat([a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2], 1) * scale

    def loss(self, cls, reg, anchors, targets) -> dict[str, torch.Tensor]:
        box_loss, cls_loss, num_pos = reg.new_zeros(()), cls.new_zeros(()), 0
        for c, r, t in zip(cls.float(), reg.float(), targets):
            boxes, labels = t["boxes"].to(r), t["labels"].to(r.device)
            match = match_anchors(anchors, boxes, 0.5, 0.5).to(r.device)
            pos = match >= 0
            target_cls = torch.zeros(len(anchors), dtype=torch.long, device=r.device)
            target_cls[pos] = labels[match[pos]] + 1
            if pos.any():
                delta = self.coder.encode(boxes[match[pos]], anchors[pos])
                box_loss = box_loss + F.smooth_l1_loss(r[pos], delta, reduction="sum")
            # hard negative mining: the 3 * positives background anchors with the highest background loss
            with torch.no_grad():
                bg = -F.log_softmax(c, -1)[:, 0]
                bg[pos] = -float("inf")
                k = min(3 * int(pos.sum()), int((~pos).sum()))
                neg = torch.zeros_like(pos)
                neg[bg.topk(k).indices] = True
            chosen = pos | neg
            cls_loss = cls_loss + F.cross_entropy(c[chosen], target_cls[chosen], reduction="sum")
            num_pos += int(pos.sum())
        n = max(num_pos, 1)
        return {"cls": cls_loss / n, "box": box_loss / n}

    @torch.no_grad()
    def postprocess(self, cls, reg, anchors, size, shapes=None) -> list[dict]:
        """Softmax; per class the top 400 scores above ``score_thresh``; class-wise NMS; ``max_detections``."""
        out = []
        for c, r in zip(cls.float(), reg.float()):
            probs = c.softmax(-1)[:, 1:]  # (A, K) without background
            boxes, scores, labels = [], [], []
            for k in range(self.num_classes):
                s = probs[:, k]
                keep = (s > self.score_thresh).nonzero().squeeze(1)
                keep = keep[s[keep].topk(min(400, len(keep))).indices]
                boxes.append(self.coder.decode(r[keep], anchors[keep]))
                scores.append(s[keep])
                labels.append(torch.full((len(keep),), k, dtype=torch.long, device=keep.device))
            out.append(_nms_top(torch.cat(boxes), torch.cat(scores), torch.cat(labels), size, self.nms_thresh,
                                self.max_detections))  # fmt: skip
        return out


# ---- registrations ------------------------------------------------------------------------------------
RETINANET_BACKBONES = ("lavit_tiny", "lavit_small", "halonet26t", "nest_tiny", "mobilevit_s", "vit_small_patch16_224")


def _det_cfg(backbone: str, size: int) -> dict:
    b = get_model_entry(backbone).default_cfg
    return default_cfg(
        task="detection",
        input_size=(3, size, size),
        test_input_size=(3, 128, 128),
        mean=b["mean"],
        std=b["std"],
        interpolation="bilinear",
        crop_pct=1.0,
        first_conv=None,
        classifier=None,
    )


@register_model(family="retinanet", cfg=_det_cfg("lavit_tiny", 512))
def retinanet(backbone: str = "lavit_tiny", **kwargs) -> RetinaNet:
    """RetinaNet on any registered backbone with strides 8/16/32 (a plain ViT through a simple feature pyramid):
    ``create_model("retinanet", backbone="halonet26t", num_classes=20)``. (The data config's mean/std are
    LaViT's; the registered ``retinanet_<backbone>`` names carry their backbone's.)"""
    return RetinaNet(backbone, **kwargs)


def _register(prefix: str, cls, backbone: str, size: int) -> None:
    def builder(**kwargs):
        return cls(backbone, **kwargs)

    builder.__name__ = builder.__qualname__ = f"{prefix}_{backbone.removesuffix('_patch16_224')}"
    builder.__doc__ = f"{cls.__name__} on {backbone}."
    register_model(builder, family=prefix, cfg=_det_cfg(backbone, size))


for _b in RETINANET_BACKBONES:
    _register("retinanet", RetinaNet, _b, 512)
for _b in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s"):
    _register("ssdlite", SSDLite, _b, 320)
