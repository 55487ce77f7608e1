"""Paths given in configs and on the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def resolve_path(p) -> Optional[Path]:
    """A config or command-line path; relative paths are taken from the launch directory
    (Hydra may change the working directory of a job)."""
    if p is None:
        return None
    p = Path(str(p)).expanduser()
    if p.is_absolute():
        return p
    try:
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd()) / p
    except (ImportError, ValueError):
        return Path.cwd() / p
