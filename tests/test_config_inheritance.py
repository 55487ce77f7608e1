"""The inheriting config groups compose exactly what the documented commands composed before.

``tests/fixtures/composed_configs.json`` holds the configs of the commands in
``tests/compose_snapshot.py`` (the README's commands, every loss and trainer option, every
experiment). A deliberate value change regenerates it (``python -m tests.compose_snapshot --write``).
"""
import json

import pytest
from hydra import compose, initialize_config_dir

from tests.compose_snapshot import REPO, SNAPSHOT, commands, compose_all, key


@pytest.fixture(scope="module")
def composed():
    return compose_all()


def test_every_command_composes_the_snapshot(composed):
    snapshot = json.loads(SNAPSHOT.read_text())
    assert sorted(composed) == sorted(snapshot)
    for name in snapshot:
        assert composed[name] == snapshot[name], f"{name}: composes differently from {SNAPSHOT.name}"


def test_the_snapshot_tells_options_apart(composed):
    # A check that could not fail is not one: the options it covers really differ.
    assert composed[key(["loss=cacr"])]["loss"]["stop_grad"] is True
    assert composed[key(["loss=iais_singular"])]["loss"]["stop_grad"] is False
    assert composed[key(["loss=none"])]["loss"]["weight"] == 0.0
    assert composed[key(["trainer=ddp"])]["trainer"]["precision"] == "bf16-mixed"
    assert composed[key(["trainer=ddp_cpu"])]["trainer"]["precision"] == "32-true"
    large = composed[key(["experiment=iais_large_singular"])]
    assert large["model"]["config"]["hidden_size"] == 1024 and large["loss"]["name"] == "iais_singular"
    same = {}
    for name, cfg in composed.items():
        same.setdefault(json.dumps(cfg, sort_keys=True), []).append(name)
    # Only the defaults coincide (the default run's recipe sets data.batch_size=32, so
    # "trainer=gpu data.batch_size=8" differs from "trainer=gpu").
    assert sorted(sorted(v) for v in same.values() if len(v) > 1) == [["(default)", "loss=cacr", "trainer=cpu"]]


@pytest.mark.parametrize("group", ["trainer", "loss"])
def test_options_of_a_group_have_the_same_keys(group):
    options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml") if p.stem not in ("default", "base"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        keys = {o: sorted(compose("train", overrides=[f"{group}={o}"])[group]) for o in options}
    assert len(set(map(tuple, keys.values()))) == 1, keys


def test_snapshot_covers_every_experiment():
    files = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    covered = {o.split("=", 1)[1] for c in commands() for o in c if o.startswith("experiment=")}
    assert files == covered
