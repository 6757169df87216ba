"""MCL-ViT models: the three-branch forward, its backward, every supported timm option, and the errors."""
import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from mcl_kernels import FusedMCLEmbed, MergedPatchEmbed  # noqa: E402
from mcl_kernels.loss import MCLLoss  # noqa: E402
from mcl_kernels.models import MCLOutput, MCLViT, create_model, list_models  # noqa: E402

from helpers import assert_close, rel_err  # noqa: E402

IMG = 64
# Small versions of the presets: the preset's architecture family with a width/depth that runs in milliseconds.
TINY_DEIT = dict(num_classes=7, img_size=IMG, embed_dim=32, depth=2, num_heads=2)
TINY_CONVIT = dict(num_classes=7, img_size=IMG, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1)


def tiny(name, **kwargs):
    base = TINY_CONVIT if "convit" in name else TINY_DEIT
    return create_model(name, **dict(base, **kwargs))


def image(B=3, C=3, size=IMG):
    return torch.randn(B, C, size, size)


def test_list_models_names_the_presets():
    names = list_models()
    for size in ("tiny", "small", "base"):
        assert f"mcl_deit_{size}_patch32_224" in names
        assert f"mcl_convit_{size}_patch32_224" in names


@pytest.mark.parametrize("name", list_models())
def test_full_size_presets_deploy_to_timm_architectures(name):
    """Built on the meta device (no memory, no time): the deployed models have exactly the state dict of the
    timm models deploy_config names, at the presets' real widths (DeiT-Ti/S/B, ConViT-Ti/S/B)."""
    model = create_model(name, num_classes=1000, device="meta")
    assert model.img_size == (224, 224) and model.small_patch == 16 and model.large_patch == 32
    for mode, patch in (("fast", 32), ("accurate", 16)):
        cfg = model.deploy_config(mode)
        deployed = model.deploy(mode)
        expected = timm.create_model(cfg["timm_name"], device="meta", **cfg["kwargs"])
        got = {k: tuple(v.shape) for k, v in deployed.state_dict().items()}
        want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
        assert got == want, f"{name} {mode}: deployed state dict differs from timm {cfg['timm_name']}"
        assert deployed.patch_embed.patch_size == (patch, patch)
    width = {"tiny": 192, "small": 384, "base": 768}[name.split("_")[2]]
    if "convit" in name:
        width = {"tiny": 192, "small": 432, "base": 768}[name.split("_")[2]]
    assert model.embed_dim == width


@pytest.mark.parametrize("name", ["mcl_deit_small_patch32_224", "mcl_convit_tiny_patch32_224"])
@pytest.mark.parametrize("train", [True, False])
def test_forward_returns_three_branches(name, train):
    model = tiny(name).train(train)
    x = image(3)
    out = model(x)
    assert isinstance(out, MCLOutput)
    D, Ns = model.embed_dim, (IMG // 16) ** 2
    assert out.large.shape == out.small.shape == out.recon.shape == (3, 7)
    assert out.small_tokens.shape == out.recon_tokens.shape == (3, Ns, D)
    assert model.num_classes == 7 and model.in_chans == 3 and model.img_size == (IMG, IMG)


@pytest.mark.parametrize("name", ["mcl_deit_small_patch32_224", "mcl_convit_tiny_patch32_224"])
def test_branches_equal_separate_timm_passes(name):
    """Each branch equals timm's own forward of the same blocks on that branch's tokens: the batched pass of
    small + reconstructed tokens is exact, and the large branch equals its merged-embedding form."""
    model = tiny(name).eval()
    x = image(2)
    with torch.no_grad():
        out = model(x)
        tokens = model.embedding(x)
        accurate = model.deploy("accurate").eval()  # timm's forward at the small patch, pos_embed_small

        class Fixed(nn.Module):
            def __init__(self, t):
                super().__init__()
                self.t = t

            def forward(self, _):
                return self.t

        for field in ("small", "recon"):
            accurate.patch_embed = Fixed(getattr(tokens, field))
            assert_close(field, getattr(out, field), accurate(x), atol=1e-5, rtol=1e-5)
        assert_close("small_tokens", out.small_tokens, tokens.small, atol=0)
        assert_close("forward_small", model.forward_small(x), out.small, atol=1e-5, rtol=1e-5)
        assert rel_err(model.forward_large(x), out.large) <= 1e-5


@pytest.mark.parametrize("name", ["mcl_deit_small_patch32_224", "mcl_convit_tiny_patch32_224"])
@pytest.mark.parametrize("tied", [False, True])
def test_backward_reaches_every_parameter(name, tied):
    model = tiny(name, tied_decompress=tied, drop_path_rate=0.1).train()
    out = model(image(4))
    loss, _ = MCLLoss(label_smoothing=0.1)(out, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reached {missing}"
    assert ("vit.patch_embed.decompress.weight" in dict(model.named_parameters())) is not tied


def test_no_decompression_gives_no_recon_branch():
    model = tiny("mcl_deit_small_patch32_224", decompress=False)
    out = model(image(2))
    assert out.recon is None and out.recon_tokens is None
    loss, parts = MCLLoss()(out, torch.tensor([1, 2]))
    loss.backward()
    assert set(parts) == {"large", "small"}


def test_compress_factor_three():
    model = tiny("mcl_deit_small_patch32_224", img_size=48, compress=3).eval()
    x = image(2, size=48)
    with torch.no_grad():
        out = model(x)
        assert model.large_patch == 48 and out.small_tokens.shape[1] == 9
        deployed = model.deploy("fast").eval()
        assert deployed.patch_embed.patch_size == (48, 48)
        assert rel_err(deployed(x), out.large) <= 1e-5


def test_reference_backend_agrees_with_auto():
    model = tiny("mcl_deit_small_patch32_224").eval()
    ref = copy.deepcopy(model)
    ref.embedding.backend = "reference"
    x = image(2)
    with torch.no_grad():
        a, b = model(x), ref(x)
    for field in ("large", "small", "recon", "small_tokens", "recon_tokens"):
        assert_close(field, getattr(a, field), getattr(b, field), atol=1e-5, rtol=1e-5)


# ---- generic wrapping of timm models ----

VIT_OPTIONS = {
    "avg_pool_fc_norm": dict(global_pool="avg", class_token=False),
    "no_embed_class_reg_tokens": dict(no_embed_class=True, reg_tokens=2),
    "pre_norm_no_bias": dict(pre_norm=True),
    "map_pool": dict(global_pool="map"),
    "no_pos_embed": dict(pos_embed="none"),
    "layer_scale_qk_norm": dict(init_values=1e-2, qk_norm=True),
}


def timm_vit(patch=32, **kwargs):
    return timm.create_model("vit_small_patch32_224", patch_size=patch, **dict(TINY_DEIT, **kwargs))


@pytest.mark.parametrize("option", sorted(VIT_OPTIONS))
def test_from_timm_supports_vit_options(option):
    model = MCLViT.from_timm(timm_vit(**VIT_OPTIONS[option]))
    x = image(2)
    out = model(x)
    (out.large.sum() + out.small.sum() + out.recon.sum()).backward()
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert rel_err(model.deploy("fast").eval()(x), out.large) <= 1e-5
        assert rel_err(model.deploy("accurate").eval()(x), out.small) <= 1e-5
    if option == "pre_norm_no_bias":
        assert model.embedding.proj.bias is None and model.embedding.compress.bias is None


def test_from_timm_small_patch_model_keeps_its_small_branch():
    """Wrapping a /16 model (e.g. pretrained DeiT-/16 weights): its patch embedding and position embedding
    become the small scale, so the small branch starts out computing exactly the original model."""
    vit = timm_vit(patch=16).eval()
    x = image(2)
    with torch.no_grad():
        before = vit(x)
        model = MCLViT.from_timm(vit).eval()
        assert model.pos_embed_small.shape == (1, 1 + 16, 32) and model.vit.pos_embed.shape == (1, 1 + 4, 32)
        assert_close("small branch", model.forward_small(x), before, atol=1e-6, rtol=1e-6)
        assert_close("small branch", model(x).small, before, atol=1e-5, rtol=1e-5)


def test_from_timm_resamples_the_missing_position_embedding():
    vit = timm_vit(patch=32)
    large = vit.pos_embed.detach().clone()
    model = MCLViT.from_timm(vit, pos_embed_init="resample")
    expected = timm.layers.resample_abs_pos_embed(large, new_size=[4, 4], old_size=[2, 2], num_prefix_tokens=1)
    assert_close("pos_embed_small", model.pos_embed_small.detach(), expected, atol=0)
    assert_close("pos_embed", model.vit.pos_embed.detach(), large, atol=0)


def test_optimizer_skips_weight_decay_on_position_embeddings():
    model = tiny("mcl_deit_small_patch32_224")
    from timm.optim import create_optimizer_v2
    assert {"vit.pos_embed", "pos_embed_small", "vit.cls_token"} <= model.no_weight_decay()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"vit.pos_embed", "pos_embed_small", "vit.cls_token"} <= no_decay
    assert "vit.patch_embed.compress.weight" not in no_decay
    # layer-wise learning-rate decay (timm's group_matcher): the embedding stem gets the smallest scale
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {by_id[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["pos_embed_small"] == scale["vit.patch_embed.compress.weight"] == min(scale.values())
    assert scale["vit.blocks.0.attn.qkv.weight"] < scale["vit.blocks.1.attn.qkv.weight"] < scale["vit.head.weight"]


def test_grad_checkpointing_gives_the_same_result():
    model = tiny("mcl_deit_small_patch32_224").eval()
    x = image(2)
    with torch.no_grad():
        a = model(x)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        b = model(x)
    assert_close("large", b.large, a.large, atol=0)
    assert_close("recon", b.recon, a.recon, atol=0)


def test_reparameterize_model_merges_the_embedding():
    """timm.utils.reparameterize_model(model): the embedding is merged (forward -> large-branch logits); on a
    model that holds an MCLViT (here a Sequential), the MCLViT itself is replaced by the deployed timm ViT."""
    from timm.utils import reparameterize_model
    model = tiny("mcl_deit_small_patch32_224").eval()
    x = image(2)
    with torch.no_grad():
        expected = model.forward_large(x)
        merged = reparameterize_model(model)
        assert merged.is_deployed and isinstance(merged.vit.patch_embed, MergedPatchEmbed)
        assert isinstance(model.vit.patch_embed, FusedMCLEmbed)  # timm's default works on a copy
        assert rel_err(merged(x), expected) <= 1e-5
        assert rel_err(merged.forward_large(x), expected) <= 1e-5
        with pytest.raises(RuntimeError, match="re-parameterized"):
            merged.forward_small(x)
        holder = reparameterize_model(nn.Sequential(model))
        assert type(holder[0]) is timm.models.VisionTransformer
        assert rel_err(holder(x), expected) <= 1e-5


def test_convit_caches_both_relative_position_tables():
    model = tiny("mcl_convit_tiny_patch32_224")
    gpsa = model.vit.blocks[0].attn
    calls = []
    original = gpsa.get_rel_indices
    gpsa.get_rel_indices = lambda n: calls.append(n) or original(n)
    for _ in range(3):
        model(image(2))
    assert sorted(calls) == [4, 16], f"relative-position tables built for token counts {calls}"


# ---- errors ----

def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown MCL model 'mcl_deit_huge'.*mcl_deit_small_patch32_224"):
        create_model("mcl_deit_huge")
    with pytest.raises(ValueError, match="pretrained"):
        create_model("mcl_deit_small_patch32_224", pretrained=True)
    with pytest.raises(ValueError, match="pos_embed_init"):
        tiny("mcl_deit_small_patch32_224", pos_embed_init="zeros")


def test_from_timm_rejects_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="VisionTransformerDistilled"):
        MCLViT.from_timm(timm.create_model("deit_tiny_distilled_patch16_224", **TINY_DEIT))
    with pytest.raises(TypeError, match="ResNet"):
        MCLViT.from_timm(timm.create_model("resnet10t", num_classes=3))
    with pytest.raises(ValueError, match="patch size 8 must be the small patch 16 or the large patch 32"):
        MCLViT.from_timm(timm_vit(patch=8))
    with pytest.raises(ValueError, match="fixed image size"):
        MCLViT.from_timm(timm_vit(dynamic_img_size=True))
    with pytest.raises(ValueError, match=r"img_size \(80, 80\) must be a multiple of the large patch 32"):
        MCLViT.from_timm(timm.create_model("vit_small_patch32_224", patch_size=16,
                                           **dict(TINY_DEIT, img_size=80)))
    with pytest.raises(ValueError, match="compress >= 2"):
        MCLViT.from_timm(timm_vit(), compress=1)
    with pytest.raises(ValueError, match="square token grid"):
        MCLViT.from_timm(timm.create_model("convit_tiny", patch_size=32, **dict(TINY_CONVIT, img_size=(64, 128))))


def test_wrong_image_size_is_rejected():
    model = tiny("mcl_deit_small_patch32_224")
    for fn in (model, model.forward_large, model.forward_small):
        with pytest.raises(ValueError, match=r"input image size \(96, 96\) does not match the module's img_size"):
            fn(image(1, size=96))
    with pytest.raises(ValueError, match="deploy mode"):
        model.deploy("medium")


def test_non_square_images():
    model = tiny("mcl_deit_small_patch32_224", img_size=(64, 96)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        assert out.small_tokens.shape[1] == 4 * 6 and model.vit.pos_embed.shape[1] == 1 + 2 * 3
        assert rel_err(model.deploy("fast").eval()(x), out.large) <= 1e-5
        assert rel_err(model.deploy("accurate").eval()(x), out.small) <= 1e-5
    assert model.deploy_config("fast")["kwargs"]["img_size"] == [64, 96]


def test_compiles_without_graph_breaks():
    """The training forward and backward trace as one graph (fused-embedding custom ops included)."""
    model = tiny("mcl_deit_small_patch32_224")
    x, y = image(2), torch.tensor([1, 2])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    MCLLoss()(out, y)[0].backward()
    with torch.no_grad():
        ref = model(x)
    assert_close("large", out.large.detach(), ref.large, atol=1e-5, rtol=1e-5)
    assert model.embedding.compress.weight.grad is not None


@pytest.mark.parametrize("name", ["mcl_deit_small_patch32_224", "mcl_convit_tiny_patch32_224"])
def test_bf16_autocast_training_step(name):
    """Under torch.autocast the fused embedding runs in the autocast dtype (custom ops are opaque to autocast,
    so mcl_kernels.functional casts for them) and gradients reach the float32 weights."""
    model = tiny(name).eval()
    x, y = image(2), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss, _ = MCLLoss()(out, y)
    loss.backward()
    assert out.small_tokens.dtype == torch.bfloat16
    for field in ("large", "small", "recon"):
        assert rel_err(getattr(out, field).float(), getattr(ref, field)) < 0.1, field
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(model.forward_large(x).float(), ref.large) < 0.1


def test_without_timm_the_package_imports_and_models_say_what_to_install():
    import subprocess
    import sys
    code = ("import sys; sys.modules['timm'] = None\n"
            "import mcl_kernels\n"
            "try:\n    mcl_kernels.create_model\nexcept ImportError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ERR" in res.stdout and "pip install timm" in res.stdout
