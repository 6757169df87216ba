"""The MCL Triton kernels compiled ahead of time for H100 (sm_90) and A100 (sm_80) on this CPU-only machine
(tests/aot_compile.py): they compile (the interpreter accepts code the compiler rejects), ask for no more
shared memory than the budget helper estimates and the GPU has, and -- in 16-bit -- spill no registers.

The compiler runs in a subprocess: conftest.py put this process's Triton in interpreter mode.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
import aot_compile  # noqa: E402
from mcl_kernels.triton import mcl_embed as embed  # noqa: E402

pytestmark = pytest.mark.skipif(not aot_compile.available(), reason="this Triton wheel has no ptxas/cuobjdump")

HERE = os.path.dirname(os.path.abspath(__file__))
ARCH = {"H100": 90, "A100": 80}
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def run(jobs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py"), json.dumps(jobs)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines()]


def embed_job(t, dtype, arch):
    """Kernel A of the fused forward for contiguous inputs (unit strides specialized, as the launcher does)."""
    ptrs = ("x_ptr", "pw_ptr", "pb_ptr", "cw_ptr", "cb_ptr", "s_ptr", "l_ptr")
    return {"kernel": "mcl_kernels.triton.mcl_embed:_embed_compress_kernel", "arch": arch,
            "num_warps": t.num_warps, "num_stages": t.num_stages, "pointers": {p: TY[dtype] for p in ptrs},
            "constexprs": dict(P=16, KF=2, HAS_PB=True, HAS_CB=True, INPUT_PRECISION=None if dtype != torch.float32
                               else "ieee", DOT_IN_FP32=False, BF16_RTNE=False, BLOCK_L=t.block_l,
                               BLOCK_D=t.block_d, BLOCK_K=t.block_k, sx_w=1, spw_w=1, s_pb=1, scw_i=1, s_cb=1),
            "dtypes": {"ACC_DTYPE": "fp32"}}


def gemm_job(modes, arch=90, ty="bf16"):
    """The gathered GEMM (gathered_gemm.py) in the operand modes of a forward use, at its deterministic tiling."""
    from mcl_kernels.triton import gathered_gemm as gg
    cfg = dict(gg._DETERMINISTIC_CONFIG)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    return {"kernel": "mcl_kernels.triton.gathered_gemm:_gemm_kernel", "arch": arch, "num_warps": warps,
            "num_stages": stages, "pointers": {p: ty for p in ("a_ptr", "b_ptr", "c_ptr", "add_ptr", "rsum_ptr")},
            "constexprs": dict(modes, KF=2, P=1, HAS_DOT=True, HAS_ADD=True, HAS_RSUM=False, INPUT_PRECISION=None,
                               DOT_IN_FP32=False, BF16_RTNE=False, **cfg),
            "dtypes": {"ACC_DTYPE": "fp32"}}


def test_fused_forward_offered_tilings_compile_within_budget():
    """Every tiling offered at D = 768 in bf16 on an H100, the default in fp16 there, and the default and
    smallest in fp32 on an A100."""
    cases = [(t, torch.bfloat16, "H100") for t in embed.choose(embed.GPU_TILINGS, 768, torch.bfloat16,
                                                                embed.SMEM_PER_BLOCK["H100"])]
    cases += [(embed.GPU_TILINGS[0], torch.float16, "H100"), (embed.GPU_TILINGS[0], torch.float32, "A100"),
              (embed.GPU_TILINGS[-1], torch.float32, "A100")]
    results = run([embed_job(t, dtype, ARCH[gpu]) for t, dtype, gpu in cases])
    for (t, dtype, gpu), r in zip(cases, results):
        est = embed.on_chip(t, dtype)
        label = f"{gpu} {dtype} {tuple(t)}: {r}"
        assert r["shared"] <= est.smem_bytes <= embed.SMEM_PER_BLOCK[gpu], label
        assert r["regs"] <= 255, label
        if dtype != torch.float32:  # fp32 (exact, FMA dot) spills a few hundred bytes; 16-bit must not
            assert r["stack"] == 0, label


def test_gathered_gemm_forward_modes_compile():
    """The token-level compression (grouped A, transposed weight, bias row) and the decompression (ungroup
    addressing on the output) of the forward paths."""
    from mcl_kernels.triton.gathered_gemm import GROUPED, PLAIN
    compress = dict(A_MODE=GROUPED, A_TOK=0, B_MODE=PLAIN, B_TOK=1, C_MODE=PLAIN, ADD_MODE=PLAIN)
    decompress = dict(A_MODE=PLAIN, A_TOK=0, B_MODE=PLAIN, B_TOK=1, C_MODE=GROUPED, ADD_MODE=PLAIN)
    for r in run([gemm_job(compress), gemm_job(decompress), gemm_job(decompress, arch=80)]):
        assert 0 < r["shared"] <= embed.SMEM_PER_BLOCK["A100"] and r["regs"] <= 255, r
