#!/usr/bin/env bash
# The synthetic study: 4 losses x 3 seeds (a Hydra multirun, jobs one after another), then the report.
#   bash experiments/synthetic_study/run.sh [extra overrides, e.g. train.max_steps=300]
set -euo pipefail
cd "$(dirname "$0")/../.."
sweep="multirun/synthetic_study/$(date +%Y-%m-%d_%H-%M-%S)"
python train.py -m experiment=synthetic_study loss=none,iais_singular,iais_distributed,cacr seed=0,1,2 \
    "hydra.sweep.dir=$sweep" "$@"
python experiments/synthetic_study/report.py "$sweep"
