"""Confidence intervals over items: one bootstrap for every evaluator.

``interval(samples, statistic)`` is ``scipy.stats.bootstrap`` with the bias-corrected and
accelerated (BCa) method (Efron, 1987): the items are resampled with replacement
``n_boot`` times, the paired arrays of ``samples`` together, from a generator seeded with
``seed`` (the same seed and item count draw the same resamples). BCa corrects the
percentile interval for the skew and bias of the statistic's bootstrap distribution, which
matters at accuracies near 0 or 100 on a few hundred items, where a percentile interval is
too narrow on the far side.

Where BCa is undefined, the interval falls back, never to a silent NaN:

- **all items the same** (every outcome 0, or every outcome 1, so every resample gives the
  same value and BCa's bias term is infinite): for 0/1 outcomes the **Wilson score
  interval** of the observed proportion over the ``n`` items (it stays open on the inside,
  e.g. 0 of 20 gives [0, 16.1] percent, not [0, 0]); for other data ``[value, value]``;
- **any other failure of BCa** (a jackknife that cannot vary, e.g. one item; an infinite
  bias correction when no resample falls below the observed value): the **percentile**
  interval of the same resamples (``method="percentile"``, the same seed); with a single
  item and 0/1 outcomes, the Wilson interval.

The evaluators keep their result keys (``ci95`` as ``[lo, hi]`` in percent);
:func:`interval_method` says which of the rules a call used.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Sequence, Tuple

import numpy as np
from scipy import stats

_BATCH_ELEMS = 1 << 22  # resample rows per batch: ~4M values (32 MB of float64) at a time


def wilson(k: float, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (fractions, not percent)."""
    if n <= 0:
        raise ValueError("wilson: no items")
    z = stats.norm.ppf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _check(n_boot: int, level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _is_binary(a: np.ndarray) -> bool:
    return a.dtype == bool or bool(np.isin(a, (0, 1)).all())


def _interval_and_method(samples: Sequence, statistic: Callable, *, n_boot: int, level: float, seed: int,
                         binary: np.ndarray = None) -> Tuple[List[float], str]:
    _check(n_boot, level)
    arrays = [np.asarray(s) for s in samples]
    n = arrays[0].shape[-1]
    if n == 0:
        raise ValueError("no items to resample")
    if any(a.shape[-1] != n for a in arrays):
        raise ValueError(f"paired samples must have the same length, got {[a.shape[-1] for a in arrays]}")
    outcome = np.asarray(arrays[0] if binary is None else binary, dtype=np.float64).reshape(-1)
    point = float(statistic(*arrays, axis=-1))
    if len(arrays) > 1 and binary is None:
        constant = all(bool((a == a[..., :1]).all()) for a in arrays)
    else:
        constant = bool((outcome == outcome[0]).all())
    if constant or n == 1:
        if _is_binary(outcome):
            lo, hi = wilson(float(outcome.sum()), n, level)
            return [lo, hi], "wilson"
        return [point, point], "constant"
    batch = max(1, _BATCH_ELEMS // n)
    kw = dict(n_resamples=n_boot, confidence_level=level, paired=True, vectorized=True, axis=-1, batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning: handled below
        ci = stats.bootstrap(arrays, statistic, method="BCa", rng=np.random.default_rng(seed), **kw).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            return [float(ci.low), float(ci.high)], "BCa"
        ci = stats.bootstrap(arrays, statistic, method="percentile", rng=np.random.default_rng(seed),
                             **kw).confidence_interval
    return [float(ci.low), float(ci.high)], "percentile"


def interval(samples: Sequence, statistic: Callable = np.mean, *, n_boot: int = 10000, level: float = 0.95,
             seed: int = 0, binary=None) -> List[float]:
    """``[lo, hi]`` of ``statistic`` over the items of ``samples`` (paired 1-D arrays of one
    length; ``statistic(*arrays, axis=-1)`` vectorised over leading axes), in its units.
    ``binary``: the 0/1 outcomes behind a statistic of several arrays (e.g. the correctness
    behind a macro accuracy), used when every outcome is the same (see the module notes)."""
    return _interval_and_method(samples, statistic, n_boot=n_boot, level=level, seed=seed, binary=binary)[0]


def interval_method(samples: Sequence, statistic: Callable = np.mean, *, n_boot: int = 10000,
                    level: float = 0.95, seed: int = 0, binary=None) -> str:
    """Which rule :func:`interval` used: ``BCa``, ``wilson``, ``percentile`` or ``constant``."""
    return _interval_and_method(samples, statistic, n_boot=n_boot, level=level, seed=seed, binary=binary)[1]


def mean_interval(values, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> List[float]:
    """``[lo, hi]`` of the mean of ``values`` (0/1 outcomes or any numbers), same units."""
    return interval([np.asarray(values, dtype=np.float64)], np.mean, n_boot=n_boot, level=level, seed=seed)


def macro_mean(correct: np.ndarray, cats: np.ndarray, axis: int = -1, *, num_cats: int = None) -> np.ndarray:
    """Mean over categories (those present at least once) of the per-category mean of
    ``correct``; ``correct`` and ``cats`` ``(..., n)``, ``cats`` integers in ``[0, C)``."""
    correct = np.moveaxis(np.asarray(correct, dtype=np.float64), axis, -1)
    cats = np.moveaxis(np.asarray(cats), axis, -1).astype(np.int64)
    lead = correct.shape[:-1]
    C = int(num_cats if num_cats is not None else cats.max() + 1)
    rows = int(np.prod(lead)) if lead else 1
    flat = (cats.reshape(rows, -1) + C * np.arange(rows)[:, None]).ravel()
    hits = np.bincount(flat, weights=correct.reshape(-1), minlength=rows * C).reshape(rows, C)
    count = np.bincount(flat, minlength=rows * C).reshape(rows, C)
    present = count > 0
    acc = np.where(present, hits / np.maximum(count, 1), 0.0)
    out = acc.sum(1) / present.sum(1)
    return out.reshape(lead) if lead else out[0]


def macro_interval(correct, cats, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> List[float]:
    """``[lo, hi]`` of :func:`macro_mean`, the items resampled with their categories."""
    correct = np.asarray(correct, dtype=np.float64)
    cats = np.asarray(cats, dtype=np.int64)
    C = int(cats.max()) + 1

    def stat(c, k, axis=-1):
        return macro_mean(c, k, axis, num_cats=C)
    return interval([correct, cats], stat, n_boot=n_boot, level=level, seed=seed, binary=correct)
