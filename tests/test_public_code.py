"""benchmark.py --public-code: importing a local checkout of the public UNITER code and
building its evaluation batches. The score agreement with the real public code runs when
``CACR_PUBLIC_UNITER`` names a checkout (nothing is downloaded); the import plumbing and the
batch builder are tested on their own here."""
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import public_code  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_import():
    """Each test imports its checkout into a clean namespace."""
    def clear():
        for name in [n for n in sys.modules if n == public_code.PACKAGE or n.startswith(public_code.PACKAGE + ".")]:
            del sys.modules[name]
    clear()
    yield
    clear()


def write_checkout(root: Path) -> Path:
    """A minimal checkout with the public code's layout and import style: relative imports
    between model/ files and apex's FusedLayerNorm in the layers."""
    d = root / "model"
    d.mkdir(parents=True)
    (d / "layer.py").write_text(textwrap.dedent("""
        from apex.normalization.fused_layer_norm import FusedLayerNorm as BertLayerNorm
    """))
    (d / "model.py").write_text(textwrap.dedent("""
        from .layer import BertLayerNorm
        class UniterConfig:
            @classmethod
            def from_dict(cls, d):
                c = cls(); c.__dict__.update(d); return c
    """))
    (d / "itm.py").write_text(textwrap.dedent("""
        from .model import UniterConfig, BertLayerNorm
        class UniterForImageTextRetrieval:
            norm = BertLayerNorm
    """))
    return root


def test_import_of_a_checkout_with_relative_imports_and_apex(tmp_path):
    model_mod, itm_mod, layer_norm = public_code.import_public(write_checkout(tmp_path / "uniter"))
    assert model_mod.__name__ == "uniter_public.model" and itm_mod.__name__ == "uniter_public.itm"
    assert Path(itm_mod.__file__) == tmp_path / "uniter" / "model" / "itm.py"
    if layer_norm.startswith("torch.nn.LayerNorm"):  # apex absent: the stand-in is what the layers got
        assert itm_mod.UniterForImageTextRetrieval.norm is torch.nn.LayerNorm
    else:
        assert layer_norm == "apex FusedLayerNorm"
    # importing the same checkout again is allowed; a second checkout in one process is not
    public_code.import_public(tmp_path / "uniter")
    with pytest.raises(public_code.PublicCodeError, match="already imported"):
        public_code.import_public(write_checkout(tmp_path / "other"))


def test_a_path_that_is_no_checkout_is_named(tmp_path):
    with pytest.raises(public_code.PublicCodeError, match=r"no model/model\.py there"):
        public_code.import_public(tmp_path)
    broken = write_checkout(tmp_path / "broken")
    (broken / "model" / "itm.py").write_text("from .model import Missing\n")
    with pytest.raises(public_code.PublicCodeError, match="importing its model/ failed: ImportError"):
        public_code.import_public(broken)


def test_public_inputs_of_ragged_images():
    gen = torch.Generator().manual_seed(0)
    cap = torch.tensor([101, 7, 8, 9, 102])
    imgs = [(torch.randn(m, 6, generator=gen), torch.rand(m, 7, generator=gen)) for m in (3, 1, 4)]
    b = public_code.public_inputs(cap, imgs, torch.device("cpu"))
    assert b["input_ids"].shape == (3, 5) and (b["input_ids"] == cap).all()
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert b["img_feat"].shape == (3, 4, 6) and b["img_pos_feat"].shape == (3, 4, 7)
    assert b["attn_masks"].sum(1).tolist() == [5 + 3, 5 + 1, 5 + 4]
    for i, (f, p) in enumerate(imgs):
        m = f.shape[0]
        assert torch.equal(b["img_feat"][i, :m], f) and (b["img_feat"][i, m:] == 0).all()
        assert torch.equal(b["img_pos_feat"][i, :m], p) and (b["img_pos_feat"][i, m:] == 0).all()
        # valid positions first: the caption, then the image's own regions
        assert b["attn_masks"][i, :5 + m].all() and not b["attn_masks"][i, 5 + m:].any()
    # the gather index reads caption then regions from the concatenation [caption, regions]
    assert torch.equal(b["gather_index"], torch.arange(9).repeat(3, 1))


@pytest.mark.skipif(not os.environ.get("CACR_PUBLIC_UNITER"),
                    reason="set CACR_PUBLIC_UNITER to a local checkout of the public UNITER code")
def test_scores_agree_with_the_public_code():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmark import flickr_like, public_practice_scores

    from cacr.model import UniterConfig, UniterForImageTextRetrieval

    torch.manual_seed(0)
    model = UniterForImageTextRetrieval(UniterConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                     intermediate_size=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    caps, imgs = flickr_like(3, 12, torch.Generator().manual_seed(1))
    pub, _ = public_code.public_model(os.environ["CACR_PUBLIC_UNITER"], model)
    theirs = public_code.public_code_scores(pub, caps, imgs, range(3), 5, torch.device("cpu"))
    model.set_attn_impl("eager")
    ours = public_practice_scores(model, caps, imgs, range(3), 5, torch.device("cpu"))
    assert ours.std() > 1e-2
    assert (theirs - ours).abs().max() < 1e-4 * ours.abs().max()
