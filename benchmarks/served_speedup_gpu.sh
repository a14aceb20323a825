#!/usr/bin/env bash
# What the target's own answers buy, served: stage 1 regenerates ShareGPT with vLLM on the GPU, stages 2 and 3
# train drafts on it, and vLLM serves them (benchmarks/RESULTS.md, "Served speedup"). One GPU; three phases, each
# resumable and each a separate command (run them back to back on the same machine):
#
#   bash benchmarks/served_speedup_gpu.sh sample   # stage 1: whole ShareGPT greedy + first 4,420 sampled (T=0.7)
#   bash benchmarks/served_speedup_gpu.sh train    # stages 2 + 3: whole-set regenerated draft and the 4,420 trio,
#                                                  # the trio served (k=3) while the whole-set draft trains
#   bash benchmarks/served_speedup_gpu.sh serve    # make bench-serve: the speedup table of the whole-set draft
#
# Every conversation is cut at CUT tokens (stage 1 stops where stage 2 cuts: sample.max_conversation_tokens), at
# most 1,024 new tokens a turn. The 4,420 trio is one equal-budget comparison on the same conversations (the ids
# all three sets hold): regenerated greedily (a subset of the whole-set pass), regenerated with sampling, and the
# original ShareGPT answers; each trained with the 4,420 recipe (conf/preset/sharegpt_4420.yaml, 1 epoch, lr 1.6e-3).
#
# Variables [defaults]: RUN work folder [data/served_speedup], OUT results [$RUN/results], PY [python3],
#   CUT [1024], REPLICAS (stage-1 vLLM servers for the whole set) [3], SAMPLED (1: the sampled 4,420 too) [1],
#   GREEDY_RECORDS (first N records for the greedy pass; null = the whole set) [null], FULL (1: train the draft on
#   the whole greedy pass; 0: the trio only) [1], SERVE_DRAFT (the draft of the speedup table: full | trio-greedy
#   | ...) [full], SERVE_TRIO (1: serve the trio at k=3 in the train phase) [1], SAMPLE_TIMEOUT [seconds; stage 1 stops and
#   a rerun resumes] [480], FULL_LRS ["2e-3"], FULL_EPOCHS [1], KS (served k sweep) ["3 1 2 4 5"], CONCURRENCY
#   ["1,2,4,8,16,32,64"], NUM_PROMPTS [80], STORAGE (stage-2 shards) [float8_e4m3: the whole set and the trio fit
#   the disk together].
set -euo pipefail
MODE=${1:?sample | train | serve}
RUN=${RUN:-data/served_speedup}
OUT=${OUT:-$RUN/results}
PY=${PY:-python3}
CUT=${CUT:-1024}
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ROOT=$PWD/data
T0=$(date +%s)
phase() { echo "[speedup +$(( $(date +%s) - T0 ))s] $*"; }

# stage1 NAME ARGS...: one stage-1 pass into $RUN/sample-NAME (resumed when it exists), log in $OUT/stage1-NAME.log
stage1() {
  local name=$1; shift
  timeout --signal=INT ${SAMPLE_TIMEOUT:-480} $PY -m stage1_sample root=$ROOT sample.input=wheel:sharegpt \
    sample.output=$PWD/$RUN/sample-$name sample.max_tokens=1024 sample.max_conversation_tokens=$CUT \
    sample.advanced.rows_per_shard=2000 "$@" > "$OUT/stage1-$name.log" 2>&1 || echo "stage 1 $name: exit $? (rerun resumes)"
  grep -E "conversations|tok/s" "$OUT/stage1-$name.log" | tail -n 3 || tail -n 20 "$OUT/stage1-$name.log"
}

case $MODE in
sample)
  # Stage 1's own CLI with the launched vLLM: the whole set greedily on REPLICAS servers side by side, and the
  # first 4,420 records with sampling on one more; each server takes 0.2 of the card.
  phase "stage 1: whole set greedy (${REPLICAS:-3} servers) + first 4,420 at T=0.7 (1 server), cut at $CUT"
  stage1 greedy sample.temperature=0 sample.num_prompts=${GREEDY_RECORDS:-null} sample.concurrency=$(( 256 * ${REPLICAS:-3} )) \
    sample.server.replicas=${REPLICAS:-3} sample.server.gpu_memory_utilization=0.2 &
  [ "${SAMPLED:-1}" = 1 ] && stage1 t07 sample.temperature=0.7 sample.num_prompts=4420 sample.concurrency=256 \
    sample.server.gpu_memory_utilization=0.2 &
  wait
  for s in greedy t07; do cp "$RUN/sample-$s/manifest.json" "$OUT/stage1-$s-manifest.json" 2>/dev/null || true; done
  phase "done" ;;

train)
  # The equal-budget inputs: the conversations all three 4,420 sets hold, as JSONL (the regenerated ones keep the
  # server's token ids, which stage 2 uses).
  $PY - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
from stage1_sample.formats import Conversation, load_conversations
run = Path(sys.argv[1])
first = [c for c in load_conversations("wheel:sharegpt", limit=4420) if isinstance(c, Conversation)]
sets = {name: {c.id: c for c in load_conversations(run / f"sample-{name}") if isinstance(c, Conversation)}
        for name in ("greedy", "t07") if (run / f"sample-{name}" / "manifest.json").is_file()}
sets["original"] = {c.id: c for c in first}
ids = [c.id for c in first if all(c.id in s for s in sets.values())]
for name, convs in sets.items():
    with open(run / f"trio-{name}.jsonl", "w") as f:
        f.writelines(json.dumps(convs[i].to_json()) + "\n" for i in ids)
print(f"equal budget: {len(ids)} conversations of the first 4,420 records in every set "
      f"({', '.join(f'{name} {len(convs)}' for name, convs in sets.items())})")
EOF
  phase "stages 2 + 3: whole-set greedy draft (lr ${FULL_LRS:-2e-3}, ${FULL_EPOCHS:-1} epochs) and the 4,420 trio"
  if [ "${FULL:-1}" = 1 ]; then
    INPUT=$PWD/$RUN/sample-greedy RUN=$PWD/$RUN/full OUT=$OUT/full LRS=${FULL_LRS:-2e-3} EPOCHS=${FULL_EPOCHS:-1} \
      EVAL_PROMPTS=0 NPROC2=4 FULL_MAXLEN=$CUT STORAGE=${STORAGE:-float8_e4m3} PY=$PY \
      bash benchmarks/acceptance_gpu.sh fullset-train > "$OUT/train-full.log" 2>&1 &
  fi
  TRIO=()
  for SET in greedy t07 original; do
    [ -f "$RUN/trio-$SET.jsonl" ] || continue
    INPUT=$PWD/$RUN/trio-$SET.jsonl RUN=$PWD/$RUN/trio-$SET OUT=$OUT/trio-$SET LRS=1.6e-3 CUT=$CUT EVAL_PROMPTS=0 \
      NPROC2=2 STORAGE=${STORAGE:-float8_e4m3} PY=$PY bash benchmarks/acceptance_gpu.sh full \
      > "$OUT/train-trio-$SET.log" 2>&1 &
    TRIO+=($!)
  done
  FAIL=0; for j in "${TRIO[@]}"; do wait $j || FAIL=1; done   # the trio (the whole set trains on)
  # The trio served (acceptance only, k=3, one small server each) while the whole-set draft still trains: served
  # acceptance does not depend on the GPU's load, only the tokens/s would.
  for SET in greedy t07 original; do
    [ -f "$OUT/trio-$SET/export/config.json" ] && [ "${SERVE_TRIO:-1}" = 1 ] || continue
    $PY -m evaluation.serve root=$ROOT bench.draft=$OUT/trio-$SET/export bench.output=$OUT/bench-trio-$SET \
      bench.baseline=false bench.num_speculative_tokens=[3] bench.concurrency=[16] bench.num_prompts=${NUM_PROMPTS:-80} \
      bench.max_tokens=256 bench.gpu_memory_utilization=0.1 > "$OUT/bench-trio-$SET.log" 2>&1 &
  done
  for j in $(jobs -p); do wait $j || FAIL=1; done
  for SET in greedy t07 original; do echo "== trio-$SET"; cat "$OUT/bench-trio-$SET/bench_serve.md" 2>/dev/null ||
    tail -n 20 "$OUT/bench-trio-$SET.log"; done
  for f in "$OUT"/train-*.log; do echo "== $f"; grep -E "rows |val |stage 3:|^[0-9a-f]{64}" "$f" || tail -n 20 "$f"; done
  phase "done"; exit $FAIL ;;

serve)
  # The speedup table for the whole-set draft: baseline + one server per k, started together, measured in turn.
  KS=${KS:-"3 1 2 4 5"}   # k=3 first: a run stopped early still has the baseline and k=3
  phase "bench-serve: ${SERVE_DRAFT:-full} draft, k in [$KS], concurrency [${CONCURRENCY:-1,2,4,8,16,32,64}]"
  $PY -m evaluation.serve root=$ROOT bench.draft=$OUT/${SERVE_DRAFT:-full}/export bench.output=$OUT/bench-full \
    bench.num_speculative_tokens=[${KS// /,}] bench.concurrency=[${CONCURRENCY:-1,2,4,8,16,32,64}] \
    bench.num_prompts=${NUM_PROMPTS:-80} bench.max_tokens=256 > "$OUT/bench-full.log" 2>&1 || tail -n 40 "$OUT/bench-full.log"
  cat "$OUT/bench-full/bench_serve.md" 2>/dev/null || true
  phase "done" ;;
*) echo "unknown mode $MODE"; exit 2 ;;
esac
