"""Every MCL Triton kernel compiled ahead of time for H100 (sm_90) and A100 (sm_80) on this CPU-only machine
(tests/aot_compile.py), told what a real launch tells the compiler (aligned tensors, unit strides, sizes
divisible by 16): they compile (the interpreter accepts code the compiler rejects), ask for no more shared
memory than the GPU has (the fused forward: than its budget helper estimates), and -- in 16-bit -- spill no or
almost no registers.

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


def gemm_job(modes, arch=90, ty="bf16", c_ty=None):
    """The gathered GEMM (gathered_gemm.py) in the given operand modes, at its deterministic tiling, for
    contiguous operands at ViT shapes: each operand's unit stride specialized (PLAIN: columns, GROUPED: channels,
    IM2COL and PATCH_W: pixels in a row), the other strides and the sizes divisible by 16 as at D = 384 (not so
    the token grids: 49 large tokens 7 wide, 196 small ones 14 wide)."""
    from mcl_kernels.triton import gathered_gemm as gg
    cfg = dict(gg._DETERMINISTIC_CONFIG)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    const = dict(dict(ADD_MODE=gg.PLAIN, HAS_RSUM=False), **modes)
    const.update(KF=2, P=1, HAS_DOT=True, HAS_ADD=True, INPUT_PRECISION=None, DOT_IN_FP32=False, BF16_RTNE=False,
                 **cfg)
    unit = {gg.PLAIN: 1, gg.GROUPED: 2, gg.IM2COL: 3, gg.PATCH_W: 3}
    for op, mode in (("a", "A_MODE"), ("b", "B_MODE"), ("c", "C_MODE"), ("d", "ADD_MODE")):
        const[f"s{op}{unit[const[mode]]}"] = 1
    strides = [f"s{op}{i}" for op in "abcd" for i in range(4) if f"s{op}{i}" not in const]
    return {"kernel": "mcl_kernels.triton.gathered_gemm:_gemm_kernel", "arch": arch, "num_warps": warps,
            "num_stages": stages, "pointers": dict(a_ptr=ty, b_ptr=ty, c_ptr=c_ty or ty, add_ptr=ty, rsum_ptr="fp32"),
            "constexprs": const, "dtypes": {"ACC_DTYPE": "fp32"},
            "aligned": ["M", "N", "R", "ROWS_PER_SPLIT", "s_c_split", "DW"] + strides}


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


# The attention kernels: name, 16-bit tensor pointers (each with a unit head-dim stride ``s<name>_d``), fp32 ones.
ATTENTION = {"fwd": ("_attn_fwd_kernel", ("q", "k", "v", "o"), ("lse",)),
             "dkdv": ("_attn_bwd_dkdv_kernel", ("q", "k", "v", "g", "dk", "dv"), ("lse", "delta")),
             "dq": ("_attn_bwd_dq_kernel", ("q", "k", "v", "g", "dq"), ("lse", "delta"))}


def attention_job(kernel, cfg, arch=90, head_dim=64, num_seg=1, offs64=False, ty="bf16"):
    """One attention kernel (triton/attention.py) at a tiling ``cfg`` of its autotune set, for tensors with unit
    head-dim strides (specialized, as the launcher does)."""
    name, tensors, fp32 = ATTENTION[kernel]
    scalars = ("qk_scale",) if kernel == "fwd" else ("qk_scale", "scale")
    pointers = {f"{t}_ptr": ty for t in tensors}
    pointers.update({f"{t}_ptr": "fp32" for t in fp32}, seg_ptr="i32")
    # timm's qkv views at 197 tokens, 6 heads of 64: strides 197·1152, 64, 1152 (all divisible by 16).
    aligned = [f"s{t}_{axis}" for t in tensors for axis in "bhn"]
    return {"kernel": f"mcl_kernels.triton.attention:{name}", "arch": arch, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "pointers": pointers, "scalars": dict.fromkeys(scalars, "fp32"),
            "aligned": aligned,
            "constexprs": dict(HEAD_DIM=head_dim, NUM_SEG=num_seg, OFFS64=offs64, INPUT_PRECISION=None,
                               DOT_IN_FP32=False, BF16_RTNE=False, BLOCK_D=head_dim, **cfg.kwargs,
                               **{f"s{t}_d": 1 for t in tensors})}


def test_attention_kernels_compile_for_h100_and_a100():
    """The tilings the H100 picked at 50, 197 and packed 197+50+197 tokens (forward 64x32, dK/dV 32x128 and
    16x64, dQ 64x32; the forward also with key masks on the last tile only), the largest offered ones, head dim
    128, 64-bit indices and three segments; on an A100 the forward. Each compiles within the GPU's shared memory, and the tuned 16-bit ones spill at most 16 bytes of
    registers (dK/dV at 32x128 does, with Triton 3.8; it still won the H100's autotuning at 197 tokens)."""
    from mcl_kernels.triton import attention as attn

    def config(configs, m, n, warps, stages, tail_only=False):
        return next(c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    == (m, n, warps, stages) and c.kwargs.get("MASK_TAIL_ONLY", False) == tail_only)

    tuned = [("fwd", config(attn._FWD_CONFIGS, 64, 32, 4, 3)), ("dkdv", config(attn._DKDV_CONFIGS, 32, 128, 4, 3)),
             ("dkdv", config(attn._DKDV_CONFIGS, 16, 64, 4, 3)), ("dq", config(attn._DQ_CONFIGS, 64, 32, 4, 3)),
             ("fwd", config(attn._FWD_CONFIGS, 64, 32, 4, 3, tail_only=True))]
    jobs = [attention_job(kernel, cfg) for kernel, cfg in tuned]
    jobs += [attention_job(kernel, cfg, num_seg=3, offs64=True) for kernel, cfg in tuned]
    largest = [("fwd", config(attn._FWD_CONFIGS, 128, 128, 8, 3)), ("dkdv", config(attn._DKDV_CONFIGS, 64, 64, 8, 3)),
               ("dq", config(attn._DQ_CONFIGS, 128, 32, 8, 3))]
    jobs += [attention_job(kernel, cfg, head_dim=128) for kernel, cfg in largest]
    jobs += [attention_job("fwd", tuned[0][1], arch=80), attention_job("fwd", tuned[0][1], arch=80, ty="fp32")]
    results = run(jobs)
    for i, (job, r) in enumerate(zip(jobs, results)):
        label = f"{job['kernel'].split(':')[1]} sm_{job['arch']} head dim {job['constexprs']['HEAD_DIM']}: {r}"
        gpu = "H100" if job["arch"] == 90 else "A100"
        assert 0 < r["shared"] <= embed.SMEM_PER_BLOCK[gpu] and r["regs"] <= 255, label
        if i < len(tuned):
            assert r["stack"] <= 16, label


def test_remaining_kernels_compile():
    """Every other Triton kernel, so each one the package launches is compiled here: the inference embedding
    (every offered tiling in bf16 on an H100; fp32 on an A100), the gathered GEMM in the backward's modes
    (transposed gradient operands with bias row sums, im2col, ungroup addressing with gS added) at the tiling
    the H100 picked for each (D = 384, B = 256, bf16) and at the deterministic one, the fixed-order sum of the
    weight-gradient partials, and attention's row sums δ. On the H100 none spills more than 8 bytes of registers
    (gT's 128x256 tiling does, with Triton 3.8)."""
    from mcl_kernels.triton import embed_tokens as et
    from mcl_kernels.triton import gathered_gemm as gg
    jobs = []
    for cfg, ty, arch in [(c, "bf16", 90) for c in et._GPU_CONFIGS] + [(et._GPU_CONFIGS[0], "fp32", 80)]:
        jobs.append({"kernel": "mcl_kernels.triton.embed_tokens:_embed_tokens_kernel", "arch": arch,
                     "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                     "pointers": {p: ty for p in ("x_ptr", "w_ptr", "bias_ptr", "cls_ptr", "pos_ptr", "out_ptr")},
                     "constexprs": dict(P=32, HAS_BIAS=True, HAS_CLS=True, HAS_POS=True, DOT_IN_FP32=False,
                                        INPUT_PRECISION=None if ty == "bf16" else "ieee", **cfg.kwargs,
                                        sx_w=1, sw_w=1, s_bias=1, s_pos_d=1),
                     "dtypes": {"ACC_DTYPE": "fp32"},
                     "aligned": ["M", "D", "K", "sx_b", "sx_c", "sx_h", "sw_d", "sw_c", "sw_h", "s_pos_t"]})
    # The backward's GEMMs (mcl_embed_backward.py, mcl_compress.py) and the H100's pick for each:
    # (BLOCK_M, BLOCK_N, BLOCK_R, warps, stages).
    backward = [(dict(A_MODE=gg.GROUPED, A_TOK=0, B_MODE=gg.PLAIN, B_TOK=0, C_MODE=gg.PLAIN), (128, 256, 64, 8, 3)),
                (dict(A_MODE=gg.PLAIN, A_TOK=0, B_MODE=gg.PLAIN, B_TOK=0, C_MODE=gg.GROUPED), (128, 256, 64, 8, 3)),
                (dict(A_MODE=gg.PLAIN, A_TOK=1, B_MODE=gg.GROUPED, B_TOK=0, C_MODE=gg.PLAIN), (64, 64, 64, 4, 4)),
                (dict(A_MODE=gg.GROUPED, A_TOK=1, B_MODE=gg.PLAIN, B_TOK=0, C_MODE=gg.PLAIN), (64, 128, 64, 4, 4)),
                (dict(A_MODE=gg.PLAIN, A_TOK=1, B_MODE=gg.IM2COL, B_TOK=0, C_MODE=gg.PLAIN), (64, 64, 64, 4, 4))]
    for modes, (m, n, r, warps, stages) in backward:
        weight_grad = modes["A_TOK"] == 1  # fp32 partials out, row sums, nothing added
        for tiling in (dict(BLOCK_M=m, BLOCK_N=n, BLOCK_R=r, num_warps=warps, num_stages=stages),
                       gg._DETERMINISTIC_CONFIG):
            tiling = dict(tiling)
            job = gemm_job(dict(modes, ADD_MODE=modes["C_MODE"], HAS_RSUM=weight_grad),
                           c_ty="fp32" if weight_grad else "bf16")
            job.update(num_warps=tiling.pop("num_warps"), num_stages=tiling.pop("num_stages"))
            job["constexprs"].update(tiling, P=16, HAS_ADD=not weight_grad)
            jobs.append(job)
    jobs.append({"kernel": "mcl_kernels.triton.gathered_gemm:_sum_splits_kernel", "arch": 90, "num_warps": 4,
                 "num_stages": 1, "pointers": {"p_ptr": "fp32", "out_ptr": "bf16", "out2_ptr": "bf16"},
                 "constexprs": dict(BF16_RTNE=False, BLOCK=1024), "dtypes": {"ACC_DTYPE": "fp32"}})
    jobs.append({"kernel": "mcl_kernels.triton.attention:_attn_bwd_delta_kernel", "arch": 90, "num_warps": 4,
                 "num_stages": 1, "pointers": {"o_ptr": "bf16", "g_ptr": "bf16", "delta_ptr": "fp32"},
                 "constexprs": dict(HEAD_DIM=64, OFFS64=False, BLOCK_M=64, BLOCK_D=64, so_d=1, sg_d=1)})
    for job, r in zip(jobs, run(jobs)):
        gpu = "H100" if job["arch"] == 90 else "A100"
        label = f"{job['kernel'].split(':')[1]} sm_{job['arch']} {job['constexprs']}: {r}"
        assert r["shared"] <= embed.SMEM_PER_BLOCK[gpu] and r["regs"] <= 255, label
        if job["arch"] == 90:
            assert r["stack"] <= 8, label
