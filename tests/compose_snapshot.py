"""The resolved training configs of the documented commands, as a snapshot.

The config groups inherit (``conf/trainer/default.yaml``, ``conf/loss/base.yaml``,
``conf/experiment/base/*.yaml``). Refactoring them must not change what any command
composes: ``tests/test_config_inheritance.py`` composes every command below and compares it
with ``tests/fixtures/composed_configs.json``. A deliberate change of a config value
regenerates the snapshot, and its diff is the review::

    python -m tests.compose_snapshot --write     # then: git diff tests/fixtures/composed_configs.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "fixtures" / "composed_configs.json"

LOSSES = ["none", "cacr", "iais_singular", "iais_distributed"]
TRAINERS = ["cpu", "gpu", "ddp", "ddp_cpu"]
EXPERIMENTS = ["cacr_base", "cacr_large", "iais_base_singular", "iais_base_distributed",
               "iais_large_singular", "iais_large_distributed", "uniter_base", "uniter_large",
               "synthetic_study", "binding_pilot", "binding_pretrain", "binding_finetune", "binding_acquire"]


def commands() -> List[List[str]]:
    """Override lists: the README's commands, every option of the inheriting groups, every experiment."""
    cmds: List[List[str]] = [
        [],
        ["loss=iais_singular", "seed=1"],
        ["loss.weight=0.5", "loss.schedule=linear"],
        ["logger=wandb", "logger.project=cacr"],
        ["trainer=ddp", "trainer.devices=4"],
        ["trainer=gpu", "data.batch_size=8"],
        ["recipe=none"],
        ["data=flickr30k"],
    ]
    cmds += [[f"loss={loss}"] for loss in LOSSES]
    cmds += [[f"trainer={trainer}"] for trainer in TRAINERS]
    cmds += [[f"experiment={exp}"] for exp in EXPERIMENTS]
    cmds += [["experiment=cacr_base", "trainer.devices=2", "loss=none"],
             ["experiment=binding_finetune", "loss=cacr", "loss.weight=0.33", "seed=3"],
             ["experiment=synthetic_study", "loss=iais_distributed", "seed=2"]]
    return cmds


def key(overrides: List[str]) -> str:
    return " ".join(overrides) or "(default)"


def compose_all() -> Dict[str, dict]:
    out = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for overrides in commands():
            cfg = compose(config_name="train", overrides=overrides)
            out[key(overrides)] = OmegaConf.to_container(cfg, resolve=False)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {SNAPSHOT.relative_to(REPO)}")
    args = parser.parse_args(argv)
    configs = compose_all()
    text = json.dumps(configs, indent=1, sort_keys=True) + "\n"
    if args.write:
        from cacr.outputs import atomic_write_text

        atomic_write_text(SNAPSHOT, text)
        print(f"wrote {len(configs)} composed configs to {SNAPSHOT}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
