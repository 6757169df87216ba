#!/usr/bin/env bash
# Everything a GPU machine can check, in one command (sized to finish within 10 minutes on a 16-core H100
# machine, stage time limits included): build the extension for that GPU into $PY's environment (an editable
# install: it changes that environment; the machines this was made for are lent and thrown away), run the CUDA
# tests (`-k cuda`: the tests that need a device, with Triton compiled, not interpreted), then the GPU
# benchmarks (bf16 at DeiT-S width, batch 256: every section; fp32 without compile rows). Needs torch with
# CUDA, Triton, timm, pytest and pytest-xdist in $PY (default python3). Logs and JSON go to $OUT (default
# ./gpu-out).
# Stages: build, tests, bench (default all), e.g. `bash scripts/gpu_session.sh build bench`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
PY=${PY:-python3}
stages=${*:-build tests bench}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MCL_KERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export TRITON_INTERPRET=0
cap=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
t0=$(date +%s); stamp() { echo "[gpu] $(( $(date +%s) - t0 )) s: $*"; }
nvidia-smi -L
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
if [[ " $stages " == *" build "* ]]; then
  stamp "building for sm_$cap"
  $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  $PY -c 'import mcl_kernels._C as C; print("extension built, CUDA part:", C.built_with_cuda)'
fi
if [[ " $stages " == *" tests "* ]]; then
  stamp "CUDA tests"
  # Most of this stage is Triton compiling and autotuning kernels for the test shapes: 14 workers on a 16-core
  # machine ran it in 166 s; 8 workers ran past 220 s once the autotune sets grew.
  workers=${TEST_WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}
  timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -k cuda tests -rfE -n "$workers" --durations=15 > "$OUT/gpu-tests.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu-tests.log" | grep -v DEBUG | tail -15
fi
if [[ " $stages " == *" bench "* ]]; then
  stamp "kernel benchmarks"
  timeout ${BENCH_TIMEOUT:-210} $PY benchmarks/kernels.py --device cuda --widths 384 --batches 256 \
      --dtypes bfloat16 --sections ${SECTIONS:-fwd,fwdbwd,infer,attn,packed} --json "$OUT/kernels-gpu.json" > "$OUT/kernels.log" 2>&1
  echo "bench rc=$?"; grep -v "^  " "$OUT/kernels.log" | tail -70
  stamp "fp32 kernel benchmarks (no compile rows)"
  timeout ${FP32_TIMEOUT:-70} $PY benchmarks/kernels.py --device cuda --widths 384 --batches 256 --no-compile \
      --dtypes float32 --sections fwd,fwdbwd,infer --json "$OUT/kernels-gpu-fp32.json" > "$OUT/kernels-fp32.log" 2>&1
  echo "fp32 bench rc=$?"; grep -v "^  " "$OUT/kernels-fp32.log" | grep "kernel-" | tail -30
fi
stamp done
