"""``run(cfg)``: one training job from a composed ``conf/train.yaml`` (what ``train.py`` calls).

Builds the data module, the model (optionally from a checkpoint), the regularizer and the
LightningModule, fits with step-based validation (best checkpoint by R-sum), then evaluates
the best checkpoint on the test split (retrieval) and on the data's Winoground-format set,
writes ``results.json`` in the run directory and returns its contents.

Under DDP (``trainer=ddp``, or several devices) the process that runs the job starts the
other ranks of its node itself (:mod:`cacr.launch`); every rank runs this same function on
the same config and run directory, and only global rank 0 writes files (checkpoints,
``results.json``, the score file, the wandb run). Each rank trains on ``data.batch_size``
positives per step, so one optimizer step sees ``data.batch_size x world size`` positives;
the learning-rate and regularizer schedules count optimizer steps whatever the world size.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from cacr.config import ConfigError, register_resolvers  # noqa: F401 (register_resolvers: scripts import it here)
from cacr.distributed import is_script_ddp, primary_process, trainer_global_rank
from cacr.launch import WorkerFailed, job_processes

if TYPE_CHECKING:  # Lightning is imported where a run starts, after the settings are checked
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

# What each DDP rank > 0 of a job started by this process runs, followed by the job's
# resolved config (cacr.launch starts it): :func:`worker_main`, hence the same :func:`run`.
WORKER_COMMAND = (sys.executable, "-m", "cacr.train")


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(str(cfg.run_dir))
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()


def _check_paths(cfg: DictConfig) -> None:
    from cacr.paths import resolve_path

    for key, p in (("ckpt_path", cfg.get("ckpt_path")), ("model.checkpoint", cfg.model.get("checkpoint"))):
        if p and not resolve_path(p).is_file():
            raise ConfigError(f"{key}={p}: checkpoint not found")


def _check_trainer(cfg: DictConfig) -> None:
    if float(cfg.data.get("p_swap", 0) or 0) > 0 and cfg.module.get("mining", False):
        raise ConfigError(f"data.p_swap={cfg.data.p_swap} with module.mining=true: box-swapped image candidates "
                          f"are made per step and cannot be mined; set one of them off")
    stop = cfg.train.get("stop_at_binding")
    if stop is not None and not cfg.module.get("val_winoground", False):
        raise ConfigError(f"train.stop_at_binding={stop}: needs module.val_winoground=true (it reads the dev-half "
                          f"binding that validation logs)")
    if int(cfg.trainer.get("accumulate_grad_batches", 1)) != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches}: training batches "
                          f"are indexed by optimizer step (one batch per step); raise data.batch_size or the "
                          f"number of devices instead")


def scale(cfg: DictConfig, trainer: pl.Trainer) -> Dict[str, Any]:
    """How many processes train and how many positives one optimizer step sees."""
    world = int(trainer.world_size)
    return {"world_size": world, "num_nodes": int(trainer.num_nodes), "devices_per_node": world // int(trainer.num_nodes),
            "batch_per_process": int(cfg.data.batch_size), "effective_batch": int(cfg.data.batch_size) * world,
            "lr": float(cfg.module.lr), "warmup_steps": int(cfg.module.warmup_steps),
            "max_steps": int(trainer.max_steps)}


def describe_scale(s: Dict[str, Any]) -> str:
    return (f"{s['world_size']} process(es) ({s['num_nodes']} node(s) x {s['devices_per_node']}): "
            f"{s['batch_per_process']} positives per process -> effective batch {s['effective_batch']} positives "
            f"per optimizer step; LR {s['lr']:g}: linear warmup over {s['warmup_steps']} steps, then linear decay "
            f"to 0 at step {s['max_steps']} (optimizer steps, whatever the number of processes)")


def build_loggers(cfg: DictConfig, run_dir: Path, rank: int = 0, resume_step: Optional[int] = None) -> List[Any]:
    """The Lightning loggers of ``cfg.loggers``, each a ``_target_`` config (:mod:`cacr.loggers`)."""
    from cacr.loggers import build_loggers as build

    return build(cfg.get("loggers"), run_dir, rank=rank, resume_step=resume_step,
                 config=OmegaConf.to_container(cfg, resolve=True))


def build_callbacks(cfg: DictConfig, datamodule, ckpt_dir: Path, source_dir: Optional[str]) -> Tuple[Any, List[Any]]:
    """``callbacks.checkpoint`` (the best checkpoint, required) and the other callbacks of
    ``cfg.callbacks`` (each a ``_target_`` config; null: off; the dashboards through
    :func:`cacr.dashboards.dashboard_callbacks`)."""
    from cacr.dashboards import dashboard_callbacks

    ccfg = cfg.get("callbacks") or {}
    if ccfg.get("checkpoint") is None:
        raise ConfigError("callbacks.checkpoint: required (the best checkpoint the final test scores and a resume "
                          "restores); set its monitor and mode instead of turning it off")
    best = _instantiate("checkpoint", ccfg.checkpoint, dirpath=str(ckpt_dir), source_dir=source_dir)
    others = list(dashboard_callbacks(cfg, datamodule))
    for name, node in ccfg.items():
        if name in ("checkpoint", "congruence") or node is None:
            continue
        if name == "lr_monitor" and not cfg.get("loggers"):
            raise ConfigError("callbacks.lr_monitor: needs a logger (logger=csv, wandb or tensorboard); "
                              "logger=none has none")
        others.append(_instantiate(name, node))
    return best, others


def _instantiate(name: str, node, **kwargs):
    from hydra.utils import instantiate

    if not isinstance(node, DictConfig) or not node.get("_target_"):
        raise ConfigError(f"callbacks.{name}: expected a _target_ config (a Lightning callback), got {node!r}")
    try:
        return instantiate(node, **kwargs)
    except Exception as e:  # noqa: BLE001 - hydra wraps import and argument errors alike
        cause = e.__cause__ or e
        text = str(cause).strip().splitlines()
        raise ConfigError(f"callbacks.{name} ({node._target_}): {text[0] if text else type(cause).__name__}") from None


def _csv_logger(run_dir: Path, resume_step: Optional[int]):
    """Lightning's CSV logger, which deletes an existing ``metrics.csv`` when it starts. A run
    resumed at step ``s`` in its own directory keeps the rows of the steps before ``s`` (and
    the validation at ``s``) and appends the rest, as the uninterrupted run would have."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    metrics = run_dir / "metrics.csv"
    if resume_step is None or not metrics.is_file():
        return logger
    with open(metrics, newline="") as f:
        rows = [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]

    def keep(r) -> bool:
        try:
            step = int(float(r.get("step", "nan")))
        except ValueError:
            return False
        return step < resume_step or (step == resume_step and any(k.startswith("val/") for k in r))

    kept = [r for r in rows if keep(r)]
    writer = logger.experiment  # removes metrics.csv: write the kept rows back at once
    writer.metrics = kept
    writer.save()
    return logger


def _sweep_name() -> Optional[str]:
    """The sweep directory's name for a Hydra multirun job (its wandb group), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    except (ImportError, ValueError):
        return None


def _wandb_run(cfg: DictConfig, run_dir: Path, rank: int = 0):
    """:func:`wandb_run` with the settings of ``cfg.logger`` (``logger=wandb``)."""
    return wandb_run(run_dir, rank, project=cfg.logger.project, offline=cfg.logger.offline, group=cfg.logger.group,
                     job_type=cfg.logger.get("job_type"), tags=list(cfg.logger.tags),
                     config=OmegaConf.to_container(cfg, resolve=True))


def wandb_run(run_dir: Path, rank: int = 0, *, project: str, offline: bool = True, group: Optional[str] = None,
              job_type: Optional[str] = None, tags: Sequence[str] = (), config: Optional[Dict[str, Any]] = None):
    """One wandb run per job, started by global rank 0 only (Lightning's loggers log from
    rank 0; the other ranks get None). Online mode that cannot reach the server within
    ``init_timeout`` falls back to offline mode (``wandb sync`` uploads it later): a run never
    hangs or fails for lack of network. ``config`` (the resolved config) is the run's config,
    logged once; ``group`` defaults to the sweep's name in a multirun."""
    import wandb

    if rank != 0:
        return None
    kwargs = dict(project=project, dir=str(run_dir), name=run_dir.name, group=group or _sweep_name(),
                  tags=list(tags), job_type=job_type, config=config, reinit="finish_previous")
    if not offline:
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=30), **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to go online means: log offline
            log.warning("wandb could not start online (%s: %s); logging offline to %s", type(e).__name__, e, run_dir)
    return wandb.init(mode="offline", **kwargs)


def _strategy(tcfg: Dict[str, Any]):
    """``ddp`` (or ``auto`` on several devices) as a DDPStrategy with a static graph: the
    training step never uses some parameters (the ITM head, the image mask embedding), which
    plain DDP would wait for; a static graph finds them once, in the first step."""
    if tcfg["strategy"] in ("ddp", "auto") and is_script_ddp(tcfg):
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(static_graph=True)
    return tcfg["strategy"]


def training_precision(tcfg: Dict[str, Any]) -> Tuple[Any, str]:
    """``trainer.precision`` as Lightning takes it, and why. ``auto`` is bf16 autocast
    (``bf16-mixed``) where :func:`cacr.precision.resolve_bf16` finds native bf16 (CUDA; CPUs
    with AVX-512 BF16 or AMX) and fp32 (``32-true``) elsewhere; any other value is Lightning's."""
    precision = tcfg.get("precision", "32-true")
    if str(precision) != "auto":
        return precision, "set explicitly"
    from cacr.precision import resolve_bf16

    accelerator = str(tcfg.get("accelerator", "auto"))
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(accelerator)
    if device is None:
        raise ConfigError(f"trainer.precision=auto: decided for the cpu, gpu, cuda and auto accelerators, not "
                          f"trainer.accelerator={accelerator}; set trainer.precision (e.g. 32-true or bf16-mixed)")
    use, why = resolve_bf16("auto", device)
    return ("bf16-mixed" if use else "32-true"), why


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks, loggers) -> pl.Trainer:
    import pytorch_lightning as pl

    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg["strategy"] = _strategy(tcfg)
    tcfg["precision"] = training_precision(tcfg)[0]
    return pl.Trainer(
        **tcfg,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers or False,
        use_distributed_sampler=False,  # the data module shards rows itself (exactly once)
    )


def run(cfg: DictConfig, extra_callbacks: Optional[List[Any]] = None) -> Dict[str, Any]:
    """One training job: settings checked, the run directory claimed, the checkpoint to
    resume from (if any) read and compared, then :func:`_fit_and_evaluate` (data checked
    before step 0). Raises :class:`RunFinished` for a resume of a finished run whose results
    exist (``rerun_eval=true`` evaluates again)."""
    from cacr import rundir
    from cacr.checks import check_settings

    run_dir = _run_dir(cfg)
    check_settings(cfg)  # before Lightning is imported (seconds): a bad setting answers at once
    _check_paths(cfg)
    _check_trainer(cfg)
    from cacr.resume import inspect_resume

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resume = inspect_resume(cfg, resolved)
    claimed = False
    if primary_process() and not rundir.holds(run_dir):
        here = resume is not None and rundir.same_dir(rundir.resume_dir(resume.path), run_dir)
        if not here and cfg.get("run_dir"):
            rundir.check_claimable(run_dir, reuse=bool(cfg.get("run_dir_reuse", False)))
        rundir.claim(run_dir)
        claimed = True
        if not here and rundir.holds_a_run(run_dir, hydra_files=False):
            rundir.release(run_dir)
            raise rundir.earlier_run(run_dir)
    try:
        if resume is not None and resume.finished and not cfg.get("rerun_eval"):
            for d in dict.fromkeys([run_dir, rundir.resume_dir(resume.path)]):
                if d is not None and (Path(d) / "results.json").is_file():
                    raise RunFinished(f"train.py: the run of {resume.path} finished at step {resume.step} of "
                                      f"train.max_steps={cfg.train.max_steps}; its results are in "
                                      f"{Path(d) / 'results.json'} (rerun_eval=true evaluates it again)")
        run_dir.mkdir(parents=True, exist_ok=True)
        with job_processes(cfg, run_dir, WORKER_COMMAND):
            return _fit_and_evaluate(cfg, run_dir, extra_callbacks, resume, resolved)
    except WorkerFailed as e:  # one line, with a checkpoint that exists to resume from
        ckpt = rundir.complete_checkpoint(run_dir)
        hint = (f"resume with ckpt_path={ckpt}" if ckpt is not None
                else "it left no complete checkpoint; start it again")
        raise ConfigError(f"{e}; {hint}") from None
    finally:
        if claimed:
            rundir.release(run_dir)


class RunFinished(Exception):
    """A resume of a run that already finished (its message is the one line to print)."""


def recorded_config(resolved: Dict[str, Any]) -> Dict[str, Any]:
    """The resolved config as ``results.json`` records it: without ``ckpt_path``, so a run
    resumed in its own directory writes the file the uninterrupted run writes."""
    return {k: v for k, v in resolved.items()
            if k not in ("ckpt_path", "resume_override", "rerun_eval", "run_dir_reuse")}


def _best_weights(best_path: str, ckpt_dir: Path) -> str:
    """The recorded best checkpoint; one a pre-fix run deleted is replaced by the single
    ``best-step*.ckpt`` left in the run's checkpoint folder, with a warning."""
    if not best_path or Path(best_path).is_file():
        return best_path
    left = sorted(Path(best_path).parent.glob("best-step*.ckpt")) or sorted(ckpt_dir.glob("best-step*.ckpt"))
    if len(left) == 1:
        log.warning("best checkpoint %s is missing (deleted by an older version of train.py); using %s",
                    best_path, left[0])
        return str(left[0])
    raise ConfigError(f"best checkpoint {best_path}: file not found, and {len(left)} best-step*.ckpt files "
                      f"beside it; expected the file the run recorded")


def _fit_and_evaluate(cfg: DictConfig, run_dir: Path, extra_callbacks: Optional[List[Any]], resume=None,
                      resolved: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    t_start = time.perf_counter()  # the data's setup included: "training ... in N s"
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from cacr.checks import check_data
    from cacr import rundir
    from cacr.module import RetrievalModule
    from cacr.resume import (LastCheckpoint, RecordConfig, StopAtBinding, check_data_unchanged,
                             data_fingerprints)
    from cacr.train_data import TrainingDataModule

    resolved = resolved if resolved is not None else OmegaConf.to_container(cfg, resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    model = instantiate(cfg.model)
    dm = TrainingDataModule.from_config(cfg.data, num_candidates=cfg.train.num_candidates)
    dm.setup()  # every split and the Winoground-format set, opened and checked before step 0
    check_data(dm, cfg)
    regularizer = instantiate(cfg.loss)
    module = RetrievalModule(model, regularizer, **OmegaConf.to_container(cfg.module, resolve=True),
                             seed=cfg.seed)
    module.attach(train_store=dm.pair_store("train"),
                  val_split=dm.split("val") if "val" in dm.splits else None,
                  test_split=dm.split("test") if "test" in dm.splits else None,
                  winoground=dm.winoground, tokenizer=dm.tokenizer)

    ckpt_dir = run_dir / "checkpoints"
    if primary_process():
        from cacr.outputs import remove_stale_temps

        for name in {p.name.split(".tmp-")[0] for p in ckpt_dir.glob("*.ckpt.tmp-*")}:
            remove_stale_temps(ckpt_dir / name)  # half-written checkpoints of a killed run
    best, callbacks = build_callbacks(cfg, dm, ckpt_dir, str(Path(resume.path).parent) if resume is not None else None)
    # last.ckpt: the latest state, after every validation (once the best is decided) and at
    # the end of training, so a resume from it repeats no validation and knows the best so far.
    last = LastCheckpoint(str(ckpt_dir), best)
    fingerprints = data_fingerprints(dm.paths)  # on every rank: all refuse a changed resume alike
    changed = check_data_unchanged(resume, fingerprints, allow=bool(cfg.get("resume_override")))
    history = list(resume.history) if resume is not None else []
    if resume is not None:
        history.append({"resumed_at_step": resume.step, "from": str(resume.path),
                        "config_changes": resume.diff if resume.overridden else [], "data_changes": changed})
    record = RecordConfig(recorded_config(resolved), history, data=fingerprints)
    from cacr.dashboards import log_final_dashboards, log_run_summary

    stop = cfg.train.get("stop_at_binding")
    stopper = [StopAtBinding(stop)] if stop is not None else []
    trainer = build_trainer(cfg, run_dir, [record, *callbacks, *(extra_callbacks or []), *stopper,
                                           best, last], [])
    # Validation metrics are gathered exactly, hence equal, on every rank: no sync_dist needed.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.* when logging on epoch level in distributed")
    # The module's batch hook (the host-side mining plan) is meant to run with the data module's loaders.
    warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`")
    rank = trainer_global_rank(trainer)
    in_place = resume is not None and rundir.same_dir(rundir.resume_dir(resume.path), run_dir)
    trainer.loggers = build_loggers(cfg, run_dir, rank, resume.step if in_place else None)
    sizes = scale(cfg, trainer)
    if rank == 0:
        log.info("training on %s", describe_scale(sizes))
        precision, why = training_precision(OmegaConf.to_container(cfg.trainer, resolve=True))
        log.info("training precision %s (%s)", precision, why)
        if resume is not None:
            log.info("resuming from %s at step %d of %d", resume.path, resume.step, cfg.train.max_steps)
    try:
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume.path) if resume is not None else None)
        except SystemExit as e:  # Lightning ends a fit interrupted by Ctrl-C (or SIGTERM) with exit code 1
            if isinstance(e.__context__, KeyboardInterrupt):
                raise e.__context__ from None  # exit code 130 and one line, as everywhere else
            raise

        best_path = _best_weights(best.best_model_path, ckpt_dir)
        stopped = stopper[0].summary() if stopper else None
        if stopped is not None:  # the model that reached the binding is the one to evaluate, not the best R-sum
            best_path = None
            log.info("stopped at binding: evaluating the last model (step %d), not the best by R-sum", stopped["step"])
        elif cfg.eval.get("checkpoint", "best") == "last":  # an endpoint at a fixed step (the binding study)
            best_path = None
            log.info("eval.checkpoint=last: evaluating the last model (step %d)", trainer.global_step)
        results: Dict[str, Any] = {"best_checkpoint": best_path or last.path, "run_dir": str(run_dir),
                                   "scale": sizes}
        if stopped is not None:
            results["stopped_at_binding"] = stopped
        # where training ended and why: the closing lines print it
        results["training"] = {"steps": int(trainer.global_step), "max_steps": int(cfg.train.max_steps),
                               "stopped": "binding" if stopped is not None else
                               ("max_steps" if trainer.global_step >= cfg.train.max_steps else "early"),
                               "wall_s": round(time.perf_counter() - t_start, 1)}
        # The final test runs outside Lightning's test loop on purpose: trainer.test(ckpt_path=best)
        # would turn SIGINT/SIGTERM during the test into Lightning's exit code 1 (now: Interrupted,
        # exit code 130, after the run's clean-ups), restore every callback's state from the best
        # checkpoint, and need a placeholder test loader.
        if best_path:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        module.to(trainer.strategy.root_device)  # fit's teardown left it on the CPU
        results.update(module.final_evaluation(test=cfg.eval.test, winoground=cfg.eval.winoground,
                                               n_boot=cfg.eval.n_boot, output_dir=run_dir))
        results["config"] = recorded_config(resolved)
        if history:
            results["resumes"] = history  # every resume, with the config and data changes it accepted
        if trainer.is_global_zero:
            from cacr.evaluation.scorefile import write_results_json

            write_results_json(run_dir / "results.json", results)
            log_final_dashboards(cfg, trainer.loggers, run_dir, dm, step=trainer.global_step)
            log_run_summary(cfg, trainer.loggers, results, best_path or last.path)
    finally:
        if "wandb" in sys.modules:  # a wandb logger of any loggers entry
            sys.modules["wandb"].finish()
    return results


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str)):
            out[f"{prefix}{k}"] = v
    return out


def _fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _wino_line(name: str, w: Mapping[str, Any]) -> str:
    ci = (w.get("ci95") or {}).get("binding")
    interval = f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
    return (f"{name} (n={w['n']}): text={_fmt(w['text'])}  image={_fmt(w['image'])}  group={_fmt(w['group'])}  "
            f"binding={_fmt(w['binding'])}{interval}")


def closing_lines(results: Mapping[str, Any]) -> List[str]:
    """What ``train.py`` prints after the retrieval line: where training stopped and why, and the
    Winoground-format scores (binding with its 95% interval), per half when the set has halves."""
    lines = []
    t = results.get("training")
    if t:
        stop = results.get("stopped_at_binding")
        why = (f"dev binding {stop['binding']:.1f} >= train.stop_at_binding={stop['threshold']:g}" if stop
               else "the step budget (train.max_steps)" if t["stopped"] == "max_steps" else "stopped early")
        lines.append(f"training: {t['steps']} of {t['max_steps']} steps in {t['wall_s']:.0f} s, ended by {why}")
    w = results.get("winoground")
    if w:
        halves = (w.get("by_tag") or {}).get("split") or {}
        if halves:
            lines += [_wino_line(f"winoground {h} {'half' if h in ('dev', 'test') else 'split'}", halves[h])
                      for h in sorted(halves, key=lambda h: (h != "test", h != "dev", h))]
        else:
            lines.append(_wino_line("winoground", w))
    return lines


def main_entry(cfg: DictConfig) -> Dict[str, Any]:
    """``train.py``'s body: run and print the summary. Expected failures end in one line
    ``train.py: <file or key>: <what was expected>`` (one line per impossible setting),
    exit code 1; ``CACR_DEBUG=1`` or ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    import sys

    from cacr.checks import SettingsError
    from cacr.errors import EXPECTED, debug, exit_interrupted, exit_on_error, raise_on_termination

    raise_on_termination()  # SIGTERM runs the clean-ups of Ctrl-C (temporary files, the run lock)
    try:
        results = run(cfg)
    except RunFinished as e:
        print(e)
        return {}
    except SettingsError as e:
        if debug():
            raise
        sys.exit("\n".join(f"train.py: {line}" for line in e.lines))
    except EXPECTED as e:
        exit_on_error("train.py", e)
    except KeyboardInterrupt as e:  # the run's clean-ups (temporary files, the lock) have run
        exit_interrupted("train.py", e)
    from pytorch_lightning.utilities import rank_zero_only

    @rank_zero_only
    def report():
        r = results.get("retrieval")
        if r:
            print("test retrieval: " + "  ".join(f"{k}={_fmt(r[k])}" for k in
                                                  ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "rsum")))
        for line in closing_lines(results):
            print(line)
        print(f"best checkpoint: {results.get('best_checkpoint')}")
        print(Path(results["run_dir"]) / "results.json")

    report()
    return results


def worker_main(argv: Optional[List[str]] = None) -> None:
    """``python -m cacr.train RUN_DIR/ddp_config.yaml``: one rank > 0 of a DDP job, started by
    the job's local rank 0 (:mod:`cacr.launch`) with the job's resolved config; runs the same
    :func:`run` as rank 0."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m cacr.train RUN_DIR/ddp_config.yaml (a DDP worker started by cacr.train.run, "
                 "not by hand)")
    rank = os.environ.get("LOCAL_RANK")
    if rank is None:
        sys.exit("cacr.train: LOCAL_RANK is not set; workers are started by cacr.train.run for a DDP job")
    logging.basicConfig(level=logging.WARNING, format=f"[local rank {rank}] %(levelname)s %(name)s: %(message)s")
    register_resolvers()
    cfg = OmegaConf.load(argv[0])
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"cacr.train (local rank {rank}): {e}")


if __name__ == "__main__":
    from cacr.train import worker_main as _worker_main  # the package's module, not a second copy as __main__

    _worker_main()
