"""Per-item crop regions for ARO's VG sets (cacr/data/crops.py): boxes cut and re-normalised
by hand on the fixture's items, per-item .npz features, the evaluator reading regions by
item key, and one-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from cacr.data.crops import crop_regions, main, read_image_sizes, write_crops
from cacr.data.formats import RegionsFile, RegionsWriter
from cacr.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer
from cacr.evaluation.multiple_choice import MultipleChoiceData, read_set

VGR = Path(__file__).parent / "fixtures" / "multiple_choice" / "aro" / "visual_genome_relation.json"
IMAGES = {"2315375": (500, 400), "2360341": (500, 375), "2407890": (300, 300)}
# normalised x1 y1 x2 y2 of three regions per image
BOXES = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.02, 0.05, 0.1, 0.15]])


@pytest.fixture()
def full(tmp_path):
    rng = np.random.default_rng(0)
    with RegionsWriter(tmp_path / "full.h5", feature_dim=4, feature_source="test", with_conf=True) as w:
        for iid in IMAGES:
            w.add(iid, rng.standard_normal((3, 4)).astype(np.float16), BOXES, conf=np.array([0.9, 0.5, 0.2]))
    sizes = tmp_path / "image_data.json"  # Visual Genome's layout
    sizes.write_text(json.dumps([{"image_id": int(k), "width": w, "height": h, "url": ""}
                                 for k, (w, h) in IMAGES.items()]))
    return tmp_path / "full.h5", sizes


def test_crop_boxes_by_hand():
    # item 0 of the fixture: image 500 x 400, box x 10..310, y 20..220 -> [0.02, 0.05, 0.62, 0.55]
    keep, nb = crop_regions(np.concatenate([BOXES, BOXES[:, 2:] - BOXES[:, :2]], 1), (10, 20, 300, 200), (500, 400))
    # region 0: 0.48 x 0.45 of its 0.5 x 0.5 inside (86%); region 1: 0.12 x 0.05 (2%); region 2: all of it
    assert keep.tolist() == [0, 2]
    np.testing.assert_allclose(nb[0], [0, 0, 0.48 / 0.6, 0.45 / 0.5, 0.8, 0.9], atol=1e-6)
    np.testing.assert_allclose(nb[1], [0, 0, 0.08 / 0.6, 0.1 / 0.5, 0.08 / 0.6, 0.2], atol=1e-6)
    keep, _ = crop_regions(BOXES, (10, 20, 300, 200), (500, 400), min_inside=0.9)
    assert keep.tolist() == [2]


def test_crops_file_keyed_by_item_and_read_by_the_evaluator(full, tmp_path):
    regions, sizes = full
    out = write_crops(VGR, tmp_path / "crops.h5", regions=regions, image_sizes=sizes, progress=False)
    rf = RegionsFile(out)
    assert rf.image_ids == [f"visual_genome_relation/{i}" for i in range(5)]
    src = RegionsFile(regions)
    f0, b0, c0 = rf.get(0)
    ff, _, _ = src.get(src.index("2315375"))
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(ff)[[0, 2]])  # features kept, not recomputed
    np.testing.assert_allclose(np.asarray(c0), [0.9, 0.2])
    np.testing.assert_allclose(np.asarray(b0)[1, :4], [0, 0, 0.08 / 0.6, 0.2], atol=1e-6)
    # item 2 (same image, box 5..105 x 5..85): only region 2 is half inside
    assert rf.counts[2] == 1

    s = read_set("vgr", str(VGR))
    words = sorted({w for it in s.items for c in it.captions for w in c.split()})
    tok = WordPieceTokenizer(list(SPECIAL_TOKENS) + words)
    data = MultipleChoiceData(s, out, tok, region_key="item")
    assert data.image_rows == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError) as e:
        MultipleChoiceData(s, regions, tok, region_key="item")  # a full-image file, read by item
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{regions}: no regions for 5 of 5 items of set 'vgr': "
                                              f"visual_genome_relation/0 (region id 'visual_genome_relation/0')")
    assert "python -m cacr.data.crops" in msg


def test_per_item_npz_features(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    for n in range(5):
        np.savez(folder / f"{n}.npz", features=np.full((2, 4), n, np.float32),
                 norm_bb=np.array([[0, 0, 1, 1], [0.2, 0.2, 0.6, 0.8]], np.float32))
    out = write_crops(VGR, tmp_path / "crops.h5", npz_dir=folder, progress=False)
    rf = RegionsFile(out)
    assert rf.image_ids[3] == "visual_genome_relation/3" and float(np.asarray(rf.get(3)[0])[0, 0]) == 3.0
    (folder / "4.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"visual_genome_relation.json: item 4 \(image '2360341'\): .*4.npz "
                                                r"not found \(one <index>.npz per item"):
        write_crops(VGR, tmp_path / "crops2.h5", npz_dir=folder, progress=False)


def test_bad_input_one_line(full, tmp_path, capsys):
    regions, sizes = full
    sizes.write_text(json.dumps({"2315375": [500, 400], "2360341": [500, 375]}))  # {id: [w, h]}, one missing
    assert read_image_sizes(sizes)["2360341"] == (500.0, 375.0)
    assert main([str(VGR), str(tmp_path / "c.h5"), "--regions", str(regions), "--image-sizes", str(sizes)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err == f"error: {VGR}: item 3 (image '2407890'): no width and height in the image sizes file"
    assert not (tmp_path / "c.h5").exists() and not list(tmp_path.glob("c.h5.tmp*"))
    sizes.write_text(json.dumps([{"image_id": 1, "width": 0, "height": 5}]))
    with pytest.raises(ValueError, match=r"image_data.json: item 0: 'width' and 'height' must be positive"):
        read_image_sizes(sizes)
    assert main([str(VGR), str(tmp_path / "c.h5"), "--regions", str(regions)]) == 1
    assert "--regions needs --image-sizes" in capsys.readouterr().err
    sugar = VGR.parent.parent / "sugarcrepe" / "swap_att.json"
    (tmp_path / "npz").mkdir()
    assert main([str(sugar), str(tmp_path / "c.h5"), "--npz-dir", str(tmp_path / "npz")]) == 1
    assert "a sugarcrepe file; crops are for ARO's VG-Relation / VG-Attribution items" in capsys.readouterr().err
