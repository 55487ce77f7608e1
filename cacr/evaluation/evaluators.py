"""Evaluators on the project's data objects: retrieval on a split and Winoground on a
Winoground-format set. Training (validation, final test) and the command lines call these
same functions; they need a model in eval mode and work under DDP (the batches of one plan shared
results gathered to every rank) or in one process.

With ``bf16=True`` the pairs are scored in bf16 and every comparison a metric rests on that
bf16 rounding could have changed is decided in fp32 (:mod:`cacr.evaluation.exact`): the
metrics equal fp32 scoring's, and the results carry a ``scoring`` record (precision, the
measured bf16 error and margin, how many pairs were re-scored). ``exact=False`` keeps the
plain bf16 scores (for measuring bf16 itself).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from torch import Tensor, nn

from cacr.distributed import is_main_process

from .engine import all_pairs, memoized, score_matrix, score_pairs, score_winoground, winoground_pairs
from .exact import exact_retrieval, exact_winoground, plain_record
from .retrieval_metrics import retrieval_metrics
from .scorefile import example_tag_sets, read_tag_file, save_score_matrix
from .winoground_metrics import winoground_results


def _score_fn(model: nn.Module, head: str, compile: bool = False):
    if model.training:
        raise ValueError("evaluation needs the model in eval mode (dropout off): call model.eval()")
    if compile:
        return model.scorer(head, compile=True)
    return functools.partial(model.score, head=head)


def _rescorers(fn, pairs: Tensor, captions, images, batch_size: int, device):
    """The two fp32 re-scorings of :mod:`cacr.evaluation.exact` for flat indices into
    ``pairs``: in batches of their own, and in their batches of the evaluation's plan (each
    item fetched once for all of them)."""
    captions, images = memoized(captions), memoized(images)

    def rescore(idx):
        return score_pairs(fn, pairs[idx], captions, images, batch_size=batch_size, device=device, bf16=False,
                           shard=True)

    def replan(idx):
        return score_pairs(fn, pairs, captions, images, batch_size=batch_size, device=device, bf16=False,
                           shard=True, only=idx)
    return rescore, replan


def evaluate_retrieval(
    model: nn.Module,
    split,
    *,
    head: str = "rank",
    batch_size: int = 512,
    device=None,
    bf16: bool = False,
    progress: bool = False,
    save_scores: Optional[Path] = None,
    compile: bool = False,
    exact: bool = True,
    keep_scores: bool = False,
) -> Dict[str, Any]:
    """R@1/5/10 both ways, means and R-sum (percent) of every caption of ``split`` (a
    ``cacr.data.datasets.RetrievalSplit``) against every image, and ``scoring`` (how it was
    scored); ``save_scores`` writes the score matrix with caption and image ids (rank 0) so
    the metrics can be recomputed; ``compile`` scores through ``model.scorer(head,
    compile=True)`` (torch.compile); ``keep_scores`` adds the (captions, images) matrix as
    ``score_matrix`` (a tensor: pop it before writing JSON)."""
    device = device or next(model.parameters()).device
    fn = _score_fn(model, head, compile)
    scores = score_matrix(
        fn,
        split.texts,
        split.image,
        num_captions=split.num_texts,
        num_images=split.num_images,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        progress=progress,
    ).cpu()
    record = plain_record(bf16)
    if bf16 and exact:
        pairs = all_pairs(split.num_texts, split.num_images)
        scores, record = exact_retrieval(scores, split.txt2img,
                                         *_rescorers(fn, pairs, split.texts, split.image, batch_size, device))
    if save_scores is not None and is_main_process():
        save_score_matrix(save_scores, scores, split.caption_ids, split.image_ids, split.txt2img)
    out = {**retrieval_metrics(scores, split.txt2img), "scoring": record}
    if keep_scores:
        out["score_matrix"] = scores
    return out


def evaluate_winoground(
    model: nn.Module,
    wino,
    *,
    head: str = "rank",
    batch_size: int = 512,
    device=None,
    bf16: bool = False,
    progress: bool = False,
    n_boot: int = 10000,
    seed: int = 0,
    tag_files: Optional[Mapping[str, str]] = None,
    extra_tags: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None,
    exact: bool = True,
):
    """Scores ``(N, 2, 2)`` and the results record (text / image / group / binding in percent,
    CIs, breakdowns and ``scoring``) of a ``cacr.data.datasets.WinogroundSet``; ``extra_tags``
    adds breakdowns ``{name: {example id: [tags]}}`` beside those of ``tag_files``."""
    device = device or next(model.parameters()).device
    fn = _score_fn(model, head)
    captions = lambda c: wino.texts[c // 2][c % 2]  # noqa: E731
    scores = score_winoground(
        fn,
        captions,
        wino.image,
        len(wino),
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        progress=progress,
    ).cpu()
    record = plain_record(bf16)
    if bf16 and exact:
        scores, record = exact_winoground(scores, *_rescorers(fn, winoground_pairs(len(wino)), captions, wino.image,
                                                              batch_size, device))
    extra = {name: read_tag_file(path, wino.examples) for name, path in (tag_files or {}).items()}
    extra.update(extra_tags or {})
    results = winoground_results(scores, example_tag_sets(wino.examples, extra), n_boot=n_boot, seed=seed)
    results["scoring"] = record
    return scores, results
