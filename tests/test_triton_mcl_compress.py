"""The Triton token-level compression (`mcl_kernels.triton.mcl_compress`: a chain's levels after the first) against
the reference (`reference.mcl_level` and its explicit backward `reference.mcl_level_backward`): forward and every
gradient, called directly, through the op with ``backend="triton"``, and as the later levels of a 3-scale
``FusedMCLEmbed(scales=(8, 16, 32), backend="triton")`` chain.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the shapes are
small; the real ViT shape runs only on a CUDA device.
"""
import pytest
import torch

import mcl_kernels as mk
from helpers import assert_close, rand
from mcl_kernels import backends, reference

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from mcl_kernels.triton.mcl_compress import mcl_compress as triton_forward  # noqa: E402
from mcl_kernels.triton.mcl_compress import mcl_compress_backward as triton_backward  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU shape runs only on one")

# (B, grid_h, grid_w, k, D). The interpreter's GEMM tile is 16 rows x 32 columns x 16 reduction steps.
SHAPES = [
    (2, 4, 6, 2, 20),   # non-square grid; D = 20 (not a multiple of 16: ragged tiles everywhere)
    (1, 6, 3, 3, 16),   # batch 1; k = 3 on a non-square grid; k²D = 144
    (3, 8, 4, 2, 40),   # 24 large tokens: two row tiles, image 1 mid-tile; D = 40 spans two column tiles
]
VARIANTS = ["untied", "tied", "nodecomp", "nobias"]
NAMES = ("tokens", "comp_w", "comp_b", "decomp_w", "decomp_b")
ALL = [True] * 5


def shape_id(s):
    return "B{}_{}x{}_k{}D{}".format(*s)


def make_inputs(shape, variant="untied", dtype=torch.float32, device="cpu", layout="contiguous"):
    """``(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k)``, drawn in float64 and rounded to
    ``dtype``; weights scaled so every output is O(1). Tied decompression is ``comp_w.t()`` (a strided view);
    ``layout="strided"`` gives tokens with a transposed memory layout (feature stride != 1)."""
    B, gh, gw, k, D = shape

    def r(*size, scale=1.0):
        return rand(*size, scale=scale, dtype=dtype, device=device)

    tokens = r(B, gh * gw, D)
    if layout == "strided":
        tokens = tokens.transpose(1, 2).contiguous().transpose(1, 2)
    bias = variant != "nobias"
    cw = r(D, k * k * D, scale=(k * k * D) ** -0.5)
    cb = r(D) if bias else None
    dw = None if variant == "nodecomp" else cw.t() if variant == "tied" else r(k * k * D, D, scale=D ** -0.5)
    db = r(k * k * D) if bias and variant != "nodecomp" else None
    return tokens, cw, cb, dw, db, gh, gw, k


def ref_forward(inputs, dtype=None):
    tokens, cw, cb, dw, db, gh, gw, k = inputs
    conv = [None if t is None or dtype is None else t.to(dtype) for t in (tokens, cw, cb, dw, db)]
    if dtype is not None:
        tokens, cw, cb, dw, db = conv
    return reference.mcl_level(tokens, (gh, gw), k, cw, cb, dw, db)


def fp32_atol(inputs):
    """DESIGN §4: 1e-4 scaled by sqrt of the longest reduction (k²·D, or the token count for weight gradients)."""
    tokens, cw = inputs[0], inputs[1]
    return 1e-4 * max(cw.shape[1], tokens.shape[0] * tokens.shape[1], 1) ** 0.5


def needs_for(inputs, needs=ALL):
    """``needs`` restricted to the parameters that exist."""
    return [bool(n) and inputs[i] is not None for i, n in enumerate(needs)]


def upstream(inputs, missing=()):
    """The forward's ``L`` and upstream gradients ``(gL, gR)`` (those named in ``missing`` None)."""
    large, recon = ref_forward(inputs)
    g_large = None if "gL" in missing else torch.randn_like(large)
    g_recon = None if recon is None or "gR" in missing else torch.randn_like(recon)
    return large, g_large, g_recon


def run_backward(inputs, large, g_large, g_recon, needs, ref_dtype=torch.float64):
    """Triton's gradients and the reference's (computed in ``ref_dtype`` from the same values; absent upstream
    gradients as zeros on the reference side)."""
    tokens, cw, cb, dw, db, gh, gw, k = inputs
    got = triton_backward(g_large, g_recon, tokens, cw, cb, dw, db, large, gh, gw, k, needs)

    def c(t):
        return None if t is None else t.to(ref_dtype)
    gl = c(g_large) if g_large is not None else torch.zeros_like(c(large))
    want = list(reference.mcl_level_backward(gl, c(g_recon), c(tokens), c(large), (gh, gw), k, c(cw), c(dw), needs))
    if cb is None:
        want[2] = None
    if db is None:
        want[4] = None
    return got, want


def check(label, got, want, atol, rtol=1e-5, dtype=torch.float32):
    for name, g, w in zip(NAMES, got, want):
        if g is not None:
            assert g.is_contiguous() and g.dtype == dtype, f"{label} {name}: {g.dtype}, contiguous={g.is_contiguous()}"
        assert_close(f"{label} {name}", g, None if w is None else w.to(dtype), atol=atol, rtol=rtol)


# ---- forward -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_float32_matches_reference(shape, variant, layout):
    inputs = make_inputs(shape, variant, layout=layout)
    large, recon = triton_forward(*inputs)
    want_l, want_r = ref_forward(inputs, torch.float64)
    assert large.is_contiguous() and large.dtype == torch.float32
    assert_close(f"L {variant} {layout}", large, want_l.float(), atol=fp32_atol(inputs), rtol=1e-5)
    assert (recon is None) == (variant == "nodecomp")
    if recon is not None:
        assert recon.is_contiguous()
        assert_close(f"R {variant} {layout}", recon, want_r.float(), atol=fp32_atol(inputs), rtol=1e-5)


def test_forward_float64_accumulates_in_float64():
    inputs = make_inputs(SHAPES[2], "tied", dtype=torch.float64)
    for name, o, e in zip(("L", "R"), triton_forward(*inputs), ref_forward(inputs)):
        assert_close(f"float64 {name}", o, e, atol=1e-12, rtol=1e-12)


def test_forward_strided_parameters():
    """comp_w, decomp_w and the biases are read through their strides."""
    tokens, cw, cb, dw, db, gh, gw, k = make_inputs(SHAPES[0])

    def every_other(b):
        return torch.stack([b, -b], 1)[:, 0]

    strided = (tokens, cw.t().contiguous().t(), every_other(cb), dw.t().contiguous().t(), every_other(db), gh, gw, k)
    assert not any(t.is_contiguous() for t in strided[1:5])
    for name, o, e in zip(("L", "R"), triton_forward(*strided), ref_forward((tokens, cw, cb, dw, db, gh, gw, k))):
        assert_close(f"strided {name}", o, e, atol=fp32_atol(strided), rtol=1e-5)


@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=shape_id)
def test_forward_low_precision_within_twice_torch_error(shape, dtype, variant):
    """Judged against PyTorch's own error: the reference in ``dtype`` vs in float32, from the same inputs."""
    inputs = make_inputs(shape, variant, dtype=dtype)
    out = triton_forward(*inputs)
    exact = ref_forward(inputs, torch.float32)
    theirs = ref_forward(inputs)
    for name, o, t, e in zip(("L", "R"), out, theirs, exact):
        assert (o is None) == (e is None), name
        if o is None:
            continue
        assert o.dtype == dtype and o.is_contiguous()
        torch_err = (t.float() - e).abs().max().item()
        our_err = (o.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"{dtype} {name}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


def test_forward_empty_batch():
    tokens, cw, cb, dw, db, gh, gw, k = make_inputs((0, 4, 6, 2, 20))
    large, recon = triton_forward(tokens, cw, cb, dw, db, gh, gw, k)
    assert large.shape == (0, 6, 20) and recon.shape == (0, 24, 20)


# ---- backward ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backward_float32_every_gradient_matches_reference(shape, variant):
    inputs = make_inputs(shape, variant, layout="strided")
    large, g_large, g_recon = upstream(inputs)
    got, want = run_backward(inputs, large, g_large, g_recon, needs_for(inputs))
    check(f"{shape_id(shape)} {variant}", got, want, fp32_atol(inputs))


def test_backward_float64():
    inputs = make_inputs(SHAPES[1], "untied", dtype=torch.float64)
    large, g_large, g_recon = upstream(inputs)
    got, want = run_backward(inputs, large, g_large, g_recon, ALL)
    check("float64", got, want, atol=1e-12, rtol=1e-12, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=shape_id)
def test_backward_low_precision_within_twice_torch_error(shape, dtype, variant):
    inputs = make_inputs(shape, variant, dtype=dtype)
    large, g_large, g_recon = upstream(inputs)
    needs = needs_for(inputs)
    got, exact = run_backward(inputs, large, g_large, g_recon, needs, ref_dtype=torch.float32)
    _, theirs = run_backward(inputs, large, g_large, g_recon, needs, ref_dtype=dtype)
    for name, g, t, e in zip(NAMES, got, theirs, exact):
        assert (g is None) == (e is None), name
        if g is None:
            continue
        assert g.dtype == dtype and g.is_contiguous() and g.shape == e.shape
        torch_err = (t.float() - e).abs().max().item()
        our_err = (g.float() - e).abs().max().item()
        slack = 1e-3 * e.abs().max().item()  # where PyTorch happens to be (near) exact
        assert our_err <= 2 * torch_err + slack, (
            f"{dtype} {name}: error {our_err:.3g} vs torch's own {torch_err:.3g} (max |grad| {e.abs().max():.3g})")


@pytest.mark.parametrize("needs", [
    [True, False, False, False, False],
    [False, True, False, True, False],
    [False, False, True, False, True],
    [False, False, False, True, True],
], ids=["tokens", "weights", "biases", "decomp"])
def test_backward_only_the_gradients_asked_for(needs):
    inputs = make_inputs(SHAPES[0], "untied")
    large, g_large, g_recon = upstream(inputs)
    got, want = run_backward(inputs, large, g_large, g_recon, needs)
    for name, n, g in zip(NAMES, needs, got):
        assert (g is not None) == n, f"{name}: asked {n}, got {None if g is None else tuple(g.shape)}"
    check("subset", got, want, fp32_atol(inputs))


@pytest.mark.parametrize("missing", [("gL",), ("gR",), ("gL", "gR")], ids=lambda m: "no_" + "_".join(m))
def test_backward_absent_upstream_gradients_count_as_zero(missing):
    inputs = make_inputs(SHAPES[1], "untied")
    large, g_large, g_recon = upstream(inputs, missing)
    got, want = run_backward(inputs, large, g_large, g_recon, ALL)
    if g_recon is None:  # the reference needs a tensor to group; zero is what an absent gR means
        _, want = run_backward(inputs, large, g_large, torch.zeros_like(inputs[0]), ALL)
    check("missing " + ",".join(missing), got, want, fp32_atol(inputs))


def test_backward_empty_batch_gives_zero_weight_gradients():
    inputs = make_inputs((0, 4, 6, 2, 20))
    large, g_large, g_recon = upstream(inputs)
    got = triton_backward(g_large, g_recon, *inputs[:5], large, *inputs[5:], ALL)
    assert got[0].shape == (0, 24, 20)
    for name, g, p in zip(NAMES[1:], got[1:], inputs[1:5]):
        assert g.shape == p.shape and not g.any(), f"{name}: {tuple(g.shape)}, max {g.abs().max()}"


# ---- through the public API -------------------------------------------------------------------------------

@pytest.fixture
def triton_spy(monkeypatch):
    """Counts calls of the registered Triton ops, proving the public API reaches them."""
    ops = backends.BACKENDS["triton"].ops
    calls = {}
    for op in ("mcl_embed", "mcl_embed_backward", "mcl_compress", "mcl_compress_backward"):
        assert op in ops, f"the 'triton' backend does not register {op} (backends.py)"

        def spy(*args, _op=op, _fn=ops[op]):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args)
        monkeypatch.setitem(ops, op, spy)
    return calls


@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
def test_op_forward_and_gradients_match_reference(triton_spy, variant):
    tokens, cw, cb, dw, db, gh, gw, k = make_inputs(SHAPES[0], variant)
    leaves = [None if t is None else t.detach().requires_grad_(True)
              for t in (tokens, cw, cb, None if variant == "tied" else dw, db)]
    lt, lcw, lcb, ldw, ldb = leaves
    ldw_used = lcw.t() if variant == "tied" else ldw
    large, recon = mk.ops.mcl_compress(lt, lcw, lcb, ldw_used, ldb, gh, gw, k, "triton")
    want_l, want_r = reference.mcl_level(lt, (gh, gw), k, lcw, lcb, ldw_used, ldb)
    assert_close("op L", large, want_l, atol=fp32_atol((tokens, cw)), rtol=1e-5)
    outs, wants = [large], [want_l]
    if want_r is not None:
        assert_close("op R", recon, want_r, atol=fp32_atol((tokens, cw)), rtol=1e-5)
        outs.append(recon)
        wants.append(want_r)
    ups = [torch.randn_like(w) for w in wants]
    params = [t for t in leaves if t is not None]
    got = torch.autograd.grad(outs, params, ups)
    want = torch.autograd.grad(wants, params, ups)
    assert triton_spy == {"mcl_compress": 1, "mcl_compress_backward": 1}
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"op grad {i}", g, w, atol=1e-4, rtol=1e-5)


def _chain_pair(decompress, tied, dtype=torch.float32):
    def make(backend):
        torch.manual_seed(5)
        return mk.FusedMCLEmbed(img_size=(32, 64), in_chans=2, embed_dim=20, scales=(8, 16, 32),
                                decompress=decompress, tied_decompress=tied, backend=backend, dtype=dtype)
    ours, ref = make("triton"), make("reference")
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("decompress,tied", [(True, False), (True, True), (False, False)],
                         ids=["untied", "tied", "nodecomp"])
def test_three_scale_chain_forward_and_gradients_match_reference(triton_spy, decompress, tied):
    """8 -> 16 -> 32 on a 32x64 image: level 1 is the fused embedding (4x8 -> 2x4 tokens), level 2 this op
    (2x4 -> 1x2 tokens). Every token set and reconstruction enters the loss, so every gradient path runs."""
    ours, ref = _chain_pair(decompress, tied)
    x = torch.randn(2, 2, 32, 64).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    results = []
    for module, inp in ((ours, x), (ref, x_ref)):
        out = module(inp)
        loss = sum((i + 1) * t.square().mean() for i, t in enumerate(out.small)) + out.large[-1].sin().sum()
        if out.recon is not None:
            loss = loss + sum((r - s).square().mean() for r, s in zip(out.recon, out.small))
        loss.backward()
        results.append((out, loss.detach()))
    (out, loss), (out_ref, loss_ref) = results
    assert triton_spy == {"mcl_embed": 1, "mcl_embed_backward": 1, "mcl_compress": 1, "mcl_compress_backward": 1}
    for name in ("small", "large", "recon"):
        a, b = getattr(out, name), getattr(out_ref, name)
        assert (a is None) == (b is None), name
        for i, (t, u) in enumerate(zip(a or (), b or ())):
            assert_close(f"chain {name}[{i}]", t, u, atol=1e-4, rtol=1e-5)
    assert_close("loss", loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert_close("grad x", x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(f"grad {name}", p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_three_scale_chain_bfloat16_within_twice_torch_error(triton_spy):
    """The chain in bf16 against the same chain in float32 (weights and image equal after rounding to bf16)."""
    ours, ref = _chain_pair(True, False, dtype=torch.bfloat16)
    exact = _chain_pair(True, False)[1]
    exact.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x = torch.randn(2, 2, 32, 64, dtype=torch.bfloat16)
    got, theirs, want = ours(x), ref(x), exact(x.float())
    for name in ("small", "large", "recon"):
        for i, (g, t, w) in enumerate(zip(getattr(got, name), getattr(theirs, name), getattr(want, name))):
            torch_err = (t.float() - w).abs().max().item()
            our_err = (g.float() - w).abs().max().item()
            assert our_err <= 2 * torch_err + 1e-3, f"bf16 {name}[{i}]: {our_err:.3g} vs torch's own {torch_err:.3g}"


# ---- on a GPU, at a real ViT shape -------------------------------------------------------------------------

GPU_SHAPE = (8, 14, 14, 2, 384)  # DeiT-S/16 tokens at 224² compressed to /32


@needs_cuda
@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_cuda_bfloat16_forward_and_backward_within_twice_torch_error(variant):
    inputs = make_inputs(GPU_SHAPE, variant, dtype=torch.bfloat16, device="cuda")
    exact, theirs = ref_forward(inputs, torch.float32), ref_forward(inputs)
    for name, o, t, e in zip(("L", "R"), triton_forward(*inputs), theirs, exact):
        torch_err = (t.float() - e).abs().max().item()
        assert (o.float() - e).abs().max().item() <= 2 * torch_err + 1e-3, name
    large, g_large, g_recon = upstream(inputs)
    needs = needs_for(inputs)
    got, want = run_backward(inputs, large, g_large, g_recon, needs, ref_dtype=torch.float32)
    _, theirs = run_backward(inputs, large, g_large, g_recon, needs, ref_dtype=torch.bfloat16)
    for name, g, t, e in zip(NAMES, got, theirs, want):
        if e is None:
            continue
        torch_err = (t.float() - e).abs().max().item()
        our_err = (g.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3 * e.abs().max().item(), f"bf16 {name}: {our_err:.3g} vs {torch_err:.3g}"
