"""wandb dashboards (cacr/dashboards.py), offline: a tiny run with ``logger=wandb`` is read back
from its own files (the ``.wandb`` transaction log and ``files/media``): per-validation
Winoground scalars beside retrieval, the congruence pictures of the fixed example, the
per-example Winoground table, the resolved config as nested config, the group and job type;
and a csv run records the same scalars."""
import csv
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import cacr.train
from cacr import dashboards
from cacr.evaluation.scorefile import read_score_file
from cacr.evaluation.winoground_metrics import winoground_correct
from cacr.train import run
from cacr.winoground import read_winoground_examples

from .conftest import REPO, in_one_thread
from .wandb_log import wandb_records

TINY_WORLD = [
    "data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
    "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
    "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
    "train.num_candidates=6", "module.num_negatives=2", "trainer.enable_progress_bar=false", "eval.n_boot=50",
    "recipe=none",
]
COMMON = ["train.max_steps=4", "eval.val_every_n_steps=2", "module.val_winoground=true",
          "trainer.log_every_n_steps=1", "module.warmup_steps=2"]
# Until cacr/train.py adds the dashboards itself (docs/training.md, Dashboards), the test passes them.
REGISTERED = "dashboard_callbacks" in inspect.getsource(cacr.train)
PASSES_JOB_TYPE = "job_type" in inspect.getsource(cacr.train._wandb_run)
STEP_KEYS = {"_runtime", "_step", "_timestamp", "trainer/global_step", "step", "epoch"}


def _offline(monkeypatch, tmp):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def _run(cfg):
    return run(cfg, extra_callbacks=None if REGISTERED else dashboards.dashboard_callbacks(cfg))


def compose_train(tmp, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY_WORLD, f"data.root={tmp / 'world'}", f"run_dir={tmp / 'run'}",
                                            *overrides])


_one_thread = in_one_thread


def _records(run_dir: Path, timeout: float = 30.0):
    """The records of the run's transaction log, once it is complete: wandb's service may still
    be writing its tail (up to the ``exit`` record) after ``wandb.finish()`` returns."""
    import time

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return log.parent, records
        time.sleep(0.2)


def _history(records):
    """The history rows, media as nested dicts (``{"val/congruence": {"_type": ..., ...}}``)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {}
            for i in r.history.item:
                *path, last = list(i.nested_key) or [i.key]
                d = row
                for k in path:
                    d = d.setdefault(k, {})
                d[last] = json.loads(i.value_json)
            rows.append(row)
    return rows


def _examples(root: Path):
    (path,) = root.glob("world/*/winoground/examples.jsonl")
    return read_winoground_examples(path)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tmp)
        cfg = compose_train(tmp, "logger=wandb", "logger.group=sweep-x", *COMMON)
        results = _one_thread(_run, cfg)  # the csv twin below runs with the same threads: same sums
    run_dir = Path(results["run_dir"])
    files, records = _records(run_dir)
    return tmp, cfg, run_dir, files, records


@pytest.fixture(scope="module")
def csv_run(wandb_run):
    tmp = wandb_run[0]
    cfg = compose_train(tmp, "logger=csv", *COMMON, f"run_dir={tmp / 'csv_run'}")
    return Path(_one_thread(run, cfg)["run_dir"])


def test_validation_logs_winoground_beside_retrieval(wandb_run):
    *_, records = wandb_run
    val = [h for h in _history(records) if "val/rsum" in h]
    # validations after optimizer steps 2 and 4, recorded by Lightning at the steps before them
    assert [h["trainer/global_step"] for h in val] == [1, 3]
    for h in val:
        for m in ("text", "image", "group", "binding"):
            assert 0.0 <= h[f"val/wino_{m}"] <= 100.0
            # per collapsed tag: the tiny world's dev half holds Object and Relation examples
            assert any(k.startswith("val/wino_") and k.endswith(f"_{m}") and k != f"val/wino_{m}" for k in h), m


def test_each_validation_logs_the_fixed_examples_congruence(wandb_run):
    tmp, _, _, files, records = wandb_run
    pictures = [h for h in _history(records) if dashboards.CONGRUENCE_KEY in h]
    val = [h for h in _history(records) if "val/rsum" in h]
    assert [h["trainer/global_step"] for h in pictures] == [h["trainer/global_step"] for h in val] == [1, 3]
    first_dev = next(ex for ex in _examples(tmp) if ex.extra.get("split", "dev") == "dev")
    for h in pictures:
        img = h[dashboards.CONGRUENCE_KEY]
        assert img["_type"] == "images/separated" and img["count"] == 2
        assert [c.split(":")[0] for c in img["captions"]] == [f"example {first_dev.id}"] * 2
        assert "caption_0" in img["captions"][0] and "caption_1" in img["captions"][1]
        for name in img["filenames"]:
            png = files / "files" / name
            assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_the_config_is_the_resolved_config_nested(wandb_run):
    _, cfg, run_dir, _, records = wandb_run
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in meta.config.update if i.key != "_wandb"}
    assert config["module"]["val_winoground"] is True and config["module"]["lr"] == cfg.module.lr
    assert config["model"]["config"]["hidden_size"] == 32 and config["loss"]["name"] == "cacr"
    assert config["run_dir"] == str(run_dir) and config["logger"]["kind"] == "wandb"
    assert meta.run_group == "sweep-x" and meta.display_name == run_dir.name


@pytest.mark.skipif(not PASSES_JOB_TYPE, reason="cacr/train.py does not pass logger.job_type to wandb.init yet")
def test_the_run_has_the_configured_job_type(wandb_run):
    _, cfg, _, _, records = wandb_run
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.job_type == cfg.logger.job_type == "train"


def _table(files: Path, key=dashboards.TABLE_KEY):
    (path,) = (files / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(path.read_text())


def _check_table(table, examples, scores_path):
    assert table["columns"] == list(dashboards.TABLE_COLUMNS)
    rows = table["data"]
    assert [r[0] for r in rows] == [str(ex.id) for ex in examples]  # one row per example, in order
    scores = read_score_file(scores_path, examples)
    correct = winoground_correct(scores)
    col = {c: k for k, c in enumerate(table["columns"])}
    for n, (ex, r) in enumerate(zip(examples, rows)):
        assert (r[col["tag"]], r[col["collapsed_tag"]], r[col["split"]]) == (ex.tag, ex.collapsed_tag,
                                                                            ex.extra["split"])
        assert [r[col[f"s{k}{j}"]] for k in (0, 1) for j in (0, 1)] == pytest.approx(scores[n].flatten().tolist())
        assert [r[col[m]] for m in ("text", "image", "group", "binding")] == \
               [bool(correct[m][n]) for m in ("text", "image", "group", "binding")]


def test_table_of_per_example_outcomes(wandb_run, tmp_path, monkeypatch):
    """The final evaluation's score file, as a table in a wandb run (read back from its files)."""
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    tmp, cfg, run_dir, _, _ = wandb_run
    _offline(monkeypatch, tmp_path)
    examples = _examples(tmp)
    data = SimpleNamespace(winoground=SimpleNamespace(examples=examples))  # the datamodule's set
    scores_path = run_dir / "winoground_scores.jsonl"
    experiment = wandb.init(project="cacr", mode="offline", dir=str(tmp_path))
    try:
        logger = WandbLogger(experiment=experiment)
        assert dashboards.log_final_dashboards(cfg, [logger], run_dir, data, step=4) == len(examples)
        assert dashboards.log_winoground_table([], scores_path, examples) == 0  # no wandb logger: nothing
    finally:
        wandb.finish()
    files, records = _records(tmp_path)
    _check_table(_table(files), examples, scores_path)
    (h,) = [h for h in _history(records) if dashboards.TABLE_KEY in h]
    assert h[dashboards.TABLE_KEY]["nrows"] == len(examples) and h["trainer/global_step"] == 4


@pytest.mark.skipif(not REGISTERED, reason="cacr/train.py does not log the dashboards yet")
def test_the_run_logs_its_own_table(wandb_run):
    tmp, _, run_dir, files, _ = wandb_run
    _check_table(_table(files), _examples(tmp), run_dir / "winoground_scores.jsonl")


def test_csv_records_the_scalars_wandb_logs(wandb_run, csv_run):
    *_, records = wandb_run
    with open(csv_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_step = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v not in ("", None)})
    logged = {}
    for h in _history(records):
        if "trainer/global_step" in h:
            logged.setdefault(h["trainer/global_step"], {}).update(
                {k: v for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    scalars = lambda d: {k for s in d.values() for k in s} - STEP_KEYS  # noqa: E731
    assert scalars(by_step) == scalars(logged)
    assert {"train/loss", "train/reg_loss", "val/rsum", "val/wino_binding"} <= scalars(logged)
    for step, got in by_step.items():
        for k, v in got.items():
            if k.startswith("val/") and k != "val/wall_s" and k in logged.get(step, {}):  # wall time differs
                assert v == pytest.approx(logged[step][k], abs=1e-6), (step, k)


def test_callbacks_only_for_wandb_with_a_winoground_set(tmp_path):
    no_set = SimpleNamespace(winoground=None, tokenizer=None)
    cfg = compose_train(tmp_path, "logger=wandb")
    assert [type(c) for c in dashboards.dashboard_callbacks(cfg)] == [dashboards.CongruencePictures]
    assert dashboards.dashboard_callbacks(cfg, no_set) == []
    assert dashboards.dashboard_callbacks(compose_train(tmp_path, "logger=wandb", "logger.congruence=false")) == []
    for kind in ("csv", "none"):
        c = compose_train(tmp_path, f"logger={kind}")
        assert dict(c.logger) == {"kind": kind}  # only its own keys
        assert dashboards.dashboard_callbacks(c) == []
        assert dashboards.log_final_dashboards(c, [], tmp_path, no_set) == 0


def test_fixed_example_is_the_first_of_the_dev_half():
    examples = [{"id": 7, "split": "test"}, {"id": 3, "split": "dev"}, {"id": 5, "split": "dev"}]
    assert dashboards.fixed_example(examples) == 1
    assert dashboards.fixed_example(examples, 5) == 2 and dashboards.fixed_example(examples, "7") == 0
    assert dashboards.fixed_example([{"id": 1}, {"id": 2}]) == 0  # no split: the first example
    with pytest.raises(ValueError, match="congruence_example=9: no Winoground-format example"):
        dashboards.fixed_example(examples, 9)
