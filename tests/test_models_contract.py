"""Registry-wide contract: every registered model honours the same API.

Models up to ``MAX_RUN_PARAMS`` run for real at their small test resolution; larger ones are built on the
meta device and checked for their parameter count and feature_info only (2 CPU cores). Registered names
that build the very same network at the test resolution (``vit_base_patch16_224`` and ``_384``, ``deit_*``
and ``vit_*``, ...) differ only in their default size or data config; the heavy checks run once per
distinct network, named by its first registered name, and the cheap checks run on every name.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import vitkit
from conftest import ESTABLISHED_FAMILIES, HEAVY_DEFAULT, ONE_PER_FAMILY, input_size_for, slow_except, small_model
from vitkit.bench import count_params
from vitkit.models import VitkitModel
from vitkit.tasks import model_task

MAX_RUN_PARAMS = 40e6


def _param_count(name: str) -> int:
    with torch.device("meta"):
        return count_params(vitkit.create_model(name))


def _network_signature(name: str) -> str:
    """The module tree (types, widths, kernels, paddings) at the test resolution."""
    c, h, w = input_size_for(name)
    with torch.device("meta"):
        model = vitkit.create_model(name, img_size=(h, w))
    shapes = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return repr(model) + repr(shapes)


ALL = [n for n in vitkit.list_models() if model_task(n) == "classification"]  # task models: their own tests
LARGE = [n for n in ALL if _param_count(n) > MAX_RUN_PARAMS]
_seen: dict[str, str] = {}
for _n in ALL:
    if _n not in LARGE:
        _seen.setdefault(_network_signature(_n), _n)
RUNNABLE = sorted(_seen.values())
# every established family whole, a newer family by its representative (conftest.ESTABLISHED_FAMILIES)
# the largest HaloNets at the test resolution (their blocks are those of halonet_h0..h2) run in the slow run
SLOW_VARIANTS = {"halonet_h3", "halonet_h4", "halonet_h5", "halo_resnet50", "halo_seresnet50"}
RUNNABLE_DEFAULT = [
    n
    for n in RUNNABLE
    if (vitkit.get_model_entry(n).family in ESTABLISHED_FAMILIES and n not in SLOW_VARIANTS) or n in ONE_PER_FAMILY
]


def _input(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, *input_size_for(name))


@pytest.mark.parametrize("name", slow_except(RUNNABLE, RUNNABLE_DEFAULT))
def test_forward_backward(name):
    model = small_model(name, num_classes=7).train()
    x = _input(name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"{name}: parameters without a finite gradient: {no_grad[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", slow_except(RUNNABLE, RUNNABLE_DEFAULT))
def test_head_contract(name):
    model = small_model(name).eval()
    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model.forward_head(feats), model(x))
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("name", slow_except(RUNNABLE, RUNNABLE_DEFAULT))
def test_intermediates_match_feature_info(name):
    model = small_model(name).eval()
    x = _input(name)
    c, h, w = input_size_for(name)
    n = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=n)
        assert torch.equal(final, model.forward_features(x))
    assert len(inter) == n
    for f, t in zip(model.feature_info, inter):
        assert t.shape == (2, f["num_chs"], h // f["reduction"], w // f["reduction"]), (f, t.shape)


@pytest.mark.parametrize("name", slow_except(RUNNABLE, RUNNABLE_DEFAULT))
def test_features_only(name):
    c, h, w = input_size_for(name)
    full = small_model(name).eval()
    torch.manual_seed(0)
    backbone = vitkit.create_model(name, img_size=(h, w), features_only=True, out_indices=(0, -1)).eval()
    backbone.load_state_dict(full.state_dict(), strict=False)
    x = _input(name)
    with torch.no_grad():
        maps = backbone(x)
        _, ref = full.forward_intermediates(x, indices=[0, len(full.feature_info) - 1])
    assert len(maps) == len(backbone.feature_info) == 2
    for f, m, r in zip(backbone.feature_info, maps, ref):
        assert m.shape == (2, f["num_chs"], h // f["reduction"], w // f["reduction"])
        torch.testing.assert_close(m, r)
    # features_only keeps no unused parameters: all of them get a gradient
    sum(m.sum() for m in backbone(x)).backward()
    assert all(p.grad is not None for p in backbone.parameters())


@pytest.mark.parametrize("name", slow_except(RUNNABLE, HEAVY_DEFAULT))  # the generic writer: one model a family
def test_safetensors_round_trip(name, tmp_path):
    model = small_model(name).eval()
    path = vitkit.save_state_dict(model, tmp_path / "m.safetensors")
    c, h, w = input_size_for(name)
    torch.manual_seed(123)  # different init, so equality below means the weights were loaded
    loaded = vitkit.create_model(name, img_size=(h, w), checkpoint_path=path).eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("name", slow_except(RUNNABLE, HEAVY_DEFAULT))  # float64 forwards: one model a family
def test_batch_independence(name):
    # float64: deep random-init networks (e.g. halonet_h5) amplify fp32 rounding differences between the batch-1
    # and batch-3 kernels far beyond any tolerance; in float64 a leak across the batch would still show
    model = small_model(name).eval().double()
    x = _input(name, batch=3).double()
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    torch.testing.assert_close(single, full[1:2], rtol=1e-7, atol=1e-7 * float(full.abs().max()))


@pytest.mark.parametrize("name", slow_except(RUNNABLE, HEAVY_DEFAULT))  # ~3.5 s a model: the rest in the slow run
def test_torch_export(name):
    model = small_model(name).eval()
    x = _input(name)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_contract_attributes(name):
    with torch.device("meta"):
        model = vitkit.create_model(name)
    assert model.model_name == name
    assert isinstance(model.num_features, int) and model.num_features > 0
    assert len(model.feature_info) > 0
    for f in model.feature_info:
        assert set(f) >= {"num_chs", "reduction", "module"}
        assert model.get_submodule(f["module"]) is not None
    assert set(vitkit.resolve_data_config(model)) == {"input_size", "mean", "std", "interpolation", "crop_pct"}
    assert model.data_config == vitkit.resolve_data_config(model)
    assert all(n in dict(model.named_parameters()) for n in model.no_weight_decay())
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing


# task models too: img_size means the same for them. Classification models are built on meta (free); task models
# are built for real, so one per kind runs by default and the rest in the slow run
TASK_MODELS_FAST = {"retinanet_lavit_tiny", "ssdlite_mobilevit_xxs", "semfpn_lavit_tiny", "deeplabv3_mobilevit_xxs"}


@pytest.mark.parametrize("name", slow_except(vitkit.list_models(), set(ALL) | TASK_MODELS_FAST))
def test_img_size_is_the_data_config_input_size(name):
    c, h, w = input_size_for(name)
    # task models are built for real (some compute anchors or buffers from their modules when built)
    device = "meta" if name in ALL else "cpu"
    for given, hw in ((h, (h, h)), ((h, 2 * w), (h, 2 * w)), ([2 * h, w], (2 * h, w))):
        with torch.device(device):
            model = vitkit.create_model(name, img_size=given)
        assert model.pretrained_cfg["input_size"][1:] == hw, (given, model.pretrained_cfg["input_size"])
        assert vitkit.resolve_data_config(model)["input_size"][1:] == hw
        if isinstance(model, VitkitModel):
            assert model.img_size == hw


def _unfit_img_size(name: str) -> tuple[int, str]:
    """A size the model cannot take, and the rule its build-time error has to state."""
    with torch.device("meta"):
        model = vitkit.create_model(name)
    family = vitkit.get_model_entry(name).family
    if family in ("halonet", "mobilevit"):  # any size from a minimum; nothing is sized by img_size
        return model.min_input_size - 1, f"at least {model.min_input_size} pixels, got"
    if family in ("vit", "vit_hybrid", "deepvit"):  # the position embedding has one entry per patch
        m = model.patch_embed.reduction[0]
    elif family in ("nest", "lavit", "pvt", "swin"):  # block sizes / attention maps follow every stage's grid
        m = model.input_multiple
    elif family == "axial":  # Axial-ViT: the patch grid; Axial-ResNet: the relative tables of every stage
        m = model.input_multiple
    else:
        pytest.fail(f"{name}: no img_size rule for family {family!r} in this test; add one")
    return 2 * m + m // 2, f" = {m}, got"


@pytest.mark.parametrize("name", ALL)
def test_img_size_that_cannot_apply_is_refused_at_build_time(name):
    size, rule = _unfit_img_size(name)
    for given in (size, (size, size)):
        with torch.device("meta"), pytest.raises(ValueError) as e:
            vitkit.create_model(name, img_size=given)
        assert str(e.value).startswith(f"{name}: img_size={given!r}: each side must be "), str(e.value)
        assert rule in str(e.value) and str(e.value).endswith(f"got {size}x{size}"), str(e.value)


def test_img_size_errors_name_the_patch_and_the_kwargs_that_size_the_model():
    with pytest.raises(ValueError, match=r"^vit_tiny_patch16_224: img_size=230: .* multiple of the patch size = 16"):
        vitkit.create_model("vit_tiny_patch16_224", img_size=230)
    with pytest.raises(ValueError, match=r"^vit_base_r50_s16_224: img_size=\(224, 200\): .* = 16, got 224x200"):
        vitkit.create_model("vit_base_r50_s16_224", img_size=(224, 200))
    with pytest.raises(ValueError, match=r"^mobilevit_xxs: img_size=16: each side must be at least 32 pixels"):
        vitkit.create_model("mobilevit_xxs", img_size=16)
    with pytest.raises(ValueError, match=r"^halonet26t: img_size must be an int or \(height, width\), got '64'"):
        vitkit.create_model("halonet26t", img_size="64")
    # the multiple follows the architecture arguments given with it (configs/mnist_vit.yaml: 28 px, 7 px patches)
    with torch.device("meta"):
        model = vitkit.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7)
    assert vitkit.resolve_data_config(model)["input_size"] == (3, 28, 28) and model.patch_embed.grid_size == (4, 4)


@pytest.mark.parametrize("name", LARGE)
def test_large_models_build_on_meta(name):
    with torch.device("meta"):
        model = vitkit.create_model(name, num_classes=10)
    assert model.get_classifier().out_features == 10
    assert count_params(model) > MAX_RUN_PARAMS


def _train_step_record(model, x) -> tuple[Counter, Counter, list[torch.Tensor]]:
    """Forward calls of every submodule during the forward pass and during the backward pass, and the gradients."""
    calls = {"forward": Counter(), "backward": Counter()}
    phase = "forward"

    def count(name):
        return lambda module, args: calls[phase].update([name])

    hooks = [m.register_forward_pre_hook(count(n)) for n, m in model.named_modules() if n]
    try:
        loss = model(x).square().mean()
        phase = "backward"
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return calls["forward"], calls["backward"], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", slow_except(ONE_PER_FAMILY, HEAVY_DEFAULT))
def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(name):
    """Checkpointed blocks run again in backward (once per forward call), they hold most of the parameters, and
    the gradients are those of the plain step. Without checkpointing no module runs in backward."""
    x = _input(name)
    plain = small_model(name, num_classes=7).train()
    fwd, bwd, g_plain = _train_step_record(plain, x)
    assert not bwd
    model = small_model(name, num_classes=7).train()
    model.set_grad_checkpointing(True)
    fwd_ckpt, bwd, g_ckpt = _train_step_record(model, x)
    assert fwd_ckpt == fwd
    # the checkpointed blocks (the outermost modules that run again) are recomputed once per forward call; inside
    # them torch may stop recomputing after the last operation whose saved tensors backward needs
    outermost = [n for n in bwd if not any(n.startswith(m + ".") for m in bwd)]
    assert outermost and all(bwd[n] == fwd[n] for n in outermost), {n: (bwd[n], fwd[n]) for n in outermost}
    assert all(bwd[n] <= fwd[n] for n in bwd)
    recomputed = sum(p.numel() for n in outermost for p in model.get_submodule(n).parameters())
    total = sum(p.numel() for p in model.parameters())
    assert recomputed > 0.5 * total, (outermost, recomputed / total)
    for a, b in zip(g_plain, g_ckpt):  # the same operations; only the order of summation may differ
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def _memory(name: str, x: torch.Tensor, checkpointing: bool) -> tuple[float, float]:
    """MiB of tensors a forward pass leaves alive for backward (the graph's saved activations), and the peak of
    tensors alive at once over a whole training step; exact accounting, no allocator in the way."""
    from vitkit.bench.speed import _LiveTensors, tensor_peak_mb

    model = small_model(name, num_classes=7).train()
    model.set_grad_checkpointing(checkpointing)
    with _LiveTensors() as mode:
        out = model(x)
        kept = mode.live_bytes() / 2**20
    del out
    step = tensor_peak_mb(lambda: model(x).square().mean().backward())
    return kept, step


@pytest.mark.parametrize("name", slow_except(ONE_PER_FAMILY, HEAVY_DEFAULT))
def test_grad_checkpointing_lowers_peak_activation_memory(name):
    """The activations a forward pass keeps for backward shrink to under a third with checkpointing (exact
    accounting, any CPU: 0.07-0.27 of the plain model's), and the peak of a training step drops. The batch is
    large enough that activations, not the gradients of the weights, set the peak, except in the R+Ti hybrid:
    its ResNet root (a 7x7 conv at stride 2, not a block) holds the largest maps, and their backward is the
    step's peak with or without checkpointing of the blocks after it."""
    x = _input(name, batch=32)
    plain, ckpt = _memory(name, x, False), _memory(name, x, True)
    if name == "vit_tiny_r_s16_p8_224":  # the root's saved maps (0.6 of the total) stay; the blocks' go
        assert ckpt[0] < 0.7 * plain[0] and ckpt[1] <= plain[1], (plain, ckpt)
    else:
        assert ckpt[0] < plain[0] / 3 and ckpt[1] < plain[1], (plain, ckpt)
