"""Compositional multiple-choice evaluation: one image, its true caption and one or more foils.

Benchmarks read in their public formats (each file's items keep the benchmark's own
categories as tags):

- ARO (Yuksekgonul et al., 2023). VG-Relation (``visual_genome_relation.json``) and
  VG-Attribution (``visual_genome_attribution.json``): a JSON list of
  ``{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", ...}``
  with ``relation_name`` (tag ``relation``) or ``attributes`` (two strings, tag
  ``attributes`` = ``"<a0>_<a1>"``). ARO scores the image cropped to the box: extract the
  regions of that crop under the image's id to do the same. COCO-Order / Flickr30k-Order:
  ARO builds them in memory from the Karpathy test captions; a JSON list of its test cases
  ``{"image", "caption_options": [true, perturbed, ...]}`` (true caption first) is read.
- SugarCrepe (Hsieh et al., 2023): one JSON object per category file (``replace_obj.json``,
  ``swap_att.json``, ``add_rel.json``, ...), ``{id: {"filename", "caption",
  "negative_caption"}}``; tags ``category`` (the file name), ``type`` (replace / swap /
  add) and ``target`` (obj / att / rel).
- VALSE (Parcalabescu et al., 2022): one JSON object per piece file (``existence.json``,
  ``counting-hard.json``, ...), ``{id: {"image_file", "caption", "foils": [...], ...}}``;
  tags ``piece`` (the file name) and ``phenomenon`` (``linguistic_phenomena``, if given).
- This project's format (``.jsonl``, the synthetic world's set, see
  ``cacr/data/synthetic_mc.py``): ``{"id", "image", "caption", "foils": [...], "tags": {...}}``.

The image of an item is looked up in a regions HDF5 file (the project's format, made with
the converters) by the file name's stem (``image_key=stem``; ``name`` keeps the suffix,
``path`` the string as given).

An item is correct when its true caption scores strictly higher than every foil (ties are
wrong, as ARO's argmax with the foil first and SugarCrepe's strict comparison make them).
Accuracy is the percentage of correct items, overall and per category of every tag, each
with a percentile-bootstrap 95% interval over items; ``macro`` is the mean accuracy over
the categories of a tag (ARO reports VG-Relation and VG-Attribution so; VG-Attribution
over attribute pairs with at least 25 items). Scoring uses the same engine as Winoground
(``score_pairs`` on a ``PairStore``, the model's ``rank`` or ``itm`` head), shares one batch
plan among DDP ranks (the same scores on any process count) and, in bf16, decides in fp32
every item whose outcome bf16 rounding could change (:mod:`cacr.evaluation.exact`).
"""
from __future__ import annotations

import functools
import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .distributed import rank_and_world_size
from .engine import score_pairs

FORMATS = ("aro_relation", "aro_attribution", "aro_order", "sugarcrepe", "valse", "jsonl")
IMAGE_KEYS = ("stem", "name", "path")
MACRO_MIN_COUNT = {"aro_attribution": 25}  # ARO's VG-Attribution table keeps pairs with >= 25 items
_SUGARCREPE = re.compile(r"^(?P<type>replace|swap|add)_(?P<target>obj|att|rel)$")


@dataclass(frozen=True)
class Item:
    key: str  # "<file stem>/<id or index>", unique within a set
    image: str  # image id in the regions file
    captions: Tuple[str, ...]  # the true caption first, then the foils
    tags: Dict[str, str] = field(default_factory=dict, compare=False)


@dataclass
class MultipleChoiceSet:
    name: str
    format: str
    files: List[Path]
    items: List[Item]


# --------------------------------------------------------------------------- readers


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _image_id(value: str, image_key: str) -> str:
    if image_key == "stem":
        return Path(value).stem
    if image_key == "name":
        return Path(value).name
    return value


def _text(path: Path, where: str, obj: Mapping, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{path}: {where}: {key!r} must be a non-empty string, got {v!r}")
    return v


def _texts(path: Path, where: str, obj: Mapping, key: str, at_least: int) -> List[str]:
    v = obj.get(key)
    if not isinstance(v, list) or len(v) < at_least or not all(isinstance(s, str) and s.strip() for s in v):
        raise ValueError(f"{path}: {where}: {key!r} must be a list of at least {at_least} non-empty "
                         f"string(s), got {v!r}")
    return v


def _entries(path: Path, obj: Any, fmt: str):
    """``(id, where, entry)`` of a list (ids are indices) or an object (ids are its keys) file."""
    if fmt in ("aro_relation", "aro_attribution", "aro_order"):
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of items ({fmt}), got {type(obj).__name__}")
        pairs = [(str(i), f"item {i}", e) for i, e in enumerate(obj)]
    else:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a JSON object {{id: item}} ({fmt}), got {type(obj).__name__}")
        pairs = [(str(k), f"item {k!r}", e) for k, e in obj.items()]
    for i, where, e in pairs:
        if not isinstance(e, dict):
            raise ValueError(f"{path}: {where}: expected a JSON object, got {type(e).__name__}")
        yield i, where, e


def detect_format(path: Path, obj: Any = None) -> str:
    """The benchmark format of ``path`` from its suffix and first item."""
    if path.suffix == ".jsonl":
        return "jsonl"
    obj = _load_json(path) if obj is None else obj
    first = obj[0] if isinstance(obj, list) and obj else (next(iter(obj.values()), None) if isinstance(obj, dict) else None)
    if isinstance(first, dict):
        if "caption_options" in first:
            return "aro_order"
        if "true_caption" in first and "relation_name" in first:
            return "aro_relation"
        if "true_caption" in first and "attributes" in first:
            return "aro_attribution"
        if "negative_caption" in first:
            return "sugarcrepe"
        if "foils" in first:
            return "valse"
    raise ValueError(f"{path}: cannot tell the format from its first item (expected ARO VG-Relation / "
                     f"VG-Attribution / order, SugarCrepe, VALSE or .jsonl); give format=<one of {list(FORMATS)}>")


def _read_jsonl(path: Path, image_key: str) -> List[Item]:
    from cacr.winoground import jsonl_objects

    items, seen = [], {}
    for lineno, obj in jsonl_objects(path, "multiple-choice file"):
        where = f"line {lineno}"
        if "id" not in obj or isinstance(obj["id"], bool) or not isinstance(obj["id"], (int, str)) or obj["id"] == "":
            raise ValueError(f"{path}: {where}: 'id' must be an integer or a non-empty string, got {obj.get('id')!r}")
        key = str(obj["id"])
        if key in seen:
            raise ValueError(f"{path}: {where}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        where = f"{where} (id {key!r})"
        tags = obj.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(v, (str, int)) for v in tags.values()):
            raise ValueError(f"{path}: {where}: 'tags' must be an object of strings, got {tags!r}")
        items.append(Item(f"{path.stem}/{key}", _image_id(_text(path, where, obj, "image"), image_key),
                          (_text(path, where, obj, "caption"), *_texts(path, where, obj, "foils", 1)),
                          {str(k): str(v) for k, v in tags.items()}))
    return items


def read_file(path, fmt: str = "auto", image_key: str = "stem") -> Tuple[str, List[Item]]:
    """``(format, items)`` of one benchmark file; ``ValueError`` naming the file and item."""
    path = Path(path)
    if image_key not in IMAGE_KEYS:
        raise ValueError(f"image_key={image_key!r}: expected one of {list(IMAGE_KEYS)}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected auto or one of {list(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if fmt == "jsonl" or (fmt == "auto" and path.suffix == ".jsonl"):
        items = _read_jsonl(path, image_key)
        fmt = "jsonl"
    else:
        obj = _load_json(path)
        fmt = detect_format(path, obj) if fmt == "auto" else fmt
        items = []
        stem = path.stem
        for i, where, e in _entries(path, obj, fmt):
            key = f"{stem}/{i}"
            if fmt in ("aro_relation", "aro_attribution"):
                caps = (_text(path, where, e, "true_caption"), _text(path, where, e, "false_caption"))
                image = _text(path, where, e, "image_path")
                if fmt == "aro_relation":
                    tags = {"relation": _text(path, where, e, "relation_name")}
                else:
                    attrs = _texts(path, where, e, "attributes", 2)
                    tags = {"attributes": f"{attrs[0]}_{attrs[1]}"}
            elif fmt == "aro_order":
                caps = tuple(_texts(path, where, e, "caption_options", 2))
                image, tags = _text(path, where, e, "image"), {}
            elif fmt == "sugarcrepe":
                caps = (_text(path, where, e, "caption"), _text(path, where, e, "negative_caption"))
                image = _text(path, where, e, "filename")
                m = _SUGARCREPE.match(stem)
                tags = {"category": stem, **({"type": m["type"], "target": m["target"]} if m else {})}
            else:  # valse
                caps = (_text(path, where, e, "caption"), *_texts(path, where, e, "foils", 1))
                image = _text(path, where, e, "image_file")
                tags = {"piece": stem}
                if isinstance(e.get("linguistic_phenomena"), str) and e["linguistic_phenomena"]:
                    tags["phenomenon"] = e["linguistic_phenomena"]
            items.append(Item(key, _image_id(image, image_key), tuple(caps), tags))
    if not items:
        raise ValueError(f"{path}: no items")
    return fmt, items


def read_set(name: str, spec, fmt: str = "auto", image_key: str = "stem", resolve=Path) -> MultipleChoiceSet:
    """A set of one or more files of one format: ``spec`` is a path, a glob or a list of them."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: List[Path] = []
    for s in specs:
        p = resolve(str(s))
        if any(ch in str(s) for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(str(p)))
            if not matched:
                raise FileNotFoundError(f"sets.{name}={s}: no file matches")
            files += matched
        else:
            files.append(p)
    if not files:
        raise ValueError(f"sets.{name}: no files")
    formats, items = set(), []
    for p in files:
        f, its = read_file(p, fmt, image_key)
        formats.add(f)
        items += its
    if len(formats) > 1:
        raise ValueError(f"sets.{name}: its files have different formats {sorted(formats)}; give each its own set")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"sets.{name}: item {dup!r} appears twice (two files of the same name?)")
    return MultipleChoiceSet(name, formats.pop(), files, items)


# --------------------------------------------------------------------------- data


class MultipleChoiceData:
    """A set's captions tokenized (``[CLS] w.. [SEP]``) and its images' rows in a regions file."""

    def __init__(self, mc: MultipleChoiceSet, regions_path, tokenizer, caps=None, in_memory: bool = True):
        from cacr.data.datasets import RegionCaps, open_regions

        self.set = mc
        self.regions = open_regions(regions_path, RegionCaps() if caps is None else caps, in_memory)
        known = set(self.regions.image_ids)
        missing = [it for it in mc.items if it.image not in known]
        if missing:
            shown = ", ".join(f"{it.key} (image {it.image!r})" for it in missing[:5])
            raise ValueError(f"{regions_path}: no regions for {len(missing)} of {len(mc.items)} items of set "
                             f"{mc.name!r}: {shown}{' ...' if len(missing) > 5 else ''}")
        self.image_rows = [self.regions.index(it.image) for it in mc.items]
        flat = [c for it in mc.items for c in it.captions]
        ids = tokenizer.encode_batch(flat)
        self.texts = [torch.tensor(tokenizer.with_specials(x), dtype=torch.long) for x in ids]
        offsets = [0]
        for it in mc.items:
            offsets.append(offsets[-1] + len(it.captions))
        self.offsets = offsets
        for n, it in enumerate(mc.items):
            for k in range(len(it.captions)):
                if self.texts[offsets[n] + k].numel() < 3:
                    what = "the caption" if k == 0 else f"foil {k}"
                    raise ValueError(f"set {mc.name!r}: item {it.key}: {what} has no word pieces ({it.captions[k]!r})")

    def caption_names(self) -> List[str]:
        return [f"item {it.key} {'caption' if k == 0 else f'foil {k}'}"
                for it in self.set.items for k in range(len(it.captions))]


def item_pairs(offsets: Sequence[int], image_rows: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """``(pairs (P, 2), where (P, 2))``: caption ``c`` of item ``n`` against the item's image,
    and its place ``[n, k]`` in the ``(N, K)`` score table."""
    pairs, where = [], []
    for n in range(len(offsets) - 1):
        for k, c in enumerate(range(offsets[n], offsets[n + 1])):
            pairs.append((c, image_rows[n]))
            where.append((n, k))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.tensor(where, dtype=torch.long).view(-1, 2)


def score_items(score_fn, texts: Sequence[Tensor], offsets: Sequence[int], image_rows: Sequence[int], images,
                *, group=None, progress: bool = False, **kwargs) -> Tensor:
    """``(N, K)`` scores of N items, ``[n, k]`` = caption ``k`` of item ``n`` (0 the true one)
    against its image, NaN where an item has fewer than K captions. Under DDP the ranks share
    the batches of one plan (``score_pairs(shard=True)``); every rank gets the whole table."""
    N = len(offsets) - 1
    K = max(offsets[n + 1] - offsets[n] for n in range(N))
    rank, _ = rank_and_world_size(group)
    pairs, where = item_pairs(offsets, image_rows)
    s = score_pairs(score_fn, pairs, texts, images, progress=progress and rank == 0, desc="multiple choice",
                    shard=True, group=group, **kwargs)
    out = torch.full((N, K), float("nan"))
    out[where[:, 0], where[:, 1]] = s
    return out


# --------------------------------------------------------------------------- metrics


def correct_items(scores: Tensor) -> Tensor:
    """``(N,)`` bool: the true caption (column 0) strictly above every foil (NaN = no caption)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores: expected (items, >= 2 captions), got shape {tuple(scores.shape)}")
    if torch.isnan(scores[:, :2]).any():
        raise ValueError(f"scores: item(s) {torch.isnan(scores[:, :2]).any(1).nonzero().flatten()[:10].tolist()} "
                         f"lack a score for the caption or the first foil")
    foils = scores[:, 1:].nan_to_num(nan=float("-inf"))
    return scores[:, 0] > foils.max(1).values


def _resamples(n: int, n_boot: int, seed: int, chunk_elems: int = 1 << 20):
    """Bootstrap index blocks ``(b, n)`` from one seeded generator, ``n_boot`` rows in all."""
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, chunk_elems // max(n, 1))
    for start in range(0, n_boot, chunk):
        yield torch.randint(n, (min(chunk, n_boot - start), n), generator=gen)


def macro_of_resamples(correct: Tensor, cats: Tensor, idx: Tensor, num_cats: int) -> Tensor:
    """Mean over categories (those drawn at least once) of each resample's per-category
    accuracy; ``idx`` ``(b, n)``, ``cats`` ``(n,)`` in ``[0, num_cats)``. Returns ``(b,)``."""
    c = cats[idx]  # (b, n)
    hits = torch.zeros(idx.shape[0], num_cats, dtype=torch.float64).scatter_add_(1, c, correct[idx].double())
    count = torch.zeros(idx.shape[0], num_cats, dtype=torch.float64).scatter_add_(1, c, torch.ones_like(c, dtype=torch.float64))
    present = count > 0
    acc = torch.where(present, hits / count.clamp(min=1), torch.zeros_like(hits))
    return acc.sum(1) / present.sum(1)


def _interval(values: Tensor, level: float) -> List[float]:
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(values, q).tolist()
    return [100.0 * lo, 100.0 * hi]


def accuracy_summary(correct: Tensor, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """``{"accuracy" (percent), "n", "ci95"}`` with a percentile-bootstrap interval over items."""
    correct = torch.as_tensor(correct, dtype=torch.bool)
    n = correct.numel()
    if n == 0:
        raise ValueError("no items to score")
    out: Dict[str, Any] = {"accuracy": 100.0 * correct.double().mean().item(), "n": n}
    if n_boot:
        means = torch.cat([correct[idx].double().mean(1) for idx in _resamples(n, n_boot, seed)])
        out[f"ci{round(level * 100)}"] = _interval(means, level)
    return out


def macro_summary(correct: Tensor, labels: Sequence[str], *, min_count: int = 1, n_boot: int = 10000,
                  level: float = 0.95, seed: int = 0) -> Optional[Dict[str, Any]]:
    """Mean per-category accuracy over the categories with at least ``min_count`` items, and
    its bootstrap interval (items of those categories resampled); ``None`` if there are none."""
    counts: Dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    kept = sorted(c for c, k in counts.items() if k >= min_count)
    if not kept:
        return None
    code = {c: i for i, c in enumerate(kept)}
    rows = torch.tensor([i for i, lab in enumerate(labels) if lab in code], dtype=torch.long)
    cats = torch.tensor([code[labels[i]] for i in rows.tolist()], dtype=torch.long)
    corr = torch.as_tensor(correct, dtype=torch.bool)[rows]
    point = macro_of_resamples(corr, cats, torch.arange(len(rows))[None], len(kept))[0].item()
    out: Dict[str, Any] = {"accuracy": 100.0 * point, "n_categories": len(kept), "n": len(rows),
                           "min_count": min_count}
    if n_boot:
        vals = torch.cat([macro_of_resamples(corr, cats, idx, len(kept)) for idx in _resamples(len(rows), n_boot, seed)])
        out[f"ci{round(level * 100)}"] = _interval(vals, level)
    return out


def set_results(mc: MultipleChoiceSet, scores: Tensor, *, n_boot: int = 10000, seed: int = 0) -> Dict[str, Any]:
    """The results record of one set: accuracy, CI, chance, by tag (per category) and macro."""
    correct = correct_items(scores)
    out = accuracy_summary(correct, n_boot=n_boot, seed=seed)
    out["chance"] = 100.0 * sum(1.0 / len(it.captions) for it in mc.items) / len(mc.items)
    out.update(format=mc.format, files=[str(p) for p in mc.files])
    tags = sorted({t for it in mc.items for t in it.tags})
    out["by_tag"], out["macro"] = {}, {}
    for t in tags:
        labels = [it.tags.get(t) for it in mc.items]
        members: Dict[str, List[int]] = {}
        for i, lab in enumerate(labels):
            if lab is not None:
                members.setdefault(lab, []).append(i)
        out["by_tag"][t] = {c: accuracy_summary(correct[torch.tensor(ix)], n_boot=n_boot, seed=seed)
                            for c, ix in sorted(members.items())}
        have = [i for i, lab in enumerate(labels) if lab is not None]
        macro = macro_summary(correct[torch.tensor(have)], [labels[i] for i in have],
                              min_count=MACRO_MIN_COUNT.get(mc.format, 1), n_boot=n_boot, seed=seed)
        if macro is not None:
            out["macro"][t] = macro
    return out


def _cell(r: Mapping[str, Any]) -> str:
    cell = f"{r['accuracy']:.2f}"
    if r.get("ci95"):
        lo, hi = r["ci95"]
        cell += f" [{lo:.1f}, {hi:.1f}]"
    return cell


def results_markdown(name: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """The overall table (a row per set) and, per set, a table per tag; cells ``accuracy [95% CI]``."""
    out = ["| model | set | format | n | accuracy | chance |", "|---|---|---|---:|---:|---:|"]
    for s, r in results.items():
        out.append(f"| {name} | {s} | {r['format']} | {r['n']} | {_cell(r)} | {r['chance']:.2f} |")
    for s, r in results.items():
        for t, cats in r.get("by_tag", {}).items():
            m = r.get("macro", {}).get(t)
            macro = (f" (macro {_cell(m)} over {m['n_categories']} categories"
                     + (f" with >= {m['min_count']} items" if m["min_count"] > 1 else "") + ")") if m else ""
            out += ["", f"`{s}` by `{t}`{macro}:", "", f"| {t} | n | accuracy |", "|---|---:|---:|"]
            out += [f"| {c} | {v['n']} | {_cell(v)} |" for c, v in cats.items()]
    return "\n".join(out) + "\n"


def evaluate_multiple_choice(model, data: MultipleChoiceData, *, head: str = "rank", batch_size: int = 512,
                             device=None, bf16: bool = False, progress: bool = False, n_boot: int = 10000,
                             seed: int = 0, exact: bool = True) -> Tuple[Tensor, Dict[str, Any]]:
    """Scores ``(N, K)`` and the results record of one set, with a model in eval mode; in bf16
    (unless ``exact=False``) every item bf16 could decide wrongly is re-scored in fp32
    (:mod:`cacr.evaluation.exact`), recorded under ``scoring``."""
    if model.training:
        raise ValueError("evaluation needs the model in eval mode (dropout off): call model.eval()")
    from .engine import memoized
    from .exact import exact_choices, plain_record

    device = device or next(model.parameters()).device
    fn = functools.partial(model.score, head=head)
    scores = score_items(fn, data.texts, data.offsets, data.image_rows, data.regions.get, batch_size=batch_size,
                         device=device, bf16=bf16, progress=progress)
    record = plain_record(bf16)
    if bf16 and exact:
        pairs, where = item_pairs(data.offsets, data.image_rows)
        flat = where[:, 0] * scores.shape[1] + where[:, 1]  # pair row -> [n, k] flat
        row_of = torch.full((scores.numel(),), -1, dtype=torch.long)
        row_of[flat] = torch.arange(len(pairs))
        kw = dict(batch_size=batch_size, device=device, bf16=False, shard=True)
        regions = memoized(data.regions.get)  # each image read once for every re-scoring

        def rescore(idx):
            return score_pairs(fn, pairs[row_of[idx]], data.texts, regions, **kw)

        def replan(idx):
            out = torch.full((scores.numel(),), float("nan"))
            out[flat] = score_pairs(fn, pairs, data.texts, regions, only=row_of[idx], **kw)
            return out
        scores, record = exact_choices(scores, rescore, replan)
    results = set_results(data.set, scores, n_boot=n_boot, seed=seed)
    results["scoring"] = record
    return scores, results


# --------------------------------------------------------------------------- command line


def default_synthetic_set(examples_jsonl: Path, image_key: str = "stem") -> MultipleChoiceSet:
    """The synthetic world's multiple-choice set: ``multiple_choice.jsonl`` beside its
    Winoground ``examples.jsonl`` if the generator wrote it, else derived from the examples."""
    from cacr.data.synthetic_mc import multiple_choice_items

    path = examples_jsonl.parent / "multiple_choice.jsonl"
    if path.is_file():
        return read_set("synthetic", str(path), "jsonl", image_key)
    items = [Item(f"multiple_choice/{d['id']}", d["image"], (d["caption"], *d["foils"]), dict(d["tags"]))
             for d in multiple_choice_items(examples_jsonl)]
    return MultipleChoiceSet("synthetic", "jsonl", [examples_jsonl], items)


def run_multiple_choice(cfg) -> Dict[str, Any]:
    """``eval_multiple_choice.py``: score every set with a model, results on rank 0."""
    from cacr.data.sources import open_data
    from cacr.outputs import atomic_write_text
    from cacr.paths import resolve_path

    from .cli import ConfigError, check_outputs, is_rank_zero, setup_distributed
    from .scorefile import write_results_json
    from .inputs import build_model, check_head, check_inputs, model_file, scoring_batch_size, scoring_bf16

    head = check_head(cfg.head)
    n_boot, seed = int(cfg.n_boot), int(cfg.seed)
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {cfg.n_boot}")
    image_key = str(cfg.image_key)
    if image_key not in IMAGE_KEYS:
        raise ConfigError(f"image_key={image_key!r}: expected one of {list(IMAGE_KEYS)}")
    data = open_data(cfg.data)
    files = data.files
    regions_cfg = cfg.get("regions")
    specs = dict(cfg.get("sets") or {})
    if specs:
        sets = [read_set(str(k), v if isinstance(v, str) else list(v), str(cfg.format), image_key, resolve_path)
                for k, v in specs.items()]
        if not regions_cfg:
            raise ConfigError("sets=... need regions=PATH (the regions HDF5 of their images), or "
                              "'+regions.<set>=PATH' per set")
    else:
        if files.winoground_examples is None or not files.winoground_examples.is_file():
            raise ConfigError("no sets: give '+sets.<name>=FILE' (ARO, SugarCrepe, VALSE or .jsonl) and regions=PATH")
        sets = [default_synthetic_set(files.winoground_examples, image_key)]
        regions_cfg = regions_cfg or str(files.winoground_regions)
    if isinstance(regions_cfg, str):
        regions = {s.name: resolve_path(regions_cfg) for s in sets}
    else:
        regions = {str(k): resolve_path(v) for k, v in dict(regions_cfg).items()}
        lacking = [s.name for s in sets if s.name not in regions]
        if lacking:
            raise ConfigError(f"regions.{lacking[0]} is not set (regions per set: give one for every set)")
    for s in sets:
        if not regions[s.name].is_file():
            raise FileNotFoundError(f"regions file {regions[s.name]} (set {s.name!r}) not found")
    inputs = [p for s in sets for p in s.files] + list(regions.values()) + [model_file(cfg)]
    out_dir = check_outputs(cfg, ("results.json", "multiple_choice_scores.jsonl", "results.md"), inputs)

    device = setup_distributed(cfg.device)
    bf16, bf16_reason = scoring_bf16(cfg.bf16, device)
    model, name = build_model(cfg, device)
    tokenizer = data.tokenizer
    results, lines = {}, []
    for s in sets:
        mc = MultipleChoiceData(s, regions[s.name], tokenizer, data.caps, in_memory=True)
        check_inputs(model, mc.texts, mc.caption_names(), mc.regions.feature_dim, f"set {s.name!r}")
        scores, res = evaluate_multiple_choice(model, mc, head=head, batch_size=scoring_batch_size(cfg.batch_size, device, model), device=device,
                                               bf16=bf16, progress=bool(cfg.progress) and is_rank_zero(),
                                               n_boot=n_boot, seed=seed, exact=bool(cfg.get("exact", True)))
        res["regions"] = str(regions[s.name])
        results[s.name] = res
        correct = correct_items(scores).tolist()
        for it, row, ok in zip(s.items, scores.tolist(), correct):
            lines.append(json.dumps({"set": s.name, "id": it.key, "image": it.image,
                                     "scores": row[:len(it.captions)], "correct": ok}))
    record = {"model": name, "head": head,
              "checkpoint": str(resolve_path(cfg.ckpt_path or cfg.model.checkpoint)),
              "sets": results, "n_boot": n_boot, "seed": seed, "bf16": bf16, "bf16_reason": bf16_reason}
    if is_rank_zero():
        markdown = results_markdown(name, results)
        write_results_json(out_dir / "results.json", record)
        atomic_write_text(out_dir / "multiple_choice_scores.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(out_dir / "results.md", markdown)
        print(markdown, end="")
        print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'multiple_choice_scores.jsonl'}, "
              f"{out_dir / 'results.md'}")
    return record
