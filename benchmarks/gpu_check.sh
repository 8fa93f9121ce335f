#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU machine (under 8 minutes on one GPU):
# the model alone, the device decode path, training with a resume, labeling end to end
# with `decode: gpu` vs `decode: cpu`, and the Serve load test.
#
#   benchmarks/gpu_check.sh                            # one GPU, under 8 minutes
#   SKRAY_GPU_CHECK_SMALL=1 benchmarks/gpu_check.sh    # the same steps on CPU, small model, ~1-2 min
#
# 1. sets up .venv if needed (make .venv/.installed) and starts a local Ray head (token
#    auth on) with the machine's CPUs and one GPU;
# 2. writes generated labeled data (skray.dev.demo's labeled_image: 6 classes x 1000 train +
#    100 val, 224 px PNGs);
# 3. trains skresnext50_32x4d (the default, configs/train_baseline.yaml's recipe) for 2
#    epochs on 1 GPU worker, batch 128, amp bf16, channels_last (when TrainConfig has the key);
# 4. resumes the run with epochs raised to 3 (`skray train --resume RUN_DIR`) and checks
#    that it restored the checkpoint of epoch 1 and trained epoch 2 on top of it;
# 5. prints img/s per GPU of every epoch (from the MLflow run);
# 6. model-only img/s at the labeling batch: skray eager / fast / fast + compile in bf16,
#    timm's eager and compiled model beside them (benchmarks/model_throughput.py);
# 7. the GPU-only code paths: nvJPEG batch decode on the device against the Pillow path
#    (crop difference, top-1 agreement), the per-GPU batch-size probe, and the prefetching
#    Predictor on a CUDA stream (tests/core/test_device_decode.py with SKRAY_TEST_DEVICE=cuda);
# 8. labeling ~20k real photos from local disk with decode: gpu vs decode: cpu, as a
#    fraction of model-only, with the cost of 1M images at $SKRAY_USD_PER_GPU_HOUR
#    (benchmarks/label_decode.py);
# 9. the Serve load test at concurrency 64 (benchmarks/serve_load.py), then stops Ray.
# Exits non-zero on any failure. Everything lives in $SKRAY_GPU_CHECK_DIR (default
# .skray/gpu_check, emptied at the start), MLflow included.
# SKRAY_GPU_CHECK_SMALL=1: skresnext14_8x4d_half, 4 classes x 24 images of 48 px, 1 epoch
# then a resume to 2, 200 photos to label, small load tests, on CPU (a Ray of 4 logical
# CPUs): the same path with no GPU.
# Note: `ray stop --force` at the end stops every Ray on the machine, as the tests do.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMALL=${SKRAY_GPU_CHECK_SMALL:-0}
WORK=${SKRAY_GPU_CHECK_DIR:-.skray/gpu_check}
case "$WORK" in /*) ;; *) WORK=$ROOT/$WORK ;; esac
step() { echo "[gpu_check] $*"; }
fail() { echo "[gpu_check] FAILED: $*" >&2; exit 1; }

[ -x .venv/bin/skray ] || make .venv/.installed
export PATH=$ROOT/.venv/bin:$PATH
PY=$ROOT/.venv/bin/python

if [ "$SMALL" = 1 ]; then
    MODEL=skresnext14_8x4d_half SIZE=48 CLASSES=4 PER_CLASS=24 VAL_PER_CLASS=8 EPOCHS=1
    BATCH=16 USE_GPU=false NUM_GPUS=0 NUM_CPUS=4 CPUS_PER_WORKER=1 DECODE_CPUS=0.5
    DEVICE=cpu LABEL_IMAGES=200 LABEL_BATCH=16 ROUNDS=3 SERVE_REQUESTS=32 SERVE_BATCH=8 COMPILE=()
else
    MODEL=skresnext50_32x4d SIZE=224 CLASSES=6 PER_CLASS=1000 VAL_PER_CLASS=100 EPOCHS=2
    BATCH=128 USE_GPU=true NUM_GPUS=1 NUM_CPUS=$(nproc) CPUS_PER_WORKER=2 DECODE_CPUS=0.5
    DEVICE=cuda LABEL_IMAGES=20000 LABEL_BATCH=256 ROUNDS=20 SERVE_REQUESTS=512 SERVE_BATCH=64 COMPILE=(--compile)
    command -v nvidia-smi >/dev/null || fail "no nvidia-smi: no GPU here (SKRAY_GPU_CHECK_SMALL=1 runs on CPU)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, sys; ok = torch.cuda.is_available(); print('[gpu_check] torch', torch.__version__, 'cuda', torch.version.cuda, 'available', ok); sys.exit(0 if ok else 1)" \
        || fail "torch in .venv cannot use the GPU (a CPU-only wheel?)"
fi
RESUME_EPOCHS=$((EPOCHS + 1))
# channels_last is a training option only once TrainConfig has it; until then say so.
if $PY -c "import sys; from skray.train.config import TrainConfig; sys.exit(0 if 'channels_last' in TrainConfig.model_fields else 1)"; then
    LAYOUT=(--set channels_last=true)
else
    LAYOUT=()
    step "WARNING: TrainConfig has no channels_last key: this run trains in the default (NCHW) layout"
fi

rm -rf "$WORK" && mkdir -p "$WORK"
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db SKRAY_HOME=$WORK
export RAY_AUTH_MODE=token
started=$(date +%s)

step "writing $CLASSES classes x $PER_CLASS train + $VAL_PER_CLASS val images of ${SIZE} px to $WORK/data"
$PY - "$WORK/data" "$CLASSES" "$PER_CLASS" "$VAL_PER_CLASS" "$SIZE" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from skray.dev.demo import labeled_image
from skray.io.storage import write_bytes_atomic

root, classes, per_class, val_per_class, size = sys.argv[1], *map(int, sys.argv[2:])

def write(job):
    split, c, i, seed = job
    write_bytes_atomic(f"{root}/{split}/class{c}/{i:05d}.png", labeled_image(c, seed, size))

jobs = [("train", c, i, c * 100_000 + i) for c in range(classes) for i in range(per_class)]
jobs += [("val", c, i, 10_000_000 + c * 100_000 + i) for c in range(classes) for i in range(val_per_class)]
with ProcessPoolExecutor() as pool:
    list(pool.map(write, jobs, chunksize=64))
EOF

step "starting a local Ray head: $NUM_CPUS CPUs, $NUM_GPUS GPU"
ray get-auth-token --generate >/dev/null 2>&1 || true
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$NUM_CPUS" --num-gpus="$NUM_GPUS" \
    --include-dashboard=false --disable-usage-stats >"$WORK/ray_start.log" 2>&1 \
    || { cat "$WORK/ray_start.log" >&2; fail "ray start"; }
export RAY_ADDRESS=127.0.0.1:$PORT

RUN_DIR=$WORK/runs/gpu-check
step "training $MODEL for $EPOCHS epochs (batch $BATCH, amp bf16, use_gpu $USE_GPU)"
t0=$(date +%s)
skray train --config configs/train_baseline.yaml \
    --set name=gpu-check --set storage_path="$WORK/runs" \
    --set data.train="$WORK/data/train" --set data.val="$WORK/data/val" --set data.files_per_unit=64 \
    --set data.decode_cpus=$DECODE_CPUS --set model.name=$MODEL \
    --set scaling.workers=1 --set scaling.use_gpu=$USE_GPU --set scaling.cpus_per_worker=$CPUS_PER_WORKER \
    --set epochs=$EPOCHS --set batch_size=$BATCH --set image_size=$SIZE --set optim.warmup_epochs=1 \
    --set amp=bf16 --set mlflow.experiment=skray-gpu-check --set mlflow.registered_model=skray-gpu-check \
    "${LAYOUT[@]}" 2>&1 | tee "$WORK/train.log" || fail "skray train (log: $WORK/train.log)"
t1=$(date +%s)

step "resuming $RUN_DIR with epochs raised to $RESUME_EPOCHS"
# --resume reads the run's saved config (skray_train.yaml): raise its epochs there; --set
# says the same for a skray that applies overrides on resume.
$PY - "$RUN_DIR/skray_train.yaml" "$RESUME_EPOCHS" <<'EOF'
import sys, yaml
path, epochs = sys.argv[1], int(sys.argv[2])
cfg = yaml.safe_load(open(path))
cfg["epochs"] = epochs
open(path, "w").write(yaml.safe_dump(cfg, sort_keys=False))
EOF
skray train --resume "$RUN_DIR" --set epochs=$RESUME_EPOCHS 2>&1 | tee "$WORK/resume.log" \
    || fail "skray train --resume (log: $WORK/resume.log)"
t2=$(date +%s)

$PY - "$RUN_DIR" "$EPOCHS" "$RESUME_EPOCHS" "$MODEL" "$USE_GPU" "$SIZE" "$BATCH" <<'EOF'
import json, sys
from mlflow.tracking import MlflowClient

run_dir, epochs, resume_epochs, model, use_gpu, size, batch = sys.argv[1:]
epochs, resume_epochs = int(epochs), int(resume_epochs)
result = json.load(open(f"{run_dir}/skray_result.json"))
final = result["final"]
history = {key: {m.step: m.value for m in MlflowClient().get_metric_history(result["mlflow_run_id"], key)}
           for key in ("img_per_s", "val_top1", "train_loss", "resumed_at_epoch")}
device = "GPU" if use_gpu == "true" else "CPU worker"
print(f"[gpu_check] {model}, {size} px, batch {batch}, 1 {device}; epochs {epochs} then resumed to {resume_epochs}")
print(f"[gpu_check] {'epoch':>5} {'img/s per ' + device:>20} {'train_loss':>10} {'val_top1':>8} {'resumed_at':>10}")
for step in sorted(history["img_per_s"]):
    print(f"[gpu_check] {step:>5} {history['img_per_s'][step]:>20.1f} {history['train_loss'][step]:>10.4f} "
          f"{history['val_top1'][step]:>8.2f} {int(history['resumed_at_epoch'][step]):>10}")
problems = []
if int(final["epoch"]) != resume_epochs - 1:
    problems.append(f"the resumed run ended at epoch {final['epoch']}, not {resume_epochs - 1}")
if int(final["resumed_at_epoch"]) != epochs:
    problems.append(f"the resumed run started at epoch {final['resumed_at_epoch']}, not {epochs} "
                    "(the checkpoint was not restored)")
if sorted(history["img_per_s"]) != list(range(resume_epochs)):
    problems.append(f"MLflow has epochs {sorted(history['img_per_s'])}, not 0..{resume_epochs - 1} in one run")
if problems:
    sys.exit("[gpu_check] FAILED: " + "; ".join(problems))
print(f"[gpu_check] resume OK: restored epoch {epochs - 1}, trained to epoch {final['epoch']} in the same MLflow run")
EOF

step "model-only at batch $LABEL_BATCH: skray eager / fast / fast + compile (bf16 on a GPU), timm beside it"
$PY benchmarks/model_throughput.py --model $MODEL --batch $LABEL_BATCH --size $SIZE --rounds $ROUNDS \
    --device $DEVICE 2>&1 | tee "$WORK/model_throughput.log" || fail "model_throughput"
t3=$(date +%s)

step "device decode on $DEVICE against the Pillow path; batch-size probe; prefetching Predictor"
SKRAY_TEST_DEVICE=$DEVICE $PY -m pytest -q -p no:cacheprovider tests/core/test_device_decode.py -k "not labeling_job" \
    2>&1 | tee "$WORK/device_decode.log" || fail "device decode tests (log: $WORK/device_decode.log)"

step "labeling $LABEL_IMAGES photos: decode gpu vs cpu, as a fraction of model-only"
$PY benchmarks/label_decode.py --model $MODEL --images $LABEL_IMAGES --batch $LABEL_BATCH "${COMPILE[@]}" \
    --usd-per-hour "${SKRAY_USD_PER_GPU_HOUR:-3.50}" 2>&1 | tee "$WORK/label_decode.log" || fail "label_decode"
t4=$(date +%s)

step "Serve load test at concurrency 64 (batching on, max_batch_size $SERVE_BATCH)"
ray stop --force >/dev/null 2>&1 || true  # serve_load starts its own Ray with the machine's CPUs and GPU
env -u RAY_ADDRESS $PY benchmarks/serve_load.py --model $MODEL --requests $SERVE_REQUESTS --batch $SERVE_BATCH \
    --concurrency 64 --batching on 2>&1 | tee "$WORK/serve_load.log" || fail "serve_load"
t5=$(date +%s)

step "wall: train $((t1 - t0)) s, resume $((t2 - t1)) s, model-only $((t3 - t2)) s, labeling $((t4 - t3)) s, \
serve $((t5 - t4)) s, total $(( $(date +%s) - started )) s"
step "OK"
