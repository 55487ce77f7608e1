"""The last layer's relation blocks of one (caption, image) pair, and CACR's projections.

For a pair with ``n`` words (word pieces without [CLS]/[SEP]) and ``m`` regions, the last
encoder layer's attention is cut into ``S_LL`` (n x n, words -> words), ``S_LV`` (n x m,
words -> regions), ``S_VL`` (m x n) and ``S_VV`` (m x m) (paper Eq. 2) from the model's
``score_rows`` output (pre-softmax ``QK^T/sqrt(d)``, no mask) with
``cacr.regularizers.relation_blocks``. Two normalisations:

- ``block`` (default; what the regularizers see, docs/reference.md §3.1): each block is a softmax over
  its own keys, so every row of every block sums to 1;
- ``joint``: the attention the model applies, a softmax over the whole joint sequence
  (key mask applied, [CLS]/[SEP] included) of which the blocks are slices; a row of
  ``[S_LL | S_LV]`` then sums to 1 minus what goes to [CLS] and [SEP].

The paper (and the public CACR/IAIS code) averages the probabilities over heads
(``head_reduction="mean"``); ``"per_head"`` keeps one matrix per head, ``(h, ., .)``.
CACR's language-basis view of ``S_VV`` is ``P_L = S_LV S_VV S_LV^T`` (paper Eq. 3,
Figure 2 top) and the vision-basis view of ``S_LL`` is ``P_V = S_VL S_LL S_VL^T``
(Eq. 5, Figure 2 bottom).

Command line (pictures for one example of the data config's Winoground-format set, or
for any caption and image; see ``--help``)::

    python -m cacr.analysis.attention --ckpt outputs/<date>/<time>/checkpoints/best-stepN.ckpt --example 3 --out analysis/ex3
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from cacr.model import PairExample, boxes_to_7d, collate
from cacr.regularizers import cacr_loss, relation_blocks

NORMALISATIONS = ("block", "joint")
HEAD_REDUCTIONS = ("mean", "per_head")
SCORE_HEADS = ("rank", "itm")


@dataclass
class PairAttention:
    """The relation blocks of one pair (numpy, fp32); ``(h, ., .)`` each with ``per_head``."""

    words: List[str]  # n word pieces
    boxes: np.ndarray  # (m, 4) x1 y1 x2 y2, normalised to the image
    S_LL: np.ndarray  # (n, n) words -> words
    S_LV: np.ndarray  # (n, m) words -> regions
    S_VL: np.ndarray  # (m, n) regions -> words
    S_VV: np.ndarray  # (m, m) regions -> regions
    score: float  # the pair's score with the chosen head
    normalisation: str = "block"
    head_reduction: str = "mean"

    @property
    def n(self) -> int:
        return self.S_LV.shape[-2]

    @property
    def m(self) -> int:
        return self.S_LV.shape[-1]

    @property
    def projected_L(self) -> np.ndarray:
        """``S_LV S_VV S_LV^T`` (n x n): ``S_VV`` in the language basis."""
        return self.S_LV @ self.S_VV @ np.swapaxes(self.S_LV, -1, -2)

    @property
    def projected_V(self) -> np.ndarray:
        """``S_VL S_LL S_VL^T`` (m x m): ``S_LL`` in the vision basis."""
        return self.S_VL @ self.S_LL @ np.swapaxes(self.S_VL, -1, -2)

    def head(self, k: int) -> "PairAttention":
        """Head ``k`` of a ``per_head`` record as a 2-d record."""
        if self.head_reduction != "per_head":
            raise ValueError("head(k) needs a record made with head_reduction='per_head'")
        return replace(self, S_LL=self.S_LL[k], S_LV=self.S_LV[k], S_VL=self.S_VL[k], S_VV=self.S_VV[k],
                       head_reduction=f"head {k}")

    def cacr_parts(self) -> Tuple[float, float]:
        """``(L_CACR-L, L_CACR-V)`` of this pair (paper Eqs. 3, 5; public-code row mean), averaged over
        heads for ``per_head``. Training's loss when ``normalisation="block"``."""
        t = [torch.from_numpy(np.asarray(x, dtype=np.float64)) for x in (self.S_LL, self.S_VV, self.S_LV, self.S_VL)]
        if t[0].dim() == 2:
            t = [x[None] for x in t]  # (1, ., .)
        h = t[0].shape[0]
        parts = cacr_loss(*t, torch.ones(h, self.n, dtype=torch.bool), torch.ones(h, self.m, dtype=torch.bool),
                          return_parts=True)
        return float(parts.loss_L), float(parts.loss_V)

    def save_npz(self, path) -> Path:
        from cacr.outputs import atomic_write

        arrays = dict(S_LL=self.S_LL, S_LV=self.S_LV, S_VL=self.S_VL, S_VV=self.S_VV, P_L=self.projected_L,
                      P_V=self.projected_V, boxes=self.boxes, words=np.array(self.words), score=np.float64(self.score))
        return atomic_write(path, lambda f: np.savez(f, **arrays))


def _check(value, choices, what):
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


@torch.no_grad()
def relation_attention(
    model: nn.Module,
    examples: Sequence[PairExample],
    *,
    words: Optional[Sequence[Sequence[str]]] = None,
    normalisation: str = "block",
    head_reduction: str = "mean",
    score_head: str = "rank",
    batch_size: int = 64,
    device=None,
) -> List[PairAttention]:
    """One :class:`PairAttention` per pair, in order, from batched forwards of ``model`` (eval mode).

    ``words[p]``: the word pieces of pair ``p`` (default: the token ids as strings).
    """
    _check(normalisation, NORMALISATIONS, "normalisation")
    _check(head_reduction, HEAD_REDUCTIONS, "head_reduction")
    _check(score_head, SCORE_HEADS, "score_head")
    if model.training:
        raise ValueError("attention analysis needs the model in eval mode (no dropout): call model.eval()")
    if words is not None and len(words) != len(examples):
        raise ValueError(f"words: {len(words)} lists for {len(examples)} pairs")
    device = device or next(model.parameters()).device
    cfg = model.config
    out: List[PairAttention] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        batch = collate(chunk, img_dim=cfg.img_dim, max_txt_positions=cfg.max_position_embeddings).to(device)
        B = len(chunk)
        res = model(batch, score_rows=torch.arange(B, device=device))
        scores = res.last_scores  # (B, h, L, L) pre-softmax, unmasked
        h = scores.shape[1]
        if normalisation == "joint":
            keys = batch.attn_mask[:, None, None, :]  # (B, 1, 1, L)
            probs = torch.softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)
            blocks = relation_blocks(probs, batch.word_index, batch.word_mask, batch.region_index, batch.region_mask,
                                     source="scores", head_reduction=head_reduction)
        else:
            blocks = relation_blocks(scores, batch.word_index, batch.word_mask, batch.region_index, batch.region_mask,
                                     source="probs", head_reduction=head_reduction)
        mats = [x.float().cpu().numpy() for x in (blocks.S_LL, blocks.S_LV, blocks.S_VL, blocks.S_VV)]
        if head_reduction == "per_head":
            mats = [x.reshape(B, h, *x.shape[1:]) for x in mats]  # (B, h, ., .)
        pair_score = res.rank_logits if score_head == "rank" else res.itm_logits[:, 1] - res.itm_logits[:, 0]
        pair_score = pair_score.float().cpu()
        n_words = (batch.txt_lens - 2).tolist()
        n_regions = batch.num_bbs.tolist()
        for b, ex in enumerate(chunk):
            n, m = n_words[b], n_regions[b]
            LL, LV, VL, VV = (x[b] for x in mats)
            p = start + b
            ids = ex.input_ids.tolist()[1:-1]
            out.append(PairAttention(
                words=list(words[p]) if words is not None else [str(i) for i in ids],
                boxes=boxes_to_7d(ex.img_pos_feat, where=f"pair {p}")[:, :4].numpy(),
                S_LL=LL[..., :n, :n], S_LV=LV[..., :n, :m], S_VL=VL[..., :m, :n], S_VV=VV[..., :m, :m],
                score=float(pair_score[b]), normalisation=normalisation, head_reduction=head_reduction,
            ))
    return out


# --------------------------------------------------------------------------- command line


FIGURES = ("heatmap", "congruence", "boxes", "labels")


def pair_pictures(att: PairAttention, out_dir: Path, stem: str, *, image: Optional[np.ndarray],
                  region_labels: Optional[Sequence[str]], directions: Sequence[str], rel_threshold: float,
                  max_others: int, title: str, figures: Sequence[str] = FIGURES) -> Dict[str, object]:
    """The ``figures`` of one 2-d record; returns the files, the boxes drawn (per direction,
    per word) and the pair's CACR losses."""
    from . import pictures

    files: Dict[str, str] = {}
    drawn: Dict[str, list] = {}
    if "heatmap" in figures:
        files["heatmap"] = str(pictures.words_regions_heatmap(att, out_dir / f"{stem}_words_regions.png",
                                                              region_labels=region_labels, title=title))
    if "congruence" in figures:
        files["congruence"] = str(pictures.congruence_figure(att, out_dir / f"{stem}_congruence.png",
                                                             region_labels=region_labels, title=title))
    for d in directions:
        if "boxes" in figures:
            path = out_dir / f"{stem}_boxes_{d}.png"
            boxes = pictures.attended_boxes_figure(att, image, path, direction=d, rel_threshold=rel_threshold,
                                                   max_others=max_others, region_labels=region_labels, title=title)
            files[f"boxes_{d}"] = str(path)
            drawn[d] = [{"word": w, "argmax": b.argmax, "others": b.others} for w, b in zip(att.words, boxes)]
        if "labels" in figures:
            path = out_dir / f"{stem}_argmax_labels_{d}.png"
            pictures.argmax_labels_figure(att, image, path, direction=d, title=title)
            files[f"argmax_labels_{d}"] = str(path)
    L_L, L_V = att.cacr_parts()
    return {"files": files, "drawn": drawn, "cacr_L": L_L, "cacr_V": L_V}


def run(args: argparse.Namespace) -> Dict[str, object]:
    from cacr.evaluation.scorefile import write_results_json
    from cacr.outputs import item_path

    from . import inputs, pictures

    out_dir = Path(args.out)
    src = inputs.open_sources(args.ckpt, args.overrides, device=args.device)
    if args.text is not None or args.image_id is not None:
        if args.text is None or args.image_id is None or args.example is not None:
            raise ValueError("give --text and --image-id together (any caption and image), or --example alone")
        pairs = [inputs.free_pair(src, args.text, args.image_id, regions=args.regions, scenes=args.scenes)]
    else:
        if args.example is None:
            raise ValueError("no pair: give --example ID (a Winoground-format example) or --text and --image-id")
        pairs = inputs.winoground_pairs(src, args.example, which=args.pairs, scenes=args.scenes)
    records = relation_attention(src.model, [p.example for p in pairs], words=[p.words for p in pairs],
                                 normalisation=args.normalisation, head_reduction=args.heads, score_head=src.head,
                                 device=src.device)
    summary: Dict[str, object] = {"checkpoint": src.name, "normalisation": args.normalisation, "heads": args.heads,
                                  "score_head": src.head, "pairs": []}
    logged: Dict[str, Path] = {}
    for pair, att in zip(pairs, records):
        image, source = inputs.background(pair, image_file=args.image_file, image_dir=args.image_dir)
        att.save_npz(item_path(out_dir, f"{pair.stem}_attention.npz", pair.label))  # the stem's ids made safe
        views = [(pair.stem, att)] if args.heads == "mean" else \
            [(f"{pair.stem}_head{k}", att.head(k)) for k in range(att.S_LL.shape[0])]
        entry = {"label": pair.label, "image_id": pair.image_id, "words": att.words, "score": att.score,
                 "background": source, "views": {}}
        for stem, view in views:
            info = pair_pictures(view, out_dir, stem, image=image, region_labels=pair.region_labels,
                                 directions=args.direction, rel_threshold=args.rel_threshold,
                                 max_others=args.max_others, title=f"{pair.label}  (score {att.score:.3f})",
                                 figures=args.figures)
            entry["views"][stem] = info
            logged.update({f"attention/{Path(f).stem}": Path(f) for f in info["files"].values()})
        summary["pairs"].append(entry)
    write_results_json(out_dir / "attention.json", summary)
    if args.wandb:
        pictures.log_to_wandb(logged, start_offline_run=args.wandb_project, run_dir=out_dir)
    for f in sorted(str(p) for p in logged.values()):
        print(f)
    print(out_dir / "attention.json")
    return summary


def build_parser() -> argparse.ArgumentParser:
    from .inputs import add_common_arguments

    p = argparse.ArgumentParser(
        prog="python -m cacr.analysis.attention",
        description="Last-layer attention pictures of one pair (paper Figures 2, 4, 5).",
        epilog="Trailing key=value overrides go to conf/winoground.yaml as for eval_winoground.py "
               "(data=..., data.root=..., examples=..., regions=..., head=..., model=... model.checkpoint=...).")
    p.add_argument("--ckpt", help="a .ckpt of this project's train.py (or use model=... model.checkpoint=...)")
    p.add_argument("--example", help="Winoground-format example id (the 'id' field)")
    p.add_argument("--pairs", choices=("matched", "all"), default="matched",
                   help="matched: (caption_0, image_0) and (caption_1, image_1); all: the four pairs")
    p.add_argument("--text", help="any caption (with --image-id)")
    p.add_argument("--image-id", help="image id in the regions file (with --text)")
    p.add_argument("--regions", help="regions HDF5 for --image-id (default: the data config's regions)")
    p.add_argument("--scenes",
                   help="synthetic scenes.jsonl to render the image from (default: the data config's world)")
    p.add_argument("--image-file", help="the image itself (PNG/JPEG) to draw the boxes on")
    p.add_argument("--image-dir", help="folder of <image_id>.png/.jpg files (e.g. Winoground's images)")
    p.add_argument("--normalisation", choices=NORMALISATIONS, default="block")
    p.add_argument("--heads", choices=HEAD_REDUCTIONS, default="mean")
    p.add_argument("--direction", nargs="+", choices=("LV", "VL"), default=["LV", "VL"],
                   help="LV: each word's row of S_LV (Figure 4); VL: the regions attending to each word (Figure 5)")
    p.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES),
                   help="heatmap: S_LV and S_VL^T; congruence: Figure 2; boxes: Figures 4 top / 5; "
                        "labels: Figure 4 bottom")
    p.add_argument("--rel-threshold", type=float, default=0.5,
                   help="other boxes drawn in red: attention >= this fraction of the word's maximum")
    p.add_argument("--max-others", type=int, default=3, help="at most this many red boxes per word")
    add_common_arguments(p, "the PNGs")
    return p


def main(argv=None) -> None:
    from .inputs import run_command

    run_command("cacr.analysis.attention", build_parser(), run, argv)


if __name__ == "__main__":
    main()
