"""Training negatives that are known to be negatives, and compositional hard negatives.

In the synthetic world the truth of every caption on every scene is known: a caption states
one fact ``(object a, relation, object b)`` (an object is a colour and a category) and a
scene makes it true iff it holds an ``a`` and a ``b`` whose grid cells stand in that
relation; an absolute caption ("a red mug is left", ``data.synthetic.absolute_captions``)
is true iff the scene holds an ``a`` in that edge column or row. :class:`SceneTruth` holds,
for one split, the fact of every caption and the facts, categories and colours of every
image, and answers with vectorised masks:

- ``true_images(c)`` / ``true_texts(i)``: the images a caption is true of (its own image and
  others), the captions true of an image. A random negative drawn from these would be a
  positive: the sampler never draws them (about 2% of random images for a training caption).
- ``hard_images(c)``: images that hold the caption's colours and categories but of which it is
  false (its box-swapped twin; an image with the two objects the other way round; one with
  the colours on the other objects), so a bag of objects or of words cannot tell them apart.
- ``hard_texts(i)``: captions whose colours and categories all occur in the image but that are
  false of it: order swaps, relation flips and attribute swaps of its true captions.
- ``object_images(c)`` / ``object_texts(i)``: the narrower pool of ``hard_pool="objects"``:
  the image holds both objects the caption names (each colour on its category), so only the
  relation (for an absolute caption, the position) can tell them apart: the box-swapped twin,
  any scene with the two objects the other way round; order swaps and relation flips of an
  image's true captions.

:class:`NegativeSampler` draws ``K`` candidates per positive: each, with probability
``p_hard``, from the hard pool (while it lasts), else uniformly from the rest, never a true
match; ``hard_pool`` says which pool: ``"bag"`` (the caption's colours and categories occur)
or ``"objects"`` (its two named objects occur). With ``p_swap`` (``data.p_swap``), the
positive's own image with the boxes of the two objects its caption names exchanged takes the
first image slot (:meth:`NegativeSampler.swap`: the exact image-side swap, checked against the
scene and never a Winoground-format layout). Without a ``SceneTruth`` (real data) it keeps the
official behaviour: any other image, any caption of another image.
"""
from __future__ import annotations

import re
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .synthetic import CATEGORIES, COLOURS, GRID, POSITIONS, RELATIONS, absolute_holds

_REL = "|".join(RELATIONS)
_OBJ = rf"(?P<{{0}}col>\w+) (?P<{{0}}cat>\w+)"
CAPTION_RE = re.compile(
    rf"^(?:there is )?(?:a|an|the) {_OBJ.format('a')} (?:is )?(?P<rel>{_REL}) (?:a|an|the) {_OBJ.format('b')}$")
ABSOLUTE_RE = re.compile(rf"^(?:a|an|the) {_OBJ.format('a')} is (?P<pos>{'|'.join(POSITIONS)})$")
N_PREDICATES = len(RELATIONS) + len(POSITIONS)  # relation r, or absolute position len(RELATIONS) + p


def parse_caption(text: str, where: str = "caption") -> Tuple[int, int, int, int, int]:
    """``(category a, colour a, relation, category b, colour b)`` indices of a synthetic caption.
    An absolute caption ("a red mug is left") reads as ``(a, len(RELATIONS) + position, a)``."""
    text = text.strip().rstrip(".").strip()
    m = ABSOLUTE_RE.match(text)
    if m is not None and m["acat"] in CATEGORIES and m["acol"] in COLOURS:
        a = (CATEGORIES.index(m["acat"]), COLOURS.index(m["acol"]))
        return (*a, len(RELATIONS) + POSITIONS.index(m["pos"]), *a)
    m = CAPTION_RE.match(text)
    if m is None or m["acat"] not in CATEGORIES or m["bcat"] not in CATEGORIES \
            or m["acol"] not in COLOURS or m["bcol"] not in COLOURS:
        raise ValueError(f"{where}: {text!r} is not a synthetic-world caption "
                         f"('<article> <colour> <category> <relation> <article> <colour> <category>' or "
                         f"'<article> <colour> <category> is <{'|'.join(POSITIONS)}>')")
    return (CATEGORIES.index(m["acat"]), COLOURS.index(m["acol"]), RELATIONS.index(m["rel"]),
            CATEGORIES.index(m["bcat"]), COLOURS.index(m["bcol"]))


HARD_POOLS = ("bag", "objects")  # data.hard_pool: what makes a negative hard (module docstring)
N_FACTS = (len(CATEGORIES) * len(COLOURS)) ** 2 * N_PREDICATES  # fact ids are 0 .. N_FACTS - 1


def _kind(cat: int, col: int) -> int:
    return cat * len(COLOURS) + col


def fact_id(cat_a: int, col_a: int, rel: int, cat_b: int, col_b: int) -> int:
    n = len(CATEGORIES) * len(COLOURS)
    return (_kind(cat_a, col_a) * n + _kind(cat_b, col_b)) * N_PREDICATES + rel


def _cell(box: Sequence[float]) -> Tuple[int, int]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(GRID - 1, int(cy * GRID)), min(GRID - 1, int(cx * GRID))


def _holds(a, b, rel: str) -> bool:
    (ra, ca), (rb, cb) = a, b
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def scene_facts(regions: Sequence[Mapping]) -> Tuple[List[int], int, int]:
    """Every fact true of a scene (``load_scenes`` format), and its category and colour bit sets."""
    objs = [(CATEGORIES.index(g["category"]), COLOURS.index(g["colour"]), _cell(g["box"]))
            for g in regions if g["kind"] == "object"]
    facts = [fact_id(ca, ka, r, cb, kb)
             for i, (ca, ka, pa) in enumerate(objs) for j, (cb, kb, pb) in enumerate(objs) if i != j
             for r, rel in enumerate(RELATIONS) if _holds(pa, pb, rel)]
    facts += [fact_id(c, k, len(RELATIONS) + p, c, k)
              for c, k, cell in objs for p, pos in enumerate(POSITIONS) if absolute_holds(cell, pos)]
    cats = sum(1 << c for c in {o[0] for o in objs})
    cols = sum(1 << k for k in {o[1] for o in objs})
    return facts, cats, cols


def scene_layout(regions: Sequence[Mapping]) -> Tuple:
    """A scene's named content (``load_scenes`` format): its objects as sorted (category,
    colour, cell) triples, as :func:`cacr.data.synthetic.layout` reads a generated scene."""
    return tuple(sorted((g["category"], g["colour"], _cell(g["box"])) for g in regions if g["kind"] == "object"))


class SceneTruth:
    """Caption facts and image facts of one split (see the module docstring).

    ``texts``: the split's caption texts; ``scenes``: its images' regions in split order.
    """

    def __init__(self, texts: Sequence[str], scenes: Sequence[Sequence[Mapping]], caption_ids: Sequence[str] = ()):
        parsed = [parse_caption(t, where=f"caption {caption_ids[n] if caption_ids else n}")
                  for n, t in enumerate(texts)]
        p = torch.tensor(parsed, dtype=torch.long).view(-1, 5)
        self.fact = torch.tensor([fact_id(*x) for x in parsed], dtype=torch.long)  # (Nc,)
        self.cap_cats = (1 << p[:, 0]) | (1 << p[:, 3])  # (Nc,) bit sets
        self.cap_cols = (1 << p[:, 1]) | (1 << p[:, 4])
        self.cap_kinds = torch.stack([_kind(p[:, 0], p[:, 1]), _kind(p[:, 3], p[:, 4])], 1)  # (Nc, 2) named objects
        per_image = [scene_facts(s) for s in scenes]
        F = max(1, max(len(f) for f, _, _ in per_image))
        self.img_facts = torch.full((len(scenes), F), -1, dtype=torch.long)  # (Ni, F), -1 padded
        for i, (f, _, _) in enumerate(per_image):
            self.img_facts[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        self.img_cats = torch.tensor([c for _, c, _ in per_image], dtype=torch.long)
        self.img_cols = torch.tensor([k for _, _, k in per_image], dtype=torch.long)
        self.img_kinds = torch.zeros(len(scenes), len(CATEGORIES) * len(COLOURS), dtype=torch.bool)  # (Ni, kinds)
        for i, s in enumerate(scenes):
            for g in s:
                if g["kind"] == "object":
                    self.img_kinds[i, _kind(CATEGORIES.index(g["category"]), COLOURS.index(g["colour"]))] = True
        # fact -> images index: the (fact, image) pairs sorted by fact
        rows, slots = (self.img_facts >= 0).nonzero(as_tuple=True)
        facts = self.img_facts[rows, slots]
        order = facts.argsort(stable=True)
        self._by_fact, self._fact_images = facts[order], rows[order]

    def swap_rows(self, txt2img: Tensor, scenes: Sequence[Sequence[Mapping]], held_out=frozenset()) -> Tensor:
        """``(Nc, 2)`` long: for each relational caption, the rows (in its own image's region
        order) of the two objects it names, whose boxes exchanged make it false; ``-1`` where
        there is no such swap (absolute captions; a swap that would repeat a layout in
        ``held_out``, the Winoground-format scenes' :func:`scene_layout` set; a scene with the
        objects twice). Each swap is checked against the swapped scene's facts."""
        out = torch.full((self.num_texts, 2), -1, dtype=torch.long)
        rows_of = {}  # image -> {(category, colour) index: row}
        cache = {}  # (image, row a, row b) -> the facts of the swapped scene, or None if held out
        for c in range(self.num_texts):
            rel = int(self.fact[c]) % N_PREDICATES
            if rel >= len(RELATIONS):  # absolute caption: one object
                continue
            i = int(txt2img[c])
            if i not in rows_of:
                rows_of[i] = {}
                for r, g in enumerate(scenes[i]):
                    if g["kind"] == "object":
                        k = _kind(CATEGORIES.index(g["category"]), COLOURS.index(g["colour"]))
                        rows_of[i][k] = -1 if k in rows_of[i] else r  # -1: the kind twice
            a, b = rows_of[i].get(int(self.cap_kinds[c, 0]), -1), rows_of[i].get(int(self.cap_kinds[c, 1]), -1)
            if a < 0 or b < 0:
                continue
            if (i, a, b) not in cache:
                swapped = [dict(g) for g in scenes[i]]
                swapped[a]["box"], swapped[b]["box"] = scenes[i][b]["box"], scenes[i][a]["box"]
                cache[(i, a, b)] = None if scene_layout(swapped) in held_out else set(scene_facts(swapped)[0])
            facts = cache[(i, a, b)]
            if facts is not None and int(self.fact[c]) not in facts:
                out[c, 0], out[c, 1] = a, b
        return out

    @property
    def num_texts(self) -> int:
        return self.fact.numel()

    @property
    def num_images(self) -> int:
        return self.img_cats.numel()

    def true_images(self, c: Tensor) -> Tensor:
        """``(B, Ni)`` bool: image ``i`` makes caption ``c[b]`` true."""
        f = self.fact[c]
        lo, hi = torch.searchsorted(self._by_fact, f), torch.searchsorted(self._by_fact, f, right=True)
        out = torch.zeros(len(f), self.num_images, dtype=torch.bool)
        for b in range(len(f)):  # the images holding each caption's fact, from the index
            out[b, self._fact_images[lo[b]:hi[b]]] = True
        return out

    def true_texts(self, i: Tensor, texts: Optional[Tensor] = None) -> Tensor:
        """``(B, T)`` bool over ``texts`` (default: all captions): caption true of image ``i[b]``."""
        fact = self.fact if texts is None else self.fact[texts]
        # a lookup table over fact ids per image, not a (B, T, F) comparison: the pool of a large
        # world holds 10^5 captions and this runs for every image of every step
        table = torch.zeros(len(i), N_FACTS, dtype=torch.bool)
        rows, slots = (self.img_facts[i] >= 0).nonzero(as_tuple=True)
        table[rows, self.img_facts[i][rows, slots]] = True
        return table[:, fact]

    def hard_images(self, c: Tensor) -> Tensor:
        """``(B, Ni)`` bool: the image holds caption ``c[b]``'s categories and colours, yet it is false."""
        return self.bag_images(c) & ~self.true_images(c)

    def bag_images(self, c: Tensor) -> Tensor:
        """``(B, Ni)`` bool: the image holds every colour and category of caption ``c[b]``."""
        cats, cols = self.cap_cats[c][:, None], self.cap_cols[c][:, None]
        return ((self.img_cats[None, :] & cats) == cats) & ((self.img_cols[None, :] & cols) == cols)

    def object_images(self, c: Tensor) -> Tensor:
        """``(B, Ni)`` bool: the image holds both objects caption ``c[b]`` names (colour on category)."""
        k = self.cap_kinds[c]  # (B, 2)
        return self.img_kinds[:, k[:, 0]].t() & self.img_kinds[:, k[:, 1]].t()

    def object_texts(self, i: Tensor, texts: Optional[Tensor] = None) -> Tensor:
        """``(B, T)`` bool over ``texts``: both objects the caption names occur in image ``i[b]``."""
        k = self.cap_kinds if texts is None else self.cap_kinds[texts]  # (T, 2)
        have = self.img_kinds[i]  # (B, kinds)
        return have[:, k[:, 0]] & have[:, k[:, 1]]

    def hard_texts(self, i: Tensor, texts: Optional[Tensor] = None) -> Tensor:
        """``(B, T)`` bool over ``texts``: the caption's categories and colours occur in image ``i[b]``, yet it is false."""
        return self.bag_texts(i, texts) & ~self.true_texts(i, texts)

    def bag_texts(self, i: Tensor, texts: Optional[Tensor] = None) -> Tensor:
        """``(B, T)`` bool over ``texts``: every colour and category of the caption occurs in image ``i[b]``."""
        tc = self.cap_cats if texts is None else self.cap_cats[texts]
        tk = self.cap_cols if texts is None else self.cap_cols[texts]
        cats, cols = self.img_cats[i][:, None], self.img_cols[i][:, None]
        return ((tc[None, :] & cats) == tc[None, :]) & ((tk[None, :] & cols) == tk[None, :])


def _draw(g: torch.Generator, k: int, allowed: Tensor, hard: Optional[Tensor], p_hard: float, what: str) -> Tensor:
    """``k`` distinct indices where ``allowed``; each slot from ``hard`` (a subset) with
    probability ``p_hard`` while hard ones remain, else from the rest of ``allowed``."""
    n_allowed = int(allowed.sum())
    if k > n_allowed:
        raise ValueError(f"asked for {k} negative {what}; only {n_allowed} are not true matches")
    key = torch.rand(allowed.shape, generator=g)
    if hard is None or p_hard <= 0:
        return key.masked_fill(~allowed, -1.0).topk(k).indices
    n_hard = int((torch.rand(k, generator=g) < p_hard).sum())
    hard_idx = key.masked_fill(~hard, -1.0).topk(min(n_hard, int(hard.sum()))).indices
    rest = allowed.clone()
    rest[hard_idx] = False
    rest_idx = key.masked_fill(~rest, -1.0).topk(k - hard_idx.numel()).indices
    return torch.cat([hard_idx, rest_idx])[torch.randperm(k, generator=g)]


class NegativeSampler:
    """Negative candidates for training positives (see the module docstring).

    ``txt2img`` (Nc,): each caption's own image; ``pool`` (P,): the captions negatives may be
    drawn from; ``truth``: a :class:`SceneTruth` of the split, or None (real data).
    """

    def __init__(self, txt2img: Tensor, pool: Tensor, num_images: int, truth: Optional[SceneTruth] = None,
                 p_hard: float = 0.0, hard_pool: str = "bag", p_swap: float = 0.0, swap_rows: Optional[Tensor] = None):
        if not 0.0 <= p_hard <= 1.0:
            raise ValueError(f"data.p_hard must be in [0, 1], got {p_hard}")
        if not 0.0 <= p_swap <= 1.0:
            raise ValueError(f"data.p_swap must be in [0, 1], got {p_swap}")
        if p_swap > 0 and swap_rows is None:
            raise ValueError(f"data.p_swap={p_swap}: box-swapped images need the scenes of a synthetic world "
                             f"(real data has no scene truth)")
        if hard_pool not in HARD_POOLS:
            raise ValueError(f"data.hard_pool must be one of {list(HARD_POOLS)}, got {hard_pool!r}")
        if p_hard > 0 and truth is None:
            raise ValueError(f"data.p_hard={p_hard}: compositional hard negatives need the scenes of a "
                             f"synthetic world (real data has no scene truth)")
        self.txt2img, self.pool, self.num_images = txt2img.long().cpu(), pool.long().cpu(), int(num_images)
        self._pool_img = self.txt2img[self.pool]
        self.truth, self.p_hard, self.hard_pool = truth, float(p_hard), hard_pool
        self.p_swap, self.swap_rows = float(p_swap), swap_rows

    def swap(self, c: int, g: torch.Generator) -> Optional[Tuple[int, int]]:
        """With probability ``p_swap``, the rows ``(a, b)`` of caption ``c``'s own image whose
        boxes exchanged give its box-swapped negative (None: no swap this time, or none exists)."""
        if self.p_swap <= 0 or float(torch.rand(1, generator=g)) >= self.p_swap:
            return None
        a, b = (int(x) for x in self.swap_rows[c])
        return (a, b) if a >= 0 else None

    def images(self, c: int, k: int, g: torch.Generator) -> Tensor:
        """``(k,)`` negative images for caption ``c``."""
        allowed = torch.ones(self.num_images, dtype=torch.bool)
        allowed[self.txt2img[c]] = False
        hard = None
        if self.truth is not None:
            cc = torch.tensor([c])
            true = self.truth.true_images(cc)[0]
            allowed &= ~true
            if self.p_hard > 0:
                near = self.truth.bag_images(cc) if self.hard_pool == "bag" else self.truth.object_images(cc)
                hard = near[0] & ~true
        return _draw(g, k, allowed, hard, self.p_hard, f"images for caption {c}")

    def texts(self, i: int, k: int, g: torch.Generator) -> Tensor:
        """``(k,)`` negative captions (from the pool) for image ``i``."""
        allowed = self._pool_img != i
        hard = None
        if self.truth is not None:
            ii = torch.tensor([i])
            true = self.truth.true_texts(ii, self.pool)[0]
            allowed &= ~true
            if self.p_hard > 0:
                near = (self.truth.bag_texts(ii, self.pool) if self.hard_pool == "bag"
                        else self.truth.object_texts(ii, self.pool))
                hard = near[0] & ~true
        return self.pool[_draw(g, k, allowed, hard, self.p_hard, f"captions for image {i}")]


def truth_for_split(split, text_of: Mapping[str, str], scenes: Mapping[str, Sequence[Mapping]],
                    where: str = "scenes") -> SceneTruth:
    """The :class:`SceneTruth` of a ``RetrievalSplit``: ``text_of`` maps caption ids to raw
    texts, ``scenes`` image ids to the world's ``scenes.jsonl`` records (file ``where``)."""
    missing = [i for i in split.image_ids if i not in scenes]
    if missing:
        raise ValueError(f"{where}: no scene for {len(missing)} image(s) of split {split.name!r}, e.g. {missing[:3]}")
    return SceneTruth([text_of[c] for c in split.caption_ids], [scenes[i] for i in split.image_ids],
                      split.caption_ids)


__all__ = ["SceneTruth", "NegativeSampler", "parse_caption", "scene_facts", "scene_layout", "fact_id", "truth_for_split"]
