"""The binding study (README.md beside this file): pre-train, calibrate, fine-tune the arms,
diagnose, report. One command, resumable (a job whose ``results.json`` exists is not re-run):

    python experiments/binding_study/study.py --out experiments/binding_study/runs          # everything
    python experiments/binding_study/study.py --out ... --jobs 2 --stage finetune            # one stage
    python experiments/binding_study/study.py --out ... -- trainer=gpu                      # on a GPU

Stages:

1. ``pretrain``: ``train.py experiment=binding_pretrain seed=s`` for every seed (the
   pre-training stage: MLM + matching against a partial dose of hard negatives); or, with
   ``--pretrainer probe``, ``probe.py`` (fresh scenes, exact swaps, MLM with absolute captions,
   4 layers: the recipe that binds, LOG.md "Session 6"), stopped at the first evaluation on its
   own fresh pairs with binding >= :data:`PROBE_STOP` (the checkpoint part-way up);
2. ``calibrate``: at each pre-trained checkpoint, the mean ranking loss and the mean raw
   regularizer loss of every regularizer on fine-tuning batches; ``lambda = f * L_rank /
   L_reg`` for the fractions ``f`` of :data:`FRACTIONS`, averaged over the checkpoints,
   written to ``calibration.json`` (and used by the arms);
3. ``finetune``: every arm of :func:`arms` from the checkpoint of the same seed
   (``experiment=binding_finetune``): paired seeds, same data order and negatives;
4. ``diagnose``: per fine-tuned model, on fixed validation positives, the raw loss of every
   regularizer and variant in its own regularized layers and in each layer set (so that an
   arm's loss is compared with ``none``'s measured the same way), and the normalised entropy
   of its regularized blocks;
5. ``report``: ``report.py`` (table, paired differences with CIs, the pre-registered
   verdict, plots).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cacr.outputs import atomic_write_text  # noqa: E402 - after the repository is on sys.path

REGULARIZERS = ("cacr", "iais_singular", "iais_distributed")
# Loss variants calibrated on their own (key in calibration.json -> Regularizer keywords); an arm
# built on one of them gets the weight measured for it, not its parent's.
VARIANTS = {"cacr_single_softmax": ("cacr", {"double_softmax": False})}


def raw_loss(name: str):
    """The unweighted regularizer ``name`` (one of :data:`REGULARIZERS` or :data:`VARIANTS`), as
    calibration and diagnostics measure it."""
    from cacr.regularizers import Regularizer

    base, kw = VARIANTS.get(name, (name, {}))
    return Regularizer(base, weight=1.0, schedule="constant", **kw)
FRACTIONS = {"10": 0.1, "30": 0.3}  # lambda * L_reg = f * L_rank at the start checkpoint
SEEDS = (0, 1, 2, 3, 4)
PROBE_STOP = 65.0  # --pretrainer probe: stop at the first evaluation with binding >= this (the 60-75% band)
PROBE_ARGS = ["--layers", "4", "--mlm", "1", "--absolute", "16", "--batch", "32", "--steps", "3000",
              "--eval-every", "50", "--n-eval", "500", "--stop-binding", str(PROBE_STOP)]


def probe_model(probe_args: Sequence[str]) -> List[str]:
    """The train.py overrides that build the probe's UNITER (its ``--layers``; width 256 and 4
    heads are uniter_tiny's and the probe's defaults) for every job after a probe pre-training."""
    args = list(probe_args)
    return [f"model.config.num_hidden_layers={args[args.index('--layers') + 1] if '--layers' in args else 2}"]


def arms(calibration: Dict) -> Dict[str, List[str]]:
    """Arm name -> ``train.py`` overrides. ``none``; each regularizer at the 10% and 30% weights
    with a constant schedule, and at the 30% weight with the official exponential schedule;
    and CACR ablations at 30%, constant: the layer before the last, all layers, single softmax."""
    lam = calibration["lambda"]
    out = {"none": ["loss=none"]}
    for r in REGULARIZERS:
        for f in FRACTIONS:
            out[f"{r}_{f}"] = [f"loss={r}", f"loss.weight={lam[r][f]:.6g}", "loss.schedule=constant"]
        out[f"{r}_30_exp"] = [f"loss={r}", f"loss.weight={lam[r]['30']:.6g}", "loss.schedule=exponential"]
    base = out["cacr_30"]
    out["cacr_30_penultimate"] = base + ["loss.layers=penultimate"]
    out["cacr_30_all_layers"] = base + ["loss.layers=all"]
    out["cacr_30_single_softmax"] = base + ["loss.double_softmax=false"]  # at CACR's (double softmax) weight
    if "cacr_single_softmax" in lam:  # the same variant at the weight calibrated for it (LOG.md, "Stage B, second extension")
        out["cacr_30_single_softmax_cal"] = ["loss=cacr", f"loss.weight={lam['cacr_single_softmax']['30']:.6g}",
                                             "loss.schedule=constant", "loss.double_softmax=false"]
    return out


# ------------------------------------------------------------------ jobs


def set_aside_unfinished(run_dir: Path) -> Optional[Path]:
    """A job killed before its first checkpoint leaves a run directory train.py refuses to reuse
    and nothing to resume from: move it aside (``<name>.killed-<n>``, kept) so the job starts
    afresh. Returns where it went, or None if there was nothing to move."""
    if not run_dir.is_dir() or (run_dir / "results.json").is_file() or (run_dir / "checkpoints" / "last.ckpt").is_file():
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.killed-{n}").exists():
        n += 1
    dest = run_dir.with_name(f"{run_dir.name}.killed-{n}")
    run_dir.rename(dest)
    print(f"  {run_dir} was killed before its first checkpoint: moved to {dest.name}, starting afresh", flush=True)
    return dest


def _train(run_dir: Path, overrides: Sequence[str], threads: int, log: Path) -> None:
    if (run_dir / "results.json").is_file():
        return
    set_aside_unfinished(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"run_dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")  # an interrupted job continues
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"job {run_dir} failed (exit {rc}); see {log}")
    print(f"  done {run_dir.relative_to(run_dir.parents[2])} in {time.time() - t0:.0f} s", flush=True)


def _parallel(jobs, n: int) -> None:
    with ThreadPoolExecutor(max_workers=n) as ex:
        for f in [ex.submit(*j) for j in jobs]:
            f.result()


def pretrain_seed(seed: int, pretrain_seeds: Sequence[int]) -> int:
    """The pre-training seed whose checkpoint fine-tuning seed ``seed`` starts from: its own when
    there is one per seed, else the single shared one."""
    if seed in pretrain_seeds:
        return seed
    if len(pretrain_seeds) == 1:
        return pretrain_seeds[0]
    raise ValueError(f"fine-tuning seed {seed} has no pre-training run (pre-training seeds {list(pretrain_seeds)})")


def checkpoint_of(out: Path, seed: int, pretrain_seeds: Sequence[int], pretrainer: str = "train") -> Path:
    run = out / "pretrain" / f"seed{pretrain_seed(seed, pretrain_seeds)}"
    return run / "model.pt" if pretrainer == "probe" else run / "checkpoints" / "last.ckpt"


def study_world(extra: Sequence[str] = ()):
    """The fine-tuning world's files (``experiment=binding_finetune`` + ``extra``), generated on first use."""
    from omegaconf import OmegaConf

    from cacr.data.sources import synthetic_config
    from cacr.data.synthetic import ensure_synthetic

    d = OmegaConf.to_container(compose_finetune(list(extra)).data, resolve=True)
    return ensure_synthetic(synthetic_config(d), REPO / d["root"])  # the jobs run in REPO


def _stopped(curve: Path) -> bool:
    """Has the probe run whose curve this is reached its --stop-binding (model.pt then saved)?"""
    return curve.is_file() and "stopped_at" in json.loads(curve.read_text())


def _probe(run_dir: Path, seed: int, threads: int, log: Path, probe_args: Sequence[str], extra: Sequence[str]) -> None:
    """One ``probe.py`` pre-training run, then its scoring. A run killed before it stopped starts
    again; one killed after it stopped is only scored."""
    curve = run_dir / "curve.json"
    if (run_dir / "winoground" / "winoground_scores.jsonl").is_file():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not _stopped(curve):
        cmd = [sys.executable, str(Path(__file__).with_name("probe.py")), *probe_args, "--seed", str(seed),
               "--threads", str(threads), "--out", str(curve), "--save", str(run_dir / "model.pt"),
               "--exclude-layouts", str(study_world(extra).winoground_scenes)]
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if rc != 0 or not _stopped(curve):
            raise RuntimeError(f"probe pre-training {run_dir} failed (exit {rc}) or never reached its --stop-binding; "
                               f"see {log}")
    # the checkpoint on the study's own Winoground-format set (both halves; the report splits them)
    cmd = [sys.executable, str(REPO / "eval_winoground.py"), "model=uniter_tiny",
           *[o for o in extra if o.startswith(("data.", "model."))],  # the fine-tuning world and model
           f"model.checkpoint={run_dir / 'model.pt'}", f"output={run_dir / 'winoground'}", "overwrite=true",
           "progress=false", "n_boot=1000", "bf16=false"]
    with open(log, "a") as f:
        if subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS=str(threads))) != 0:
            raise RuntimeError(f"scoring the probe checkpoint {run_dir / 'model.pt'} failed; see {log}")
    print(f"  done {run_dir.relative_to(run_dir.parents[2])} in {time.time() - t0:.0f} s", flush=True)


def stage_pretrain(out: Path, seeds, jobs: int, threads: int, extra: Sequence[str], pretrainer: str = "train",
                   probe_args: Sequence[str] = PROBE_ARGS) -> None:
    print(f"pretrain ({pretrainer}): {len(seeds)} job(s)", flush=True)
    if pretrainer == "probe":
        _parallel([(_probe, out / "pretrain" / f"seed{s}", s, threads, out / "logs" / f"pretrain_seed{s}.log",
                    probe_args, extra) for s in seeds], jobs)
        return
    _parallel([(_train, out / "pretrain" / f"seed{s}", ["experiment=binding_pretrain", f"seed={s}", *extra],
                threads, out / "logs" / f"pretrain_seed{s}.log") for s in seeds], jobs)


def stage_finetune(out: Path, seeds, pretrain_seeds, jobs: int, threads: int, extra: Sequence[str], only=None,
                   pretrainer: str = "train") -> None:
    calibration = json.loads((out / "calibration.json").read_text())
    todo = []
    for name, ov in arms(calibration).items():
        if only and name not in only:
            continue
        for s in seeds:
            todo.append((_train, out / "finetune" / name / f"seed{s}",
                         ["experiment=binding_finetune", f"seed={s}",
                          f"model.checkpoint={checkpoint_of(out, s, pretrain_seeds, pretrainer)}",
                          *ov, *extra], threads, out / "logs" / f"{name}_seed{s}.log"))
    print(f"finetune: {len(todo)} job(s)", flush=True)
    _parallel(todo, jobs)


# ------------------------------------------------------------------ calibration and diagnostics


def compose_finetune(overrides: Sequence[str]):
    """The fine-tuning config (``experiment=binding_finetune`` plus ``overrides``), composed."""
    from hydra import compose, initialize_config_dir

    from cacr.train import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["experiment=binding_finetune", *overrides])


def _setup(cfg):
    """The data module of a composed config (set up), and a module with ``loss=none`` around its model."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cacr.module import RetrievalModule
    from cacr.regularizers import Regularizer
    from cacr.train_data import TrainingDataModule

    dm = TrainingDataModule.from_config(cfg.data, num_candidates=cfg.train.num_candidates)
    dm.setup()
    model = instantiate(cfg.model)
    module = RetrievalModule(model, Regularizer("none", weight=0.0),
                             **OmegaConf.to_container(cfg.module, resolve=True), seed=cfg.seed)
    module.stores["train"] = dm.pair_store("train")
    module.eval()
    return dm, module


def step_batches(dm, cfg):
    """The step-indexed training batches a run of the composed ``cfg`` trains on
    (:class:`cacr.train_data.TrainBatches`: same data order and negatives as ``train.py``)."""
    import torch

    from cacr.train_data import TrainBatches

    split = dm.split("train")
    return TrainBatches(dm.train_pools, batch_size=int(cfg.data.batch_size),
                        num_candidates=int(cfg.train.num_candidates), seed=int(cfg.data.seed),
                        txt_lens=torch.tensor([t.numel() for t in split.texts]),
                        num_bbs=torch.as_tensor(dm.regions.num_regions)[split.image_rows],
                        sampler=dm.negative_sampler())


def calibrate(checkpoint: Path, seed: int, n_batches: int, extra: Sequence[str],
              names: Sequence[str] = REGULARIZERS + tuple(VARIANTS)) -> Dict[str, float]:
    """Mean ranking loss and raw losses of the regularizers and variants ``names`` over the
    first ``n_batches`` fine-tuning batches."""
    import torch

    cfg = compose_finetune([f"model.checkpoint={checkpoint}", f"seed={seed}", *extra])
    dm, module = _setup(cfg)
    batches = step_batches(dm, cfg)
    sums = {"rank": 0.0, **{r: 0.0 for r in names}}
    with torch.no_grad():
        for step in range(n_batches):
            for r in names:
                module.regularizer = raw_loss(r)
                losses = module.compute_losses(batches[step], step=0, total_steps=int(cfg.train.max_steps))
                sums[r] += float(losses["reg_loss"])
            sums["rank"] += float(losses["rank_loss"])
    return {k: v / n_batches for k, v in sums.items()}


def stage_calibrate(out: Path, pretrain_seeds, n_batches: int, extra: Sequence[str], pretrainer: str = "train") -> Dict:
    """``calibration.json``: computed once. An existing file missing some of :data:`VARIANTS` (one
    written before they existed) is topped up with them, measured on the same batches, with the
    weights already there left as they are; the ranking loss is measured again and must agree."""
    path = out / "calibration.json"
    names = REGULARIZERS + tuple(VARIANTS)
    old = json.loads(path.read_text()) if path.is_file() else None
    todo = [n for n in names if old is None or n not in old["lambda"]]
    if not todo:
        return old
    n_batches = old["n_batches"] if old else n_batches
    if old is not None and set(old["per_seed"]) != {str(s) for s in pretrain_seeds}:
        raise RuntimeError(f"{path}: calibrated at seeds {sorted(old['per_seed'])}, asked to top it up at "
                           f"{sorted(str(s) for s in pretrain_seeds)}: use the same --seeds")
    per_seed = {str(s): calibrate(checkpoint_of(out, s, pretrain_seeds, pretrainer), s, n_batches, extra, todo)
                for s in pretrain_seeds}
    if old is not None:
        for s, row in per_seed.items():
            if abs(row["rank"] - old["per_seed"][s]["rank"]) > 1e-4 * abs(row["rank"]):
                raise RuntimeError(f"{path}: topping up {todo}: seed {s}'s ranking loss {row['rank']:.6g} is not the "
                                   f"one calibrated before ({old['per_seed'][s]['rank']:.6g}): not the same "
                                   f"checkpoints or batches")
            per_seed[s] = {**old["per_seed"][s], **{k: v for k, v in row.items() if k != "rank"}}
    mean = {k: sum(v[k] for v in per_seed.values()) / len(per_seed) for k in next(iter(per_seed.values()))}
    lam = {r: {f: frac * mean["rank"] / mean[r] for f, frac in FRACTIONS.items()} for r in todo}
    result = {"n_batches": n_batches, "per_seed": per_seed, "mean": mean,
              "lambda": {**(old["lambda"] if old else {}), **lam},
              "rule": "lambda = f * mean L_rank / mean L_reg at the pre-trained checkpoints (f = 0.1, 0.3)"}
    if old is not None:
        result["topped_up"] = old.get("topped_up", []) + [{"names": todo, "at": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime())}]
    atomic_write_text(path, json.dumps(result, indent=1))
    print("calibration:", json.dumps(result["lambda"]), flush=True)
    return result


def normalised_entropy(P, mask) -> float:
    """Mean over valid rows of H(row) / log(number of valid keys) (1 = uniform); rows with one key skipped."""
    keys = mask.sum(-1).double()  # (B,)
    p = P.double().clamp_min(1e-30)
    h = -(P.double() * p.log()).masked_fill(~mask[:, None, :], 0.0).sum(-1)  # (B, r)
    norm = keys.clamp_min(2).log()[:, None]
    ok = mask & (keys > 1)[:, None]
    return float((h / norm)[ok].mean()) if ok.any() else float("nan")


LAYER_SETS = ("last", "penultimate", "all")  # loss.layers


def loss_key(loss_cfg) -> str:
    """The calibration / diagnostics name of a job's loss: its regularizer, or the variant of it
    that it runs (the :data:`VARIANTS` entry whose settings it has)."""
    name = str(loss_cfg.get("name", "none"))
    for variant, (base, kw) in VARIANTS.items():
        if base == name and all(loss_cfg.get(k) == v for k, v in kw.items()):
            return variant
    return name


def diagnose(job: Path, n_pairs: int = 200) -> Dict:
    """On the first ``n_pairs`` validation positives:

    - ``L_<r>``: the raw loss of every regularizer and variant ``r`` in the job's own regularized
      layers, and ``L_<r>@<layers>`` in each of :data:`LAYER_SETS`. The arm's validity compares
      its own loss with ``none``'s measured the same way: same loss, same layers.
    - ``entropy`` (``_LL``, ``_VV``): the normalised entropy of S_LL / S_VV (the blocks CACR and
      IAIS act on) in the job's own regularized layers.
    - ``loss_key`` and ``loss_layers``: which of those is the job's own."""
    import torch

    from cacr.regularizers import Regularizer

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")  # the job's own resolved config
    cfg.model.checkpoint = str(job / "checkpoints" / "last.ckpt")
    dm, module = _setup(cfg)
    store = dm.pair_store("val")
    split = dm.split("val")
    caps = torch.arange(min(n_pairs, split.num_texts))
    pos = store.batch(caps, split.txt2img[caps])
    n_layers = module.model.config.num_hidden_layers
    with torch.no_grad():
        o = module.model(pos, score_rows=torch.arange(len(caps)), score_layers=list(range(n_layers)))
    own_layers = str(cfg.loss.get("layers", "last"))
    out = {"layers": Regularizer("cacr", layers=own_layers).layer_indices(n_layers),
           "loss_key": loss_key(cfg.loss), "loss_layers": own_layers}
    for layer_set in LAYER_SETS:
        if layer_set == "penultimate" and n_layers < 2:
            continue
        idx = Regularizer("cacr", layers=layer_set).layer_indices(n_layers)
        for r in REGULARIZERS + tuple(VARIANTS):
            reg = raw_loss(r)
            vals = [float(reg(*reg.blocks(o.layer_scores[i], pos.word_index, pos.word_mask, pos.region_index,
                                          pos.region_mask)).loss) for i in idx]
            out[f"L_{r}@{layer_set}"] = sum(vals) / len(vals)
    for r in REGULARIZERS + tuple(VARIANTS):
        out[f"L_{r}"] = out[f"L_{r}@{own_layers}"]
    ents = []
    for i in out["layers"]:
        b = Regularizer("cacr").blocks(o.layer_scores[i], pos.word_index, pos.word_mask, pos.region_index,
                                       pos.region_mask)
        ents.append((normalised_entropy(b.S_LL, b.word_mask), normalised_entropy(b.S_VV, b.region_mask)))
    out["entropy_LL"] = sum(e[0] for e in ents) / len(ents)
    out["entropy_VV"] = sum(e[1] for e in ents) / len(ents)
    out["entropy"] = (out["entropy_LL"] + out["entropy_VV"]) / 2
    return out


def stage_diagnose(out: Path) -> None:
    jobs = sorted(p.parent for p in (out / "finetune").glob("*/seed*/results.json"))
    jobs += sorted(p.parent for p in (out / "pretrain").glob("seed*/results.json"))
    print(f"diagnose: {len(jobs)} model(s)", flush=True)
    for job in jobs:
        path = job / "diagnostics.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None and "loss_key" in old:
            continue
        # New, or written before the per-layer-set and variant losses existed: measured (again);
        # the values already there are kept as they were.
        atomic_write_text(path, json.dumps({**diagnose(job), **(old or {})}, indent=1))


# ------------------------------------------------------------------ main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "binding_study" / "runs")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="fine-tuning seeds (paired across arms)")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=None,
                   help="pre-training runs (default: one per fine-tuning seed; a single one is shared by all)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 1),
                   help="training jobs at once (default: one per core)")
    p.add_argument("--threads", type=int, default=None, help="threads per job (default: cores / jobs)")
    p.add_argument("--stage", choices=("all", "pretrain", "calibrate", "finetune", "diagnose", "report"), default="all")
    p.add_argument("--arms", nargs="*", default=None, help="only these arms (default: all of arms())")
    p.add_argument("--calibration-batches", type=int, default=20)
    p.add_argument("--pretrainer", choices=("train", "probe"), default="train",
                   help="train: train.py experiment=binding_pretrain; probe: probe.py stopped part-way up (see stage 1)")
    p.add_argument("--probe-args", default=" ".join(PROBE_ARGS), help="probe.py arguments for --pretrainer probe")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every job (after --)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    t0 = time.time()
    pre = a.pretrain_seeds or a.seeds
    probe_args = a.probe_args.split()
    extra = (probe_model(probe_args) if a.pretrainer == "probe" else []) + list(a.overrides)
    if a.stage in ("all", "pretrain"):
        stage_pretrain(a.out, pre, a.jobs, threads, extra, a.pretrainer, probe_args)
    if a.stage in ("all", "calibrate"):
        stage_calibrate(a.out, pre, a.calibration_batches, extra, a.pretrainer)
    if a.stage in ("all", "finetune"):
        stage_finetune(a.out, a.seeds, pre, a.jobs, threads, extra, a.arms, a.pretrainer)
    if a.stage in ("all", "diagnose"):
        stage_diagnose(a.out)
    if a.stage in ("all", "report"):
        subprocess.check_call([sys.executable, str(Path(__file__).with_name("report.py")), str(a.out)])
    print(f"study stage {a.stage!r} finished in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
