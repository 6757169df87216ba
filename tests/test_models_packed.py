"""MCLViT(packed=True): all branches through the blocks in one packed pass. Equal to the unpacked per-branch forward
(timm's own attention) in every output and every parameter gradient, in eager mode, with gradient checkpointing and
under torch.compile(fullgraph=True); the state dict and the deployed models stay timm's; what cannot be packed is
rejected before anything is modified."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.layers.attention import Attention  # noqa: E402
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, ResPostBlock  # noqa: E402

from mcl_kernels import backends  # noqa: E402
from mcl_kernels.attention import MCLAttention  # noqa: E402
from mcl_kernels.loss import MCLLoss  # noqa: E402
from mcl_kernels.models import MCLOutput, MCLViT, create_model  # noqa: E402
from mcl_kernels.models.export import load_deployed, save_deployed  # noqa: E402

from helpers import assert_close  # noqa: E402

needs_triton = pytest.mark.skipif(backends.BACKENDS["triton"].unavailable(torch.device("cpu")) is not None,
                                  reason="Triton (with TRITON_INTERPRET=1 on CPU) is not available")

IMG = 64
NS, NL = (IMG // 16) ** 2, (IMG // 32) ** 2  # 16 small and 4 large patch tokens
TINY = dict(num_classes=7, img_size=IMG, embed_dim=48, depth=2, num_heads=3)
FIELDS = MCLOutput._fields
# fp32: the packed path runs the reference attention (materialized softmax), the unpacked one timm's SDPA; measured
# here: outputs within 1.4e-7, every gradient within 1e-6 of its tensor's largest entry. Gradients are judged
# against their tensor's scale (their magnitudes span decades across parameters).
OUT_TOL = dict(atol=1e-6, rtol=1e-5)
GRAD_REL = 1e-5


def pair(name="mcl_deit_small_patch32_224", backend="reference", **kwargs):
    """The same initial weights as an unpacked and a packed model (the packed one loads the unpacked state dict,
    strictly: the keys must be the same)."""
    unpacked = create_model(name, backend=backend, **dict(TINY, **kwargs))
    packed = create_model(name, backend=backend, packed=True, **dict(TINY, **kwargs))
    packed.load_state_dict(unpacked.state_dict())
    return unpacked, packed


def timm_pair(backend="reference", **kwargs):
    """As :func:`pair`, for a timm ViT wrapped with MCLViT.from_timm (block types and options create_model's
    presets do not reach)."""
    def build(packed):
        torch.manual_seed(3)
        vit = timm.create_model("vit_small_patch32_224", patch_size=32, **dict(TINY, **kwargs))
        return MCLViT.from_timm(vit, backend=backend, packed=packed)
    unpacked, packed = build(False), build(True)
    packed.load_state_dict(unpacked.state_dict())
    return unpacked, packed


def image(B=3):
    return torch.randn(B, 3, IMG, IMG)


def step(model, x, y, run=None):
    """One training step's forward (through ``run``, default ``model``: e.g. its compiled form) and backward: the
    outputs and every parameter's gradient by name."""
    model.zero_grad(set_to_none=True)
    out = (model if run is None else run)(x)
    loss, _ = MCLLoss(label_smoothing=0.1)(out, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_step(name, got, want):
    (out_a, grads_a), (out_b, grads_b) = got, want
    for field in FIELDS:
        a, b = getattr(out_a, field), getattr(out_b, field)
        assert_close(f"{name} {field}", None if a is None else a.detach(), None if b is None else b.detach(), **OUT_TOL)
    assert set(grads_a) == set(grads_b), f"{name}: gradients reached {sorted(set(grads_a) ^ set(grads_b))} in one only"
    for n in grads_b:
        assert_close(f"{name} grad {n}", grads_a[n], grads_b[n], atol=GRAD_REL * grads_b[n].abs().max().item())


CONFIGS = {
    "decompress": lambda: pair(),
    "no_decompress": lambda: pair(decompress=False),
    "reg_tokens_drop_path_eval": lambda: pair(reg_tokens=2, drop_path_rate=0.2),
    "no_embed_class_map_pool_layer_scale": lambda: pair(no_embed_class=True, reg_tokens=1, global_pool="map",
                                                        init_values=1e-2),
    "res_post_block": lambda: timm_pair(block_fn=ResPostBlock, init_values=0.5),
    "parallel_things_block_avg_pool": lambda: timm_pair(block_fn=ParallelThingsBlock, global_pool="avg",
                                                        class_token=False),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_packed_equals_unpacked_outputs_and_every_gradient(config):
    unpacked, packed = CONFIGS[config]()
    if "eval" in config:  # drop path draws differently packed (one draw per image, not per branch): off in eval
        unpacked.eval(), packed.eval()
    x, y = image(3), torch.tensor([0, 3, 6])
    got, want = step(packed, x, y), step(unpacked, x, y)
    assert_same_step(config, got, want)
    assert (got[0].recon is None) == ("no_decompress" in config)
    assert len(got[1]) == sum(p.requires_grad for p in packed.parameters())  # every parameter got a gradient


def test_blocks_run_once_on_one_packed_sequence():
    """Every block runs once per forward, on [B, Ns' + Nl' + Ns', D] (small, large, reconstructed) with its
    attention packed by exactly those segments; the packing is cleared afterwards."""
    _, packed = pair(reg_tokens=2)
    prefix = 1 + 2
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append((tuple(args[0].shape), m.attn.seqlens)))
             for blk in packed.vit.blocks]
    packed(image(2))
    for h in hooks:
        h.remove()
    seqlens = (prefix + NS, prefix + NL, prefix + NS)
    assert seen == [((2, sum(seqlens), 48), seqlens)] * 2
    assert all(blk.attn.seqlens is None for blk in packed.vit.blocks)


def test_switching_packing_off_runs_the_per_branch_forward():
    _, packed = pair()
    calls = []
    hook = packed.vit.blocks[0].register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[:2])))
    x = image(2)
    with torch.no_grad():
        on = packed(x)
        packed.packed = False
        off = packed(x)
        packed.packed = True
    hook.remove()
    # packed: one pass over small + large + reconstructed; unpacked: one pass per branch (large, small,
    # reconstructed), each over the batch of 2 images
    assert calls == [(2, (1 + NS) + (1 + NL) + (1 + NS)), (2, 1 + NL), (2, 1 + NS), (2, 1 + NS)]
    for field in FIELDS:
        assert_close(field, getattr(off, field), getattr(on, field), **OUT_TOL)


def test_patch_dropout_shortens_each_segment():
    unpacked, packed = pair(patch_drop_rate=0.5)
    seen = []
    hook = packed.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(m.attn.seqlens))
    packed.train()(image(2))
    hook.remove()
    assert seen == [(1 + NS // 2, 1 + NL // 2, 1 + NS // 2)]  # timm keeps int(N * (1 - rate)) patch tokens
    x = image(2)
    with torch.no_grad():  # patch dropout is off in eval: the packed forward is the unpacked one again
        a, b = packed.eval()(x), unpacked.eval()(x)
    for field in FIELDS:
        assert_close(field, getattr(a, field), getattr(b, field), **OUT_TOL)


def test_grad_checkpointing_recomputes_packed():
    """Checkpointed blocks recompute in the backward, after the forward's packing context has closed: the packing
    is set inside each checkpointed call, so the gradients equal the unpacked model's."""
    unpacked, packed = pair()
    packed.set_grad_checkpointing(True)
    x, y = image(2), torch.tensor([1, 2])
    assert_same_step("checkpointed", step(packed, x, y), step(unpacked, x, y))


def test_state_dict_parameters_and_copies_stay_timm():
    unpacked, packed = pair()
    assert list(packed.state_dict()) == list(unpacked.state_dict())
    assert [n for n, _ in packed.named_parameters()] == [n for n, _ in unpacked.named_parameters()]
    unpacked.load_state_dict(packed.state_dict())  # strict, both ways
    for i, blk in enumerate(packed.vit.blocks):
        assert type(blk.attn) is MCLAttention and type(unpacked.vit.blocks[i].attn) is Attention
        assert blk.attn.backend == "reference"
    # The kept timm modules share the MCLAttention's submodules, also in a deep copy (ModelEmaV3 deep-copies).
    twin = copy.deepcopy(packed)
    for model in (packed, twin):
        for path, original in model._timm_attention:
            assert original.qkv is model.vit.get_submodule(path).qkv
            assert original.proj is model.vit.get_submodule(path).proj
    assert twin.vit.blocks[0].attn.qkv.weight is not packed.vit.blocks[0].attn.qkv.weight
    assert "packed=True" in repr(packed)


def test_cpu_backend_embedding_runs_attention_on_auto():
    model = create_model("mcl_deit_small_patch32_224", backend="cpu", packed=True, **TINY)
    assert model.embedding.backend == "cpu" and all(b.attn.backend == "auto" for b in model.vit.blocks)


def sgd_steps(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        MCLLoss()(model(x), y)[0].backward()
        opt.step()
    return model


def test_deploy_after_packed_training_equals_unpacked(tmp_path):
    unpacked, packed = pair()
    batches = [(image(4), torch.randint(0, 7, (4,))) for _ in range(3)]
    sgd_steps(unpacked, batches), sgd_steps(packed, batches)
    x = image(2)
    for mode in ("fast", "accurate"):
        a, b = packed.deploy(mode).eval(), unpacked.deploy(mode).eval()
        assert not any(isinstance(m, MCLAttention) for m in a.modules())
        assert [type(blk.attn) for blk in a.blocks] == [Attention] * 2
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sb:
            assert_close(f"{mode} {k}", sa[k], sb[k], atol=1e-5, rtol=1e-4)
        cfg = packed.deploy_config(mode)
        assert cfg == unpacked.deploy_config(mode)
        timm.create_model(cfg["timm_name"], **cfg["kwargs"]).load_state_dict(sa)  # timm's architecture, strictly
        with torch.no_grad():
            assert_close(f"{mode} logits", a(x), b(x), atol=1e-4, rtol=1e-4)
            branch = packed.eval().forward_large(x) if mode == "fast" else packed.eval().forward_small(x)
            assert_close(f"{mode} = branch", a(x), branch, atol=1e-5, rtol=1e-5)
    # The training model keeps its packed attention after deploying, and the saved file loads as timm's.
    assert all(type(blk.attn) is MCLAttention for blk in packed.vit.blocks)
    path = save_deployed(packed, str(tmp_path / "packed.safetensors"))
    with torch.no_grad():
        assert_close("loaded", load_deployed(path)(x), packed.forward_large(x), atol=1e-5, rtol=1e-5)


def test_reparameterize_model_on_a_packed_model():
    from timm.utils import reparameterize_model
    _, packed = pair()
    packed.eval()
    x = image(2)
    with torch.no_grad():
        merged = reparameterize_model(packed)
        assert merged.is_deployed
        assert_close("merged", merged(x), packed.forward_large(x), atol=1e-5, rtol=1e-5)
        holder = reparameterize_model(torch.nn.Sequential(packed))
        assert [type(blk.attn) for blk in holder[0].blocks] == [Attention] * 2


def test_compile_fullgraph_packed_training_step():
    """The packed training forward and backward trace as one graph holding the packed attention op (mcl_kernels
    reference backend; compiled with aot_eager: inductor's C++ code generation takes ~40 s on a 2-core CPU for
    this model and adds nothing to what the graph capture proves)."""
    from torch._dynamo.backends.registry import lookup_backend
    torch._dynamo.reset()
    unpacked, packed = pair()
    targets = []

    def recording(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    x, y = image(2), torch.tensor([1, 2])
    compiled = torch.compile(packed, fullgraph=True, backend=recording)
    got = step(packed, x, y, run=compiled)
    assert torch.ops.mcl_kernels.packed_attention.default in targets or \
        torch.ops.mcl_kernels.packed_attention in targets, "the packed attention op is not in the compiled graph"
    assert all(blk.attn.seqlens is None for blk in packed.vit.blocks)
    assert_same_step("compiled", got, step(unpacked, x, y))


@needs_triton
def test_triton_packed_attention_in_the_model():
    """The Triton packed-attention kernels (through the interpreter on CPU) in the whole model. The embedding's
    backend is the attention's where it has attention kernels; the forward keeps the embedding on the reference
    (its Triton kernels have their own tests) so the interpreter runs only the attention."""
    model = create_model("mcl_deit_small_patch32_224", backend="triton", packed=True, **TINY)
    assert all(b.attn.backend == "triton" for b in model.vit.blocks)
    unpacked, packed = pair(embed_dim=32, num_heads=2, depth=1)
    for blk in packed.vit.blocks:
        blk.attn.backend = "triton"
    x, y = image(1), torch.tensor([4])
    assert_same_step("triton", step(packed, x, y), step(unpacked, x, y))


def test_what_cannot_be_packed_is_rejected_untouched():
    convit = timm.create_model("convit_tiny", patch_size=32, num_classes=7, img_size=IMG, embed_dim=16, depth=2,
                               num_heads=2, local_up_to_layer=1)
    with pytest.raises(ValueError, match="packed=True is not supported for ConViT: its GPSA blocks"):
        MCLViT.from_timm(convit, packed=True)
    with pytest.raises(ValueError, match="not supported for ConViT"):
        create_model("mcl_convit_tiny_patch32_224", packed=True, **TINY)
    with pytest.raises(TypeError, match="packed must be True or False, got 'yes'"):
        create_model("mcl_deit_small_patch32_224", packed="yes", **TINY)
    unpacked = create_model("mcl_deit_small_patch32_224", **TINY)
    with pytest.raises(ValueError, match="built with packed=False, so its attention modules are timm's"):
        unpacked.packed = True
    assert unpacked.packed is False
    vit = timm.create_model("vit_small_patch32_224", patch_size=32, block_fn=ParallelScalingBlock, **TINY)
    with pytest.raises(ValueError, match="block 0 is timm.models.vision_transformer.ParallelScalingBlock"):
        MCLViT.from_timm(vit, packed=True)
    vit = timm.create_model("vit_small_patch32_224", patch_size=32, attn_layer="diff", **TINY)
    with pytest.raises(ValueError, match="blocks.0.attn is DiffAttention"):
        MCLViT.from_timm(vit, packed=True)
    assert type(vit.patch_embed).__name__ == "PatchEmbed"  # rejected before anything was replaced
    assert type(vit.blocks[0].attn).__name__ == "DiffAttention"
