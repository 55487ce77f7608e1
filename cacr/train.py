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
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def job_dirname(overrides: str, limit: int = 96) -> str:
    """A sweep job's directory name from its overrides: no slashes, and at most ``limit``
    characters (longer names keep their start and a hash of the whole)."""
    import hashlib

    name = overrides.replace("/", "_") or "default"
    if len(name) > limit:
        name = name[: limit - 9] + "-" + hashlib.sha1(overrides.encode()).hexdigest()[:8]
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cacr.dirname"):
        OmegaConf.register_new_resolver("cacr.dirname", job_dirname)
    if not OmegaConf.has_resolver("cacr.first"):  # the first argument that is not null
        OmegaConf.register_new_resolver("cacr.first", lambda *xs: next((x for x in xs if x is not None), None))


class ConfigError(ValueError):
    """A configuration that cannot run, explained in one message."""


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


def global_rank(trainer: pl.Trainer) -> int:
    """This process's global rank, known as soon as the trainer exists (before the process
    group): ``node_rank * processes per node + local_rank``."""
    from pytorch_lightning.strategies import ParallelStrategy

    s = trainer.strategy
    if isinstance(s, ParallelStrategy) and s.cluster_environment is not None:
        return int(s.node_rank) * int(s.num_processes) + int(s.local_rank)
    return 0


def build_loggers(cfg: DictConfig, run_dir: Path, rank: int = 0) -> List[Any]:
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        return [WandbLogger(experiment=_wandb_run(cfg, run_dir, rank))]
    raise ConfigError(f"logger.kind={kind!r}: expected csv, wandb or none")


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
    """One wandb run per job, started by global rank 0 only (Lightning's loggers log from
    rank 0; the other ranks get None). Online mode that cannot reach the server within
    ``init_timeout`` falls back to offline mode (``wandb sync`` uploads it later): a run never
    hangs or fails for lack of network."""
    import wandb

    if rank != 0:
        return None
    kwargs = dict(project=cfg.logger.project, dir=str(run_dir), name=run_dir.name,
                  group=cfg.logger.group or _sweep_name(), tags=list(cfg.logger.tags),
                  config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
    if not cfg.logger.offline:
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=30), **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to go online means: log offline
            log.warning("wandb could not start online (%s: %s); logging offline to %s", type(e).__name__, e, run_dir)
    return wandb.init(mode="offline", **kwargs)


def _strategy(tcfg: Dict[str, Any]):
    """``ddp`` (or ``auto`` on several devices) as a DDPStrategy with a static graph: the
    training step never uses some parameters (the ITM head, the image mask embedding), which
    plain DDP would wait for; a static graph finds them once, in the first step."""
    from cacr.launch import is_script_ddp

    if tcfg["strategy"] in ("ddp", "auto") and is_script_ddp(tcfg):
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(static_graph=True)
    return tcfg["strategy"]


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks, loggers) -> pl.Trainer:
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg["strategy"] = _strategy(tcfg)
    return pl.Trainer(
        **tcfg,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers or False,
        use_distributed_sampler=False,  # the data module shards rows itself (exactly once)
    )


def run(cfg: DictConfig, extra_callbacks: Optional[List[Any]] = None) -> Dict[str, Any]:
    from cacr.launch import job_processes

    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_paths(cfg)
    _check_trainer(cfg)
    with job_processes(cfg, run_dir):
        return _fit_and_evaluate(cfg, run_dir, extra_callbacks)


def _fit_and_evaluate(cfg: DictConfig, run_dir: Path, extra_callbacks: Optional[List[Any]]) -> Dict[str, Any]:
    from hydra.utils import instantiate

    from cacr.model import UniterCollator
    from cacr.module import RetrievalModule
    from cacr.train_data import TrainingDataModule

    pl.seed_everything(cfg.seed, workers=True)

    model = instantiate(cfg.model)
    collator = UniterCollator(img_dim=model.config.img_dim,
                              max_txt_positions=model.config.max_position_embeddings)
    dm = TrainingDataModule.from_config(cfg.data, collator=collator, num_candidates=cfg.train.num_candidates)
    regularizer = instantiate(cfg.loss)
    module = RetrievalModule(model, regularizer, **OmegaConf.to_container(cfg.module, resolve=True),
                             seed=cfg.seed)

    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt_dir = run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best-step{step}", monitor="val/rsum", mode="max",
                           save_top_k=1, auto_insert_metric_name=False)
    # last.ckpt: the latest state, written every validation interval and at the end of
    # training whatever the metric did (ModelCheckpoint's save_last only follows new bests).
    last = ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                           every_n_train_steps=int(cfg.eval.val_every_n_steps), save_on_train_epoch_end=True,
                           enable_version_counter=False)
    trainer = build_trainer(cfg, run_dir, [best, last, *(extra_callbacks or [])], [])
    # Validation metrics are gathered exactly, hence equal, on every rank: no sync_dist needed.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.* when logging on epoch level in distributed")
    # The module's batch hook (the host-side mining plan) is meant to run with the data module's loaders.
    warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`")
    rank = global_rank(trainer)
    trainer.loggers = build_loggers(cfg, run_dir, rank)
    sizes = scale(cfg, trainer)
    if rank == 0:
        log.info("training on %s", describe_scale(sizes))
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

        best_path = best.best_model_path or last.best_model_path
        results: Dict[str, Any] = {"best_checkpoint": best_path, "run_dir": str(run_dir), "scale": sizes}
        if best_path:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        module.to(trainer.strategy.root_device)  # fit's teardown left it on the CPU
        results.update(module.final_evaluation(test=cfg.eval.test, winoground=cfg.eval.winoground,
                                               n_boot=cfg.eval.n_boot, output_dir=run_dir))
        if trainer.is_global_zero:
            from cacr.evaluation.scorefile import write_results_json

            write_results_json(run_dir / "results.json", results)
            if cfg.logger.kind == "wandb":
                import wandb

                if wandb.run is not None:
                    wandb.run.summary.update(_flat(results))
    finally:
        if cfg.logger.kind == "wandb":
            import wandb

            wandb.finish()
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


def main_entry(cfg: DictConfig) -> Dict[str, Any]:
    """``train.py``'s body: run, print the summary, and turn config mistakes into one clear line."""
    import sys

    try:
        results = run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"train.py: {e}")
    from pytorch_lightning.utilities import rank_zero_only

    @rank_zero_only
    def report():
        r = results.get("retrieval")
        if r:
            print("test retrieval: " + "  ".join(f"{k}={_fmt(r[k])}" for k in
                                                  ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "rsum")))
        w = results.get("winoground")
        if w:
            print(f"winoground (n={w['n']}): text={_fmt(w['text'])}  image={_fmt(w['image'])}  group={_fmt(w['group'])}")
        print(f"best checkpoint: {results.get('best_checkpoint')}")
        print(Path(results["run_dir"]) / "results.json")

    report()
    return results
