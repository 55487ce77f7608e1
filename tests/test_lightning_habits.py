"""Lightning and Hydra habits (issue 29, part 3): ``RetrievalModule.load_from_checkpoint`` on a
run's ``.ckpt``, the ``callbacks`` config group, loggers as ``_target_`` configs, the best
checkpoint as a wandb artifact, the config logged once; a tiny run, offline."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cacr.train import run

from .conftest import REPO
from .wandb_log import wandb_records

TINY_WORLD = [
    "data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
    "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
    "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
    "train.num_candidates=6", "module.num_negatives=2", "trainer.enable_progress_bar=false", "eval.n_boot=50",
    "train.max_steps=4", "eval.val_every_n_steps=2", "trainer.log_every_n_steps=1", "module.warmup_steps=2",
]


def compose_train(tmp: Path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY_WORLD, f"data.root={tmp / 'world'}", *overrides])


def _offline(mp, tmp: Path):
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp / "wandb_dir")), ("WANDB_SILENT", "true"),
                 ("WANDB_DISABLE_GIT", "true")):
        mp.setenv(k, v)


def _one_thread(fn, *args):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("habits")
    cfg = compose_train(tmp, "logger=csv", "loss=cacr", f"run_dir={tmp / 'run'}")
    return tmp, cfg, _one_thread(run, cfg)


def test_load_from_checkpoint_rebuilds_the_module_and_scores_as_the_run(csv_run):
    from cacr.module import RetrievalModule
    from cacr.train_data import TrainingDataModule

    _, cfg, results = csv_run
    best = Path(results["best_checkpoint"])
    module = RetrievalModule.load_from_checkpoint(best, map_location="cpu")
    assert module.regularizer.name == "cacr" and module.regularizer.stop_grad is True
    assert module.model.config.hidden_size == 32 and module.hparams.num_negatives == 2
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    dm = TrainingDataModule.from_config(cfg.data, num_candidates=cfg.train.num_candidates)
    dm.setup()
    module.attach(test_split=dm.split("test"), winoground=dm.winoground, tokenizer=dm.tokenizer)
    again = _one_thread(module.final_evaluation, True, True, cfg.eval.n_boot)
    assert again["retrieval"] == results["retrieval"]  # the run's test recalls, from the loaded module
    assert again["winoground"] == results["winoground"]


def test_load_from_checkpoint_without_model_config_is_one_line(tmp_path):
    from cacr.module import RetrievalModule

    with pytest.raises(ValueError, match=r"give model=, or model_config="):
        RetrievalModule()
    with pytest.raises(ValueError, match=r"regularizer record has unknown field\(s\) \['bogus'\]"):
        RetrievalModule(model_config={"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 16, "img_dim": 8},
                        regularizer={"name": "cacr", "bogus": 1})
