"""The fused Triton `mcl_embed` forward (kernel A: pixels -> S and L, D-tiled; kernel B: R) against the
reference, called directly and through the public API with ``backend="triton"`` (whose backward is
tests/test_triton_mcl_embed_backward.py's subject), and its on-chip budget helper (pure Python: which tilings a
GPU is offered).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) with 16-wide D tiles, so
test widths span several D tiles; the real ViT shapes and widths run only on a CUDA device.
"""
import pytest
import torch

import mcl_kernels as mk
from helpers import assert_close, mcl_embed_inputs
from mcl_kernels import backends
from mcl_kernels.reference import mcl_embed as reference

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from mcl_kernels.triton import mcl_embed as kernel_module  # noqa: E402
from mcl_kernels.triton.mcl_embed import mcl_embed as triton_mcl_embed  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU shape runs only on one")

# (B, C, H, W, p, k, D). The interpreter's tile is 16 large tokens x 16 columns of D x 16 pixels (K).
SHAPES = [
    (2, 3, 16, 24, 4, 2, 20),   # non-square; K = 48; D = 20: two D tiles, the second ragged (phase 2 runs)
    (1, 2, 12, 18, 2, 3, 16),   # batch 1; k = 3; K = 8 (less than one K tile); D = 16: exactly one D tile
    (3, 1, 24, 12, 3, 2, 40),   # K = 9; D = 40: three D tiles; 24 large tokens: two programs, image 1 mid-tile
    (1, 1, 28, 28, 14, 2, 16),  # patch 14: K = 196 (13 K steps, ragged)
    (1, 2, 18, 36, 3, 3, 48),   # k = 3, non-square; D = 48: three full D tiles; K = 18
]
VARIANTS = ["untied", "tied", "nodecomp", "nobias"]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def shape_id(s):
    return "B{}C{}_{}x{}_p{}k{}D{}".format(*s)


make_inputs = mcl_embed_inputs  # (x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k); helpers.py


def converted(inputs, dtype):
    *tensors, k = inputs
    return [None if t is None else t.to(dtype) for t in tensors] + [k]


def fp32_atol(inputs):
    """DESIGN §4: float32 tight, 1e-4 scaled by sqrt(K) (the largest reduction: C·p·p or k²·D)."""
    x, pw, _, cw, *_ = inputs
    return 1e-4 * max(pw[0].numel(), cw.shape[1]) ** 0.5


NAMES = ("S", "L", "R")


# Every shape x variant; the image layouts on all but the largest (the layouts only change pixel addressing).
FLOAT32_CASES = [(s, v, lay) for s in SHAPES for v in VARIANTS for lay in (LAYOUTS if s is not SHAPES[-1]
                                                                            else ["channels_last"])]


@pytest.mark.parametrize("shape,variant,layout", FLOAT32_CASES,
                         ids=[f"{shape_id(s)}-{v}-{lay}" for s, v, lay in FLOAT32_CASES])
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
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]], ids=shape_id)
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


@pytest.mark.parametrize("blocks", [
    {"BLOCK_L": 16, "BLOCK_D": 32, "BLOCK_K": 32},   # D = 40: two D tiles of 32
    {"BLOCK_L": 32, "BLOCK_D": 64, "BLOCK_K": 16},   # one D tile: phase 2 has nothing to do; one program
], ids=["D32", "D64"])
@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_results_do_not_depend_on_the_tiling(monkeypatch, blocks, variant):
    """Other D and row tiles give the same S, L, R (up to fp32 summation order) as the default 16-wide tiles,
    whatever the number of D tiles: the phase-2 reads of S agree with phase 1's on-chip S."""
    inputs = make_inputs(SHAPES[2], variant, "channels_last")
    default = triton_mcl_embed(*inputs)
    monkeypatch.setattr(kernel_module, "INTERPRETER_BLOCKS", blocks)
    other = triton_mcl_embed(*inputs)
    expected = [e.float() for e in reference(*converted(inputs, torch.float64))]
    for name, a, b, e in zip(NAMES, other, default, expected):
        assert_close(f"{blocks} {name}", a, e, atol=fp32_atol(inputs), rtol=1e-5)
        assert_close(f"{blocks} vs default {name}", a, b, atol=fp32_atol(inputs), rtol=1e-5)


# ---- on-chip budget: the tilings a GPU is offered (pure Python) ------------------------------------------

WIDTHS = [192, 384, 768, 1024]  # DeiT-Ti/S/B and ViT-L
GPUS = sorted(kernel_module.SMEM_PER_BLOCK.items())


@pytest.mark.parametrize("gpu,smem", GPUS, ids=[g for g, _ in GPUS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("D", WIDTHS)
def test_budget_offers_only_tilings_that_fit(gpu, smem, dtype, D):
    chosen = kernel_module.choose(kernel_module.GPU_TILINGS, D, dtype, smem)
    assert chosen, f"{gpu} {dtype} D={D}: no tiling offered"
    for t in chosen:
        need = kernel_module.on_chip(t, dtype)
        assert need.smem_bytes <= smem, f"{gpu} {dtype} D={D} {t}: {need.smem_bytes} B > {smem} B"
        assert need.tile_words_per_thread <= kernel_module.MAX_TILE_WORDS_PER_THREAD, f"{t}: {need} (spills)"
        assert D % t.block_d == 0, f"{t}: D tile {t.block_d} pads D = {D}"
        assert t.block_d >= 64 or dtype == torch.float64, f"{t}: narrow D tile offered although wider ones fit"
        assert t.block_l >= 16 and t.block_d >= 16 and t.block_k >= 16  # tl.dot's minimum
    assert chosen[0] == kernel_module.GPU_TILINGS[0] or dtype == torch.float64  # the default wherever it fits
    # The footprint is per program, independent of D: every multiple of 128 is offered the same tilings.
    if D % 128 == 0:
        assert chosen == kernel_module.choose(kernel_module.GPU_TILINGS, 128, dtype, smem)


def test_budget_specific_choices():
    """A few choices worked out by hand from the documented formulas."""
    km, bf16, f32 = kernel_module, torch.bfloat16, torch.float32
    h100, a100 = km.SMEM_PER_BLOCK["H100"], km.SMEM_PER_BLOCK["A100"]
    # The default (64, 64, 16, 3 stages, 8 warps) in bf16: phase 1 = 3·(64·16 + 16·64)·2 + (64·64 + 64·64)·2
    # = 28 KB, phase 2 = 3·(64·64 + 64·64)·2 = 48 KB, epilogue scratch 64·64·4 = 16 KB -> 64 KB; tile words
    # (2·64·64 + 64·16 + 16·64 + 64·64) / 256 threads = 56.
    default = km.Tiling(64, 64, 16, 3, 8)
    assert km.on_chip(default, bf16) == km.OnChip(64 * 1024, 56)
    assert km.choose(km.GPU_TILINGS, 768, bf16, h100)[0] == default == km.choose(km.GPU_TILINGS, 384, f32, a100)[0]
    # Tiles that fit in shared memory but spill registers (measured: tests/test_triton_compile.py's calibration).
    for big in (km.Tiling(64, 64, 64, 3, 4), km.Tiling(128, 128, 32, 2, 8), km.Tiling(64, 128, 32, 3, 8)):
        assert km.on_chip(big, bf16).smem_bytes <= h100 and not km.fits(big, bf16, h100), big
    # Sixteen warps leave 128 registers per thread: the default tile doubled in rows is too many words there.
    assert km.register_cap(16) == 128 and not km.fits(km.Tiling(128, 64, 16, 3, 16), bf16, h100)
    # D = 192: only 64-wide D tiles; D = 20 and D = 96 (96 % 64 = 32): only 32-wide ones.
    assert {t.block_d for t in km.choose(km.GPU_TILINGS, 192, bf16, h100)} == {64}
    assert {t.block_d for t in km.choose(km.GPU_TILINGS, 20, bf16, h100)} == {32}
    assert {t.block_d for t in km.choose(km.GPU_TILINGS, 96, bf16, h100)} == {32}
    # float64 (two words per accumulator element): only the 32-wide D tiles; a device too small for any says so.
    assert {t.block_d for t in km.choose(km.GPU_TILINGS, 768, torch.float64, a100)} == {32}
    with pytest.raises(RuntimeError, match="no tiling of the fused mcl_embed kernel fits 8192 bytes"):
        km.choose(km.GPU_TILINGS, 768, f32, 8 * 1024)


def test_autotuner_prune_offers_what_choose_picks(monkeypatch):
    """The autotuner's prune hook: arguments by position or by name, configs filtered for the device's budget."""
    monkeypatch.setattr(kernel_module, "smem_limit", lambda device: kernel_module.SMEM_PER_BLOCK["A100"])
    configs = [kernel_module._config(t) for t in kernel_module.GPU_TILINGS]
    x = torch.empty(1, dtype=torch.float32)
    want = kernel_module.choose(kernel_module.GPU_TILINGS, 384, torch.float32, kernel_module.SMEM_PER_BLOCK["A100"])
    for named, kwargs in (({"x_ptr": x, "D": 384}, {}), ({}, {"x_ptr": x, "D": 384})):
        kept = kernel_module._prune(configs, named, **kwargs)
        assert [kernel_module._tiling(c) for c in kept] == want


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("D", [384, 768, 1024])
def test_cuda_wide_widths_compile_and_match(dtype, D):
    """DeiT-S/B and ViT-L widths: every tiling the budget offers compiles on this GPU (the autotuner tries them
    all) and the result matches the reference; then deterministic mode's fixed tiling, twice, bitwise equal."""
    inputs = make_inputs((2, 3, 64, 96, 16, 2, D), "untied", "channels_last", dtype=dtype, device="cuda")
    exact = reference(*converted(inputs, torch.float32))
    theirs = reference(*inputs)

    def check(out, label):
        for name, o, t, e in zip(NAMES, out, theirs, exact):
            torch_err = (t.float() - e).abs().max().item()
            our_err = (o.float() - e).abs().max().item()
            slack = 1e-3 if dtype != torch.float32 else 5e-3 * e.abs().max().item()  # fp32: TF32 may be on
            assert our_err <= 2 * torch_err + slack, f"{label} {dtype} D={D} {name}: {our_err:.3g} vs {torch_err:.3g}"

    check(triton_mcl_embed(*inputs), "autotuned")
    torch.use_deterministic_algorithms(True)
    try:
        runs = [triton_mcl_embed(*inputs) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    check(runs[0], "deterministic")
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


@needs_cuda
def test_cuda_float32_at_vit_shape():
    inputs = make_inputs(GPU_SHAPE, "tied", device="cuda")
    expected = reference(*converted(inputs, torch.float64))
    tol = fp32_atol(inputs) if torch.get_float32_matmul_precision() == "highest" else 5e-3
    for name, o, e in zip(NAMES, triton_mcl_embed(*inputs), expected):
        assert_close(f"cuda fp32 {name}", o, e.float(), atol=tol, rtol=tol)
