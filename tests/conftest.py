from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def parity():
    """The public code's outputs on a small random UNITER (docs/reference.md §3.5)."""
    return torch.load(FIXTURES / "uniter_parity.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny forwards: intra-op threads only add synchronisation (seconds on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def in_one_thread(fn, *args):
    """``fn(*args)`` with one intra-op thread (the count restored after, also on error)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def synthetic_world(root, world: dict, config: str = "winoground"):
    """Generate, in ``root``, the synthetic world that ``conf/<config>.yaml`` with
    ``data.synthetic.<k>=<v>`` overrides describes (the world the command lines will use);
    returns its paths and those overrides."""
    from cacr.data import SyntheticConfig, ensure_synthetic

    overrides = [f"data.root={root}"] + [f"data.synthetic.{k}={v}" for k, v in world.items()]
    # train.py commands in the tests use the bare defaults (recipe=none), not the default run's recipe
    extra = ["recipe=none"] if config == "train" else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        synthetic = compose(config_name=config, overrides=overrides + extra).data.synthetic
    return ensure_synthetic(SyntheticConfig(**synthetic), root), overrides
