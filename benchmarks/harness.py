"""Measurement plumbing shared by the benchmark scripts: timing, the machine's GEMM peak, tables, JSON.

Protocol (DESIGN §5): warm-up, then the median of repeated rounds; ratios against a baseline taken in
the same run (the ratio of the medians, and the median of the per-round ratios: ``paired``); achieved GFLOP/s
against a large ``torch.mm`` measured in the same process.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                   min_round_s: float = 0.0) -> float:
    """Median seconds per call over ``repeats`` rounds after ``warmup`` calls: :func:`interleaved_median_seconds`
    of one function. A round repeats the call until it lasts ``min_round_s`` so that very short calls are not
    timer noise."""
    return interleaved_median_seconds({"fn": fn}, device, warmup, repeats, min_round_s)["fn"]


def interleaved_median_seconds(fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int,
                               repeats: int, min_round_s: float = 0.0) -> Dict[str, float]:
    """Median seconds per call of each function, timed in rounds that call each one in turn: a ratio between
    them is not skewed by the machine drifting between one function's rounds and the next's (long calls, such
    as whole training steps, and any call on a shared machine are where that shows). A function's turn repeats
    it until it lasts ``min_round_s`` (its count fixed from one probe call after the warm-up)."""
    return {name: statistics.median(t) for name, t in interleaved_seconds(fns, device, warmup, repeats,
                                                                          min_round_s).items()}


def paired_ratio(base: Sequence[float], times: Sequence[float]) -> float:
    """Median over rounds of base time ÷ time, each pair from one round of :func:`interleaved_seconds`: on a
    host whose speed drifts within a run (the 2-core development VM: a ``torch.mm`` at 119-188 GFLOP/s round to
    round), the ratio of two medians depends on where the slow phases fell, the median of adjacent pairs less."""
    return statistics.median(b / t for b, t in zip(base, times))


def interleaved_seconds(fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int,
                        repeats: int, min_round_s: float = 0.0) -> Dict[str, List[float]]:
    """Seconds per call of each function in each of ``repeats`` rounds (see :func:`interleaved_median_seconds`)."""
    inner: Dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        inner[name] = 1
        if min_round_s > 0:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            inner[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-9)))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    return times


def mm_peak_size(device: torch.device, dtype: torch.dtype, max_call_s: float = 1.0) -> int:
    """The side of the square ``torch.mm`` that :func:`measure_mm_peak` times: 4096 on a GPU, 3072 on a CPU, or
    smaller where this dtype is so slow that one call would outlast ``max_call_s`` (estimated from a 512 call):
    CPUs without bf16 GEMM instructions run torch's bf16 mm at about 1 GFLOP/s (an AMD EPYC with AVX2 only,
    torch 2.14), where a 3072 call takes a minute."""
    n = 4096 if device.type == "cuda" else 3072
    if device.type == "cuda":
        return n
    a = torch.randn(512, 512, dtype=dtype)
    torch.mm(a, a)
    start = time.perf_counter()
    torch.mm(a, a)
    rate = 2 * 512 ** 3 / max(time.perf_counter() - start, 1e-9)  # FLOP/s
    while n > 512 and 2 * n ** 3 / rate > max_call_s:
        n -= 256
    return n


@functools.lru_cache(maxsize=None)
def _mm_rate(device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> float:
    """One process measures each dtype's rate once: a bf16 peak needs the fp32 one too (measure_mm_peak), which a
    run of both dtypes has already measured."""
    n = mm_peak_size(device, dtype)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sec = median_seconds(lambda: torch.mm(a, b, out=c), device, warmup, repeats, min_round_s=0.05)
    return 2 * n ** 3 / sec / 1e9


def own_mm_rate(device: torch.device, dtype: torch.dtype, warmup: int = 2, repeats: int = 7) -> float:
    """GFLOP/s of torch's own large square mm in ``dtype`` (measured once per process, with :func:`measure_mm_peak`):
    unlike that peak, never held to float32's."""
    return _mm_rate(device, dtype, warmup, repeats)


def measure_mm_peak(device: torch.device, dtype: torch.dtype, warmup: int = 2, repeats: int = 7) -> float:
    """GFLOP/s of a large square ``torch.mm`` (side :func:`mm_peak_size`): the practical roofline for GEMM-bound
    work here. Into a preallocated output, so a fresh result's page faults are not timed as GEMM.

    On a CPU, a 16-bit dtype is held to the float32 peak where that is higher: without bf16/fp16 GEMM instructions
    (an AMD EPYC with AVX2 only: torch's bf16 mm at 1.1 GFLOP/s against 134 in float32) a bf16 kernel can still run
    at the float32 rate (oneDNN's brgemm does), so the dtype's own mm would put kernels at thousands of percent of
    "peak". A line on stderr says when this happens."""
    rate = _mm_rate(device, dtype, warmup, repeats)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        fp32 = _mm_rate(device, torch.float32, warmup, repeats)
        if fp32 > rate:
            print(f"  torch.mm in {str(dtype).replace('torch.', '')} ran at {rate:.1f} GFLOP/s, below float32's "
                  f"{fp32:.1f}: this CPU has no GEMM instructions for it, so its rows are held to the float32 peak",
                  file=sys.stderr, flush=True)
            rate = fp32
    return rate


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one call above what was allocated before it; None where it cannot be measured.

    CUDA: the caching allocator's statistics. CPU: PyTorch's CPU allocator keeps no statistics, so the call runs
    once under ``torch.profiler`` with ``profile_memory=True`` and the peak is the running sum of its memory
    events (every allocation and free through PyTorch's allocator, in time order: tensors, saved activations,
    kernels' workspaces). Memory that BLAS/oneDNN allocate behind PyTorch's back is not seen by either.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError:  # a torch whose profiler results lack these accessors
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@dataclass
class Row:
    section: str
    case: str
    impl: str
    dtype: str
    shape: Dict[str, int]
    median_ms: float
    gflops: float
    peak_fraction: float
    ratio: Optional[float] = None
    """Baseline time ÷ this time (> 1 means faster than the section's baseline)."""
    baseline: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{cpu_model() or platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs, "
            f"{torch.get_num_threads()} threads)")


def add_cpu_malloc_argument(ap) -> None:
    from mcl_kernels.cpu_malloc import CHOICES
    ap.add_argument("--cpu-malloc", default="retain", choices=CHOICES,
                    help="retain (default): glibc keeps freed memory for reuse, as mcl-train does on the CPU "
                         "(mcl_kernels.cpu_malloc; every row of the run is timed under it); default: glibc's "
                         "own settings, which page-fault large activations afresh each step")


def apply_cpu_malloc(choice: str, device: torch.device) -> str:
    """The run's allocator setting (``--cpu-malloc``), applied before anything is timed; the returned line goes
    into the printed header and the JSON environment."""
    if device.type != "cpu":
        return "n/a (not a CPU run)"
    from mcl_kernels import cpu_malloc
    return cpu_malloc.apply(choice)


def cpu_model() -> Optional[str]:
    """The CPU's model name, family and model from /proc/cpuinfo (None where there is none): the same 2-core VM has
    been an AMD EPYC with AVX-512 (Zen 4), an Intel Xeon with AMX and an AMD EPYC with AVX2 only (Zen 3), and the
    kernels' speed differs across them."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name")
    if name is None:
        return None
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def environment(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {"device": device_name(device), "device_type": device.type,
                               "torch": torch.__version__, "python": sys.version.split()[0],
                               "platform": platform.platform(), "threads": torch.get_num_threads(),
                               "cpu_model": cpu_model()}
    from mcl_kernels import _extension
    C = _extension._C
    # which of the C++ patch kernels ran (AVX-512, AVX2, or none: im2col + brgemm); None without the extension
    info["cpu_patch_kernels"] = C.patch_gemm_isa() if C is not None and hasattr(C, "patch_gemm_isa") else None
    for mod in ("timm", "torchvision", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional peer: record it, do not fail
            info[mod] = None
    return info


def print_table(rows: List[Row]) -> None:
    iw = max([26] + [len(r.impl) for r in rows])  # the impl column as wide as its longest name: columns stay aligned
    header = (f"{'section':<16} {'case':<30} {'impl':<{iw}} {'dtype':<9} {'ms':>9} {'GFLOP/s':>9} {'%peak':>6} "
              f"{'ratio':>7} {'paired':>7}")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        if last is not None and (r.section, r.case) != last:
            print()
        last = (r.section, r.case)
        ratio = "" if r.ratio is None else f"{r.ratio:6.2f}x"
        paired = r.extra.get("paired_ratio")
        paired = "" if paired is None else f"{paired:6.2f}x"
        print(f"{r.section:<16} {r.case:<30} {r.impl:<{iw}} {r.dtype:<9} {r.median_ms:9.3f} {r.gflops:9.1f} "
              f"{100 * r.peak_fraction:5.1f}% {ratio:>7} {paired:>7}")


def write_json(path: str, env: Dict[str, object], peaks: Dict[str, float], rows: List[Row],
               args: Dict[str, object], extra: Optional[Dict[str, object]] = None) -> None:
    """The run's record: environment, measured peaks, arguments, rows, and any `extra` top-level entries."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"environment": env, "mm_peak_gflops": peaks, "args": args, "rows": [asdict(r) for r in rows]}
    doc.update(extra or {})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


COMPILE_CASES = 256  # compiles of one function a run may need (dynamo's recompile limit is raised to this)


def compiled(fn: Callable, no_compile: bool) -> Optional[Callable]:
    """``torch.compile`` of ``fn`` for a comparison row (None: the row is skipped)."""
    if no_compile:
        return None
    # The cases of a section compile one function's code object again and again (new shapes, a new closure),
    # which dynamo counts as recompiles of one frame: at its default limit of 8, fullgraph=True failed the
    # compile rows of every case after the eighth (a full --widths x --batches grid has 18 per section).
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), COMPILE_CASES))
    return torch.compile(fn, fullgraph=True, dynamic=False)


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph (after warm-up calls on a side stream, which also run any
    autotuning), replayed on each call: the GPU's time for the work without the host's per-launch overhead."""
    graph = []

    def replay():
        if not graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graph.append(g)
        graph[0].replay()
    return replay


def time_case(rows: List["Row"], device: torch.device, warmup: int, repeats: int, section: str, case: str,
              dtype: str, peak: float, flops: float, shape: Dict[str, int],
              impls: Sequence[Tuple[str, Optional[Callable[[], object]]]], memory: bool = True,
              no_memory: Collection[str] = ()) -> None:
    """Time the implementations of one case, in turn round by round (:func:`interleaved_median_seconds`), and
    append their rows; the first one that runs is the baseline of the ratios. With ``memory``, each row but those
    named in ``no_memory`` has its peak memory too. One failing peer (in its warm-up)
    is reported and skipped, not allowed to hide the other numbers."""
    live: Dict[str, Callable[[], object]] = {}
    for name, fn in impls:
        if fn is None:
            continue
        try:
            for _ in range(max(1, warmup)):
                fn()
        except Exception as exc:  # noqa: BLE001
            print(f"  [{section}/{case}] {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                  file=sys.stderr)
            continue
        live[name] = fn
    # On a GPU a call can last microseconds: turns of >= 20 ms keep launch latency and the host clock's
    # resolution out of the median.
    rounds = interleaved_seconds(live, device, 0, repeats, min_round_s=0.02 if device.type == "cuda" else 0.0)
    base_ms = base_name = None
    for name, fn in live.items():
        sec = statistics.median(rounds[name])
        mem = peak_memory(fn, device) if memory and name not in no_memory else None
        ms = sec * 1e3
        if base_ms is None:
            base_ms, base_name = ms, name
        gflops = flops / sec / 1e9
        paired = paired_ratio(rounds[base_name], rounds[name])
        row = Row(section, case, name, dtype, shape, ms, gflops, gflops / peak, base_ms / ms, base_name,
                  {"peak_memory_bytes": mem, "paired_ratio": paired})
        rows.append(row)
        mem_text = "" if mem is None else f" {mem / 2**20:8.1f} MiB"
        print(f"  {section:<14} {case:<28} {name:<26} {dtype:<9} {ms:9.3f} ms {gflops:8.1f} GFLOP/s "
              f"{100 * row.peak_fraction:5.1f}% of peak {row.ratio:6.2f}x (paired {paired:.2f}x){mem_text}",
              flush=True)
