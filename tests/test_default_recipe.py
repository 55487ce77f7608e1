"""The default run's recipe (conf/recipe/synthetic.yaml): what `python train.py` composes,
that the README documents exactly that, that it reaches neither real data nor any
experiment, and that it runs end to end on a tiny world."""
import re

import pytest
from hydra import compose, initialize_config_dir

from .conftest import REPO

# The recipe as the README documents it (between its `recipe` markers).
RECIPE = {
    "data.batch_size": 32, "data.p_hard": 1.0, "data.hard_pool": "objects", "data.p_swap": 1.0,
    "data.val_max_images": 20, "data.synthetic.n_train": 20000, "data.synthetic.absolute_captions": 5,
    "model.config.num_hidden_layers": 4, "model.config.hidden_size": 256, "train.max_steps": 3000,
    "train.stop_at_binding": 90, "module.num_negatives": 1, "module.mining": False, "module.mlm_weight": 1.0,
    "module.mlm_focus": ["left", "right", "above", "below"], "module.align_weight": 0.0,
    "module.val_winoground": True, "module.ranking": "softmax", "module.lr": 3.0e-4,
    "eval.val_every_n_steps": 100,
}


def _get(cfg, dotted):
    for k in dotted.split("."):
        cfg = cfg[k]
    return list(cfg) if hasattr(cfg, "__iter__") and not isinstance(cfg, str) else cfg


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("loss", ["cacr", "none"])
def test_the_default_run_composes_the_documented_recipe(loss):
    cfg = _compose(*([] if loss == "cacr" else ["loss=none"]))
    assert cfg.loss.name == loss
    for k, v in RECIPE.items():
        assert _get(cfg, k) == v, k


def test_the_readme_documents_the_recipe():
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- recipe -->(.*?)<!-- /recipe -->", text, re.S)
    assert block, "README.md: no <!-- recipe --> block"
    documented = dict(re.findall(r"([a-z_.]+)=(\S+)", block.group(1)))
    assert set(documented) == set(RECIPE), set(documented) ^ set(RECIPE)
    for k, v in RECIPE.items():
        want = "[" + ",".join(v) + "]" if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
        assert documented[k].rstrip(",") in (want, f"{v:g}" if isinstance(v, float) else want), k


@pytest.mark.parametrize("overrides", [["data=flickr30k"], ["recipe=none"], ["experiment=synthetic_study"],
                                       ["experiment=cacr_base"], ["experiment=binding_finetune"]])
def test_the_recipe_reaches_no_experiment_and_no_real_data(overrides):
    cfg = _compose(*overrides)
    bare = _compose("recipe=none")
    assert cfg.train.stop_at_binding == bare.train.stop_at_binding or overrides[0].startswith("experiment=")
    assert (cfg.module.num_negatives, cfg.module.val_winoground) != (1, True) or "binding" in overrides[0]
    if overrides == ["data=flickr30k"]:
        assert cfg.module.mlm_weight == 0.0 and cfg.train.stop_at_binding is None


TINY = ["data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
        "data.synthetic.n_winoground=8", "data.eval_batch_size=64", "data.batch_size=4",
        "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
        "train.num_candidates=6", "logger=none", "trainer.enable_progress_bar=false", "eval.n_boot=20",
        "train.max_steps=4", "eval.val_every_n_steps=2", "module.warmup_steps=2"]


def test_the_recipe_runs_end_to_end_and_says_why_it_stopped(tmp_path, capsys):
    """On a tiny world: MLM with the focus words, box swaps, dev-half binding at each
    validation, the stop at binding (a threshold of 0 stops at the first validation)."""
    from cacr.train import closing_lines, run

    cfg = _compose(*TINY, f"data.root={tmp_path / 'world'}", f"run_dir={tmp_path / 'run'}", "train.stop_at_binding=0")
    res = run(cfg)
    assert res["training"]["stopped"] == "binding" and res["training"]["steps"] == 2
    lines = closing_lines(res)
    assert lines[0].startswith("training: 2 of 4 steps in ") and "train.stop_at_binding=0" in lines[0]
    assert any(line.startswith("winoground test half") and "binding=" in line for line in lines)
