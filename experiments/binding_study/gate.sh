#!/usr/bin/env bash
# The learnability gate's recipe (experiment=binding_pilot) and its variants, each to 20k steps,
# validated on the dev half every 1000 steps (val/wino_binding, val/wino_group in each run's
# metrics.csv). Meant for a GPU:
#   bash experiments/binding_study/gate.sh trainer=gpu
# On this project's 2-core CPU one variant runs at about 0.5 steps/s (11 hours for 20k; the recipe
# binds by step ~1500). Runs before session 6 (another binding_pilot) are in runs/gate/.
# GATE_PARALLEL=1 starts all chosen variants at once (a GPU has room for six tiny models; each
# logs to <variant>.log beside its run directory) and waits for them.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="experiments/binding_study/runs/gate_v2"
common=(experiment=binding_pilot train.max_steps=20000 eval.val_every_n_steps=1000 eval.test=false "$@")
# GATE_VARIANTS="swap_n1 simple_world" runs only those. A variant stopped part-way (killed, machine
# returned) resumes from its last checkpoint (saved at every validation) when the script runs again.
run() {
  local name=$1; shift
  if [ -n "${GATE_VARIANTS:-}" ] && [[ " $GATE_VARIANTS " != *" $name "* ]] && [[ " $GATE_VARIANTS " != *" ${name%_[12]} "* ]]; then return 0; fi
  local dir="$out/$name"
  if [ -f "$dir/results.json" ]; then return 0; fi
  local resume=()
  if [ -f "$dir/checkpoints/last.ckpt" ]; then resume=("ckpt_path=$dir/checkpoints/last.ckpt"); fi
  if [ "${GATE_PARALLEL:-0}" = 1 ]; then
    mkdir -p "$out"
    python train.py "${common[@]}" "$@" "run_dir=$dir" "${resume[@]}" > "$out/$name.log" 2>&1 &
  else
    python train.py "${common[@]}" "$@" "run_dir=$dir" "${resume[@]}"
  fi
}
run base                                                            # the recipe (binding_pilot): binds by step ~1500 on a CPU
run swap_n1      module.num_negatives=1                             # one negative per direction, as probe.py has
run absolute_l4  data.hard_pool=bag data.p_swap=0.0                 # session 5's recipe: no box swaps, the wider hard pool
run objects_l4   data.p_swap=0.0                                    # hard negatives with both named objects, no box swaps
run no_absolute  data.synthetic.absolute_captions=0                 # without the position captions (the probe: never binds)
run uniter_l4    module.mrfr_weight=1.0 module.wra_weight=1.0       # + UNITER's MRFR and WRA
# A curriculum: the simplest world first (2 named objects, at most 1 distractor; same vocabulary
# and feature embeddings, since both come from the world seed), then the full world from its
# weights (the pre-training heads start afresh). Stage 2 waits for stage 1, also with GATE_PARALLEL=1.
curriculum() {
  GATE_PARALLEL=0 run curriculum_1 data.synthetic.max_objects=2 data.synthetic.max_distractors=1 train.max_steps=5000
  GATE_PARALLEL=0 run curriculum_2 "model.checkpoint=$out/curriculum_1/checkpoints/last.ckpt" train.max_steps=15000
}
if [ -z "${GATE_VARIANTS:-}" ] || [[ " $GATE_VARIANTS " == *" curriculum "* ]]; then
  if [ "${GATE_PARALLEL:-0}" = 1 ]; then mkdir -p "$out"; curriculum > "$out/curriculum.log" 2>&1 & else curriculum; fi
fi
run simple_world data.synthetic.max_objects=2 data.synthetic.max_distractors=1   # another world: its own held-out set
wait
for d in "$out"/*/; do
  [ -f "$d/metrics.csv" ] || continue
  python - "$d" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1] + "metrics.csv")) if r.get("val/wino_binding")]
print(sys.argv[1], " ".join(f"{int(r['step']) + 1}:{float(r['val/wino_binding']):.1f}/{float(r['val/wino_group']):.1f}" for r in rows))
PY
done
