"""Compile a Triton kernel ahead of time for a GPU architecture, without a GPU: what the interpreter cannot check.

Triton's interpreter runs a kernel's Python, so it accepts things the compiler rejects (a plain global read in a
jitted function, a non-power-of-two shape); and it says nothing of shared memory or registers. Triton's own
compiler, with the ``ptxas`` and ``cuobjdump`` bundled in its wheel, builds the cubin a GPU would load:
``metadata.shared`` is the shared memory the launch asks for, ``cuobjdump -res-usage`` gives the registers
and the stack frame (non-zero: spilled registers).

Run as a script (Triton must not be in interpreter mode: ``TRITON_INTERPRET`` unset) with a JSON list of jobs
``{"kernel": "module:function", "arch": 90, "num_warps": 8, "num_stages": 3, "pointers": {"x_ptr": "bf16"},
"scalars": {"scale": "fp32"}, "aligned": ["D"], "constexprs": {...}, "dtypes": {"ACC_DTYPE": "fp32"}}``; prints
one JSON object per job ``{"shared": bytes, "regs": n, "stack": bytes}``. Scalar arguments not named are ``i32``, as Triton
types small ints; an integer constexpr 1 is what Triton's launcher specializes a unit stride to.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_TL = {"fp32": tl.float32, "fp64": tl.float64}


def available() -> bool:
    """Whether this Triton wheel carries the NVIDIA tool chain needed here."""
    return all(os.path.exists(os.path.join(_BIN, tool)) for tool in ("ptxas", "cuobjdump"))


def compile_job(job: dict) -> dict:
    module, name = job["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    const = dict(job.get("constexprs", {}))
    const.update({k: _TL[v] for k, v in job.get("dtypes", {}).items()})
    pointers, scalars = job["pointers"], job.get("scalars", {})
    unknown = (set(const) | set(pointers) | set(scalars) | set(job.get("aligned", []))) - set(fn.arg_names)
    if unknown:  # a misspelt name would otherwise compile the kernel unspecialized, silently
        raise ValueError(f"{job['kernel']} has no arguments {sorted(unknown)}")
    sig = {a: "constexpr" if a in const else ("*" + pointers[a] if a in pointers else scalars.get(a, "i32"))
           for a in fn.arg_names}
    # What Triton's launcher tells the compiler at a real launch: tensors from PyTorch's allocators are 16-byte
    # aligned, and integers divisible by 16 (``aligned``: sizes and strides such as D = 384) are marked so.
    # Without it the compiler can prove no contiguity, and every load and store is scalar.
    aligned = [a for a in fn.arg_names if a in pointers] + list(job.get("aligned", []))
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", job["arch"], 32),
                            options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    return {"shared": int(kernel.metadata.shared), "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1))}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("aot_compile.py needs Triton's compiler: unset TRITON_INTERPRET")
    for job in json.loads(sys.argv[1]):
        print(json.dumps(compile_job(job)), flush=True)
