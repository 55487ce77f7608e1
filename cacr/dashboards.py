"""What a wandb run page shows beyond the per-step losses (``logger=wandb``; docs/training.md, "Dashboards").

- ``val/wino_{text,image,group,binding}`` and ``val/wino_<tag>_<metric>`` at each validation,
  beside ``val/rsum`` and the recalls: logged by the module when ``module.val_winoground=true``,
  so the csv logger records the same scalars.
- ``val/congruence``: the paper's Figure 2 for one fixed Winoground-format example, at each
  validation, keyed by ``trainer/global_step`` (:class:`CongruencePictures`): for each
  matched pair (caption_0, image_0) and (caption_1, image_1), ``S_LL`` beside
  ``S_LV S_VV S_LV^T`` and ``S_VV`` beside ``S_VL S_LL S_VL^T`` (paper Eqs. 3, 5), drawn by
  :func:`cacr.analysis.pictures.congruence_figure` from :func:`cacr.analysis.attention.relation_attention`.
- ``winoground/examples``: after the final evaluation, a table of every example's outcome
  (:func:`log_winoground_table`, from the run's ``winoground_scores.jsonl``), so two runs can
  be compared item by item.

The run's config (the resolved Hydra config, nested) and its group and job type are set
where the run starts (``cacr/train.py``). wandb is imported only when something is logged.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl

log = logging.getLogger(__name__)

CONGRUENCE_KEY = "val/congruence"
TABLE_KEY = "winoground/examples"
MATCHED_PAIRS = ((0, 0), (1, 1))  # (caption, image) of the two true pairs of an example
# s<k><j> = s(caption_k, image_j), the official score file's label <id>_c<k>_i<j>
TABLE_COLUMNS = ("id", "tag", "collapsed_tag", "split", "s00", "s01", "s10", "s11",
                 "text", "image", "group", "binding")


def wandb_loggers(loggers: Sequence[Any]) -> List[Any]:
    """The Lightning ``WandbLogger`` s among ``loggers`` that hold a run (rank 0 only)."""
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_only

    return [lg for lg in loggers or () if isinstance(lg, WandbLogger) and rank_zero_only.rank == 0]


def _get(ex: Union[Mapping[str, Any], Any], key: str, default: Any = None) -> Any:
    """A field of an example, whether a dict (the datamodule's) or a ``WinogroundExample``."""
    if isinstance(ex, Mapping):
        return ex.get(key, default)
    if hasattr(ex, key):
        return getattr(ex, key)
    return getattr(ex, "extra", {}).get(key, default)


def fixed_example(examples: Sequence[Any], example_id: Optional[Union[int, str]] = None) -> int:
    """The index of example ``example_id``, or with None of the first example of the ``dev``
    half (the first example when the examples carry no ``split``)."""
    if not examples:
        raise ValueError("logger.congruence_example: the Winoground-format set has no examples")
    if example_id is None:
        return next((e for e, ex in enumerate(examples) if _get(ex, "split", "dev") == "dev"), 0)
    ids = [str(_get(ex, "id")) for ex in examples]
    if str(example_id) not in ids:
        raise ValueError(f"logger.congruence_example={example_id}: no Winoground-format example has this id "
                         f"(ids {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})")
    return ids.index(str(example_id))


def logged_step(trainer: pl.Trainer) -> int:
    """The ``trainer/global_step`` at which Lightning's loggers record this validation's
    scalars: the count of optimizer steps before the latest one (Lightning counts
    ``_batches_that_stepped`` up after the validation that follows a step), so a picture
    shares its validation's step; ``trainer.global_step`` when the count is not there."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


class CongruencePictures(pl.Callback):
    """At each validation (not the sanity check), the congruence picture (paper Figure 2) of
    the matched pairs of one fixed Winoground-format example, logged to the run's wandb
    loggers under ``key`` as a list of two images at the validation's ``trainer/global_step``
    (:func:`logged_step`; the figures' titles give the optimizer step, as ``best-step<N>.ckpt`` does).

    ``wino`` (a ``cacr.data.WinogroundSet``) and ``tokenizer`` (its word pieces, for the
    axes) default to the trainer's data module's ``winoground`` and ``tokenizer``; the
    pictures are drawn with the module's ``model`` in eval mode, block-normalised and averaged
    over heads, as the regularizers see them."""

    def __init__(self, wino=None, tokenizer=None, example_id: Optional[Union[int, str]] = None,
                 key: str = CONGRUENCE_KEY):
        super().__init__()
        self.wino, self.tokenizer, self.example_id, self.key = wino, tokenizer, example_id, key
        self.index: Optional[int] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if self.wino is None:
            self.wino = getattr(dm, "winoground", None)
        if self.tokenizer is None:
            self.tokenizer = getattr(dm, "tokenizer", None)
        if self.wino is not None:
            self.index = fixed_example(self.wino.examples, self.example_id)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.index is None:
            return
        loggers = wandb_loggers(trainer.loggers)
        if not loggers:
            return
        model = getattr(pl_module, "model", pl_module)
        head = getattr(pl_module, "hparams", {}).get("score_head", "rank")
        with tempfile.TemporaryDirectory(prefix="cacr-congruence-") as tmp:
            files, captions = self.draw(model, Path(tmp), head=head, step=trainer.global_step)
            for lg in loggers:  # wandb copies each file into the run's media folder as it logs it
                lg.log_image(self.key, [str(f) for f in files], step=logged_step(trainer), caption=captions)

    def draw(self, model, out_dir: Path, *, head: str = "rank", step: int = 0) -> Tuple[List[Path], List[str]]:
        """The PNGs of the matched pairs in ``out_dir`` and their captions."""
        from cacr.analysis.attention import relation_attention
        from cacr.analysis.pictures import congruence_figure

        e = self.index
        ex = self.wino.examples[e]
        pairs = [self.wino.pair(e, c, i) for c, i in MATCHED_PAIRS]
        words = [self.words(p.input_ids.tolist()) for p in pairs]
        was_training = model.training
        model.eval()
        try:
            records = relation_attention(model, pairs, words=words, score_head=head)
        finally:
            model.train(was_training)
        files, captions = [], []
        for (c, i), att in zip(MATCHED_PAIRS, records):
            label = f"example {_get(ex, 'id')}: caption_{c} {_get(ex, f'caption_{c}')!r} / image_{i}"
            L_L, L_V = att.cacr_parts()
            files.append(congruence_figure(att, out_dir / f"c{c}_i{i}.png",
                                           title=f"step {step}  {label}  (score {att.score:.3f})"))
            captions.append(f"{label}: score {att.score:.3f}, L_CACR-L {L_L:.4f}, L_CACR-V {L_V:.4f}")
        return files, captions

    def words(self, ids: Sequence[int]) -> List[str]:
        """The word pieces of a caption's ids without [CLS] and [SEP] (the ids without a tokenizer)."""
        vocab = getattr(self.tokenizer, "vocab", None)
        return [vocab[i] if vocab is not None else str(i) for i in ids[1:-1]]


def dashboard_callbacks(cfg, datamodule=None) -> List[pl.Callback]:
    """The callbacks of ``logger=wandb`` for a training run: ``callbacks.congruence`` (a
    ``_target_`` config, conf/callbacks/default.yaml; a config without a ``callbacks`` group:
    :class:`CongruencePictures`). None for another logger, with ``logger.congruence=false`` or
    ``callbacks.congruence=null``, or when ``datamodule`` has no Winoground-format set."""
    lcfg = cfg.logger
    if lcfg.kind != "wandb" or not lcfg.get("congruence", True):
        return []
    node = cfg.callbacks.get("congruence") if cfg.get("callbacks") is not None else {}
    if node is None:
        return []
    wino = getattr(datamodule, "winoground", None) if datamodule is not None else None
    if datamodule is not None and wino is None:
        return []
    if not cfg.get("module", {}).get("val_winoground", False):
        log.info("logger=wandb: module.val_winoground=false, so no Winoground scalars per validation (val/wino_*)")
    tokenizer = getattr(datamodule, "tokenizer", None)
    if not node:
        return [CongruencePictures(wino, tokenizer, lcfg.get("congruence_example"))]
    from hydra.utils import instantiate

    return [instantiate(node, wino=wino, tokenizer=tokenizer)]


def winoground_rows(scores_path, examples: Sequence[Any]) -> List[list]:
    """One row per example (:data:`TABLE_COLUMNS`) from an official score file
    (``winoground_scores.jsonl``) and the examples it scores (dicts or ``WinogroundExample`` s):
    id, tags, split, the four scores and whether text / image / group / binding are correct."""
    from cacr.evaluation.scorefile import read_score_file
    from cacr.evaluation.winoground_metrics import winoground_correct

    ids = [str(_get(ex, "id")) for ex in examples]
    scores = read_score_file(scores_path, ids)  # (N, 2, 2) [n, k, j] = s(c_k, i_j)
    correct = winoground_correct(scores)
    flat = scores.flatten(1).tolist()  # s00 s01 s10 s11
    flags = {m: v.tolist() for m, v in correct.items()}
    return [[ids[n], _get(ex, "tag"), _get(ex, "collapsed_tag"), _get(ex, "split")] + flat[n]
            + [bool(flags[m][n]) for m in ("text", "image", "group", "binding")]
            for n, ex in enumerate(examples)]


def log_winoground_table(loggers: Sequence[Any], scores_path, examples: Sequence[Any], *,
                         key: str = TABLE_KEY, step: Optional[int] = None) -> int:
    """Log :func:`winoground_rows` as a ``wandb.Table`` under ``key`` to the wandb loggers
    among ``loggers``; returns the number of rows (0 without a wandb logger or a score file)."""
    targets = wandb_loggers(loggers)
    if not targets or not Path(scores_path).is_file():
        return 0
    rows = winoground_rows(scores_path, examples)
    for lg in targets:
        lg.log_table(key, columns=list(TABLE_COLUMNS), data=rows, step=step)
    return len(rows)


def log_final_dashboards(cfg, loggers: Sequence[Any], run_dir, datamodule, *, step: Optional[int] = None) -> int:
    """After the final evaluation: the per-example Winoground table (``logger.winoground_table``)
    from ``<run_dir>/winoground_scores.jsonl``; returns its number of rows (0: nothing logged)."""
    wino = getattr(datamodule, "winoground", None)
    if (cfg.logger.kind != "wandb" or not cfg.logger.get("winoground_table", True) or wino is None
            or not cfg.get("eval", {}).get("winoground", True)):  # no final evaluation: no table (nor an old file's)
        return 0
    return log_winoground_table(loggers, Path(run_dir) / "winoground_scores.jsonl", wino.examples, step=step)


def log_run_summary(cfg, loggers: Sequence[Any], results: Mapping[str, Any], checkpoint=None) -> Optional[str]:
    """After the final evaluation, on the wandb run of ``loggers``: the results' scalars in the
    run's summary (``retrieval/*``, ``winoground/*``, ...; the config is the run's config,
    logged once when it started, so not repeated there) and, with ``logger.log_model``,
    ``checkpoint`` (the one evaluated: the best by the monitored metric) as an artifact of type
    ``model`` named ``model-<run id>``, aliases ``best`` and ``latest``. Returns the artifact's
    name (None: none logged)."""
    targets = wandb_loggers(loggers)
    if not targets:
        return None
    summary = {k: v for k, v in results.items() if k not in ("config", "resumes")}
    name = None
    for lg in targets:
        run = lg.experiment
        run.summary.update(flat_scalars(summary))
        if checkpoint and Path(checkpoint).is_file() and cfg.get("logger", {}).get("log_model", True):
            import wandb

            name = f"model-{run.id}"
            art = wandb.Artifact(name, type="model", metadata={"checkpoint": Path(checkpoint).name,
                                                               **flat_scalars(summary)})
            art.add_file(str(checkpoint), name=Path(checkpoint).name)
            run.log_artifact(art, aliases=["best", "latest"])
    return name


def flat_scalars(d: Mapping[str, Any], prefix: str = "") -> dict:
    """The numbers and strings of a nested record as ``a/b/c`` keys (lists left out)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str)):  # bools too
            out[f"{prefix}{k}"] = v
    return out
