"""A synthetic compositional world in the project's real file formats (the default data set).

Scenes hold a few objects, each a (category, colour), on a 3 x 3 grid, among distractor
regions. A region's feature is ``E_cat[c] + E_colour[k] + noise`` (distractors: a
background class, not named in any caption); it carries no position, which is only in the
box. Captions come from a small grammar, ``a <colour> <category> <relation> a <colour>
<category>`` (three templates) with the relations ``left of``, ``right of``, ``above``, ``below`` (true by grid
cell), five per image. The Winoground-format set (``examples.jsonl`` + regions with ids
``ex_{id}_img_{k}``) holds

- relation swaps (``collapsed_tag`` Relation): "a red mug left of a blue dog" against "a
  blue dog left of a red mug"; image 1 is image 0 with the two objects' boxes exchanged;
- attribute swaps (``collapsed_tag`` Object): "a red mug left of a blue dog" against "a
  blue mug left of a red dog"; both images hold all four of red mug, blue dog, blue mug and
  red dog, and image 1 exchanges the boxes of the red and blue mug and of the blue and red dog.

In both kinds the two captions have the same multiset of tokens and the two images the
same multiset of region feature rows, so neither a bag of words nor a bag of regions can
solve a pair: only binding words to regions through the boxes can. Everything is
deterministic from the seed and generated in seconds into a cache folder named after a
hash of the parameters.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from cacr.outputs import pid_alive

from .formats import RegionsWriter, write_captions
from .synthetic_mc import write_multiple_choice
from .tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

GENERATOR_VERSION = 2  # 2: Winoground-format set split dev/test; no training scene repeats an evaluation layout
CATEGORIES = ("mug", "dog", "cup", "ball", "cat", "car", "tree", "chair", "book", "lamp", "bird", "box")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
BACKGROUND = ("sky", "grass", "wall", "floor", "road", "water")  # distractor classes, never named
RELATIONS = ("left of", "right of", "above", "below")
POSITIONS = ("left", "right", "above", "below")  # absolute captions: first column, last column, top row, bottom row
ABSOLUTE_TEMPLATE = "{ia} {a} is {p}"
TEMPLATES = ("{ia} {a} {r} {ib} {b}", "there is {ia} {a} {r} {ib} {b}", "the {a} is {r} the {b}")
WORDS = ("a", "an", "the", "there", "is", "left", "right", "of", "above", "below")
GRID = 3


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    img_dim: int = 64
    vocab_size: int = 64
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    n_winoground: int = 400  # half relation swaps, half attribute swaps; half dev, half test
    min_objects: int = 2
    max_objects: int = 4
    min_distractors: int = 3
    max_distractors: int = 6
    noise: float = 0.5  # std of the per-region feature noise (embeddings have unit std)
    captions_per_image: int = 5
    twin_prob: float = 0.2  # chance a scene is followed by its twin with two objects' boxes exchanged
    n_categories: int = len(CATEGORIES)  # the first n categories and colours are used: a smaller inventory
    n_colours: int = len(COLOURS)  # makes random images share the named objects, so binding pays off
    absolute_captions: int = 0  # extra captions per training image placing one object on the grid's edge ("a red mug is left")
    novel_pairs: int = 0  # object-kind pairs (with their attribute-swap partners) no training caption ever relates
    n_novel: int = 0  # Winoground-format examples of the compositional split ("split": "novel") on those pairs

    def __post_init__(self):
        if not 2 <= self.n_categories <= len(CATEGORIES) or not 2 <= self.n_colours <= len(COLOURS):
            raise ValueError(f"synthetic world: n_categories={self.n_categories} and n_colours={self.n_colours} "
                             f"must be in [2, {len(CATEGORIES)}] and [2, {len(COLOURS)}]")
        if self.absolute_captions < 0:
            raise ValueError(f"synthetic world: absolute_captions={self.absolute_captions} must be >= 0 "
                             f"(extra captions per training image)")
        if self.novel_pairs < 0 or self.n_novel < 0 or (self.n_novel and not self.novel_pairs):
            raise ValueError(f"synthetic world: n_novel={self.n_novel} needs novel_pairs > 0 (got {self.novel_pairs}); "
                             f"both must be >= 0")
        if self.novel_pairs and (self.n_categories < 2 or self.n_colours < 2):
            raise ValueError("synthetic world: novel_pairs needs at least 2 categories and 2 colours")
        if self.n_categories * self.n_colours < self.max_objects:
            raise ValueError(f"synthetic world: {self.n_categories} x {self.n_colours} object kinds cannot fill a "
                             f"scene of max_objects={self.max_objects} distinct objects")

    def key(self) -> str:
        fields = asdict(self)
        for k in ("absolute_captions", "novel_pairs", "n_novel"):  # added later: worlds without them keep their names
            if not fields[k]:
                del fields[k]
        blob = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    regions: Path
    captions: Path
    vocab: Path
    scenes: Path
    winoground_examples: Path
    winoground_regions: Path
    winoground_scenes: Path
    winoground_dev: Path  # the dev half of examples.jsonl (choose settings on it)
    winoground_test: Path  # the test half (report it once)

    @classmethod
    def under(cls, root) -> "SyntheticPaths":
        root = Path(root)
        w = root / "winoground"
        return cls(root, root / "regions.h5", root / "captions.h5", root / "vocab.txt", root / "scenes.jsonl",
                   w / "examples.jsonl", w / "regions.h5", w / "scenes.jsonl", w / "dev.jsonl", w / "test.jsonl")


def synthetic_vocab(vocab_size: int) -> List[str]:
    """BERT-style vocabulary: specials, the grammar's words, then ``[unused*]`` up to ``vocab_size``."""
    words = list(SPECIAL_TOKENS) + list(WORDS) + list(CATEGORIES) + list(COLOURS) + ["."]
    if vocab_size < len(words):
        raise ValueError(f"synthetic world: vocab_size={vocab_size} is below the {len(words)} tokens it needs")
    return words + [f"[unused{i}]" for i in range(vocab_size - len(words))]


# ------------------------------------------------------------------ scenes


@dataclass
class Region:
    kind: str  # "object" or "distractor"
    category: str
    colour: str
    cell: Optional[Tuple[int, int]]  # (row, col) for objects
    box: np.ndarray  # (4,) x1 y1 x2 y2
    feature: np.ndarray  # (D,)

    def name(self) -> str:
        return f"{self.colour} {self.category}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "category": self.category, "colour": self.colour,
                "box": [round(float(v), 6) for v in self.box]}


def layout(regions: List[Region]) -> Tuple:
    """The named content of a scene: its objects as sorted (category, colour, cell) triples.
    Two scenes with the same layout differ only in feature noise, exact boxes and distractors."""
    return tuple(sorted((g.category, g.colour, g.cell) for g in regions if g.kind == "object"))


def relation_holds(a: Region, b: Region, rel: str) -> bool:
    (ra, ca), (rb, cb) = a.cell, b.cell
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


class World:
    """Feature embeddings and samplers shared by all scenes of one seed."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        ss = np.random.SeedSequence(cfg.seed)
        emb, self._streams = ss.spawn(2)
        r = np.random.default_rng(emb)
        D = cfg.img_dim
        self.e_cat = r.standard_normal((len(CATEGORIES), D))
        self.e_col = r.standard_normal((len(COLOURS), D))
        self.e_bg = r.standard_normal((len(BACKGROUND), D))
        self.e_bg_col = r.standard_normal((len(COLOURS), D)) * 0.5

    def rng(self, name: str) -> np.random.Generator:
        salt = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
        return np.random.default_rng([self.cfg.seed, salt, GENERATOR_VERSION])

    def object(self, r: np.random.Generator, cat: int, col: int, cell) -> Region:
        row, colm = cell
        w, h = r.uniform(0.12, 0.22, 2)
        cx = (colm + 0.5) / GRID + r.uniform(-0.04, 0.04)
        cy = (row + 0.5) / GRID + r.uniform(-0.04, 0.04)
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        feat = self.e_cat[cat] + self.e_col[col] + self.cfg.noise * r.standard_normal(self.cfg.img_dim)
        return Region("object", CATEGORIES[cat], COLOURS[col], (int(row), int(colm)), box, feat)

    def distractor(self, r: np.random.Generator) -> Region:
        k, col = int(r.integers(len(BACKGROUND))), int(r.integers(len(COLOURS)))
        x1, y1 = r.uniform(0, 0.7, 2)
        x2, y2 = x1 + r.uniform(0.1, 1 - x1), y1 + r.uniform(0.1, 1 - y1)
        feat = self.e_bg[k] + self.e_bg_col[col] + self.cfg.noise * r.standard_normal(self.cfg.img_dim)
        return Region("distractor", BACKGROUND[k], COLOURS[col], None,
                      np.clip(np.array([x1, y1, x2, y2]), 0, 1), feat)

    def distractors(self, r) -> List[Region]:
        n = int(r.integers(self.cfg.min_distractors, self.cfg.max_distractors + 1))
        return [self.distractor(r) for _ in range(n)]

    def scene(self, r: np.random.Generator) -> List[Region]:
        n = int(r.integers(self.cfg.min_objects, self.cfg.max_objects + 1))
        cells = r.choice(GRID * GRID, n, replace=False)
        n_col = self.cfg.n_colours
        kinds = r.choice(self.cfg.n_categories * n_col, n, replace=False)
        objs = [self.object(r, int(k) // n_col, int(k) % n_col, divmod(int(c), GRID))
                for k, c in zip(kinds, cells)]
        return objs + self.distractors(r)


def swap_boxes(regions: List[Region], i: int, j: int) -> List[Region]:
    """A copy of the scene with regions ``i`` and ``j`` exchanging box and cell (features kept)."""
    out = [Region(g.kind, g.category, g.colour, g.cell, g.box.copy(), g.feature) for g in regions]
    out[i].box, out[j].box = regions[j].box.copy(), regions[i].box.copy()
    out[i].cell, out[j].cell = regions[j].cell, regions[i].cell
    return out


def caption_for(a: Region, b: Region, rel: str, template: str) -> str:
    art = lambda g: "an" if g.colour[0] in "aeiou" else "a"  # noqa: E731
    return template.format(a=a.name(), b=b.name(), r=rel, ia=art(a), ib=art(b))


def kind(g: Region) -> Tuple[str, str]:
    return (g.category, g.colour)


def scene_captions(r: np.random.Generator, regions: List[Region], k: int, held_out_pairs=None) -> List[str]:
    """``k`` distinct true relational captions of the scene; with ``held_out_pairs`` (a set of
    frozensets of two object kinds) none relates such a pair (empty if every fact does)."""
    objs = [g for g in regions if g.kind == "object"]
    facts = [(a, b, rel) for a in objs for b in objs if a is not b for rel in RELATIONS if relation_holds(a, b, rel)]
    if held_out_pairs:
        facts = [f for f in facts if frozenset((kind(f[0]), kind(f[1]))) not in held_out_pairs]
        if not facts:
            return []
    out: List[str] = []
    seen = set()
    for _ in range(50 * k):
        a, b, rel = facts[int(r.integers(len(facts)))]
        c = caption_for(a, b, rel, TEMPLATES[int(r.integers(len(TEMPLATES)))])
        if c not in seen or len(seen) >= len(facts) * len(TEMPLATES):
            seen.add(c)
            out.append(c)
        if len(out) == k:
            break
    return out


def absolute_holds(cell: Tuple[int, int], pos: str) -> bool:
    row, col = cell
    return {"left": col == 0, "right": col == GRID - 1, "above": row == 0, "below": row == GRID - 1}[pos]


def absolute_captions(r: np.random.Generator, regions: List[Region], k: int) -> List[str]:
    """``k`` distinct captions (fewer if the scene has fewer facts) that place one object on the
    grid's edge: "a red mug is left" (first column), "right" (last), "above" (top row), "below"
    (bottom row). They read a grounded object's position on its own, a step below comparing
    two (experiments/binding_study/LOG.md, "What the probe showed")."""
    art = lambda g: "an" if g.colour[0] in "aeiou" else "a"  # noqa: E731
    facts = [ABSOLUTE_TEMPLATE.format(ia=art(g), a=g.name(), p=pos)
             for g in regions if g.kind == "object" for pos in POSITIONS if absolute_holds(g.cell, pos)]
    return [facts[i] for i in sorted(r.permutation(len(facts))[:k])]


def shuffled(r: np.random.Generator, regions: List[Region]) -> List[Region]:
    return [regions[i] for i in r.permutation(len(regions))]


def relation_swap_example(world: World, r: np.random.Generator, kinds=None):
    """Two objects, a relation that holds between them, and the scene with their boxes
    exchanged; ``kinds`` ((category, colour) index pairs of the two objects) fixes which."""
    if kinds is None:
        objs = world.scene(r)
        objs = [g for g in objs if g.kind == "object"][:2] + world.distractors(r)
    else:
        cells = [divmod(int(c), GRID) for c in r.choice(GRID * GRID, 2, replace=False)]
        objs = [world.object(r, ca, co, cell) for (ca, co), cell in zip(kinds, cells)] + world.distractors(r)
    a, b = objs[0], objs[1]
    rels = [rel for rel in RELATIONS if relation_holds(a, b, rel)]
    rel = rels[int(r.integers(len(rels)))]
    img0 = objs
    img1 = swap_boxes(objs, 0, 1)
    template = TEMPLATES[0]
    return img0, img1, caption_for(a, b, rel, template), caption_for(b, a, rel, template), rel


def attribute_swap_example(world: World, r: np.random.Generator, cats_cols=None):
    """``cats_cols`` (cat1, cat2, col1, col2) fixes the four objects: (cat1, col1) rel (cat2, col2)
    against (cat1, col2) rel (cat2, col1)."""
    if cats_cols is None:
        cat1, cat2 = r.choice(world.cfg.n_categories, 2, replace=False)
        col1, col2 = r.choice(world.cfg.n_colours, 2, replace=False)
    else:
        cat1, cat2, col1, col2 = cats_cols
    rel = RELATIONS[int(r.integers(len(RELATIONS)))]
    probe = lambda cell: Region("object", "", "", cell, np.zeros(4), np.zeros(1))  # noqa: E731
    while True:  # cells for A, B (A rel B) and A', B' (B' rel A')
        cells = [divmod(int(c), GRID) for c in r.choice(GRID * GRID, 4, replace=False)]
        pa, pb, pa2, pb2 = (probe(c) for c in cells)
        if relation_holds(pa, pb, rel) and relation_holds(pb2, pa2, rel) and not relation_holds(pa2, pb2, rel):
            break
    A = world.object(r, int(cat1), int(col1), cells[0])
    B = world.object(r, int(cat2), int(col2), cells[1])
    A2 = world.object(r, int(cat1), int(col2), cells[2])
    B2 = world.object(r, int(cat2), int(col1), cells[3])
    img0 = [A, B, A2, B2] + world.distractors(r)
    img1 = swap_boxes(swap_boxes(img0, 0, 2), 1, 3)
    template = TEMPLATES[0]
    return img0, img1, caption_for(A, B, rel, template), caption_for(A2, B2, rel, template), rel


def held_out_pairs(world: World) -> List[Tuple[int, int, int, int]]:
    """``cfg.novel_pairs`` quadruples (cat1, cat2, col1, col2), cat1 != cat2 and col1 != col2,
    drawn without repeats: each holds out the kind pairs {(cat1, col1), (cat2, col2)} and its
    attribute-swap partner {(cat1, col2), (cat2, col1)} (so both captions of an attribute swap
    on them are new compositions)."""
    cfg = world.cfg
    r = world.rng("novel_pairs")
    quads, seen = [], set()
    candidates = [(c1, c2, k1, k2) for c1 in range(cfg.n_categories) for c2 in range(c1 + 1, cfg.n_categories)
                  for k1 in range(cfg.n_colours) for k2 in range(k1 + 1, cfg.n_colours)]
    if cfg.novel_pairs > len(candidates):
        raise ValueError(f"synthetic world: novel_pairs={cfg.novel_pairs} exceeds the {len(candidates)} "
                         f"(category pair, colour pair) choices of a {cfg.n_categories} x {cfg.n_colours} inventory")
    for i in r.permutation(len(candidates)):
        c1, c2, k1, k2 = candidates[int(i)]
        pairs = {frozenset({(c1, k1), (c2, k2)}), frozenset({(c1, k2), (c2, k1)})}
        if pairs & seen:
            continue
        seen |= pairs
        quads.append((c1, c2, k1, k2))
        if len(quads) == cfg.novel_pairs:
            break
    return quads


def _named_pairs(quads) -> set:
    """The held-out pairs as frozensets of (category name, colour name)."""
    out = set()
    for c1, c2, k1, k2 in quads:
        for (a, ka), (b, kb) in (((c1, k1), (c2, k2)), ((c1, k2), (c2, k1))):
            out.add(frozenset({(CATEGORIES[a], COLOURS[ka]), (CATEGORIES[b], COLOURS[kb])}))
    return out


# ------------------------------------------------------------------ writing


def _boxes6(regions: List[Region]) -> np.ndarray:
    b = np.stack([g.box for g in regions]).astype(np.float32)
    return np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1)


def _write_regions(path: Path, scenes: Dict[str, List[Region]], cfg: SyntheticConfig, source: str) -> None:
    with RegionsWriter(path, feature_dim=cfg.img_dim, feature_source=source) as w:
        for image_id, regions in scenes.items():
            w.add(image_id, np.stack([g.feature for g in regions]).astype(np.float16), _boxes6(regions))


def _write_scenes(path: Path, scenes: Dict[str, List[Region]]) -> None:
    with open(path, "w") as f:
        for image_id, regions in scenes.items():
            f.write(json.dumps({"image_id": image_id, "regions": [g.to_json() for g in regions]}) + "\n")


def generate(cfg: SyntheticConfig, out_dir) -> SyntheticPaths:
    """Generate the whole world into ``out_dir`` (which must not exist yet)."""
    paths = SyntheticPaths.under(out_dir)
    (paths.root / "winoground").mkdir(parents=True)
    world = World(cfg)
    tok = WordPieceTokenizer(synthetic_vocab(cfg.vocab_size), name="synthetic")
    tok.save_vocab(paths.vocab)
    source = (f"synthetic world v{GENERATOR_VERSION}: E_cat[c] + E_colour[k] + {cfg.noise} * N(0, I), "
              f"dim {cfg.img_dim}, seed {cfg.seed}")

    # The Winoground-format set first: no retrieval scene may repeat one of its layouts, so no
    # training positive or negative is an evaluation item.
    wscenes: Dict[str, List[Region]] = {}
    wexamples = []
    r = world.rng("winoground")
    for ex in range(cfg.n_winoground):
        relation = ex % 2 == 0
        img0, img1, c0, c1, rel = (relation_swap_example if relation else attribute_swap_example)(world, r)
        wscenes[f"ex_{ex}_img_0"] = shuffled(r, img0)
        wscenes[f"ex_{ex}_img_1"] = shuffled(r, img1)
        wexamples.append({
            "id": ex, "image_0": f"ex_{ex}_img_0", "image_1": f"ex_{ex}_img_1",
            "caption_0": c0, "caption_1": c1,
            "tag": "Relation" if relation else "Object",
            "secondary_tag": "", "num_main_preds": 1,
            "collapsed_tag": "Relation" if relation else "Object",
            "relation": rel,
            "split": "dev" if (ex // 2) % 2 == 0 else "test",  # both tags in both halves
        })
    quads = held_out_pairs(world) if cfg.novel_pairs else []
    never_related = _named_pairs(quads)
    r = world.rng("novel_examples")
    for i in range(cfg.n_novel):  # the compositional split: every caption relates a held-out pair
        ex = cfg.n_winoground + i
        relation = i % 2 == 0
        c1, c2, k1, k2 = quads[int(r.integers(len(quads)))]
        if relation:
            kinds = [(c1, k1), (c2, k2)] if r.random() < 0.5 else [(c1, k2), (c2, k1)]
            img0, img1, cap0, cap1, rel = relation_swap_example(world, r, kinds[:: 1 if r.random() < 0.5 else -1])
        else:
            img0, img1, cap0, cap1, rel = attribute_swap_example(world, r, (c1, c2, k1, k2))
        wscenes[f"ex_{ex}_img_0"] = shuffled(r, img0)
        wscenes[f"ex_{ex}_img_1"] = shuffled(r, img1)
        wexamples.append({
            "id": ex, "image_0": f"ex_{ex}_img_0", "image_1": f"ex_{ex}_img_1", "caption_0": cap0, "caption_1": cap1,
            "tag": "Relation" if relation else "Object", "secondary_tag": "", "num_main_preds": 1,
            "collapsed_tag": "Relation" if relation else "Object", "relation": rel, "split": "novel",
        })
    held_out = {layout(g) for g in wscenes.values()}

    scenes: Dict[str, List[Region]] = {}
    cap_ids, img_ids, texts, splits = [], [], [], []
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        r = world.rng(f"split:{split}")
        prev = None
        for i in range(n):
            regions = None
            if prev is not None and r.random() < cfg.twin_prob:
                objs = [k for k, g in enumerate(prev) if g.kind == "object"]
                a, b = r.choice(objs, 2, replace=False)
                regions = swap_boxes(prev, int(a), int(b))
                prev = None  # no twin of a twin
                if layout(regions) in held_out:
                    regions = None
            if regions is None:
                regions = world.scene(r)
                while layout(regions) in held_out:
                    regions = world.scene(r)
                prev = regions
            image_id = f"syn_{split}_{i:05d}"
            scenes[image_id] = shuffled(r, regions)
            caps = scene_captions(r, regions, cfg.captions_per_image,
                                  never_related if split == "train" else None)
            while not caps:  # every fact of the scene relates a held-out pair: draw another (train only)
                regions = world.scene(r)
                while layout(regions) in held_out:
                    regions = world.scene(r)
                prev = regions
                scenes[image_id] = shuffled(r, regions)
                caps = scene_captions(r, regions, cfg.captions_per_image, never_related)
            if cfg.absolute_captions and split == "train":  # evaluation splits keep the relational captions only
                caps += absolute_captions(r, regions, cfg.absolute_captions)
            for k, c in enumerate(caps):
                cap_ids.append(f"{image_id}_{k}")
                img_ids.append(image_id)
                texts.append(c)
                splits.append(split)
    _write_regions(paths.regions, scenes, cfg, source)
    _write_scenes(paths.scenes, scenes)
    write_captions(paths.captions, caption_ids=cap_ids, image_ids=img_ids, texts=texts,
                   token_ids=[tok.encode(t) for t in texts], splits=splits, known_image_ids=scenes.keys(),
                   **tok.file_attrs())

    halves = [(paths.winoground_examples, ("dev", "test", "novel")), (paths.winoground_dev, ("dev",)),
              (paths.winoground_test, ("test",))]
    if cfg.n_novel:
        halves.append((paths.root / "winoground" / "novel.jsonl", ("novel",)))
        with open(paths.root / "winoground" / "held_out_pairs.json", "w") as f:
            json.dump(sorted(sorted(" ".join((col, cat)) for cat, col in p) for p in never_related), f, indent=1)
    for path, keep in halves:
        with open(path, "w") as f:
            for e in wexamples:
                if e["split"] in keep:
                    f.write(json.dumps(e) + "\n")
    write_multiple_choice(paths.winoground_examples, paths.winoground_examples.parent / "multiple_choice.jsonl")
    _write_regions(paths.winoground_regions, wscenes, cfg, source)
    _write_scenes(paths.winoground_scenes, wscenes)
    with open(paths.root / "MANIFEST.json", "w") as f:
        json.dump({"generator_version": GENERATOR_VERSION, **asdict(cfg)}, f, indent=1)
    return paths


def ensure_synthetic(cfg: SyntheticConfig = SyntheticConfig(), root="data/synthetic") -> SyntheticPaths:
    """The world for ``cfg`` under ``root/<seed>-<hash>``, generated on first use.

    Generation goes to a temporary folder renamed into place, so concurrent processes
    (DDP ranks) never see a half-written world.
    """
    final = Path(root) / f"seed{cfg.seed}-{cfg.key()}"
    paths = SyntheticPaths.under(final)
    if (final / "MANIFEST.json").is_file():
        return paths
    for stale in Path(root).glob(f".tmp-{final.name}-*"):  # left by a killed generation
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(root) / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(cfg, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "MANIFEST.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def load_scenes(path) -> Dict[str, List[dict]]:
    """``image_id -> [{"kind", "category", "colour", "box"}]`` in the regions file's row order."""
    out = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            out[d["image_id"]] = d["regions"]
    return out
