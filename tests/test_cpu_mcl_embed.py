"""The fused C++ training embedding on the CPU (`mcl_kernels._C.mcl_embed`, `mcl_compress` and their backward
functions) against the reference: S, L, R and every gradient (image, every weight and bias), called directly
and through the public API with ``backend="cpu"``.

Shapes cover DESIGN §4: batch 1 and 0, non-square images, D not a multiple of 16, k = 3, patch 14, tied and
untied decompression, none, no biases, contiguous / channels_last / sliced images, fp32 / fp64 / bf16 / fp16,
1 and 2 threads, and a batch large enough for several tiles per thread.

What is promised across runs (csrc/cpu/mcl_embed.cpp): results are bitwise reproducible for a given
``torch.get_num_threads()``. They depend on the thread count only through the tiling: a batch with at least one
full tile per thread is tiled the same way for any thread count, and then the results are bitwise identical
too (weight gradients are summed tile by tile in tile order, never per thread); smaller batches are split into
one tile per thread, which regroups those sums, and agree to rounding.
"""
import pytest
import torch

import mcl_kernels as mk
from helpers import assert_close, extension_or_skip, mcl_embed_inputs, rand
from mcl_kernels import reference

_C = extension_or_skip()

# (B, C, H, W, p, k, D)
SHAPES = [
    (2, 3, 16, 24, 4, 2, 20),   # non-square; D = 20 (not a multiple of 16)
    (1, 2, 12, 18, 2, 3, 16),   # batch 1; k = 3; K = C*p*p = 8
    (3, 1, 24, 12, 3, 2, 40),   # K = 9 (odd); several large rows per image
    (1, 1, 28, 28, 14, 2, 16),  # patch 14: K = 196
    (1, 3, 16, 40, 4, 2, 72),   # rows of 10 small patches (5 + 5 per direct-kernel call); D = 64 + 8: two panels
    (2, 3, 32, 64, 16, 2, 72),  # patch 16 (fp32, unit W stride: dE read from the pixels), K = 768: 12 panels
    (1, 2, 64, 64, 32, 2, 20),  # patch 32: a panel is 2 image rows of 2 runs of 16 pixels
    (1, 3, 64, 64, 32, 2, 256),  # k*k*D = 1024 and K = 3072: padded B row strides (tile_gemm.h, padded_ld)
]
MANY_TILES = (12, 1, 64, 16, 2, 2, 8)  # 192 large rows of 4 tokens: several tiles per thread, forward and backward
VARIANTS = ["untied", "tied", "nodecomp", "nobias"]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
GRADS = ("x", "proj_w", "proj_b", "comp_w", "comp_b", "decomp_w", "decomp_b")
NAMES = ("S", "L", "R")


def shape_id(s):
    return "B{}C{}_{}x{}_p{}k{}D{}".format(*s)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thread")
def threads(request):
    """Runs the test with torch.set_num_threads(n), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


make_inputs = mcl_embed_inputs  # (x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k); helpers.py


def cast(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


def upstream(outputs, missing=()):
    """Random upstream gradients for (S, L, R); those named in ``missing`` are None."""
    ups = [None if o is None else torch.randn_like(o) for o in outputs]
    return [None if name in missing else u for name, u in zip(NAMES, ups)]


def needs_for(inputs):
    return [t is not None for t in inputs[:7]]


def fp32_atol(inputs, tokens):
    """DESIGN §4: 1e-4 scaled by sqrt of the longest reduction (C·p·p, k²·D, or the token count)."""
    x, pw, _, cw, *_ = inputs
    return 1e-4 * max(pw[0].numel(), cw.shape[1], tokens, 1) ** 0.5


def cpu_forward_backward(inputs, missing=(), needs=None):
    """The C++ forward, upstream gradients, and the C++ gradients."""
    *tensors, k = inputs
    out = _C.mcl_embed(*tensors, k)
    ups = upstream(out, missing)
    grads = _C.mcl_embed_backward(*ups, *tensors, out[0], out[1], k, needs or needs_for(inputs))
    return out, ups, grads


def reference_forward_backward(inputs, out, ups, needs, dtype):
    """The reference's outputs and gradients computed in ``dtype`` from the same values."""
    *tensors, k = inputs
    t = cast(tensors, dtype)
    want_out = reference.mcl_embed(*t, k)
    want = reference.mcl_embed_backward(*cast(ups, dtype), *t, *cast(out[:2], dtype), k, needs)
    return want_out, want


def check_all(label, out, grads, want_out, want, atol, rtol, dtype):
    for name, o, e in zip(NAMES, out, want_out):
        if o is not None:
            assert o.is_contiguous() and o.dtype == dtype, f"{label} {name}: {o.dtype} contiguous={o.is_contiguous()}"
        assert_close(f"{label} {name}", o, None if e is None else e.to(dtype), atol=atol, rtol=rtol)
    for name, g, w in zip(GRADS, grads, want):
        if g is not None:
            assert g.is_contiguous() and g.dtype == dtype, f"{label} grad {name}: {g.dtype}"
        assert_close(f"{label} grad {name}", g, None if w is None else w.to(dtype), atol=atol, rtol=rtol)


# ---- float32 and float64 against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float32_outputs_and_every_gradient_match_reference(shape, variant, layout, threads):
    inputs = make_inputs(shape, variant, layout)
    out, ups, grads = cpu_forward_backward(inputs)
    want_out, want = reference_forward_backward(inputs, out, ups, needs_for(inputs), torch.float64)
    atol = fp32_atol(inputs, out[0].shape[0] * out[0].shape[1])
    check_all(f"{shape_id(shape)} {variant} {layout}", out, grads, want_out, want, atol, 1e-5, torch.float32)


def test_unit_w_stride_view_with_other_strides():
    """The forward's direct path needs only a unit W stride: every other image row, a channel slice and a
    column offset must give the reference's outputs and gradients."""
    x, *params, k = make_inputs((1, 3, 16, 40, 4, 2, 72), "untied")
    big = torch.randn(1, 5, 32, 48, dtype=torch.float64).float()
    view = big[:, 1:4, ::2, 8:]
    view.copy_(x)
    assert view.stride(3) == 1 and not view.is_contiguous()
    inputs = (view, *params, k)
    out, ups, grads = cpu_forward_backward(inputs)
    want_out, want = reference_forward_backward(inputs, out, ups, needs_for(inputs), torch.float64)
    check_all("strided view", out, grads, want_out, want, fp32_atol(inputs, out[0].shape[1]), 1e-5, torch.float32)


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_float32_several_tiles_per_thread(variant, threads):
    inputs = make_inputs(MANY_TILES, variant, "channels_last")
    out, ups, grads = cpu_forward_backward(inputs)
    want_out, want = reference_forward_backward(inputs, out, ups, needs_for(inputs), torch.float64)
    atol = fp32_atol(inputs, out[0].shape[0] * out[0].shape[1])
    check_all(f"many tiles {variant}", out, grads, want_out, want, atol, 1e-5, torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_is_exact_to_rounding(variant):
    """In float64 the kernel's index math is checked to 1e-12: a mistake cannot hide in rounding."""
    inputs = make_inputs(SHAPES[0], variant, "sliced", dtype=torch.float64)
    out, ups, grads = cpu_forward_backward(inputs)
    want_out, want = reference_forward_backward(inputs, out, ups, needs_for(inputs), torch.float64)
    check_all(f"float64 {variant}", out, grads, want_out, want, 1e-12, 1e-12, torch.float64)


@pytest.mark.parametrize("missing", [("S",), ("L",), ("R",), ("S", "R"), ("L", "R"), ("S", "L", "R")])
def test_absent_upstream_gradients_count_as_zero(missing):
    inputs = make_inputs(SHAPES[2], "untied")
    out, ups, grads = cpu_forward_backward(inputs, missing)
    zeros = [torch.zeros_like(o) if u is None else u for o, u in zip(out, ups)]
    _, want = reference_forward_backward(inputs, out, zeros, needs_for(inputs), torch.float64)
    check_all(f"missing {missing}", out[:0], grads, [], want, fp32_atol(inputs, 72), 1e-5, torch.float32)


@pytest.mark.parametrize("needs", [[True, False, False, False, False, False, False],
                                   [False, True, True, False, False, False, False],
                                   [False, False, False, True, False, False, True],
                                   [False, False, False, False, False, True, False],
                                   [False] * 7])
def test_only_the_gradients_asked_for(needs):
    inputs = make_inputs(SHAPES[0], "untied")
    out, ups, grads = cpu_forward_backward(inputs, needs=needs)
    _, want = reference_forward_backward(inputs, out, ups, needs, torch.float64)
    assert [g is not None for g in grads] == needs
    check_all("needs", out[:0], grads, [], want, fp32_atol(inputs, 48), 1e-5, torch.float32)


def test_empty_batch():
    inputs = make_inputs((0, 3, 16, 24, 4, 2, 20))
    (s, l, r), ups, grads = cpu_forward_backward(inputs)
    assert s.shape == (0, 24, 20) and l.shape == (0, 6, 20) and r.shape == (0, 24, 20)
    for name, g, t in zip(GRADS, grads, inputs):
        assert g.shape == t.shape and not g.any(), f"{name}: {g.shape}"
    _, _, r = _C.mcl_embed(*make_inputs((0, 3, 16, 24, 4, 2, 20), "nodecomp")[:7], 2)
    assert r is None


def test_outputs_and_gradients_are_fresh_memory():
    inputs = make_inputs(SHAPES[0], "untied")
    out, ups, grads = cpu_forward_backward(inputs)
    storages = {t.untyped_storage().data_ptr() for t in (*inputs[:7], *ups) if t is not None}
    assert not any(t.untyped_storage().data_ptr() in storages for t in (*out, *grads))


# ---- bfloat16 and float16: judged against PyTorch's own error ----------------------------------------------

def within_twice_torch_error(label, got, theirs, exact):
    for name, g, t, e in zip(label[1], got, theirs, exact):
        if e is None:
            assert g is None, f"{label[0]} {name}"
            continue
        torch_err = (t.float() - e).abs().max().item()
        our_err = (g.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3, f"{label[0]} {name}: error {our_err:.3g} vs torch's own {torch_err:.3g}"


@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], (2, 3, 28, 42, 7, 2, 24), SHAPES[-1]], ids=shape_id)
def test_low_precision_within_twice_torch_error(shape, dtype, variant, threads):
    """Our error against the reference in float32 (from the same ``dtype`` inputs) is at most twice the
    reference's own error when run in ``dtype``: outputs and every gradient. Patch 7 makes K = 147 odd."""
    inputs = make_inputs(shape, variant, "channels_last", dtype=dtype)
    out, ups, grads = cpu_forward_backward(inputs)
    needs = needs_for(inputs)
    exact_out, exact = reference_forward_backward(inputs, out, ups, needs, torch.float32)
    theirs_out, theirs = reference_forward_backward(inputs, out, ups, needs, dtype)
    for o in (*out, *grads):
        assert o is None or (o.dtype == dtype and o.is_contiguous())
    within_twice_torch_error((f"{dtype} {variant}", NAMES), out, theirs_out, exact_out)
    within_twice_torch_error((f"{dtype} {variant}", GRADS), grads, theirs, exact)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_onednn_the_portable_gemm_path_agrees(dtype):
    """With oneDNN off (torch.backends.mkldnn), brgemm is unavailable: fp32 GEMMs fall back to BLAS and bf16 ones
    to torch's bf16 x bf16 -> fp32 GEMM on plain (not VNNI-packed) operands, the path of CPUs without bf16
    dot products. The results must agree with the fast path's."""
    inputs = make_inputs(SHAPES[2], "tied", "channels_last", dtype=dtype)
    fast_out, ups, fast_grads = cpu_forward_backward(inputs)
    *tensors, k = inputs
    with torch.backends.mkldnn.flags(enabled=False):
        out = _C.mcl_embed(*tensors, k)
        grads = _C.mcl_embed_backward(*ups, *tensors, out[0], out[1], k, needs_for(inputs))
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    for i, (a, b) in enumerate(zip((*out, *grads), (*fast_out, *fast_grads))):
        assert_close(f"result {i} without oneDNN", a, b, atol=atol, rtol=atol)


def test_strided_parameters():
    """Weights and biases are read through their strides (only x's layout is tested above)."""
    x, pw, pb, cw, cb, dw, db, k = make_inputs(SHAPES[0])
    pw_t = pw.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels innermost

    def every_other(b):
        return torch.stack([b, -b], 1)[:, 0]

    strided = (x, pw_t, every_other(pb), cw.t().contiguous().t(), every_other(cb), dw.t().contiguous().t(),
               every_other(db), k)
    assert not any(t.is_contiguous() for t in strided[1:7])
    out, ups, grads = cpu_forward_backward(strided)
    want_out, want = reference_forward_backward(strided, out, ups, needs_for(strided), torch.float64)
    check_all("strided", out, grads, want_out, want, fp32_atol(strided, 48), 1e-5, torch.float32)


# ---- determinism ------------------------------------------------------------------------------------------

def run_twice_bitwise(inputs, ups):
    *tensors, k = inputs
    results = []
    for _ in range(2):
        out = _C.mcl_embed(*tensors, k)
        grads = _C.mcl_embed_backward(*ups, *tensors, out[0], out[1], k, needs_for(inputs))
        results.append([t for t in (*out, *grads) if t is not None])
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_reproducible_for_a_given_thread_count(dtype, threads):
    inputs = make_inputs(MANY_TILES, "untied", dtype=dtype)
    ups = upstream(_C.mcl_embed(*inputs[:7], inputs[7]))
    first, second = run_twice_bitwise(inputs, ups)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two runs with the same thread count differ"


def results_at(threads, inputs, ups):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return run_twice_bitwise(inputs, ups)[0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_across_thread_counts_bitwise_when_tiles_fill_every_thread(dtype):
    inputs = make_inputs(MANY_TILES, "untied", dtype=dtype)  # 192 large rows: the tiling ignores the thread count
    ups = upstream(_C.mcl_embed(*inputs[:7], inputs[7]))
    one, two, three = (results_at(n, inputs, ups) for n in (1, 2, 3))
    for i, (a, b, c) in enumerate(zip(one, two, three)):
        assert torch.equal(a, b) and torch.equal(a, c), f"result {i} differs between 1, 2 and 3 threads"


def test_weight_gradient_from_the_pixels_bitwise_across_threads_and_agrees_with_im2col():
    """Patch 16 in fp32 with unit W stride: dE's kernel reads the pixels from x (no im2col stack). Several tiles
    per thread, so 1, 2 and 3 threads must agree bitwise; the same image channels_last takes the im2col path,
    which must agree to rounding, and both the float64 reference."""
    inputs = make_inputs((48, 1, 128, 64, 16, 2, 24), "untied")  # 192 large rows of 2 large tokens
    ups = upstream(_C.mcl_embed(*inputs[:7], inputs[7]))
    one, two, three = (results_at(n, inputs, ups) for n in (1, 2, 3))
    for i, (a, b, c) in enumerate(zip(one, two, three)):
        assert torch.equal(a, b) and torch.equal(a, c), f"result {i} differs between 1, 2 and 3 threads"
    x, *rest = inputs
    cl = (x.contiguous(memory_format=torch.channels_last), *rest)
    out = _C.mcl_embed(*inputs[:7], inputs[7])
    direct = _C.mcl_embed_backward(*ups, *inputs[:7], out[0], out[1], inputs[7], needs_for(inputs))
    im2col = _C.mcl_embed_backward(*ups, *cl[:7], out[0], out[1], inputs[7], needs_for(inputs))
    _, want = reference_forward_backward(inputs, out, ups, needs_for(inputs), torch.float64)
    atol = fp32_atol(inputs, out[0].shape[0] * out[0].shape[1])
    assert_close("dE, pixels vs im2col", direct[1], im2col[1], atol=atol, rtol=1e-5)
    assert_close("dE, pixels vs reference", direct[1], want[1].float(), atol=atol, rtol=1e-5)


@pytest.fixture
def isas():
    """The ISAs the patch kernels can be set to on this CPU, best first ("none": the im2col path); the best is set
    again afterwards."""
    best = _C.patch_gemm_isa()
    order = ["avx512", "avx2", "none"]
    yield order[order.index(best):]
    _C.set_patch_gemm_isa(best)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[5], SHAPES[6], (2, 1, 32, 64, 16, 2, 40),
                                   (1, 2, 28, 28, 4, 7, 24)], ids=shape_id)
def test_every_isa_forward_and_backward_alike(shape, isas):
    """The training op with the kernels of every ISA this CPU has (AVX-512, AVX2, none: S and dE through the im2col
    tile): outputs and every gradient within fp32 rounding of the float64 reference; S (the patch kernels alone) bitwise
    alike under AVX-512 and AVX2, each element the same FMA chain. The rest goes through the tile GEMMs, oneDNN's brgemm
    under AVX-512 and gemm_avx2 under AVX2, whose sums differ in order. Shapes: rows of 5 + 5 patches and of 7 (k = 7),
    and dE's blocks of 6 and 7 rows at D = 40 (for_each_block gives AVX2 at most 6: 7 -> 4 + 3), ragged 16-column chunks
    (D = 20, 40, 72), patch 16 and 32 (dE from the pixels)."""
    inputs = make_inputs(shape, "untied")
    ups = upstream(_C.mcl_embed(*inputs[:7], inputs[7]))
    results = {}
    for isa in isas:
        _C.set_patch_gemm_isa(isa)
        out = _C.mcl_embed(*inputs[:7], inputs[7])
        grads = _C.mcl_embed_backward(*ups, *inputs[:7], out[0], out[1], inputs[7], needs_for(inputs))
        want_out, want = reference_forward_backward(inputs, out, ups, needs_for(inputs), torch.float64)
        atol = fp32_atol(inputs, out[0].shape[0] * out[0].shape[1])
        check_all(f"{shape_id(shape)} {isa}", out, grads, want_out, want, atol, 1e-5, torch.float32)
        results[isa] = [*out, *grads]
    if "avx512" in results:
        assert torch.equal(results["avx512"][0], results["avx2"][0]), "S: the AVX-512 and AVX2 patch kernels differ"


def test_across_thread_counts_small_batch_equal_to_rounding():
    """12 large rows: one tile at 1 thread, one per thread at 2, so the weight-gradient sums regroup."""
    inputs = make_inputs(SHAPES[2], "untied")
    ups = upstream(_C.mcl_embed(*inputs[:7], inputs[7]))
    one, two = results_at(1, inputs, ups), results_at(2, inputs, ups)
    atol = fp32_atol(inputs, 96)
    for i, (a, b) in enumerate(zip(one, two)):
        assert_close(f"result {i}, 1 vs 2 threads", a, b, atol=atol, rtol=1e-5)


# ---- mcl_compress (chain levels after the first) -------------------------------------------------------------

LEVELS = [(2, 4, 6, 2, 20), (1, 6, 3, 3, 16), (3, 8, 8, 2, 24)]  # (B, grid_h, grid_w, k, D)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("level", LEVELS, ids=lambda s: "B{}_{}x{}_k{}D{}".format(*s))
def test_compress_level_matches_reference(level, variant, threads):
    B, gh, gw, k, D = level
    tokens = rand(B, gh * gw, D)
    _, _, _, cw, cb, dw, db, _ = make_inputs((1, 1, 4 * k, 4 * k, 4, k, D), variant)
    large, recon = _C.mcl_compress(tokens, cw, cb, dw, db, gh, gw, k)
    t64 = cast((tokens, cw, cb, dw, db), torch.float64)
    want_l, want_r = reference.mcl_level(t64[0], (gh, gw), k, *t64[1:])
    atol = 1e-4 * (k * k * D) ** 0.5
    assert_close("L", large, want_l.float(), atol=atol, rtol=1e-5)
    assert_close("R", recon, None if want_r is None else want_r.float(), atol=atol, rtol=1e-5)
    g_large = torch.randn_like(large)
    g_recon = None if recon is None else torch.randn_like(recon)
    needs = [True, True, cb is not None, dw is not None, db is not None]
    grads = _C.mcl_compress_backward(g_large, g_recon, tokens, cw, cb, dw, db, large, gh, gw, k, needs)
    want = reference.mcl_level_backward(*cast((g_large, g_recon, tokens), torch.float64), want_l, (gh, gw), k,
                                        t64[1], t64[3], needs)
    for name, g, w in zip(("tokens", "comp_w", "comp_b", "decomp_w", "decomp_b"), grads, want):
        assert_close(f"grad {name}", g, None if w is None else w.float(), atol=atol * (B * gh * gw) ** 0.5,
                     rtol=1e-5)


# ---- through the public API ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,layout", [("untied", "contiguous"), ("tied", "channels_last"),
                                            ("nodecomp", "sliced"), ("nobias", "contiguous")])
def test_public_api_forward_and_gradients(variant, layout):
    x, pw, pb, cw, cb, dw, db, k = make_inputs(SHAPES[1], variant, layout)
    tied = variant == "tied"
    leaves = [x, pw, pb, cw, cb, None if tied else dw, db]
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in leaves]
    lx, lpw, lpb, lcw, lcb, ldw, ldb = leaves
    out = mk.mcl_embed(lx, lpw, lpb, lcw, lcb, ldw, ldb, compress=k, tied_decompress=tied, backend="cpu")
    expected = reference.mcl_embed(lx, lpw, lpb, lcw, lcb, lcw.t() if tied else ldw, ldb, k)
    atol = fp32_atol((x, pw, pb, cw), 216)
    outs = [out.small, out.large, out.recon]
    for name, o, e in zip(NAMES, outs, expected):
        assert_close(f"forward {name}", o, e, atol=atol, rtol=1e-5)
    pairs = [(o, e) for o, e in zip(outs, expected) if e is not None]
    ups = [torch.randn_like(e) for _, e in pairs]
    params = [t for t in leaves if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], params, ups)
    want = torch.autograd.grad([e for _, e in pairs], params, ups)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"grad {i} {variant} {layout}", g, w, atol=atol, rtol=1e-5)


def test_public_api_chain_of_scales():
    """16 -> 32 -> 64 style chain (here 4 -> 8 -> 16): mcl_embed then mcl_compress, both C++ on the CPU."""
    torch.manual_seed(1)
    m = mk.FusedMCLEmbed(img_size=32, patch_size=4, embed_dim=12, scales=(4, 8, 16), backend="cpu")
    ref = mk.FusedMCLEmbed(img_size=32, patch_size=4, embed_dim=12, scales=(4, 8, 16), backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out, want = m(x), ref(x)
    flat = [t for field in out for t in (field if isinstance(field, tuple) else (field,)) if t is not None]
    flat_want = [t for field in want for t in (field if isinstance(field, tuple) else (field,)) if t is not None]
    for i, (o, e) in enumerate(zip(flat, flat_want)):
        assert_close(f"chain output {i}", o, e, atol=1e-4, rtol=1e-5)
    ups = [torch.randn_like(t) for t in flat]
    got = torch.autograd.grad(flat, list(m.parameters()), ups)
    exp = torch.autograd.grad(flat_want, list(ref.parameters()), ups)
    for (name, _), g, e in zip(m.named_parameters(), got, exp):
        assert_close(f"chain grad {name}", g, e, atol=5e-4, rtol=1e-4)


def test_backend_cpu_is_registered_for_the_training_ops():
    ops = mk.backends.BACKENDS["cpu"].ops
    for op in ("mcl_embed", "mcl_embed_backward", "mcl_compress", "mcl_compress_backward"):
        assert ops[op] is getattr(_C, op)
    assert "mcl_embed" not in mk.backends.BACKENDS["cuda"].ops  # no CUDA kernel behind the same functions


# ---- errors from C++ ----------------------------------------------------------------------------------------

def _bad_calls():
    x, pw, pb, cw, cb, dw, db, k = make_inputs(SHAPES[0])
    yield "image not a multiple of the large patch", (torch.randn(2, 3, 16, 20), pw, pb, cw, cb, dw, db, k), \
        ValueError, r"16x20.*large patch 8"
    yield "channels", (torch.randn(2, 4, 16, 24), pw, pb, cw, cb, dw, db, k), ValueError, r"3 channels"
    yield "comp_w shape", (x, pw, pb, cw[:, :40], cb, dw, db, k), ValueError, r"\[20, 80\].*got \[20, 40\]"
    yield "decomp_b without decomp_w", (x, pw, pb, cw, cb, None, db, k), ValueError, "without decompress.weight"
    yield "dtype", (x, pw.double(), pb, cw, cb, dw, db, k), TypeError, "proj.weight has dtype Double"
    yield "integer image", (x.int(), pw, pb, cw, cb, dw, db, k), TypeError, "Int"
    yield "k = 0", (x, pw, pb, cw, cb, dw, db, 0), ValueError, "positive integer, got 0"
    meta = [None if t is None else t.to("meta") for t in (x, pw, pb, cw, cb, dw, db)]
    yield "meta tensors", (*meta, k), NotImplementedError, "runs on cpu tensors, got tensors on meta"


@pytest.mark.parametrize("name,args,exc,match", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_with_offending_sizes(name, args, exc, match):
    with pytest.raises(exc, match=match):
        _C.mcl_embed(*args)


def test_backward_checks_its_gradients():
    inputs = make_inputs(SHAPES[0])
    *tensors, k = inputs
    s, l, r = _C.mcl_embed(*tensors, k)
    with pytest.raises(ValueError, match=r"gradient of large of shape \[2, 6, 20\], got \[2, 5, 20\]"):
        _C.mcl_embed_backward(None, l[:, :5], None, *tensors, s, l, k, [True] * 7)
    with pytest.raises(ValueError, match="7 flags"):
        _C.mcl_embed_backward(None, l, None, *tensors, s, l, k, [True] * 6)
    no_decomp = list(tensors[:5]) + [None, None]
    with pytest.raises(ValueError, match="no decompression"):
        _C.mcl_embed_backward(None, l, r, *no_decomp, s, l, k, [True] * 7)


# --- phase timers (csrc/cpu/phases.h, benchmarks/cpu_phases.py) -----------------------------------------------

FORWARD_PHASES = {"fwd.small_gemm", "fwd.group", "fwd.large_gemm", "fwd.recon_gemm", "fwd.ungroup"}
BACKWARD_PHASES = {"bwd.group", "bwd.token_gemms", "bwd.stacks", "bwd.bias_sums", "bwd.input_grad",
                   "bwd.weight_gemms", "bwd.embed_grad", "bwd.wall.tiles", "bwd.wall.weight_gemms"}


@pytest.fixture
def phase_timers():
    """The timers on for the test, their counters empty before and after."""
    _C.cpu_phases_take()
    _C.cpu_phases_enable(True)
    yield
    _C.cpu_phases_enable(False)
    _C.cpu_phases_take()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])  # the direct kernels and the im2col path for S
def test_phase_timers_cover_every_phase_of_a_training_step(phase_timers, layout):
    *tensors, k = make_inputs(MANY_TILES, "untied", "channels_last" if layout == "transposed" else "contiguous")
    x = tensors[0] if layout == "contiguous" else tensors[0].transpose(2, 3).contiguous().transpose(2, 3)
    s, l, r = _C.mcl_embed(x, *tensors[1:], k)
    forward = dict(_C.cpu_phases_take())
    assert set(forward) == FORWARD_PHASES and all(t > 0 for t in forward.values())
    _C.mcl_embed_backward(torch.randn_like(s), torch.randn_like(l), torch.randn_like(r), x, *tensors[1:], s, l, k,
                          [True] * 7)
    backward = dict(_C.cpu_phases_take())
    assert set(backward) == BACKWARD_PHASES and all(t > 0 for t in backward.values())
    assert dict(_C.cpu_phases_take()) == {}  # take() zeroed them


def test_phase_timers_cover_mcl_compress(phase_timers):
    tokens = rand(2, 16 * 8, 12)
    cw, dw = rand(12, 4 * 12, scale=0.15), rand(4 * 12, 12, scale=0.3)
    L, R = _C.mcl_compress(tokens, cw, None, dw, None, 16, 8, 2)
    assert set(dict(_C.cpu_phases_take())) == {"fwd.group", "fwd.large_gemm", "fwd.recon_gemm", "fwd.ungroup"}
    _C.mcl_compress_backward(torch.randn_like(L), torch.randn_like(R), tokens, cw, None, dw, None, L, 16, 8, 2,
                             [True] * 5)
    assert {"bwd.group", "bwd.token_gemms", "bwd.stacks", "bwd.input_grad", "bwd.weight_gemms"} <= \
        set(dict(_C.cpu_phases_take()))


def test_phase_timers_are_off_unless_switched_on():
    _C.cpu_phases_take()
    *tensors, k = make_inputs(SHAPES[0])
    _C.mcl_embed(*tensors, k)
    assert _C.cpu_phases_take() == []
