"""Evaluators on the project's data objects: retrieval on a split and Winoground on a
Winoground-format set. Training (validation, final test) and the command lines call these
same functions; they need a model in eval mode and work under DDP (rows sharded exactly,
results gathered to every rank) or in one process.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from torch import nn

from cacr.distributed import is_main_process

from .engine import score_matrix, score_winoground
from .retrieval_metrics import retrieval_metrics
from .scorefile import example_tag_sets, read_tag_file, save_score_matrix
from .winoground_metrics import winoground_results


def _score_fn(model: nn.Module, head: str, compile: bool = False):
    if model.training:
        raise ValueError("evaluation needs the model in eval mode (dropout off): call model.eval()")
    if compile:
        return model.scorer(head, compile=True)
    return functools.partial(model.score, head=head)


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
) -> Dict[str, float]:
    """R@1/5/10 both ways, means and R-sum (percent) of every caption of ``split`` (a
    ``cacr.data.datasets.RetrievalSplit``) against every image; ``save_scores`` writes the
    score matrix with caption and image ids (rank 0) so the metrics can be recomputed;
    ``compile`` scores through ``model.scorer(head, compile=True)`` (torch.compile)."""
    device = device or next(model.parameters()).device
    scores = score_matrix(
        _score_fn(model, head, compile),
        split.texts,
        split.image,
        num_captions=split.num_texts,
        num_images=split.num_images,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        progress=progress,
    )
    if save_scores is not None and is_main_process():
        save_score_matrix(save_scores, scores.cpu(), split.caption_ids, split.image_ids, split.txt2img)
    return retrieval_metrics(scores.cpu(), split.txt2img)


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
):
    """Scores ``(N, 2, 2)`` and the results record (text / image / group / binding in percent,
    CIs and breakdowns) of a ``cacr.data.datasets.WinogroundSet``; ``extra_tags`` adds
    breakdowns ``{name: {example id: [tags]}}`` beside those of ``tag_files``."""
    device = device or next(model.parameters()).device
    scores = score_winoground(
        _score_fn(model, head),
        lambda c: wino.texts[c // 2][c % 2],
        wino.image,
        len(wino),
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        progress=progress,
    )
    extra = {name: read_tag_file(path, wino.examples) for name, path in (tag_files or {}).items()}
    extra.update(extra_tags or {})
    results = winoground_results(scores.cpu(), example_tag_sets(wino.examples, extra), n_boot=n_boot, seed=seed)
    return scores.cpu(), results
