"""The reference is the truth, so it is checked on its own: float64 gradcheck on every path, and the
re-parameterization reproducing the large-patch branch (DESIGN §2, §4)."""
import pytest
import torch
import torch.nn.functional as F

from mcl_kernels import reference
from helpers import assert_close, mcl_embed_inputs, mcl_params, rel_err, resolve_tied


@pytest.mark.parametrize("ks", [(2,), (3,), (2, 2)], ids=["k2", "k3", "chain"])
@pytest.mark.parametrize("mode", ["untied", "tied", "no_decompress"])
def test_gradcheck_float64(ks, mode):
    C, D, p = 2, 3, 2
    large = p
    for k in ks:
        large *= k
    x = torch.randn(2, C, large, 2 * large, dtype=torch.float64, requires_grad=True)
    proj_w, proj_b, levels = mcl_params(C, D, p, ks, decompress=mode != "no_decompress", tied=mode == "tied",
                                        dtype=torch.float64, requires_grad=True)
    flat = [proj_w, proj_b] + [t for lv in levels for t in lv[1:] if t is not None]

    def fn(x, *params):
        it = iter(params)
        pw, pb = next(it), next(it)
        lv = []
        for k, cw, cb, dw, db in levels:
            ncw, ncb = next(it), next(it)
            ndw = next(it) if dw is not None else (ncw.t() if mode == "tied" else None)
            ndb = next(it) if db is not None else None
            lv.append((k, ncw, ncb, ndw, ndb))
        tokens, recons = reference.mcl_embed_chain(x, pw, pb, lv)
        return tuple(tokens) + tuple(r for r in recons if r is not None)

    assert torch.autograd.gradcheck(fn, (x, *flat), eps=1e-6, atol=1e-7)


def test_gradcheck_two_scale_entry_point():
    x = torch.randn(1, 2, 6, 12, dtype=torch.float64, requires_grad=True)
    pw, pb, [(k, cw, cb, dw, db)] = mcl_params(2, 4, 2, (3,), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.mcl_embed(*a, k), (x, pw, pb, cw, cb, dw, db))


def test_gradcheck_merge_and_embed_tokens():
    pw, pb, [(k, cw, cb, _, _)] = mcl_params(2, 3, 2, (2,), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.merge_weights(a[0], a[1], [(k, a[2], a[3])]),
                                    (pw, pb, cw, cb))
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.embed_tokens, (x, pw, pb, cls, pos))


@pytest.mark.parametrize("variant", ["untied", "nodecomp", "nobias"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 12, 18, 2, 3, 5), (1, 2, 8, 16, 4, 2, 7)], ids=["k3", "k2"])
def test_explicit_backward_equals_autograd(shape, layout, variant):
    """The reference backend's backward ops (the formulas written out) against autograd of the forward they
    differentiate, in float64: every gradient, with and without the small tokens' upstream gradient, and with
    only some gradients asked for."""
    x, pw, pb, cw, cb, dw, db, k = mcl_embed_inputs(shape, variant, layout, torch.float64)
    inputs = [x, pw, pb, cw, cb, dw, db]
    for t in inputs:
        if t is not None:
            t.requires_grad_(True)
    small, large, recon = reference.mcl_embed(*inputs, k)
    for with_small in (True, False):
        ups = [torch.randn_like(small) if with_small else None, torch.randn_like(large),
               torch.randn_like(recon) if recon is not None else None]
        outs = [(o, u) for o, u in zip((small, large, recon), ups) if u is not None]
        wrt = [t for t in inputs if t is not None]
        want = iter(torch.autograd.grad([o for o, _ in outs], wrt, [u for _, u in outs], retain_graph=True))
        want = [next(want) if t is not None else None for t in inputs]
        for needs in ([t is not None for t in inputs], [False, True, False, True, False, dw is not None, False]):
            with torch.no_grad():
                got = reference.mcl_embed_backward(*ups, *inputs, small, large, k, needs)
            for i, (g, w, need) in enumerate(zip(got, want, needs)):
                if need:
                    assert_close(f"gradient {i} (small upstream: {with_small})", g, w, atol=1e-12, rtol=1e-10)
                else:
                    assert g is None, f"gradient {i} was not asked for"

    x = x.detach().requires_grad_(True)
    cls, pos = torch.randn(pw.shape[0], dtype=torch.float64), None
    for pos in (None, torch.randn(1, 1 + x.shape[-2] // pw.shape[-1] * (x.shape[-1] // pw.shape[-1]), pw.shape[0],
                                  dtype=torch.float64)):
        args = [x, pw, pb, cls.requires_grad_(True), pos.requires_grad_(True) if pos is not None else None]
        out = reference.embed_tokens(*args)
        up = torch.randn_like(out)
        wrt = [t for t in args if t is not None]
        want = iter(torch.autograd.grad(out, wrt, up))
        want = [next(want) if t is not None else None for t in args]
        got = reference.embed_tokens_backward(up, *args, [t is not None for t in args])
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(f"embed_tokens gradient {i}", g, w, atol=1e-12, rtol=1e-10)


def test_group_ungroup_order():
    """Large token (i, j) holds small tokens (i·k+u, j·k+v) at (u·k+v)·D + d, and ungroup inverts it."""
    B, hs, ws, D, k = 1, 4, 6, 2, 2
    t = torch.arange(B * hs * ws * D, dtype=torch.float64).reshape(B, hs * ws, D)
    g = reference.group(t, (hs, ws), k)
    for i in range(hs // k):
        for j in range(ws // k):
            for u in range(k):
                for v in range(k):
                    small = t[0, (i * k + u) * ws + (j * k + v)]
                    chunk = g[0, i * (ws // k) + j, (u * k + v) * D:(u * k + v + 1) * D]
                    assert torch.equal(small, chunk)
    assert torch.equal(reference.ungroup(g, (hs, ws), k), t)


def test_compression_is_a_strided_conv():
    """DESIGN §2: L equals a k×k stride-k conv over the token grid with W_c reshaped (D, k, k, D)->(D, D, k, k)."""
    B, hs, ws, D, k = 2, 6, 9, 5, 3
    t = torch.randn(B, hs * ws, D, dtype=torch.float64)
    cw, cb = torch.randn(D, k * k * D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    grid = t.transpose(1, 2).reshape(B, D, hs, ws)
    conv = F.conv2d(grid, cw.reshape(D, k, k, D).permute(0, 3, 1, 2), cb, stride=k).flatten(2).transpose(1, 2)
    assert (reference.compress(t, (hs, ws), k, cw, cb) - conv).abs().max() < 1e-12


@pytest.mark.parametrize("p,ks,hw", [
    (16, (2,), (64, 96)),     # non-square
    (16, (3,), (96, 48)),
    (14, (2,), (56, 84)),
    (14, (3,), (42, 84)),
    (16, (2, 2), (64, 128)),  # 3-level chain 16 -> 32 -> 64
    (4, (2, 3), (24, 48)),
])
def test_merge_reproduces_large_branch(p, ks, hw):
    C, D, B = 3, 40, 2
    P = p
    for k in ks:
        P *= k
    pw, pb, levels = mcl_params(C, D, p, ks, dtype=torch.float64)
    x = torch.randn(B, C, *hw, dtype=torch.float64)
    tokens, _ = reference.mcl_embed_chain(x, pw, pb, levels)
    w, b = reference.merge_weights(pw, pb, [(k, cw, cb) for k, cw, cb, _, _ in levels])
    assert w.shape == (D, C, P, P) and b.shape == (D,)
    assert (reference.patch_tokens(x, w, b) - tokens[-1]).abs().max().item() <= 1e-10

    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    tokens32, _ = reference.mcl_embed_chain(x.float(), f32(pw), f32(pb),
                                            [(k, f32(cw), f32(cb), f32(dw), f32(db)) for k, cw, cb, dw, db in levels])
    w32, b32 = reference.merge_weights(f32(pw), f32(pb), [(k, f32(cw), f32(cb)) for k, cw, cb, _, _ in levels])
    assert rel_err(reference.patch_tokens(x.float(), w32, b32), tokens32[-1]) <= 1e-5


def test_merge_without_biases():
    pw, _, levels = mcl_params(3, 8, 4, (2,), bias=False, dtype=torch.float64)
    x = torch.randn(1, 3, 16, 24, dtype=torch.float64)
    _, large, _ = reference.mcl_embed(x, pw, None, levels[0][1], None, None, None, 2)
    w, b = reference.merge_weights(pw, None, [(2, levels[0][1], None)])
    assert torch.count_nonzero(b) == 0
    assert (reference.patch_tokens(x, w, b) - large).abs().max() <= 1e-10


def test_tied_decompression_uses_transpose():
    pw, pb, levels = mcl_params(3, 6, 4, (2,), tied=True, dtype=torch.float64)
    (k, cw, cb, dw, db), = resolve_tied(levels, True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    s, l, r = reference.mcl_embed(x, pw, pb, cw, cb, dw, db, k)
    manual = reference.ungroup(l @ cw + db, (4, 4), k)
    assert (r - manual).abs().max() < 1e-12


def test_embed_tokens_layout():
    x = torch.randn(2, 3, 64, 32)
    w, b = torch.randn(8, 3, 32, 32), torch.randn(8)
    cls, pos = torch.randn(1, 1, 8), torch.randn(1, 3, 8)
    out = reference.embed_tokens(x, w, b, cls, pos)
    conv = F.conv2d(x, w, b, stride=32)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[:, 0], (cls + pos[:, 0]).expand(2, 1, 8)[:, 0])
    torch.testing.assert_close(out[:, 1], conv[:, :, 0, 0] + pos[0, 1])
    torch.testing.assert_close(out[:, 2], conv[:, :, 1, 0] + pos[0, 2])
