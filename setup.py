"""Build of mcl_kernels and its native extension mcl_kernels._C (pybind11, torch.utils.cpp_extension).

Install from the source tree with the torch already in the environment:

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

(Build isolation would build against a freshly downloaded torch, not the one that imports the module.)

Environment knobs:
  MCL_KERNELS_BUILD_CUDA  auto (default): build the CUDA part when torch has CUDA and nvcc is found;
                          1: require it (error when CUDA_HOME/nvcc is missing); 0: C++ only.
  CUDA_HOME               CUDA toolkit root; else torch's guess, else /usr/local/cuda (each must have
                          bin/nvcc and include/cuda_runtime.h).
  TORCH_CUDA_ARCH_LIST    GPU architectures; default: the visible GPUs', or "8.0;9.0+PTX" with none visible.
  MAX_JOBS                parallel compile jobs; default min(cores, free memory in GiB / 2), at least 1.

The C++ standard is the one torch requires: cpp_extension adds it (C++20 for torch 2.14), so none is set here.
"""
import os
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES_FILE = os.path.join("csrc", "sources.txt")  # the one list of sources, shared with CMakeLists.txt
CUDA_ENV = "MCL_KERNELS_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100, and PTX for newer GPUs to JIT from


def log(msg):
    print(f"mcl_kernels setup: {msg}", file=sys.stderr, flush=True)


def read_sources():
    with open(os.path.join(ROOT, SOURCES_FILE)) as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


def is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def resolve_cuda_home(torch_guess):
    """CUDA_HOME from the environment, else torch's guess, else /usr/local/cuda; None when none is usable."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if is_cuda_home(env):
            return env
        log(f"CUDA_HOME={env} has no bin/nvcc and include/cuda_runtime.h; ignoring it")
    for candidate in (torch_guess, "/usr/local/cuda"):
        if is_cuda_home(candidate):
            return candidate
    return None


def want_cuda(torch, cpp_extension):
    """Decide the CUDA part from MCL_KERNELS_BUILD_CUDA; on yes, point torch's build at the toolkit."""
    mode = os.environ.get(CUDA_ENV, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"{CUDA_ENV} must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        log(f"{CUDA_ENV}=0: building the C++ (CPU) part only")
        return False
    if torch.version.cuda is None:
        msg = f"the installed torch {torch.__version__} has no CUDA support"
        if mode == "1":
            raise SystemExit(f"{CUDA_ENV}=1 but {msg}; install a CUDA build of torch or set {CUDA_ENV}=0")
        log(f"{msg}: building the C++ (CPU) part only")
        return False
    home = resolve_cuda_home(cpp_extension.CUDA_HOME)
    if home is None:
        msg = ("no CUDA toolkit found (looked at $CUDA_HOME, torch's guess "
               f"{cpp_extension.CUDA_HOME!r} and /usr/local/cuda for bin/nvcc and include/cuda_runtime.h)")
        if mode == "1":
            raise SystemExit(f"{CUDA_ENV}=1 but {msg}; set CUDA_HOME to the CUDA {torch.version.cuda} toolkit "
                             f"root, or set {CUDA_ENV}=0 for a CPU-only build")
        log(f"{msg}: building the C++ (CPU) part only; set CUDA_HOME to build the CUDA part")
        return False
    # cpp_extension looks its CUDA_HOME up at build time: make it (and nvcc's children) use ours.
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    log(f"building the CUDA part with CUDA_HOME={home}, TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPUs)')}")
    return True


def default_max_jobs():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gib = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return cores
    return max(1, min(cores, int(free_gib / 2)))  # nvcc and heavy torch headers take ~2 GiB a job


def openmp_flags():
    """-fopenmp when the C++ compiler accepts it (gcc, clang with libomp), else nothing."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    if not ok:
        log(f"{cxx} does not support -fopenmp: the CPU kernels' patchify runs single-threaded")
    return ["-fopenmp"] if ok else []


def extensions():
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(torch, cpp_extension)
    sources = [s for s in read_sources() if with_cuda or not s.endswith(".cu")]
    sources.append(os.path.join("python", "bindings.cpp"))
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(default_max_jobs())
    log(f"MAX_JOBS={os.environ['MAX_JOBS']}")

    omp = openmp_flags()
    kwargs = dict(
        name="mcl_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("MCL_WITH_CUDA", None)] if with_cuda else [],
        extra_compile_args={"cxx": ["-O3"] + omp, "nvcc": ["-O3"]},
        extra_link_args=omp,
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if with_cuda else cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def long_description():
    path = os.path.join(ROOT, "README.md")
    return open(path).read() if os.path.isfile(path) else ""


ext_modules, cmdclass = extensions()

setup(
    name="mcl_kernels",
    version="0.1.0",
    description="PyTorch kernels for Multi-scale Cooperative Learning (MCL) vision transformers",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mcl_kernels", "mcl_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "timm", "expecttest", "numpy", "torchvision", "safetensors", "tqdm",
                             "onnx", "onnxscript", "onnxruntime"],
                    "timm": ["timm"],
                    # mcl-train / mcl-eval / mcl-export (ONNX export and evaluation need the "export" extra too)
                    "train": ["timm", "torchvision", "numpy", "safetensors", "tqdm"],
                    # mcl_kernels.models.export: safetensors files of timm models, ONNX (+ onnxruntime to check it)
                    "export": ["timm", "safetensors", "onnx", "onnxscript", "onnxruntime"]},
    entry_points={"console_scripts": ["mcl-train=mcl_kernels.train:main", "mcl-eval=mcl_kernels.eval:main",
                                      "mcl-export=mcl_kernels.export:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
