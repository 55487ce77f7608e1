"""UNITER's masked-language-modelling head, for pre-training on the synthetic world.

The official pre-training checkpoints keep it under ``cls.predictions`` (BERT's
``transform`` = dense + GELU + LayerNorm, then a decoder whose weight is the word-embedding
matrix, plus an output bias); the retrieval model does not carry it, and
:func:`cacr.model.load_checkpoint` skips ``cls.`` keys when a pre-trained checkpoint is
fine-tuned.
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
