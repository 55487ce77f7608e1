"""Run directories: each training run claims its directory with a lock, so a second run on
the same directory is refused in one line, and default directories never collide.

- :func:`claim` takes ``<run_dir>/.lock`` with ``flock`` (released by the kernel when the
  process ends, however it ends: a killed run leaves no stale claim behind).
- ``hydra.run.dir`` is resolved by :func:`hydra_run_dir` (resolver ``cacr.run_dir``) before
  Hydra writes anything there: an explicit ``run_dir`` is claimed or refused; a resume
  (``ckpt_path=<dir>/checkpoints/last.ckpt`` without ``run_dir``) continues in ``<dir>``;
  the default ``outputs/<date>/<time>`` gets a suffix (``-1``, ``-2``, ...) when another run
  took that name in the same second. A resumed run's Hydra files go to
  ``.hydra/resume-<date>_<time>/`` (resolver ``cacr.hydra_subdir``), so the first run's
  ``.hydra/`` stays as it was.
- Only the primary process claims: DDP ranks > 0 (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``,
  ``SLURM_PROCID`` not 0) share the directory of their rank 0.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from cacr.distributed import primary_process  # DDP ranks > 0 use the directory their rank 0 claimed
from cacr.errors import CacrError

LOCK_NAME = ".lock"
_held: Dict[str, int] = {}  # claimed directory -> open lock file descriptor
_resolved: Dict[Tuple, str] = {}  # resolver memo: Hydra resolves its directory keys more than once
_resumed_in_place: Dict[str, str] = {}  # run dir -> Hydra output subdir of this resume


class RunDirInUse(CacrError):
    """Another process holds the run directory."""


def _key(path) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def same_dir(a, b) -> bool:
    return a is not None and b is not None and os.path.realpath(str(a)) == os.path.realpath(str(b))


def holds(path) -> bool:
    """Whether this process holds the claim on ``path``."""
    return _key(path) in _held


def claim(path, what: str = "run_dir") -> Path:
    """Create ``path`` and take its lock; :class:`RunDirInUse` if another process has it.
    Claiming a directory this process already holds is a no-op."""
    key = _key(path)
    if key in _held:
        return Path(key)
    p = Path(key)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd = os.open(p / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CacrError(f"{what}={p}: cannot create the run directory ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirInUse(f"{what}={p}: in use by another run ({holder}); wait for it to end or choose "
                          f"another {what}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _held[key] = fd
    return p


def release(path) -> None:
    fd = _held.pop(_key(path), None)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def holds_a_run(path, hydra_files: bool = True) -> bool:
    """Whether ``path`` holds the files of an earlier run (checkpoints, results, Hydra's config)."""
    p = Path(path)
    ckpts = p / "checkpoints"
    return ((p / "results.json").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))
            or (hydra_files and (p / ".hydra" / "config.yaml").exists()))


def made_by_a_run(path) -> bool:
    """Whether ``path`` was made by a run of this project: the claim file a run leaves
    (``.lock``, ``pid P on H since ...``), or an earlier run's files."""
    lock = Path(path) / LOCK_NAME
    try:
        if lock.is_file() and lock.read_bytes()[:4] in (b"pid ", b""):
            return True
    except OSError:
        pass
    return holds_a_run(path)


def check_claimable(path, reuse: bool = False, what: str = "run_dir") -> None:
    """Refuse (one line) a folder that holds anything not made by a run of this project,
    unless ``reuse`` (``run_dir_reuse=true``): a user's own files are never overwritten."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CacrError(f"{what}={p}: is a file, expected a folder for the run")
    try:
        names = sorted(os.listdir(p)) if p.is_dir() else []
    except OSError as e:
        raise CacrError(f"{what}={p}: cannot read the folder ({e.strerror or e})") from None
    if names and not reuse and not made_by_a_run(p):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise CacrError(f"{what}={p}: holds files not made by a run of this project ({shown}); choose an empty or "
                        f"new folder, or pass run_dir_reuse=true to run there (a file of the same name is replaced)")


def complete_checkpoint(path) -> Optional[Path]:
    """The checkpoint to resume the run in ``path`` from: ``checkpoints/last.ckpt``, else the
    newest ``checkpoints/*.ckpt`` (never a half-written ``*.tmp-*``); None if there is none."""
    ckpts = Path(path) / "checkpoints"
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    found = sorted(ckpts.glob("*.ckpt"), key=lambda q: q.stat().st_mtime) if ckpts.is_dir() else []
    return found[-1] if found else None


def earlier_run(path) -> CacrError:
    """The one-line refusal of a ``run_dir`` that holds an earlier run, with advice that names
    a checkpoint that exists."""
    ckpt = complete_checkpoint(path)
    if ckpt is not None:
        return CacrError(f"run_dir={path}: holds an earlier run; resume it with ckpt_path={ckpt} or choose another "
                         f"run_dir")
    return CacrError(f"run_dir={path}: holds an earlier run that left no complete checkpoint to resume from; "
                     f"choose another run_dir")


def resume_dir(ckpt_path) -> Optional[Path]:
    """``<dir>`` for ``ckpt_path = <dir>/checkpoints/<name>.ckpt``, else None."""
    if not ckpt_path:
        return None
    p = Path(_key(ckpt_path))
    return p.parent.parent if p.parent.name == "checkpoints" else None


def unique_dir(base) -> Path:
    """``base``, or ``base-1``, ``base-2``, ...: the first name no other process created (made here)."""
    base = Path(_key(base))
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        p = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise CacrError(f"{base}: no free directory name")


def hydra_run_dir(run_dir=None, ckpt_path=None, default=None, reuse=False) -> str:
    """Resolver ``cacr.run_dir`` of ``hydra.run.dir``: the directory of a single run, claimed
    (an explicit ``run_dir`` only when empty or made by a run, or ``reuse``: ``run_dir_reuse``)."""
    memo = ("run", run_dir, ckpt_path, default, reuse)
    if memo in _resolved:
        return _resolved[memo]
    from cacr.paths import resolve_path

    here = resume_dir(resolve_path(ckpt_path)) if ckpt_path else None
    if not primary_process():
        path = Path(_key(run_dir)) if run_dir else (here or Path(_key(default)))
    elif run_dir:
        path = Path(_key(run_dir))
        if not same_dir(here, path):
            check_claimable(path, reuse=str(reuse).lower() == "true")
        # Hydra's files alone (a run that stopped before its first checkpoint) are not a run to keep
        if path.exists() and holds_a_run(path, hydra_files=False) and not same_dir(here, path):
            claim(path)  # a running one is refused as in use
            release(path)
            raise earlier_run(path)
        _note_resume(path, here)
        claim(path)
    elif here is not None and here.is_dir():
        path = here
        _note_resume(path, here)
        claim(path, what="ckpt_path's run directory")
    else:
        path = unique_dir(default)
        claim(path)
    _resolved[memo] = str(path)
    return str(path)


def _note_resume(path: Path, here: Optional[Path]) -> None:
    if same_dir(here, path) and (path / ".hydra").exists():
        _resumed_in_place[_key(path)] = f".hydra/resume-{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def hydra_subdir() -> str:
    """Resolver ``cacr.hydra_subdir`` of ``hydra.output_subdir``: ``.hydra``, or for a run
    resumed in its own directory ``.hydra/resume-<date>_<time>`` (the first run's files stay)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = HydraConfig.get().runtime.output_dir
    except (ImportError, ValueError):
        return ".hydra"
    return _resumed_in_place.get(_key(out), ".hydra") if out else ".hydra"


def hydra_sweep_dir(default) -> str:
    """Resolver ``cacr.sweep_dir`` of ``hydra.sweep.dir``: two sweeps started in the same second
    get distinct directories."""
    memo = ("sweep", default)
    if memo not in _resolved:
        _resolved[memo] = str(unique_dir(default)) if primary_process() else _key(default)
    return _resolved[memo]
