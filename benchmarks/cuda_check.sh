#!/bin/bash
# The CUDA paths, checked and timed on one GPU in one short run (docs/benchmarks.md, "On a GPU"):
# the CUDA-only tests, bf16 against fp32 (benchmarks/precision.py), selfsight pretrain on cuda (bf16 and fp32,
# channels_last on and off for a CNN), NCCL across 2 processes, the FD finding (benchmarks/fd_finding.py) with
# what is left of the time but RESERVE_S, then torch.compile. Each stage has its own time limit and writes
# into W; the last step packs W into OUT/cuda_check.tgz (checkpoints left out).
#   FMNIST=/path/to/fashion-mnist OUT=/tmp/out DEADLINE_S=540 bash benchmarks/cuda_check.sh
set -u
PY=${PY:-python3}
DEV=${DEV:-cuda}  # DEV=cpu STEPS=3 FD_ARGS="--draws 1 --epochs 1" FD_MINUTES=0.05: a dry run of the script itself
STEPS=${STEPS:-300}
F=${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/cuda_check_out}
W=${W:-runs/cuda_check}
END=$(( $(date +%s) + ${DEADLINE_S:-540} ))
mkdir -p "$OUT" "$W"
left() { echo $(( END - $(date +%s) )); }
stage() {  # stage NAME LIMIT_S command...: runs when time is left, logs into W/NAME.log
  local name=$1 limit=$2; shift 2
  local budget=$(( $(left) - 30 )); (( budget < limit )) && limit=$budget
  if (( limit < 20 )); then echo "SKIPPED $name (no time left)" | tee -a "$W/summary.txt"; return; fi
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$W/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc, $(( $(date +%s) - t0 )) s (limit $limit)" | tee -a "$W/summary.txt"
}
rate() {  # steady img/s of a run: the median of metrics.jsonl's img_per_s over its second half
  $PY - "$1" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"img_per_s"' in l]
half = [r["img_per_s"] for r in recs[len(recs) // 2:]]
print(f"{sys.argv[1]}: {statistics.median(half):.0f} img/s (median of {len(half)} records), step {recs[-1]['step']}")
PY
}
CNN="--method spark --backbone resnet18 --backbone-opt in_chans=1 --backbone-opt img_size=32 \
 --backbone-opt channels=32,64,128,256 --backbone-opt layers=1,1,1,1 --backbone-opt output_stride=8"
VIT="--method simmim --backbone vit_tiny_patch16_224 --backbone-opt img_size=28 --backbone-opt patch_size=4 \
 --backbone-opt in_chans=1 --backbone-opt embed_dim=128 --backbone-opt depth=6 --backbone-opt num_heads=4"
P="$PY -m selfsight pretrain --data $F:train --device $DEV --no-progress --log-every 10"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, timm; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'timm', timm.__version__)"; \
nproc; } > "$W/env.txt" 2>&1
stage pytest_cuda 120 $PY -m pytest -q -p no:cacheprovider tests/test_views.py -k cuda
stage precision 75 $PY benchmarks/precision.py --device $DEV --models demo_vit narrow_resnet18 resnet50_224 \
  vit_small_224 --rounds 2 --steps 10 --out "$W/precision.json"
stage cnn_bf16 60 $P $CNN --steps $STEPS --precision bf16 --out "$W/cnn_bf16"
stage cnn_fp32 60 $P $CNN --steps $STEPS --precision fp32 --out "$W/cnn_fp32"
stage cnn_bf16_contiguous 60 $P $CNN --steps $STEPS --precision bf16 --out "$W/cnn_bf16_contiguous" channels_last=false
stage vit_bf16 60 $P $VIT --steps $STEPS --precision bf16 --out "$W/vit_bf16"
stage vit_fp32 60 $P $VIT --steps $STEPS --precision fp32 --out "$W/vit_fp32"
stage ddp_nccl_2 90 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m selfsight pretrain \
  --data $F:train --device $DEV:0 --no-progress $CNN --steps $(( STEPS / 5 + 1 )) --out "$W/ddp_nccl_2"
# the FD finding leaves RESERVE_S for the two compiled runs
stage fd_finding $(( $(left) - ${RESERVE_S:-200} )) $PY benchmarks/fd_finding.py --minutes "${FD_MINUTES:-1}" \
  --device $DEV ${FD_ARGS:---draws 5} --data-dir "$F" --out "$W/fd"
stage cnn_bf16_compile 100 $P $CNN --steps $STEPS --precision bf16 --compile --out "$W/cnn_bf16_compile"
stage vit_bf16_compile 100 $P $VIT --steps $STEPS --precision bf16 --compile --out "$W/vit_bf16_compile"
for run in cnn_bf16 cnn_fp32 cnn_bf16_contiguous cnn_bf16_compile vit_bf16 vit_fp32 vit_bf16_compile ddp_nccl_2; do
  [ -f "$W/$run/metrics.jsonl" ] && rate "$W/$run"; done >> "$W/summary.txt" 2>&1
cat "$W/summary.txt"
tar czf "$OUT/cuda_check.tgz" --exclude='checkpoints' --exclude='*.pt' "$W"
