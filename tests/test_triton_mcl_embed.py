"""The fused Triton `mcl_embed` kernel (pixels -> S, L, R in one launch) against the reference, called
directly and through the public API with ``backend="triton"`` (whose backward is
tests/test_triton_mcl_embed_backward.py's subject).

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the shapes are
small; the real ViT shape runs only on a CUDA device.
"""
import pytest
import torch

import mcl_kernels as mk
from helpers import assert_close, make_image, rand
from mcl_kernels import backends
from mcl_kernels.reference import mcl_embed as reference

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from mcl_kernels.triton.mcl_embed import mcl_embed as triton_mcl_embed  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU shape runs only on one")

# (B, C, H, W, p, k, D). The interpreter's tile is 16 large tokens x next_power_of_2(D) x 32 K.
SHAPES = [
    (2, 3, 16, 24, 4, 2, 20),   # non-square; K = 48 (ragged K tile); D = 20 (BLOCK_D = 32, masked)
    (1, 2, 12, 18, 2, 3, 16),   # batch 1; k = 3; K = 8 (less than one K tile); D = 16 exactly one dot tile
    (3, 1, 24, 12, 3, 2, 40),   # K = 9; D = 40 (BLOCK_D = 64); 24 large tokens: two programs, image 1 mid-tile
    (1, 1, 28, 28, 14, 2, 16),  # patch 14: K = 196
]
VARIANTS = ["untied", "tied", "nodecomp", "nobias"]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def shape_id(s):
    return "B{}C{}_{}x{}_p{}k{}D{}".format(*s)


def make_inputs(shape, variant="untied", layout="contiguous", dtype=torch.float32, device="cpu"):
    """``(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k)`` drawn in float64 and rounded to ``dtype``;
    weights scaled so every output is O(1). Tied decompression is ``comp_w.t()`` (a strided view)."""
    B, C, H, W, p, k, D = shape

    def r(*size, scale=1.0):
        return rand(*size, scale=scale, dtype=dtype, device=device)

    x = make_image(B, C, H, W, layout, dtype, device)
    bias = variant != "nobias"
    pw = r(D, C, p, p, scale=(C * p * p) ** -0.5)
    pb = r(D) if bias else None
    cw = r(D, k * k * D, scale=(k * k * D) ** -0.5)
    cb = r(D) if bias else None
    dw = None if variant == "nodecomp" else cw.t() if variant == "tied" else r(k * k * D, D, scale=D ** -0.5)
    db = r(k * k * D) if bias and variant != "nodecomp" else None
    return x, pw, pb, cw, cb, dw, db, k


def converted(inputs, dtype):
    *tensors, k = inputs
    return [None if t is None else t.to(dtype) for t in tensors] + [k]


def fp32_atol(inputs):
    """DESIGN §4: float32 tight, 1e-4 scaled by sqrt(K) (the largest reduction: C·p·p or k²·D)."""
    x, pw, _, cw, *_ = inputs
    return 1e-4 * max(pw[0].numel(), cw.shape[1]) ** 0.5


NAMES = ("S", "L", "R")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float32_matches_reference(shape, variant, layout):
    inputs = make_inputs(shape, variant, layout)
    out = triton_mcl_embed(*inputs)
    expected = [None if e is None else e.float() for e in reference(*converted(inputs, torch.float64))]
    for name, o, e in zip(NAMES, out, expected):
        if o is not None:
            assert o.is_contiguous() and o.dtype == torch.float32
        assert_close(f"triton mcl_embed {name} {variant} {layout}", o, e, atol=fp32_atol(inputs), rtol=1e-5)


def test_empty_batch_launches_nothing_and_keeps_the_shapes():
    inputs = make_inputs((0, 3, 16, 24, 4, 2, 20))
    s, l, r = triton_mcl_embed(*inputs)
    assert s.shape == (0, 24, 20) and l.shape == (0, 6, 20) and r.shape == (0, 24, 20)
    _, _, r = triton_mcl_embed(*make_inputs((0, 3, 16, 24, 4, 2, 20), "nodecomp"))
    assert r is None


def test_strided_parameters():
    """proj_w, comp_w, decomp_w and the biases are read through their strides, like x."""
    x, pw, pb, cw, cb, dw, db, k = make_inputs((2, 3, 16, 24, 4, 2, 20))
    pw_t = pw.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels innermost
    cw_t, dw_t = cw.t().contiguous().t(), dw.t().contiguous().t()

    def every_other(b):
        return torch.stack([b, -b], 1)[:, 0]

    strided = (x, pw_t, every_other(pb), cw_t, every_other(cb), dw_t, every_other(db), k)
    assert not any(t.is_contiguous() for t in strided[1:7])
    expected = reference(x, pw, pb, cw, cb, dw, db, k)
    for name, o, e in zip(NAMES, triton_mcl_embed(*strided), expected):
        assert_close(f"strided {name}", o, e, atol=fp32_atol(strided), rtol=1e-5)


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_float64_accumulates_in_float64(variant):
    inputs = make_inputs((3, 1, 24, 12, 3, 2, 40), variant, "channels_last", dtype=torch.float64)
    for name, o, e in zip(NAMES, triton_mcl_embed(*inputs), reference(*inputs)):
        assert_close(f"float64 {name}", o, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", ["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=shape_id)
def test_low_precision_within_twice_torch_error(shape, dtype, variant):
    """Judged against PyTorch's own error: the reference in ``dtype`` vs the reference in float32, both from
    the same ``dtype`` inputs."""
    inputs = make_inputs(shape, variant, "channels_last", dtype=dtype)
    out = triton_mcl_embed(*inputs)
    exact = reference(*converted(inputs, torch.float32))
    theirs = reference(*inputs)
    for name, o, t, e in zip(NAMES, out, theirs, exact):
        assert o.dtype == dtype and o.is_contiguous()
        torch_err = (t.float() - e).abs().max().item()
        our_err = (o.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"{dtype} {name}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


# ---- through the public API -------------------------------------------------------------------------------

def _registered_or_direct(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k):
    from mcl_kernels.triton.mcl_embed import mcl_embed as kernel
    return kernel(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k)


@pytest.fixture
def triton_backend(monkeypatch):
    """The public API reaches this kernel once backends.py registers it; until then, register it for the test.
    After registration this fixture changes nothing."""
    ops = backends.BACKENDS["triton"].ops
    if "mcl_embed" not in ops:
        monkeypatch.setitem(ops, "mcl_embed", _registered_or_direct)
    yield


@pytest.mark.parametrize("variant,layout", [("untied", "contiguous"), ("tied", "channels_last"),
                                            ("nodecomp", "sliced"), ("nobias", "contiguous")])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=shape_id)
def test_public_api_forward_and_gradients_match_reference(triton_backend, shape, variant, layout):
    x, pw, pb, cw, cb, dw, db, k = make_inputs(shape, variant, layout)
    tied = variant == "tied"
    leaves = [x, pw, pb, cw, cb, None if tied else dw, db]
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in leaves]
    lx, lpw, lpb, lcw, lcb, ldw, ldb = leaves
    out = mk.mcl_embed(lx, lpw, lpb, lcw, lcb, ldw, ldb, compress=k, tied_decompress=tied, backend="triton")
    expected = reference(lx, lpw, lpb, lcw, lcb, lcw.t() if tied else ldw, ldb, k)
    atol = fp32_atol((x, pw, pb, cw))
    outs = [out.small, out.large, out.recon]
    for name, o, e in zip(NAMES, outs, expected):
        assert_close(f"forward {name} {variant} {layout}", o, e, atol=atol, rtol=1e-5)

    # The Triton backward (test_triton_mcl_embed_backward.py), fed by this forward's saved outputs.
    pairs = [(o, e) for o, e in zip(outs, expected) if e is not None]
    ups = [torch.randn_like(e) for _, e in pairs]
    params = [t for t in leaves if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], params, ups)
    want = torch.autograd.grad([e for _, e in pairs], params, ups)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"grad {i} {variant} {layout}", g, w, atol=1e-4, rtol=1e-5)


def test_public_api_empty_batch(triton_backend):
    x, pw, pb, cw, cb, dw, db, k = make_inputs((0, 3, 16, 24, 4, 2, 20))
    out = mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=k, backend="triton")
    assert out.small.shape == (0, 24, 20) and out.large.shape == (0, 6, 20) and out.recon.shape == (0, 24, 20)


# ---- on a GPU, at a real ViT shape -------------------------------------------------------------------------

GPU_SHAPE = (8, 3, 224, 224, 16, 2, 192)  # ViT-Ti/16 at 224² compressed to /32: B=8, 196 -> 49 tokens


@needs_cuda
@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
def test_cuda_bfloat16_at_vit_shape_within_twice_torch_error(variant):
    inputs = make_inputs(GPU_SHAPE, variant, "channels_last", dtype=torch.bfloat16, device="cuda")
    out = triton_mcl_embed(*inputs)
    exact = reference(*converted(inputs, torch.float32))
    for name, o, t, e in zip(NAMES, out, reference(*inputs), exact):
        if e is None:
            assert o is None
            continue
        assert o.is_cuda and o.is_contiguous() and o.dtype == torch.bfloat16
        torch_err = (t.float() - e).abs().max().item()
        our_err = (o.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"bf16 {name}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


@needs_cuda
def test_cuda_float32_at_vit_shape():
    inputs = make_inputs(GPU_SHAPE, "tied", device="cuda")
    expected = reference(*converted(inputs, torch.float64))
    tol = fp32_atol(inputs) if torch.get_float32_matmul_precision() == "highest" else 5e-3
    for name, o, e in zip(NAMES, triton_mcl_embed(*inputs), expected):
        assert_close(f"cuda fp32 {name}", o, e.float(), atol=tol, rtol=tol)
