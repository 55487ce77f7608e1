"""Stage C of the binding study: does a regularizer, on from step 0, make binding come sooner?
(PREREGISTRATION_C.md beside this file holds the design, the rules and the power analysis.)

Every arm trains the stage-C recipe (:data:`RECIPE`) from scratch with one seed ``s`` for the
world (``data.synthetic.seed``), the initialisation and the data order, the same ``s`` in every
arm (paired), for :data:`BUDGET` steps, validating the dev half every :data:`VAL_EVERY` steps
and logging the regularizer's gradient pull every :data:`PRESSURE_EVERY` steps. Resumable: a
job with ``results.json`` is not run again, an interrupted one continues from its
``last.ckpt``.

    python experiments/binding_study/acquisition.py --out RUNS --stage pilot             # pilot seeds, none
    python experiments/binding_study/acquisition.py --out RUNS --stage calibrate         # lambda by gradient norm
    python experiments/binding_study/acquisition.py --out RUNS --stage arms --seeds 1-20 # the registered arms
    python experiments/binding_study/acquisition.py --out RUNS --stage report            # endpoints, verdicts
    ... -- trainer=gpu                                                                    # extra train.py overrides

Endpoints (per run): ``steps_to_75``, the first validated step with dev binding >= 75 (a run
that never gets there counts as ``BUDGET + VAL_EVERY``, censored); ``test_binding``, binding on
the test half after the last step. Verdicts: :mod:`decide` (beside this file).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from study import REPO, _parallel, _setup, _train, raw_loss, step_batches  # noqa: E402
import decide  # noqa: E402
from cacr.outputs import atomic_write_text  # noqa: E402

# The stage-C recipe: conf/experiment/binding_acquire.yaml (fixed with the pre-registration).
RECIPE = ["experiment=binding_acquire"]
BUDGET = 1500            # optimizer steps per run (conf/experiment/binding_acquire.yaml's max_steps)
VAL_EVERY = 50           # dev-half validation interval (the turn took < 250 steps in the gate runs)
PRESSURE_EVERY = 50
THRESHOLD = 75.0         # dev binding that counts as "bound"
REGULARIZERS = ("cacr", "iais_singular")
FRACTIONS = {"10": 0.1, "30": 0.3}  # ||lambda grad L_reg|| = f ||grad L_rank|| at initialisation
PILOT_SEEDS = (101, 102, 103)
REGISTERED_CALIBRATION = HERE / "results" / "stage_c_calibration.json"  # the weights PREREGISTRATION_C.md fixed
# log2 steps_to_75: equivalence within a factor 1.2 either way; superiority powered at 25% fewer steps.
# Superiority is tested at alpha 0.025 (Bonferroni over a regularizer's two weights), equivalence
# (TOST, intersection-union over the two weights) at 0.05 per side.
STEPS_RULES = decide.Rules(margin=math.log2(1.2), better="lower", alpha=0.025)
STEPS_EQ_RULES = decide.Rules(margin=math.log2(1.2), better="lower", alpha=0.05)
STEPS_EFFECT = math.log2(1 / 0.75)
BINDING_RULES = decide.Rules(margin=2.0, better="higher", alpha=0.025)   # test binding points: +-2
BINDING_EQ_RULES = decide.Rules(margin=2.0, better="higher", alpha=0.05)
BINDING_EFFECT = 3.0
TARGET_POWER = 0.8
MAX_SEEDS = 30           # the most seeds the compute budget allows (PREREGISTRATION_C.md, "Compute")
PRESSURE_MIN = 0.5       # validity: mean logged pressure >= half the arm's target fraction
RSUM_TOLERANCE = 0.10    # validity: test R-sum within 10% of none's


def parse_seeds(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def seed_overrides(seed: int) -> List[str]:
    return [f"seed={seed}", f"data.seed={seed}", f"data.synthetic.seed={seed}"]


def common() -> List[str]:
    return [*RECIPE, f"train.max_steps={BUDGET}", f"eval.val_every_n_steps={VAL_EVERY}",
            f"module.pressure_every={PRESSURE_EVERY}"]


def arms(calibration: Optional[Dict]) -> Dict[str, List[str]]:
    """Arm name -> the arm's own overrides: ``none``, and each regularizer at each fraction
    (constant schedule: the pull is there from step 0)."""
    out = {"none": ["loss=none"]}
    if calibration is None:
        return out
    for r in REGULARIZERS:
        for f in FRACTIONS:
            out[f"{r}_{f}"] = [f"loss={r}", f"loss.weight={calibration['lambda'][r][f]:.6g}", "loss.schedule=constant"]
    return out


def job_dir(out: Path, arm: str, seed: int, folder: str = "arms") -> Path:
    """``arms/<arm>/seed<s>`` for the study, ``pilot/<arm>/seed<s>`` for the pilot (never mixed)."""
    return out / folder / arm / f"seed{seed}"


# ------------------------------------------------------------------ calibration


def calibrate(seeds: Sequence[int], n_batches: int, extra: Sequence[str]) -> Dict:
    """Mean over seeds and the first ``n_batches`` batches of ||grad L_reg|| / ||grad L_rank||
    at each seed's initialisation (raw, weight 1), and lambda_f = f / that ratio."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir

    from cacr.train import register_resolvers

    register_resolvers()
    ratios: Dict[str, List[float]] = {r: [] for r in REGULARIZERS}
    for s in seeds:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*common(), *seed_overrides(s), *extra])
        pl.seed_everything(s, workers=True, verbose=False)
        dm, module = _setup(cfg)
        module.attach(tokenizer=dm.tokenizer)  # the recipe's MLM masks by word
        module.train()
        batches = step_batches(dm, cfg)
        for r in REGULARIZERS:
            module.regularizer = raw_loss(r)
            for step in range(n_batches):
                batch = module.prepare_batch(batches[step], module.stores["train"])
                p = module.pressure(module.compute_losses(batch, 0, BUDGET))
                ratios[r].append(p["train/pressure"])
    mean = {r: sum(v) / len(v) for r, v in ratios.items()}
    return {"seeds": list(seeds), "n_batches": n_batches, "ratio": mean, "per_batch": ratios,
            "lambda": {r: {f: frac / mean[r] for f, frac in FRACTIONS.items()} for r in REGULARIZERS},
            "rule": "lambda_f = f / mean(||grad L_reg|| / ||grad L_rank||) at initialisation, "
                    "over the model parameters both losses reach"}


# ------------------------------------------------------------------ endpoints


def read_metrics(run_dir: Path) -> List[Dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.csv (the run has not logged yet)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def endpoints(run_dir: Path, budget: int = BUDGET, val_every: int = VAL_EVERY) -> Dict:
    """The run's endpoints and its record: steps_to_75 (censored at budget + val_every),
    the dev curve, the logged pressure, test binding and R-sum from results.json."""
    rows = read_metrics(run_dir)
    curve = [(int(r["step"]) + 1, float(r["val/wino_binding"])) for r in rows if r.get("val/wino_binding")]
    reached = next((s for s, b in curve if b >= THRESHOLD), None)
    pressure = [float(r["train/pressure"]) for r in rows if r.get("train/pressure")]
    out = {"steps_to_75": reached if reached is not None else budget + val_every, "censored": reached is None,
           "curve": curve, "pressure_mean": sum(pressure) / len(pressure) if pressure else None,
           "pressure_last": pressure[-1] if pressure else None}
    res_path = run_dir / "results.json"
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        wino = res["winoground"]
        out["test_binding"] = float(wino["by_tag"]["split"]["test"]["binding"])
        out["rsum"] = float(res["retrieval"]["rsum"])
        out["steps"] = curve[-1][0] if curve else 0
    return out


def comparisons(table: Dict[str, Dict[int, Dict]], reference: str = "none") -> Dict[str, Dict]:
    """Every arm against the reference on both endpoints, over the seeds both have finished;
    with the validity of the arm."""
    out = {}
    ref = table.get(reference, {})
    for arm, rows in table.items():
        if arm == reference:
            continue
        seeds = sorted(s for s in set(rows) & set(ref) if "test_binding" in rows[s] and "test_binding" in ref[s])
        if len(seeds) < 2:
            continue
        valid, why = validity(arm, rows, ref, seeds)
        d_steps = [math.log2(rows[s]["steps_to_75"]) - math.log2(ref[s]["steps_to_75"]) for s in seeds]
        d_bind = [rows[s]["test_binding"] - ref[s]["test_binding"] for s in seeds]
        out[arm] = {"seeds": seeds, "valid": valid, "validity": why,
                    "steps_to_75": _two_level(d_steps, STEPS_RULES, STEPS_EQ_RULES, valid),
                    "test_binding": _two_level(d_bind, BINDING_RULES, BINDING_EQ_RULES, valid)}
    return out


def _two_level(d, sup_rules: "decide.Rules", eq_rules: "decide.Rules", valid: bool) -> Dict:
    """One comparison: superiority and inferiority at ``sup_rules.alpha`` (two-sided), equivalence
    by TOST at ``eq_rules.alpha``; the verdict as :func:`decide.decide` words it."""
    sup, eq = decide.decide(d, sup_rules, valid), decide.decide(d, eq_rules, valid)
    out = dict(sup, tost_ci=eq["tost_ci"], equivalent=eq["equivalent"])
    if not valid:
        out["verdict"] = sup["verdict"]
    elif sup["superior"]:
        out["verdict"] = "superiority (negligible: within the equivalence margin)" if eq["equivalent"] else "superiority"
    elif eq["equivalent"]:
        out["verdict"] = "equivalence"
    elif sup["inferior"]:
        out["verdict"] = "inferiority"
    else:
        out["verdict"] = "inconclusive"
    return out


def regularizer_verdicts(comps: Dict[str, Dict]) -> Dict[str, Dict[str, str]]:
    """Per regularizer and endpoint, the registered verdict over its two weights: superiority if
    either weight is superior (each tested at alpha 0.025), equivalence if both are equivalent,
    inferiority if either is inferior and none superior, else inconclusive; inconclusive if
    either weight's arm is invalid or missing."""
    out: Dict[str, Dict[str, str]] = {}
    for r in REGULARIZERS:
        arms_r = [comps.get(f"{r}_{f}") for f in FRACTIONS]
        out[r] = {}
        for e in ("steps_to_75", "test_binding"):
            if any(a is None for a in arms_r):
                out[r][e] = "inconclusive (an arm has not finished)"
            elif not all(a["valid"] for a in arms_r):
                out[r][e] = "inconclusive (an arm fails a validity condition)"
            elif any(a[e]["verdict"].startswith("superiority") for a in arms_r):
                out[r][e] = "superiority"
            elif all(a[e]["equivalent"] for a in arms_r):
                out[r][e] = "equivalence"
            elif any(a[e]["verdict"] == "inferiority" for a in arms_r):
                out[r][e] = "inferiority"
            else:
                out[r][e] = "inconclusive"
    return out


def plan(planning_sd: Dict[str, float]) -> Dict:
    """Seeds for each registered outcome of each endpoint at TARGET_POWER, from planning sds;
    and the power of each outcome at the chosen number (the largest need, capped at MAX_SEEDS)."""
    need = {"steps_to_75": {"superiority": decide.seeds_for(planning_sd["log2_steps"], STEPS_RULES, STEPS_EFFECT,
                                                            TARGET_POWER)["superiority"],
                            "equivalence": decide.seeds_for(planning_sd["log2_steps"], STEPS_EQ_RULES, STEPS_EFFECT,
                                                            TARGET_POWER)["equivalence"]},
            "test_binding": {"superiority": decide.seeds_for(planning_sd["test_binding"], BINDING_RULES, BINDING_EFFECT,
                                                             TARGET_POWER)["superiority"],
                             "equivalence": decide.seeds_for(planning_sd["test_binding"], BINDING_EQ_RULES,
                                                             BINDING_EFFECT, TARGET_POWER)["equivalence"]}}
    wanted = [n for e in need.values() for n in e.values()]
    n = min(MAX_SEEDS, max(w if w is not None else MAX_SEEDS for w in wanted))
    sign = -1.0  # steps: lower is better
    power = {"steps_to_75": {
                 "superiority": decide.power_closed_form(sign * STEPS_EFFECT, planning_sd["log2_steps"], n, STEPS_RULES)["superiority"],
                 "equivalence": decide.power_closed_form(0.0, planning_sd["log2_steps"], n, STEPS_EQ_RULES)["equivalence"]},
             "test_binding": {
                 "superiority": decide.power_closed_form(BINDING_EFFECT, planning_sd["test_binding"], n, BINDING_RULES)["superiority"],
                 "equivalence": decide.power_closed_form(0.0, planning_sd["test_binding"], n, BINDING_EQ_RULES)["equivalence"]}}
    return {"planning_sd": planning_sd, "seeds_needed": need, "seeds": n, "power_at_seeds": power,
            "target": TARGET_POWER, "max_seeds": MAX_SEEDS}


def validity(arm: str, rows: Dict[int, Dict], ref: Dict[int, Dict], seeds: Sequence[int]):
    """(valid, reasons): the arm's mean logged pressure is at least PRESSURE_MIN of its target
    fraction, and its mean test R-sum is within RSUM_TOLERANCE of the reference's."""
    why = []
    frac = FRACTIONS.get(arm.rsplit("_", 1)[-1])
    if frac is not None:
        p = [rows[s]["pressure_mean"] for s in seeds if rows[s].get("pressure_mean") is not None]
        if not p or sum(p) / len(p) < PRESSURE_MIN * frac:
            why.append(f"pressure {sum(p) / len(p) if p else float('nan'):.3g} < {PRESSURE_MIN} x {frac}")
    rs, rs0 = (sum(t[s]["rsum"] for s in seeds) / len(seeds) for t in (rows, ref))
    if abs(rs - rs0) > RSUM_TOLERANCE * rs0:
        why.append(f"R-sum {rs:.1f} vs none's {rs0:.1f}")
    return not why, why


def load_table(out: Path, folder: str = "arms") -> Dict[str, Dict[int, Dict]]:
    table: Dict[str, Dict[int, Dict]] = {}
    for d in sorted((out / folder).glob("*/seed*")):
        if (d / "results.json").is_file():
            table.setdefault(d.parent.name, {})[int(d.name[4:])] = endpoints(d)
    return table


# ------------------------------------------------------------------ stages


def run_jobs(out: Path, arm_list: Dict[str, List[str]], seeds: Sequence[int], jobs: int, threads: int,
             extra: Sequence[str], folder: str = "arms") -> None:
    work = []
    for s in seeds:
        for arm, ov in arm_list.items():
            d = job_dir(out, arm, s, folder)
            work.append((_train, d, [*common(), *ov, *seed_overrides(s), *extra], threads,
                         out / "logs" / f"{folder}_{arm}_seed{s}.log"))
    _parallel(work, jobs)


def pilot_summary(out: Path) -> Dict:
    """What the power analysis reads from the pilot's ``none`` runs: per seed steps_to_75 and
    test binding, their between-seed sd ``s``, and the planning sd of a paired difference,
    ``sqrt(2) * s * sqrt(df / chi2_0.2(df))``: the difference of two uncorrelated runs (pairing
    by seed can only make it smaller when the arms move together), at the upper one-sided 80%
    confidence bound of the sd (a pilot of few seeds underestimates it as often as not)."""
    import numpy as np

    rows = load_table(out, "pilot").get("none", {})
    if len(rows) < 2:
        raise SystemExit(f"acquisition.py: {out / 'pilot'}: {len(rows)} finished pilot runs; the power analysis needs >= 2")
    from scipy.stats import chi2

    steps = np.log2([r["steps_to_75"] for r in rows.values()])
    bind = np.array([r["test_binding"] for r in rows.values()])
    df = len(rows) - 1
    inflate = float(np.sqrt(2) * np.sqrt(df / chi2.ppf(0.2, df)))
    return {"seeds": sorted(rows), "steps_to_75": {s: r["steps_to_75"] for s, r in rows.items()},
            "censored": {s: r["censored"] for s, r in rows.items()},
            "test_binding": {s: r["test_binding"] for s, r in rows.items()},
            "sd_log2_steps": float(steps.std(ddof=1)), "sd_test_binding": float(bind.std(ddof=1)),
            "planning_factor": inflate,
            "planning_sd": {"log2_steps": float(inflate * steps.std(ddof=1)),
                            "test_binding": float(inflate * bind.std(ddof=1))}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stage", choices=["pilot", "power", "calibrate", "arms", "report"], required=True)
    ap.add_argument("--seeds", default=None, help="e.g. 1-20 or 1,2,5 (pilot: 101-103)")
    ap.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batches", type=int, default=8)
    ap.add_argument("extra", nargs="*", help="extra train.py overrides (after --)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    cal_path = a.out / "calibration.json"
    if not cal_path.is_file() and REGISTERED_CALIBRATION.is_file() and a.stage != "calibrate":
        # a fresh run folder (another machine, a lost work tree): the weights are the registered ones
        atomic_write_text(cal_path, REGISTERED_CALIBRATION.read_text())
        print(f"{cal_path}: the registered weights, from {REGISTERED_CALIBRATION.relative_to(REPO)}")
    cal = json.loads(cal_path.read_text()) if cal_path.is_file() else None
    if a.stage == "calibrate":
        if cal is not None:
            print(f"{cal_path} exists (calibrated at seeds {cal['seeds']}): kept")
            return
        cal = calibrate(parse_seeds(a.seeds) if a.seeds else PILOT_SEEDS, a.n_batches, a.extra)
        atomic_write_text(cal_path, json.dumps(cal, indent=1))
        print("lambda:", json.dumps(cal["lambda"]))
        return
    if a.stage in ("pilot", "arms"):
        if cal is None and a.stage == "arms":
            raise SystemExit(f"acquisition.py: {cal_path} missing: run --stage calibrate first")
        all_arms = arms(cal)  # the pilot's "none" needs no calibration
        names = a.arms.split(",") if a.arms else (["none"] if a.stage == "pilot" else list(all_arms))
        unknown = [n for n in names if n not in all_arms]
        if unknown:
            raise SystemExit(f"acquisition.py: unknown arm(s) {unknown}; arms: {list(all_arms)}")
        seeds = parse_seeds(a.seeds) if a.seeds else (list(PILOT_SEEDS) if a.stage == "pilot" else None)
        if seeds is None:
            raise SystemExit("acquisition.py: --stage arms needs --seeds (PREREGISTRATION_C.md gives the number)")
        run_jobs(a.out, {n: all_arms[n] for n in names}, seeds, a.jobs, a.threads, a.extra,
                 folder="pilot" if a.stage == "pilot" else "arms")
        return
    if a.stage == "power":
        summary = pilot_summary(a.out)
        summary["plan"] = plan(summary["planning_sd"])
        atomic_write_text(a.out / "pilot.json", json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return
    table = load_table(a.out)
    comps = comparisons(table)
    verdicts = regularizer_verdicts(comps)
    atomic_write_text(a.out / "stage_c.json", json.dumps({"endpoints": {k: {str(s): v for s, v in r.items()}
                                                                        for k, r in table.items()},
                                                          "comparisons": comps, "verdicts": verdicts}, indent=1))
    for r, v in verdicts.items():
        print(f"{r}: steps_to_75 {v['steps_to_75']}; test binding {v['test_binding']}")
    for arm, c in comps.items():
        print(f"{arm} - none over {len(c['seeds'])} seeds: steps_to_75 {c['steps_to_75']['verdict']} "
              f"(log2 diff {c['steps_to_75']['mean']:+.3f}, CI {c['steps_to_75']['ci'][0]:+.3f}..{c['steps_to_75']['ci'][1]:+.3f}); "
              f"test binding {c['test_binding']['verdict']} ({c['test_binding']['mean']:+.2f}, "
              f"CI {c['test_binding']['ci'][0]:+.2f}..{c['test_binding']['ci'][1]:+.2f})"
              + ("" if c["valid"] else f"; invalid: {'; '.join(c['validity'])}"))


if __name__ == "__main__":
    main()
