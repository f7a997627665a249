#!/usr/bin/env bash
# Issue 13's GPU check as one prepared script, for a session that is lent a GPU (device tool `run`):
#
#     bash docs/gpu_check.sh bench train        # ~3 minutes on an H200: speed, fidelity, the default run
#     bash docs/gpu_check.sh ablation           # the 4 groups x 3 seeds at the paper's schedule, evaluated
#
# (run each line as its own device call with a timeout that leaves a retry; bench+train rebuild the
# synthetic set, ~10 s on 16 cores, as a fresh machine has none)
#
# Everything worth keeping lands in $OUT (at most 8 files, as the device tool brings back): bench.txt,
# train.log, metrics.txt, and the ablation's REPORT.md, loss_bars.png, loss_curves.png, heatmaps.png.
# TINY=1 runs the same stages at toy sizes on the CPU, to test this script without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -n "${TINY:-}" ]; then
    DEV=cpu; DATA=data/tiny; SEEDS=1; BATCHES="2"; COMPILES=("")  # compiling on 2 cores takes minutes
    SMALL=(--ngf 8 --ndf 8 --vgg-widths 4 4 8 8 8)
    SCHEDULE=(--steps 3 --batch-size 2 "${SMALL[@]}"); ABLATION=()
    BENCH=(--steps 1 --warmup 0 "${SMALL[@]}")
    python -c "import extras.synthetic; extras.synthetic.ensure_synthetic('$DATA', n_frames=6, n_videos=(3, 2, 0, 0), raw_size=128)"
    DATA=$DATA/prepared
else
    DEV=cuda; DATA=data/synthetic/prepared; SEEDS=3; BATCHES="16 256"
    COMPILES=("" "--compile" "--compile reduce-overhead")
    SCHEDULE=(); BENCH=()
    # 12 paper-schedule runs must fit one 10-minute command: batch 64 (the same 57.2k triplets a run)
    # until batch 16 reaches the speed goal; ABLATION_BATCH=16 for the paper's own batch
    ABLATION=(--batch-size "${ABLATION_BATCH:-64}")
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/bench.txt"
    python -c "import time, extras.synthetic; t = time.time(); extras.synthetic.ensure_synthetic(); print(f'synthetic set: {time.time() - t:.0f} s')" \
        | tee -a "$OUT/bench.txt"
fi
for stage in "$@"; do
    case $stage in
    bench)
        for b in $BATCHES; do
            for c in "${COMPILES[@]}"; do
                echo "== bench --batch-size $b $c" | tee -a "$OUT/bench.txt"
                # shellcheck disable=SC2086
                python facesynth.py bench --device $DEV --batch-size "$b" --data "$DATA" $c "${BENCH[@]}" 2>&1 \
                    | grep -v '^\r' | tail -n 25 | tee -a "$OUT/bench.txt"
            done
        done ;;
    train)
        python facesynth.py train --device $DEV --data "$DATA" --vgg random --out runs/gpu "${SCHEDULE[@]}" 2>&1 \
            | tr '\r' '\n' | tail -n 60 > "$OUT/train.log"
        python evaluate.py metrics --runs runs/gpu --device $DEV --out runs/gpu/eval 2>&1 | tr '\r' '\n' \
            | tail -n 30 > "$OUT/metrics.txt" ;;
    ablation)
        python facesynth.py ablation --device $DEV --data "$DATA" --seeds $SEEDS --vgg random --out runs/ablation \
            "${SCHEDULE[@]}" "${ABLATION[@]}" 2>&1 | tr '\r' '\n' | grep -E '^(ablation|done|error)' || true
        cp runs/ablation/REPORT.md runs/ablation/loss_bars.png runs/ablation/loss_curves.png \
            runs/ablation/heatmaps.png "$OUT/" ;;
    *) echo "error: unknown stage $stage (bench, train or ablation)" >&2; exit 2 ;;
    esac
done
echo "gpu_check: results in $OUT/"
