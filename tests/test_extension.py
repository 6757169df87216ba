"""The compiled extension `mcl_kernels._C` on its own: `embed_tokens` against conv2d + cat + add.

These tests call the C++/CUDA entry points directly, below the op layer (`mcl_kernels.ops`), so they
pin down the native contract: layouts, dtypes, optional parts, and the errors raised from C++.
"""

import platform

import pytest
import torch

from helpers import assert_close, extension_or_skip, make_image, rand
from mcl_kernels.reference import embed_tokens as reference

_C = extension_or_skip()

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")
needs_cuda_build = pytest.mark.skipif(not _C.built_with_cuda, reason="mcl_kernels._C was built without CUDA")

# (B, C, H, W, D, P): batch 0/1/3, non-square images, D not a multiple of 16, patch 14, an odd patch (bf16 then
# takes the patch-matrix path); patch rows longer than the direct kernel's 7 rows (9 -> 5 + 4, 16 -> 6 + 5 + 5)
# and widths over one 64-column panel with a ragged last one (100 = 64 + 36, 130 = 64 + 64 + 2).
SHAPES = [(0, 3, 64, 96, 40, 32), (1, 3, 64, 96, 40, 32), (3, 3, 64, 96, 40, 32), (2, 2, 12, 20, 7, 4),
          (2, 3, 28, 42, 24, 14), (2, 3, 15, 25, 20, 5), (3, 3, 16, 36, 100, 4), (2, 3, 28, 224, 130, 14)]
# Which optional parts are given; "pos3" is the position embedding as [1, T, D] instead of [T, D].
PARTS = ["", "bias", "cls", "pos", "pos3", "bias+cls+pos", "bias+cls+pos3", "cls+pos", "bias+pos3"]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def make_inputs(shape, parts, layout="contiguous", dtype=torch.float32, device="cpu"):
    """Inputs in float64 rounded through `dtype`, weights scaled so outputs are O(1)."""
    B, C, H, W, D, P = shape
    names = set(parts.split("+")) - {""}
    T = (H // P) * (W // P) + ("cls" in names)

    def r(*size, scale=1.0):
        return rand(*size, scale=scale, dtype=dtype, device=device)

    x = make_image(B, C, H, W, layout, dtype, device)
    w = r(D, C, P, P, scale=(C * P * P) ** -0.5)
    b = r(D) if "bias" in names else None
    cls = r(1, 1, D) if "cls" in names else None
    pos = r(1, T, D) if "pos3" in names else r(T, D) if "pos" in names else None
    return x, w, b, cls, pos


def embed(x, w, b, cls, pos):
    return _C.embed_tokens(x, w, b, cls, pos, w.shape[-1])


def to64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def test_reports_whether_built_with_cuda():
    assert isinstance(_C.built_with_cuda, bool)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("parts", PARTS, ids=lambda p: p or "none")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}_{}x{}_D{}P{}".format(*s))
def test_float32_matches_conv_reference(shape, parts, layout):
    inputs = make_inputs(shape, parts, layout)
    out = embed(*inputs)
    expected = reference(*to64(*inputs)).float()
    assert out.is_contiguous()
    assert_close(f"embed_tokens {parts or 'none'} {layout}", out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float64_is_exact_to_rounding(layout):
    inputs = make_inputs((3, 3, 64, 96, 40, 32), "bias+cls+pos", layout, dtype=torch.float64)
    assert_close("embed_tokens float64", embed(*inputs), reference(*inputs), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "B{}C{}_{}x{}_D{}P{}".format(*s))
def test_low_precision_within_twice_torch_error(shape, dtype, layout):
    """Judged against PyTorch's own error: conv2d + cat + add in the same dtype vs float64."""
    inputs = make_inputs(shape, "bias+cls+pos", layout, dtype=dtype)
    out = embed(*inputs)
    exact = reference(*to64(*inputs))
    torch_err = (reference(*inputs).double() - exact).abs().max().item()
    our_err = (out.double() - exact).abs().max().item()
    assert out.dtype == dtype
    assert our_err <= 2 * torch_err + 1e-3, f"{dtype}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])  # the direct kernel where the CPU has it; tiles
@pytest.mark.parametrize("shape", [(7, 3, 28, 42, 24, 14), (61, 2, 12, 20, 7, 4), (9, 3, 16, 36, 100, 4)],
                         ids=["B7", "B61", "B9"])
def test_tiles_of_patch_rows_across_images_and_threads(shape, dtype, layout, threads):
    """The CPU kernel splits the batch's patches into equal tiles, several per thread once they pass 160 per
    thread, of whole patch rows when there are 8 per tile: tiles that start and end inside a patch row and span
    images must give the same rows, and bitwise the same as on one thread (each output element is one sum in a
    fixed order)."""
    inputs = make_inputs(shape, "bias+cls+pos", layout, dtype=dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = embed(*inputs)
        torch.set_num_threads(threads)
        out = embed(*inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, one), f"{threads} threads differ from 1"
    exact = reference(*to64(*inputs))
    if dtype == torch.float32:
        assert_close(f"embed_tokens {threads} threads", out, exact.float(), atol=1e-4, rtol=1e-4)
    else:
        torch_err = (reference(*inputs).double() - exact).abs().max().item()
        our_err = (out.double() - exact).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"error {our_err:.3g} vs torch's own {torch_err:.3g}"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None


def _best_isa(flags):
    return "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "none"


on_x86_with_flags = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cpu_flags() is None,
                                       reason="the direct kernels are x86-64 code; the CPU's flags come from "
                                              "/proc/cpuinfo")


@on_x86_with_flags
def test_direct_kernel_runs_where_the_cpu_has_the_instructions():
    """The direct path (pixels straight from the image) is taken exactly where the CPU has the instructions and
    the input suits it: fp32 with AVX2 + FMA or AVX-512F, bf16 with AVX512-BF16 and an even patch, unit W stride
    only."""
    flags = set(_cpu_flags())
    assert _C.patch_gemm_isa() == _best_isa(flags)
    x = torch.zeros(1, 3, 8, 8)
    assert _C.embed_tokens_cpu_direct(x, 4) == (_best_isa(flags) != "none")
    assert _C.embed_tokens_cpu_direct(x.bfloat16(), 4) == ("avx512f" in flags and "avx512_bf16" in flags)
    assert not _C.embed_tokens_cpu_direct(x.bfloat16(), 1)  # odd patch: bf16 pairs would straddle patches
    assert not _C.embed_tokens_cpu_direct(x.contiguous(memory_format=torch.channels_last), 4)
    assert not _C.embed_tokens_cpu_direct(x.half(), 4)
    assert not _C.embed_tokens_cpu_direct(x.double(), 4)


def _isas_here():
    """The ISAs the patch kernels can be set to on this CPU, best first ("none": the patch-matrix path)."""
    order = ["avx512", "avx2", "none"]
    return order[order.index(_C.patch_gemm_isa()):]


@pytest.fixture
def restore_isa():
    best = _C.patch_gemm_isa()
    yield
    _C.set_patch_gemm_isa(best)


@on_x86_with_flags
def test_patch_gemm_isa_can_be_lowered_not_raised(restore_isa):
    """set_patch_gemm_isa takes every ISA up to the CPU's best and refuses the rest by name; with "none" (or bf16
    on a CPU without AVX512-BF16, or any bf16 under "avx2") the direct path is off."""
    best = _C.patch_gemm_isa()
    x = torch.zeros(1, 3, 8, 8)
    for isa in _isas_here():
        _C.set_patch_gemm_isa(isa)
        assert _C.patch_gemm_isa() == isa
        assert _C.embed_tokens_cpu_direct(x, 4) == (isa != "none")
        if isa != "avx512":
            assert not _C.embed_tokens_cpu_direct(x.bfloat16(), 4)
    for isa in ["avx512", "avx2"][:["avx512", "avx2", "none"].index(best)]:
        with pytest.raises(RuntimeError, match=f"cannot run {isa} kernels on this CPU"):
            _C.set_patch_gemm_isa(isa)
    with pytest.raises(RuntimeError, match='expected "avx512", "avx2" or "none", got "sse"'):
        _C.set_patch_gemm_isa("sse")


# Shapes for the ISAs' kernels: patch rows of 1..7 patches and 9 (AVX-512 5 + 4; AVX2 at most 6 a call: 7 -> 4 + 3),
# widths with ragged 16-column chunks (D = 7, 24, 40, 100 = 64 + 36) and several panels (130 = 64 + 64 + 2).
ISA_SHAPES = [(2, 3, 28, 42, 24, 14), (3, 3, 16, 36, 100, 4), (2, 2, 12, 20, 7, 4), (1, 3, 8, 56, 130, 8),
              (2, 1, 16, 16, 40, 16)]


@on_x86_with_flags
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_isa_embeds_alike(shape, restore_isa):
    """embed_tokens (fp32) with the patch kernels of every ISA this CPU has: each within fp32 rounding of the
    float64 reference, and the direct kernels (AVX-512, AVX2) bitwise alike: they run each output element as the
    same FMA chain."""
    inputs = make_inputs(shape, "bias+cls+pos", "sliced")
    exact = reference(*to64(*inputs)).float()
    outs = {}
    for isa in _isas_here():
        _C.set_patch_gemm_isa(isa)
        outs[isa] = embed(*inputs)
        assert_close(f"embed_tokens, {isa}", outs[isa], exact, atol=1e-4, rtol=1e-4)
    if "avx512" in outs:
        assert torch.equal(outs["avx512"], outs["avx2"]), "the AVX-512 and AVX2 kernels differ"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batches_split_the_weight_over_threads_bitwise_as_large_ones(dtype, threads):
    """The direct path splits small batches by the weight's panels (each thread packs and runs its own panels over
    every patch) and large ones by patches (cpu/embed_tokens.cpp, by_panels): an image must get bitwise the same rows
    alone as inside a batch too large for the panel split. D = 128 is two 64-column panels (one per thread on 2); an
    image's pixels are 1/8 of the weight's bytes, so batches up to 32 split by panels."""
    inputs = make_inputs((40, 3, 32, 32, 128, 8), "bias+cls+pos", dtype=dtype)
    x = inputs[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        direct = _C.embed_tokens_cpu_direct(x, 8)
        assert _C.embed_tokens_cpu_by_panels(x[:1], 128, 8) == direct
        assert _C.embed_tokens_cpu_by_panels(x[:32], 128, 8) == direct
        assert not _C.embed_tokens_cpu_by_panels(x[:33], 128, 8)
        assert not _C.embed_tokens_cpu_by_panels(x[:1], 192, 8) or threads == 1  # 3 panels do not split over 2
        batch = embed(*inputs)
        alone = torch.cat([embed(x[i:i + 1], *inputs[1:]) for i in range(0, 40, 13)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, batch[0:40:13]), "an image alone differs from the same image in a large batch"
    exact = reference(*to64(*inputs))
    if dtype == torch.float32:
        assert_close("embed_tokens, panels split", batch, exact.float(), atol=1e-4, rtol=1e-4)
    else:
        torch_err = (reference(*inputs).double() - exact).abs().max().item()
        our_err = (batch.double() - exact).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"error {our_err:.3g} vs torch's own {torch_err:.3g}"


@on_x86_with_flags
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_bf16_batches_widen_to_the_fp32_kernels_where_only_those_run(layout, threads):
    """Where the patch kernels run fp32 but not bf16 (AVX2 CPUs; AVX-512 without AVX512-BF16) and no AMX tiles do,
    bf16 images with unit W stride go through the fp32 direct kernels on widened copies of each tile's images
    (embed_tokens_cpu_widened), from one image up: bitwise the fp32 result of the same values rounded once, and an
    image the same alone as in the batch. Patch 14, D = 100 (a ragged second panel), patch rows of 3."""
    inputs = make_inputs((33, 3, 28, 42, 100, 14), "bias+cls+pos", layout, dtype=torch.bfloat16)
    x = inputs[0]
    fp32_kernels = _C.patch_gemm_isa() != "none"
    want = (fp32_kernels and x.stride(3) == 1 and not _C.embed_tokens_cpu_direct(x, 14)
            and not _C.embed_tokens_cpu_amx(x, 14))  # "sliced": W stride 2, the patch-matrix path
    assert _C.embed_tokens_cpu_widened(x, 14) == want
    assert _C.embed_tokens_cpu_widened(x[:1], 14) == want  # the patch matrix measured slower from one image up
    assert not _C.embed_tokens_cpu_widened(x.float(), 14)
    assert not _C.embed_tokens_cpu_widened(x.contiguous(memory_format=torch.channels_last), 14)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = embed(*inputs)
        alone = embed(x[7:8], *inputs[1:])
        widened = embed(*[t.float() for t in inputs]).bfloat16()
    finally:
        torch.set_num_threads(before)
    if want:
        assert torch.equal(out, widened), "the widened bf16 path differs from the fp32 result rounded"
        assert torch.equal(out[7:8], alone), "an image alone differs from the same image in a widened batch"
    exact = reference(*to64(*inputs))
    torch_err = (reference(*inputs).double() - exact).abs().max().item()
    our_err = (out.double() - exact).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-3, f"error {our_err:.3g} vs torch's own {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_matrix_path_with_a_padded_weight_stride(dtype):
    """D = 1024: the packed weight's rows would be 4 KiB apart, so they are packed with a padded stride
    (tile_gemm.h, Gemm::b_ld); channels_last images take the patch-matrix path that multiplies by it."""
    inputs = make_inputs((2, 3, 16, 24, 1024, 4), "bias+cls+pos", "channels_last", dtype=dtype)
    assert not _C.embed_tokens_cpu_direct(inputs[0], 4)
    out = embed(*inputs)
    exact = reference(*to64(*inputs))
    if dtype == torch.float32:
        assert_close("embed_tokens D=1024", out, exact.float(), atol=1e-4, rtol=1e-4)
    else:
        torch_err = (reference(*inputs).double() - exact).abs().max().item()
        our_err = (out.double() - exact).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"error {our_err:.3g} vs torch's own {torch_err:.3g}"


def _has_amx():
    flags = _cpu_flags() or []
    return platform.machine() in ("x86_64", "AMD64") and "amx_bf16" in flags and "amx_tile" in flags


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cpu_flags() is None,
                    reason="the AMX kernels are x86-64 code; the CPU's flags come from /proc/cpuinfo")
def test_amx_kernel_runs_where_the_cpu_has_amx():
    """bf16 images with unit W stride and a patch that is a multiple of 16 run on the AMX tiles exactly where the
    CPU has AMX-BF16 (Linux lets the process use them); everything else takes the other paths."""
    x = torch.zeros(2, 3, 64, 64, dtype=torch.bfloat16)
    assert _C.embed_tokens_cpu_amx(x, 32) == _has_amx()
    assert _C.embed_tokens_cpu_amx(x, 64) == _has_amx()
    assert _C.embed_tokens_cpu_amx(x, 16) == _has_amx()  # a patch row is half a tile row
    assert not _C.embed_tokens_cpu_amx(x, 8)
    assert not _C.embed_tokens_cpu_amx(x[..., :56], 14)
    assert not _C.embed_tokens_cpu_amx(x.float(), 32)
    assert not _C.embed_tokens_cpu_amx(x.contiguous(memory_format=torch.channels_last), 32)


# (B, C, H, W, D, P): groups of one patch position across images (B >= the patch row's patches, B = 17, 33: a
# ragged last group of 1) and of consecutive patches of a patch row (B = 1, 2, 5); one or two column blocks in the
# last pair (D = 17: 16 + 1; 40: 16 + 16 + 8; 48); patch 64 (two tile rows per patch row); patch 16 and 48 (tile
# rows of 16 pixels), 8 channels of it; one channel.
AMX_SHAPES = [(1, 3, 64, 96, 40, 32), (2, 3, 96, 64, 17, 32), (17, 2, 64, 64, 48, 32), (33, 1, 32, 96, 17, 32),
              (5, 3, 128, 64, 24, 64), (20, 3, 224, 224, 130, 32), (3, 3, 48, 80, 40, 16), (18, 3, 64, 32, 33, 16),
              (2, 2, 96, 48, 24, 48), (3, 8, 32, 48, 20, 16)]


@pytest.mark.skipif(not _has_amx(), reason="needs a CPU with AMX-BF16 (Intel Xeon 4th gen or later)")
@pytest.mark.parametrize("rows", ["contiguous", "every other row"])
@pytest.mark.parametrize("parts", ["", "bias+cls+pos", "cls+pos"])
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=lambda s: "B{}C{}_{}x{}_D{}P{}".format(*s))
def test_amx_kernel_within_twice_torch_error_and_bitwise_across_threads(shape, parts, rows):
    """The AMX path against conv2d + cat + add in float64 (error within twice PyTorch's own bf16 error), and
    bitwise the same on 1, 2 and 3 threads (a row's sum does not depend on which calls its group lands in).
    "every other row": a view with twice the row stride (the kernel needs only a unit W stride)."""
    inputs = make_inputs(shape, parts, dtype=torch.bfloat16)
    if rows != "contiguous":
        B, C, H, W = inputs[0].shape
        tall = rand(B, C, 2 * H, W, dtype=torch.bfloat16)
        inputs = (tall[:, :, ::2],) + tuple(inputs[1:])
        assert not inputs[0].is_contiguous()
    assert _C.embed_tokens_cpu_amx(inputs[0], shape[-1])
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(embed(*inputs))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), "thread counts differ"
    exact = reference(*to64(*inputs))
    torch_err = (reference(*inputs).double() - exact).abs().max().item()
    our_err = (outs[0].double() - exact).abs().max().item()
    assert outs[0].dtype == torch.bfloat16 and outs[0].shape == exact.shape
    assert our_err <= 2 * torch_err + 1e-3, f"error {our_err:.3g} vs torch's own {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_w_stride_views_with_other_strides(dtype):
    """The direct kernel needs only a unit W stride: a view with every other row, a channel slice and a column
    offset (strides and offset unlike a contiguous image's) must give the reference's rows."""
    big = rand(3, 5, 2 * 16, 36 + 8, dtype=dtype)
    x = big[:, 1:4, ::2, 8:]  # [3, 3, 16, 36]: row stride 2 * 44, offset 1 channel + 8 columns
    assert x.stride(3) == 1 and not x.is_contiguous()
    _, w, b, cls, pos = make_inputs((3, 3, 16, 36, 100, 4), "bias+cls+pos", dtype=dtype)
    out = embed(x, w, b, cls, pos)
    expected = reference(*to64(x, w, b, cls, pos))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close(f"embed_tokens {dtype} strided view", out.double(), expected, atol=tol, rtol=tol)


def test_cls_token_as_flat_vector_and_empty_batch_shape():
    x, w, b, cls, pos = make_inputs((0, 3, 64, 96, 40, 32), "bias+cls+pos")
    out = embed(x, w, b, cls.reshape(-1), pos)
    assert out.shape == (0, 7, 40) and out.dtype == torch.float32
    x, w, b, cls, pos = make_inputs((2, 3, 64, 96, 40, 32), "bias+cls+pos")
    assert_close("cls [D]", embed(x, w, b, cls.reshape(-1), pos), embed(x, w, b, cls, pos), atol=0)


def test_output_is_fresh_memory():
    x, w, b, cls, pos = make_inputs((1, 3, 32, 32, 8, 32), "")  # one patch: [1, 1, 8]
    out = embed(x, w, b, cls, pos)
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (x, w))


def _bad_inputs():
    x, w, b, cls, pos = make_inputs((2, 3, 64, 96, 40, 32), "bias+cls+pos")
    yield "H not a multiple of P", (torch.randn(2, 3, 50, 96), w, b, None, None, 32), ValueError, r"50x96.*32"
    yield "rank-3 image", (x[0], w, b, None, None, 32), ValueError, r"\[3, 64, 96\]"
    yield "channel mismatch", (torch.randn(2, 4, 64, 96), w, b, None, None, 32), ValueError, r"\[2, 4, 64, 96\]"
    yield "patch vs weight", (x, w, b, None, None, 16), ValueError, r"\[40, 3, 32, 32\]"
    yield "zero patch", (x, w, b, None, None, 0), ValueError, "positive patch size, got 0"
    yield "bias size", (x, w, torch.randn(41), None, None, 32), ValueError, r"\[40\].*\[41\]"
    yield "cls size", (x, w, b, torch.randn(1, 1, 39), None, 32), ValueError, r"\[1, 1, 39\]"
    yield "pos without cls row", (x, w, b, None, pos, 32), ValueError, r"\[6, 40\].*got \[7, 40\]"
    yield "pos size", (x, w, b, cls, pos[:5], 32), ValueError, r"\[7, 40\].*got \[5, 40\]"
    yield "weight dtype", (x, w.double(), b, None, None, 32), TypeError, "weight has dtype Double"
    yield "pos dtype", (x, w, b, cls, pos.half(), 32), TypeError, "pos_embed has dtype Half"
    yield "integer image", (x.int(), w, b, None, None, 32), TypeError, "Int"
    yield "meta tensors", (x.to("meta"), w.to("meta"), None, None, None, 32), NotImplementedError, "meta"


@pytest.mark.parametrize("name,args,exc,match", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_with_offending_sizes(name, args, exc, match):
    with pytest.raises(exc, match=match):
        _C.embed_tokens(*args)


# ---- CUDA: run where there is a device, skip cleanly where there is none ----

@needs_cuda
@needs_cuda_build
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("parts", ["", "bias+cls+pos", "cls+pos3", "bias"], ids=lambda p: p or "none")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}_{}x{}_D{}P{}".format(*s))
def test_cuda_float32_matches_conv_reference(shape, parts, layout):
    inputs = make_inputs(shape, parts, layout, device="cuda")
    out = embed(*inputs)
    expected = reference(*to64(*(t if t is None else t.cpu() for t in inputs))).float()
    assert out.is_cuda and out.is_contiguous()
    # TF32 may be on for the GEMM: judge at TF32 precision.
    tol = 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    assert_close(f"cuda embed_tokens {parts or 'none'} {layout}", out.cpu(), expected, atol=tol, rtol=tol)


@needs_cuda
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_within_twice_torch_error(dtype):
    inputs = make_inputs((3, 3, 64, 96, 40, 32), "bias+cls+pos", "channels_last", dtype=dtype, device="cuda")
    exact = reference(*to64(*inputs))
    torch_err = (reference(*inputs).double() - exact).abs().max().item()
    our_err = (embed(*inputs).double() - exact).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-3, f"{dtype}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


@needs_cuda
def test_cuda_device_mismatch_or_missing_build_is_explained():
    x, w, b, cls, pos = make_inputs((1, 3, 32, 32, 8, 32), "bias")
    if _C.built_with_cuda:
        with pytest.raises(ValueError, match="weight is on cpu but the input x is on cuda"):
            embed(x.cuda(), w, b, None, None)
    else:
        with pytest.raises(RuntimeError, match="MCL_KERNELS_BUILD_CUDA=1"):
            embed(x.cuda(), w.cuda(), b.cuda(), None, None)
