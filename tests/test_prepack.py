"""The inference embedding's weight packed once (`mcl_kernels.prepack`, csrc/cpu/embed_prepack.h): a blob is used
exactly where it holds the call's weight, unchanged, for the call's kernel, and gives bitwise the tokens of a call
that packs for itself; anywhere else it is ignored. Modules built with prepack=True keep one blob and pack again
when their weight changes."""
import copy
import io

import pytest
import torch

import mcl_kernels as mk
from helpers import extension_or_skip, make_image, rand

_C = extension_or_skip()

needs_patch_kernels = pytest.mark.skipif(_C.patch_gemm_isa() == "none",
                                         reason="this CPU has no direct patch kernels (AVX2 or AVX-512): nothing packs")

# (B, C, H, W, D, P): batch 0 and 1, a non-square image, D not a multiple of 16 over two panels (100 = 64 + 36),
# patch 14; batch 1 and 2 split the weight's panels over the threads, batch 40 the patches (by_panels).
SHAPES = [(0, 3, 64, 96, 40, 32), (1, 3, 64, 96, 100, 32), (2, 3, 28, 42, 24, 14), (40, 3, 32, 32, 128, 8)]


def inputs(shape, dtype=torch.float32, layout="contiguous"):
    B, C, H, W, D, P = shape
    T = 1 + (H // P) * (W // P)
    return (make_image(B, C, H, W, layout, dtype), rand(D, C, P, P, scale=(C * P * P) ** -0.5, dtype=dtype),
            rand(D, dtype=dtype), rand(1, 1, D, dtype=dtype), rand(1, T, D, dtype=dtype))


def embed(x, w, b, cls, pos, packed=None):
    return _C.embed_tokens(x, w, b, cls, pos, w.shape[-1], packed)


@pytest.fixture
def blobs_passed(monkeypatch):
    """The packed_weight of every call into the C++ embed_tokens (recorded through a wrapper), so a test can tell
    that a module passed its blob down rather than only that the blob would be usable."""
    seen = []
    native = _C.embed_tokens

    def recording(x, weight, bias, cls_token, pos_embed, patch, packed_weight=None):
        seen.append(packed_weight)
        return native(x, weight, bias, cls_token, pos_embed, patch, packed_weight)

    monkeypatch.setattr(_C, "embed_tokens", recording)
    return seen


def reads_panels(x, P):
    """Whether the call's path packs the weight (and so can read a blob): direct, widened or AMX."""
    return _C.embed_tokens_cpu_direct(x, P) or _C.embed_tokens_cpu_widened(x, P) or _C.embed_tokens_cpu_amx(x, P)


@needs_patch_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_blob_gives_bitwise_the_tokens_of_packing_per_call(shape, dtype, layout, threads):
    args = inputs(shape, dtype, layout)
    x, w = args[0], args[1]
    blob = mk.pack_embed_weight(w)
    assert blob is not None and blob.dtype == torch.uint8 and blob.dim() == 1
    # fp32 always runs the direct kernels on unit W stride; bf16 the direct, widened or AMX ones.
    want = reads_panels(x, w.shape[-1])
    assert want == (layout != "channels_last" and (layout == "contiguous" or x.stride(3) == 1))
    assert _C.embed_tokens_cpu_uses_packed(x, w, blob) == want
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        plain, packed = embed(*args), embed(*args, packed=blob)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(packed, plain), "tokens from the packed blob differ from those of a call packing for itself"


@needs_patch_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_blob_for_another_or_changed_weight_is_not_used(dtype):
    args = inputs((3, 3, 64, 64, 40, 32), dtype)
    x, w = args[0], args[1]
    blob = mk.pack_embed_weight(w)
    assert _C.embed_tokens_cpu_uses_packed(x, w, blob)
    # Another tensor with the same values (another address), and another weight shape.
    assert not _C.embed_tokens_cpu_uses_packed(x, w.clone(), blob)
    assert not _C.embed_tokens_cpu_uses_packed(x, w[:20], blob)
    # A bf16 blob is not an fp32 one (and the reverse): another layout or another element type.
    other = w.float() if dtype == torch.bfloat16 else w.bfloat16()
    assert not _C.embed_tokens_cpu_uses_packed(x.to(other.dtype), other, blob)
    # Changed in place: the version counter moves on; the call then packs the new values itself.
    with torch.no_grad():
        w.mul_(-2)
    assert not _C.embed_tokens_cpu_uses_packed(x, w, blob)
    assert torch.equal(embed(*args, packed=blob), embed(*args))
    # Cut short or shifted off its 64-byte alignment: not used.
    fresh = mk.pack_embed_weight(w)
    assert _C.embed_tokens_cpu_uses_packed(x, w, fresh)
    assert not _C.embed_tokens_cpu_uses_packed(x, w, fresh[:-1])
    shifted = torch.empty(fresh.numel() + 8, dtype=torch.uint8)[8:]
    shifted.copy_(fresh)
    assert not _C.embed_tokens_cpu_uses_packed(x, w, shifted)
    assert not _C.embed_tokens_cpu_uses_packed(x, w, torch.zeros_like(fresh))


@needs_patch_kernels
def test_a_blob_packed_for_other_kernels_is_not_used():
    """The panels' layout depends on the patch kernels' ISA: packed under one, ignored under another (here "none":
    the patch-matrix path, which reads no panels) and the tokens still right."""
    args = inputs((2, 3, 64, 64, 40, 32))
    x, w = args[0], args[1]
    blob = mk.pack_embed_weight(w)
    best = _C.patch_gemm_isa()
    try:
        _C.set_patch_gemm_isa("none")
        assert not _C.embed_tokens_cpu_uses_packed(x, w, blob)
        assert mk.pack_embed_weight(w) is None  # nothing to pack for the patch-matrix path
        torch.testing.assert_close(embed(*args, packed=blob), embed(*args))
    finally:
        _C.set_patch_gemm_isa(best)
    if best == "avx512":
        _C.set_patch_gemm_isa("avx2")
        try:
            assert not _C.embed_tokens_cpu_uses_packed(x, w, blob)
            assert _C.embed_tokens_cpu_uses_packed(x, w, mk.pack_embed_weight(w))
        finally:
            _C.set_patch_gemm_isa(best)


def test_nothing_is_packed_where_no_kernel_would_read_it():
    w = rand(8, 3, 4, 4)
    assert mk.pack_embed_weight(w.double()) is None  # float64: the patch-matrix path
    assert mk.pack_embed_weight(w.half()) is None
    with torch.inference_mode():
        assert mk.pack_embed_weight(torch.randn(8, 3, 4, 4)) is None  # no version counter
    with pytest.raises(ValueError, match=r"expected a patch embedding weight \[D, C, P, P\], got \(8, 48\)"):
        mk.pack_embed_weight(w.reshape(8, 48))


def test_a_blob_of_the_wrong_type_is_an_error():
    x, w, b, cls, pos = inputs((1, 3, 32, 32, 8, 16))
    with pytest.raises(TypeError, match="expected packed_weight as the 1-D uint8 tensor mcl_kernels.pack_embed_weight "
                                        r"returns \(or None\), got a torch.float32 tensor of shape \(3,\)"):
        mk.embed_tokens(x, w, b, cls, pos, packed_weight=torch.zeros(3))
    with pytest.raises(RuntimeError, match="expected packed_weight as the 1-D uint8 CPU tensor embed_tokens_pack "
                                           r"returns, got a Float tensor of shape \[3\]"):
        embed(x, w, b, cls, pos, packed=torch.zeros(3))


@needs_patch_kernels
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_the_op_takes_a_blob_on_every_backend_and_under_compile(backend):
    args = inputs((2, 3, 64, 64, 40, 32))
    blob = mk.pack_embed_weight(args[1])
    plain = mk.embed_tokens(*args, backend=backend)
    assert torch.equal(mk.embed_tokens(*args, backend=backend, packed_weight=blob), plain)

    def f(x, w, b, cls, pos, packed):
        return mk.embed_tokens(x, w, b, cls, pos, backend=backend, packed_weight=packed)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args, blob), plain, rtol=0, atol=0)


def test_autograd_through_the_op_with_a_blob_matches_without():
    x, w, b, cls, pos = inputs((2, 3, 32, 32, 24, 16))
    leaves = [t.detach().requires_grad_() for t in (x, w, b, cls, pos)]
    blob = mk.pack_embed_weight(w)
    grads = []
    for packed in (None, blob):
        out = mk.embed_tokens(*leaves, packed_weight=packed)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, e in zip(*grads):
        assert torch.equal(a, e)


@needs_patch_kernels
def test_merged_patch_embed_packs_once_and_again_when_its_weight_changes(blobs_passed):
    torch.manual_seed(0)
    m = mk.MergedPatchEmbed(64, 32, 3, 40, prepack=True).eval()
    plain = mk.MergedPatchEmbed(64, 32, 3, 40).eval()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        blob = m.packed_weight()
        assert blob is not None and m.packed_weight() is blob  # kept, not packed per call
        assert _C.embed_tokens_cpu_uses_packed(x, m.proj.weight, blob)
        assert torch.equal(m(x), plain(x))
        assert blobs_passed == [blob, None]
        assert plain.packed_weight() is None
        # load_state_dict copies in place: the version moves on, the module packs again.
        other = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
        m.load_state_dict(other)
        plain.load_state_dict(other)
        assert m.packed_weight() is not blob
        assert _C.embed_tokens_cpu_uses_packed(x, m.proj.weight, m.packed_weight())
        assert torch.equal(m(x), plain(x))
        # A change through .data is not seen by the version counter: clear_packed() packs again.
        m.proj.weight.data.mul_(3)
        plain.proj.weight.data.mul_(3)
        m.clear_packed()
        assert torch.equal(m(x), plain(x))
    # A training forward (the weight gets a gradient) packs per call, as without prepack.
    m.train()
    assert m.packed_weight() is None
    blobs_passed.clear()
    out = m(x)
    out.sum().backward()
    assert m.proj.weight.grad is not None and blobs_passed == [None]


@needs_patch_kernels
def test_prepack_survives_pickling_copying_and_fusing():
    m = mk.MergedPatchEmbed(64, 32, 3, 40, prepack=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert m.packed_weight() is not None
        buf = io.BytesIO()
        torch.save(m, buf)  # the blob is not pickled: the weak reference could not be, nor should 4 MiB more
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert repr(loaded._packed) == "PackedEmbedWeight(empty)"
        assert torch.equal(loaded(x), ref) and loaded.packed_weight() is not None
        dup = copy.deepcopy(m)
        assert torch.equal(dup(x), ref)
        assert _C.embed_tokens_cpu_uses_packed(x, dup.proj.weight, dup.packed_weight())
    with pytest.raises(TypeError, match="prepack must be True or False, got 1"):
        mk.MergedPatchEmbed(64, 32, 3, 40, prepack=1)
    f = mk.FusedMCLEmbed(64, 16, 2, 3, 24, prepack=True).eval()
    assert f.packed_weight() is None  # unfused: the merged weight is computed per call
    merged = f.fuse()
    assert merged.prepack
    f.reparameterize()
    with torch.no_grad():
        assert merged.packed_weight() is not None and f.packed_weight() is not None
        assert torch.equal(f(x), merged(x))
        assert _C.embed_tokens_cpu_uses_packed(x, f.proj.weight, f.packed_weight())


@needs_patch_kernels
def test_a_deployed_mcl_vit_reads_its_prepacked_embedding(blobs_passed):
    """An MCLViT merged in place (timm's reparameterize_model) runs its embedding as MergedPatchEmbed; with
    prepack=True on it, forward_large reads the packed weight and computes the same logits."""
    pytest.importorskip("timm")
    from timm.utils import reparameterize_model
    model = mk.create_model("mcl_deit_tiny_patch32_224", num_classes=5, img_size=64, embed_dim=32, depth=1,
                            num_heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        merged = reparameterize_model(model)
        expected = merged.forward_large(x)
        pe = merged.vit.patch_embed
        assert isinstance(pe, mk.MergedPatchEmbed) and pe.packed_weight() is None
        pe.prepack = True
        blobs_passed.clear()
        assert torch.equal(merged.forward_large(x), expected)
        assert len(blobs_passed) == 1 and blobs_passed[0] is pe.packed_weight()
        assert _C.embed_tokens_cpu_uses_packed(x, pe.proj.weight, pe.packed_weight())
