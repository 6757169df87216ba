"""Bad input gets a clear error that names what was expected and what came; never a wrong answer."""
import pytest
import torch

import mcl_kernels as mk
from helpers import mcl_params


@pytest.fixture
def module():
    return mk.FusedMCLEmbed(img_size=64, patch_size=16, compress=2, embed_dim=8, strict_img_size=False)


def test_image_not_multiple_of_large_patch(module):
    with pytest.raises(ValueError, match=r"compress=2 does not divide the small-patch grid 3x4 .*large patch 32"):
        module(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"image size 50x64 is not a multiple of the patch size 32"):
        module(torch.randn(1, 3, 50, 64))


def test_compress_must_divide_grid_at_construction():
    with pytest.raises(ValueError, match=r"img_size \(224, 224\) is not a multiple of the largest patch 48"):
        mk.FusedMCLEmbed(img_size=224, patch_size=16, compress=3)


def test_wrong_rank_and_channels(module):
    with pytest.raises(ValueError, match=r"rank 4 \[B, C, H, W\], got rank 3 with shape \(3, 64, 64\)"):
        module(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"expected 3 input channels .* with 1 channels"):
        module(torch.randn(2, 1, 64, 64))


def test_integer_input(module):
    with pytest.raises(TypeError, match=r"floating-point image .* got torch.uint8"):
        module(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_mismatched_dtype(module):
    with pytest.raises(TypeError, match=r"proj.weight has dtype torch.float32 but the input has dtype torch.float64"):
        module(torch.randn(1, 3, 64, 64, dtype=torch.float64))


def test_mismatched_device():
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(3, 8, 4, (2,))
    x = torch.randn(1, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match=r"proj.weight is on cpu but the input is on meta"):
        mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=k)


def test_wrong_weight_shapes():
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(3, 8, 4, (2,))
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"compress.weight of shape \(8, 72\), got \(8, 32\)"):
        mk.mcl_embed(torch.randn(1, 3, 24, 24), pw, pb, cw, cb, dw, db, compress=3)
    with pytest.raises(ValueError, match=r"decompress.weight of shape \(32, 8\), got \(8, 32\)"):
        mk.mcl_embed(x, pw, pb, cw, cb, cw, db, compress=2)
    with pytest.raises(ValueError, match=r"tied_decompress=True .* do not pass decompress_weight"):
        mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=2, tied_decompress=True)
    with pytest.raises(ValueError, match=r"proj.weight of shape \[D, C, p, p\]"):
        mk.mcl_embed(x, pw[..., :3], pb, cw, cb, dw, db, compress=2)
    with pytest.raises(ValueError, match=r"positive integer, got 0"):
        mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=0)


def test_embed_tokens_errors():
    x, w = torch.randn(2, 3, 64, 32), torch.randn(8, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pos_embed of shape \[3, 8\] or \[1, 3, 8\] \(2x1 patches \+ class token\)"):
        mk.embed_tokens(x, w, None, torch.randn(8), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match=r"cls_token with 8 elements"):
        mk.embed_tokens(x, w, None, torch.randn(7), None)
    with pytest.raises(TypeError, match=r"cls_token has dtype torch.float16"):
        mk.embed_tokens(x, w, None, torch.randn(8).half(), None)


def test_bad_scales():
    with pytest.raises(ValueError, match=r"increasing patch sizes.*got \(16, 24\)"):
        mk.FusedMCLEmbed(scales=(16, 24))
    with pytest.raises(ValueError, match="tied_decompress=True needs decompress=True"):
        mk.FusedMCLEmbed(decompress=False, tied_decompress=True)


def test_chain_argument_counts():
    pw, pb, levels = mcl_params(3, 8, 4, (2, 2))
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expected 2 entries in compress_bias"):
        mk.mcl_embed(x, pw, pb, [lv[1] for lv in levels], [levels[0][2]], compress=[2, 2])
