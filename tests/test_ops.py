"""The op layer: every path through the ops matches the reference (forward and every gradient), and the
ops are real PyTorch ops (opcheck, torch.compile(fullgraph=True), torch.export)."""
import pytest
import torch

import mcl_kernels as mk
from mcl_kernels import reference
from helpers import assert_close, mcl_params, resolve_tied

CASES = [  # (B, C, D, p, ks, (H, W))
    (2, 3, 16, 4, (2,), (16, 24)),       # non-square
    (1, 3, 40, 4, (3,), (24, 36)),       # batch 1, D not a multiple of 16, k = 3
    (3, 1, 24, 14, (2,), (28, 56)),      # patch 14, one channel
    (0, 3, 8, 4, (2,), (16, 16)),        # empty batch
    (2, 2, 12, 2, (2, 2), (16, 8)),      # chain 2 -> 4 -> 8
]
MODES = ["untied", "tied", "no_decompress"]


def _flat(out):
    """MCLTokens -> flat list of tensors (tuples for chains, None skipped)."""
    items = []
    for field in out:
        if field is None:
            continue
        items.extend(field if isinstance(field, tuple) else [field])
    return items


def _run_both(B, C, D, p, ks, hw, mode, dtype=torch.float32, backend="auto", layout="contiguous"):
    pw, pb, levels = mcl_params(C, D, p, ks, decompress=mode != "no_decompress", tied=mode == "tied",
                                dtype=dtype, requires_grad=True)
    x = torch.randn(B, C, *hw, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(B, C, hw[0], 2 * hw[1], dtype=dtype)[..., ::2]
    x.requires_grad_(True)
    chain = len(ks) > 1
    pick = (lambda v: v) if chain else (lambda v: v[0])  # noqa: E731
    out = mk.mcl_embed(x, pw, pb, pick([lv[1] for lv in levels]), pick([lv[2] for lv in levels]),
                       pick([lv[3] for lv in levels]) if mode == "untied" else None,
                       pick([lv[4] for lv in levels]), compress=pick(list(ks)), tied_decompress=mode == "tied",
                       backend=backend)
    tokens, recons = reference.mcl_embed_chain(x, pw, pb, resolve_tied(levels, mode == "tied"))
    expected = tokens + [r for r in recons if r is not None]
    got = _flat(out) if not chain else list(out.small) + [out.large[-1]] + list(out.recon or ())
    params = [x, pw, pb] + [t for lv in levels for t in lv[1:] if t is not None]
    return got, expected, params


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}D{c[2]}p{c[3]}k{c[4]}{c[5][0]}x{c[5][1]}")
def test_forward_and_every_gradient_match_reference(case, mode):
    got, expected, params = _run_both(*case, mode)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(f"output {i}", g, e, atol=1e-5, rtol=1e-5)
    upstream = [torch.randn_like(e) for e in expected]
    g_got = torch.autograd.grad(got, params, upstream, allow_unused=True)
    g_ref = torch.autograd.grad(expected, params, upstream, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_ref)):
        assert_close(f"grad of input {i}", a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_give_same_result(layout):
    torch.manual_seed(1)
    got, expected, _ = _run_both(2, 3, 16, 4, (2,), (16, 24), "untied", layout=layout)
    for g, e in zip(got, expected):
        assert_close(layout, g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_forward(dtype, atol):
    got, expected, _ = _run_both(2, 3, 16, 4, (2,), (16, 24), "untied", dtype=dtype)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        assert_close("low precision", g, e, atol=atol, rtol=atol)


def test_empty_batch_shapes():
    got, _, params = _run_both(0, 3, 8, 4, (2,), (16, 16), "untied")
    assert [tuple(t.shape) for t in got] == [(0, 16, 8), (0, 4, 8), (0, 16, 8)]
    grads = torch.autograd.grad(sum(t.sum() for t in got), params[1:])
    assert all(int(torch.count_nonzero(g)) == 0 for g in grads)


def test_gradients_only_where_asked():
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(3, 8, 4, (2,))
    cw.requires_grad_(True)
    x = torch.randn(1, 3, 16, 16)
    out = mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=k)
    (g,) = torch.autograd.grad(out.large.sum(), [cw])
    ref = torch.autograd.grad(reference.mcl_embed(x, pw, pb, cw, cb, dw, db, k)[1].sum(), [cw])[0]
    assert_close("grad compress.weight", g, ref, atol=1e-5)


def test_embed_tokens_op_matches_reference():
    x = torch.randn(3, 2, 64, 32, requires_grad=True)
    w = torch.randn(10, 2, 32, 32, requires_grad=True)
    b, cls, pos = (torch.randn(10, requires_grad=True), torch.randn(1, 1, 10, requires_grad=True),
                   torch.randn(1, 3, 10, requires_grad=True))
    for backend in ["reference", "auto"]:
        out = mk.embed_tokens(x, w, b, cls, pos, backend=backend)
        ref = reference.embed_tokens(x, w, b, cls, pos)
        assert_close(f"{backend} forward", out, ref, atol=1e-4, rtol=1e-4)
        up = torch.randn_like(ref)
        for i, (a, e) in enumerate(zip(torch.autograd.grad(out, [x, w, b, cls, pos], up),
                                       torch.autograd.grad(ref, [x, w, b, cls, pos], up))):
            assert_close(f"{backend} grad {i}", a, e, atol=1e-3, rtol=1e-4)


# ---- real PyTorch ops ------------------------------------------------------------------------------

def _opcheck_samples():
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(2, 6, 2, (2,), requires_grad=True)
    x = torch.randn(2, 2, 8, 12, requires_grad=True)
    yield "mcl_embed", (x, pw, pb, cw, cb, dw, db, k, "reference")
    yield "mcl_embed no decompress", (x, pw, None, cw, None, None, None, k, "auto")
    tokens = torch.randn(2, 24, 6, requires_grad=True)
    yield "mcl_compress", (tokens, cw, cb, dw, db, 4, 6, k, "reference")
    yield "embed_tokens", (x, torch.randn(6, 2, 4, 4, requires_grad=True), None,
                           torch.randn(6, requires_grad=True), torch.randn(7, 6, requires_grad=True), "auto")


@pytest.mark.parametrize("name,args", list(_opcheck_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    op = {"mcl_embed": torch.ops.mcl_kernels.mcl_embed.default,
          "mcl_compress": torch.ops.mcl_kernels.mcl_compress.default,
          "embed_tokens": torch.ops.mcl_kernels.embed_tokens.default}[name.split()[0]]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(2, 6, 2, (2,))
    x = torch.randn(2, 2, 8, 12)
    s, l, r = reference.mcl_embed(x, pw, pb, cw, cb, dw, db, k)
    torch.library.opcheck(torch.ops.mcl_kernels.mcl_embed_backward.default,
                          (torch.randn_like(s), torch.randn_like(l), torch.randn_like(r), x, pw, pb, cw, cb, dw, db,
                           s, l, k, [True, True, True, True, True, True, True], "auto"))


def test_compile_fullgraph_forward_backward_same_numbers():
    """Forward traced whole (fullgraph), backward through AOTAutograd's compiled graph: same numbers."""
    torch._dynamo.reset()
    m = mk.FusedMCLEmbed(img_size=(16, 24), patch_size=4, compress=2, in_chans=3, embed_dim=16)

    def loss_fn(module, inp):
        out = module(inp)
        return out.small.square().mean() + out.large.sum() + (out.recon - out.small).square().mean()

    def run(fn):
        x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
        m.zero_grad()
        loss = fn(m, x)
        loss.backward()
        return [loss, x.grad] + [p.grad.clone() for p in m.parameters()]

    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, fullgraph=True))
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_close(f"compiled result {i}", a, b, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_merged_embed():
    torch._dynamo.reset()
    m = mk.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=12).fuse()
    x = torch.randn(2, 3, 32, 32)
    cls, pos = torch.randn(1, 1, 12), torch.randn(1, 5, 12)
    compiled = torch.compile(lambda a: m(a, cls, pos), fullgraph=True)
    assert_close("compiled merged", compiled(x), m(x, cls, pos), atol=1e-5)


def test_export_training_and_merged_embed():
    m = mk.FusedMCLEmbed(img_size=(16, 32), patch_size=4, embed_dim=8, tied_decompress=True)
    x = torch.randn(2, 3, 16, 32)
    ep = torch.export.export(m, (x,))
    for a, b in zip(ep.module()(x), m(x)):
        assert_close("exported training embed", a, b, atol=1e-6)
    names = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.mcl_kernels.mcl_embed.default in names
    merged = m.fuse()
    ep2 = torch.export.export(merged, (x,))
    assert_close("exported merged embed", ep2.module()(x), merged(x), atol=1e-6)


def test_export_and_compile_chain():
    torch._dynamo.reset()
    m = mk.FusedMCLEmbed(img_size=(16, 32), in_chans=3, embed_dim=8, scales=(2, 4, 8))
    x = torch.randn(2, 3, 16, 32)
    eager = _flat(m(x))
    ep = torch.export.export(m, (x,))
    assert torch.ops.mcl_kernels.mcl_compress.default in {n.target for n in ep.graph.nodes}
    for i, (a, b) in enumerate(zip(_flat(ep.module()(x)), eager)):
        assert_close(f"exported chain output {i}", a, b, atol=1e-6)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    for i, (a, b) in enumerate(zip(_flat(out), eager)):
        assert_close(f"compiled chain output {i}", a, b, atol=1e-5)
    sum(t.sum() for t in _flat(out)).backward()
    assert all(p.grad is not None for p in m.parameters())


# ---- backend registry ------------------------------------------------------------------------------

def test_unknown_backend_is_rejected_early():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*'reference'"):
        mk.FusedMCLEmbed(backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        mk.embed_tokens(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8), backend="nope")


def test_environment_sets_what_auto_means(monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 8, 8)
    monkeypatch.setenv("MCL_KERNELS_BACKEND", "reference")
    assert mk.backends.requested("auto") == "reference"
    assert mk.backends.requested("cpu") == "cpu"  # an explicit choice wins over the environment
    assert_close("env reference", mk.embed_tokens(x, w), reference.embed_tokens(x, w, None, None, None), atol=1e-5)
    monkeypatch.setenv("MCL_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MCL_KERNELS_BACKEND='bogus'"):
        mk.embed_tokens(x, w)


def test_backend_without_kernel_for_op_says_so(monkeypatch):
    # The C++ backend covers mcl_embed now: take it away to see the message a missing kernel gives (or, with
    # the extension not built, the message of an unavailable backend).
    monkeypatch.delitem(mk.backends.BACKENDS["cpu"].ops, "mcl_embed", raising=False)
    m = mk.FusedMCLEmbed(img_size=16, patch_size=4, embed_dim=8, backend="cpu")
    with pytest.raises((NotImplementedError, RuntimeError), match="backend 'cpu'"):
        m(torch.randn(1, 3, 16, 16))


def test_unavailable_backend_says_why_and_how():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*To get it"):
        mk.embed_tokens(x, w, backend="cuda")


def test_unavailable_cpu_backend_when_extension_missing(monkeypatch):
    from mcl_kernels import _extension
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "IMPORT_ERROR", "ModuleNotFoundError: No module named 'mcl_kernels._C'")
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match="not available: the compiled extension .* not loaded.*pip install"):
        mk.embed_tokens(x, w, backend="cpu")
    assert_close("auto falls back", mk.embed_tokens(x, w), reference.embed_tokens(x, w, None, None, None), atol=1e-5)


def test_triton_backend_without_kernel_for_op_says_so(monkeypatch):
    # Triton now covers every forward op: take one away to see the message a missing kernel gives.
    monkeypatch.delitem(mk.backends.BACKENDS["triton"].ops, "mcl_compress")
    m = mk.FusedMCLEmbed(img_size=16, embed_dim=16, scales=(4, 8, 16), backend="triton")
    with pytest.raises(NotImplementedError, match="backend 'triton' has no kernel for mcl_compress"):
        m(torch.randn(1, 3, 16, 16))


def test_import_without_extension_warns_once_and_runs_reference():
    import subprocess
    import sys
    code = (
        "import sys, warnings\n"
        "sys.modules['mcl_kernels._C'] = None  # as if the extension had not been built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import mcl_kernels, mcl_kernels.ops\n"
        "msgs = [str(w.message) for w in caught if 'mcl_kernels._C' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'pip install' in msgs[0], msgs\n"
        "import torch\n"
        "out = mcl_kernels.FusedMCLEmbed(img_size=32, patch_size=8, embed_dim=8)(torch.randn(1, 3, 32, 32))\n"
        "assert out.large.shape == (1, 4, 8)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_auto_choice_follows_the_measured_order():
    """On CPU, auto runs the C++ kernels wherever the extension is built (measured faster, see AUTO_ORDER in
    backends.py) and the reference otherwise; asking for 'cpu' by name gets the C++ kernel."""
    from mcl_kernels import _extension, backends
    cpu = torch.device("cpu")
    ops = ("embed_tokens", "mcl_embed", "mcl_embed_backward", "mcl_compress", "mcl_compress_backward")
    for op in ops:
        want = backends.REFERENCE_OPS[op]
        if _extension._C is not None:
            want = backends.BACKENDS["cpu"].ops.get(op, want)
        assert backends.resolve(op, "auto", cpu) is want, op
    if _extension._C is not None:
        assert backends.resolve("embed_tokens", "cpu", cpu) is backends.BACKENDS["cpu"].ops["embed_tokens"]


@pytest.mark.parametrize("cpu_kind", ["avx512", "amx", "avx2"])
def test_auto_by_call_size_follows_the_measured_crossovers(monkeypatch, cpu_kind):
    """Below the call sizes in AUTO_MIN_TOKENS (where the C++ kernel measured slower than the reference; on AMX
    CPUs AUTO_MIN_TOKENS_AMX, on AVX2 CPUs AUTO_MIN_TOKENS_AVX2 where it has the op), auto runs the reference; from
    there on, the order's first choice. A backend named explicitly ignores sizes."""
    from mcl_kernels import _extension, backends
    amx, avx2 = cpu_kind == "amx", cpu_kind == "avx2"
    monkeypatch.setattr(backends, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(backends, "cpu_avx2_only", lambda: avx2)
    cpu = torch.device("cpu")
    assert backends.AUTO_MIN_TOKENS, "the size rules are measured data: the table must not be empty"
    tables = {(op, dtype): rule for (_, op, dtype), rule in backends.AUTO_MIN_TOKENS.items()}
    assert all(device_type == "cpu" for device_type, _, _ in backends.AUTO_MIN_TOKENS)
    if amx:
        tables.update(backends.AUTO_MIN_TOKENS_AMX)
    if avx2:
        tables.update(backends.AUTO_MIN_TOKENS_AVX2)
    for (op, dtype), rule in tables.items():
        assert op in backends.REFERENCE_OPS
        widths = [w for w, _ in rule]
        assert widths == sorted(widths), f"{op} {dtype}: widths must ascend"
        first = backends.auto_order(op, cpu, dtype)
        for widest, fewest in rule:
            if fewest > 0:
                assert backends.auto_order(op, cpu, dtype, (fewest - 1, widest)) == ("reference",), (op, dtype)
            if fewest < backends._ANY_WIDTH:
                assert backends.auto_order(op, cpu, dtype, (fewest, widest)) == first, (op, dtype)
            if _extension._C is not None and fewest > 0:
                small = backends.resolve(op, "auto", cpu, dtype, (fewest - 1, widest))
                assert small is backends.REFERENCE_OPS[op]
                assert backends.resolve(op, "cpu", cpu, dtype, (fewest - 1, widest)) is backends.BACKENDS["cpu"].ops[op]


def test_auto_on_avx2_cpus_follows_the_avx2_measurements():
    """On CPUs whose widest vectors are AVX2 (backends.AUTO_ORDER_AVX2, AUTO_MIN_TOKENS_AVX2): without bf16
    instructions torch's bf16 GEMMs and convolutions crawl (~1 GFLOP/s) while the C++ kernels run bf16 at their fp32
    rate, so bfloat16 takes the C++ kernels at every size; float32 follows the AVX2 grid. An AMX CPU is never taken
    for an AVX2 one. The real call follows this CPU's answer."""
    from mcl_kernels import _extension, backends
    cpu = torch.device("cpu")
    bf16, f32 = torch.bfloat16, torch.float32
    for op in ("embed_tokens", "mcl_embed", "mcl_embed_backward"):
        for size in (None, (196, 768), (64 * 196, 384)):
            assert backends.auto_order(op, cpu, bf16, size, amx=False, avx2=True)[0] == "cpu", (op, size)
    # elsewhere the AVX-512 tables' size rule sends one image at D = 768 to the reference
    assert backends.auto_order("mcl_embed", cpu, bf16, (196, 768), amx=False, avx2=False) == ("reference",)
    assert backends.auto_order("mcl_embed", cpu, bf16, (196, 768), amx=True, avx2=True) == ("reference",)
    for (op, dtype), order in backends.AUTO_ORDER_AVX2.items():
        assert backends.auto_order(op, cpu, dtype, (64 * 196, 384), amx=False, avx2=True) == order, (op, dtype)
    for (op, dtype), rule in backends.AUTO_MIN_TOKENS_AVX2.items():
        assert dtype in (f32, bf16) and rule, (op, dtype)
    # fp32 embed_tokens: the C++ kernel from one image up (measured 1.35-1.54x the reference at B = 1)
    for D in (192, 384, 768):
        for tokens in (49, 4 * 49, 64 * 49):
            assert backends.auto_order("embed_tokens", cpu, f32, (tokens, D), amx=False, avx2=True)[0] == "cpu"
    if _extension._C is not None:
        assert backends.cpu_avx2_only() == (_extension._C.patch_gemm_best_isa() == "avx2")
        got = backends.resolve("mcl_embed", "auto", cpu, bf16, (196, 768))
        want = backends.BACKENDS["cpu"].ops["mcl_embed"] if backends.cpu_avx2_only() else backends.REFERENCE_OPS["mcl_embed"]
        if not backends.cpu_has_amx():
            assert got is want


def test_auto_on_amx_cpus_follows_the_amx_measurements():
    """On CPUs with AMX (backends.AUTO_ORDER_AMX, AUTO_MIN_TOKENS_AMX): oneDNN's bf16 GEMMs and convolution beat
    the C++ kernels' AVX512-BF16 forwards, not the C++ training backward; in fp32 the C++ kernels lost at D = 768.
    Elsewhere (avx2=False: an AVX-512 CPU) the AMD-measured order holds. The real call follows this CPU's answer."""
    from mcl_kernels import _extension, backends
    cpu = torch.device("cpu")
    bf16, f32 = torch.bfloat16, torch.float32
    for op in ("embed_tokens", "mcl_embed"):
        assert backends.auto_order(op, cpu, bf16, amx=True) == ("reference",), op
        assert backends.auto_order(op, cpu, bf16, amx=False, avx2=False)[0] == "cpu", op
    # ... except where the C++ embed_tokens runs on the AMX tiles itself (bf16, unit W stride, patch % 16 == 0)
    assert backends.auto_order("embed_tokens", cpu, bf16, amx=True, amx_tiles=True)[0] == "cpu"
    x = torch.zeros(2, 3, 64, 64, dtype=bf16)
    for patch, layout in ((32, x), (16, x), (8, x), (32, x.contiguous(memory_format=torch.channels_last))):
        want = _extension._C is not None and _extension._C.embed_tokens_cpu_amx(layout, patch)
        assert backends.on_amx_tiles("embed_tokens", layout, patch) == want, (patch, layout.stride())
    assert backends.on_amx_tiles("mcl_embed", x, 32) == backends.on_amx_tiles("embed_tokens", x, 32)
    assert not backends.on_amx_tiles("mcl_compress", x, 32)
    # the training forward with its small-token GEMM on the tiles: the C++ kernel, but the reference for one image
    # at D = 768
    assert backends.auto_order("mcl_embed", cpu, bf16, (64 * 196, 768), amx=True, amx_tiles=True)[0] == "cpu"
    assert backends.auto_order("mcl_embed", cpu, bf16, (196, 768), amx=True, amx_tiles=True) == ("reference",)
    assert backends.auto_order("mcl_embed", cpu, bf16, (196, 384), amx=True, amx_tiles=True)[0] == "cpu"
    # the C++ backward after the reference forward, where its measurements won
    assert backends.auto_order("mcl_embed_backward", cpu, bf16, (64 * 196, 384), amx=True)[0] == "cpu"
    assert backends.auto_order("mcl_embed_backward", cpu, bf16, (196, 768), amx=True) == ("reference",)
    # fp32: the C++ kernels up to D = 384 (the forward from B = 16 there), the reference at D = 768
    for dtype in (f32, None):
        assert backends.auto_order("embed_tokens", cpu, dtype, amx=True)[0] == "cpu"
    assert backends.auto_order("mcl_embed", cpu, f32, (64 * 196, 384), amx=True)[0] == "cpu"
    assert backends.auto_order("mcl_embed", cpu, f32, (196, 384), amx=True) == ("reference",)
    assert backends.auto_order("mcl_embed", cpu, f32, (2 * 196, 384), amx=False, avx2=False)[0] == "cpu"
    assert backends.auto_order("mcl_embed", cpu, f32, (2 * 196, 384), amx=True) == ("reference",)
    for op in ("mcl_embed", "mcl_embed_backward"):
        assert backends.auto_order(op, cpu, f32, (64 * 196, 768), amx=True) == ("reference",), op
        assert backends.auto_order(op, cpu, f32, (64 * 196, 768), amx=False, avx2=False)[0] == "cpu", op
    if _extension._C is not None:
        got = backends.resolve("embed_tokens", "auto", cpu, torch.bfloat16)
        want = "reference" if backends.cpu_has_amx() else "cpu"
        assert got is (backends.REFERENCE_OPS["embed_tokens"] if want == "reference"
                       else backends.BACKENDS["cpu"].ops["embed_tokens"])
        assert backends.resolve("embed_tokens", "cpu", cpu, torch.bfloat16) is backends.BACKENDS["cpu"].ops["embed_tokens"]


def test_ops_pass_their_call_size_to_auto(monkeypatch):
    """The training-embedding op (forward and backward) resolves auto with (small tokens, width) of the call."""
    from mcl_kernels import backends
    seen = []
    real = backends.resolve

    def spy(op, name, device, dtype=None, size=None, **kw):
        seen.append((op, size))
        return real(op, name, device, dtype, size, **kw)

    monkeypatch.setattr(backends, "resolve", spy)
    x = torch.randn(3, 3, 40, 24)
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(C=3, D=12, p=4, ks=[2], requires_grad=True)
    out = mk.mcl_embed(x, pw, pb, cw, cb, dw, db, compress=k, backend="auto")
    (out.small.sum() + out.large.sum() + out.recon.sum()).backward()
    assert ("mcl_embed", (3 * 10 * 6, 12)) in seen and ("mcl_embed_backward", (3 * 10 * 6, 12)) in seen


def test_auto_order_on_cuda_follows_the_h100_measurements():
    """On CUDA (backends.py, measured on an H100): the Triton kernels for 16-bit inputs, except the training
    embedding's backward (the reference's cuBLAS GEMMs were faster) and plain attention (SDPA, through the
    reference's place in the order, was faster); the reference for float32 and float64 (the Triton kernels'
    exact-fp32 FMA dots lost to cuBLAS 3x), but the CUDA C++ embed_tokens in float32. Checked as the order auto
    tries, since resolving needs a GPU."""
    from mcl_kernels import backends
    cuda = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float16):
        for op in ("mcl_embed", "embed_tokens", "packed_attention", "packed_attention_backward"):
            assert backends.auto_order(op, cuda, dtype)[0] == "triton", (op, dtype)
        # the reference first: for plain attention that means PyTorch's SDPA (attention.py), which beat the op
        for op in ("mcl_embed_backward", "attention", "attention_backward"):
            assert backends.auto_order(op, cuda, dtype)[0] == "reference", (op, dtype)
    for dtype in (torch.float32, torch.float64):
        for op in backends.REFERENCE_OPS:
            if (op, dtype) != ("embed_tokens", torch.float32):
                assert backends.auto_order(op, cuda, dtype) == ("reference",), (op, dtype)
    assert backends.auto_order("embed_tokens", cuda, torch.float32) == ("cuda", "reference")
    assert backends.auto_order("mcl_embed", torch.device("cpu"), torch.float32)[0] == "cpu"
