"""A training run that SIGKILLs itself at a chosen point (for tests/test_faults.py).

    python -m tests.fault_driver POINT STEP key=value ...

POINT: ``none`` (run to the end), ``step`` (at the start of training step STEP, after the
checkpoints of the earlier validations), ``validation`` (inside the validation at step
STEP, before its checkpoints), ``before_last`` (after the best checkpoint of the validation
at STEP is written, before ``last.ckpt``), ``writing_last`` (while ``last.ckpt`` is being
written at STEP: the temporary file exists, the rename has not happened), ``final_eval``
(after training, inside the final evaluation). The config is ``conf/train.yaml`` composed
with the given overrides, run through ``cacr.train.main_entry`` on one thread.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(pl.Callback):
    def __init__(self, point: str, step: int):
        self.point, self.step = point, step

    def on_train_batch_start(self, trainer, *args):
        if self.point == "step" and trainer.global_step == self.step:
            die()

    def on_validation_epoch_end(self, trainer, *args):
        if self.point == "validation" and trainer.global_step == self.step:
            die()


def main(argv) -> None:
    point, step, overrides = argv[0], int(argv[1]), argv[2:]
    torch.set_num_threads(1)
    from cacr import resume, train
    from cacr.config import register_resolvers
    from cacr.module import RetrievalModule

    if point == "before_last":
        save = resume.LastCheckpoint.save

        def save_or_die(self, trainer):
            if trainer.global_step == step:
                die()
            save(self, trainer)

        resume.LastCheckpoint.save = save_or_die
    elif point == "writing_last":
        def half_saved(self, trainer):
            if trainer.global_step == step:
                trainer.save_checkpoint(resume._tmp(self.path))
                with open(resume._tmp(self.path), "r+b") as f:
                    f.truncate(os.path.getsize(resume._tmp(self.path)) // 2)
                die()
            save(self, trainer)

        save = resume.LastCheckpoint.save
        resume.LastCheckpoint.save = half_saved
    elif point == "final_eval":
        def final_evaluation(self, *a, **k):
            die()

        RetrievalModule.final_evaluation = final_evaluation
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    original_run = train.run
    train.run = lambda c: original_run(c, extra_callbacks=[KillAt(point, step)])
    train.main_entry(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
