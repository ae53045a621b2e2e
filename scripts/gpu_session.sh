#!/usr/bin/env bash
# One GPU session in two phases, for a lent machine with a short time budget.
#
#   scripts/gpu_session.sh check [SECONDS]  # CUDA tests, main job, overhead, one model
#   scripts/gpu_session.sh bench [SECONDS]  # model- and layer-level benchmarks
#   scripts/gpu_session.sh recheck [SECONDS]  # re-run the rows the H200 tables missed
#   scripts/gpu_session.sh all [SECONDS]    # check, recheck, bench in one call
#       (on an H200: check ~100 s, recheck up to 180 s; give 565 s to leave the
#       benchmarks time, whose steps are skipped once the deadline nears)
#   scripts/gpu_session.sh calibrate [SECONDS]  # every candidate timed: the GPU cost model
#
# Expects the pure-Python wheels of the dependencies the machine lacks in .whl/
# (backpack-for-pytorch, curvlinops-for-pytorch, einconv, unfoldNd) and writes logs,
# JSON as one tarball under $OUT (default /tmp/gpu_out). Every step has its own
# time limit and the whole phase a deadline, so what finished always comes back.
set -u
phase=${1:?usage: gpu_session.sh check|bench|recheck|all|calibrate}
budget=${2:-480}  # seconds for the whole phase
OUT=${OUT:-/tmp/gpu_out}
results=/tmp/gpu_results  # packed into $OUT/results.tgz at the end
dev=${DEVICE:-cuda}     # DEVICE=cpu: dry run of the script on a machine without GPU
rm -rf "$results"  # a warm machine keeps /tmp between calls
mkdir -p "$results" "$OUT"
deadline=$(($(date +%s) + budget))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" TQDM_DISABLE=1
py=python3

# .whl/ is git-ignored: the device call must carry it
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv >"$results/gpu.txt" 2>&1
$py -c "import torch, backpack, curvlinops, einconv; \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    >>"$results/gpu.txt" 2>&1 || {
    cat "$results/gpu.txt"
    echo "imports failed (were the wheels carried?)"
    exit 1
}
cat "$results/gpu.txt"

# pack what there is: after every step, so that a call killed at its limit still
# brings back everything finished before
pack() {
    tar -czf "$OUT/results.tgz" -C "$(dirname "$results")" "$(basename "$results")"
    cp "$results/steps.txt" "$OUT/" 2>/dev/null
}

# step NAME SECONDS CMD...: run with a limit (capped by the deadline), log to NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - $(date +%s) - 15))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "SKIP $name (deadline)" | tee -a "$results/steps.txt"
        return
    fi
    local start=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$results/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s (limit ${limit}s)" \
        | tee -a "$results/steps.txt"
    tail -n 4 "$results/$name.log"
    pack
}

# fp32 benchmarks without TF32: every implementation does the same arithmetic
# (cuDNN would otherwise use TF32 for convolutions and cuBLAS not for einsum's GEMMs).
bench="env NVIDIA_TF32_OVERRIDE=0"

check() {
    step tests 240 env BACKPACK_TN_TEST_DEVICE="$dev" $py -m pytest tests/test_cuda.py \
        "tests/test_dropout.py::test_devices" -q -p no:cacheprovider --junitxml="$results/junit.xml"
    step main 60 $py -m backpack_tn --device $dev --batch-size 64 --repeats 3
    step overhead 30 $py -m backpack_tn.bench.overhead --device $dev
    [[ $phase == all ]] && return  # the zoo's DeepOBS run covers 3c3d
    step smoke_3c3d 120 $bench $py -m backpack_tn.bench --models 3c3d --device $dev \
        --batch-size 32 --repeats 3 --json "$results/zoo_3c3d_$dev.json"
}

benchmarks() {
    step models_resnet18 150 $bench $py -m backpack_tn.bench.models --model resnet18 \
        --batch-size 8 --device $dev --repeats 3 \
        --extensions BatchGrad DiagGGNExact DiagGGNMC SumGradSquared BatchL2Grad
    step kfac_resnet18 60 $bench $py -m backpack_tn.bench.kfac --model resnet18 \
        --batch-size 8 --device $dev --repeats 3
    step models_allcnnc 60 $bench $py -m backpack_tn.bench.models --model allcnnc \
        --batch-size 64 --device $dev --repeats 3 --extensions KFAC BatchGrad
    for m in deepobs resnet18 alexnet convnext_base mobilenet_v2 inception_v3 resnext101; do
        models=$m batch=8
        [[ $m == deepobs ]] && models="3c3d 2c2d allcnnc" batch=32
        # shellcheck disable=SC2086
        step "zoo_$m" 200 $bench $py -m backpack_tn.bench --models $models --device $dev \
            --batch-size $batch --repeats 3 --no-plain --json "$results/zoo_${m}_$dev.json"
    done
}

# the layer rows the last GPU tables missed (slower than stock, or more memory), again:
# what a change aimed at them did, in a few minutes instead of a full zoo run
recheck() {
    step recheck_h200 180 $bench $py -m backpack_tn.bench.recheck docs/bench/h200/zoo_*.json \
        --device $dev --repeats 3 --json-dir "$results/recheck_h200"
}

calibration() {
    for m in resnet18 alexnet mobilenet_v2; do
        step "calibrate_$m" 200 $bench $py -m backpack_tn.bench.calibrate --models $m \
            --batch-size 8 --device $dev --repeats 3 --json "$results/calibrate_${m}_$dev.json"
    done
}

case $phase in
check) check ;;
calibrate) calibration ;;
bench) benchmarks ;;
recheck) recheck ;;
all)
    check
    recheck
    benchmarks
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
pack
