#!/usr/bin/env bash
# The checks only a CUDA GPU can make, as one script (a few minutes on one H100 / H200):
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else outputs/gpu_check
#
#   1. env         the GPU, torch and CUDA versions, the attention backends vidgen finds;
#   2. cuda_tests  pytest -m cuda: varlen flash attention == SDPA, packed bf16 forward ==
#                  per-sample forwards with the automatic backend;
#   3. vae_bf16    a 300-step bf16-mixed VAE stage-1 run on the GPU (trainer=gpu) on freshly
#                  generated synthetic clips; vae_loss: its loss must fall and stay finite;
#   4. ddp_*       every stage for a few steps as multi-GPU users launch it, on one GPU:
#                  trainer=ddp trainer.devices=1 (NCCL), so every collective of the training
#                  modules (guards, the stage-3 discriminator's gradients, LeCam, metrics)
#                  runs with its tensors on the GPU: VAE stages 1 -> 2 -> 3 (GAN from step
#                  0), latent statistics, latent precompute, DiT stages 1 -> 2;
#   5. mfu         bench/bench_dit.py for the 1.3B shape in bf16 with activation
#                  checkpointing: tokens/s vs diffusers and MFU (target >= 40%), also as JSON.
#   6. lora        bench/bench_lora.py for Wan 1.3B at 480x832, 81 frames, with activation
#                  checkpointing: a LoRA step (bf16 base) and a full fine-tuning step, ours
#                  against diffusers + peft (time, peak memory, checkpoint size), as JSON;
#                  lora_memory: the LoRA step's absolute peak must stay under 24 GB.
#   7. cp          bench/bench_cp.py on CUDA (NCCL), only with 2 or more GPUs: per-rank peak
#                  memory and tokens/s of context parallelism (cp=2, and 4 with 4 GPUs) against
#                  cp=1 at the 1.3B width for 16k-64k tokens, also as JSON; with one GPU the
#                  summary records it as skipped.
#
# Each step writes OUT_DIR/<step>.log and a line to OUT_DIR/summary.txt; a failing step does
# not stop the later ones, and the script's exit status is 1 if any step failed.
#
# PY (default: .venv/bin/python if present, else python3) runs everything. On a machine with
# a CUDA PyTorch but without vidgen's other packages and no package index (the lent GPU
# machines), first run `make gpu-wheels` where the index is reachable: it downloads the
# missing pure-Python and manylinux wheels into .wheels/, which this script installs with
# --no-index when the folder is there. vidgen itself runs from the checkout (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
if [[ -z ${PY:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline

if [[ -d .wheels ]]; then
    echo "== installing .wheels/ into $PY"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation .wheels/* || exit 1
fi

failed=0
step() {  # step NAME COMMAND...: run with a time limit, log, record rc and seconds
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT_DIR/summary.txt"
    [[ $rc == 0 ]] || failed=1
}

step env "$PY" - <<'EOF'
import torch
from vidgen.models.dit.attention import available_backends

print("torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible: the checks below need one")
print("device", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
print("attention backends (cuda, bf16):", available_backends("cuda", torch.bfloat16))
EOF

step cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m cuda -o addopts="" tests

data=$(mktemp -d)
"$PY" -m vidgen.data.synthetic --out "$data" --num-videos 128 --val-videos 8 --size 64 --frames 17 --seed 0
step vae_bf16 "$PY" train.py experiment=demo/vae_stage1 trainer=gpu trainer.max_steps=300 \
    data.train.shards="$data/train" data.val.shards="$data/val" data.num_workers=4 \
    paths.run_dir="$data/run"
# that run's train/loss: finite throughout, and lower over the last third of the logged
# values than over the first third
step vae_loss "$PY" - "$data/run/csv/metrics.csv" <<'EOF'
import csv, math, sys

with open(sys.argv[1]) as f:
    loss = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
n = max(1, len(loss) // 3)
first, last = sum(loss[:n]) / n, sum(loss[-n:]) / n
print(f"train/loss: {len(loss)} logged values, mean of the first {n} {first:.4f}, of the last {n} {last:.4f}")
if not all(math.isfinite(x) for x in loss) or not last < first:
    raise SystemExit("the bf16 loss did not fall or was not finite")
EOF

# every stage under DDP with one GPU (NCCL): each continues from the one before
ddp=(trainer=ddp trainer.devices=1 trainer.max_steps=20 trainer.limit_val_batches=1
     data.num_workers=2 data.train.batches_per_epoch=10)
vdata=(data.train.shards="$data/train" data.val.shards="$data/val")
step ddp_vae1 "$PY" train.py experiment=demo/vae_stage1 "${ddp[@]}" "${vdata[@]}" paths.run_dir="$data/v1"
step ddp_vae2 "$PY" train.py experiment=demo/vae_stage2 "${ddp[@]}" "${vdata[@]}" paths.run_dir="$data/v2" \
    model.init_from="$data/v1"
step ddp_vae3 "$PY" train.py experiment=demo/vae_stage3 "${ddp[@]}" "${vdata[@]}" paths.run_dir="$data/v3" \
    model.init_from="$data/v2" model.gan.start_step=0
step ddp_latents "$PY" -m vidgen.tools.latent_stats ckpt="$data/v3" data.shards="$data/train" \
    data.num_frames=17 data.max_videos=32 chunked=false
for s in train val; do
    step "ddp_encode_$s" "$PY" -m vidgen.tools.encode_latents vae="$data/v3" data.shards="$data/$s" \
        out="$data/latents/$s" 'data.buckets=[5x32x32,9x64x64]' every_bucket=true chunked=false
done
ldata=(data.train.shards="$data/latents/train" data.val.shards="$data/latents/val" model.vae_path="$data/v3")
step ddp_dit1 "$PY" train.py experiment=demo/dit_stage1 "${ddp[@]}" "${ldata[@]}" paths.run_dir="$data/d1"
step ddp_dit2 "$PY" train.py experiment=demo/dit_stage2 "${ddp[@]}" "${ldata[@]}" paths.run_dir="$data/d2" \
    model.init_from="$data/d1"
rm -rf "$data"

step mfu "$PY" bench/bench_dit.py --device cuda --dtype bfloat16 --size 1.3B --checkpointing \
    --json "$OUT_DIR/dit.json"

step lora "$PY" bench/bench_lora.py --device cuda --size 1.3B --frames 81 --height 480 --width 832 \
    --clips 1 --text-tokens 512 --checkpointing --repeats 3 --clock wall --json "$OUT_DIR/lora.json"
step lora_memory "$PY" - "$OUT_DIR/lora.json" <<'EOF'
import json, sys

peak = json.load(open(sys.argv[1]))["rows"]["ours_lora"]["absolute_peak"]
print(f"1.3B LoRA step at 81x480x832: absolute peak {peak / 1e9:.1f} GB (target < 24 GB)")
if peak >= 24e9:
    raise SystemExit("the LoRA step needs 24 GB or more")
EOF

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if (( gpus >= 2 )); then
    cps=(2); (( gpus >= 4 )) && cps=(2 4)
    step cp "$PY" bench/bench_cp.py --device cuda --cp "${cps[@]}" --dim 1536 --heads 12 --layers 4 \
        --tokens 16384 32768 65536 --json "$OUT_DIR/cp.json"
else
    echo "cp skipped: context parallelism needs 2 or more GPUs, this machine has $gpus" | tee -a "$OUT_DIR/summary.txt"
fi

cat "$OUT_DIR/summary.txt"
exit $failed
