"""Stage C's driver (experiments/binding_study/acquisition.py): endpoints read from a run's
files, the registered verdicts on stored synthetic results, and one tiny end-to-end pass."""
import csv
import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from .conftest import REPO

STUDY = REPO / "experiments" / "binding_study"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


acq = _load("acquisition")


def _write_run(d, curve, test_binding=None, rsum=500.0, pressure=(0.3,)):
    d.mkdir(parents=True)
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "step", "train/pressure", "val/wino_binding"])
        w.writeheader()
        for p in pressure:
            w.writerow({"epoch": 0, "step": 0, "train/pressure": p})
        for step, b in curve:
            w.writerow({"epoch": 0, "step": step - 1, "val/wino_binding": b})
    if test_binding is not None:
        (d / "results.json").write_text(json.dumps({"winoground": {"by_tag": {"split": {"test": {"binding": test_binding}}}},
                                                    "retrieval": {"rsum": rsum}}))


def test_steps_to_75_is_the_first_crossing_and_a_run_that_never_crosses_is_censored(tmp_path):
    _write_run(tmp_path / "a", [(50, 50.0), (100, 74.9), (150, 80.0), (200, 60.0), (250, 90.0)], 91.0)
    e = acq.endpoints(tmp_path / "a", budget=250, val_every=50)
    assert e["steps_to_75"] == 150 and not e["censored"] and e["test_binding"] == 91.0
    _write_run(tmp_path / "b", [(50, 50.0), (100, 52.0)], 50.0)
    e = acq.endpoints(tmp_path / "b", budget=100, val_every=50)
    assert e["steps_to_75"] == 150 and e["censored"]
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        acq.endpoints(tmp_path / "missing")


def _table(tmp_path, arm_turns, arm_bind, pressure=0.3, rsum=500.0, n=12, seed=0):
    """none turns at step 1000 x noise; the arm at arm_turns x noise; binding likewise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    table = {"none": {}, "cacr_30": {}}
    for s in range(n):
        base = 1000 * 2 ** rng.normal(0, 0.1)
        table["none"][s] = {"steps_to_75": base, "test_binding": 90 + rng.normal(0, 1), "rsum": 500.0,
                            "pressure_mean": None}
        table["cacr_30"][s] = {"steps_to_75": base * arm_turns * 2 ** rng.normal(0, 0.05),
                               "test_binding": table["none"][s]["test_binding"] + arm_bind + rng.normal(0, 0.5),
                               "rsum": rsum, "pressure_mean": pressure}
    return table


def test_a_clear_speed_up_is_superiority_on_steps(tmp_path):
    c = acq.comparisons(_table(tmp_path, arm_turns=0.6, arm_bind=4.0))["cacr_30"]
    assert c["valid"]
    assert c["steps_to_75"]["verdict"] == "superiority" and c["steps_to_75"]["mean"] < math.log2(0.7)
    assert c["test_binding"]["verdict"] == "superiority"


def test_an_arm_like_none_is_equivalence():
    c = acq.comparisons(_table(None, arm_turns=1.0, arm_bind=0.0, n=20))["cacr_30"]
    assert c["steps_to_75"]["verdict"] == "equivalence"
    assert c["test_binding"]["verdict"] == "equivalence"


@pytest.mark.parametrize("kw,why", [({"pressure": 0.01}, "pressure"), ({"rsum": 300.0}, "R-sum")])
def test_an_invalid_arm_is_inconclusive_however_clear_its_effect(kw, why):
    c = acq.comparisons(_table(None, arm_turns=0.5, arm_bind=5.0, **kw))["cacr_30"]
    assert not c["valid"] and any(why in w for w in c["validity"])
    for e in ("steps_to_75", "test_binding"):
        assert c[e]["verdict"].startswith("inconclusive")


def test_seed_ranges_parse():
    assert acq.parse_seeds("1-3,7") == [1, 2, 3, 7]


TINY = ["data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
        "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64", "data.val_max_images=8",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "train.num_candidates=6",
        "logger=csv", "eval.n_boot=20", "train.max_steps=4", "eval.val_every_n_steps=2", "module.pressure_every=2", "trainer.log_every_n_steps=2"]


def test_the_stage_runs_end_to_end_on_a_tiny_world(tmp_path):
    world = [f"data.root={tmp_path / 'world'}", *TINY]
    cal = acq.calibrate([1], n_batches=2, extra=world)
    for r in acq.REGULARIZERS:
        assert all(math.isfinite(v) and v > 0 for v in cal["lambda"][r].values())
        assert cal["lambda"][r]["30"] == pytest.approx(3 * cal["lambda"][r]["10"])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "calibration.json").write_text(json.dumps(cal))
    acq.main(["--out", str(tmp_path / "runs"), "--stage", "arms", "--seeds", "1-2", "--arms", "none,cacr_30",
              "--threads", "1", "--", *world])
    table = acq.load_table(tmp_path / "runs")
    assert set(table) == {"none", "cacr_30"} and set(table["none"]) == {1, 2}
    row = table["cacr_30"][1]
    assert row["pressure_mean"] > 0 and row["steps"] == 4 and 0 <= row["test_binding"] <= 100
    assert table["none"][1]["pressure_mean"] is None  # none logs no pull
    # the two seeds are different worlds and inits
    assert table["none"][1]["curve"] != table["none"][2]["curve"] or table["none"][1]["rsum"] != table["none"][2]["rsum"]
    acq.main(["--out", str(tmp_path / "runs"), "--stage", "report"])
    out = json.loads((tmp_path / "runs" / "stage_c.json").read_text())
    assert "cacr_30" in out["comparisons"] and "verdict" in out["comparisons"]["cacr_30"]["test_binding"]


def _comp(verdict, equivalent=False, valid=True):
    e = {"verdict": verdict, "equivalent": equivalent}
    return {"valid": valid, "steps_to_75": e, "test_binding": e}


def test_a_regularizer_is_superior_if_either_weight_is_and_equivalent_only_if_both_are():
    v = acq.regularizer_verdicts({"cacr_10": _comp("inconclusive"), "cacr_30": _comp("superiority"),
                                  "iais_singular_10": _comp("equivalence", True),
                                  "iais_singular_30": _comp("inconclusive")})
    assert v["cacr"]["steps_to_75"] == "superiority"
    assert v["iais_singular"]["steps_to_75"] == "inconclusive"
    v = acq.regularizer_verdicts({"cacr_10": _comp("equivalence", True), "cacr_30": _comp("equivalence", True),
                                  "iais_singular_10": _comp("superiority", valid=False),
                                  "iais_singular_30": _comp("superiority")})
    assert v["cacr"]["test_binding"] == "equivalence"
    assert v["iais_singular"]["test_binding"].startswith("inconclusive (an arm fails")
    assert acq.regularizer_verdicts({})["cacr"]["steps_to_75"].startswith("inconclusive (an arm has not")


def test_superiority_is_tested_at_the_bonferroni_level():
    # a difference whose 95% interval excludes 0 but whose 97.5% interval does not
    from scipy.stats import t

    n, sd = 10, 1.0
    half95, half975 = (t.ppf(q, n - 1) * sd / math.sqrt(n) for q in (0.975, 0.9875))
    z = np.random.default_rng(0).normal(size=n)
    d = (z - z.mean()) / z.std(ddof=1) * sd + (half95 + half975) / 2
    out = acq._two_level(list(d), acq.BINDING_RULES, acq.BINDING_EQ_RULES, True)
    assert not out["verdict"].startswith("superiority") and out["ci"][0] < 0
    assert acq.decide.decide(list(d), acq.decide.Rules(margin=2.0))["superior"]  # at 0.05 it would have been


def test_the_plan_reaches_the_target_power_or_says_it_cannot():
    p = acq.plan({"log2_steps": 0.2, "test_binding": 1.5})
    for e, outcomes in p["power_at_seeds"].items():
        for o, pw in outcomes.items():
            need = p["seeds_needed"][e][o]
            assert (pw >= 0.8) == (need is not None and need <= p["seeds"]), (e, o, pw, need)
    big = acq.plan({"log2_steps": 3.0, "test_binding": 1.5})
    assert big["seeds"] == acq.MAX_SEEDS and big["power_at_seeds"]["steps_to_75"]["equivalence"] < 0.8


def test_the_pilot_summary_inflates_the_between_seed_sd(tmp_path):
    from scipy.stats import chi2

    for s, (step, b) in {101: (600, 95.0), 102: (800, 93.0), 103: (700, 97.0)}.items():
        _write_run(tmp_path / "pilot" / "none" / f"seed{s}", [(step, 80.0)], b)
    out = acq.pilot_summary(tmp_path)
    sd = float(np.std(np.log2([600, 800, 700]), ddof=1))
    factor = math.sqrt(2) * math.sqrt(2 / chi2.ppf(0.2, 2))
    assert out["planning_sd"]["log2_steps"] == pytest.approx(factor * sd)
    assert out["planning_sd"]["test_binding"] == pytest.approx(factor * 2.0)
    assert acq.load_table(tmp_path) == {}  # pilot runs never enter the study's table


def test_a_fresh_run_folder_takes_the_registered_weights(tmp_path, monkeypatch):
    reg = tmp_path / "registered.json"
    reg.write_text(json.dumps({"seeds": [101], "lambda": {"cacr": {"10": 0.5, "30": 1.5},
                                                          "iais_singular": {"10": 0.01, "30": 0.03}}}))
    monkeypatch.setattr(acq, "REGISTERED_CALIBRATION", reg)
    monkeypatch.setattr(acq, "REPO", tmp_path)
    ran = {}
    monkeypatch.setattr(acq, "run_jobs", lambda out, arms, seeds, *a, **k: ran.update(arms=arms, seeds=seeds))
    acq.main(["--out", str(tmp_path / "runs"), "--stage", "arms", "--seeds", "1-2"])
    assert json.loads((tmp_path / "runs" / "calibration.json").read_text()) == json.loads(reg.read_text())
    assert ran["seeds"] == [1, 2] and "loss.weight=1.5" in ran["arms"]["cacr_30"]
    assert set(ran["arms"]) == {"none", "cacr_10", "cacr_30", "iais_singular_10", "iais_singular_30"}
