"""What train.py prints at the end: where training stopped and why, and the Winoground-format
scores per half with binding's interval."""
from cacr.train import closing_lines


def _w(n, b, ci=None):
    out = {"n": n, "text": 10.0, "image": 20.0, "group": 5.0, "binding": b}
    if ci:
        out["ci95"] = {"binding": ci}
    return out


def test_a_run_stopped_at_binding_says_so_and_prints_the_test_half_first():
    res = {"training": {"steps": 700, "max_steps": 3000, "stopped": "binding", "wall_s": 181.4},
           "stopped_at_binding": {"step": 700, "binding": 91.24, "threshold": 90},
           "winoground": {**_w(2000, 80.0), "by_tag": {"split": {"dev": _w(1000, 91.2, [89.3, 92.9]),
                                                                 "test": _w(1000, 90.1, [88.1, 91.9])}}}}
    lines = closing_lines(res)
    assert lines[0] == "training: 700 of 3000 steps in 181 s, ended by dev binding 91.2 >= train.stop_at_binding=90"
    assert lines[1].startswith("winoground test half (n=1000): text=10.00") and lines[1].endswith("binding=90.10 [88.1, 91.9]")
    assert lines[2].startswith("winoground dev half (n=1000)")


def test_a_run_that_used_its_budget_and_a_set_without_halves():
    res = {"training": {"steps": 1000, "max_steps": 1000, "stopped": "max_steps", "wall_s": 90.0},
           "winoground": _w(8, 50.0)}
    assert closing_lines(res) == ["training: 1000 of 1000 steps in 90 s, ended by the step budget (train.max_steps)",
                                  "winoground (n=8): text=10.00  image=20.00  group=5.00  binding=50.00"]
    assert closing_lines({}) == []


def test_a_compositional_split_is_printed_after_the_halves():
    res = {"winoground": {**_w(30, 60.0), "by_tag": {"split": {"novel": _w(10, 55.0), "dev": _w(10, 60.0),
                                                               "test": _w(10, 65.0)}}}}
    assert [line.split(" (")[0] for line in closing_lines(res)] == [
        "winoground test half", "winoground dev half", "winoground novel split"]


def test_eval_checkpoint_last_scores_the_final_weights(tmp_path):
    """eval.checkpoint=last: the final evaluation scores the last weights, not the best by R-sum;
    a bad value is refused before step 0."""
    import pytest
    from hydra import compose, initialize_config_dir

    from cacr.checks import SettingsError
    from cacr.train import run

    from .conftest import REPO
    from .test_training import TINY_WORLD

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_WORLD, f"data.root={tmp_path / 'w'}", f"run_dir={tmp_path / 'r'}",
                                          "train.max_steps=6", "eval.val_every_n_steps=2", "eval.checkpoint=last"])
        bad = compose("train", overrides=[*TINY_WORLD, f"data.root={tmp_path / 'w'}", f"run_dir={tmp_path / 'b'}",
                                          "eval.checkpoint=best_rsum"])
    res = run(cfg)
    assert res["best_checkpoint"].endswith("last.ckpt") and res["training"]["steps"] == 6
    with pytest.raises(SettingsError, match="eval.checkpoint=best_rsum"):
        run(bad)
