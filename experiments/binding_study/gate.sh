#!/usr/bin/env bash
# The learnability gate's variants, each to 20k steps, validated on the dev half every 1000
# steps (val/wino_binding, val/wino_group in each run's metrics.csv). Meant for a GPU:
#   bash experiments/binding_study/gate.sh trainer=gpu
# On this project's 2-core CPU one variant runs at about 1-2 steps/s (3-6 hours for 20k).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="experiments/binding_study/runs/gate"
common=(experiment=binding_pilot train.max_steps=20000 eval.val_every_n_steps=1000 eval.test=false "$@")
run() { local name=$1; shift; [ -f "$out/$name/results.json" ] || python train.py "${common[@]}" "$@" "run_dir=$out/$name"; }
run base                                                            # the recipe as it stands
run layers4      model.config.num_hidden_layers=4 module.align_weight=0
run focus        "module.mlm_focus=[left,right,above,below]"         # relation words always masked
run focus_l4     "module.mlm_focus=[left,right,above,below]" model.config.num_hidden_layers=4
run hard_only    data.p_hard=1.0 module.num_negatives=7
run simple_world data.synthetic.max_objects=2 data.synthetic.max_distractors=1 "module.mlm_focus=[left,right,above,below]"   # another world: its own held-out set
for d in "$out"/*/; do
  python - "$d" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1] + "metrics.csv")) if r.get("val/wino_binding")]
print(sys.argv[1], " ".join(f"{int(r['step']) + 1}:{float(r['val/wino_binding']):.1f}/{float(r['val/wino_group']):.1f}" for r in rows))
PY
done
