"""Stage C's decision rules (experiments/binding_study/decide.py): the verdicts on stored
synthetic results, and the power simulation against the closed form."""
import importlib.util
import math
import sys

import numpy as np
import pytest

from .conftest import REPO

_spec = importlib.util.spec_from_file_location("binding_study_decide", REPO / "experiments" / "binding_study" / "decide.py")
decide = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = decide  # dataclasses look their module up
_spec.loader.exec_module(decide)

RULES = decide.Rules(margin=2.0)


def _diffs(mean, sd, n, seed=0):
    """n differences with exactly this sample mean and sd."""
    z = np.random.default_rng(seed).normal(size=n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


def test_a_clear_effect_is_superiority():
    out = decide.decide(_diffs(4.0, 2.0, 10), RULES)
    assert out["verdict"] == "superiority" and out["ci"][0] > 0


def test_a_null_effect_measured_tightly_is_equivalence():
    out = decide.decide(_diffs(0.2, 1.0, 20), RULES)
    assert out["verdict"] == "equivalence"
    lo, hi = out["tost_ci"]
    assert -2 < lo and hi < 2


def test_a_wide_null_is_inconclusive_and_a_clear_loss_is_inferiority():
    assert decide.decide(_diffs(0.0, 6.0, 5), RULES)["verdict"] == "inconclusive"
    assert decide.decide(_diffs(-5.0, 1.0, 8), RULES)["verdict"] == "inferiority"


def test_an_invalid_arm_is_inconclusive_whatever_its_numbers():
    for d in (_diffs(4.0, 2.0, 10), _diffs(0.1, 0.5, 20)):
        assert decide.decide(d, RULES, valid=False)["verdict"].startswith("inconclusive")


def test_lower_is_better_flips_the_direction():
    rules = decide.Rules(margin=0.1, better="lower")
    assert decide.decide(_diffs(-0.5, 0.2, 8), rules)["verdict"] == "superiority"
    assert decide.decide(_diffs(+0.5, 0.2, 8), rules)["verdict"] == "inferiority"


def test_the_tost_interval_is_the_90_percent_interval_and_matches_the_two_one_sided_tests():
    from scipy.stats import ttest_1samp

    d = _diffs(0.7, 1.5, 12, seed=3)
    out = decide.decide(d, RULES)
    p_low = ttest_1samp(d, -2.0, alternative="greater").pvalue
    p_high = ttest_1samp(d, 2.0, alternative="less").pvalue
    assert out["equivalent"] == (max(p_low, p_high) < 0.05)
    # the bound sits where the one-sided test is exactly at alpha
    lo = out["tost_ci"][0]
    assert ttest_1samp(d, lo, alternative="greater").pvalue == pytest.approx(0.05, abs=1e-9)


def test_a_tiny_precise_difference_reads_as_negligible():
    out = decide.decide(_diffs(0.5, 0.3, 30), RULES)
    assert out["superior"] and out["equivalent"]
    assert "negligible" in out["verdict"]


@pytest.mark.parametrize("delta,sd,n", [(3.0, 3.04, 8), (0.0, 3.04, 20), (1.0, 2.0, 6)])
def test_power_simulation_agrees_with_the_closed_form(delta, sd, n):
    sim = decide.power(delta, sd, n, RULES, n_sim=40000, seed=1)
    exact = decide.power_closed_form(delta, sd, n, RULES)
    for k in ("superiority", "equivalence"):
        p = exact[k]
        tol = 4 * math.sqrt(max(p * (1 - p), 1e-4) / 40000)
        assert abs(sim[k] - p) < tol, (k, sim[k], p)
    assert sum(sim[k] for k in ("superiority", "equivalence", "inferiority", "inconclusive")) >= 1.0 - 1e-12


def test_closed_form_superiority_at_large_n_is_the_normal_power():
    # n large: the noncentral t is nearly normal; power = Phi(delta sqrt(n)/sd - z_{0.975})
    from scipy.stats import norm

    n, delta, sd = 400, 0.3, 3.0
    p = decide.power_closed_form(delta, sd, n, RULES)["superiority"]
    assert p == pytest.approx(norm.cdf(delta * math.sqrt(n) / sd - norm.ppf(0.975)), abs=2e-3)


def test_seeds_for_reaches_the_target_and_one_fewer_does_not():
    need = decide.seeds_for(3.04, RULES, effect=3.0)
    for what, delta in (("superiority", 3.0), ("equivalence", 0.0)):
        n = need[what]
        assert decide.power_closed_form(delta, 3.04, n, RULES)[what] >= 0.8
        assert decide.power_closed_form(delta, 3.04, n - 1, RULES)[what] < 0.8


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="better"):
        decide.Rules(margin=1, better="up")
    with pytest.raises(ValueError, match="margin"):
        decide.Rules(margin=0)
    with pytest.raises(ValueError, match="at least 2"):
        decide.decide([1.0], RULES)
