#!/usr/bin/env bash
# The one GPU check of docs/performance.md, for a session lent a CUDA machine (≤ 10 minutes on one H100/H200):
# tests — the CUDA and Triton tests on the real device; bench — whole calls at ResNet-50 shapes (fp32, bf16);
# graphs — the same calls replayed from CUDA graphs (the device's time alone) with achieved bandwidth; host — each
# kernel's device time in a call (bench_kernels.py), synchronized L2BN against torch's SyncBatchNorm (one nccl
# rank) and the host time of a call (the launches' share; each launch's, with its binder's part); census — every
# norm layer's input shape of the zoo (fp32 whole calls and SGD steps, fp32 and bf16 CUDA graphs; issue 23's goal
# 4); lanes (not by default) — the census's CUDA graphs with NCHW rows summed per tile position too; inference (not
# by default) — the census's eval rows in CUDA graphs through the autograd path (``_INFERENCE_PATH`` off), against
# census's own, and the inference kernels' device time; compiled (not by default: a second call after the default
# parts) — ResNet-20 SGD steps, eager and under torch.compile(mode="reduce-overhead"), BN against L2BN: whether CUDA
# graphs remove the host-bound eager steps' gap (bench_steps.py; compile time printed apart). Each step has its own time limit (the default
# parts together under 10 minutes) and a failure does not stop the next; rows are printed as they are timed, so a
# step cut by its limit still logs what it measured. Everything goes to $OUT/gpu_check.log (or ./gpu_check.log).
#
#     bash benchmarks/gpu_check.sh                 # from the repository root, with a CUDA torch and triton installed
#     bash benchmarks/gpu_check.sh tests graphs    # only some parts: tests, bench, graphs, host, census, lanes,
#                                                  # inference, compiled
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-.}/gpu_check.log"
py=$(command -v python3 || command -v python)
shapes="128x64x56x56 128x256x56x56 128x512x28x28 128x2048x7x7"  # ResNet-50 BN inputs at batch 128

parts="${*:-tests bench graphs host census}"
wants() { [[ " $parts " == *" $1 "* ]]; }

step() {  # step SECONDS TITLE COMMAND...
  local limit=$1 title=$2
  shift 2
  echo "=== $title ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step 20 "device" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
step 30 "versions" "$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
if wants tests; then  # every failure listed (no -x): one run on a lent machine has to show them all
  # (not the ahead-of-time compile check: it needs no GPU, CI runs it, and on the device it outlasted the step)
  # (the short files first: in session 17 test_triton.py alone outlasted 130 s and cut the rest)
  step 150 "CUDA and Triton tests" "$py" -m pytest -v -p no:cacheprovider --maxfail=25 tests/test_compat.py \
    tests/test_metrics.py tests/test_norms_ubn.py tests/test_triton.py \
    -k "(triton or cuda or huge) and not compiles_for_cuda_without_a_gpu"
fi
if wants bench; then  # whole calls (host and device)
  for dtype in fp32 bf16; do
    step 30 "bench triton $dtype" "$py" -m l2bn bench --device cuda --dtype "$dtype" --repeats 20 --shapes $shapes
  done
fi
if wants graphs; then  # the device's time alone (each call a CUDA graph), with achieved bandwidth
  for dtype in fp32 bf16; do
    step 30 "ResNet-50 shapes, CUDA graphs, $dtype" "$py" benchmarks/bench_census.py --device cuda --dtype "$dtype" \
      --cuda-graphs --shapes "${shapes// /,}"
  done
fi
if wants host; then
  # each kernel's device time inside a call, BN's kernels beside it (torch.profiler)
  step 40 "kernels, fp32" "$py" benchmarks/bench_kernels.py --modes train --shapes \
    128x2048x7x7,128x2048x8x8,128x256x56x56,16x64x56x56,128x512x14x14,64x256x16x16
  # SyncL2BatchNorm's call (torch ops, Triton kernels) against torch's SyncBatchNorm, one nccl rank
  step 30 "synchronized layers, fp32" "$py" benchmarks/bench_sync.py --device cuda --dtype fp32
  # host time a training call: BN, L2BN, L2BN with its Triton launches stubbed out (the launcher's share), and
  # each launch's host time per kernel with the binder's part of it
  step 30 "host time a call" "$py" benchmarks/bench_host.py --device cuda --launches
fi
if wants census; then
  step 75 "shape census fp32, and whole SGD steps" "$py" benchmarks/bench_census.py --device cuda --dtype fp32 --steps
  for dtype in fp32 bf16; do
    step 50 "shape census $dtype, CUDA graphs" "$py" benchmarks/bench_census.py --device cuda --dtype "$dtype" \
      --cuda-graphs
  done
fi
# "$py" -c "$census_with" SETTING VALUE ARGS...: bench_census.py ARGS with the kernel module's SETTING set to VALUE
# (a Python literal) first, for the A/B parts against the default census
census_with='import ast, runpy, sys
import l2bn.kernels.triton_l2bn as kernels
setattr(kernels, sys.argv[1], ast.literal_eval(sys.argv[2]))
sys.argv = ["bench_census.py"] + sys.argv[3:]
runpy.run_path("benchmarks/bench_census.py", run_name="__main__")'
if wants lanes; then  # not by default: the census's device times with NCHW rows summed per tile position too
  for dtype in fp32 bf16; do
    step 60 "shape census $dtype, CUDA graphs, _LANES_EVERY_LAYOUT" "$py" -c "$census_with" \
      _LANES_EVERY_LAYOUT True --device cuda --dtype "$dtype" --cuda-graphs
  done
fi
if wants inference; then  # not by default: eval through the autograd path's four launches, for the A/B
  step 30 "kernels, eval (inference path), fp32" "$py" benchmarks/bench_kernels.py --modes eval --shapes \
    128x2048x7x7,128x256x56x56,16x64x56x56,128x16x32x32
  for dtype in fp32 bf16; do
    step 50 "shape census eval $dtype, CUDA graphs, _INFERENCE_PATH off" "$py" -c "$census_with" \
      _INFERENCE_PATH False --device cuda --dtype "$dtype" --cuda-graphs --modes eval
  done
fi
if wants compiled; then  # not by default: torch.compile's CUDA graphs against the eager steps
  step 170 "ResNet-20 steps, eager and torch.compile reduce-overhead, fp32" "$py" benchmarks/bench_steps.py \
    --device cuda --models resnet20 --layouts NCHW --compile reduce-overhead
fi
echo "log: $log"
