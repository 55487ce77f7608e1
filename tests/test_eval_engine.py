"""Pair-scoring engine vs one-pair-at-a-time scoring with a tiny random UNITER."""
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cacr.evaluation.engine import score_matrix, score_pairs, score_winoground
from cacr.evaluation.retrieval_metrics import retrieval_metrics
from cacr.model import PairExample, collate

sys.path.insert(0, str(Path(__file__).parent / "ddp_scripts"))
from eval_problem import ragged_data, tiny_model  # noqa: E402

ATOL = 2e-5


@pytest.fixture(scope="module")
def problem():
    model = tiny_model(0)
    captions, images = ragged_data(9, 7)
    with torch.inference_mode():
        one_by_one = torch.tensor([
            [model.score(collate([PairExample(c, *img)])).item() for img in images] for c in captions
        ])  # (9, 7)
    return model, captions, images, one_by_one


def all_pairs(nc, ni):
    return [(c, i) for c in range(nc) for i in range(ni)]


@pytest.mark.parametrize("batch_size,layout", [(1, "compact"), (5, "compact"), (64, "compact"), (7, "padded")])
def test_matches_one_pair_at_a_time(problem, batch_size, layout):
    model, captions, images, ref = problem
    pairs = all_pairs(9, 7)
    got = score_pairs(model.score, pairs, captions, images, batch_size=batch_size, layout=layout)
    assert got.dtype == torch.float32 and got.shape == (63,)
    torch.testing.assert_close(got.view(9, 7), ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.1  # the comparison is not between constants


def test_order_independent_and_duplicates(problem):
    model, captions, images, ref = problem
    g = torch.Generator().manual_seed(5)
    pairs = torch.randint(0, 7, (40, 2), generator=g)
    pairs[:, 0] %= 9
    pairs = torch.cat([pairs, pairs[:3]])  # repeated pairs are scored like the others
    got = score_pairs(model.score, pairs, captions, images, batch_size=6)
    torch.testing.assert_close(got, ref[pairs[:, 0], pairs[:, 1]], atol=ATOL, rtol=0)
    perm = torch.randperm(pairs.shape[0], generator=g)
    got_perm = score_pairs(model.score, pairs[perm], captions, images, batch_size=6)
    torch.testing.assert_close(got_perm, got[perm], atol=ATOL, rtol=0)


def test_batches_hold_similar_lengths(problem):
    model, captions, images, _ = problem
    seen = []

    def spy(batch):
        seen.append((batch.txt_lens + batch.num_bbs).tolist())
        return model.score(batch)

    score_pairs(spy, all_pairs(9, 7), captions, images, batch_size=8)
    flat = [x for b in seen for x in b]
    assert flat == sorted(flat, reverse=True)  # longest first, so batches are length-homogeneous
    assert sum(len(b) for b in seen) == 63


def test_callable_lookups_fetch_each_item_once(problem):
    model, captions, images, ref = problem
    calls = {"c": [], "i": []}

    def cap(c):
        calls["c"].append(c)
        return captions[c].tolist()  # plain lists of token ids are accepted

    def img(i):
        calls["i"].append(i)
        return images[i]

    m = score_matrix(functools.partial(model.score, head="rank"), cap, img, num_captions=9, num_images=7,
                     batch_size=10)
    torch.testing.assert_close(m, ref, atol=ATOL, rtol=0)
    assert sorted(calls["c"]) == list(range(9)) and sorted(calls["i"]) == list(range(7))
    with pytest.raises(ValueError, match="needs its count"):
        score_matrix(model.score, cap, img, num_images=7)


def test_itm_head(problem):
    model, captions, images, _ = problem
    with torch.inference_mode():
        ref = torch.stack([model.score(collate([PairExample(captions[c], *images[i])]), head="itm")[0]
                           for c, i in all_pairs(3, 7)])
    got = score_pairs(functools.partial(model.score, head="itm"), all_pairs(3, 7), captions, images, batch_size=4)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_score_matrix_and_metrics(problem):
    model, captions, images, ref = problem
    m = score_matrix(model.score, captions, images, batch_size=16, progress=True)
    torch.testing.assert_close(m, ref, atol=ATOL, rtol=0)
    txt2img = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1])
    assert retrieval_metrics(m, txt2img) == retrieval_metrics(ref, txt2img)


def test_winoground_layout(problem):
    model, captions, images, ref = problem
    # example n: captions 2n, 2n+1 and images 2n, 2n+1
    s = score_winoground(model.score, captions[:6], images[:6], 3, batch_size=5)
    for n in range(3):
        for k in (0, 1):
            for j in (0, 1):
                assert s[n, k, j].item() == pytest.approx(ref[2 * n + k, 2 * n + j].item(), abs=ATOL)


def test_bf16_autocast_runs_close(problem):
    model, captions, images, ref = problem
    got = score_pairs(model.score, all_pairs(9, 7), captions, images, batch_size=16, bf16=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.view(9, 7), ref, atol=0.15, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(problem):
    model, captions, images, ref = problem
    gpu_model = tiny_model(0).cuda()
    got = score_pairs(gpu_model.score, all_pairs(9, 7), captions, images, batch_size=16, device="cuda")
    torch.testing.assert_close(got.view(9, 7), ref, atol=1e-4, rtol=1e-4)
    got = score_pairs(gpu_model.score, all_pairs(9, 7), captions, images, batch_size=16, device="cuda", bf16=True)
    torch.testing.assert_close(got.view(9, 7), ref, atol=0.15, rtol=0.05)


def test_errors(problem):
    model, captions, images, _ = problem
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            score_pairs(model.score, [(0, 0)], captions, images)
        with pytest.raises(ValueError, match="training mode"):
            score_pairs(functools.partial(model.score, head="itm"), [(0, 0)], captions, images)
    finally:
        model.eval()
    with pytest.raises(ValueError, match=r"pairs: expected \(caption index, image index\)"):
        score_pairs(model.score, torch.zeros(3, 3, dtype=torch.long), captions, images)
    with pytest.raises(ValueError, match=r"images\[0\]: expected \(img_feat, img_pos_feat\)"):
        score_pairs(model.score, [(0, 0)], captions, [images[0][0]])
    with pytest.raises(ValueError, match=r"score_fn returned shape \(\)"):
        score_pairs(lambda b: model.score(b).sum(), [(0, 0), (1, 1)], captions, images)
    assert score_pairs(model.score, [], captions, images).shape == (0,)
    with pytest.raises(ValueError, match=r"captions\[0\]: expected 1-d token ids"):
        score_pairs(model.score, [(0, 0)], [torch.tensor([2, 3])], images)
    bad = (images[0][0].clone(), images[0][1])
    bad[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"images\[0\]: expected \(m >= 1, img_dim\) finite"):
        score_pairs(model.score, [(0, 0)], captions, [bad])


def test_imports_neither_data_nor_training():
    code = ("import sys, cacr.evaluation; bad = [m for m in sys.modules if m.startswith(('cacr.data', "
            "'cacr.module', 'cacr.train', 'lightning', 'pytorch_lightning'))]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
