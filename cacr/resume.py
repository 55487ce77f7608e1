"""Honest resume: checkpoints that say what run they belong to, and a resume that continues
that run or says why not.

- :class:`BestCheckpoint` keeps the best checkpoint by R-sum. It writes each file under a
  temporary name and renames it, restores its state from any checkpoint of the run (also
  when the resumed run writes to another directory), and defers deleting the previous best
  until ``last.ckpt`` points to the new one, so a kill between the two never leaves
  ``last.ckpt`` naming a deleted file. Files outside its own directory are never deleted.
- :class:`LastCheckpoint` writes ``last.ckpt`` (atomically) after every validation, once the
  best checkpoint is decided, and when training ends: a resume from it repeats no
  validation and knows the best checkpoint so far.
- :class:`StopAtBinding` ends training at the first validation whose dev-half binding
  reaches ``train.stop_at_binding``; a resume after the stop trains no further step.
- :class:`RecordConfig` stores the run's resolved config in every checkpoint
  (``checkpoint["cacr"]``), with the history of resumes and accepted config changes.
- :func:`inspect_resume` reads ``ckpt_path`` before anything runs: a truncated or foreign
  file is refused naming it; a config that differs from the checkpoint's in anything but
  bookkeeping is refused with a one-line diff unless ``resume_override=true``; a
  finished run is reported as such.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint

from cacr.errors import CacrError

log = logging.getLogger(__name__)

# Keys that say where and how a run is carried out, not what it computes.
BOOKKEEPING_PREFIXES = ("logger.", "loggers.", "callbacks.congruence.", "callbacks.lr_monitor.")
BOOKKEEPING_KEYS = {"ckpt_path", "run_dir", "run_dir_reuse", "resume_override", "rerun_eval", "data.root",
                    "data.num_workers",
                    "data.eval_batch_size", "module.eval_batch_size", "module.mining_batch_size",
                    "module.compile_scoring", "module.eval_bf16", "trainer.enable_progress_bar",
                    "trainer.log_every_n_steps",
                    "data.store_device"}  # retired (2026-11-30): where the mining store lived; no effect on results
# Model settings that change the shapes of the weights: no resume across them, even when overridden.
SHAPE_KEYS = {f"model.config.{k}" for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                                             "max_position_embeddings", "type_vocab_size", "img_dim")}
# May change together as long as the positives per optimizer step stay the same (README: a
# 2-GPU run resumed on 1 GPU with twice the batch per device).
LAYOUT_KEYS = {"trainer.devices", "trainer.num_nodes", "trainer.strategy", "data.batch_size"}


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def whole_checkpoint(path) -> bool:
    """Whether ``path`` is a complete ``torch.save`` file (a zip whose every member checks)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def save_then_rename(trainer: "pl.Trainer", save, tmp: str, final: str) -> None:
    """``save()`` writes ``tmp`` (Lightning: rank 0 writes, then every rank meets in a barrier);
    rank 0 renames it to ``final``. When the save fails after rank 0 wrote the file whole (a
    DDP rank died in the barrier), the file still takes its final name; a partial one is
    removed: a dead rank never leaves the last complete checkpoint as a ``.tmp-*``."""
    try:
        save()
    except BaseException as e:
        if trainer.is_global_zero and os.path.exists(tmp):
            if whole_checkpoint(tmp):
                os.replace(tmp, final)
            else:
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, CacrError):  # disk full, file too large: name the file
            from cacr.outputs import WriteError

            raise WriteError(final, e) from None
        raise
    if trainer.is_global_zero:
        os.replace(tmp, final)


class BestCheckpoint(ModelCheckpoint):
    """``best-step{N}.ckpt``: the checkpoint with the best ``monitor`` so far (default: the
    highest ``val/rsum``; ``callbacks.checkpoint`` in conf/callbacks/default.yaml)."""

    def __init__(self, dirpath: str, source_dir: Optional[str] = None, monitor: str = "val/rsum", mode: str = "max"):
        if mode not in ("max", "min"):
            raise CacrError(f"callbacks.checkpoint.mode={mode!r}: expected max or min")
        super().__init__(dirpath=dirpath, filename="best-step{step}", monitor=monitor, mode=mode, save_top_k=1,
                         auto_insert_metric_name=False, enable_version_counter=False)
        self._pending: List[str] = []
        self.source_dir = source_dir  # the checkpoints folder of the checkpoint resumed from

    def state_dict(self) -> Dict[str, Any]:
        """Lightning's state, with the files of this run's checkpoint folder by name only: a
        copied or moved run resumes and evaluates its own checkpoints."""
        state = super().state_dict()
        mine = Path(self.dirpath).resolve() if self.dirpath else None

        def rel(p):
            return Path(p).name if p and mine is not None and Path(p).resolve().parent == mine else p

        for k in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if k in state:
                state[k] = rel(state[k])
        if isinstance(state.get("best_k_models"), Mapping):
            state["best_k_models"] = {rel(k): v for k, v in state["best_k_models"].items()}
        return state

    def _own(self, p):
        """A stored path as a file: a bare name lies beside the checkpoint resumed from; an
        absolute one (older checkpoints) too, when a file of that name is there (a copied run)."""
        if not p:
            return p
        base = Path(self.source_dir or self.dirpath or ".")
        q = Path(p)
        if not q.is_absolute():
            return str(base / q)
        if (base / q.name).is_file() and q.parent.resolve() != base.resolve():
            return str(base / q.name)
        return p

    @property
    def state_key(self) -> str:  # the key of the plain ModelCheckpoint it replaces (older checkpoints)
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        tmp = _tmp(filepath)
        save_then_rename(trainer, lambda: super(BestCheckpoint, self)._save_checkpoint(trainer, tmp), tmp, filepath)
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        self._pending.append(filepath)  # deleted by flush(), once last.ckpt names the new best

    def flush(self, trainer: "pl.Trainer") -> None:
        mine = Path(self.dirpath).resolve() if self.dirpath else None
        for p in self._pending:
            if p != self.best_model_path and mine is not None and Path(p).resolve().parent == mine:
                trainer.strategy.remove_checkpoint(p)
        self._pending = []

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Restored whatever the directory: the best so far may be a file of the run resumed from.
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = self._own(state_dict["best_model_path"])
        self.kth_best_model_path = self._own(state_dict.get("kth_best_model_path", self.kth_best_model_path))
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.best_k_models = {self._own(k): v for k, v in
                              dict(state_dict.get("best_k_models", self.best_k_models)).items()}


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` after every validation and at the end of training, written atomically.

    A :class:`Checkpoint` subclass, so Lightning runs it after the other callbacks and,
    given after :class:`BestCheckpoint`, after the best checkpoint is decided."""

    def __init__(self, dirpath: str, best: Optional[BestCheckpoint] = None):
        self.dirpath = str(dirpath)
        self.path = str(Path(dirpath) / "last.ckpt")
        self.best = best
        self._saved_step: Optional[int] = None

    def save(self, trainer: "pl.Trainer") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        tmp = _tmp(self.path)
        save_then_rename(trainer, lambda: trainer.save_checkpoint(tmp), tmp, self.path)
        self._saved_step = trainer.global_step
        if self.best is not None:
            self.best.flush(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.save(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._saved_step != trainer.global_step:
            self.save(trainer)


class StopAtBinding(pl.Callback):
    """Ends training at the first validation whose Winoground-format binding on the dev half
    (``val/wino_binding``, percent) reaches ``threshold``: the way to save a checkpoint that
    binds part-way (``train.stop_at_binding``; the binding study's pre-training stage).

    Its decision travels in the checkpoints (``stopped_at``), so a run killed after stopping
    and resumed from ``last.ckpt`` trains no further step: :func:`inspect_resume` reports it
    finished, and :meth:`on_train_start` ends the fit at once."""

    METRIC = "val/wino_binding"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.stopped_at: Optional[int] = None
        self.binding: Optional[float] = None

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or self.stopped_at is not None:
            return
        value = trainer.callback_metrics.get(self.METRIC)
        if value is None:
            raise RuntimeError(f"train.stop_at_binding={self.threshold:g}: validation logged no {self.METRIC} "
                               f"(module.val_winoground must be true)")
        if float(value) >= self.threshold:
            self.stopped_at, self.binding = int(trainer.global_step), float(value)
            trainer.should_stop = True
            log.info("stopping at step %d: dev binding %.1f >= train.stop_at_binding=%g", self.stopped_at,
                     self.binding, self.threshold)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.stopped_at is not None:  # resumed after the stop: no further step
            trainer.should_stop = True

    def state_dict(self) -> Dict[str, Any]:
        return {"threshold": self.threshold, "stopped_at": self.stopped_at, "binding": self.binding}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.stopped_at, self.binding = state.get("stopped_at"), state.get("binding")

    def summary(self) -> Optional[Dict[str, Any]]:
        """``{"step", "binding", "threshold"}`` when training stopped here, else None."""
        if self.stopped_at is None:
            return None
        return {"step": self.stopped_at, "binding": self.binding, "threshold": self.threshold}


def stopped_state(ckpt: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The :class:`StopAtBinding` state of a checkpoint whose training stopped there, else None."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "StopAtBinding" in str(key) and isinstance(state, Mapping) and state.get("stopped_at") is not None:
            return dict(state)
    return None


class RecordConfig(pl.Callback):
    """Stores the resolved config (and the resume history) in every checkpoint."""

    def __init__(self, config: Mapping[str, Any], history: Optional[List[Dict[str, Any]]] = None,
                 data: Optional[Mapping[str, str]] = None):
        self.config = dict(config)
        self.history = list(history or [])
        self.data = dict(data or {})  # data file role -> fingerprint (:func:`data_fingerprints`)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        checkpoint["cacr"] = {"config": self.config, "history": self.history, "data": self.data}


FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones in sampled blocks
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 1 << 16


def file_fingerprint(path) -> str:
    """``sha256:<hex>`` of a data file's bytes (a folder such as an LMDB: of its files);
    files over 256 MiB: of their size, 64 evenly spaced 64 KiB blocks and, for HDF5 files
    of this project, the SHA-256 digests their string datasets carry."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        size = q.stat().st_size
        h.update(f"{q.relative_to(p) if p.is_dir() else ''}:{size};".encode())
        with open(q, "rb") as f:
            if size <= FULL_HASH_BYTES:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                for k in range(SAMPLED_BLOCKS):
                    f.seek(k * (size - BLOCK_BYTES) // (SAMPLED_BLOCKS - 1))
                    h.update(f.read(BLOCK_BYTES))
                if q.suffix in (".h5", ".hdf5"):
                    h.update(_h5_digests(q).encode())
    return "sha256:" + h.hexdigest()


def _h5_digests(path: Path) -> str:
    import h5py

    from cacr.data.formats import DIGEST_ATTR

    try:
        with h5py.File(path, "r") as f:
            return ";".join(f"{k}={f[k].attrs.get(DIGEST_ATTR, '')}" for k in sorted(f.keys()))
    except OSError:
        return ""


def data_fingerprints(paths: Mapping[str, Any]) -> Dict[str, str]:
    """Role (``regions``, ``captions``, ...) -> :func:`file_fingerprint` of each data file the
    run reads; keyed by role, not path, so a data folder moved elsewhere is the same data."""
    return {role: file_fingerprint(p) for role, p in sorted(paths.items()) if p is not None and Path(p).exists()}


def data_changes(recorded: Mapping[str, str], now: Mapping[str, str]) -> List[str]:
    """``<role>: changed`` (or gone, new) for every data file whose fingerprint differs from
    the one the checkpoint recorded; [] for a checkpoint that recorded none."""
    if not recorded:
        return []
    return [f"{role} {'changed' if role in recorded and role in now else 'gone' if role in recorded else 'new'} "
            f"({recorded.get(role, '-')[:19]} -> {now.get(role, '-')[:19]})"
            for role in sorted(set(recorded) | set(now)) if recorded.get(role) != now.get(role)]


def check_data_unchanged(resume: Optional["ResumeInfo"], now: Mapping[str, str], allow: bool) -> List[str]:
    """The data changes since the checkpoint of ``resume`` was written; a one-line refusal
    naming the files unless ``allow`` (``resume_override=true``: the changes are recorded)."""
    if resume is None:
        return []
    changes = data_changes(resume.data, now)
    if changes and not allow:
        raise CacrError(f"ckpt_path={resume.path}: the data differs from the run's: " + "; ".join(changes)
                        + " (resume on the run's data files, or pass resume_override=true to accept and record "
                          "the change)")
    if changes:
        log.warning("resuming %s on changed data (recorded): %s", resume.path, "; ".join(changes))
    return changes


# --------------------------------------------------------------------------- resume


@dataclass
class ResumeInfo:
    path: Path
    step: int
    finished: bool
    config: Optional[Dict[str, Any]]  # the checkpoint's resolved config (None: older checkpoint)
    diff: List[str] = field(default_factory=list)
    overridden: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_model_path: Optional[str] = None
    data: Dict[str, str] = field(default_factory=dict)  # the data fingerprints recorded in the checkpoint


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, Mapping):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """``key: old -> new`` for every setting of the checkpoint's config that differs (or is
    gone), bookkeeping left out; the layout keys (devices, nodes, strategy, batch per
    device) only when the effective batch changes. Settings the checkpoint predates are
    not differences (:func:`new_keys`)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    missing = object()

    def skip(k: str) -> bool:
        return k in BOOKKEEPING_KEYS or k.startswith(BOOKKEEPING_PREFIXES) or k.startswith("hydra.")

    out = [f"{k}: {_show(a.get(k, missing), missing)} -> {_show(b.get(k, missing), missing)}"
           for k in keys if not skip(k) and k not in LAYOUT_KEYS and k in a and a[k] != b.get(k, missing)]
    if effective_batch(a) != effective_batch(b):
        out += [f"{k}: {_show(a.get(k, missing), missing)} -> {_show(b.get(k, missing), missing)}"
                for k in sorted(LAYOUT_KEYS) if a.get(k, missing) != b.get(k, missing)]
        out.append(f"(positives per optimizer step: {effective_batch(a)} -> {effective_batch(b)})")
    return out


def new_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """Settings the checkpoint's config does not have (added to the code after it was written)."""
    a = flatten(old)
    return sorted(k for k in flatten(new) if k not in a and not k.startswith(BOOKKEEPING_PREFIXES + ("hydra.",))
                  and k not in BOOKKEEPING_KEYS)


def _show(v, missing) -> str:
    return "(absent)" if v is missing else repr(v)


def effective_batch(flat: Mapping[str, Any]) -> Optional[int]:
    try:
        devices = flat.get("trainer.devices", 1)
        devices = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
        return int(flat["data.batch_size"]) * devices * int(flat.get("trainer.num_nodes", 1))
    except (KeyError, TypeError, ValueError):
        return None


def load_training_checkpoint(path: Path, what: str = "ckpt_path") -> Dict[str, Any]:
    """The checkpoint as a dict, or a one-line error naming the file."""
    if not path.is_file():
        raise CacrError(f"{what}={path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in str(e):  # a pickle naming code (classes, functions): never run
            raise CacrError(f"{what}={path}: holds pickled code or objects other than tensors, which are refused "
                            f"and were not run (expected a checkpoint of this project's train.py)") from None
        raise CacrError(f"{what}={path}: not a readable checkpoint, truncated or not written by torch.save "
                        f"({type(e).__name__}: {first[:200]})") from None
    need = ("state_dict", "global_step", "loops", "optimizer_states", "hyper_parameters")
    if not isinstance(obj, Mapping) or any(k not in obj for k in need):
        has = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CacrError(f"{what}={path}: not a training checkpoint of this project's train.py (expected keys "
                        f"{list(need)}, found {has})")
    if not isinstance(obj["hyper_parameters"], Mapping) or "model_config" not in obj["hyper_parameters"]:
        raise CacrError(f"{what}={path}: a Lightning checkpoint of another project (no "
                        f"hyper_parameters['model_config'])")
    return obj


def best_state(ckpt: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "val/rsum" in str(key) and isinstance(state, Mapping):
            return dict(state)
    return None


def inspect_resume(cfg: DictConfig, resolved: Mapping[str, Any]) -> Optional[ResumeInfo]:
    """What resuming from ``cfg.ckpt_path`` means, or a one-line refusal (see module doc)."""
    from cacr.paths import resolve_path

    if not cfg.get("ckpt_path"):
        return None
    path = resolve_path(cfg.ckpt_path)
    ckpt = load_training_checkpoint(path)
    step = int(ckpt["global_step"])
    max_steps = int(cfg.train.max_steps)
    stored = ckpt.get("cacr") if isinstance(ckpt.get("cacr"), Mapping) else None
    info = ResumeInfo(path=path, step=step, finished=step >= max_steps or stopped_state(ckpt) is not None,
                      config=dict(stored["config"]) if stored else None,
                      history=list(stored.get("history", [])) if stored else [],
                      data=dict(stored.get("data") or {}) if stored else {})
    best = best_state(ckpt)
    info.best_model_path = best.get("best_model_path") if best else None
    del ckpt
    if step > max_steps:
        raise CacrError(f"ckpt_path={path}: the checkpoint is at step {step}, beyond train.max_steps={max_steps}")
    if info.config is None:
        log.warning("%s: written before checkpoints recorded their config; the resumed settings are not compared",
                    path)
        return info
    added = new_keys(info.config, resolved)
    if added:
        log.warning("%s: written before the settings %s existed; resuming with their current values", path,
                    ", ".join(f"{k}={flatten(resolved)[k]!r}" for k in added))
    info.diff = config_diff(info.config, resolved)
    reshaped = [d for d in info.diff if d.split(":")[0] in SHAPE_KEYS]
    if reshaped and cfg.get("resume_override"):
        raise CacrError(f"ckpt_path={path}: {'; '.join(reshaped)} changes the shapes of the checkpoint's weights, "
                        f"which resume_override=true cannot accept; resume with the checkpoint's model settings or "
                        f"start a new run")
    if info.diff:
        if not cfg.get("resume_override"):
            raise CacrError(f"ckpt_path={path}: the config differs from the checkpoint's: " + "; ".join(info.diff)
                            + " (resume with the checkpoint's settings, or pass resume_override=true to accept "
                              "and record the change)")
        info.overridden = True
        log.warning("resuming %s with a changed config (recorded): %s", path, "; ".join(info.diff))
    return info
