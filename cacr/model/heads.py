"""UNITER's pre-training heads, for pre-training on the synthetic world.

Masked language modelling: the official pre-training checkpoints keep it under
``cls.predictions`` (BERT's ``transform`` = dense + GELU + LayerNorm, then a decoder whose
weight is the word-embedding matrix, plus an output bias). Masked region feature regression
(MRFR): ``feat_regress`` (dense + GELU + LayerNorm, then a linear map back to the region
feature width whose weight is the transposed ``img_linear`` weight of the image embedding,
plus a bias). The retrieval model carries neither, and :func:`cacr.model.load_checkpoint`
skips these keys when a pre-trained checkpoint is fine-tuned.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import UniterConfig

LN_EPS = 1e-12


class MlmTransform(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MlmPredictions(nn.Module):
    """Vocabulary logits of hidden states; the decoder is tied to ``word_embeddings``."""

    def __init__(self, cfg: UniterConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = MlmTransform(cfg)
        self.bias = nn.Parameter(word_embeddings.weight.new_zeros(cfg.vocab_size))
        self._embeddings = [word_embeddings]  # a list: not registered twice as a submodule

    def forward(self, hidden: Tensor) -> Tensor:  # (N, H) -> (N, vocab)
        return F.linear(self.transform(hidden), self._embeddings[0].weight, self.bias)


class MlmHead(nn.Module):
    """``cls.predictions`` of the official pre-training model."""

    def __init__(self, cfg: UniterConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MlmPredictions(cfg, word_embeddings)
        nn.init.normal_(self.predictions.transform.dense.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.predictions.transform.dense.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.predictions(hidden)


class RegionFeatureRegression(nn.Module):
    """``feat_regress`` of the official pre-training model: hidden states of masked regions ->
    their input features; the output map is tied to ``img_linear`` (H x img_dim, transposed)."""

    def __init__(self, cfg: UniterConfig, img_linear: nn.Linear):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                                 nn.LayerNorm(cfg.hidden_size, eps=LN_EPS))
        self.bias = nn.Parameter(img_linear.weight.new_zeros(cfg.img_dim))
        self._img_linear = [img_linear]  # a list: not registered twice as a submodule
        nn.init.normal_(self.net[0].weight, std=cfg.initializer_range)
        nn.init.zeros_(self.net[0].bias)

    def forward(self, hidden: Tensor) -> Tensor:  # (N, H) -> (N, img_dim)
        return F.linear(self.net(hidden), self._img_linear[0].weight.t(), self.bias)
