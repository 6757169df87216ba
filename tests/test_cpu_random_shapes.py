"""The C++ kernels against the float64 reference on seeded random combinations of everything the systematic tests
vary one at a time (tests/test_cpu_mcl_embed.py, test_ops.py): batch, channels, patch, compression factors and
chains, width, dtype, image layout, decompression, biases, which gradients are needed, thread count.

Each case draws its configuration from its seed, so a failure names a case that reruns alone
(``pytest tests/test_cpu_random_shapes.py -k "mcl_embed and 17"``). Tolerances scale with the reduction
length K like the rest of the suite (DESIGN §4): fp64 1e-9, fp32 1e-4·sqrt(K), bf16 5e-2·sqrt(K), fp16
1e-2·sqrt(K), relative to the largest reference value.
"""
import random

import pytest
import torch

from helpers import extension_or_skip
from mcl_kernels import functional as F

extension_or_skip()  # the cpu backend's ops need it

DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float16]


def tolerance(dtype: torch.dtype, K: int) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4 * K ** 0.5, torch.bfloat16: 5e-2 * K ** 0.5,
            torch.float16: 1e-2 * K ** 0.5}[dtype]


def layout_view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in the given memory layout: contiguous, channels_last, a slice of a larger image, or
    transposed storage (W stride != 1)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        B, C, H, W = x.shape
        big = torch.zeros(B, C + 1, H + 3, W + 5, dtype=x.dtype)
        big[:, 1:, 2:2 + H, 3:3 + W] = x
        return big[:, 1:, 2:2 + H, 3:3 + W]
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if expected.numel():
        err = (actual.double() - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def flat_outputs(out):
    tensors = []
    for o in out:
        if isinstance(o, (tuple, list)):
            tensors += [t for t in o if t is not None]
        elif o is not None:
            tensors.append(o)
    return tensors


@pytest.mark.parametrize("seed", range(64))
def test_mcl_embed_random_case(seed, keep_threads):
    rnd = random.Random(seed)
    dtype = rnd.choice(DTYPES)
    B, C = rnd.choice([0, 1, 1, 2, 3]), rnd.choice([1, 2, 3, 4])
    p = rnd.choice([1, 2, 3, 4, 5, 7, 8, 14, 16])
    ks = rnd.choice([[2], [2], [3], [1], [4], [2, 2], [2, 3]])
    P = p
    for k in ks:
        P *= k
    if P > 64:
        ks, P = [2], 2 * p
    H, W = rnd.randint(1, 3) * P, rnd.randint(1, 3) * P
    D = rnd.choice([1, 3, 8, 17, 33, 64, 65, 100])
    if C * p * p * D > 100000:
        D = 17
    decomp = rnd.choice(["none", "own", "tied"])
    bias = [rnd.random() < 0.7 for _ in range(3)]
    need_x = rnd.random() < 0.5
    layout = rnd.choice(["contiguous", "channels_last", "sliced", "transposed"])
    torch.set_num_threads(rnd.choice([1, 2]))
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = r(B, C, H, W)
    params = {"pw": r(D, C, p, p, scale=(C * p * p) ** -0.5), "pb": r(D) if bias[0] else None,
              "cw": [r(D, k * k * D, scale=(k * k * D) ** -0.5) for k in ks],
              "cb": [r(D) if bias[1] else None for _ in ks],
              "dw": [r(k * k * D, D, scale=D ** -0.5) if decomp == "own" else None for k in ks],
              "db": [r(k * k * D) if bias[2] and decomp != "none" else None for k in ks]}
    upstream = torch.Generator().manual_seed(1000 + seed)
    results = {}
    for backend, dt in (("cpu", dtype), ("reference", torch.float64)):
        leaf = lambda t: None if t is None else t.to(dt).requires_grad_(True)  # noqa: E731
        xx = (layout_view(x.to(dt), layout) if backend == "cpu" else x.to(dt)).requires_grad_(need_x)
        pw, pb = leaf(params["pw"]), leaf(params["pb"])
        cw, cb = [leaf(t) for t in params["cw"]], [leaf(t) for t in params["cb"]]
        dw, db = [leaf(t) for t in params["dw"]], [leaf(t) for t in params["db"]]
        one = len(ks) == 1
        out = F.mcl_embed(xx, pw, pb, cw[0] if one else cw, cb[0] if one else cb,
                          None if decomp != "own" else (dw[0] if one else dw),
                          None if decomp == "none" else (db[0] if one else db),
                          compress=ks[0] if one else ks, tied_decompress=decomp == "tied", backend=backend)
        outs = flat_outputs(out)
        upstream.manual_seed(1000 + seed)
        loss = sum((o.double() * torch.randn(o.shape, generator=upstream, dtype=torch.float64)).sum() for o in outs)
        inputs = [t for t in [xx, pw, pb, *cw, *cb, *dw, *db] if t is not None and t.requires_grad]
        grads = torch.autograd.grad(loss, inputs) if loss.requires_grad else [torch.zeros_like(t) for t in inputs]
        results[backend] = ([o.detach().double() for o in outs], [gr.double() for gr in grads])
    tol = tolerance(dtype, C * p * p * max(k * k for k in ks))
    (outs, grads), (ref_outs, ref_grads) = results["cpu"], results["reference"]
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for i, (a, e) in enumerate(zip(outs, ref_outs)):
        check(f"output {i}", a, e, tol)
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        check(f"gradient {i}", a, e, tol)


@pytest.mark.parametrize("seed", range(64))
def test_embed_tokens_random_case(seed, keep_threads):
    rnd = random.Random(10_000 + seed)
    dtype = rnd.choice(DTYPES)
    B, C = rnd.choice([0, 1, 2, 3, 9]), rnd.choice([1, 3, 4])
    P = rnd.choice([1, 2, 3, 4, 6, 7, 8, 14, 16, 28, 32])
    Hn, Wn = rnd.randint(1, 9), rnd.randint(1, 9)
    D = rnd.choice([1, 5, 16, 63, 64, 65, 100, 129])
    if B * C * Hn * Wn * P * P * D > 2e7:
        B = 1
    cls, pos, bias = (rnd.random() < 0.7 for _ in range(3))
    need_grad = rnd.random() < 0.4
    layout = rnd.choice(["contiguous", "channels_last", "sliced", "transposed"])
    torch.set_num_threads(rnd.choice([1, 2]))
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, w = r(B, C, Hn * P, Wn * P), r(D, C, P, P) * (C * P * P) ** -0.5
    extras = [r(D) if bias else None, r(1, 1, D) if cls else None, r(1, Hn * Wn + cls, D) if pos else None]
    grad_out = None
    results = {}
    for backend, dt in (("cpu", dtype), ("reference", torch.float64)):
        xx = (layout_view(x.to(dt), layout) if backend == "cpu" else x.to(dt)).requires_grad_(need_grad)
        ts = [None if t is None else t.to(dt).requires_grad_(need_grad) for t in [w, *extras]]
        out = F.embed_tokens(xx, *ts, backend=backend)
        grads = []
        if need_grad:
            if grad_out is None:
                grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
            grads = torch.autograd.grad(out, [xx] + [t for t in ts if t is not None], grad_out.to(dt))
        results[backend] = (out.detach().double(), [gr.double() for gr in grads])
    tol = tolerance(dtype, C * P * P)
    check("output", results["cpu"][0], results["reference"][0], tol)
    for i, (a, e) in enumerate(zip(results["cpu"][1], results["reference"][1])):
        check(f"gradient {i}", a, e, tol)
