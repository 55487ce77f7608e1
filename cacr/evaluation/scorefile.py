"""Files of the evaluators: official score files, tag files, results JSON and markdown
tables, and saved retrieval score matrices (Winoground's ``examples.jsonl`` is read by
``cacr/winoground.py``, shared with the data layer).

- Official score files: JSONL lines ``{"label": "<id>_c<k>_i<j>", "score": s}``, the score
  of caption ``k`` against image ``j`` of example ``id``; every example needs its four.
- Tag files: a JSON object ``{id: [tag, ...]}`` (extra breakdowns; examples absent from it
  belong to no group of that breakdown).
- Score matrices: ``.pt`` or ``.npz`` holding ``scores`` (captions x images),
  ``caption_ids``, ``image_ids`` and ``txt2img``, enough to recompute the recalls.

Every reader raises ``ValueError`` naming the file, the line or id, and what was expected.
Every writer writes a temporary file beside the target and renames it.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from cacr.outputs import atomic_write, atomic_write_text

from cacr.winoground import (COLLAPSED_TAGS, EXAMPLE_FIELDS, WinogroundExample, jsonl_objects,  # noqa: F401
                              read_winoground_examples)

PathLike = Union[str, os.PathLike]
BUILTIN_BREAKDOWNS = ("collapsed_tag", "num_main_preds", "secondary_tag")
NO_SECONDARY_TAG = "none"
_LABEL = re.compile(r"^(?P<id>.+)_c(?P<k>[01])_i(?P<j>[01])$")


# --------------------------------------------------------------------------- atomic writes

def read_tag_file(path: PathLike, examples: Sequence[WinogroundExample]) -> Dict[str, List[str]]:
    """Read a JSON object ``{id: [tag, ...]}``; every id must be an example's id."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"tag file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object {{id: [tags]}}, got {type(obj).__name__}")
    known = {ex.key for ex in examples}
    for key, tags in obj.items():
        if key not in known:
            raise ValueError(f"{path}: id {key!r} is not an id of the examples file")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"{path}: id {key!r}: expected a list of non-empty tag strings, got {tags!r}")
    return obj


def example_tag_sets(
    examples: Sequence[WinogroundExample], extra: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None
) -> Dict[str, List[List[str]]]:
    """Tag lists per example for the built-in breakdowns (``collapsed_tag``,
    ``num_main_preds``, ``secondary_tag``; an empty secondary tag is ``"none"``) and for
    each ``extra`` tag mapping (``{name: {id: [tags]}}``, see :func:`read_tag_file`)."""
    sets: Dict[str, List[List[str]]] = {
        "collapsed_tag": [[ex.collapsed_tag] for ex in examples],
        "num_main_preds": [[str(ex.num_main_preds)] for ex in examples],
        "secondary_tag": [[ex.secondary_tag or NO_SECONDARY_TAG] for ex in examples],
    }
    for name, mapping in (extra or {}).items():
        if name in sets:
            raise ValueError(f"extra tag set name {name!r} clashes with a built-in breakdown")
        sets[name] = [list(mapping.get(ex.key, [])) for ex in examples]
    return sets


# --------------------------------------------------------------------------- score files

def score_label(ex_id: Union[int, str], k: int, j: int) -> str:
    return f"{ex_id}_c{k}_i{j}"


def read_score_file(path: PathLike, examples: Sequence[Union[WinogroundExample, int, str]]) -> Tensor:
    """Read an official score file into a ``(N, 2, 2)`` float64 tensor in ``examples`` order,
    ``[n, k, j] = s(c_k, i_j)``; every example needs exactly its four labels."""
    path = Path(path)
    keys = [ex.key if isinstance(ex, WinogroundExample) else str(ex) for ex in examples]
    row = {key: n for n, key in enumerate(keys)}
    if len(row) != len(keys):
        raise ValueError("read_score_file: the example ids are not unique")
    scores = torch.full((len(keys), 2, 2), float("nan"), dtype=torch.float64)
    line_of: Dict[str, int] = {}
    for lineno, obj in jsonl_objects(path, "score file"):
        where = f"{path}:{lineno}"
        if "label" not in obj:
            raise ValueError(f"{where}: missing 'label' (expected {{\"label\": \"<id>_c<k>_i<j>\", \"score\": s}})")
        if "score" not in obj:
            raise ValueError(f"{where}: missing 'score' for label {obj['label']!r}")
        label, s = obj["label"], obj["score"]
        m = _LABEL.match(label) if isinstance(label, str) else None
        if m is None:
            raise ValueError(f"{where}: label {label!r} is not of the form '<id>_c<0|1>_i<0|1>'")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"{where}: score of {label!r} must be a finite number, got {s!r}")
        if m["id"] not in row:
            raise ValueError(f"{where}: label {label!r}: id {m['id']!r} is not an id of the examples")
        if label in line_of:
            raise ValueError(f"{where}: duplicate label {label!r} (first on line {line_of[label]})")
        line_of[label] = lineno
        scores[row[m["id"]], int(m["k"]), int(m["j"])] = float(s)
    missing = [score_label(keys[n], k, j) for n, k, j in torch.isnan(scores).nonzero().tolist()]
    if missing:
        raise ValueError(
            f"{path}: no score for label(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} of {4 * len(keys)} missing)"
        )
    return scores


def write_score_file(path: PathLike, examples: Sequence[Union[WinogroundExample, int, str]], scores) -> Path:
    """Write ``scores`` ``(N, 2, 2)`` as an official score file, four lines per example."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    keys = [ex.key if isinstance(ex, WinogroundExample) else str(ex) for ex in examples]
    if scores.shape != (len(keys), 2, 2):
        raise ValueError(f"write_score_file: expected scores of shape ({len(keys)}, 2, 2), got {tuple(scores.shape)}")
    lines = [
        json.dumps({"label": score_label(key, k, j), "score": float(scores[n, k, j])})
        for n, key in enumerate(keys) for k in (0, 1) for j in (0, 1)
    ]
    return atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- results

def write_results_json(path: PathLike, results: Mapping[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def _cell(r: Mapping[str, Any], metric: str, digits: int) -> str:
    cell = f"{r[metric]:.{digits}f}"
    ci = r.get("ci95")
    if ci:
        lo, hi = ci[metric]
        cell += f" [{lo:.{digits - 1}f}, {hi:.{digits - 1}f}]"
    return cell


def results_markdown(results_by_model: Mapping[str, Mapping[str, Any]], *, digits: int = 2) -> str:
    """Markdown tables of one or more results records (``{model name: results}``): the
    overall scores, then one table per breakdown; cells read ``score [95% CI]``."""
    if not results_by_model:
        raise ValueError("results_markdown: no results")
    # binding (the interaction score) where every record has it; score files of other tools do too
    metrics = ("text", "image", "group") + (("binding",) if all("binding" in r for r in results_by_model.values())
                                            else ())
    head = " | ".join(metrics)
    rule = "|".join(["---:"] * len(metrics))
    out = [f"| model | n | {head} |", f"|---|---:|{rule}|"]
    for name, r in results_by_model.items():
        out.append(f"| {name} | {r['n']} | " + " | ".join(_cell(r, m, digits) for m in metrics) + " |")
    names = list(dict.fromkeys(b for r in results_by_model.values() for b in r.get("by_tag", {})))
    for b in names:
        out += ["", f"By `{b}`:", "", f"| model | {b} | n | {head} |", f"|---|---|---:|{rule}|"]
        for name, r in results_by_model.items():
            for tag, sub in r.get("by_tag", {}).get(b, {}).items():
                out.append(f"| {name} | {tag} | {sub['n']} | " + " | ".join(_cell(sub, m, digits) for m in metrics) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- score matrices

class ScoreMatrix(NamedTuple):
    scores: Tensor  # (Nc, Ni) float32
    caption_ids: List[Union[int, str]]
    image_ids: List[Union[int, str]]
    txt2img: Tensor  # (Nc,) long, image column of each caption row


def _check_matrix(m: ScoreMatrix, where: str) -> ScoreMatrix:
    s = torch.as_tensor(m.scores)
    if s.dim() != 2:
        raise ValueError(f"{where}: scores must be a (captions, images) matrix, got shape {tuple(s.shape)}")
    if len(m.caption_ids) != s.shape[0] or len(m.image_ids) != s.shape[1]:
        raise ValueError(
            f"{where}: {len(m.caption_ids)} caption ids and {len(m.image_ids)} image ids for a "
            f"{tuple(s.shape)} score matrix"
        )
    t = torch.as_tensor(m.txt2img)
    if t.shape != (s.shape[0],) or t.dtype.is_floating_point:
        raise ValueError(f"{where}: txt2img must hold {s.shape[0]} integer image indices, got shape {tuple(t.shape)}")
    return ScoreMatrix(s, list(m.caption_ids), list(m.image_ids), t.long())


def save_score_matrix(path: PathLike, scores, caption_ids, image_ids, txt2img) -> Path:
    """Save a score matrix with its ids and ground truth as ``.pt`` or ``.npz`` (by suffix)."""
    path = Path(path)
    m = _check_matrix(ScoreMatrix(scores, caption_ids, image_ids, txt2img), str(path))
    if path.suffix == ".pt":
        obj = {"scores": m.scores.detach().cpu(), "caption_ids": m.caption_ids, "image_ids": m.image_ids,
               "txt2img": m.txt2img.cpu()}
        return atomic_write(path, lambda f: torch.save(obj, f))
    if path.suffix == ".npz":
        arrays = {
            "scores": m.scores.detach().cpu().numpy(),
            "caption_ids": np.asarray([str(x) for x in m.caption_ids]),
            "image_ids": np.asarray([str(x) for x in m.image_ids]),
            "txt2img": m.txt2img.cpu().numpy(),
        }
        return atomic_write(path, lambda f: np.savez(f, **arrays))
    raise ValueError(f"{path}: score matrix files end in .pt or .npz")


def load_score_matrix(path: PathLike) -> ScoreMatrix:
    """Read a file written by :func:`save_score_matrix` (``.npz`` ids come back as strings)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"score matrix file not found: {path}")
    keys = ("scores", "caption_ids", "image_ids", "txt2img")
    if path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable score file
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{path}: not a readable score matrix, truncated or not written by torch.save "
                             f"({type(e).__name__}: {first[:200]})") from None
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise ValueError(f"{path}: expected a dict with keys {list(keys)}")
        return _check_matrix(ScoreMatrix(*(obj[k] for k in keys)), str(path))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise ValueError(f"{path}: missing array(s) {missing}")
                m = ScoreMatrix(torch.from_numpy(z["scores"]), z["caption_ids"].tolist(), z["image_ids"].tolist(),
                                torch.from_numpy(z["txt2img"]))
        except ValueError as e:
            if str(e).startswith(f"{path}:"):
                raise
            raise ValueError(f"{path}: not a readable score matrix .npz ({e})") from None
        except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, EOFError, OSError of a truncated file
            raise ValueError(f"{path}: not a readable score matrix .npz, truncated? ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]})") from None
        return _check_matrix(m, str(path))
    raise ValueError(f"{path}: score matrix files end in .pt or .npz")
