"""The evaluators' command lines: ``eval_winoground.py`` (Winoground, docs/reference.md §5) and
``eval_retrieval.py`` (full-ranking recalls on a split, docs/reference.md §6).

Shared here: the model from ``ckpt_path`` (a ``.ckpt`` of this project's ``train.py``; its
model config is read from ``hyper_parameters["model_config"]``) or from a model group
option with ``model.checkpoint`` (official UNITER ``.pt`` files), the device, the process
group when the command runs under ``torchrun`` (or with Lightning-style ``LOCAL_RANK`` /
``NODE_RANK`` / ``WORLD_SIZE`` variables), the data config's files, and the wrapper that
turns bad input into one line. The bodies of both commands are :func:`run_winoground` and
:func:`run_retrieval`; they return the results record and write it on rank 0 only.

The data config's files are resolved as ``RetrievalDataModule.setup`` resolves them
(same synthetic world, tokenizer, region caps and splits) but without the datamodule, so
the command lines never import Lightning.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cacr.paths import resolve_path

HEADS = ("rank", "itm")
SPLIT_ROLES = ("train", "val", "test")


class ConfigError(ValueError):
    """A command line that cannot run, explained in one message."""


# --------------------------------------------------------------------------- paths, output


def existing_file(p, what: str) -> Path:
    path = resolve_path(p)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={p}: file not found")
    return path


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


# --------------------------------------------------------------------------- distributed, device


def distributed_env(environ: Mapping[str, str] = os.environ) -> Optional[Tuple[int, int, int]]:
    """``(rank, world size, local rank)`` from torchrun's (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``) or Lightning's (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``)
    variables; ``None`` for one process."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = environ.get("LOCAL_RANK")
    if "RANK" in environ:
        rank = int(environ["RANK"])
    elif local is not None:
        node = int(environ.get("NODE_RANK", environ.get("GROUP_RANK", "0")))
        if node == 0:
            rank = int(local)
        elif "LOCAL_WORLD_SIZE" in environ:
            rank = node * int(environ["LOCAL_WORLD_SIZE"]) + int(local)
        else:
            raise ConfigError(f"WORLD_SIZE={world}, NODE_RANK={node}, LOCAL_RANK={local}: set RANK or "
                              f"LOCAL_WORLD_SIZE to give this process's global rank")
    else:
        raise ConfigError(f"WORLD_SIZE={world} but neither RANK nor LOCAL_RANK is set: launch with torchrun")
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside [0, WORLD_SIZE={world})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun")
    return rank, world, int(local) if local is not None else rank


def select_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA if visible, else CPU), ``cpu``, ``cuda`` (this process's local GPU) or ``cuda:N``."""
    pref = str(pref or "auto")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise ConfigError(f"device={pref!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={pref}: no CUDA device is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"device={pref!r}: expected auto, cpu, cuda or cuda:N")
    return device


def setup_distributed(device_pref: str) -> torch.device:
    """Join the process group the environment describes (NCCL on GPUs, gloo on CPU) and
    return this process's device."""
    env = distributed_env()
    if env is None:
        return select_device(device_pref)
    rank, world, local = env
    device = select_device(device_pref, local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return device


def is_rank_zero() -> bool:
    """Rank 0 of the process group, or of the launch environment where none was joined
    (``scorer=file`` / ``scores=`` runs need no collective)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    env = distributed_env()
    return env is None or env[0] == 0


def check_outputs(cfg: DictConfig, names: Sequence[str], inputs: Sequence[Optional[Path]],
                  extra: Sequence[Tuple[str, Optional[Path]]] = ()) -> Path:
    """Before any scoring: the output folder is writable, none of its files ``names`` (nor
    the ``extra`` ``(key, path)`` outputs) exists unless ``+overwrite=true``, and none is an
    input. Returns the output folder."""
    from cacr.outputs import check_output, check_writable_dir

    out_dir = output_dir(cfg)
    check_writable_dir(out_dir, "output")
    overwrite = bool(cfg.get("overwrite"))
    hint = "pass +overwrite=true to replace it, or give another output=DIR"
    for n in names:
        check_output(out_dir / n, overwrite=overwrite, inputs=inputs, what="output", hint=hint)
    for key, path in extra:
        if path is not None:
            check_output(path, overwrite=overwrite, inputs=inputs, what=key, hint=hint.replace("output=DIR", f"{key}="))
    return out_dir


def guarded(prog: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; bad input ends the program with one line ``prog: message``
    (``CACR_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``: the traceback)."""
    from cacr.errors import EXPECTED, exit_on_error, raise_on_termination

    raise_on_termination()
    try:
        return fn(cfg)
    except EXPECTED as e:
        exit_on_error(prog, e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- model


def _model_file(cfg: DictConfig) -> Optional[Path]:
    if cfg.get("ckpt_path"):
        return resolve_path(cfg.ckpt_path)
    m = cfg.get("model")
    return resolve_path(m.checkpoint) if m and m.get("checkpoint") else None


def build_model(cfg: DictConfig, device: torch.device) -> Tuple[nn.Module, str]:
    """The scoring model in eval mode on ``device`` and a short name for the tables."""
    from hydra.utils import instantiate

    from cacr.model import UniterConfig, build_uniter, load_checkpoint

    ckpt, mcfg = cfg.get("ckpt_path"), cfg.get("model")
    if ckpt and mcfg:
        raise ConfigError("give either ckpt_path=... (a .ckpt of this project, which carries its model config) "
                          "or model=<option> model.checkpoint=..., not both")
    if ckpt:
        path = resolve_path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt}: checkpoint not found")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
            raise ConfigError(f"ckpt_path={ckpt}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
        hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
        if not isinstance(hp, Mapping) or not isinstance(hp.get("model_config"), Mapping):
            raise ConfigError(f"ckpt_path={ckpt}: no hyper_parameters['model_config'], so not a .ckpt of this "
                              f"project's train.py; for an official UNITER file use "
                              f"model=uniter_base model.checkpoint={ckpt}")
        state = obj.get("state_dict")
        state = {k: v for k, v in state.items() if k.startswith("model.")} if isinstance(state, Mapping) else {}
        if not state:
            raise ConfigError(f"ckpt_path={ckpt}: its state_dict holds no 'model.' weights")
        model = build_uniter(UniterConfig.from_dict(hp["model_config"], where=f"{path} model_config"))
        load_checkpoint(model, state, strict=True)
        name = f"{path.parent.parent.name}/{path.stem}" if path.parent.name == "checkpoints" else path.stem
    elif mcfg:
        if not mcfg.get("checkpoint"):
            raise ConfigError("model.checkpoint is not set: a randomly initialised UNITER has nothing to evaluate; "
                              "give model.checkpoint=uniter-base.pt (or use ckpt_path=... for this project's .ckpt)")
        path = resolve_path(mcfg.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint={mcfg.checkpoint}: checkpoint not found")
        model = instantiate(mcfg, checkpoint=str(path))
        name = path.stem
    else:
        raise ConfigError("no model: give ckpt_path=outputs/.../checkpoints/best-stepN.ckpt, or "
                          "model=uniter_base model.checkpoint=uniter-base.pt")
    return model.to(device).eval(), str(cfg.get("name") or name)


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ConfigError(f"head={head!r}: expected rank (retrieval logit, fine-tuned models) or itm "
                          f"(ITM head, zero-shot UNITER)")
    return head


def check_inputs(model: nn.Module, texts: Sequence[torch.Tensor], names: Sequence[str], feature_dim: int,
                 what: str) -> None:
    """Token ids inside the model's vocabulary, texts within its positions, regions of its width."""
    cfg = model.config
    if feature_dim != cfg.img_dim:
        raise ConfigError(f"{what}: region features have width {feature_dim}, the model expects img_dim={cfg.img_dim}")
    for t, name in zip(texts, names):
        if int(t.max()) >= cfg.vocab_size:
            raise ConfigError(f"{what}: {name} has token id {int(t.max())}, the model embeds only "
                              f"{cfg.vocab_size} (wrong tokenizer for this model?)")
        if t.numel() > cfg.max_position_embeddings:
            raise ConfigError(f"{what}: {name} has {t.numel()} tokens with [CLS]/[SEP], more than the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}")


# --------------------------------------------------------------------------- data config files


@dataclass
class DataFiles:
    regions: Optional[Path]
    captions: Optional[Path]
    tokenizer: Optional[str]  # vocab.txt path or a name; None: the vocabulary stored in the captions file
    winoground_examples: Optional[Path]
    winoground_regions: Optional[Path]


def data_files(data: DictConfig) -> DataFiles:
    """The files of a ``conf/data`` option (the synthetic world is generated on first use)."""
    if data.source == "synthetic":
        from cacr.data import SyntheticConfig, ensure_synthetic

        sp = ensure_synthetic(SyntheticConfig(img_dim=int(data.img_dim), vocab_size=int(data.vocab_size),
                                              **OmegaConf.to_container(data.synthetic or {}, resolve=True)),
                              resolve_path(data.root))
        return DataFiles(sp.regions, sp.captions, str(sp.vocab), sp.winoground_examples, sp.winoground_regions)
    if data.source != "files":
        raise ConfigError(f"data.source must be 'synthetic' or 'files', got {data.source!r}")
    return DataFiles(resolve_path(data.regions), resolve_path(data.captions), data.tokenizer,
                     resolve_path(data.winoground_examples), resolve_path(data.winoground_regions))


def region_caps(data: DictConfig):
    from cacr.data import RegionCaps

    return RegionCaps(float(data.conf_th), int(data.min_bb), int(data.max_bb))


def load_tokenizer(files: DataFiles):
    """The data config's tokenizer: ``data.tokenizer``, else the captions file's vocabulary."""
    from cacr.data import WordPieceTokenizer, read_captions

    if files.tokenizer:
        return WordPieceTokenizer.load(files.tokenizer)
    if files.captions is None:
        raise ConfigError("no tokenizer: set data.tokenizer=vocab.txt (or data.captions, whose vocabulary is used)")
    if not files.captions.is_file():
        raise FileNotFoundError(f"data.captions: {files.captions} not found (its vocabulary is the tokenizer; "
                                f"or set data.tokenizer=vocab.txt)")
    captions = read_captions(files.captions, check=False)
    return WordPieceTokenizer(captions.vocab, name=str(captions.attrs.get("tokenizer")),
                              do_lower_case=bool(captions.attrs.get("do_lower_case", False)))


# --------------------------------------------------------------------------- Winoground


def winoground_inputs(cfg: DictConfig, need_regions: bool) -> Tuple[Path, Optional[Path], Optional[DataFiles]]:
    """``(examples, regions, data files)``: ``examples=null`` takes the data config's
    Winoground-format set (the synthetic world's by default) with its regions; explicit
    examples need explicit regions when a model scores them (the data config then gives
    only the tokenizer and region caps, and is not read at all for ``scorer=file``)."""
    if cfg.get("examples"):
        examples = existing_file(cfg.examples, "examples")
        if cfg.get("regions"):
            regions = existing_file(cfg.regions, "regions")
        elif need_regions:
            raise ConfigError(f"examples={cfg.examples} needs regions=PATH (the regions HDF5 holding "
                              f"ex_{{id}}_img_{{0|1}}) to be scored by a model")
        else:
            regions = None
        return examples, regions, data_files(cfg.data) if need_regions else None
    files = data_files(cfg.data)
    if files.winoground_examples is None:
        raise ConfigError("no Winoground examples: give examples=PATH or a data config with winoground_examples")
    if not files.winoground_examples.is_file():
        raise FileNotFoundError(f"data.winoground_examples: {files.winoground_examples} not found")
    regions = resolve_path(cfg.regions) if cfg.get("regions") else files.winoground_regions
    if need_regions:
        if regions is None:
            raise ConfigError("no Winoground regions: give regions=PATH or set data.winoground_regions")
        if not regions.is_file():
            raise FileNotFoundError(f"Winoground regions file {regions} not found")
    return files.winoground_examples, regions, files


def _tag_files(cfg: DictConfig) -> Dict[str, Path]:
    return {str(k): existing_file(v, f"tag_files.{k}") for k, v in (cfg.get("tag_files") or {}).items()}


def run_winoground(cfg: DictConfig) -> Dict[str, Any]:
    """Score (model or file), results with breakdowns and CIs, files on rank 0, table printed."""
    from .evaluators import evaluate_winoground, winoground_examples
    from .scorefile import (atomic_write_text, example_tag_sets, read_score_file, read_tag_file,
                            read_winoground_examples, results_markdown, write_results_json, write_score_file)
    from .winoground_metrics import winoground_results

    scorer = cfg.scorer
    if scorer not in ("model", "file"):
        raise ConfigError(f"scorer={scorer!r}: expected model (score with a checkpoint) or file (scores=PATH)")
    head = check_head(cfg.head)
    if int(cfg.n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1, got {cfg.n_boot}")
    tag_paths = _tag_files(cfg)
    compare = {str(k): existing_file(v, f"compare.{k}") for k, v in (cfg.get("compare") or {}).items()}
    examples_path, regions_path, files = winoground_inputs(cfg, need_regions=scorer == "model")
    inputs = [examples_path, regions_path, *tag_paths.values(), *compare.values(),
              resolve_path(cfg.scores) if cfg.get("scores") else None, _model_file(cfg)]
    out_dir = check_outputs(cfg, ("results.json", "winoground_scores.jsonl", "results.md"), inputs)
    examples = read_winoground_examples(examples_path)
    extra = {name: read_tag_file(p, examples) for name, p in tag_paths.items()}
    n_boot, seed = int(cfg.n_boot), int(cfg.seed)

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
        if cfg.get("scores"):
            raise ConfigError("scores=PATH is read with scorer=file; with scorer=model the scores are computed")
        from cacr.data import WinogroundSet

        device = setup_distributed(cfg.device)
        model, name = build_model(cfg, device)
        wino = WinogroundSet(examples_path, regions_path, load_tokenizer(files),
                             region_caps(cfg.data), in_memory=True)
        if [str(ex["id"]) for ex in wino.examples] != [ex.key for ex in examples]:
            raise ConfigError(f"{examples_path}: examples read differently by the data layer")
        check_inputs(model, [t for pair in wino.texts for t in pair],
                     [f"example {ex['id']!r} caption_{c}" for ex in wino.examples for c in (0, 1)],
                     wino.regions.feature_dim, str(examples_path))
        scores, results = evaluate_winoground(model, wino, head=head, batch_size=int(cfg.batch_size), device=device,
                                              bf16=bool(cfg.bf16), progress=bool(cfg.progress) and is_rank_zero(),
                                              n_boot=n_boot, seed=seed, tag_files=tag_paths)
        examples = winoground_examples(wino.examples)
        record.update(checkpoint=str(resolve_path(cfg.ckpt_path or cfg.model.checkpoint)), head=head,
                      regions=str(regions_path))

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
    return out


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


def retrieval_split(data: DictConfig, role: str):
    """Split ``role`` of the data config, as ``RetrievalDataModule.setup`` builds it (all of
    its images, also for val)."""
    from cacr.data import build_split, open_regions, read_captions

    if role not in SPLIT_ROLES:
        raise ConfigError(f"split={role!r}: expected one of {list(SPLIT_ROLES)} (the data config names each)")
    files = data_files(data)
    for k in ("regions", "captions"):
        p = getattr(files, k)
        if p is None:
            raise ConfigError(f"data.{k} is not set: give the path of the {k} HDF5 file (see data/README.md)")
        if not p.is_file():
            raise FileNotFoundError(f"data.{k}: {p} not found (see data/README.md to make it)")
    captions = read_captions(files.captions)
    split_name = str(data[f"{role}_split"])
    regions = open_regions(files.regions, region_caps(data), bool(data.in_memory))
    return build_split(str(data.name), captions, regions, split_name)


def run_retrieval(cfg: DictConfig) -> Dict[str, Any]:
    """Recalls of a model on a split (optionally saving the score matrix), or of a saved matrix."""
    from .evaluators import evaluate_retrieval
    from .retrieval_metrics import retrieval_metrics
    from .scorefile import atomic_write_text, load_score_matrix, write_results_json

    save = resolve_path(cfg.save_scores) if cfg.get("save_scores") else None
    inputs = [resolve_path(cfg.scores) if cfg.get("scores") else None, _model_file(cfg)]
    if not cfg.get("scores"):
        files = data_files(cfg.data)
        inputs += [files.regions, files.captions]
    out_dir = check_outputs(cfg, ("results.json", "results.md"), inputs, [("save_scores", save)])
    if cfg.get("scores"):
        if cfg.get("ckpt_path") or cfg.get("model") or cfg.get("save_scores"):
            raise ConfigError("scores=PATH recomputes the recalls from a saved matrix: drop ckpt_path, model "
                              "and save_scores")
        path = existing_file(cfg.scores, "scores")
        m = load_score_matrix(path)
        metrics = retrieval_metrics(m.scores, m.txt2img)
        name = str(cfg.get("name") or path.stem)
        out = {**metrics, "model": name, "scores": str(path)}
    else:
        head = check_head(cfg.head)
        device = setup_distributed(cfg.device)
        model, name = build_model(cfg, device)
        split = retrieval_split(cfg.data, str(cfg.split))
        check_inputs(model, split.texts, [f"caption {c!r}" for c in split.caption_ids], split.regions.feature_dim,
                     f"data {cfg.data.name!r} split {split.name!r}")
        if save is not None and save.suffix not in (".pt", ".npz"):
            raise ConfigError(f"save_scores={cfg.save_scores}: score matrix files end in .pt or .npz")
        metrics = evaluate_retrieval(model, split, head=head, batch_size=int(cfg.batch_size), device=device,
                                     bf16=bool(cfg.bf16), progress=bool(cfg.progress) and is_rank_zero(),
                                     save_scores=save)
        out = {**metrics, "model": name, "checkpoint": str(resolve_path(cfg.ckpt_path or cfg.model.checkpoint)),
               "head": head, "data": str(cfg.data.name), "split": split.name}
        if save is not None:
            out["saved_scores"] = str(save)
    if is_rank_zero():
        markdown = retrieval_markdown({name: metrics})
        write_results_json(out_dir / "results.json", out)
        atomic_write_text(out_dir / "results.md", markdown)
        print(markdown, end="")
        print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
              + (f", {out['saved_scores']}" if "saved_scores" in out else ""))
    return out
