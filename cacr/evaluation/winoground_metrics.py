"""Winoground text, image and group scores (Thrush et al., 2022; docs/reference.md §5), breakdowns and
bootstrap CIs (BCa, :mod:`cacr.evaluation.bootstrap`).

``scores`` is ``(N, 2, 2)`` with ``scores[n, k, j] = s(c_k, i_j)``, caption ``k`` against
image ``j`` of example ``n``. With strict inequalities (ties are wrong):

- text correct  iff ``s(c0, i0) > s(c1, i0)`` and ``s(c1, i1) > s(c0, i1)``;
- image correct iff ``s(c0, i0) > s(c0, i1)`` and ``s(c1, i1) > s(c1, i0)``;
- group correct iff both;
- binding correct iff ``s(c0, i0) - s(c0, i1) - s(c1, i0) + s(c1, i1) > 0``: the interaction of
  the 2 x 2 scores, with each caption's and each image's main effect removed. A model whose
  score is "how typical is this caption" plus "how typical is this image" (a bag of words
  and a bag of regions) has no interaction; one that binds words to regions puts the true
  pairs ahead. Not a Winoground score of the original paper; chance is 50.

Scores are percentages of examples; chance is 25 / 25 / 16.67 / 50.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

METRICS = ("text", "image", "group", "binding")


def check_scores(scores) -> Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 3 or scores.shape[1:] != (2, 2):
        raise ValueError(f"scores: expected shape (N, 2, 2) = (example, caption, image), got {tuple(scores.shape)}")
    bad = (~torch.isfinite(scores.double())).flatten(1).any(1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"scores: NaN or Inf in example row(s) {bad[:10].tolist()}")
    return scores


def winoground_correct(scores) -> Dict[str, Tensor]:
    """Per-example correctness: ``{"text", "image", "group", "binding"}`` -> ``(N,)`` bool."""
    s = check_scores(scores)
    c0i0, c0i1, c1i0, c1i1 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]
    text = (c0i0 > c1i0) & (c1i1 > c0i1)
    image = (c0i0 > c0i1) & (c1i1 > c1i0)
    binding = (c0i0 - c0i1) - (c1i0 - c1i1) > 0
    return {"text": text, "image": image, "group": text & image, "binding": binding}


def percentages(correct: Mapping[str, Tensor]) -> Dict[str, float]:
    n = correct["text"].numel()
    if n == 0:
        raise ValueError("no examples to score")
    return {m: 100.0 * correct[m].double().mean().item() for m in METRICS}


def bootstrap_ci(
    correct: Mapping[str, Tensor], *, n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> Dict[str, List[float]]:
    """Bootstrap interval of each score in percent, ``{metric: [lo, hi]}``.

    BCa over examples (:func:`cacr.evaluation.bootstrap.mean_interval`: ``n_boot`` resamples
    drawn from a generator seeded with ``seed``, the same resamples for every score), with
    the Wilson interval where every example has the same outcome (all correct or all wrong).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    from .bootstrap import mean_interval

    out: Dict[str, List[float]] = {}
    for m in METRICS:
        values = correct[m].double().numpy()
        if values.size == 0:
            raise ValueError("no examples to resample")
        lo, hi = mean_interval(values, n_boot=n_boot, level=level, seed=seed)
        out[m] = [100.0 * lo, 100.0 * hi]
    return out


def summarize(correct: Mapping[str, Tensor], *, n_boot: int = 10000, level: float = 0.95,
              seed: int = 0) -> Dict[str, object]:
    """``{"text", "image", "group", "binding"}`` in percent, ``n`` and ``ci95`` (``{metric: [lo, hi]}``)."""
    out: Dict[str, object] = dict(percentages(correct))
    out["n"] = int(correct["text"].numel())
    if n_boot:
        out[f"ci{round(level * 100)}"] = bootstrap_ci(correct, n_boot=n_boot, level=level, seed=seed)
    return out


def breakdown(
    correct: Mapping[str, Tensor],
    tags: Sequence[Sequence[str]],
    *,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, Dict[str, object]]:
    """Scores per tag value: ``tags[n]`` lists the tags of example ``n`` (an example may
    carry several tags, or none); returns ``{tag: summarize(subset)}`` sorted by tag."""
    n = correct["text"].numel()
    if len(tags) != n:
        raise ValueError(f"tags: expected one tag list per example ({n}), got {len(tags)}")
    members: Dict[str, List[int]] = {}
    for i, ts in enumerate(tags):
        if isinstance(ts, str) or not all(isinstance(t, str) for t in ts):
            raise ValueError(f"tags of example {i}: expected a list of strings, got {ts!r}")
        for t in dict.fromkeys(ts):
            members.setdefault(t, []).append(i)
    out = {}
    for t in sorted(members):
        idx = torch.tensor(members[t], dtype=torch.long)
        out[t] = summarize({m: correct[m][idx] for m in METRICS}, n_boot=n_boot, level=level, seed=seed)
    return out


def winoground_results(
    scores,
    tag_sets: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
    *,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, object]:
    """The results record: top-level ``text``/``image``/``group`` (percent), ``n``, ``ci95``
    and ``by_tag`` = ``{tag set name: {tag: {text, image, group, n, ci95}}}``.

    ``tag_sets`` maps a breakdown name (``"collapsed_tag"``, ...) to one tag list per
    example; see :func:`cacr.evaluation.scorefile.example_tag_sets`.
    """
    correct = winoground_correct(scores)
    out = summarize(correct, n_boot=n_boot, level=level, seed=seed)
    out["by_tag"] = {
        name: breakdown(correct, tags, n_boot=n_boot, level=level, seed=seed)
        for name, tags in (tag_sets or {}).items()
    }
    return out
