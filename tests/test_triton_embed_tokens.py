"""The Triton `embed_tokens` kernel against the reference (conv2d + cat + add), called directly and through
the public API with ``backend="triton"``.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the shapes are
small; the real ViT shape runs only on a CUDA device.
"""
import pytest
import torch

import mcl_kernels as mk
from helpers import assert_close, make_image, rand
from mcl_kernels import backends
from mcl_kernels.reference import embed_tokens as reference

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from mcl_kernels.triton.embed_tokens import embed_tokens as triton_embed  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU shape runs only on one")

# (B, C, H, W, P, D). The interpreter's tile is 32 tokens x 32 channels x 32 K.
SHAPES = [
    (2, 3, 8, 16, 4, 20),   # non-square; K = 48 (ragged K tile); D = 20 (ragged D tile); 2 images in one M tile
    (1, 1, 16, 8, 8, 40),   # batch 1, one channel; D = 40 spans two D tiles
    (3, 3, 16, 24, 4, 8),   # N = 24: images 1 and 2 start mid-tile, so class-token rows come from inside tiles
    (2, 3, 16, 16, 8, 40),  # P = 8, K = 192
]
# Which optional parts are given; "pos3" is the position embedding as [1, T, D] instead of [T, D]; "cls1" the
# class token as a flat [D] instead of [1, 1, D].
PARTS = ["", "bias", "cls", "cls1+pos", "bias+cls+pos3", "bias+pos"]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def make_inputs(shape, parts, layout="contiguous", dtype=torch.float32, device="cpu"):
    """Inputs drawn in float64 and rounded to ``dtype``; the weight scaled so outputs are O(1)."""
    B, C, H, W, P, D = shape
    names = set(parts.split("+")) - {""}
    T = (H // P) * (W // P) + bool(names & {"cls", "cls1"})

    def r(*size, scale=1.0):
        return rand(*size, scale=scale, dtype=dtype, device=device)

    x = make_image(B, C, H, W, layout, dtype, device)
    w = r(D, C, P, P, scale=(C * P * P) ** -0.5)
    b = r(D) if "bias" in names else None
    cls = r(1, 1, D) if "cls" in names else r(D) if "cls1" in names else None
    pos = r(1, T, D) if "pos3" in names else r(T, D) if "pos" in names else None
    return x, w, b, cls, pos


def to64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def fp32_atol(w):
    """DESIGN §4: float32 tight, 1e-4 scaled by sqrt(K)."""
    return 1e-4 * w[0].numel() ** 0.5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("parts", PARTS, ids=lambda p: p or "none")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}_{}x{}_P{}D{}".format(*s))
def test_float32_matches_reference(shape, parts, layout):
    inputs = make_inputs(shape, parts, layout)
    out = triton_embed(*inputs)
    expected = reference(*to64(*inputs)).float()
    assert out.is_contiguous()
    assert_close(f"triton embed_tokens {parts or 'none'} {layout}", out, expected, atol=fp32_atol(inputs[1]),
                 rtol=1e-5)


def test_empty_batch_launches_nothing_and_keeps_the_shape():
    x, w, b, cls, pos = make_inputs((0, 3, 8, 16, 4, 20), "bias+cls+pos")
    out = triton_embed(x, w, b, cls, pos)
    assert out.shape == (0, 9, 20) and out.dtype == torch.float32


def test_strided_parameters():
    """Weight, bias, class token and position embedding read through their strides, like x."""
    x, w, b, cls, pos = make_inputs((2, 3, 8, 16, 4, 20), "bias+cls+pos")
    w_t = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # [D, C, P, P] with channels innermost
    b_s, cls_s = torch.stack([b, -b], 1)[:, 0], torch.stack([cls.reshape(-1), -cls.reshape(-1)], 1)[:, 0]
    pos_t = pos.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (w_t, b_s, cls_s, pos_t))
    assert_close("strided parameters", triton_embed(x, w_t, b_s, cls_s, pos_t), reference(x, w, b, cls, pos),
                 atol=fp32_atol(w), rtol=1e-5)


def test_float64_accumulates_in_float64():
    inputs = make_inputs((2, 3, 8, 16, 4, 20), "bias+cls+pos", "channels_last", dtype=torch.float64)
    assert_close("triton embed_tokens float64", triton_embed(*inputs), reference(*inputs), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=lambda s: "B{}C{}_{}x{}_P{}D{}".format(*s))
def test_low_precision_within_twice_torch_error(shape, dtype, layout):
    """Judged against PyTorch's own error: the reference in ``dtype`` vs the reference in float32, both from
    the same ``dtype`` inputs."""
    inputs = make_inputs(shape, "bias+cls+pos", layout, dtype=dtype)
    out = triton_embed(*inputs)
    exact = reference(*(None if t is None else t.float() for t in inputs))
    torch_err = (reference(*inputs).float() - exact).abs().max().item()
    our_err = (out.float() - exact).abs().max().item()
    assert out.dtype == dtype and out.is_contiguous()
    assert our_err <= 2 * torch_err + 1e-3, f"{dtype}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


# ---- through the public API -------------------------------------------------------------------------------

@pytest.fixture
def triton_backend():
    """The public API reaches this kernel only once backends.py registers it."""
    assert "embed_tokens" in backends.BACKENDS["triton"].ops, (
        "the 'triton' backend does not register embed_tokens: add it to BACKENDS['triton'].ops in backends.py")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_public_api_forward_and_gradients_match_reference(triton_backend, layout):
    x, w, b, cls, pos = make_inputs((2, 3, 8, 16, 4, 20), "bias+cls+pos3", layout)
    params = [t.requires_grad_(True) for t in (x, w, b, cls, pos)]
    out = mk.embed_tokens(*params, backend="triton")
    expected = reference(*params)
    assert_close(f"forward {layout}", out, expected, atol=fp32_atol(w), rtol=1e-5)
    up = torch.randn_like(expected)
    # No Triton backward: the op layer falls back to the reference's, which must see the same saved inputs.
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, params, up), torch.autograd.grad(expected, params, up))):
        assert_close(f"grad {i} {layout}", g, e, atol=1e-4, rtol=1e-5)


def test_public_api_without_optional_parts_and_empty_batch(triton_backend):
    x, w, _, _, _ = make_inputs((1, 1, 16, 8, 8, 40), "")
    assert_close("no bias/cls/pos", mk.embed_tokens(x, w, backend="triton"), reference(x, w, None, None, None),
                 atol=fp32_atol(w), rtol=1e-5)
    x0, w0, b0, cls0, pos0 = make_inputs((0, 3, 8, 16, 4, 20), "bias+cls1+pos")
    assert mk.embed_tokens(x0, w0, b0, cls0, pos0, backend="triton").shape == (0, 9, 20)


# ---- on a GPU, at a real ViT shape -------------------------------------------------------------------------

GPU_SHAPE = (8, 3, 224, 224, 32, 384)  # ViT-S/32 at 224²: B=8, N=49, K=3072


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_float32_at_vit_shape(layout):
    inputs = make_inputs(GPU_SHAPE, "bias+cls+pos3", layout, device="cuda")
    out = triton_embed(*inputs)
    expected = reference(*to64(*inputs)).float()
    assert out.is_cuda and out.is_contiguous()
    # fp32 runs exact fp32 unless PyTorch's matmul precision allows TF32; judge at TF32 precision then.
    tol = fp32_atol(inputs[1]) if torch.get_float32_matmul_precision() == "highest" else 5e-3
    assert_close(f"cuda triton embed_tokens {layout}", out, expected, atol=tol, rtol=tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_at_vit_shape_within_twice_torch_error(dtype):
    inputs = make_inputs(GPU_SHAPE, "bias+cls+pos", "channels_last", dtype=dtype, device="cuda")
    exact = reference(*(None if t is None else t.float() for t in inputs))
    torch_err = (reference(*inputs).float() - exact).abs().max().item()
    our_err = (triton_embed(*inputs).float() - exact).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-3, f"{dtype}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


@needs_cuda
def test_cuda_public_api_and_compiled_launch(triton_backend):
    inputs = make_inputs(GPU_SHAPE, "bias+cls+pos", device="cuda")
    expected = reference(*to64(*inputs)).float()
    assert_close("cuda public API", mk.embed_tokens(*inputs, backend="triton"), expected, atol=5e-3, rtol=5e-3)
    # Launched through torch.library.wrap_triton, the kernel traces into a compiled graph without breaks.
    compiled = torch.compile(triton_embed, fullgraph=True)
    assert_close("cuda torch.compile", compiled(*inputs), expected, atol=5e-3, rtol=5e-3)
