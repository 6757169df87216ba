"""The Triton backward of the training embedding (`mcl_kernels.triton.mcl_embed_backward`) against the
reference's explicit backward: every gradient (image, every weight and bias), called directly and through the
public API (``FusedMCLEmbed(backend="triton")``), plus its split reduction of the weight gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the shapes are
small; the real ViT shape runs only on a CUDA device.
"""
import pytest
import torch

import mcl_kernels as mk
from helpers import assert_close
from mcl_kernels import backends, reference

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from mcl_kernels.triton import gathered_gemm as kernel_module  # noqa: E402  (the split reduction lives there)
from mcl_kernels.triton.mcl_embed_backward import mcl_embed_backward as triton_backward  # noqa: E402
from test_triton_mcl_embed import SHAPES, make_inputs, shape_id  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU shape runs only on one")

GRADS = ("x", "proj_w", "proj_b", "comp_w", "comp_b", "decomp_w", "decomp_b")
ALL = [True] * 7


def forward_and_upstream(inputs, missing=()):
    """The forward's saved ``(S, L)`` and upstream gradients ``(gS, gL, gR)`` (those in ``missing`` None)."""
    small, large, recon = reference.mcl_embed(*inputs)
    ups = [torch.randn_like(small), torch.randn_like(large), None if recon is None else torch.randn_like(recon)]
    ups = [None if name in missing else u for name, u in zip(("gS", "gL", "gR"), ups)]
    return small, large, ups


def needs_for(inputs, needs=ALL):
    """``needs`` restricted to the parameters that exist (no bias / no decompression: False)."""
    return [bool(n) and inputs[i] is not None for i, n in enumerate(needs)]


def run_both(inputs, small, large, ups, needs, ref_dtype=torch.float64):
    """Triton's gradients and the reference's (computed in ``ref_dtype`` from the same values)."""
    *tensors, k = inputs
    got = triton_backward(*ups, *tensors, small, large, k, needs)
    c = [None if t is None else t.to(ref_dtype) for t in (*ups, *tensors, small, large)]
    want = reference.mcl_embed_backward(*c, k, needs)
    return got, want


def fp32_atol(inputs, small):
    """DESIGN §4: 1e-4 scaled by sqrt of the longest reduction (C·p·p, k²·D or the token count B·Hs·Ws)."""
    x, pw, _, cw, *_ = inputs
    return 1e-4 * max(pw[0].numel(), cw.shape[1], small.shape[0] * small.shape[1], 1) ** 0.5


def check(label, got, want, atol, rtol=1e-5, dtype=torch.float32):
    for name, g, w in zip(GRADS, got, want):
        if g is not None:
            assert g.is_contiguous() and g.dtype == dtype, f"{label} {name}: {g.dtype}, contiguous={g.is_contiguous()}"
        assert_close(f"{label} grad {name}", g, None if w is None else w.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float32_every_gradient_matches_reference(shape, variant):
    inputs = make_inputs(shape, variant, "channels_last")
    small, large, ups = forward_and_upstream(inputs)
    got, want = run_both(inputs, small, large, ups, needs_for(inputs))
    check(f"{shape_id(shape)} {variant}", got, want, fp32_atol(inputs, small))


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_image_layouts(layout):
    """The patch matrix of x (weight gradient) is gathered through x's strides: every layout, no copy."""
    inputs = make_inputs(SHAPES[2], "untied", layout)
    small, large, ups = forward_and_upstream(inputs)
    got, want = run_both(inputs, small, large, ups, ALL)
    check(layout, got, want, fp32_atol(inputs, small))


def test_strided_upstream_gradients_and_parameters():
    """Upstream gradients and weights are read through their strides: an expanded gS (stride 0 over the
    batch, what ``small.sum(0)`` sends back), transposed-copy gL/gR, transposed weights."""
    x, pw, pb, cw, cb, dw, db, k = make_inputs(SHAPES[0], "untied")
    small, large, (gs, gl, gr) = forward_and_upstream((x, pw, pb, cw, cb, dw, db, k))
    gs = gs[:1].expand_as(gs)
    gl = gl.transpose(1, 2).contiguous().transpose(1, 2)
    gr = gr.transpose(0, 1).contiguous().transpose(0, 1)
    pw_t = pw.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    cw_t, dw_t = cw.t().contiguous().t(), dw.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (gs, gl, gr, pw_t, cw_t, dw_t))
    inputs = (x, pw_t, pb, cw_t, cb, dw_t, db, k)
    got, want = run_both(inputs, small, large, (gs, gl, gr), ALL)
    check("strided", got, want, fp32_atol(inputs, small))


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_float64_accumulates_in_float64(variant):
    inputs = make_inputs(SHAPES[1], variant, "sliced", dtype=torch.float64)
    small, large, ups = forward_and_upstream(inputs)
    got, want = run_both(inputs, small, large, ups, ALL)
    check("float64", got, want, atol=1e-12, rtol=1e-12, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]], ids=shape_id)
def test_low_precision_within_twice_torch_error(shape, dtype, variant):
    """Judged against PyTorch's own error: the reference backward in ``dtype`` vs in float32, both from the
    same ``dtype`` inputs and upstream gradients."""
    inputs = make_inputs(shape, variant, "channels_last", dtype=dtype)
    small, large, ups = forward_and_upstream(inputs)
    needs = needs_for(inputs)
    got, exact = run_both(inputs, small, large, ups, needs, ref_dtype=torch.float32)
    _, theirs = run_both(inputs, small, large, ups, needs, ref_dtype=dtype)
    for name, g, t, e in zip(GRADS, got, theirs, exact):
        assert (g is None) == (e is None), name
        if g is None:
            continue
        assert g.dtype == dtype and g.is_contiguous() and g.shape == e.shape
        torch_err = (t.float() - e).abs().max().item()
        our_err = (g.float() - e).abs().max().item()
        slack = 1e-3 * e.abs().max().item()  # where PyTorch happens to be (near) exact
        assert our_err <= 2 * torch_err + slack, (
            f"{dtype} {name}: error {our_err:.3g} vs torch's own {torch_err:.3g} (max |grad| {e.abs().max():.3g})")


@pytest.mark.parametrize("needs", [
    [True, False, False, False, False, False, False],   # image only
    [False, True, False, True, False, True, False],     # weights only
    [False, False, True, False, True, False, True],     # biases only: the row-sum pass without the GEMM
    [False, False, False, False, False, True, True],    # decompression only: no gradient reaches L or S
], ids=["x", "weights", "biases", "decomp"])
def test_only_the_gradients_asked_for(needs):
    inputs = make_inputs(SHAPES[0], "untied")
    small, large, ups = forward_and_upstream(inputs)
    got, want = run_both(inputs, small, large, ups, needs)
    for name, n, g in zip(GRADS, needs, got):
        assert (g is not None) == n, f"{name}: asked {n}, got {None if g is None else tuple(g.shape)}"
    check("subset", got, want, fp32_atol(inputs, small))


@pytest.mark.parametrize("missing", [("gS",), ("gL",), ("gR",), ("gL", "gR"), ("gS", "gL", "gR")],
                         ids=lambda m: "no_" + "_".join(m))
def test_absent_upstream_gradients_count_as_zero(missing):
    inputs = make_inputs(SHAPES[1], "untied")
    small, large, ups = forward_and_upstream(inputs, missing)
    got = triton_backward(*ups, *inputs[:-1], small, large, inputs[-1], ALL)
    zeros = [torch.zeros_like(small), torch.zeros_like(large), torch.zeros_like(small)]
    filled = [z if u is None else u for u, z in zip(ups, zeros)]
    want = reference.mcl_embed_backward(*filled, *inputs[:-1], small, large, inputs[-1], ALL)
    check("missing " + ",".join(missing), got, want, fp32_atol(inputs, small))


def test_empty_batch_gives_empty_image_gradient_and_zero_weight_gradients():
    inputs = make_inputs((0, 3, 16, 24, 4, 2, 20), "untied")
    small, large, ups = forward_and_upstream(inputs)
    got = triton_backward(*ups, *inputs[:-1], small, large, inputs[-1], ALL)
    assert got[0].shape == (0, 3, 16, 24)
    for name, g, p in zip(GRADS[1:], got[1:], inputs[1:7]):
        assert g.shape == p.shape and not g.any(), f"{name}: {tuple(g.shape)}, max {g.abs().max()}"


# ---- the weight-gradient reduction -------------------------------------------------------------------------

def test_plan_splits_covers_every_row_once():
    for rows in (0, 1, 39, 40, 41, 400, 1001):
        split, per = kernel_module.plan_splits(rows, 20, 48, torch.device("cpu"))
        assert split >= 1 and split * per >= rows and (split - 1) * per < max(rows, 1), (rows, split, per)


def test_plan_splits_on_a_gpu_fills_it_for_128x128_tiles(monkeypatch):
    """On a GPU (here an H100's 132 SMs, faked): enough (tile, split) programs for two per SM at 128x128 tiles,
    at most one split per started 256 rows; the rows per split the H100 run tuned for at D = 384, B = 256 (gW_c over
    12544 large tokens: 1568; gE_s over 50176 small tokens: 3346)."""
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert kernel_module.plan_splits(12544, 384, 1536, cuda) == (8, 1568)
    assert kernel_module.plan_splits(50176, 384, 768, cuda) == (15, 3346)
    assert kernel_module.plan_splits(300, 384, 768, cuda) == (2, 150)  # 300 rows: 2 splits, not 15
    assert kernel_module.plan_splits(12544, 4096, 4096, cuda) == (1, 12544)  # 1024 tiles fill the GPU alone


@pytest.mark.parametrize("rows_per_split", [7, 16, 10_000], ids=["ragged_many", "one_block_each", "single"])
def test_weight_gradients_do_not_depend_on_the_split(monkeypatch, rows_per_split):
    """Several ragged splits, exactly one row block per split, and a single split all match the reference."""
    monkeypatch.setattr(kernel_module, "INTERPRETER_ROWS_PER_SPLIT", rows_per_split)
    inputs = make_inputs(SHAPES[2], "tied")  # 3·144 small and 3·36 large tokens: up to 62 splits
    small, large, ups = forward_and_upstream(inputs)
    got, want = run_both(inputs, small, large, ups, ALL)
    check(f"rows_per_split={rows_per_split}", got, want, fp32_atol(inputs, small))


def test_repeated_runs_are_bitwise_identical():
    inputs = make_inputs(SHAPES[0], "untied", dtype=torch.bfloat16)
    small, large, ups = forward_and_upstream(inputs)
    first = triton_backward(*ups, *inputs[:-1], small, large, inputs[-1], ALL)
    second = triton_backward(*ups, *inputs[:-1], small, large, inputs[-1], ALL)
    for name, a, b in zip(GRADS, first, second):
        assert torch.equal(a, b), name


# ---- through the public API -------------------------------------------------------------------------------

@pytest.fixture
def triton_backward_spy(monkeypatch):
    """Counts calls of the registered Triton backward, proving the public API reaches it."""
    ops = backends.BACKENDS["triton"].ops
    assert "mcl_embed_backward" in ops, "the 'triton' backend does not register mcl_embed_backward (backends.py)"
    calls = []
    registered = ops["mcl_embed_backward"]

    def spy(*args):
        calls.append(args)
        return registered(*args)
    monkeypatch.setitem(ops, "mcl_embed_backward", spy)
    return calls


def _module_pair(backend, decompress, tied, k, dtype=torch.float32):
    torch.manual_seed(3)
    return mk.FusedMCLEmbed(img_size=(12, 24) if k == 2 else (18, 36), patch_size=3, compress=k, in_chans=2,
                            embed_dim=20, decompress=decompress, tied_decompress=tied, backend=backend, dtype=dtype)


@pytest.mark.parametrize("decompress,tied,k", [(True, False, 2), (True, True, 3), (False, False, 2)],
                         ids=["untied_k2", "tied_k3", "nodecomp_k2"])
def test_fused_module_backward_matches_reference(triton_backward_spy, decompress, tied, k):
    ours, ref = _module_pair("triton", decompress, tied, k), _module_pair("reference", decompress, tied, k)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 2, *ours.img_size).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    losses = []
    for module, inp in ((ours, x), (ref, x_ref)):
        out = module(inp)
        loss = out.small.square().mean() + out.large.sin().sum()  # both token sets' gradients matter
        if out.recon is not None:
            loss = loss + (out.recon - out.small).square().mean()  # the reconstruction loss reaches S twice
        loss.backward()
        losses.append(loss.detach())
    assert len(triton_backward_spy) == 1
    assert_close("loss", losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert_close("grad x", x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(f"grad {name}", p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_functional_backend_from_environment(triton_backward_spy, monkeypatch):
    """``MCL_KERNELS_BACKEND=triton`` makes ``backend="auto"`` run the Triton forward and backward on CPU."""
    monkeypatch.setenv("MCL_KERNELS_BACKEND", "triton")
    x, pw, pb, cw, cb, dw, db, k = [t.requires_grad_(True) if torch.is_tensor(t) else t
                                    for t in make_inputs(SHAPES[1], "untied")]
    out = mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=k)
    torch.autograd.backward([out.small, out.large, out.recon], [torch.ones_like(out.small),
                                                                torch.ones_like(out.large), torch.ones_like(out.recon)])
    assert len(triton_backward_spy) == 1
    params = (x, pw, pb, cw, cb, dw, db)
    got = [p.grad for p in params]
    want = torch.autograd.grad(sum(t.sum() for t in reference.mcl_embed(*params, k)), params)
    for name, g, w in zip(GRADS, got, want):
        assert_close(f"env grad {name}", g, w, atol=1e-4, rtol=1e-5)


def test_triton_forward_with_reference_backward_through_auto(triton_backward_spy, monkeypatch):
    """The pairing ``auto`` makes on CUDA (backends.AUTO_ORDER_PER_OP): the Triton forward, the reference backward
    on the forward's saved S and L. Set up here for CPU tensors (the interpreter), it gives the reference's
    gradients, and the Triton backward is not called."""
    monkeypatch.setitem(backends.AUTO_ORDER_PER_OP, ("cpu", "mcl_embed"), ("triton",))
    monkeypatch.setitem(backends.AUTO_ORDER_PER_OP, ("cpu", "mcl_embed_backward"), ("reference",))
    forward_calls = []
    triton_forward = backends.BACKENDS["triton"].ops["mcl_embed"]
    monkeypatch.setitem(backends.BACKENDS["triton"].ops, "mcl_embed",
                        lambda *a: forward_calls.append(1) or triton_forward(*a))
    x, pw, pb, cw, cb, dw, db, k = [t.requires_grad_(True) if torch.is_tensor(t) else t
                                    for t in make_inputs(SHAPES[0], "untied")]
    out = mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=k, backend="auto")
    ups = [torch.randn_like(out.small), torch.randn_like(out.large), torch.randn_like(out.recon)]
    torch.autograd.backward([out.small, out.large, out.recon], ups)
    assert forward_calls == [1] and not triton_backward_spy
    params = (x, pw, pb, cw, cb, dw, db)
    want = torch.autograd.grad(reference.mcl_embed(*params, k), params, ups)
    for name, p, w in zip(GRADS, params, want):
        assert_close(f"mixed grad {name}", p.grad, w, atol=1e-4, rtol=1e-5)


# ---- on a GPU, at a real ViT shape -------------------------------------------------------------------------

GPU_SHAPE = (8, 3, 224, 224, 16, 2, 192)  # ViT-Ti/16 at 224² compressed to /32: B=8, 196 -> 49 tokens


@needs_cuda
@pytest.mark.parametrize("variant", ["untied", "tied", "nodecomp"])
def test_cuda_bfloat16_at_vit_shape_within_twice_torch_error(variant):
    inputs = make_inputs(GPU_SHAPE, variant, "channels_last", dtype=torch.bfloat16, device="cuda")
    small, large, ups = forward_and_upstream(inputs)
    needs = needs_for(inputs)
    got, exact = run_both(inputs, small, large, ups, needs, ref_dtype=torch.float32)
    _, theirs = run_both(inputs, small, large, ups, needs, ref_dtype=torch.bfloat16)
    for name, g, t, e in zip(GRADS, got, theirs, exact):
        if e is None:
            assert g is None
            continue
        torch_err = (t.float() - e).abs().max().item()
        our_err = (g.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-3 * e.abs().max().item(), f"bf16 {name}: {our_err:.3g} vs {torch_err:.3g}"


@needs_cuda
def test_cuda_deterministic_mode_is_bitwise_reproducible():
    inputs = make_inputs(GPU_SHAPE, "untied", dtype=torch.bfloat16, device="cuda")
    small, large, ups = forward_and_upstream(inputs)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [triton_backward(*ups, *inputs[:-1], small, large, inputs[-1], ALL) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(GRADS, *runs):
        assert torch.equal(a, b), name
    _, want = run_both(inputs, small, large, ups, ALL, ref_dtype=torch.float32)
    for name, g, w in zip(GRADS, runs[0], want):
        assert_close(f"deterministic {name}", g.float(), w, atol=5e-2 * w.abs().max().item(), rtol=0)


@needs_cuda
def test_cuda_float32():
    inputs = make_inputs(GPU_SHAPE, "tied", device="cuda")
    small, large, ups = forward_and_upstream(inputs)
    got, want = run_both(inputs, small, large, ups, ALL)
    tight = torch.get_float32_matmul_precision() == "highest"
    for name, g, w in zip(GRADS, got, want):
        tol = fp32_atol(inputs, small) if tight else 5e-3 * w.abs().max().item()
        assert_close(f"cuda fp32 {name}", g, w.float(), atol=tol, rtol=1e-4)
