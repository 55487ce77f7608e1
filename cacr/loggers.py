"""The metrics loggers of a run, from ``_target_`` configs (``loggers:`` in the composed config;
``logger=csv|wandb|tensorboard|mlflow|none`` picks them, conf/logger/).

Each entry of ``loggers`` is a Lightning logger class or a factory of this module, built by
:func:`build_loggers` with what only the run knows, passed to the parameters the target names:
``run_dir``, ``rank`` (global rank: wandb runs start on rank 0 only), ``resume_step`` (a run
resumed in its own directory), ``config`` (the resolved config a wandb run records) and
``job_type``; a ``save_dir`` that is null is the run directory, a relative one lies inside it.
A target that cannot be imported or built for want of a package (``logger=mlflow`` without
``mlflow``) is refused in one line naming the setting, before step 0.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from cacr.config import ConfigError

RUNTIME = ("run_dir", "rank", "resume_step", "config", "job_type")


def csv_logger(*, run_dir, resume_step: Optional[int] = None):
    """Lightning's ``CSVLogger`` writing ``<run_dir>/metrics.csv``; a run resumed at step ``s`` in
    its own directory keeps the earlier rows (:func:`cacr.train._csv_logger`)."""
    from cacr.train import _csv_logger

    return _csv_logger(Path(run_dir), resume_step)


def wandb_logger(project: str = "cacr", offline: bool = True, group: Optional[str] = None,
                 job_type: Optional[str] = "train", tags: Sequence[str] = (), *, run_dir, rank: int = 0,
                 config: Optional[Mapping[str, Any]] = None):
    """Lightning's ``WandbLogger`` on a run started by global rank 0 (``None`` elsewhere):
    :func:`cacr.train.wandb_run`, offline unless ``offline=False`` (falling back to offline
    when wandb cannot go online)."""
    from pytorch_lightning.loggers import WandbLogger

    from cacr.train import wandb_run

    return WandbLogger(experiment=wandb_run(Path(run_dir), rank, project=project, offline=offline, group=group,
                                            job_type=job_type, tags=list(tags), config=config))


def _target(name: str, node: Mapping[str, Any]):
    from hydra.utils import get_method

    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not target:
        raise ConfigError(f"loggers.{name}: expected a _target_ config (a Lightning logger class, e.g. "
                          f"pytorch_lightning.loggers.TensorBoardLogger), got {node!r}")
    try:
        return target, get_method(str(target))
    except Exception as e:  # noqa: BLE001 - hydra wraps the import error
        raise ConfigError(f"loggers.{name}._target_={target}: cannot be imported ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_loggers(loggers: Optional[Mapping[str, Any]], run_dir, *, rank: int = 0, resume_step: Optional[int] = None,
                  config: Optional[Mapping[str, Any]] = None, job_type: Optional[str] = None) -> List[Any]:
    """The loggers of ``loggers`` (``{name: _target_ config}``, null entries skipped), in order.
    ``job_type``, where given, replaces the entries' own (the evaluation commands' wandb runs)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(loggers, DictConfig):
        loggers = OmegaConf.to_container(loggers, resolve=True)
    run_dir = Path(run_dir)
    runtime = {"run_dir": run_dir, "rank": rank, "resume_step": resume_step, "config": config}
    out = []
    for name, node in (loggers or {}).items():
        if node is None:
            continue
        target, fn = _target(name, node)
        kwargs: Dict[str, Any] = {k: v for k, v in node.items() if k != "_target_"}
        params = inspect.signature(fn).parameters
        for k, v in runtime.items():
            if k in params and k not in kwargs:
                kwargs[k] = v
        if job_type is not None and "job_type" in params:
            kwargs["job_type"] = job_type
        if "save_dir" in params:
            save = kwargs.get("save_dir")
            kwargs["save_dir"] = str(run_dir if save is None else run_dir / save)  # an absolute one stays
        try:
            out.append(fn(**kwargs))
        except (ImportError, ModuleNotFoundError) as e:
            raise ConfigError(f"loggers.{name}: {target} needs a package that is not installed: "
                              f"{_first_line(e)}") from None
        except TypeError as e:
            raise ConfigError(f"loggers.{name}: {target}: {_first_line(e)}") from None
    return out
