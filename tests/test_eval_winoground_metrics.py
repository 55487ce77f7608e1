"""Winoground scores: hand cases (ties, all-correct, all-wrong, one-sided), a loop twin,
breakdowns and the seeded BCa bootstrap against scipy's own call (cacr/evaluation/bootstrap.py)."""
import numpy as np
import pytest
import torch
from scipy import stats

from cacr.evaluation.bootstrap import wilson

from cacr.evaluation.winoground_metrics import (
    bootstrap_ci, breakdown, summarize, winoground_correct, winoground_results,
)


def ex(c0i0, c0i1, c1i0, c1i1):
    return [[c0i0, c0i1], [c1i0, c1i1]]


def test_hand_cases():
    scores = torch.tensor([
        ex(2., 0., 0., 2.),   # all correct
        ex(0., 2., 2., 0.),   # all wrong
        ex(1., 1., 1., 1.),   # all tied: wrong everywhere
        ex(2., 0., 2., 3.),   # text: 2 > 2? tie -> wrong; image: 2 > 0 and 3 > 2 -> right
        ex(3., 4., 1., 5.),   # text: 3 > 1 and 5 > 4 -> right; image: 3 > 4 no -> wrong
        ex(3., 1., 1., 3.000001),  # all correct, barely
    ], dtype=torch.float64)
    c = winoground_correct(scores)
    assert c["text"].tolist() == [True, False, False, False, True, True]
    assert c["image"].tolist() == [True, False, False, True, False, True]
    assert c["group"].tolist() == [True, False, False, False, False, True]
    # interaction s00 - s01 - s10 + s11: 4, -4, 0 (a tie is wrong), 3, 3, 4.000001
    assert c["binding"].tolist() == [True, False, False, True, True, True]
    r = summarize(c, n_boot=0)
    assert r == {"text": pytest.approx(50.0), "image": pytest.approx(50.0),
                 "group": pytest.approx(100 / 3), "binding": pytest.approx(200 / 3), "n": 6}


def test_all_correct_and_all_wrong():
    right = torch.tensor([ex(1., 0., 0., 1.)] * 5)
    wrong = torch.tensor([ex(0., 1., 1., 0.)] * 5)
    r = winoground_results(right, n_boot=200)
    assert (r["text"], r["image"], r["group"], r["n"]) == (100.0, 100.0, 100.0, 5)
    # every example the same: BCa is undefined, the Wilson interval of 5 of 5 (it was
    # [100, 100] with the former percentile bootstrap, which collapses at the extremes)
    lo = 100 * wilson(5, 5)[0]
    assert lo == pytest.approx(56.55, abs=0.01)  # worked by hand in test_wilson_by_hand
    assert r["ci95"] == {m: [lo, 100.0] for m in ("text", "image", "group", "binding")}
    r = winoground_results(wrong, n_boot=200)
    assert (r["text"], r["image"], r["group"]) == (0.0, 0.0, 0.0)
    assert r["ci95"]["text"] == [0.0, pytest.approx(100 - lo)]


def test_wilson_by_hand():
    # p = 1, n = 5, z = 1.959964: centre = (1 + z^2/10) / (1 + z^2/5), half = z sqrt(z^2/100) / (1 + z^2/5)
    z = 1.959963984540054
    centre, half = (1 + z * z / 10) / (1 + z * z / 5), z * (z * z / 100) ** 0.5 / (1 + z * z / 5)
    assert wilson(5, 5) == (pytest.approx(centre - half), 1.0)
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 20)[1] == pytest.approx(0.16113, abs=1e-5)


def loop_correct(scores):
    out = {"text": [], "image": [], "group": [], "binding": []}
    for e in scores.tolist():
        (s00, s01), (s10, s11) = e
        t = s00 > s10 and s11 > s01
        i = s00 > s01 and s11 > s10
        out["text"].append(t)
        out["image"].append(i)
        out["group"].append(t and i)
        out["binding"].append((s00 - s01) - (s10 - s11) > 0)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_vectorized_matches_loop_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (50 + seed, 2, 2), generator=g).float()
    c = winoground_correct(scores)
    ref = loop_correct(scores)
    for m in ("text", "image", "group"):
        assert c[m].tolist() == ref[m]


def test_breakdown_matches_subsets_and_multi_tags():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 2, 2, generator=g)
    c = winoground_correct(scores)
    tags = [["a"] if i % 3 else ["a", "b"] for i in range(40)]
    tags[5] = []
    by = breakdown(c, tags, n_boot=0)
    assert list(by) == ["a", "b"]
    members_b = [i for i in range(40) if "b" in tags[i]]
    members_a = [i for i in range(40) if "a" in tags[i]]
    assert by["b"]["n"] == len(members_b) and by["a"]["n"] == len(members_a) == 39
    for m in ("text", "image", "group"):
        assert by["b"][m] == pytest.approx(100 * sum(c[m][i].item() for i in members_b) / len(members_b))
    with pytest.raises(ValueError, match="tags of example 1: expected a list of strings"):
        breakdown(c, [["a"], "b"] + [["a"]] * 38, n_boot=0)
    with pytest.raises(ValueError, match="one tag list per example"):
        breakdown(c, [["a"]] * 3, n_boot=0)


def test_bootstrap_is_scipy_bca_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(60, 2, 2, generator=g)
    c = winoground_correct(scores)
    n_boot = 300
    ci = bootstrap_ci(c, n_boot=n_boot, seed=7)
    assert ci == bootstrap_ci(c, n_boot=n_boot, seed=7)
    assert ci != bootstrap_ci(c, n_boot=n_boot, seed=8)
    # the obvious twin: scipy's BCa called directly on each score's 0/1 outcomes, same seed
    for m in ("text", "image", "group"):
        x = c[m].double().numpy()
        want = stats.bootstrap([x], np.mean, n_resamples=n_boot, method="BCa", rng=np.random.default_rng(7))
        assert ci[m] == pytest.approx([100 * want.confidence_interval.low, 100 * want.confidence_interval.high])
        point = 100 * c[m].double().mean().item()
        assert ci[m][0] <= point <= ci[m][1]


def test_bootstrap_chunks_cover_all_resamples():
    # n large enough that the resamples are drawn in several chunks
    c = winoground_correct(torch.randn(5000, 2, 2, generator=torch.Generator().manual_seed(1)))
    ci = bootstrap_ci(c, n_boot=500, seed=0)
    for m in ("text", "image", "group"):
        p = c[m].double().mean().item()
        se = (p * (1 - p) / 5000) ** 0.5 * 100
        width = ci[m][1] - ci[m][0]
        assert 0.6 * 2 * 1.96 * se < width < 1.4 * 2 * 1.96 * se


def test_results_record_shape():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(10, 2, 2, generator=g)
    r = winoground_results(scores, {"collapsed_tag": [["Object"]] * 6 + [["Relation"]] * 4}, n_boot=100)
    assert set(r) == {"text", "image", "group", "binding", "n", "ci95", "by_tag"}
    assert set(r["by_tag"]["collapsed_tag"]) == {"Object", "Relation"}
    assert r["by_tag"]["collapsed_tag"]["Relation"]["n"] == 4


def test_bad_scores():
    with pytest.raises(ValueError, match=r"expected shape \(N, 2, 2\)"):
        winoground_correct(torch.zeros(3, 4))
    bad = torch.zeros(3, 2, 2)
    bad[2, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in example row\(s\) \[2\]"):
        winoground_correct(bad)
