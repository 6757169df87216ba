"""FusedMCLEmbed and its merged form: names and layouts, timm compatibility, re-parameterization."""
import copy

import pytest
import torch
from torch import nn

import mcl_kernels as mk
from mcl_kernels import reference
from helpers import assert_close, rel_err

timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e .[test])")


def test_parameter_names_and_layouts():
    m = mk.FusedMCLEmbed(img_size=224, patch_size=16, compress=2, in_chans=3, embed_dim=48)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"proj.weight": (48, 3, 16, 16), "proj.bias": (48,), "compress.weight": (48, 4 * 48),
                      "compress.bias": (48,), "decompress.weight": (4 * 48, 48), "decompress.bias": (4 * 48,)}
    assert m.patch_size == (16, 16) and m.grid_size == (14, 14) and m.num_patches == 196
    assert m.patch_sizes == ((16, 16), (32, 32)) and m.grid_sizes == ((14, 14), (7, 7))
    assert m.num_patches_per_scale == (196, 49)


def test_tied_and_no_decompression_parameters():
    tied = mk.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=8, tied_decompress=True)
    assert {n for n, _ in tied.named_parameters()} == {"proj.weight", "proj.bias", "compress.weight",
                                                      "compress.bias", "decompress.bias"}
    none = mk.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=8, decompress=False)
    assert not any(n.startswith("decompress") for n, _ in none.named_parameters())
    assert none(torch.randn(1, 3, 32, 32)).recon is None


def test_chain_parameters_and_outputs():
    m = mk.FusedMCLEmbed(img_size=(64, 128), in_chans=3, embed_dim=8, scales=(8, 16, 64))
    assert m.factors == (2, 4) and m.grid_sizes == ((8, 16), (4, 8), (1, 2))
    assert tuple(m.compress[1].weight.shape) == (8, 16 * 8) and tuple(m.decompress[0].weight.shape) == (4 * 8, 8)
    out = m(torch.randn(2, 3, 64, 128))
    assert [t.shape[1] for t in out.small] == [128, 32] and [t.shape[1] for t in out.large] == [32, 2]
    assert [t.shape[1] for t in out.recon] == [128, 32]
    assert out.large[0] is out.small[1]


@pytest.mark.parametrize("kwargs,hw", [
    (dict(patch_size=16, compress=2), (64, 96)),
    (dict(patch_size=14, compress=3), (84, 42)),
    (dict(scales=(8, 16, 32)), (64, 32)),
    (dict(patch_size=16, compress=2, decompress=False), (32, 32)),
])
def test_fuse_matches_training_large_branch(kwargs, hw):
    m = mk.FusedMCLEmbed(img_size=hw, in_chans=3, embed_dim=24, **kwargs)
    x = torch.randn(2, 3, *hw)
    large = m(x).large
    large = large[-1] if isinstance(large, tuple) else large
    merged = m.fuse()
    assert isinstance(merged, mk.MergedPatchEmbed)
    assert merged.patch_size == m.patch_sizes[-1] and merged.num_patches == m.num_patches_per_scale[-1]
    assert rel_err(merged(x), large) <= 1e-5


def test_fused_state_dict_loads_into_timm_patch_embed():
    m = mk.FusedMCLEmbed(img_size=(64, 96), patch_size=16, compress=2, embed_dim=40)
    merged = m.fuse()
    pe = timm.layers.PatchEmbed(img_size=(64, 96), patch_size=32, embed_dim=40)
    pe.load_state_dict(merged.state_dict())  # strict: same names, same shapes
    x = torch.randn(3, 3, 64, 96)
    assert_close("timm PatchEmbed", pe(x), merged(x), atol=1e-5, rtol=1e-5)
    assert rel_err(pe(x), m(x).large) <= 1e-5


def test_timm_reparameterize_model_finds_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = mk.FusedMCLEmbed(img_size=64, patch_size=16, embed_dim=16)

        def forward(self, x):
            out = self.patch_embed(x)
            return out.large if isinstance(out, mk.MCLTokens) else out

    net = Net()
    x = torch.randn(2, 3, 64, 64)
    deployed = timm.utils.reparameterize_model(net)
    assert isinstance(deployed.patch_embed, mk.MergedPatchEmbed)
    assert isinstance(net.patch_embed, mk.FusedMCLEmbed)  # not in place by default
    assert rel_err(deployed(x), net(x)) <= 1e-5


def test_reparameterize_in_place():
    m = mk.FusedMCLEmbed(img_size=64, patch_size=16, embed_dim=16, tied_decompress=True)
    x = torch.randn(2, 3, 64, 64)
    large = m(x).large
    m.reparameterize()
    assert m.fused and m.compress is None and m.decompress is None
    assert {n for n, _ in m.named_parameters()} == {"proj.weight", "proj.bias"}
    assert m.patch_size == (32, 32) and m.num_patches == 4
    assert rel_err(m(x), large) <= 1e-5
    pe = timm.layers.PatchEmbed(img_size=64, patch_size=32, embed_dim=16)
    pe.load_state_dict(m.state_dict())
    m.reparameterize()  # idempotent
    assert rel_err(m.fuse()(x), large) <= 1e-5


def test_merged_embed_with_class_token_and_position_embedding():
    merged = mk.FusedMCLEmbed(img_size=64, patch_size=16, embed_dim=16).fuse()
    x = torch.randn(2, 3, 64, 64)
    cls, pos = torch.randn(1, 1, 16), torch.randn(1, 5, 16)
    expected = reference.embed_tokens(x, merged.proj.weight, merged.proj.bias, cls, pos)
    assert_close("sequence", merged(x, cls, pos), expected, atol=1e-5, rtol=1e-5)


def test_module_backward_reaches_every_parameter():
    m = mk.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=12)
    out = m(torch.randn(2, 3, 32, 32))
    (out.small.sum() + out.large.square().sum() + out.recon.mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_merge_weights_functional_low_precision_and_grad():
    m = mk.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=12)
    w32, b32 = mk.merge_weights(m.proj.weight, m.proj.bias, m.compress.weight, m.compress.bias, compress=2)
    mb = copy.deepcopy(m).to(torch.bfloat16)
    wb, bb = mk.merge_weights(mb.proj.weight, mb.proj.bias, mb.compress.weight, mb.compress.bias, compress=2)
    assert wb.dtype == torch.bfloat16 and rel_err(wb.float(), w32) < 2e-2
    (w32.sum() + b32.sum()).backward()
    assert m.compress.weight.grad is not None and m.proj.bias.grad is not None


def test_strict_image_size():
    m = mk.FusedMCLEmbed(img_size=64, patch_size=16, embed_dim=8)
    with pytest.raises(ValueError, match=r"input image size \(64, 96\) does not match .*\(64, 64\)"):
        m(torch.randn(1, 3, 64, 96))
    loose = mk.FusedMCLEmbed(img_size=64, patch_size=16, embed_dim=8, strict_img_size=False)
    assert loose(torch.randn(1, 3, 64, 96)).large.shape == (1, 6, 8)


def test_low_precision_module():
    m = mk.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=16)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    out = copy.deepcopy(m).to(torch.bfloat16)(x.bfloat16())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16 and rel_err(a.float(), b) < 3e-2
