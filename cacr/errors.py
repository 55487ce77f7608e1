"""Expected failures end a command with one line naming the file, the item and what was
expected; ``CACR_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) shows the traceback instead.

Every entry point (``train.py``, the evaluators, the converters, the validator, the
analysis tools) wraps its body with :func:`exit_on_error`.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn, Tuple, Type

DEBUG_VARIABLES = ("CACR_DEBUG", "HYDRA_FULL_ERROR")


class CacrError(ValueError):
    """An input, setting or state that cannot run, explained in one line."""


def debug() -> bool:
    return any(os.environ.get(k, "").strip() not in ("", "0") for k in DEBUG_VARIABLES)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: a format error with many problems gives its count
    and the first problem (the validator lists them all)."""
    problems = getattr(e, "problems", None)
    if isinstance(problems, list) and problems and hasattr(e, "path"):
        more = f" (and {len(problems) - 1} more: python -m cacr.data.validate lists them)" if len(problems) > 1 else ""
        return f"{e.path}: {problems[0]}{more}"
    msg = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])
    if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0]} {lines[1]}" + (f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else "")


# What an entry point reports in one line; anything else is a bug and keeps its traceback.
EXPECTED: Tuple[Type[BaseException], ...] = (ValueError, OSError, KeyError, ImportError)


def exit_on_error(prog: str, e: BaseException) -> NoReturn:
    """End the program with ``prog: <one line>`` (exit code 1), or re-raise under the debug switch."""
    if debug():
        raise e
    sys.exit(f"{prog}: {one_line(e)}")


def exit_interrupted(prog: str, e: BaseException) -> NoReturn:
    """End the program after SIGINT (or SIGTERM, SIGHUP: :class:`Interrupted`) with one line and
    exit code 130; the clean-ups have run (results are written whole or not at all)."""
    if debug():
        raise e
    what = str(e).strip() or "stopped by signal SIGINT"
    print(f"{prog}: interrupted ({what}); no partial file left", file=sys.stderr)
    sys.exit(130)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into an exception, so that ``finally`` blocks and
    ``except BaseException`` clean-ups (temporary files, locks) run as on Ctrl-C."""


def raise_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread (exit code 130
    like SIGINT once it reaches the top). A no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")

    for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            signal.signal(s, handler)
