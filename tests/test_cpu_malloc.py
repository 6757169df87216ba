"""mcl_kernels.cpu_malloc: glibc stops returning freed memory to the OS, so a freed activation's pages are
reused instead of faulted in afresh. Each case runs in a fresh interpreter: the setting is process-wide."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Page faults per allocate-write-free round of a 64 MiB tensor (above glibc's largest mmap threshold, so by
# default each round is a fresh mapping) once rounds are in a steady state, before and after
# retain_freed_memory(); and the resident memory those measured rounds added.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from mcl_kernels.cpu_malloc import retain_freed_memory

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def steady_state(warmup):
        # PyTorch asks for 64-byte aligned blocks, which a freed block of the same size cannot serve while a
        # small allocation pins the space after it: the heap grows for a few rounds until freed blocks coalesce.
        for _ in range(warmup):
            torch.empty(16 * 2**20).fill_(1.0)
        start, resident = faults(), rss()
        for _ in range(8):
            torch.empty(16 * 2**20).fill_(1.0)
        return (faults() - start) / 8, rss() - resident

    before, _ = steady_state(2)
    state = retain_freed_memory()
    assert retain_freed_memory() == state  # idempotent
    after, grown = steady_state(24)
    print(repr((before, after, grown, state)))
""")


def _probe(env=None):
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr[-2000:]
    return eval(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's; other C libraries are "
                    "left alone (tested below)")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    before, after, grown, state = _probe()
    assert state.startswith("glibc malloc retains freed memory"), state
    pages = 64 * 2**20 // 4096
    assert before > 0.5 * pages, f"default glibc should fault a fresh 64 MiB block each round: {before} faults"
    assert after < 0.02 * pages, f"after retain_freed_memory a round still faulted {after} pages"
    assert grown < 8 * 2**20, f"steady rounds must reuse the heap, not grow it: {grown / 2**20:.0f} MiB added"


def test_a_preloaded_allocator_is_left_alone():
    # the name alone decides; the loader warns that the (absent) library is ignored and the run goes on
    before, after, grown, state = _probe({"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"})
    assert state == "malloc left as is: jemalloc is preloaded"


def test_apply_maps_the_command_line_choice():
    """``default`` leaves the C library alone (nothing is called, so this can run in the test process); an
    unknown choice is an error that names the valid ones."""
    from mcl_kernels import cpu_malloc
    assert cpu_malloc.apply("default") == "the C library's defaults"
    with pytest.raises(ValueError, match="retain"):
        cpu_malloc.apply("jemalloc")
