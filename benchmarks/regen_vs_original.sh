#!/usr/bin/env bash
# What the target's own answers buy, at equal budget: the same conversations once with stage 1's regenerated answers
# and once with their original answers, each through `acceptance_gpu.sh full` (stage 2 at <= 2,048 tokens,
# truncated; stage 3 for one epoch at lr 1.6e-3: the recipe of the 1.534 draft), both side by side on one GPU.
# Serve the two exports in one serving run afterwards (`make bench-serve`, benchmarks/RESULTS.md "Stage 1").
#
#   STAGE1=data/sample/smollm2-135m ORIGINAL=sharegpt_first4420.jsonl.gz OUT=/tmp/rvo bash benchmarks/regen_vs_original.sh
#
#   STAGE1    a finished stage-1 output folder (its manifest.json lists the shards)
#   ORIGINAL  the input stage 1 read (a .json/.jsonl[.gz] file of records with ids)
#   OUT       results: <set>/export, <set>/logs.tgz, <set>.log, original.ids [/tmp/regen_vs_original]
#   RUN       work folder [data/regen_vs_original]; LRS [1.6e-3]; NPROC2 (stage-2 ranks per set) [2]; PY [python3]
set -euo pipefail
: "${STAGE1:?a finished stage-1 output folder}" "${ORIGINAL:?the input file stage 1 read}"
OUT=${OUT:-/tmp/regen_vs_original}
RUN=${RUN:-data/regen_vs_original}
PY=${PY:-python3}
mkdir -p "$OUT" "$RUN"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# The original records of exactly the conversations stage 1 wrote (its skipped and failed ones left out of both).
$PY - "$STAGE1" "$ORIGINAL" "$RUN/original.jsonl" <<'EOF'
import json, sys
from stage1_sample.formats import Conversation, load_conversations
stage1, original, out = sys.argv[1:]
# a stage-1 folder is read through its manifest (refused, with how to resume it, when the pass has not finished);
# the original records go through the same reader, so their ids (and duplicate rule) are the ones stage 1 used
ids = {c.id for c in load_conversations(stage1) if isinstance(c, Conversation)}
kept = [c for c in load_conversations(original) if isinstance(c, Conversation) and c.id in ids]
with open(out, "w") as f:
    f.writelines(json.dumps(c.to_json()) + "\n" for c in kept)
if len(kept) != len(ids):
    sys.exit(f"{original} has {len(kept)} of the {len(ids)} conversations in {stage1}: not the input stage 1 read")
print(f"{len(kept)} conversations: regenerated ({stage1}) and original ({out})")
EOF

for SET in regenerated original; do
  INPUT=$STAGE1; [ $SET = original ] && INPUT=$RUN/original.jsonl
  INPUT=$INPUT RUN=$PWD/$RUN/$SET OUT=$OUT/$SET LRS=${LRS:-1.6e-3} EVAL_PROMPTS=0 NPROC2=${NPROC2:-2} PY=$PY \
    bash benchmarks/acceptance_gpu.sh full > "$OUT/$SET.log" 2>&1 &
done
FAIL=0; for j in $(jobs -p); do wait $j || FAIL=1; done
for SET in regenerated original; do echo "== $SET"; grep -E "rows |val |sha256|^[0-9a-f]{64}" "$OUT/$SET.log" || tail -n 20 "$OUT/$SET.log"; done
exit $FAIL
