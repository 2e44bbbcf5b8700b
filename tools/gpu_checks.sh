#!/usr/bin/env bash
# The GPU checks of issues 7, 9 and 10 as one prepared run, for a session that is lent a
# GPU machine for a few minutes (it has PyTorch but not our data or our venv).
#
# Here, once per session (copies the data into git-ignored folders that travel):
#     bash tools/gpu_checks.sh --stage
# On the GPU machine (the device tool's `run`, carry [".fmnist", ".fsdd"]):
#     bash tools/gpu_checks.sh tests bench protocol latency     # or any of the sections
#
# Sections (each bounded by its own timeout, so one slow part leaves the others' output):
#   tests     tests/gnp/test_cuda.py: every model and update kind on CUDA, compiled training
#             (CUDA graphs included) equal to eager                              (~1 min)
#   bench     python -m gnp.bench on CUDA: the trainer against a DataLoader loop, eager
#             against torch.compile (default, reduce-overhead = CUDA graphs); then the
#             paper's LeNet-5, contiguous against channels-last convolutions  (~3 min)
#   protocol  the 3-method LeNet-300-100 protocol on the full Fashion-MNIST, seed 0, and
#             its wall time (issue 7's target: under 3 minutes on one H100)
#   lenet5    the same for the paper's LeNet-5 (issue 7's missing full-data run)
#   speech    the speech protocol over all 10 chunks, seed $SPEECH_SEED (issue 9)
#   latency   inference latency of the protocol's saved models on the GPU (issue 10)
#   resnet    ResNet-18, ours and cgap against TFS, on an 11K subset (10 chunks of 1K,
#             the --quick schedule, pruning steps of 25% at most 8 per update, every method
#             alike), then the latency of its exports on the GPU (issue 10)
# Results go to $OUT (the device tool's folder that comes back; ./gpu-out elsewhere).
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--stage" ]]; then
    src=${GNP_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
    mkdir -p .fmnist .fsdd
    cp -u "$src"/*.gz .fmnist/
    cp -u ../shared/data/fsdd/*.wav .fsdd/ 2>/dev/null || echo "no ../shared/data/fsdd: speech stays out"
    du -sh .fmnist .fsdd
    exit 0
fi

SECTIONS=" tests bench protocol lenet5 speech latency resnet "
[[ $# -gt 0 ]] || { echo "usage: $0 --stage | SECTION... ($(echo $SECTIONS))" >&2; exit 2; }
for section in "$@"; do
    [[ "$SECTIONS" == *" $section "* ]] || {
        echo "unknown section '$section' ($(echo $SECTIONS))" >&2; exit 2; }
done

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD GNP_FASHION_MNIST_DIR=$PWD/.fmnist
PY=${PY:-python3}
SPEECH_SEED=${SPEECH_SEED:-2}
log="$OUT/gpu_checks.log"

timed() {  # timed SECONDS NAME command...: run it with a bound, log its wall time and status
    local limit=$1 name=$2 start rc
    shift 2
    start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -i "warning" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    printf '%s: exit %s, wall %d s\n' "$name" "$rc" "$((SECONDS - start))" \
        | tee -a "$log" "$OUT/wall_times.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$log"

for section in "$@"; do
    case "$section" in
        tests) timed 300 tests $PY -m pytest -q -p no:cacheprovider tests/gnp/test_cuda.py ;;
        bench) timed 240 bench $PY -m gnp.bench --device cuda --out "$OUT"
            timed 120 bench-lenet5 $PY -m gnp.bench --device cuda --model lenet-5 \
                --compile none --out "$OUT" ;;
        protocol) timed 420 protocol $PY -m gnp.experiments --model lenet-300-100 \
            --dataset fashion-mnist --chunks 10 --methods ours,tfs,nft --compact --save-models \
            --device cuda --seeds 0 --no-progress --out "$OUT/protocol" ;;
        lenet5) timed 540 lenet5 $PY -m gnp.experiments --model lenet-5 --dataset fashion-mnist \
            --chunks 10 --methods ours,tfs,nft --compact --device cuda --seeds 0 --no-progress \
            --out "$OUT/lenet5" ;;
        speech) timed 540 speech $PY -m gnp.experiments --model deepspeech2-hlstm --dataset fsdd \
            --data-dir .fsdd --chunks 10 --methods ours,tfs,nft --device cuda \
            --seeds "$SPEECH_SEED" --no-progress --out "$OUT/speech" ;;
        latency) timed 180 latency $PY benchmarks/inference_latency.py --device cuda \
            --models "$OUT/protocol/models" --out "$OUT/inference_latency_cuda" ;;
        resnet) timed 420 resnet $PY -m gnp.experiments --model resnet-18 --dataset fashion-mnist \
            --train-size 11000 --val-size 1000 --chunks 10 --quick --prune-beta 25 --prune-steps 8 \
            --methods ours,cgap,tfs --save-models --device cuda --seeds 0 --no-progress \
            --out "$OUT/resnet18"
            timed 120 resnet-latency $PY benchmarks/inference_latency.py --device cuda \
                --model resnet-18 --rounds 11 --budget-s 4 --threads 2 \
                --models "$OUT/resnet18/models" --out "$OUT/inference_latency_resnet18_cuda" ;;
    esac
done
