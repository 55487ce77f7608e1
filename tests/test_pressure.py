"""module.pressure_every: the regularizer's pull logged as gradient norms, against a slow twin
that differentiates each loss on its own in a fresh graph."""
import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cacr.module import RetrievalModule

from .conftest import REPO
from .test_training import _batches, tiny_dm  # noqa: F401  (the fixture)


def _module(loss, weight):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={loss}", "model.config.hidden_size=32",
                                          "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
                                          "model.config.initializer_range=0.3"])
    model = instantiate(cfg.model)
    return RetrievalModule(model, instantiate(cfg.loss, schedule="constant", weight=weight), num_negatives=2,
                           mining=False, ranking="softmax", pressure_every=5)


@pytest.mark.parametrize("loss", ["cacr", "iais_distributed"])
def test_pressure_is_the_ratio_of_the_two_gradient_norms(tiny_dm, loss):  # noqa: F811
    m = _module(loss, weight=0.7)
    m.stores["train"] = tiny_dm.pair_store("train")
    batch = m.prepare_batch(_batches(tiny_dm, batch_size=3)[4], m.stores["train"])
    got = m.pressure(m.compute_losses(batch, 4, 100))
    # twin: each loss in its own forward, .backward(), norms over the parameters both reach
    norms = {}
    for key in ("rank_loss", "reg_loss"):
        twin = copy.deepcopy(m)
        twin.zero_grad()
        twin.compute_losses(batch, 4, 100)[key].backward()
        norms[key] = {n: p.grad.clone() for n, p in twin.model.named_parameters() if p.grad is not None}
    shared = norms["rank_loss"].keys() & norms["reg_loss"].keys()
    assert shared
    rank = torch.sqrt(sum((norms["rank_loss"][n].double() ** 2).sum() for n in shared))
    reg = 0.7 * torch.sqrt(sum((norms["reg_loss"][n].double() ** 2).sum() for n in shared))
    assert got["train/grad_rank"] == pytest.approx(float(rank), rel=1e-5)
    assert got["train/grad_reg"] == pytest.approx(float(reg), rel=1e-5)
    assert got["train/pressure"] == pytest.approx(float(reg / rank), rel=1e-5)
    assert 0 < got["train/pressure"]


def test_pressure_scales_with_the_weight_and_a_bad_setting_is_refused(tiny_dm):  # noqa: F811
    a, b = _module("cacr", 0.5), _module("cacr", 1.0)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.stores["train"] = tiny_dm.pair_store("train")
    batch = a.prepare_batch(_batches(tiny_dm, batch_size=3)[2], a.stores["train"])
    pa, pb = (m.pressure(m.compute_losses(batch, 2, 100))["train/pressure"] for m in (a, b))
    assert pb == pytest.approx(2 * pa, rel=1e-5)
    with pytest.raises(ValueError, match="pressure_every"):
        RetrievalModule(a.model, a.regularizer, pressure_every=-1)
