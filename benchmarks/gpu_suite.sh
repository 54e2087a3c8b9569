#!/usr/bin/env bash
# Every GPU figure the README quotes, in one run on one card: the CUDA tests, then the training
# loop's throughput at the papers' settings, eager and graph-replayed, and (with BASELINE_SRC, an
# older checkout's src folder) the older loop side by side; then several jobs sharing the card.
#   OUT=gpu-results bash benchmarks/gpu_suite.sh [tests|throughput|share|all]
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
fi
[[ $what == tests ]] && exit 0
T=benchmarks/throughput.py
row() {  # label loop(base|new) args...
  local label=$1 loop=$2; shift 2
  if [[ $loop == base ]]; then
    [[ -n ${BASELINE_SRC:-} ]] || return 0
    PYTHONPATH=$BASELINE_SRC python3 $T --label "$label" "$@"
  else
    python3 $T --label "$label" "$@"
  fi 2>&1 | tee -a "$OUT/throughput.log" | grep '^{' >> "$OUT/throughput.jsonl"
}
R50="--model resnet50 --image-size 32 --batch-size 128 --n-train 25600 --epochs 2 --augment crop_flip"
if [[ $what == share ]]; then
  # Jobs sharing the card start their steady epochs together; 1 vs N of the same job.
  SH="--model resnet50 --image-size 32 --batch-size 128 --n-train 12800 --epochs 4 --augment crop_flip"
  SMALL="--model smallcnn --image-size 16 --batch-size 128 --n-train 25600 --epochs 4 --augment crop_flip"
  for g in on off; do
    for p in 1 4; do row "share-r50-32-graphs-$g" new $SH --graphs $g --processes $p; done
  done
  for p in 1 8; do row share-smallcnn-16 new $SMALL --graphs on --processes $p; done
  exit 0
fi
# In order of importance (a short lease may end the run early; every row is appended as it ends).
R18="--model resnet18 --image-size 32 --batch-size 512 --n-train 51200 --epochs 2 --augment crop_flip"
IMN="--model resnet50 --image-size 224 --batch-size 128 --n-train 3200 --epochs 2 --augment resized_crop_flip"
row r50-32-train base $R50
row r50-32-train new $R50 --graphs on
row r50-32-train new $R50 --graphs off
row r18-32-b512 base $R18
row r18-32-b512 new $R18 --graphs on
row r50-224 base $IMN
row r50-224 new $IMN --graphs on
row r50-32-share4 new $R50 --n-train 12800 --graphs on --processes 4
row r50-32-pretrain base $R50 --augment none --record eval
row r50-32-pretrain new $R50 --augment none --record eval --graphs on
row r50-32-share4 new $R50 --n-train 12800 --graphs off --processes 4
row r50-32-train-fp32 new $R50 --graphs on --precision fp32
row r18-32-b512 new $R18 --graphs off
