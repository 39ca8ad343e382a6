"""HaloNet family: the paper's parameter column, timm's counts, any input size, linear cost in pixels."""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import small_model
from vitkit.bench import count_macs, count_params


def _meta(name, **kw):
    with torch.device("meta"):
        return vitkit.create_model(name, **kw)


@pytest.mark.parametrize(
    "name,params",
    [  # the paper's parameter column (ARCHITECTURES.md §2.2): within 1%
        ("halonet_h0", 5.5e6),
        ("halonet_h1", 8.1e6),
        ("halonet_h2", 9.4e6),
        ("halonet_h3", 11.8e6),
        ("halonet_h4", 19.1e6),
        ("halonet_h5", 30.7e6),
        ("halonet_h6", 43.4e6),
        ("halonet_h7", 67.4e6),
    ],
)
def test_paper_family_params(name, params):
    assert abs(count_params(_meta(name)) - params) / params < 0.01


@pytest.mark.parametrize(
    "name,params,gmacs",
    [  # timm counts at 256 px (§2.3; [computed] = timm-bench)
        ("halonet26t", 12.48e6, 3.17),
        ("halonet50ts", 22.73e6, 5.27),
        ("eca_halonext26ts", 10.76e6, 2.42),
        ("sehalonet33ts", 13.69e6, 3.53),  # SE in bottlenecks only: 13,691,712
        ("halonet_h1", 8.10e6, 2.99),
    ],
)
def test_timm_variants_params_and_macs(name, params, gmacs):
    model = _meta(name)
    assert abs(count_params(model) - params) / params < 0.001
    assert round(count_macs(model) / 1e9, 2) == pytest.approx(gmacs, abs=0.011)


def test_paper_h_configs():
    m = _meta("halonet_h5")
    blk = m.stages[2][0]
    assert len(m.stages[2]) == 23
    assert blk.self_attn.block_size == 14 and blk.self_attn.halo_size == 2
    assert blk.self_attn.dim_out_v == int(2.5 * blk.self_attn.dim_out_qk)  # rv = 2.5
    assert m.num_features == 1536
    assert vitkit.resolve_data_config(m)["input_size"] == (3, 448, 448)


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (72, 88), (100, 100)])
def test_any_input_size(size):
    model = small_model("halonet26t").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        _, maps = model.forward_intermediates(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert [m.shape[1] for m in maps] == [256, 512, 1024, 2048]


def test_too_small_input_is_an_error():
    model = small_model("halonet_h0")
    with pytest.raises(ValueError, match="halonet_h0: input sides must be at least 32 pixels"):
        model(torch.randn(1, 3, 16, 64))


def test_attention_cost_grows_linearly_with_pixels():
    m256, m512 = _meta("halonet_h1"), _meta("halonet_h1")
    r = count_macs(m512, (3, 512, 512)) / count_macs(m256, (3, 256, 256))
    assert 3.9 < r < 4.1  # 4x the pixels, ~4x the MACs (global attention would grow ~16x in attention terms)


def test_timm_hybrids_put_channel_attention_in_bottlenecks_only():
    se, eca = _meta("sehalonet33ts"), _meta("eca_halonext26ts")
    for model, kind in ((se, "SEModule"), (eca, "EcaModule")):
        for stage in model.stages:
            for blk in stage:
                has = type(blk.attn).__name__ == kind
                assert has == (type(blk).__name__ == "BottleneckBlock"), (kind, type(blk).__name__)


def test_se_variant_adds_squeeze_excitation():
    plain, se = _meta("halo_resnet50"), _meta("halo_seresnet50")
    assert count_params(se) > count_params(plain)
    assert any("attn.fc1" in n for n, _ in se.named_parameters())
