"""Deployment: the deployed timm models compute the training model's branches, and survive safetensors,
timm's own loader, TorchScript and ONNX (onnxruntime); bad files get clear errors."""
import os

import pytest
import torch

timm = pytest.importorskip("timm")

from mcl_kernels.models import MCLViT, create_model  # noqa: E402
from mcl_kernels.models.export import (DeployedModelError, load_deployed, max_abs_diff, onnx_runner,  # noqa: E402
                                       read_deployed, save_deployed, to_onnx, to_torchscript)

from helpers import rel_err  # noqa: E402

IMG = 64
TINY_DEIT = dict(num_classes=5, img_size=IMG, embed_dim=32, depth=2, num_heads=2)
TINY_CONVIT = dict(num_classes=5, img_size=IMG, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1)
DEPLOY_RTOL = 1e-5
ONNX_ATOL = 1e-4


def trained_like(name, **kwargs):
    """A tiny preset whose weights were moved off their initial values, so nothing matches by accident."""
    model = create_model(name, **dict(TINY_CONVIT if "convit" in name else TINY_DEIT, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def image(B=2, size=IMG):
    return torch.randn(B, 3, size, size)


@pytest.mark.parametrize("name", ["mcl_deit_tiny_patch32_224", "mcl_deit_small_patch32_224",
                                  "mcl_convit_tiny_patch32_224"])
@pytest.mark.parametrize("mode,branch", [("fast", "large"), ("accurate", "small")])
def test_deployed_model_computes_the_branch(name, mode, branch):
    model = trained_like(name)
    x = image(3)
    with torch.no_grad():
        expected = getattr(model(x), branch)
        deployed = model.deploy(mode)
        assert type(deployed) is type(model.vit)
        assert not deployed.training
        got = deployed(x)
    assert rel_err(got, expected) <= DEPLOY_RTOL, f"{mode}: relative error {rel_err(got, expected):.3g}"
    assert deployed.patch_embed.patch_size == ((32, 32) if mode == "fast" else (16, 16))
    assert type(deployed.patch_embed) is timm.layers.PatchEmbed


def test_deploy_leaves_the_training_model_alone():
    model = trained_like("mcl_deit_small_patch32_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = model.deploy("fast")
    with torch.no_grad():
        deployed.head.weight.zero_()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.vit.patch_embed).__name__ == "FusedMCLEmbed"


def test_deployed_model_is_plain_timm_and_trains():
    """The deployed model is an ordinary timm model: fine-tuning it needs nothing from mcl_kernels."""
    deployed = trained_like("mcl_deit_small_patch32_224").deploy("fast").train()
    loss = deployed(image(2)).logsumexp(-1).mean()
    loss.backward()
    assert deployed.patch_embed.proj.weight.grad is not None
    assert timm.models.get_model_args(deployed)["patch_size"] == 32


@pytest.mark.parametrize("name,mode", [("mcl_deit_small_patch32_224", "fast"),
                                       ("mcl_deit_small_patch32_224", "accurate"),
                                       ("mcl_deit_tiny_patch32_224", "fast"), ("mcl_convit_tiny_patch32_224", "fast")])
def test_safetensors_round_trip_through_timm(name, mode, tmp_path):
    model = trained_like(name)
    x = image(2)
    path = str(tmp_path / f"{mode}.safetensors")
    save_deployed(model, path, mode=mode)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    cfg = model.deploy_config(mode)
    with torch.no_grad():
        expected = model.deploy(mode)(x)
        by_timm = timm.create_model(cfg["timm_name"], checkpoint_path=path, **cfg["kwargs"]).eval()(x)
        ours = load_deployed(path)(x)
    assert torch.equal(by_timm, expected)
    assert torch.equal(ours, expected)


def test_timm_names_of_the_presets_load_the_files(tmp_path):
    """What the README documents: S and B load as vit_*_patch32_224 (timm has no ViT-Ti/32, so Ti loads as
    vit_tiny_patch16_224 built with patch_size=32); the accurate models as deit_*_patch16_224."""
    x = image(2)
    cases = [("mcl_deit_small_patch32_224", "fast", "vit_small_patch32_224", {}),
             ("mcl_deit_tiny_patch32_224", "fast", "vit_tiny_patch16_224", {"patch_size": 32}),
             ("mcl_deit_tiny_patch32_224", "accurate", "deit_tiny_patch16_224", {})]
    for name, mode, timm_name, extra in cases:
        model = trained_like(name)
        path = str(tmp_path / f"{name}-{mode}.safetensors")
        save_deployed(model, path, mode=mode)
        assert model.deploy_config(mode)["timm_name"] == timm_name
        arch = {k: TINY_DEIT[k] for k in ("num_classes", "img_size", "embed_dim", "depth", "num_heads")}
        loaded = timm.create_model(timm_name, checkpoint_path=path, **arch, **extra).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model.deploy(mode)(x))


def test_saving_an_already_deployed_model(tmp_path):
    model = trained_like("mcl_deit_small_patch32_224")
    deployed = model.deploy("fast")
    path = str(tmp_path / "d.safetensors")
    save_deployed(deployed, path)
    _, meta = read_deployed(path)
    assert meta["timm_name"] == "vit_small_patch32_224"
    x = image(2)
    with torch.no_grad():
        assert torch.equal(load_deployed(path)(x), deployed(x))


def test_save_replaces_atomically(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_deployed(trained_like("mcl_deit_small_patch32_224"), path)
    first = os.path.getsize(path)
    save_deployed(trained_like("mcl_deit_small_patch32_224", embed_dim=48), path)
    assert os.path.getsize(path) > first
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize("name", ["mcl_deit_small_patch32_224", "mcl_convit_tiny_patch32_224"])
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_torchscript_round_trip(name, tmp_path):
    model = trained_like(name)
    deployed = model.deploy("fast")
    path = str(tmp_path / "m.pt")
    to_torchscript(deployed, path, image(2))
    loaded = torch.jit.load(path)
    x = image(5)  # another batch size than the example
    with torch.no_grad():
        assert max_abs_diff(loaded(x), deployed(x)) <= 1e-6
        assert rel_err(loaded(x), model(x).large) <= DEPLOY_RTOL


@pytest.mark.parametrize("name,mode,dynamo", [("mcl_deit_small_patch32_224", "fast", False),
                                              ("mcl_deit_small_patch32_224", "accurate", False),
                                              ("mcl_convit_tiny_patch32_224", "fast", False),
                                              ("mcl_deit_small_patch32_224", "fast", True)])
def test_onnx_round_trip(name, mode, dynamo, tmp_path):
    pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = trained_like(name)
    deployed = model.deploy(mode).train()
    path = str(tmp_path / "m.onnx")
    to_onnx(deployed, path, image(2), dynamo=dynamo)
    assert deployed.training  # the caller's mode is restored
    deployed.eval()
    run = onnx_runner(path)
    x = image(3)  # the batch dimension is dynamic
    with torch.no_grad():
        expected = getattr(model(x), "large" if mode == "fast" else "small")
        assert max_abs_diff(run(x), deployed(x)) <= ONNX_ATOL
        assert max_abs_diff(run(x), expected) <= ONNX_ATOL


def test_onnx_opset_is_honoured(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = str(tmp_path / "m.onnx")
    to_onnx(trained_like("mcl_deit_small_patch32_224").deploy("fast"), path, image(1), opset_version=17)
    assert onnx.load(path).opset_import[0].version == 17
    with pytest.raises(ValueError, match="disagree"):
        to_onnx(trained_like("mcl_deit_small_patch32_224").deploy("fast"), path, image(1), opset=17, opset_version=18)


# ---- bad files ----

def test_corrupt_file(tmp_path):
    good = str(tmp_path / "good.safetensors")
    save_deployed(trained_like("mcl_deit_small_patch32_224"), good)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    for path in (truncated, garbage):
        with pytest.raises(DeployedModelError, match="not a readable safetensors file"):
            load_deployed(str(path))
    with pytest.raises(FileNotFoundError, match="no deployed model"):
        load_deployed(str(tmp_path / "missing.safetensors"))


def test_pickle_checkpoint_is_not_a_deployed_model(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(trained_like("mcl_deit_small_patch32_224").state_dict(), path)
    with pytest.raises(DeployedModelError, match="not a readable safetensors file"):
        load_deployed(str(path))


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "foreign.safetensors")
    save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(DeployedModelError, match="foreign safetensors file.*pass timm_name="):
        load_deployed(path)
    with pytest.raises(DeployedModelError, match=r"does not hold the weights of timm vit_small_patch32_224\(.*missing "
                                                 r"cls_token.*unexpected encoder.weight"):
        load_deployed(path, timm_name="vit_small_patch32_224", **TINY_DEIT)


def test_file_for_another_architecture(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_deployed(trained_like("mcl_deit_small_patch32_224"), path)
    with pytest.raises(DeployedModelError, match=r"shape mismatch .*file \(1, 5, 32\) vs model \(1, 17, 32\)"):
        load_deployed(path, patch_size=16)
    with pytest.raises(DeployedModelError, match="timm cannot build 'no_such_model'"):
        load_deployed(path, timm_name="no_such_model")


def test_generic_wrap_without_a_timm_name():
    """A model built by its class rather than timm.create_model: deploy works, deploy_config has no name."""
    vit = timm.models.VisionTransformer(img_size=IMG, patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    model = MCLViT.from_timm(vit).eval()
    cfg = model.deploy_config("fast")
    assert cfg["timm_name"] is None and cfg["kwargs"]["patch_size"] == 32
    x = image(2)
    with torch.no_grad():
        assert rel_err(model.deploy("fast")(x), model(x).large) <= DEPLOY_RTOL


def test_swap_patch_embed_runs_a_deployed_model_on_the_fused_embedding():
    """swap_patch_embed turns the deployed timm ViT's PatchEmbed into a MergedPatchEmbed sharing its projection: the
    same state dict (keys and tensors), the same logits to fp32 rounding, and with prepack=True the packed weight."""
    import mcl_kernels as mk
    model = trained_like("mcl_deit_small_patch32_224")
    deployed = model.deploy("fast").eval()
    x = image()
    with torch.no_grad():
        expected = deployed(x)
        before = deployed.state_dict()
        assert mk.swap_patch_embed(deployed, prepack=True) == 1
        pe = deployed.patch_embed
        assert isinstance(pe, mk.MergedPatchEmbed) and pe.prepack and pe.patch_size == (32, 32)
        after = deployed.state_dict()
        assert list(after) == list(before) and all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr()
                                                   for k in before)
        assert rel_err(deployed(x), expected) <= DEPLOY_RTOL
        assert rel_err(deployed(x), model.forward_large(x)) <= DEPLOY_RTOL
        if mk._extension._C is not None and mk._extension._C.patch_gemm_isa() != "none":
            blob = pe.packed_weight()
            assert blob is not None and mk._extension._C.embed_tokens_cpu_uses_packed(x, pe.proj.weight, blob)
    assert mk.swap_patch_embed(deployed) == 0  # nothing of timm's left


def test_swap_patch_embed_refuses_what_it_would_compute_differently():
    import mcl_kernels as mk
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn
    with pytest.raises(TypeError, match=r"it returns a feature map, not flattened tokens \(flatten=False"):
        mk.swap_patch_embed(VisionTransformer(img_size=IMG, patch_size=32, embed_dim=16, depth=1, num_heads=2,
                                              dynamic_img_size=True))
    with pytest.raises(TypeError, match=r"it has a norm layer \(LayerNorm\)"):
        mk.MergedPatchEmbed.from_timm(PatchEmbed(IMG, 32, 3, 16, norm_layer=nn.LayerNorm))
    with pytest.raises(TypeError, match="it pads images to a multiple of the patch"):
        mk.MergedPatchEmbed.from_timm(PatchEmbed(IMG, 32, 3, 16, dynamic_img_pad=True))
    with pytest.raises(TypeError, match="expected timm.layers.PatchEmbed itself, got torch.nn.modules.linear.Linear"):
        mk.MergedPatchEmbed.from_timm(nn.Linear(3, 3))
    overlapping = PatchEmbed(IMG, 32, 3, 16)
    overlapping.proj = nn.Conv2d(3, 16, 32, stride=16)
    with pytest.raises(TypeError, match=r"not square, non-overlapping patches \(kernel \(32, 32\), stride \(16, 16\)"):
        mk.MergedPatchEmbed.from_timm(overlapping)
    # One that cannot convert: none is replaced.
    holder = nn.Sequential(PatchEmbed(IMG, 32, 3, 16), PatchEmbed(IMG, 32, 3, 16, norm_layer=nn.LayerNorm))
    with pytest.raises(TypeError, match="cannot run 1 as a MergedPatchEmbed"):
        mk.swap_patch_embed(holder)
    assert type(holder[0]) is PatchEmbed
