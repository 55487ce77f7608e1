"""Checkpoint loading: official pre-trained and fine-tuned files, Lightning .ckpt, strictness."""
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cacr.model import CheckpointError, UniterConfig, UniterForImageTextRetrieval, build_uniter, load_checkpoint
from cacr.model.config import BASE, LARGE

from .conftest import REPO


@pytest.fixture()
def parity_model(parity):
    return UniterForImageTextRetrieval(UniterConfig(**parity["config"], img_dim=parity["img_dim"])).eval()


def as_pretrained(sd):
    """The parity state dict as an official pre-training file would hold it."""
    out = {}
    for k, v in sd.items():
        if k.startswith("rank_output."):
            continue
        if "LayerNorm" in k or "layer_norm" in k:
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        out[k.replace("uniter.", "bert.", 1)] = v.half()
    out["cls.predictions.bias"] = torch.zeros(120)
    out["feat_regress.weight"] = torch.zeros(2048, 64)
    out["region_classifier.net.0.weight"] = torch.zeros(64, 64)
    return out


def test_pretrained_file_loads_with_renames_casts_skipped_heads_and_rank_from_itm(parity, parity_model, tmp_path):
    path = tmp_path / "uniter-pretrained.pt"
    torch.save(as_pretrained(parity["state_dict"]), path)
    report = load_checkpoint(parity_model, path)
    assert report.ok
    assert sorted(report.skipped_heads) == ["cls.predictions.bias", "feat_regress.weight",
                                            "region_classifier.net.0.weight"]
    assert report.rank_from_itm
    assert report.cast_from == {"torch.float16": 68}
    sd = parity_model.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    itm_w = parity["state_dict"]["itm_output.weight"].half().float()
    assert torch.equal(sd["rank_output.weight"], itm_w[1:2])
    assert torch.equal(sd["rank_output.bias"], parity["state_dict"]["itm_output.bias"].half().float()[1:2])
    for k in ("uniter.encoder.layer.2.output.LayerNorm.weight", "uniter.embeddings.word_embeddings.weight"):
        assert torch.equal(sd[k], parity["state_dict"][k].half().float())


def test_a_fine_tuned_rank_output_is_kept(parity, parity_model):
    report = load_checkpoint(parity_model, parity["state_dict"])
    assert not report.rank_from_itm
    assert torch.equal(parity_model.rank_output.weight, parity["state_dict"]["rank_output.weight"])
    assert not torch.equal(parity_model.rank_output.weight, parity_model.itm_output.weight[1:2])


def test_lightning_ckpt_with_module_prefix_loads(parity, parity_model, tmp_path):
    ckpt = {"state_dict": {f"model.{k}": v for k, v in parity["state_dict"].items()},
            "pytorch-lightning_version": "2.6.6", "global_step": 7}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    assert load_checkpoint(parity_model, path).ok
    assert torch.equal(parity_model.uniter.pooler.dense.weight, parity["state_dict"]["uniter.pooler.dense.weight"])


def test_strict_load_lists_every_problem_and_leaves_the_model_unchanged(parity, parity_model):
    sd = dict(parity["state_dict"])
    del sd["uniter.pooler.dense.bias"]
    sd["uniter.extra.weight"] = torch.zeros(3)
    sd["itm_output.weight"] = torch.zeros(3, 64)
    before = {k: v.clone() for k, v in parity_model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(parity_model, sd)
    msg = str(err.value)
    assert "uniter.pooler.dense.bias" in msg and "uniter.extra.weight" in msg
    assert "shape mismatch itm_output.weight: checkpoint (3, 64), model (2, 64)" in msg
    assert all(torch.equal(before[k], v) for k, v in parity_model.state_dict().items())

    report = load_checkpoint(parity_model, sd, strict=False)
    assert report.missing == ["uniter.pooler.dense.bias"]
    assert report.unexpected == ["uniter.extra.weight"]
    assert report.mismatched == [("itm_output.weight", (3, 64), (2, 64))]
    assert torch.equal(parity_model.uniter.pooler.dense.weight, sd["uniter.pooler.dense.weight"])


class NotAWeight:
    pass


def test_checkpoints_cannot_run_code(tmp_path, parity_model):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: cannot be read as a weights-only"):
        load_checkpoint(parity_model, path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        load_checkpoint(parity_model, tmp_path / "missing.pt")


def _compose(name):
    with initialize_config_dir(config_dir=str(REPO / "conf" / "model"), version_base="1.3"):
        return compose(config_name=name)


@pytest.mark.parametrize("name,want", [("uniter_base", BASE), ("uniter_large", LARGE)])
def test_model_configs_describe_the_official_models(name, want):
    cfg = _compose(name)
    assert UniterConfig.from_dict(dict(cfg.config)) == want
    assert cfg.checkpoint is None and cfg.strict is True


def test_tiny_config_builds_and_loads_a_checkpoint(tmp_path):
    cfg = _compose("uniter_tiny")
    model = instantiate(cfg)
    assert isinstance(model, UniterForImageTextRetrieval)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    again = build_uniter(dict(cfg.config), checkpoint=path)
    assert again.load_report.ok
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
