"""The main job runs end to end: `benchmarks/throughput.py --quick` prints its table and writes JSON with
every section's rows. Nothing here looks at the times themselves."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_throughput_quick_run_writes_table_and_json(tmp_path):
    out = tmp_path / "throughput.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "measured torch.mm peak" in res.stdout and "ratio" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["environment"]["torch"] and doc["mm_peak_gflops"]["float32"] > 0
    assert doc["environment"]["cpu_malloc"] and "malloc: " in res.stdout
    env = doc["environment"]
    if os.path.exists("/proc/cpuinfo"):
        assert env["cpu_model"] and "family" in env["cpu_model"], env
    from mcl_kernels import _extension
    if _extension._C is not None:
        assert env["cpu_patch_kernels"] == _extension._C.patch_gemm_isa() in ("avx512", "avx2", "none"), env
    impls = {(r["section"], r["impl"]) for r in doc["rows"]}
    for section in ("embed-fwd", "embed-fwd+bwd"):
        assert {(section, "reference (eager)"), (section, "reference (compile)"),
                (section, "FusedMCLEmbed (auto)")} <= impls
    assert {("merged", "timm PatchEmbed+cat+add"), ("merged", "mcl embed_tokens (auto)")} <= impls
    for r in doc["rows"]:
        assert r["median_ms"] > 0 and r["gflops"] > 0 and r["ratio"] > 0
        assert r["baseline"] in ("reference (eager)", "timm PatchEmbed+cat+add")


def test_unknown_section_is_a_clear_error():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
                          "--sections", "bogus", "--json", os.devnull], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode != 0 and "unknown section(s) ['bogus']" in res.stderr


def test_models_section_quick_run(tmp_path):
    """The opt-in models section: deployed MCL models against timm/torchvision peers, and training steps."""
    out = tmp_path / "models.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
                          "--sections", "models", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["section"], r["impl"], r["dtype"]) for r in rows}
    for dtype in ("float32", "bfloat16"):
        assert {("models-infer", "timm DeiT-Ti/16", dtype), ("models-infer", "MCL-DeiT-Ti/32 (deployed)", dtype),
                ("models-infer", "MCL-DeiT-Ti/32 (fused embed)", dtype),
                ("models-train", "timm DeiT-Ti/16 step", dtype),
                ("models-train", "MCL-DeiT-Ti/32 step", dtype)} <= impls
    for r in rows:
        assert r["median_ms"] > 0 and r["gflops"] > 0 and r["ratio"] > 0 and r["extra"]["images_per_s"] > 0
        assert r["baseline"] == ("timm DeiT-Ti/16" if r["section"] == "models-infer" else "timm DeiT-Ti/16 step")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_kernels_quick_run(tmp_path):
    """benchmarks/kernels.py: every section, both dtypes, the fused kernel beside the eager reference, and the peak
    memory of the training step for every implementation (compile rows are left to the throughput run above)."""
    out = tmp_path / "kernels.json"
    res = _run(os.path.join(ROOT, "benchmarks", "kernels.py"), "--quick", "--no-compile", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "measured torch.mm peak (bfloat16)" in res.stdout and "peak memory" in res.stdout
    assert "sections attn, packed run on a CUDA device only: skipped here" in res.stderr
    doc = json.loads(out.read_text())
    assert doc["mm_peak_gflops"]["float32"] > 0 and doc["mm_peak_gflops"]["bfloat16"] > 0
    impls = {(r["section"], r["impl"], r["dtype"]) for r in doc["rows"]}
    for dtype in ("float32", "bfloat16"):
        for section in ("kernel-fwd", "kernel-fwd+bwd"):
            assert {(section, "reference (eager)", dtype), (section, "mcl_embed (cpu)", dtype),
                    (section, "mcl_embed (auto)", dtype)} <= impls
        assert {("kernel-infer", "timm PatchEmbed+cat+add", dtype),
                ("kernel-infer", "embed_tokens (cpu)", dtype)} <= impls
    for section in ("kernel-fwd", "kernel-fwd+bwd", "kernel-infer"):
        assert (section, "bound: GEMMs (torch.mm)", "float32") in impls
        # bf16: a bound row, or where torch's bf16 mm is not the fast path (no bf16 arithmetic), the reason
        bf16_bound = (section, "bound: GEMMs (torch.mm)", "bfloat16") in impls
        assert bf16_bound or "torch.mm in torch.bfloat16 runs at" in res.stderr
    for r in doc["rows"]:
        assert r["median_ms"] > 0 and r["gflops"] > 0 and r["ratio"] > 0 and r["extra"]["paired_ratio"] > 0
        if r["impl"] == r["baseline"]:
            assert r["extra"]["paired_ratio"] == 1.0
        has_memory = r["section"] == "kernel-fwd+bwd" and not r["impl"].startswith("bound")
        assert (r["extra"]["peak_memory_bytes"] is not None) == has_memory
        if has_memory:
            assert r["extra"]["peak_memory_bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the GPU rows run instead of being skipped")
def test_kernels_without_a_gpu_skips_cleanly(tmp_path):
    out = tmp_path / "gpu.json"
    res = _run(os.path.join(ROOT, "benchmarks", "kernels.py"), "--quick", "--device", "cuda", "--json", str(out))
    assert res.returncode == 0 and "no CUDA device" in res.stderr
    assert json.loads(out.read_text())["rows"] == []


def test_kernels_section_of_throughput(tmp_path):
    out = tmp_path / "throughput-kernels.json"
    res = _run(os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick", "--no-compile", "--sections", "kernels",
               "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    sections = {r["section"] for r in json.loads(out.read_text())["rows"]}
    assert sections == {"kernel-fwd", "kernel-fwd+bwd", "kernel-infer"}


def test_interleaved_timing_calls_each_function_once_per_round():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    calls = []
    secs = harness.interleaved_median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                              torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3 and set(secs) == {"a", "b"} and min(secs.values()) >= 0


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Under drift the two statistics differ: here the baseline's slow round falls on a fast round of the other
    function, so the ratio of the medians reads 1.0x while every round but one had the other twice as fast."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    base, other = [10.0, 20.0, 10.0], [5.0, 10.0, 10.0]
    assert harness.paired_ratio(base, other) == 2.0
    assert harness.statistics.median(base) / harness.statistics.median(other) == 1.0
    assert harness.paired_ratio(other, other) == 1.0


def test_interleaved_turns_last_min_round_s_and_report_seconds_per_call():
    """With ``min_round_s`` each turn repeats its function (a count per function, from a probe call), and the
    result is per call: a 2 ms call timed in turns of >= 20 ms still reads about 2 ms."""
    import time
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)
    secs = harness.interleaved_median_seconds({"fast": fast, "slow": slow}, torch.device("cpu"), warmup=0,
                                              repeats=3, min_round_s=0.02)
    assert calls["fast"] > 3 * 100 and 3 * 2 <= calls["slow"] <= 1 + 3 * 10
    assert 0.0015 < secs["slow"] < 0.01 and secs["fast"] < secs["slow"]


def test_time_case_reports_a_failing_peer_and_keeps_the_others(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness

    def broken():
        raise ValueError("no kernel here")
    rows = []
    harness.time_case(rows, torch.device("cpu"), 1, 2, "s", "c", "float32", 1.0, 1e6, {},
                      [("base", lambda: sum(range(1000))), ("broken", broken), ("absent", None),
                       ("other", lambda: sum(range(2000)))], memory=False)
    assert [r.impl for r in rows] == ["base", "other"] and all(r.baseline == "base" for r in rows)
    assert "broken: skipped (ValueError: no kernel here)" in capsys.readouterr().err


def test_gpu_sections_run_through_the_interpreter(monkeypatch):
    """The GPU-only sections (attention against SDPA, the packed training step against three passes), called on
    CPU tensors with the Triton kernels interpreted (conftest.py): every row is measured and its ratio is
    against the section's baseline. CI has no GPU, so this is where their code runs there."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import kernels
    args = kernels.parse_args(["--quick", "--dtypes", "float32", "--repeats", "1", "--warmup", "0"])
    rows = []
    runner = kernels.Runner(args, torch.device("cpu"), rows)
    kernels.attention_section(runner, "float32", 1.0)
    kernels.packed_step_section(runner, "float32", 1.0)
    got = {(r.section, r.case, r.impl) for r in rows}
    for n in ("6", "9"):
        for impl in ("SDPA", "attention (triton)", "attention (auto)"):
            assert ("attn-fwd", f"D=32 B=2 N={n}", impl) in got and ("attn-fwd+bwd", f"D=32 B=2 N={n}", impl) in got
    for impl in ("SDPA per branch", "packed_attention (triton)"):
        assert ("attn-fwd+bwd", "D=32 B=2 N=9+4+9", impl) in got
    assert {r.impl for r in rows if r.section == "packed-step"} == {"three passes", "packed (one pass)"}
    for r in rows:
        assert r.median_ms > 0 and r.ratio > 0
        assert r.baseline in ("SDPA", "SDPA per branch", "three passes"), r


def test_compiled_rows_survive_more_cases_than_dynamos_recompile_limit():
    """Each case of a section compiles the same function code with new shapes; past dynamo's default limit of 8
    recompiles, fullgraph=True used to fail (and drop) the compile rows of every later case."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    outs = []
    for n in range(1, 12):
        x = torch.randn(n)

        def fn():
            return x * 2 + 1

        outs.append(harness.compiled(fn, no_compile=False)())
        assert torch.equal(outs[-1], x * 2 + 1), n


def test_fma_peak_tool_builds_and_reports(tmp_path):
    """benchmarks/fma_peak.cpp (the CPU's FMA limit that README divides by) compiles as its header says and, with
    the widest vectors this CPU has (AVX-512, else AVX2 + FMA: the runners are x86-64), prints a positive GFLOP/s for
    one thread and for all, for the FMA loop and for the load-fed 6 x V block (with its share of the FMA loop's
    rate), naming that instruction set."""
    exe = tmp_path / "fma_peak"
    src = os.path.join(ROOT, "benchmarks", "fma_peak.cpp")
    subprocess.run(["g++", "-O2", "-pthread", src, "-o", str(exe)], check=True, timeout=120)
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    isa, block = ("avx512", "6x4") if "avx512f" in flags else ("avx2", "6x2")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("fp32 FMA peak")]
    assert lines and lines[0].startswith(f"fp32 FMA peak ({isa}), 1 thread:"), out
    assert all(float(line.split(":")[1].split()[0]) > 0 for line in lines), out
    fed = [line for line in out.splitlines() if line.startswith(f"fp32 {block} FMA block fed from L1 ({isa})")]
    assert len(fed) == len(lines), out  # the load-fed ceiling, for the same thread counts
    for line in fed:
        rate, share = float(line.split(":")[1].split()[0]), float(line.split("(")[2].split("%")[0])
        assert rate > 0 and 0 < share < 150, out  # a share of the FMA loop's rate (above 100% only by noise)


def test_mm_peak_size_shrinks_for_a_slow_dtype():
    """harness.mm_peak_size keeps the CPU's 3072 where a call fits the time allowed and shrinks the matrix (to 512
    at the least) where it does not: torch's bf16 mm without bf16 instructions runs at ~1 GFLOP/s, a minute a call
    at 3072, which had the benchmark tests time out on such CPUs."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    cpu = torch.device("cpu")
    assert harness.mm_peak_size(cpu, torch.float32, max_call_s=1e6) == 3072
    assert harness.mm_peak_size(cpu, torch.float32, max_call_s=1e-9) == 512
    n = harness.mm_peak_size(cpu, torch.float32, max_call_s=0.05)
    assert 512 <= n <= 3072 and n % 256 == 0


def test_cpu_phases_quick_run(tmp_path):
    """benchmarks/cpu_phases.py: the C++ training kernel's time by phase, with the GEMM phases' rates."""
    pytest.importorskip("mcl_kernels._C", reason="the C++ kernels are not built")
    out = tmp_path / "phases.json"
    res = _run(os.path.join(ROOT, "benchmarks", "cpu_phases.py"), "--quick", "--fma-limit", "200", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    phases = {p["phase"]: p for p in doc["phases"]}
    for gemm in ("fwd.small_gemm", "fwd.large_gemm", "fwd.recon_gemm", "bwd.token_gemms", "bwd.weight_gemms",
                 "bwd.embed_grad"):
        assert phases[gemm]["gflop"] > 0 and phases[gemm]["gflops_per_thread"] > 0 and phases[gemm]["fma_fraction"] > 0
    assert phases["bwd.wall.tiles"]["wall_ms"] > 0 and doc["step_ms"] > 0
    shares = [p["share"] for p in doc["phases"] if "share" in p]
    assert abs(sum(shares) - 1) < 1e-6


def test_gemm_cache_tool_builds_and_reports(tmp_path):
    """benchmarks/gemm_cache.py (the L2-against-L3 GEMM rates README cites) builds its extension and reports both
    rates for every call it lists, on brgemm and, where the CPU has AVX2 (x86-64 with AVX2 + FMA), gemm_avx2."""
    pytest.importorskip("mcl_kernels._C", reason="the C++ kernels are not built")
    out = tmp_path / "gemm.json"
    res = _run(os.path.join(ROOT, "benchmarks", "gemm_cache.py"), "--quick", "--fma-limit", "100", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["gflops_l2"] > 0 and r["gflops_l3"] > 0 and r["sets_streamed"] > 1 for r in rows)
    assert all(r["fma_fraction_l2"] > 0 for r in rows)
    from mcl_kernels import _C
    want = {"brgemm", "avx2"} if _C.patch_gemm_best_isa() != "none" else {"brgemm"}
    assert {r["path"] for r in rows} == want


def test_a_16_bit_peak_below_float32s_is_held_to_float32(monkeypatch, capsys):
    """harness.measure_mm_peak: on a CPU without bf16 GEMM instructions a bf16 kernel runs at the float32 rate, so
    its rows are held to the float32 peak (said on stderr), not torch's own bf16 mm (1.1 against 134 GFLOP/s on an
    AVX2-only AMD EPYC); where the 16-bit mm is faster, that stays the peak."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    cpu = torch.device("cpu")
    rates = {torch.float32: 134.0, torch.bfloat16: 1.1, torch.float16: 300.0}
    monkeypatch.setattr(harness, "_mm_rate", lambda device, dtype, warmup, repeats: rates[dtype])
    assert harness.measure_mm_peak(cpu, torch.bfloat16) == 134.0
    assert "held to the float32 peak" in capsys.readouterr().err
    assert harness.measure_mm_peak(cpu, torch.float16) == 300.0
    assert harness.measure_mm_peak(cpu, torch.float32) == 134.0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("B,D,H,W,p,k", [(2, 24, 32, 48, 8, 2), (1, 20, 36, 36, 4, 3)])
def test_gemm_bound_does_the_cases_flops_and_so_does_the_reference(B, D, H, W, p, k):
    """The bound rows time exactly the FLOPs the rows are rated by, and those are the reference's own (counted by
    torch's FlopCounterMode: convolution, its weight gradient and every mm)."""
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernels
    from mcl_kernels import reference

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    C, cpu = 3, torch.device("cpu")
    ns, nl = kernels.token_counts(H, W, p, k)
    fwd_flops, train_flops = kernels.training_flops(B, kernels.training_gemms(D, C, H, W, p, k))
    bound_fwd, bound_fwdbwd = kernels.training_gemm_bound(B, D, C, p, k, ns, nl, torch.float32, cpu)
    assert flops(bound_fwd) == fwd_flops and flops(bound_fwdbwd) == train_flops
    x, params = kernels.training_inputs(B, D, C, H, W, p, k, torch.float32, cpu)
    leaves = [t.requires_grad_(True) for t in params]

    def ref_step():
        outs = reference.mcl_embed(x, *leaves, k)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    with torch.no_grad():
        assert flops(lambda: reference.mcl_embed(x, *leaves, k)) == fwd_flops
    assert flops(ref_step) == train_flops
