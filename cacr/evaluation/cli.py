"""The evaluators' command lines: ``eval_winoground.py`` (Winoground, docs/reference.md §5) and
``eval_retrieval.py`` (full-ranking recalls on a split, docs/reference.md §6).

Shared here: the output folder (refused when it holds the outputs unless ``overwrite=true``),
the process group when the command runs under ``torchrun`` (or with Lightning-style
``LOCAL_RANK`` / ``NODE_RANK`` / ``WORLD_SIZE`` variables), and the wrapper that turns bad
input into one line. The model, head, precision and Winoground inputs come from
:mod:`cacr.evaluation.inputs`, the data from :func:`cacr.data.sources.open_data` (the
reader training's datamodule uses, without Lightning). The bodies of both commands are :func:`run_winoground` and
:func:`run_retrieval`; they return the results record and write it on rank 0 only.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from cacr.config import ConfigError  # noqa: F401 (cli.ConfigError: what its callers catch)
from cacr.distributed import distributed_env, is_main_process as is_rank_zero, join_process_group  # noqa: F401
from cacr.data.sources import open_data
from cacr.paths import resolve_path

from .inputs import (build_model, check_head, check_inputs, check_regions, existing_file, model_file, scoring_batch_size, scoring_bf16,
                     select_device, winoground_inputs)


# --------------------------------------------------------------------------- paths, output


def output_dir(cfg: DictConfig) -> Path:
    """``output=PATH``, else Hydra's run directory."""
    if cfg.get("output"):
        return resolve_path(cfg.output)
    return _hydra_dir()


def _hydra_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        raise ConfigError("output is not set and there is no Hydra run directory: pass output=PATH") from None


# --------------------------------------------------------------------------- loggers


def eval_loggers(cfg: DictConfig, out_dir: Path, command: str) -> list:
    """The loggers of ``logger=`` (``loggers:``, as in training: conf/logger/) for an evaluation
    writing to ``out_dir``, on rank 0 only; a wandb run's job type is ``eval_<command>`` unless
    ``logger.job_type`` names another than training's ``train``."""
    from omegaconf import OmegaConf

    from cacr.loggers import build_loggers

    if not is_rank_zero() or not cfg.get("loggers"):
        return []
    job_type = (cfg.get("logger") or {}).get("job_type")
    return build_loggers(cfg.loggers, out_dir, config=OmegaConf.to_container(cfg, resolve=True),
                         job_type=f"eval_{command}" if job_type in (None, "train") else job_type)


def log_evaluation(loggers: Sequence[Any], prefix: str, record: Mapping[str, Any], *,
                   table: Optional[Tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = None,
                   pictures: Optional[Callable[[Path], Tuple[str, list, list]]] = None) -> None:
    """Log an evaluation's numbers (``<prefix>/<key>``, nested keys joined by ``/``) to every
    logger, and to the wandb ones its per-example ``table`` ``(key, columns, rows)`` and the
    ``pictures(tmp_dir) -> (key, files, captions)``; then close the loggers (wandb: the run ends)."""
    import sys
    import tempfile

    from cacr.dashboards import flat_scalars, wandb_loggers

    if not loggers:
        return
    numbers = {f"{prefix}/{k}": float(v) for k, v in flat_scalars(record).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
        for lg in loggers:
            lg.log_metrics(numbers, step=0)
        wandb = wandb_loggers(loggers)
        if table is not None:
            key, columns, rows = table
            for lg in wandb:
                lg.log_table(key, columns=list(columns), data=[list(r) for r in rows])
        if pictures is not None and wandb:
            with tempfile.TemporaryDirectory(prefix="cacr-eval-pictures-") as tmp:
                key, files, captions = pictures(Path(tmp))
                for lg in wandb:
                    lg.log_image(key, [str(f) for f in files], caption=captions)
        for lg in loggers:
            lg.save()
            lg.finalize("success")
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].finish()


# --------------------------------------------------------------------------- distributed, device


def setup_distributed(device_pref: str) -> torch.device:
    """Join the process group the environment describes (NCCL on GPUs, gloo on CPU) and
    return this process's device."""
    return join_process_group(lambda local_rank: select_device(device_pref, local_rank))


def check_outputs(cfg: DictConfig, names: Sequence[str], inputs: Sequence[Optional[Path]],
                  extra: Sequence[Tuple[str, Optional[Path]]] = ()) -> Path:
    """Before any scoring: the output folder is writable, none of its files ``names`` (nor
    the ``extra`` ``(key, path)`` outputs) exists unless ``overwrite=true``, and none is an
    input. Returns the output folder."""
    from cacr.outputs import check_output, check_writable_dir

    out_dir = output_dir(cfg)
    check_writable_dir(out_dir, "output")
    overwrite = bool(cfg.get("overwrite"))
    hint = "pass overwrite=true to replace it, or give another output=DIR"
    for n in names:
        check_output(out_dir / n, overwrite=overwrite, inputs=inputs, what="output", hint=hint)
    for key, path in extra:
        if path is not None:
            check_output(path, overwrite=overwrite, inputs=inputs, what=key, hint=hint.replace("output=DIR", f"{key}="))
    return out_dir


def guarded(prog: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; bad input ends the program with one line ``prog: message``
    (``CACR_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``: the traceback)."""
    from cacr.errors import EXPECTED, exit_interrupted, exit_on_error, raise_on_termination

    raise_on_termination()
    from cacr.outputs import hydra_made_dirs

    out = resolve_path(cfg.output) if cfg.get("output") else None
    # folders this run creates for output=DIR (it and missing parents; Hydra's for its .hydra files and log)
    # go again if the run fails leaving them empty but for those files
    by_hydra = hydra_made_dirs()
    made = by_hydra + [d for d in ([out, *out.parents] if out is not None else []) if not d.exists()]
    try:
        return fn(cfg)
    except (*EXPECTED, KeyboardInterrupt) as e:
        for d in made:
            if d in by_hydra and d.is_dir():
                _remove_hydra_files(d, Path(prog).stem)
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        if isinstance(e, KeyboardInterrupt):
            exit_interrupted(prog, e)
        exit_on_error(prog, e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _remove_hydra_files(d: Path, job: str) -> None:
    """Hydra's files in a folder it made for ``output=DIR``, when nothing else is there."""
    import shutil

    hydra_files = {d / ".hydra", d / f"{job}.log"}
    if set(d.iterdir()) <= hydra_files:
        for p in hydra_files:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


# --------------------------------------------------------------------------- Winoground


def _tag_files(cfg: DictConfig) -> Dict[str, Path]:
    return {str(k): existing_file(v, f"tag_files.{k}") for k, v in (cfg.get("tag_files") or {}).items()}


def run_winoground(cfg: DictConfig) -> Dict[str, Any]:
    """Score (model or file), results with breakdowns and CIs, files on rank 0, table printed."""
    from cacr.outputs import atomic_write_text
    from cacr.winoground import read_winoground_examples

    from .evaluators import evaluate_winoground
    from .scorefile import (example_tag_sets, read_score_file, read_tag_file, results_markdown, write_results_json,
                            write_score_file)
    from .winoground_metrics import winoground_results

    scorer = cfg.scorer
    if scorer not in ("model", "file"):
        raise ConfigError(f"scorer={scorer!r}: expected model (score with a checkpoint) or file (scores=PATH)")
    head = check_head(cfg.head)
    if int(cfg.n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1, got {cfg.n_boot}")
    tag_paths = _tag_files(cfg)
    compare = {str(k): existing_file(v, f"compare.{k}") for k, v in (cfg.get("compare") or {}).items()}
    examples_path, regions_path, data = winoground_inputs(cfg, need_regions=scorer == "model")
    inputs = [examples_path, regions_path, *tag_paths.values(), *compare.values(),
              resolve_path(cfg.scores) if cfg.get("scores") else None, model_file(cfg)]
    out_dir = check_outputs(cfg, ("results.json", "winoground_scores.jsonl", "results.md", *logged_files(cfg)),
                            inputs)
    n_boot, seed = int(cfg.n_boot), int(cfg.seed)
    if scorer == "model":
        if cfg.get("scores"):
            raise ConfigError("scores=PATH is read with scorer=file; with scorer=model the scores are computed")
        wino = data.winoground(examples_path, regions_path, in_memory=True)
        examples = wino.examples
    else:
        examples = read_winoground_examples(examples_path)
    extra = {name: read_tag_file(p, examples) for name, p in tag_paths.items()}

    record: Dict[str, Any] = {}
    if scorer == "file":
        if not cfg.get("scores"):
            raise ConfigError("scorer=file needs scores=PATH (an official score file, lines "
                              "{\"label\": \"<id>_c<k>_i<j>\", \"score\": s})")
        scores_path = existing_file(cfg.scores, "scores")
        scores = read_score_file(scores_path, examples)
        results = winoground_results(scores, example_tag_sets(examples, extra), n_boot=n_boot, seed=seed)
        name = str(cfg.get("name") or scores_path.stem)
        record.update(scores=str(scores_path))
    else:
        device = setup_distributed(cfg.device)
        bf16, bf16_reason = scoring_bf16(cfg.bf16, device)
        model, name = build_model(cfg, device)
        check_inputs(model, [t for pair in wino.texts for t in pair],
                     [f"example {ex.id!r} caption_{c}" for ex in wino.examples for c in (0, 1)],
                     wino.regions.feature_dim, str(examples_path), regions_what=f"regions={regions_path}")
        check_regions(wino.regions, f"regions={regions_path}")
        scores, results = evaluate_winoground(model, wino, head=head, batch_size=scoring_batch_size(cfg.batch_size, device, model), device=device,
                                              bf16=bf16, progress=bool(cfg.progress) and is_rank_zero(),
                                              n_boot=n_boot, seed=seed, tag_files=tag_paths,
                                              exact=bool(cfg.get("exact", True)))
        record.update(checkpoint=str(resolve_path(cfg.ckpt_path or cfg.model.checkpoint)), head=head,
                      regions=str(regions_path), bf16=bf16, bf16_reason=bf16_reason)

    table = {name: results}
    others = {}
    for other, path in compare.items():
        others[other] = winoground_results(read_score_file(path, examples), example_tag_sets(examples, extra),
                                           n_boot=n_boot, seed=seed)
        table[other] = others[other]
    out = {**results, "model": name, "scorer": scorer, **record, "examples": str(examples_path),
           "n_boot": n_boot, "seed": seed}
    if others:
        out["compare"] = others
    if is_rank_zero():
        markdown = results_markdown(table)
        write_score_file(out_dir / "winoground_scores.jsonl", examples, scores)
        write_results_json(out_dir / "results.json", out)
        atomic_write_text(out_dir / "results.md", markdown)
        print(markdown, end="")
        print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'winoground_scores.jsonl'}, {out_dir / 'results.md'}")
        from cacr.dashboards import TABLE_COLUMNS, TABLE_KEY, winoground_rows

        loggers = eval_loggers(cfg, out_dir, "winoground")
        if loggers:
            rows = winoground_rows(out_dir / "winoground_scores.jsonl", examples)
            pictures = None
            if scorer == "model" and cfg.get("logger", {}).get("congruence", True):
                pictures = functools.partial(_congruence_pictures, model, wino, data.tokenizer, head,
                                             cfg.logger.get("congruence_example"))
            log_evaluation(loggers, "winoground", results, table=(TABLE_KEY, TABLE_COLUMNS, rows), pictures=pictures)
    return out


def logged_files(cfg: DictConfig) -> Tuple[str, ...]:
    """The files a ``logger=csv`` evaluation writes in its output folder (``metrics.csv``)."""
    return ("metrics.csv",) if "csv" in (cfg.get("loggers") or {}) else ()


def _congruence_pictures(model, wino, tokenizer, head: str, example_id, out_dir: Path):
    """The congruence pictures (paper Figure 2) of the fixed example's matched pairs, as in training."""
    from cacr.dashboards import CONGRUENCE_KEY, CongruencePictures, fixed_example

    pictures = CongruencePictures(wino, tokenizer, example_id)
    pictures.index = fixed_example(wino.examples, example_id)
    files, captions = pictures.draw(model, out_dir, head=head)
    return CONGRUENCE_KEY.replace("val/", "winoground/"), files, captions


# --------------------------------------------------------------------------- retrieval


RETRIEVAL_COLUMNS = (("ir_r1", "IR R@1"), ("ir_r5", "IR R@5"), ("ir_r10", "IR R@10"), ("tr_r1", "TR R@1"),
                     ("tr_r5", "TR R@5"), ("tr_r10", "TR R@10"), ("rsum", "R-sum"))


def retrieval_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    head = "| model | captions | images | " + " | ".join(c for _, c in RETRIEVAL_COLUMNS) + " |"
    out = [head, "|---|---:|---:|" + "---:|" * len(RETRIEVAL_COLUMNS)]
    for name, r in rows.items():
        out.append(f"| {name} | {r['n_captions']} | {r['n_images']} | "
                   + " | ".join(f"{r[k]:.2f}" for k, _ in RETRIEVAL_COLUMNS) + " |")
    return "\n".join(out) + "\n"


RETRIEVAL_TABLE_KEY = "retrieval/captions"
RETRIEVAL_TABLE_COLUMNS = ("caption_id", "image_id", "image_rank", "r1", "r5", "r10")


def retrieval_rows(scores, txt2img, caption_ids, image_ids) -> list:
    """The per-caption table of a retrieval evaluation: each caption's id, its image's id, the
    1-based rank of that image among all (ties against the model, as the recalls count them)
    and its hits at 1, 5, 10. With bf16 scoring and ``exact``, the hits are fp32's; a rank
    beyond 10 is as scored."""
    from .retrieval_metrics import retrieval_ranks

    ranks, _ = retrieval_ranks(scores, txt2img)
    txt2img = [int(i) for i in txt2img]
    return [(caption_ids[c], image_ids[txt2img[c]], int(r) + 1, int(r < 1), int(r < 5), int(r < 10))
            for c, r in enumerate(ranks.tolist())]


def run_retrieval(cfg: DictConfig) -> Dict[str, Any]:
    """Recalls of a model on a split (optionally saving the score matrix), or of a saved matrix."""
    from .evaluators import evaluate_retrieval
    from .retrieval_metrics import retrieval_metrics
    from cacr.outputs import atomic_write_text

    from .scorefile import load_score_matrix, write_results_json

    save = resolve_path(cfg.save_scores) if cfg.get("save_scores") else None
    inputs = [resolve_path(cfg.scores) if cfg.get("scores") else None, model_file(cfg)]
    if not cfg.get("scores"):
        data = open_data(cfg.data)
        inputs += [data.files.regions, data.files.captions]
    out_dir = check_outputs(cfg, ("results.json", "results.md", *logged_files(cfg)), inputs, [("save_scores", save)])
    if cfg.get("scores"):
        if cfg.get("ckpt_path") or cfg.get("model") or cfg.get("save_scores"):
            raise ConfigError("scores=PATH recomputes the recalls from a saved matrix: drop ckpt_path, model "
                              "and save_scores")
        path = existing_file(cfg.scores, "scores")
        m = load_score_matrix(path)
        metrics = retrieval_metrics(m.scores, m.txt2img)
        table = (RETRIEVAL_TABLE_KEY, RETRIEVAL_TABLE_COLUMNS,
                 retrieval_rows(m.scores, m.txt2img, m.caption_ids, m.image_ids))
        name = str(cfg.get("name") or path.stem)
        out = {**metrics, "model": name, "scores": str(path)}
    else:
        head = check_head(cfg.head)
        device = setup_distributed(cfg.device)
        bf16, bf16_reason = scoring_bf16(cfg.bf16, device)
        model, name = build_model(cfg, device)
        split = data.split(str(cfg.split))
        check_inputs(model, split.texts, [f"caption {c!r}" for c in split.caption_ids], split.regions.feature_dim,
                     f"data {cfg.data.name!r} split {split.name!r}")
        check_regions(split.regions, f"data.regions={data.files.regions}")
        if save is not None and save.suffix not in (".pt", ".npz"):
            raise ConfigError(f"save_scores={cfg.save_scores}: score matrix files end in .pt or .npz")
        batch_size = scoring_batch_size(cfg.batch_size, device, model)
        t0 = time.perf_counter()
        metrics = evaluate_retrieval(model, split, head=head, batch_size=batch_size, device=device,
                                     bf16=bf16, progress=bool(cfg.progress) and is_rank_zero(),
                                     save_scores=save, exact=bool(cfg.get("exact", True)), keep_scores=True)
        matrix = metrics.pop("score_matrix")
        table = (RETRIEVAL_TABLE_KEY, RETRIEVAL_TABLE_COLUMNS,
                 retrieval_rows(matrix, split.txt2img, split.caption_ids, split.image_ids)) if is_rank_zero() else None
        seconds = time.perf_counter() - t0  # scoring (all ranks; the matrix is gathered) and the recalls
        pairs = split.num_texts * split.num_images
        out = {**metrics, "model": name, "checkpoint": str(resolve_path(cfg.ckpt_path or cfg.model.checkpoint)),
               "head": head, "data": str(cfg.data.name), "split": split.name, "bf16": bf16,
               "bf16_reason": bf16_reason, "batch_size": batch_size, "device": str(device),
               "processes": dist.get_world_size() if dist.is_initialized() else 1,
               "threads": torch.get_num_threads(), "pairs": pairs, "scoring_seconds": round(seconds, 3),
               "pairs_per_s": round(pairs / seconds, 2) if seconds > 0 else None}
        if save is not None:
            out["saved_scores"] = str(save)
    if is_rank_zero():
        markdown = retrieval_markdown({name: metrics})
        write_results_json(out_dir / "results.json", out)
        atomic_write_text(out_dir / "results.md", markdown)
        print(markdown, end="")
        print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
              + (f", {out['saved_scores']}" if "saved_scores" in out else ""))
        log_evaluation(eval_loggers(cfg, out_dir, "retrieval"), "retrieval", metrics, table=table)
    return out
