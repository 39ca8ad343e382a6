"""vitkit.kernels: the fused halo attention kernel against the plain layer, its fallbacks, one graph under
torch.compile, and optimize's choice. The first test builds the C++ extension (about 40 s on 2 cores, once per
machine: it is cached under TORCH_EXTENSIONS_DIR).

Tolerances: the kernel computes the same fp32 attention as the plain layer with the sums in another order (logits
over up to 64 channels, softmax over at most 196 keys, value sums over 196 keys) and an exponential within 20 ulp
(ATen's exp_u20, 1.2e-6 relative), so the outputs differ by a few float32 roundings of the largest terms and that
exponential's error: 1e-5 relative to the largest output is several times above that.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import vitkit
import vitkit.kernels as kernels
import vitkit.kernels.linear as linear_kernel
import vitkit.routes as opt
from conftest import input_size_for, small_model
from vitkit.kernels.halo import unavailable_reason as halo_reason
from vitkit.layers.halo_attention import HaloAttention

REASON = halo_reason()  # (the halo kernel's: the oneDNN linears' tests below have their own)
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
    "stride 2, size padding, 27 x 35, 3 images": (dict(num_heads=4, stride=2), (27, 35)),
    "stride 2 by average pooling (avg_down), 24 x 40": (dict(num_heads=4, stride=2, avg_down=True), (24, 40)),
}
BATCH = {"stride 2, size padding, 27 x 35, 3 images": 3}
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
    x = torch.randn(BATCH.get(case, 2), c, *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < RTOL
    assert counted == [1]


def _written_out(q, kv, height_rel, width_rel, key_bias, heads, block, halo, scale):
    """The op's attention in float64, windows by ``unfold`` of the map zero-padded by the halo: softmax(q k^T * scale
    + rh[ky] + rw[kx] + key_bias) v, the factors of query (y, x) of its block from table rows ky - y + win - 1 and
    kx - x + win - 1 (the paper's relative offsets)."""
    q, kv, hrel, wrel, key_bias = (t.double() for t in (q, kv, height_rel, width_rel, key_bias))
    kv = F.pad(kv, (halo,) * 4)
    B, win = q.shape[0], block + 2 * halo
    d, c = q.shape[1] // heads, kv.shape[1] // heads
    nh, nw = (kv.shape[2] - 2 * halo) // block, (kv.shape[3] - 2 * halo) // block
    bs = q.shape[2] // nh
    qb = q.reshape(B * heads, d, nh, bs, nw, bs).permute(0, 2, 4, 3, 5, 1).reshape(B * heads, nh * nw, bs * bs, d)
    windows = kv.reshape(B * heads, c, *kv.shape[2:]).unfold(2, win, block).unfold(3, win, block)
    k, v = windows.permute(0, 2, 3, 4, 5, 1).reshape(B * heads, nh * nw, win * win, c).split([d, c - d], dim=-1)
    i = torch.arange(bs * bs)
    rows = torch.arange(win)[None, :] + win - 1  # (query, key offset) -> table row
    rh = (qb @ hrel.t()).gather(-1, (rows - (i // bs)[:, None]).expand(*qb.shape[:2], -1, -1))
    rw = (qb @ wrel.t()).gather(-1, (rows - (i % bs)[:, None]).expand(*qb.shape[:2], -1, -1))
    bias = (rh[..., :, None] + rw[..., None, :]).flatten(-2)
    if key_bias.numel():
        bias = bias + key_bias[:, None]
    out = ((qb @ k.transpose(-1, -2)) * scale + bias).softmax(-1) @ v  # (B*heads, blocks, bs*bs, e)
    e = out.shape[-1]
    return out.reshape(B, heads, nh, nw, bs, bs, e).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, heads * e, nh * bs, -1)


def _op_inputs(block, bs, halo, d, e, seed, heads=2, nh=2, nw=3):
    g = torch.Generator().manual_seed(seed)
    win = block + 2 * halo
    q = torch.randn(2, heads * d, nh * bs, nw * bs, generator=g)
    kv = torch.randn(2, heads * (d + e), nh * block, nw * block, generator=g)
    hrel, wrel = (torch.randn(2 * win - 1, d, generator=g) * d**-0.5 for _ in range(2))
    mask = torch.zeros(nh * nw, win * win).masked_fill(torch.rand(nh * nw, win * win, generator=g) < 0.3, -3e38)
    return q, kv, hrel, wrel, mask


@needs_kernel
def test_threads_split_blocks_without_changing_the_result():
    """The op alone (the layer's convolutions may round differently on 2 threads): each group of queries is computed
    whole by one thread, in the same order, so 1, 2 and 5 threads give the same bits (96 groups: 5 threads start
    chunks inside a block's groups, which then pack the block's window again)."""
    from vitkit.kernels.halo import halo_attention

    q, kv, hrel, wrel, mask = _op_inputs(8, 4, 3, 8, 16, seed=0, heads=4)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            outs.append(halo_attention(q, kv, hrel, wrel, mask, 4, 8, 3, 0.35))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


OP_CASES = [(8, 8, 3, 12, 20), (16, 16, 2, 12, 20), (8, 4, 2, 12, 20), (6, 6, 1, 12, 20), (3, 3, 1, 12, 20),
            (4, 2, 1, 12, 20), (2, 1, 1, 12, 20), (4, 4, 0, 3, 5), (3, 3, 0, 1, 1)]  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("block,bs,halo,d,e", OP_CASES)
def test_the_op_matches_attention_written_out(block, bs, halo, d, e):
    """The op alone against the attention written out in float64, on 2 heads of 2 x 3 blocks: 64 and 256 queries per
    block (whole lane groups: rows of 8 pixels, two to a row of 16), 16 (strided), 36 (groups of 16 that start and
    end inside a row of 6, then 4 left), 9 (one whole lane vector and one lane) and 4 (part of one), 1; windows of 14,
    20, 12, 8, 5, 6 and 4 pixels (key counts with a tail after blocks of 8); head width 12, value width 20 (the value
    product runs 8 channels at a time, then one at a time: 2 x 8 + 4), and widths 3 / 5 and 1 / 1 without a halo (one
    group's lanes then need every relative-table row); with and without a key mask; the halo zeros take part."""
    from vitkit.kernels.halo import halo_attention

    q, kv, hrel, wrel, mask = _op_inputs(block, bs, halo, d, e, seed=block * 10 + bs)
    for key_bias in (mask, q.new_empty(0)):
        got = halo_attention(q, kv, hrel, wrel, key_bias, 2, block, halo, 0.3)
        want = _written_out(q, kv, hrel, wrel, key_bias, 2, block, halo, 0.3)
        assert got.shape == want.shape == (2, 2 * e, 2 * bs, 3 * bs) and _rel(got.double(), want) < RTOL
        assert got.is_contiguous(memory_format=torch.channels_last)


@needs_kernel
def test_masked_keys_weigh_exactly_zero_and_an_all_masked_row_is_nan():
    """A masked key's weight is 0, not a tiny exponential: one pixel whose only key with a value is masked (its
    window's other 8 keys are the halo's zeros) gives exactly 0 even with a value of 1e36; a row whose every key is
    -inf gives NaN, as the softmax written out does."""
    from vitkit.kernels.halo import halo_attention

    q = torch.ones(1, 1, 1, 1)
    kv = torch.tensor([1.0, 1e36]).reshape(1, 2, 1, 1)
    rel = torch.zeros(5, 1)
    mask = torch.zeros(1, 9)
    mask[0, 4] = -3e38  # the centre key, the pixel itself
    assert halo_attention(q, kv, rel, rel, mask, 1, 1, 1, 1.0).item() == 0.0
    assert halo_attention(q, kv, rel, rel, torch.full((1, 9), float("-inf")), 1, 1, 1, 1.0).isnan().all()


@needs_kernel
def test_the_op_reads_any_layout_and_writes_channels_last():
    """Channels-last maps (oneDNN's convolutions under torch.compile) are read in place, anything else is copied
    first: the same bits either way, and the output is channels-last, as the fake implementation tells Inductor."""
    from vitkit.kernels.halo import halo_attention

    q, kv, hrel, wrel, mask = _op_inputs(8, 8, 3, 8, 16, seed=1)
    cl = torch.channels_last
    args = (hrel, wrel, mask, 2, 8, 3, 0.35)
    plain = halo_attention(q, kv, *args)
    last = halo_attention(q.contiguous(memory_format=cl), kv.contiguous(memory_format=cl), *args)
    cropped = F.pad(kv, (0, 2, 1, 0))[:, :, 1:, :-2]  # a view with row strides of its own
    assert torch.equal(plain, last) and torch.equal(plain, halo_attention(q, cropped, *args))
    with torch._subclasses.FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (q, kv, hrel, wrel, mask)]
        fake = torch.ops.vitkit.halo_attention(*args, 2, 8, 3, 0.35)
    assert fake.shape == plain.shape and fake.stride() == plain.stride()
    # registered with a flexible layout where torch has the tag on custom ops: Inductor passes its buffers as they are
    from vitkit.kernels.halo import _LAYOUT

    assert (torch.Tag.flexible_layout in torch.ops.vitkit.halo_attention.default.tags) == bool(_LAYOUT)


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
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 convolutions: the plain layer
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
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

    q, kv, hrel, wrel, mask = _op_inputs(8, 8, 3, 8, 8, seed=0)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        halo_attention(q.double(), kv.double(), hrel.double(), wrel.double(), mask.double(), 2, 8, 3, 1.0)
    with pytest.raises(RuntimeError, match="channels must split into heads"):
        halo_attention(q, kv, hrel, wrel, mask, 3, 8, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"kv must be \(B, heads \* \(D \+ E\), nh \* block, nw \* block\)"):
        halo_attention(q, kv[:, :, :12], hrel, wrel, mask, 2, 8, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"q must be \(B, heads \* D, nh \* bs, nw \* bs\)"):
        halo_attention(q[:, :, :15], kv, hrel, wrel, mask, 2, 8, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"height_rel, width_rel must be \(2\*win - 1, D\)"):
        halo_attention(q, kv, hrel[:, :4], wrel[:, :4], mask, 2, 8, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"key_bias must be \(nh \* nw, win \* win\)"):
        halo_attention(q, kv, hrel, wrel, mask[:5], 2, 8, 3, 1.0)


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
    assert len(graphs) == 1 and len(calls) == sum(isinstance(m, HaloAttention) for m in model.modules())


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
        def __init__(self, m, dynamic=None, symbolic_batch=False):  # compile_frozen's signature
            self.kernels = any(isinstance(layer, FusedHaloAttention) for layer in m.modules())
            self.form = ("compile+kernels" if self.kernels else "compile") + (opt.SYMBOLIC if symbolic_batch else "")
            self.m = m

        def __call__(self, inp):
            return self.m(inp)

    monkeypatch.setattr(opt, "compile_frozen", Compiled)
    monkeypatch.setattr(opt, "_onnx_route_possible", lambda dtype: False)
    sym = opt.SYMBOLIC
    times = {"eager": 30.0, "compile": 20.0, "compile" + sym: 21.0, "compile+kernels": 10.0}  # (kernels: static)

    def fake_time(fn, *args):
        return times["eager" if fn is model else fn.form]

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
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()  # nothing to swap: no kernel form
    xp = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(opt, "_time_ms", lambda fn, *a: 30.0 if fn is plain else 20.0)
    assert not any("kernels" in form for form in vitkit.optimize(plain, xp, route="auto").report.timings)


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


LINEAR_REASON = linear_kernel.unavailable_reason()
needs_onednn = pytest.mark.skipif(LINEAR_REASON is not None, reason=f"no oneDNN linears here: {LINEAR_REASON}")


@needs_onednn
def test_onednn_linears_compute_the_plain_layer_and_keep_the_state_dict():
    """Every plain ``nn.Linear`` is swapped; the state dict is the same (the packed weight is not saved); outputs
    agree with the plain model to fp32 rounding (another GEMM's summation order: ~K * 2^-24 relative); where the
    packed op does not apply (gradients, bfloat16) the layer is ``F.linear`` exactly; a weight changed in place or
    loaded after the swap is packed again before use; the model can be copied and converted like a plain one."""
    model = small_model("vit_tiny_patch16_224", num_classes=5).eval()
    x = torch.randn(2, *input_size_for("vit_tiny_patch16_224"))
    swapped = copy.deepcopy(model)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert kernels.apply(swapped) == n_linear > 0 and kernels.applicable(swapped) == 0
    assert all(type(m) is not torch.nn.Linear for m in swapped.modules())
    ref_sd, sd = model.state_dict(), swapped.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad(), torch.profiler.profile() as prof:
        assert _rel(swapped(x), model(x)) < RTOL
    assert sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events()) == n_linear  # the packed path ran
    with torch.no_grad():
        assert _rel(copy.deepcopy(swapped)(x), model(x)) < RTOL  # a copy packs its own (the packed one is opaque)
    layer = next(m for m in swapped.modules() if isinstance(m, linear_kernel.OneDnnLinear))
    plain = torch.nn.Linear(layer.in_features, layer.out_features)
    plain.load_state_dict(layer.state_dict())
    xi = torch.randn(3, 7, layer.in_features, requires_grad=True)
    out = layer(xi)  # gradients wanted: the plain arithmetic, and a backward
    assert torch.equal(out, plain(xi))
    out.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    layer.weight.requires_grad_(False)  # the bias alone trained: still the plain arithmetic, still a gradient
    layer(xi.detach()).sum().backward()
    assert layer.bias.grad is not None
    layer.weight.requires_grad_(True)
    with torch.no_grad():
        xb = xi.detach().bfloat16()
        assert torch.equal(layer.bfloat16()(xb), plain.bfloat16()(xb))  # not float32: the plain layer
        layer.float(), plain.float()
        layer.weight.mul_(-2.0), plain.weight.mul_(-2.0)  # changed in place after packing
        assert _rel(layer(xi), plain(xi)) < RTOL
        other = torch.nn.Linear(layer.in_features, layer.out_features)
        layer.load_state_dict(other.state_dict())  # loaded after packing
        assert _rel(layer(xi), other(xi)) < RTOL


@needs_onednn
@pytest.mark.parametrize("cpp_wrapper", [True, False])
def test_onednn_linears_compile_frozen_to_packed_onednn_calls(tmp_path, monkeypatch, cpp_wrapper):
    """Under the frozen compile the packed weight is a constant of the program: the generated code calls oneDNN's
    linear (with the GELU after the first linear fused in as a post-op) and packs nothing at run time; so with the
    C++ wrapper (the default) and with the Python one."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    swapped = copy.deepcopy(model)
    assert kernels.apply(swapped) == 2
    x = torch.randn(4, 5, 32)
    with torch.no_grad():
        out, code = run_and_get_code(opt.compile_frozen(swapped, dynamic=False, cpp_wrapper=cpp_wrapper), x)
        assert _rel(out, model(x)) < RTOL
    text = "\n".join(code)
    call = r"(torch\.ops\.mkldnn\._linear_pointwise\.default|aoti_torch_cpu__linear_pointwise)\("  # Python, C++
    calls = [line for line in text.splitlines() if re.search(call, line)]
    assert len(calls) == 2 and re.search("['\"]gelu['\"]", calls[0]), calls
    assert "_reorder_linear_weight" not in text and "_mkl_linear" not in text
    torch._dynamo.reset()


@needs_onednn
def test_onednn_linears_under_compile_see_the_weights_of_the_call(tmp_path, monkeypatch):
    """Weights loaded after the swap but before the first compiled call are the ones frozen into the program (the
    layer cannot pack while it is being compiled); a plain ``torch.compile`` (no freezing, where Inductor cannot
    lower the packed op) runs ``F.linear``; a model built in inference mode can be swapped."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 4)).eval()
    swapped = copy.deepcopy(model)
    kernels.apply(swapped)
    other = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 4)).eval()
    swapped.load_state_dict(other.state_dict())
    x = torch.randn(3, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        assert _rel(opt.compile_frozen(swapped, dynamic=False)(x), other(x)) < RTOL
        assert _rel(torch.compile(swapped, dynamic=False)(x), other(x)) < RTOL
    torch._dynamo.reset()
    with torch.inference_mode():
        built = torch.nn.Linear(16, 8)
        assert kernels.apply(built) == 1 and _rel(built(x), F.linear(x, built.weight, built.bias)) < RTOL


def _vbmi() -> bool:
    flags = open("/proc/cpuinfo").read().split() if __import__("os").path.exists("/proc/cpuinfo") else []
    return "avx512vbmi" in flags and "avx512bw" in flags


@needs_kernel
def test_the_table_kernel_is_a_lookup_on_every_path_and_layout():
    """``vitkit::lut_u8`` is ``table[x]`` exactly, byte for byte: on the AVX2 path and (where the CPU has it) the
    AVX-512 VBMI one, at lengths around the vector widths (the masked and scalar tails), for contiguous,
    channels-last and non-contiguous inputs; 4-D results are channels-last (what oneDNN's int8 convolutions
    read), others contiguous; under torch.compile it is one graph with the same bytes."""
    from vitkit.kernels import lut

    ext = lut._extension()
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 256, (256,), dtype=torch.uint8, generator=g)
    codes = torch.arange(256, dtype=torch.uint8)
    paths = [0, 1] if _vbmi() else [0]
    for path in paths:
        assert torch.equal(ext.lut_u8(codes, table, path), table)  # every code
        for n in (1, 31, 32, 33, 63, 64, 65, 127, 129, 70_001):
            x = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
            assert torch.equal(ext.lut_u8(x, table, path), table[x.long()]), (path, n)
    x = torch.randint(0, 256, (2, 5, 7, 9), dtype=torch.uint8, generator=g)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, 1:, ::2], x.transpose(1, 3)):
        y = lut.lut_u8(inp, table)
        assert torch.equal(y, table[inp.long()]) and y.is_contiguous(memory_format=torch.channels_last)
    y = lut.lut_u8(x[0].transpose(0, 2), table)  # 3-D, not contiguous: a contiguous result
    assert torch.equal(y, table[x[0].transpose(0, 2).long()]) and y.is_contiguous()
    for inp in (x[:0], torch.tensor(7, dtype=torch.uint8)):  # empty, 0-dim
        assert torch.equal(lut.lut_u8(inp, table), table[inp.long()])
    from torch._subclasses.fake_tensor import FakeTensorMode

    for inp in (x, x.contiguous(memory_format=torch.channels_last), x[0].transpose(0, 2), x[:, :1, :1, :1], x[0, 0]):
        with FakeTensorMode() as mode:  # what Inductor plans around: the fake op's strides are the real op's
            fake = torch.ops.vitkit.lut_u8.default(mode.from_tensor(inp), mode.from_tensor(table))
        assert fake.stride() == lut.lut_u8(inp, table).stride(), inp.shape
    compiled = torch.compile(lambda t: torch.ops.vitkit.lut_u8.default(t, table), fullgraph=True)
    assert torch.equal(compiled(x), table[x.long()])
    if not _vbmi():
        with pytest.raises(RuntimeError, match="no AVX-512 VBMI"):
            ext.lut_u8(x, table, 1)
    with pytest.raises(RuntimeError, match="uint8 tensors"):
        lut.lut_u8(x.float(), table)
    with pytest.raises(RuntimeError, match="256 entries"):
        lut.lut_u8(x, table[:255])


def test_an_activation_table_is_the_quantized_arithmetic_it_replaces():
    """The table of ``quantize(silu(dequantize(code)))`` gives, looked up, the same bytes as those three ops on any
    tensor of codes (PT2E's own ``quantized_decomposed`` ops, at scales and zero points as calibration sets them)."""
    pytest.importorskip("torchao", reason="PT2E int8 needs the int8 extra (torchao)")
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401 - registers the quantized_decomposed ops

    from vitkit.kernels.lut import activation_table

    q = torch.ops.quantized_decomposed
    x = torch.randint(0, 256, (3, 16, 11, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for s1, z1, s2, z2 in ((0.0364, 131, 0.0187, 15), (0.00122, 122, 0.000613, 112), (0.5, 0, 0.01, 30)):
        table = activation_table(F.silu, s1, z1, s2, z2)
        direct = q.quantize_per_tensor.default(
            F.silu(q.dequantize_per_tensor.default(x, s1, z1, 0, 255, torch.uint8)), s2, z2, 0, 255, torch.uint8
        )
        assert table.dtype == torch.uint8 and torch.equal(table[x.long()], direct)
