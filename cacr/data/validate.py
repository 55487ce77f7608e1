"""``python -m cacr.data.validate FILE...``: list every problem of regions / captions files and
Winoground ``examples.jsonl`` files, each with the item it concerns; exit 1 if there is any.

Captions are checked against the images of the regions files given alongside (if any),
and Winoground examples for the presence of both images in those regions files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from cacr.errors import EXPECTED, exit_interrupted, exit_on_error
from cacr.winoground import read_winoground_examples

from .datasets import winoground_problems
from .formats import FormatError, RegionsFile, check_captions_file, check_regions_file, file_kind, group_problems


def split_leakage(path) -> List[str]:
    """Images with captions in two splits of a captions file (as ``train.py`` refuses them
    before step 0: :func:`cacr.checks.leakage_problems`), one line each, grouped."""
    from .formats import read_captions

    t = read_captions(path, check=False)
    splits: Dict[str, set] = {}
    for image, split in zip(t.image_ids, t.splits):
        splits.setdefault(image, set()).add(split)
    return group_problems([f"image {image!r}: captions in splits {sorted(s)}; expected one split per image "
                           f"(a test image seen in training)" for image, s in splits.items() if len(s) > 1])


def validate(paths: Sequence) -> Dict[str, List[str]]:
    """``path -> problems`` for every file (an empty list when a file is fine)."""
    out: Dict[str, List[str]] = {}
    kinds: Dict[str, str] = {}
    for p in map(str, paths):
        if Path(p).is_dir():
            out[p] = ["a folder, expected a regions or captions HDF5 file or an examples .jsonl"]
        elif not Path(p).is_file():
            out[p] = ["file not found"]
        elif p.endswith((".jsonl", ".json")):
            kinds[p] = "winoground"
        else:
            try:
                kinds[p] = file_kind(p)
            except (FormatError, OSError) as e:
                out[p] = [str(e)]
    region_files = [p for p, k in kinds.items() if k == "regions"]
    known: Optional[set] = None
    for p in region_files:
        out[p] = check_regions_file(p)
        if not out[p]:
            known = (known or set()) | set(RegionsFile(p, check=False).image_ids)
    for p, k in kinds.items():
        if k == "captions":
            probs = check_captions_file(p)
            readable = not probs
            if known is not None and not probs:
                from .formats import read_captions

                t = read_captions(p, check=False)
                probs = group_problems([f"caption {c!r}: unknown image {i!r} (in none of {region_files})"
                                        for c, i in zip(t.caption_ids, t.image_ids) if i not in known])
            out[p] = probs + (split_leakage(p) if readable else [])
        elif k == "winoground":
            try:
                exs = read_winoground_examples(p)
                out[p] = [] if known is None else group_problems(winoground_problems(exs, known, region_files))
            except ValueError as e:  # the first problem, with file, line and id
                out[p] = [str(e)]
        elif k != "regions":
            out[p] = [f"unknown file kind {k!r} (attribute kind should be 'regions' or 'captions')"]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cacr.data.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    try:
        results = validate(args.files)
    except EXPECTED as e:  # a file that cannot even be opened as what it claims to be
        exit_on_error("python -m cacr.data.validate", e)
    except KeyboardInterrupt as e:
        exit_interrupted("python -m cacr.data.validate", e)
    bad = 0
    for p, probs in results.items():
        if probs:
            bad += len(probs)
            print(f"{p}: {len(probs)} problem(s)")
            for q in probs:
                print(f"  {q}")
        else:
            print(f"{p}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
