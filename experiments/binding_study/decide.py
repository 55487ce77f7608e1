"""The decision rules of the binding study's stage C and their power, as pure functions.

A comparison is the paired difference ``d_s = arm_s - reference_s`` over seeds ``s`` (same
world, initialisation and data order in both arms). Its verdict:

- **superiority** when the lower bound of the two-sided ``1 - alpha`` t-interval of the mean
  difference is above 0 (for an endpoint where lower is better, such as steps to a threshold,
  the upper bound is below 0: pass ``better="lower"``);
- **equivalence** when both one-sided t-tests at ``alpha`` reject a difference of ``-margin``
  or beyond and of ``+margin`` or beyond (TOST; the same as the ``1 - 2 alpha`` t-interval lying
  inside ``(-margin, +margin)``);
- **inferiority** when the interval lies wholly on the wrong side of 0;
- otherwise **inconclusive**; and inconclusive whatever the numbers when the arm fails a
  validity condition (its regularizer did not act, or it broke retrieval).

Superiority and equivalence both hold when a small difference is measured precisely (the
interval excludes 0 and lies inside the margin); the verdict then says so: a real but
negligible difference.

``power`` estimates by simulation how often each verdict comes out for a true mean difference
``delta`` and sd ``sd`` of the paired differences over ``n`` seeds; ``power_closed_form`` gives
the superiority and equivalence probabilities from the noncentral t distribution (exact for
normal differences), which the simulation is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class Rules:
    margin: float                 # equivalence margin, in the endpoint's units
    alpha: float = ALPHA          # two-sided for superiority, per side for TOST
    better: str = "higher"        # "higher" or "lower": which direction is an improvement

    def __post_init__(self):
        if self.better not in ("higher", "lower"):
            raise ValueError(f"Rules.better={self.better!r}: expected 'higher' or 'lower'")
        if not self.margin > 0:
            raise ValueError(f"Rules.margin={self.margin}: expected a positive equivalence margin")


def t_bounds(d: Sequence[float], level: float) -> tuple:
    """Mean and two-sided ``level`` t-interval of the mean of ``d``."""
    from scipy.stats import t

    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"t_bounds: need at least 2 paired differences, got {d.shape}")
    m = float(d.mean())
    h = float(t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return m, m - h, m + h


def decide(d: Sequence[float], rules: Rules, valid: bool = True) -> Dict:
    """The verdict of one comparison from its paired differences (arm minus reference)."""
    m, lo, hi = t_bounds(d, 1 - rules.alpha)
    _, elo, ehi = t_bounds(d, 1 - 2 * rules.alpha)
    sign = 1.0 if rules.better == "higher" else -1.0
    # in "better" units: positive is an improvement
    blo, bhi = (lo, hi) if sign > 0 else (-hi, -lo)
    superior = blo > 0
    inferior = bhi < 0
    equivalent = -rules.margin < elo and ehi < rules.margin
    if not valid:
        verdict = "inconclusive (the arm fails a validity condition)"
    elif superior and equivalent:
        verdict = "superiority (negligible: within the equivalence margin)"
    elif superior:
        verdict = "superiority"
    elif equivalent:
        verdict = "equivalence"
    elif inferior:
        verdict = "inferiority"
    else:
        verdict = "inconclusive"
    return {"n": int(len(d)), "mean": m, "ci": [lo, hi], "tost_ci": [elo, ehi], "superior": bool(superior),
            "equivalent": bool(equivalent), "inferior": bool(inferior), "valid": bool(valid), "verdict": verdict}


def power(delta: float, sd: float, n: int, rules: Rules, n_sim: int = 20000, seed: int = 0,
          censor: Optional[callable] = None) -> Dict[str, float]:
    """Share of simulated studies (``n`` normal paired differences, mean ``delta`` in the
    endpoint's units, sd ``sd``) whose verdict is each outcome. ``censor``, if given, maps each
    simulated (n_sim, n) array of differences before the rules see it (e.g. a ceiling)."""
    rng = np.random.default_rng(seed)
    D = rng.normal(delta, sd, size=(n_sim, n))
    if censor is not None:
        D = censor(D)
    from scipy.stats import t

    m = D.mean(1)
    se = D.std(1, ddof=1) / math.sqrt(n)
    h = t.ppf(1 - rules.alpha / 2, n - 1) * se
    he = t.ppf(1 - rules.alpha, n - 1) * se
    sign = 1.0 if rules.better == "higher" else -1.0
    bm = sign * m
    sup = bm - h > 0
    inf = bm + h < 0
    eq = (m - he > -rules.margin) & (m + he < rules.margin)
    return {"superiority": float(sup.mean()), "equivalence": float(eq.mean()),
            "inferiority": float(inf.mean()),
            "inconclusive": float((~sup & ~eq & ~inf).mean())}


def power_closed_form(delta: float, sd: float, n: int, rules: Rules) -> Dict[str, float]:
    """P(superiority) and P(equivalence) for normal paired differences, exactly.

    Superiority: T = mean / (s / sqrt n) follows a noncentral t with n - 1 degrees of freedom
    and noncentrality delta sqrt(n) / sd; the rule is T > t_{1 - alpha/2} (in "better" units).
    Equivalence (TOST) has no one-line closed form; it is the integral over the sample sd of the
    normal probability that the mean lies within (-margin + h(s), margin - h(s)), computed here
    by quadrature over the chi distribution of s."""
    from scipy import integrate
    from scipy.stats import chi2, nct, norm, t

    df = n - 1
    sign = 1.0 if rules.better == "higher" else -1.0
    nc = sign * delta * math.sqrt(n) / sd
    crit = t.ppf(1 - rules.alpha / 2, df)
    sup = float(nct.sf(crit, df, nc))
    ce = t.ppf(1 - rules.alpha, df)
    se0 = sd / math.sqrt(n)

    def integrand(q):  # q = (n-1) s^2 / sd^2 ~ chi2(df)
        s = sd * math.sqrt(q / df)
        h = ce * s / math.sqrt(n)
        lo, hi = -rules.margin + h, rules.margin - h
        if hi <= lo:
            return 0.0
        return (norm.cdf(hi, delta, se0) - norm.cdf(lo, delta, se0)) * chi2.pdf(q, df)

    eq, _ = integrate.quad(integrand, 0, chi2.ppf(1 - 1e-12, df), limit=200)
    return {"superiority": sup, "equivalence": float(eq)}


def seeds_for(sd: float, rules: Rules, effect: float, target: float = 0.8, n_max: int = 200) -> Dict[str, int]:
    """The fewest seeds at which superiority (true difference ``effect`` in the better
    direction) and equivalence (true difference 0) each reach ``target`` probability."""
    out = {}
    sign = 1.0 if rules.better == "higher" else -1.0
    for what, delta in (("superiority", sign * effect), ("equivalence", 0.0)):
        n = next((k for k in range(3, n_max + 1)
                  if power_closed_form(delta, sd, k, rules)[what] >= target), None)
        out[what] = n
    return out
