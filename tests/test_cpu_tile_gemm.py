"""The CPU kernels' single-threaded tile GEMM (`csrc/cpu/tile_gemm.h`, reached through `_C.cpu_tile_gemm`) on every
path this CPU has: `csrc/cpu/gemm_avx2.h`'s kernel where the patch kernels' ISA is AVX2 (an AVX2-only CPU, or
`set_patch_gemm_isa("avx2")` on an AVX-512 one), oneDNN's brgemm otherwise.

Checked against float64 matmul: ragged row blocks (M not a multiple of 6), ragged 16-column chunks, K across the
256-deep blocks, add or overwrite, rows spaced as in a slice; fp32 and bf16. On the AVX2 kernel also what the
training kernel's backward builds on (`Gemm::k_split_exact`): one call over K1 + K2 gives bitwise what a call over
K1 and then one over K2 give, and bf16 operands give bitwise the fp32 result of the same values.
"""
import pytest
import torch

from helpers import assert_close, extension_or_skip

_C = extension_or_skip()

BEST = _C.patch_gemm_best_isa()
# One patch-kernel ISA setting per tile-GEMM path: "avx2" (gemm_avx2) where the CPU has AVX2, and brgemm under the
# best other setting.
PATHS = (["avx2"] if BEST != "none" else []) + ["avx512" if BEST == "avx512" else "none"]
AVX2 = pytest.mark.skipif("avx2" not in PATHS, reason="needs a CPU with AVX2 and FMA (x86-64)")


def path_id(isa):
    return "gemm_avx2" if isa == "avx2" else "brgemm"


@pytest.fixture
def on_path(request):
    """Sets the patch kernels' ISA (and so the tile GEMM) for the test; the best ISA again afterwards."""
    best = _C.patch_gemm_isa()
    _C.set_patch_gemm_isa(request.param)
    yield request.param
    _C.set_patch_gemm_isa(best)


def bf16_gemm_row_major():
    """Whether Gemm<bf16> takes row-major B here: CPUs without bf16 dot products (else brgemm's VNNI pairs)."""
    try:
        _C.cpu_tile_gemm(torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.bfloat16),
                         torch.zeros(1, 1), False)
        return True
    except RuntimeError as exc:
        assert "VNNI" in str(exc)
        return False


# (M, N, K): rows 1..13 (AVX2 blocks of at most 6, as even as they go), columns with ragged chunks (1, 7, 20, 33),
# K of one step, across one block boundary (257) and several (600).
SHAPES = [(1, 1, 1), (5, 7, 3), (6, 16, 256), (7, 20, 257), (13, 33, 600), (64, 40, 128)]


def operands(M, N, K, dtype, spaced, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K + 5 * spaced, generator=g)[:, :K].to(dtype)
    b = torch.randn(K, N + 3 * spaced, generator=g)[:, :N].to(dtype)
    c = torch.randn(M, N, generator=g)
    return a, b, c


@pytest.mark.parametrize("on_path", PATHS, ids=path_id, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("spaced", [False, True], ids=["dense", "spaced"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}N{}K{}".format(*s))
def test_matches_float64_matmul(shape, spaced, add, dtype, on_path):
    if dtype == torch.bfloat16 and not bf16_gemm_row_major():
        pytest.skip("bf16 tile GEMMs take VNNI-packed B on this CPU (brgemm's bf16 dot products)")
    M, N, K = shape
    a, b, c = operands(M, N, K, dtype, spaced)
    out = _C.cpu_tile_gemm(a, b, c, add)
    want = a.double() @ b.double() + (c.double() if add else 0)
    bound = (a.double().abs() @ b.double().abs()).max().item()  # fp32 sums over K: error ~ K eps |a||b|
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert_close(f"{path_id(on_path)} {dtype}", out, want.float(), atol=4e-7 * K * bound + 1e-6, rtol=1e-5)


@AVX2
@pytest.mark.parametrize("on_path", ["avx2"], ids=path_id, indirect=True)
@pytest.mark.parametrize("split", [(100, 200), (256, 44), (300, 257), (1, 599)])
def test_avx2_k_split_is_exact(split, on_path):
    """C + A B over K1 + K2 in one call equals C + A1 B1, then + A2 B2, bitwise: each element one FMA chain over k
    starting from C. The backward relies on it to run a round's tiles as one GEMM."""
    k1, k2 = split
    a, b, c = operands(11, 37, k1 + k2, torch.float32, True, seed=1)
    whole = _C.cpu_tile_gemm(a, b, c, True)
    parts = _C.cpu_tile_gemm(a[:, k1:], b[k1:], _C.cpu_tile_gemm(a[:, :k1], b[:k1], c, True), True)
    assert torch.equal(whole, parts)


@AVX2
@pytest.mark.parametrize("on_path", ["avx2"], ids=path_id, indirect=True)
def test_avx2_bf16_is_the_fp32_sum_of_the_same_values(on_path):
    if not bf16_gemm_row_major():
        pytest.skip("bf16 tile GEMMs take VNNI-packed B on this CPU (brgemm's bf16 dot products)")
    a, b, c = operands(13, 33, 600, torch.bfloat16, True, seed=2)
    assert torch.equal(_C.cpu_tile_gemm(a, b, c, True), _C.cpu_tile_gemm(a.float(), b.float(), c, True))


def test_rejects_what_it_cannot_take():
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"shapes do not chain: a \[3, 4\], b \[5, 5\]"):
        _C.cpu_tile_gemm(a, torch.randn(5, 5), c, False)
    with pytest.raises(RuntimeError, match="expected 2-D"):
        _C.cpu_tile_gemm(a[None], b, c, False)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16, got Float and BFloat16"):
        _C.cpu_tile_gemm(a, b.bfloat16(), c, False)
    with pytest.raises(RuntimeError, match="expected float32 c, got Double"):
        _C.cpu_tile_gemm(a, b, c.double(), False)
    with pytest.raises(RuntimeError, match="unit stride"):
        _C.cpu_tile_gemm(a.t().contiguous().t(), b, c, False)
