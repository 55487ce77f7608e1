"""Output files are never written by accident: an existing output is replaced only when the
user says so, an output is never one of the command's inputs, its folder is checked writable
before any work, and temporary files go away on failure, on SIGINT/SIGTERM, and (for files
of a process killed outright) the next time a writer targets the same output."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable, Optional, Union

from cacr.errors import CacrError

PathLike = Union[str, os.PathLike]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: PathLike) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would (0644 under the usual umask):
    temporary files from ``mkstemp`` are 0600, unreadable to colleagues on a shared machine."""
    os.chmod(path, 0o666 & ~umask())


def same_file(a: PathLike, b: PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


def inside(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (for folder inputs such as an LMDB)."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return p == f or f in p.parents


MAX_STEM_BYTES = 200  # file names are at most 255 bytes; room for the suffixes the writers add


def file_stem(name, what: str = "id") -> str:
    """An item id from a data file (example id, image id) as one file name component that
    cannot leave its folder: every character other than letters, digits, ``_``, ``-`` and
    ``.`` (``/``, ``\\``, ``%``, NUL, ...) is percent-encoded, and so is a leading ``.`` (no
    ``.``, ``..`` or hidden file). The encoding is one-to-one: two ids never share a file."""
    from urllib.parse import quote

    text = str(name)
    stem = quote(text, safe="")  # keeps A-Z a-z 0-9 _ . - ~
    stem = stem.replace("~", "%7E")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if not stem:
        raise CacrError(f"{what} {text!r}: empty; expected a non-empty id")
    if len(stem.encode()) > MAX_STEM_BYTES:
        raise CacrError(f"{what} {text[:40]!r}...: too long for a file name ({len(stem.encode())} bytes encoded, "
                        f"at most {MAX_STEM_BYTES})")
    return stem


def item_path(folder: PathLike, name: str, what: str = "id") -> Path:
    """``folder / name`` for a per-item file whose name was built from an id; refused (one
    line) unless it lies directly in ``folder``: nothing is written outside an output folder."""
    folder = Path(folder)
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or path.parent.resolve() != folder.resolve():
        raise CacrError(f"{what}: file name {name!r} would leave the output folder {folder}; expected a name "
                        f"without path separators or '..'")
    return path


def check_writable_dir(folder: PathLike, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be created in it (before any scoring)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CacrError(f"{what}={folder}: cannot write there ({e.strerror or e})") from None
    return folder


def check_output(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = (),
                 what: str = "--out", hint: str = "pass --overwrite to replace it") -> Path:
    """Refuse an output that is one of ``inputs`` (always) or that exists (unless
    ``overwrite``); check its folder is writable; remove temporary files that a killed
    writer of the same output left behind. Returns the path."""
    path = Path(path)
    for i in inputs:
        if i is not None and (same_file(path, i) or (Path(i).is_dir() and inside(path, i))):
            raise CacrError(f"{what}={path}: is also an input of this command ({i}); write the output elsewhere")
    if path.is_dir():
        raise CacrError(f"{what}={path}: is a folder, expected a file name")
    if path.exists() and not overwrite:
        raise CacrError(f"{what}={path}: exists; {hint}")
    check_writable_dir(path.parent, what)
    remove_stale_temps(path)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: PathLike) -> int:
    """Remove ``<path>.tmp-<pid>`` files of processes that no longer run; returns how many."""
    path = Path(path)
    n = 0
    if not path.parent.is_dir():
        return 0
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


class WriteError(CacrError, OSError):
    """An output file that could not be written, in one line naming it (its old content kept)."""

    def __init__(self, path: PathLike, e: OSError):
        what = "existing content kept" if Path(path).exists() else "nothing written"
        super().__init__(f"{path}: cannot write ({e.strerror or e}); {what}, no temporary file left")
        self.errno = e.errno


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path`` (mode
    0644 under the usual umask; the temporary file is removed on any failure or interrupt).
    A write error (disk full, file too large, read-only folder) is a :class:`WriteError`
    naming ``path``; an existing ``path`` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)  # mkstemp's 0600 would hide results from colleagues on a shared machine
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


_fresh: dict = {}  # resolver memo: Hydra resolves its directory keys more than once


_hydra_made: list = []  # folders Hydra creates for an evaluator's output=DIR (removed again if it fails empty)


def fresh_dir(base, output=None) -> str:
    """``output`` (``output=DIR``: Hydra's ``.hydra`` folder and log go with the outputs), else
    ``base``, or ``base-1``, ``base-2``, ... when another run already took that name (two
    runs started in the same second): created here by the primary process, as ``train.py``
    makes its default run directories (:func:`cacr.rundir.unique_dir`); DDP ranks > 0 take
    ``base``. Resolver ``cacr.output_dir`` of the evaluators' ``hydra.run.dir``."""
    from cacr import rundir

    if output is not None and str(output) != "":
        from cacr.paths import resolve_path

        out = resolve_path(str(output))
        key = ("output", str(out))
        if key not in _fresh:
            _fresh[key] = str(out)
            _hydra_made.extend(d for d in [out, *out.parents] if not d.exists())
        return _fresh[key]
    key = str(base)
    if key not in _fresh:
        _fresh[key] = str(rundir.unique_dir(base)) if rundir.primary_process() else os.path.abspath(key)
    return _fresh[key]


def hydra_made_dirs() -> list:
    """The folders :func:`fresh_dir` found missing for ``output=DIR`` (Hydra then made them), deepest first."""
    return list(_hydra_made)


def hydra_subdir(output=None, overwrite=False) -> str:
    """Resolver ``cacr.hydra_subdir_for`` of the evaluators' ``hydra.output_subdir``: ``.hydra``,
    or ``.hydra/<date>_<time>`` when ``output=DIR`` already holds an earlier run's ``.hydra``
    files and ``overwrite`` is false (Hydra writes them before the outputs are checked)."""
    import time

    if output is None or str(output) == "" or str(overwrite).lower() == "true":
        return ".hydra"
    from cacr.paths import resolve_path

    if (resolve_path(str(output)) / ".hydra" / "config.yaml").is_file():
        key = ("subdir", str(output))
        _fresh.setdefault(key, ".hydra/" + time.strftime("%Y-%m-%d_%H-%M-%S"))
        return _fresh[key]
    return ".hydra"


def register_output_dir_resolver() -> None:
    """Register ``${cacr.output_dir:...}`` (:func:`fresh_dir`) before Hydra composes an evaluator's config."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cacr.output_dir"):
        OmegaConf.register_new_resolver("cacr.output_dir", fresh_dir)
    if not OmegaConf.has_resolver("cacr.hydra_subdir_for"):
        OmegaConf.register_new_resolver("cacr.hydra_subdir_for", hydra_subdir)
