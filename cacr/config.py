"""Configuration errors and the OmegaConf resolvers that ``conf/*.yaml`` use.

- :class:`ConfigError`: a setting or command line that cannot run, in one message (every
  entry point reports it in one line, :mod:`cacr.errors`).
- :func:`register_resolvers`: ``${cacr.dirname:...}`` (a sweep job's folder name),
  ``${cacr.first:...}`` (the first non-null argument) and the run-directory resolvers of
  :mod:`cacr.rundir`; called before Hydra composes (``train.py``, DDP workers, tests).

Imports nothing of the project at module level, so anything may import it.
"""
from __future__ import annotations

import functools
import hashlib
import re
import sys
from typing import List, Optional

from omegaconf import OmegaConf

from cacr.errors import CacrError


class ConfigError(CacrError):
    """A configuration that cannot run, explained in one message."""


def _swept_keys(argv: Optional[List[str]] = None) -> List[str]:
    """Keys given several values on a multirun command line (``seed=0,1,2``, ``lr=range(...)``)."""
    keys = []
    for a in (sys.argv[1:] if argv is None else argv):
        k, sep, v = a.partition("=")
        if not sep or a.startswith("-") or k.startswith("hydra"):
            continue
        if re.search(r"(?<!\\),", v) or re.match(r"\s*(range|choice|interval|glob)\(", v):
            keys.append(k.lstrip("+~"))
    return keys


def job_dirname(overrides: str, limit: int = 96, argv: Optional[List[str]] = None) -> str:
    """A sweep job's directory name from its overrides (Hydra's ``override_dirname``): no
    slashes, the overrides that differ between the sweep's jobs first and whole, then the
    others while they fit in ``limit`` characters; a name that had to drop something ends
    with a hash of all the overrides, so two jobs never share a folder."""
    if not overrides:
        return "default"
    parts = [p.replace("/", "_") for p in re.split(r"(?<!\\),", overrides)]
    swept = _swept_keys(argv)
    first = [p for p in parts if p.partition("=")[0].lstrip("+~") in swept]
    rest = [p for p in parts if p not in first]
    name = ",".join(first + rest)
    if len(name) <= limit:
        return name
    tag = "-" + hashlib.sha1(overrides.encode()).hexdigest()[:8]
    kept = list(first)
    for p in rest:
        if len(",".join(kept + [p])) + len(tag) <= limit:
            kept.append(p)
    name = ",".join(kept)
    if len(name) + len(tag) > limit and not rest:
        name = name[: limit - len(tag)]
    return name + tag


def register_resolvers() -> None:
    """Register the ``cacr.*`` resolvers once per process (a second call is a no-op)."""
    from cacr import rundir

    if not OmegaConf.has_resolver("cacr.dirname"):
        OmegaConf.register_new_resolver("cacr.dirname", job_dirname)
    if not OmegaConf.has_resolver("cacr.first"):  # the first argument that is not null
        OmegaConf.register_new_resolver("cacr.first", lambda *xs: next((x for x in xs if x is not None), None))
    for name, fn in (("cacr.run_dir", rundir.hydra_run_dir), ("cacr.sweep_dir", rundir.hydra_sweep_dir),
                     ("cacr.hydra_subdir", rundir.hydra_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, _exit_in_one_line(fn))


def _exit_in_one_line(fn):
    """A resolver whose expected failures end ``train.py`` in one line (OmegaConf would wrap
    them in a multi-line interpolation error)."""
    from cacr.errors import exit_on_error

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except CacrError as e:
            exit_on_error("train.py", e)

    return wrapped
