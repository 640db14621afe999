#!/usr/bin/env bash
# One prepared GPU check for a session that has one H100/H200 for <= 8 minutes (issue 15), run from the
# repository root:
#
#   bash benchmarks/gpu_check.sh PRETRAIN_DIR [--tokenizer DIR] [--dry-run]
#
# PRETRAIN_DIR holds the pretraining parquet files (the caller copies ../shared/data/pretrain, 44 MB, into
# an ignored folder that travels with the tree, e.g. carry/pretrain/). Results go to $OUT when it is set
# (the device tool's folder that comes back), else runs/gpu_check/. Steps, each under its own timeout
# (the script's budget is 450 s: the pretraining gets what the earlier steps left, 4 minutes normally):
#   1. nvidia-smi, torch / CUDA / cuDNN versions, the GPU's name and memory           (timeout  30 s)
#   2. benchmarks/throughput.py --device cuda at h768L12, vocab 30522, bf16, batch 64 x seq 512:
#      textjepa vs RobertaForMaskedLM (equal settings and HF defaults) interleaved; tokens/s, the
#      measured / analytic FLOP ratio, MFU against the measured 8192^3 bf16 matmul and against the
#      card's datasheet dense bf16 peak, peak memory per variant -> throughput.json / .md  (timeout 120 s)
#   3. a 4-minute pretraining of recipes/small.yaml on PRETRAIN_DIR (bf16, train.max_minutes=4,
#      4 loader workers); the export (raw: no whitening, fitted afterwards on the CPU), metrics.jsonl,
#      summary.json, the resolved recipe and the curves are packed into small4min.tar.gz, cut into
#      15 MiB parts (small4min.tar.gz.part-00, -01, ...) since only files of <= 16 MiB come back
#      (timeout 320 s, less when the earlier steps ran long; packing: timeout 30 s)
# --tokenizer DIR: the tokenizer for step 3 (default: the 8000-piece unigram tokenizer shipped with the
#   package; pass the corpus-trained one of the CPU runs, e.g. TOK_DIR of benchmarks/README.md, so the
#   export compares with them).
# --dry-run: the same steps, tiny and on the CPU (throughput h256L4 on a few tokens, 2 training steps),
#   to test the script without a GPU (tests/test_benchmarks.py runs it).
# Missing Python packages on the GPU machine (its image has no `datasets`): wheels in .whl/ (carried)
# are installed first, see benchmarks/README.md "GPU check".
# Back on the CPU: cat small4min.tar.gz.part-* | tar xz; then textjepa whiten --model small4min/export
#   --on '../shared/data/pretrain/*.parquet' and textjepa evaluate (benchmarks/README.md).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
PRETRAIN_DIR="" TOKENIZER="quickstart" DRY_RUN=0
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --tokenizer) TOKENIZER="${2:?--tokenizer needs a directory}"; shift ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$PRETRAIN_DIR" ]] || usage; PRETRAIN_DIR="$1" ;;
    esac
    shift
done
[[ -n "$PRETRAIN_DIR" ]] || usage
compgen -G "$PRETRAIN_DIR/*.parquet" >/dev/null || { echo "gpu_check.sh: no *.parquet in $PRETRAIN_DIR" >&2; exit 2; }
PRETRAIN_DIR="$(cd "$PRETRAIN_DIR" && pwd)"  # absolute: the script runs from the repository root
[[ ! -d "$TOKENIZER" ]] || TOKENIZER="$(cd "$TOKENIZER" && pwd)"

START=$SECONDS
BUDGET=450  # seconds for the whole script: 8 minutes less the timeouts' kill grace and a margin
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT:-$REPO/runs/gpu_check}"
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then  # checkpoints and staging stay out of $OUT
    WORK="$GPU_CHECK_WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
PYTHON="${PYTHON:-python3}"
export DRY_RUN PYTHON OUT_DIR WORK  # read by the step functions, which run in a child bash
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ -d "$REPO/.whl" ]] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    timeout 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site "$REPO"/.whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # textjepa from this tree, installed or not
FAILED=()
elapsed() { echo $((SECONDS - START)); }
# step NAME TIMEOUT_S COMMAND...: runs COMMAND under its timeout; a failure is reported, not fatal, so
# the later steps still run (the script's exit status says whether all passed)
step() {
    local name="$1" limit="$2"; shift 2
    echo; echo "=== [$(elapsed) s] $name (timeout ${limit} s)"
    local rc=0
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs it in a child bash
        timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $(declare -f "$1"); $*" || rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" || rc=$?
    fi
    if ((rc != 0)); then
        FAILED+=("$name (exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ', timed out'))")
        echo "=== $name FAILED with exit status $rc"
    fi
    echo "=== [$(elapsed) s] $name done"
}

if ((DRY_RUN)); then
    DEVICE=cpu
    # a small peak matmul: a CPU without native bf16 (AVX2 only) takes minutes for a 2048-wide bf16 one
    THROUGHPUT_ARGS=(--configs h256L4 --vocabs 512 --precisions bf16 --batch 2 --seq 64 --rounds 1 --steps 1
                     --warmup 0 --threads 1 --no-hf-default --matmul-size 256)
    TRAIN_ARGS=(--set train.max_steps=2 --set train.batch_size=4 --set log.probe_size=8 --set data.num_workers=2
                --set data.num_proc=1)
    TRAIN_MINUTES=0.5
else
    DEVICE=cuda
    THROUGHPUT_ARGS=(--configs h768L12 --vocabs 30522 --precisions bf16 --batch 64 --seq 512 --rounds 7 --steps 5
                     --warmup 3 --threads 8)
    TRAIN_ARGS=(--set data.num_workers=4 --set data.num_proc=8)
    TRAIN_MINUTES=4
fi
export DEVICE RUN_DIR="$WORK/small4min"

environment() {
    if ((DRY_RUN)); then
        echo "(dry run: no nvidia-smi)"
    else
        nvidia-smi
    fi
    "$PYTHON" - "$DEVICE" <<'EOF'
import sys, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, GPU available: {torch.cuda.is_available()}")
if sys.argv[1] == "cuda":
    props = torch.cuda.get_device_properties(0)
    print(f"device 0: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
          f"capability {props.major}.{props.minor}, bf16 supported: {torch.cuda.is_bf16_supported()}")
import importlib.metadata, importlib.util
missing = []
for module, dist in (("transformers", "transformers"), ("accelerate", "accelerate"), ("datasets", "datasets"),
                     ("tokenizers", "tokenizers"), ("safetensors", "safetensors"), ("pyarrow", "pyarrow"),
                     ("yaml", "pyyaml"), ("scipy", "scipy"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
    if importlib.util.find_spec(module) is None:
        missing.append(dist)
    else:
        print(f"  {dist} {importlib.metadata.version(dist)}")
if missing:
    sys.exit("missing Python packages: " + ", ".join(missing) + " (carry wheels in .whl/, see benchmarks/README.md)")
print(f"  textjepa from {importlib.util.find_spec('textjepa').origin}")
EOF
}
step "environment" 30 environment

step "throughput ${THROUGHPUT_ARGS[1]} textjepa vs RobertaForMaskedLM on $DEVICE" 120 \
    "$PYTHON" benchmarks/throughput.py --device "$DEVICE" "${THROUGHPUT_ARGS[@]}" \
    --json "$OUT_DIR/throughput.json" --markdown "$OUT_DIR/throughput.md"

# the pretraining gets what is left of the budget (less 35 s for packing): 4 minutes of steps + 80 s for
# setup (tokenizing the corpus) and the export, or fewer minutes when the earlier steps ran long
left=$((BUDGET - $(elapsed) - 35))
TRAIN_TIMEOUT=$(awk -v m="$TRAIN_MINUTES" 'BEGIN { printf "%d", m * 60 + 80 }')
if ((!DRY_RUN)) && ((left < TRAIN_TIMEOUT)); then
    TRAIN_TIMEOUT=$((left > 110 ? left : 110))
    TRAIN_MINUTES=$(awk -v s="$TRAIN_TIMEOUT" 'BEGIN { printf "%.2f", (s - 80) / 60 }')
    echo "only ${left} s left for the pretraining: train.max_minutes=$TRAIN_MINUTES instead of 4"
fi
step "pretraining recipes/small.yaml for ${TRAIN_MINUTES} min" "$TRAIN_TIMEOUT" \
    "$PYTHON" -m textjepa.train --recipe recipes/small.yaml \
    --set "data.source=$PRETRAIN_DIR/*.parquet" --set "data.tokenizer=$TOKENIZER" \
    --set "train.output_dir=$RUN_DIR" --set train.overwrite=true --set train.mixed_precision=bf16 \
    --set "train.max_minutes=$TRAIN_MINUTES" --set train.export_whiten_on=null \
    --set log.progress_bar=false --set log.sanity_check=false --set "log.trackers=[jsonl]" \
    "${TRAIN_ARGS[@]}"

pack() {  # the run's small files into $OUT, in parts of <= 15 MiB (the device tool brings back <= 16 MiB a file)
    local staging="$WORK/pack/small4min"
    rm -rf "$WORK/pack"; mkdir -p "$staging"
    [[ -d "$RUN_DIR/export" ]] && cp -r "$RUN_DIR/export" "$staging/"
    for f in metrics.jsonl summary.json recipe.yaml training_curves.png; do
        [[ -f "$RUN_DIR/$f" ]] && cp "$RUN_DIR/$f" "$staging/"
    done
    tar -C "$WORK/pack" -czf - small4min | split -b 15M -d -a 2 - "$OUT_DIR/small4min.tar.gz.part-"
    ls -l "$OUT_DIR"
    [[ -d "$RUN_DIR/export" ]] || { echo "no export in $RUN_DIR"; return 1; }
    "$PYTHON" - "$RUN_DIR/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
final = s.get("final_metrics") or {}
print(f"pretraining: {s['steps']} steps ({s['end_reason']}), {s['tokens_seen'] / 1e6:.1f} M tokens in "
      f"{s['elapsed_s']:.0f} s, mean {s.get('tokens_per_s_mean') or 0:.0f} tokens/s; final loss "
      f"{final.get('loss')}, effective rank {final.get('effective_rank')}")
EOF
}
step "pack the pretraining run" 30 pack

echo
echo "=== throughput (also in $OUT_DIR/throughput.md)"
cat "$OUT_DIR/throughput.md" 2>/dev/null || echo "(no throughput table)"
echo "=== gpu_check.sh done in $(elapsed) s; results in $OUT_DIR"
if ((${#FAILED[@]})); then
    printf '=== FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
