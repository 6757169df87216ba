#!/usr/bin/env bash
# Sets up a development environment in ./.venv on a fresh machine and builds mcl_kernels in it.
# Idempotent: re-running only rebuilds the extension. Used by README's commands and by .ci/run.
#
#   MCL_KERNELS_BUILD_CUDA=auto|0|1   build the CUDA part: when torch has CUDA and nvcc is found (default),
#                                     never, or always (fails with a clear message without nvcc)
#   CUDA_HOME                         CUDA toolkit (default /usr/local/cuda when it has bin/nvcc)
#   TORCH_CUDA_ARCH_LIST              GPU architectures to compile for (setup.py picks one when unset)
#   PYTHON                            interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip
# torch and torchvision pinned together (their ABIs must match); triton for the GPU kernels and their
# interpreter; build tools for the extension (installed here because the build runs without isolation,
# against this torch).
echo "[setup] installing torch, torchvision, triton and build tools"
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 triton pybind11 ninja "setuptools>=64" wheel
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "[setup] building mcl_kernels (MCL_KERNELS_BUILD_CUDA=${MCL_KERNELS_BUILD_CUDA:-auto}, CUDA_HOME=${CUDA_HOME:-unset})"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
echo "[setup] built in $(( $(date +%s) - start )) s; $("$PY" -c 'import mcl_kernels._C as C; print("extension ok, CUDA part:", C.built_with_cuda)')"
