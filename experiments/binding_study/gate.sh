#!/usr/bin/env bash
# The learnability gate's variants, each to 20k steps, validated on the dev half every 1000
# steps (val/wino_binding, val/wino_group in each run's metrics.csv). Meant for a GPU:
#   bash experiments/binding_study/gate.sh trainer=gpu
# On this project's 2-core CPU one variant runs at about 1-2 steps/s (3-6 hours for 20k).
# GATE_PARALLEL=1 starts all chosen variants at once (a GPU has room for six tiny models; each
# logs to <variant>.log beside its run directory) and waits for them.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="experiments/binding_study/runs/gate"
common=(experiment=binding_pilot train.max_steps=20000 eval.val_every_n_steps=1000 eval.test=false "$@")
# GATE_VARIANTS="focus_l4 simple_world" runs only those. A variant stopped part-way (killed, machine
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
run base                                                            # the recipe as it stands
run layers4      model.config.num_hidden_layers=4 module.align_weight=0
run focus        "module.mlm_focus=[left,right,above,below]"         # relation words always masked
run focus_l4     "module.mlm_focus=[left,right,above,below]" model.config.num_hidden_layers=4
run hard_only    data.p_hard=1.0 module.num_negatives=7
run uniter_l4    "module.mlm_focus=[left,right,above,below]" model.config.num_hidden_layers=4 module.mrfr_weight=1.0 module.wra_weight=1.0   # all of UNITER's pre-training objectives (MLM, MRFR, WRA) + ITM vs hard negatives
# Absolute-position captions ("a red mug is left", up to 5 per training image) beside the
# relational ones, relation and position words always masked, on a 10x larger world (20k training
# images, so captions are rarely repeated), hard negatives only: experiments/binding_study/probe.py
# found that reading one grounded object's position is the step the model needs before it can
# compare two (README, "What the probe showed"; on the CPU this ran as abs3 there).
run absolute_l4  data.synthetic.absolute_captions=5 data.synthetic.n_train=20000 "module.mlm_focus=[left,right,above,below]" \
                 model.config.num_hidden_layers=4 data.p_hard=1.0 module.num_negatives=3 data.batch_size=16 module.align_weight=0
# The same, with hard negatives that hold both named objects and each relational caption's own image
# with those objects' boxes exchanged as its first image negative (the exact swap the probe ranks
# against; README, "Session 6"); swap_n1 with one negative per direction, as the probe has.
swap_args=(data.synthetic.absolute_captions=5 data.synthetic.n_train=20000 "module.mlm_focus=[left,right,above,below]" model.config.num_hidden_layers=4 data.p_hard=1.0 data.batch_size=16 module.align_weight=0 data.hard_pool=objects data.p_swap=1.0)
run swap_l4      "${swap_args[@]}" module.num_negatives=3
run swap_n1      "${swap_args[@]}" module.num_negatives=1
# A curriculum: the simplest world first (2 named objects, at most 1 distractor; same vocabulary
# and feature embeddings, since both come from the world seed), then the full world from its
# weights (the pre-training heads start afresh). Stage 2 waits for stage 1, also with GATE_PARALLEL=1.
uniter_args=("module.mlm_focus=[left,right,above,below]" model.config.num_hidden_layers=4 module.mrfr_weight=1.0 module.wra_weight=1.0)
curriculum() {
  GATE_PARALLEL=0 run curriculum_1 "${uniter_args[@]}" data.synthetic.max_objects=2 data.synthetic.max_distractors=1 train.max_steps=5000
  GATE_PARALLEL=0 run curriculum_2 "${uniter_args[@]}" "model.checkpoint=$out/curriculum_1/checkpoints/last.ckpt" train.max_steps=15000
}
if [ -z "${GATE_VARIANTS:-}" ] || [[ " $GATE_VARIANTS " == *" curriculum "* ]]; then
  if [ "${GATE_PARALLEL:-0}" = 1 ]; then mkdir -p "$out"; curriculum > "$out/curriculum.log" 2>&1 & else curriculum; fi
fi
run simple_world data.synthetic.max_objects=2 data.synthetic.max_distractors=1 "module.mlm_focus=[left,right,above,below]"   # another world: its own held-out set
wait
for d in "$out"/*/; do
  [ -f "$d/metrics.csv" ] || continue
  python - "$d" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1] + "metrics.csv")) if r.get("val/wino_binding")]
print(sys.argv[1], " ".join(f"{int(r['step']) + 1}:{float(r['val/wino_binding']):.1f}/{float(r['val/wino_group']):.1f}" for r in rows))
PY
done
