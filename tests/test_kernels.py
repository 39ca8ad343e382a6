"""vitkit.kernels: the fused halo attention kernel against the plain layer, its fallbacks, one graph under
torch.compile, and optimize's choice. The first test builds the C++ extension (about 40 s on 2 cores, once per
machine: it is cached under TORCH_EXTENSIONS_DIR).

Tolerances: the kernel computes the same fp32 attention as the plain layer with the sums in another order (logits
over up to 64 channels, softmax over at most 196 keys, value sums over 196 keys), so the outputs differ by a few
float32 roundings of the largest terms: 1e-5 relative to the largest output is an order of magnitude above that.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkit
import vitkit.kernels as kernels
import vitkit.routes as opt
from conftest import input_size_for, small_model
from vitkit.layers.halo_attention import HaloAttention

REASON = kernels.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"vitkit.kernels cannot be built here: {REASON}")
RTOL = 1e-5

LAYERS = {
    "stride 1": (dict(num_heads=4), 32),
    "stride 2 (16 queries per block)": (dict(num_heads=4, stride=2), 32),
    "size padding masked": (dict(num_heads=4), 27),
    "every outside key masked": (dict(num_heads=4, mask_padding="all"), 30),
    "head width 8 (H1's first stage)": (dict(num_heads=8, dim_head=8), 16),
    "widths of 12 (partial vectors)": (dict(num_heads=4), 16),
    "9 queries over 25 keys (part groups)": (dict(num_heads=4, block_size=3, halo_size=1), 14),
}
CHANNELS = {"widths of 12 (partial vectors)": 48}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def counted(monkeypatch):
    """Counts the kernel's calls, so a test knows the kernel ran rather than the plain fallback."""
    import vitkit.kernels.halo as halo

    calls, real = [], halo.halo_attention
    monkeypatch.setattr(halo, "halo_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernel
@pytest.mark.parametrize("case", list(LAYERS))
def test_fused_layer_matches_the_plain_layer(case, counted):
    kw, size = LAYERS[case]
    torch.manual_seed(0)
    c = CHANNELS.get(case, 64)
    plain = HaloAttention(c, c, **kw).eval()
    fused = copy.deepcopy(plain)
    assert kernels.apply(fused) == 1 and type(fused).__name__ == "FusedHaloAttention"
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, c, size, size)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < RTOL
    assert counted == [1]


def _written_out(q, kv, height_rel, width_rel, key_bias, blocks, bs, scale):
    """softmax(q k^T * scale + rh[ky] + rw[kx] + key_bias) v in float64, the factors of query (y, x) of its block
    from table rows ky - y + win - 1 and kx - x + win - 1 (the paper's relative offsets)."""
    q, kv, hrel, wrel, key_bias = (t.double() for t in (q, kv, height_rel, width_rel, key_bias))
    win, d = (hrel.shape[0] + 1) // 2, q.shape[-1]
    k, v = kv.split([d, kv.shape[-1] - d], dim=-1)
    i = torch.arange(bs * bs)
    rows = torch.arange(win)[None, :] + win - 1  # (query, key offset) -> table row
    rh = (q @ hrel.t()).gather(-1, (rows - (i // bs)[:, None]).expand(q.shape[0], -1, -1))
    rw = (q @ wrel.t()).gather(-1, (rows - (i % bs)[:, None]).expand(q.shape[0], -1, -1))
    bias = (rh[..., :, None] + rw[..., None, :]).flatten(-2)
    if key_bias.numel():
        bias = bias + key_bias.repeat(q.shape[0] // blocks, 1)[:, None]
    return ((q @ k.transpose(1, 2)) * scale + bias).softmax(-1) @ v


def _op_inputs(n, bs, d, e, win, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(n, bs * bs, d, generator=g), torch.randn(n, win * win, d + e, generator=g)
    hrel, wrel = (torch.randn(2 * win - 1, d, generator=g) * d**-0.5 for _ in range(2))
    return q, kv, hrel, wrel


@needs_kernel
def test_threads_split_blocks_without_changing_the_result():
    """The op alone (the layer's convolutions may round differently on 2 threads): each group of queries is computed
    whole by one thread, in the same order, so 1 and 2 threads give the same bits."""
    from vitkit.kernels.halo import halo_attention

    q, kv, hrel, wrel = _op_inputs(64, 4, 8, 16, 14, seed=0)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(8, 196).masked_fill(torch.rand(8, 196, generator=g) < 0.2, torch.finfo(torch.float32).min)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(halo_attention(q, kv, hrel, wrel, mask, 8, 4, 0.35))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
@pytest.mark.parametrize("bs", [1, 2, 3, 4, 8])
def test_the_op_matches_attention_written_out(bs):
    """The op alone against the attention written out in float64: blocks of 1, 4 and 9 queries (part of one lane
    group), 16 and 64 (whole groups); a 9 x 9 window, 81 keys (a tail after blocks of 8); head width 12, value width
    20 (4 queries x 2 vectors, then a last single vector); a key mask repeating every 2 windows."""
    from vitkit.kernels.halo import halo_attention

    q, kv, hrel, wrel = _op_inputs(4, bs, 12, 20, 9, seed=bs)
    mask = torch.zeros(2, 81).masked_fill(torch.rand(2, 81, generator=torch.Generator().manual_seed(0)) < 0.3, -3e38)
    for key_bias, blocks in ((mask, 2), (q.new_empty(0), 1)):
        got = halo_attention(q, kv, hrel, wrel, key_bias, blocks, bs, 0.3)
        want = _written_out(q, kv, hrel, wrel, key_bias, blocks, bs, 0.3)
        assert got.shape == (4, bs * bs, 20) and _rel(got.double(), want) < RTOL


@needs_kernel
def test_training_and_the_eager_route_fall_back_to_the_plain_layer(counted):
    """No backward in the kernel: with autograd the plain core runs (and trains); the eager route keeps its hook."""
    torch.manual_seed(0)
    plain = HaloAttention(64, 64, num_heads=4)
    fused = copy.deepcopy(plain)
    kernels.apply(fused)
    x = torch.randn(2, 64, 16, 16)
    out = fused(x)
    out.sum().backward()
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    assert fused.q.weight.grad is not None and counted == []
    for module in (fused.q, fused.kv):  # only the relative-position tables train: still the plain core
        module.requires_grad_(False)
    fused(x).sum().backward()
    assert fused.pos_embed.height_rel.grad is not None and counted == []
    with torch.no_grad():  # float64: the kernel is float32 only
        torch.testing.assert_close(fused.double()(x.double()), plain.double()(x.double()), rtol=0, atol=0)
    fused.float()
    assert counted == []
    fused.fused_attn = False
    seen = []
    fused.attn_probs.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        fused(x)
    assert seen and counted == []


@needs_kernel
def test_the_kernel_names_bad_input():
    from vitkit.kernels.halo import halo_attention

    q, kv, hrel, wrel = _op_inputs(2, 4, 8, 8, 14, seed=0)
    empty = q.new_empty(0)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        halo_attention(q.double(), kv.double(), hrel.double(), wrel.double(), empty, 1, 4, 1.0)
    with pytest.raises(RuntimeError, match="Q must be bs\\*bs queries with bs <= win, got Q = 6, bs = 4"):
        halo_attention(q[:, :6], kv, hrel, wrel, empty, 1, 4, 1.0)
    with pytest.raises(RuntimeError, match=r"kv must be \(N, win\*win, D \+ E\)"):
        halo_attention(q, kv[:, :100], hrel, wrel, empty, 1, 4, 1.0)
    with pytest.raises(RuntimeError, match=r"height_rel, width_rel must be \(2\*win - 1, D\)"):
        halo_attention(q, kv, hrel[:, :4], wrel[:, :4], empty, 1, 4, 1.0)
    with pytest.raises(RuntimeError, match="N must be a multiple of blocks"):
        halo_attention(q, kv, hrel, wrel, torch.zeros(3, 196), 3, 4, 1.0)


@needs_kernel
def test_a_model_with_kernels_compiles_in_one_graph_and_keeps_its_output():
    model = small_model("halonet26t", num_classes=5).eval()
    x = torch.randn(2, *input_size_for("halonet26t"))
    fused = copy.deepcopy(model)
    assert kernels.apply(fused) == kernels.applicable(model) > 0
    graphs = []

    def capture(gm, inputs):  # Dynamo's graph, run as captured
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=capture, fullgraph=True)  # any graph break is an error
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < RTOL
    torch._dynamo.reset()
    calls = [n for n in graphs[0].graph.nodes if "vitkit.halo_attention" in str(n.target)]
    assert len(graphs) == 1 and len(calls) == kernels.applicable(model)


@pytest.mark.slow
@needs_kernel
def test_inductor_with_freezing_compiles_the_kernel_form():
    """The form optimize builds: Inductor with freezing around the custom op (tens of seconds: slow run)."""
    model = small_model("halonet26t", num_classes=5).eval()
    x = torch.randn(2, *input_size_for("halonet26t"))
    fused = copy.deepcopy(model)
    kernels.apply(fused)
    torch._dynamo.reset()
    with torch.no_grad():
        assert _rel(opt.compile_frozen(fused)(x), model(x)) < RTOL
    torch._dynamo.reset()


@needs_kernel
def test_optimize_times_the_kernel_form_against_the_plain_compiled_one(monkeypatch):
    """'auto' builds a kernel copy of the model besides the plain compiled form and keeps the faster (times are
    replaced here, and the compile is the eager model, so the choice is what is tested); the caller's model keeps
    its plain layers; a kernel form that cannot be built is named in the note."""
    from vitkit.kernels.halo import FusedHaloAttention

    model = small_model("halonet26t", num_classes=5).eval()
    x = torch.randn(2, *input_size_for("halonet26t"))

    class Compiled:
        def __init__(self, m, dynamic=None):  # compile_frozen's signature
            self.kernels = any(isinstance(layer, FusedHaloAttention) for layer in m.modules())
            self.m = m

        def __call__(self, inp):
            return self.m(inp)

    monkeypatch.setattr(opt, "compile_frozen", Compiled)
    monkeypatch.setattr(opt, "_onnx_route_possible", lambda dtype: False)
    times = {"eager": 30.0, "compile": 20.0, "compile+kernels": 10.0}

    def fake_time(fn, *args):
        return times["eager" if fn is model else "compile+kernels" if fn.kernels else "compile"]

    monkeypatch.setattr(opt, "_time_ms", fake_time)
    out = vitkit.optimize(model, x, route="auto")
    assert out.report.route == "compile+kernels" and out.fn.kernels and out.report.timings == times
    assert not any(isinstance(layer, FusedHaloAttention) for layer in model.modules())
    times["compile+kernels"] = 25.0  # slower than the plain compiled form here: not used
    assert vitkit.optimize(model, x, route="auto").report.route == "compile"

    def cannot(m):
        raise RuntimeError("vitkit.kernels.halo: the fused kernel needs a C++ compiler")

    monkeypatch.setattr(kernels, "apply", cannot)
    out = vitkit.optimize(model, x, route="auto")
    assert out.report.route == "compile" and "compile+kernels not built (RuntimeError" in out.report.note
    vit = small_model("vit_tiny_patch16_224", num_classes=5).eval()  # nothing to swap: no kernel candidate
    xv = torch.randn(2, *input_size_for("vit_tiny_patch16_224"))
    times["compile"] = times["compile+kernels"] = 20.0
    monkeypatch.setattr(opt, "_time_ms", lambda fn, *a: 30.0 if fn is vit else 20.0)
    assert "compile+kernels" not in vitkit.optimize(vit, xv, route="auto").report.timings


def test_the_reason_a_kernel_cannot_be_built_is_named(monkeypatch):
    """Where the kernel cannot be built (not x86 with AVX2, no compiler, no ninja) the reason says what is missing,
    and building raises it rather than failing inside the compiler."""
    import vitkit.kernels.halo as halo

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "needs an x86 CPU with AVX2 (this one: DEFAULT)" in kernels.unavailable_reason()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "'no-such-compiler-xyz' not found" in kernels.unavailable_reason()
    with pytest.raises(RuntimeError, match=r"vitkit.kernels.halo: the fused kernel needs a C\+\+ compiler"):
        halo._extension.__wrapped__()  # the build itself (uncached): it stops at the reason, before the compiler
