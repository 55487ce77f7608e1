"""Attention analyses of the paper (Figures 2, 4, 5 and Section 5.2) on any checkpoint.

- ``attention``: the last layer's relation blocks ``S_LL, S_LV, S_VL, S_VV`` of one pair
  and CACR's projections; command line for one Winoground-format example or any caption
  and image (``python -m cacr.analysis.attention``).
- ``pictures``: PNG figures (words-to-regions heatmaps, attended boxes on the image, S_LL
  beside S_LV S_VV S_LV^T) and wandb images.
- ``entropy``: Shannon entropy of the cross-modal argmax indices against Winoground
  correctness (``python -m cacr.analysis.entropy``).
- ``inputs``: models, Winoground-format sets, regions and background pictures from the
  same configuration as ``eval_winoground.py``.
"""
