"""vitkit bench: MFU against the measured matmul peak, memory measurement, the JSON contract; export per family."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

import vitkit
from conftest import slow_except
from vitkit.bench.speed import (
    bench_model,
    file_model_rows,
    matmul_peak,
    model_rows_parser,
    peak_memory_mb,
    tensor_peak_mb,
    timeit,
)
from vitkit.cli import main as cli
from vitkit.export import ExportError, export_model
from vitkit.machine import cpu_kind, cpu_line, native_bf16

MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_ort = pytest.mark.skipif(bool(MISSING), reason=f"optional export extra not installed (missing {MISSING})")
needs_native_bf16 = pytest.mark.skipif(
    not native_bf16(),
    reason=f"needs a CPU with native bf16 matrix units; this one has none ({cpu_line()}): bf16 is emulated there, "
    "about 100x slower than fp32",
)


def test_timeit_is_a_median_of_real_time():
    import time

    assert 0.009 < timeit(lambda: time.sleep(0.01), warmup=0, repeats=3) < 0.05


def test_matmul_peak_counts_2n3_flop_per_timed_product(monkeypatch):
    """2 n^3 FLOP per product over its median time, warm calls only (a peak that counted n^3, or timed the first
    call, would be off by 2x or more). The clock is replaced, so machine noise cannot decide the test; the real
    measurement is only checked for being a plausible rate."""
    from vitkit.bench import speed

    calls = []

    def fake_timeit(fn, warmup=0, repeats=1, **kw):
        calls.append((warmup, repeats))
        fn()
        return 0.01

    monkeypatch.setattr(speed, "timeit", fake_timeit)
    speed.matmul_peak.cache_clear()  # (matmul_peak caches per machine and size: measure, and leave no fake behind)
    try:
        assert speed.matmul_peak("fp32", n=256) == pytest.approx(2 * 256**3 / 0.01)
        assert calls and all(w >= 1 for w, _ in calls)  # the first (cold) call is never the timed one
    finally:
        speed.matmul_peak.cache_clear()
    monkeypatch.undo()
    real = matmul_peak("fp32", n=256)
    assert 1e8 < real < 1e14 and real != 2 * 256**3 / 0.01  # measured for real: no cached fake


def test_benchmark_records_are_filed_by_cpu_kind_and_kept_row_by_row(tmp_path):
    """A benchmark record goes under this CPU kind, leaving another kind's entry as it was; each row is on disk as
    soon as it is measured, so a run that fails half way keeps its first rows."""
    out = tmp_path / "rec.json"
    other = {"No such CPU [none]": {"models": {"m": {"1": {"ms": 9.0}}}}}  # (never a real kind)
    out.write_text(json.dumps(other))
    calls = []

    def row(name, batch):
        calls.append((name, batch))
        if name == "b" and batch == 8:
            raise RuntimeError("cut short")
        return {"ms": float(batch)}

    args = model_rows_parser("Doc line.\n\nMore.", ["a", "b"], 5, out).parse_args(["--note", "how"])
    assert args.models == ["a", "b"] and args.batches == [1, 8] and args.rounds == 5
    with pytest.raises(RuntimeError, match="cut short"):
        file_model_rows(args.out, args.models, args.batches, row, args.note, {"peak": lambda: 1.5})
    saved = json.loads(out.read_text())
    mine = saved[cpu_kind()]
    assert mine["models"] == {"a": {"1": {"ms": 1.0}, "8": {"ms": 8.0}}, "b": {"1": {"ms": 1.0}}}
    assert mine["note"] == "how" and mine["peak"] == 1.5 and mine["cpu"] == cpu_line()
    assert saved["No such CPU [none]"] == other["No such CPU [none]"]
    assert calls == [("a", 1), ("a", 8), ("b", 1), ("b", 8)]


@pytest.mark.skipif(peak_memory_mb(lambda: None) is None, reason="no /proc/self/clear_refs on this system")
def test_peak_memory_sees_a_known_allocation():
    def alloc():
        x = torch.ones(25 * 2**20)  # 100 MiB
        y = x * 2  # another 100 MiB while x is alive
        return float(y[0])

    mb = peak_memory_mb(alloc)
    assert 190 < mb < 260, mb
    assert peak_memory_mb(lambda: torch.ones(10)) < 20


def test_tensor_peak_counts_live_tensors_exactly():
    before = torch.ones(2**20)  # existed before the call: not counted

    def chain():
        a = torch.ones(2**18)  # 1 MiB
        b = a * 2  # 2 MiB live
        del a
        c = b + before[: 2**18]  # 2 MiB live again (b, c)
        d = c.view(-1, 2)  # a view: no new storage
        return float(d.sum())

    assert tensor_peak_mb(chain) == pytest.approx(2.0, abs=1e-3)  # b and c (plus a 4-byte sum)
    x = torch.randn(64, 64, requires_grad=True)
    # autograd: y = x**3 saves x; backward makes 3 x^2 and the product with the incoming gradient
    peak = tensor_peak_mb(lambda: (x**3).sum().backward())
    assert 0.0 < peak < 0.2, peak  # a few 16 KiB tensors, not the allocator's caches


def test_bench_json_rows_have_the_contract_keys(capsys):
    assert (
        cli(
            [
                "bench",
                "vit_tiny_patch16_224",
                "--img-size",
                "32",
                "64",
                "--batch",
                "2",
                "--repeats",
                "1",
                "--format",
                "json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    keys = {"model", "img_size", "batch", "dtype", "params", "gmacs", "img_per_s", "latency_ms", "peak_mem_mb", "mfu"}
    assert len(rows) == 2 and all(keys <= set(r) for r in rows)
    assert [r["img_size"] for r in rows] == [32, 64] and rows[1]["gmacs"] > rows[0]["gmacs"] > 0
    r = rows[0]
    # mfu is rounded to 4 decimals (a slow or loaded CPU gives ~0.002: the rounding alone is 3% of it)
    assert 0 < r["mfu"] < 1 and r["mfu"] == pytest.approx(
        2 * r["gmacs"] * 1e9 * r["img_per_s"] / (r["peak_gflops"] * 1e9), rel=0.01, abs=5e-5
    )


def test_bench_training_step_is_the_real_train_step(monkeypatch):
    """``--train`` times vitkit.train's own TrainStep (task loss, AdamW, clipping, EMA hooks), not a copy of it."""
    from vitkit.train.step import TrainStep

    calls = []
    real = TrainStep.__call__

    def counted(self, micro_batches, lr, key=(0, 0, 0)):
        calls.append((len(micro_batches), tuple(micro_batches[0][0].shape), type(self.task).__name__))
        out = real(self, micro_batches, lr, key)
        assert out.skipped is None and out.loss > 0  # a real, finite cross-entropy step
        return out

    monkeypatch.setattr(TrainStep, "__call__", counted)
    row = bench_model("vit_tiny_patch16_224", img_size=32, batch=2, repeats=2, train=True, memory=False, layout="nchw")
    assert 0 < row.train_img_per_s < row.img_per_s and len(calls) >= 3  # a step costs more than a forward
    assert set(calls) == {(1, (2, 3, 32, 32), "ClassificationTask")}
    with pytest.raises(ValueError, match="dtype"):
        bench_model("nest_tiny", img_size=32, dtype="fp8")


@needs_native_bf16
def test_bench_bf16_and_training_step():
    row = bench_model("nest_tiny", img_size=32, batch=2, dtype="bf16", repeats=1, train=True, memory=False)
    assert row.bf16_mode in ("autocast", "weights") and row.train_img_per_s > 0 and row.dtype == "bf16"


def test_bf16_on_a_cpu_without_bf16_units_is_reported(monkeypatch, capsys):
    """The machine is read, not assumed: without avx512_bf16/amx_bf16 flags, bf16 work says it is emulated."""
    from vitkit import machine

    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Test CPU", frozenset({"avx2", "fma"})))
    assert not machine.native_bf16() and "no native bf16" in machine.bf16_note()
    assert machine.cpu_info()["flags"] == ["avx2", "fma"] and "Test CPU" in machine.cpu_line()
    assert cli(["bench", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1", "--repeats", "1",
                "--dtype", "bf16", "--layout", "nchw", "--format", "json"]) == 0  # fmt: skip
    assert "no native bf16 matrix units" in capsys.readouterr().err
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Test CPU", frozenset({"avx512f", "amx_bf16"})))
    assert machine.native_bf16() and machine.bf16_note() is None


# one model per family, at a small input: ONNX through onnxruntime at two batch sizes
FAMILIES = {
    "vit_tiny_patch16_224": dict(img_size=32),
    "nest_tiny": dict(img_size=32),
    "mobilevit_xxs": dict(img_size=64),
    "halonet26t": dict(img_size=64),
    "lavit_tiny": dict(img_size=64),
}


@needs_ort
# 14-20 s each on 2 cores: all in the slow run; by default ViT's export is checked against eager by the
# onnxruntime bench test below, detectors' by test_detection
@pytest.mark.parametrize("name", slow_except(FAMILIES, ()))
def test_onnx_export_matches_pytorch_per_family(name, tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model(name, num_classes=7, **FAMILIES[name]).eval()
    try:
        res = export_model(model, tmp_path / f"{name}.onnx", "onnx", dynamic_batch=True, check_batches=(1, 3))
    except ExportError as e:
        pytest.fail(str(e))
    assert set(res["max_abs_diff"]) == {1, 3} and max(res["max_abs_diff"].values()) < 1e-4, res


@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_torch_export_formats(fmt, tmp_path):
    model = vitkit.create_model("nest_tiny", img_size=32, num_classes=5).eval()
    res = export_model(model, tmp_path / f"m.{fmt}", fmt, dynamic_batch=True)
    assert max(res["max_abs_diff"].values()) < 1e-4


def test_export_cli_reports_and_checks(tmp_path, capsys):
    out = tmp_path / "v.pt2"
    assert (
        cli(
            [
                "export",
                "vit_tiny_patch16_224",
                "--format",
                "export",
                "--img-size",
                "32",
                "--dynamic-batch",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file() and "max |exported - eager|" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["mobilevit_xxs", "halonet26t"])
def test_fuse_conv_bn_keeps_outputs_and_removes_batchnorm(name):
    from vitkit.layers import fuse_conv_bn
    from vitkit.layers.conv_bn import ConvNormAct

    torch.manual_seed(0)
    model = vitkit.create_model(name, img_size=64, num_classes=5)
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(model)
    model.eval()
    for m in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        n = fuse_conv_bn(model)
        out = model(x)
    pairs = sum(isinstance(m, ConvNormAct) for m in model.modules())
    assert n == pairs > 0
    assert not any(isinstance(m.bn, torch.nn.BatchNorm2d) for m in model.modules() if isinstance(m, ConvNormAct))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.slow  # TorchScript is a deprecated runtime (torch.jit.trace is deprecated in torch 2.13)
@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=needs_native_bf16)])
def test_bench_torchscript_runtime(dtype):
    row = bench_model("nest_tiny", img_size=32, batch=2, dtype=dtype, repeats=1, runtime="torchscript", memory=False)
    assert row.runtime == "torchscript" and row.img_per_s > 0 and row.latency_ms > 0
    assert row.bf16_mode == ("weights" if dtype == "bf16" else None)
    with pytest.raises(ValueError, match="inference only"):
        bench_model("nest_tiny", img_size=32, batch=2, runtime="torchscript", train=True)
    with pytest.raises(ValueError, match="runtime must be one of"):
        bench_model("nest_tiny", img_size=32, runtime="tvm")


# (OpenVINO's row, 8 s, in the slow run: the edge export tests run OpenVINO by default)
RUNTIME_EXTRA = {"onnxruntime": ("onnxruntime", "export", []), "openvino": ("openvino", "openvino", [pytest.mark.slow])}


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param(
            r, marks=[pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"the {x} extra is absent"), *slow]
        )
        for r, (m, x, slow) in RUNTIME_EXTRA.items()
    ],
)
def test_bench_exported_runtime_checks_the_artefact_against_eager(runtime, monkeypatch):
    """An exported runtime's row is timed only after its output matched eager; a wrong artefact is refused.
    (ExecuTorch takes the same path, ``_bench_exported``; its lowering is too slow for the default run.)"""
    import dataclasses

    import vitkit.export as export
    from vitkit.bench.speed import EXPORTED

    kw = dict(img_size=32, batch=2, repeats=1, runtime=runtime, memory=False, depth=1)
    row = bench_model("vit_tiny_patch16_224", **kw)
    assert row.runtime == runtime and row.img_per_s > 0
    fmt = EXPORTED[runtime][0]
    real = export.REGISTRY[fmt]

    def wrong_weights(model, path, *args, **kwargs):
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.head.weight.neg_()  # (a constant shift would cancel: the pooled features sum to ~0)
        return real.write(broken, path, *args, **kwargs)

    monkeypatch.setitem(export.REGISTRY, fmt, dataclasses.replace(real, write=wrong_weights))
    with pytest.raises(RuntimeError, match=f"the {EXPORTED[runtime][1]} runtime's output differs from eager by"):
        bench_model("vit_tiny_patch16_224", **kw)


def test_interleaved_times_one_call_of_each_route_per_round():
    from vitkit.bench.speed import interleaved

    calls = []
    fns = {name: (lambda x, name=name: calls.append(name)) for name in ("a", "b")}
    ms = interleaved(fns, torch.zeros(1), rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then alternating rounds
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def test_the_compiled_route_benchmarks_helpers():
    """``build_timed`` builds each form once, runs it once on the input (gradients off) and times both together;
    ``interleaved_quartiles`` gives each form's median and 25th percentile (a form twice as slow reads slower at
    both); ``random_case`` gives the same model, batch and calibration batches at each call."""
    import time as _time

    from vitkit.bench import speed

    built = []

    def build(label, delay):
        built.append(label)

        def fn(x):
            assert not torch.is_grad_enabled()
            _time.sleep(delay)
            return x * 2

        return fn

    builds = {"fast": lambda: build("fast", 0.0), "slow": lambda: build("slow", 0.01)}
    forms, outs, seconds = speed.build_timed(builds, torch.ones(2))
    assert built == ["fast", "slow"] and all(torch.equal(o, torch.full((2,), 2.0)) for o in outs.values())
    assert set(seconds) == {"fast", "slow"}
    q = speed.interleaved_quartiles(forms, torch.ones(2), rounds=8)  # (a 10-ms sleep: slower at both, on any CPU)
    assert q["slow"]["median"] > q["fast"]["median"] and q["slow"]["p25"] > q["fast"]["p25"]
    (m1, x1, c1), (m2, x2, c2) = (speed.random_case("vit_tiny_patch16_224", 2) for _ in range(2))
    assert not m1.training and x1.shape[0] == 2 and len(c1) == 3 and all(c.shape[0] == 4 for c in c1)
    assert torch.equal(x1, x2) and all(torch.equal(a, b) for a, b in zip(c1, c2))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
