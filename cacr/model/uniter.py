"""UNITER (Chen et al., 2020) single-stream encoder and its image-text retrieval heads.

Parameter names and shapes are those of the official checkpoints (``uniter.*``,
``itm_output``, ``rank_output``), so their state dicts load as they are. The encoder is
BERT with post-LayerNorm layers; regions are embedded from their features and 7-d boxes
and share the token-type table with the text (type 1). See ``batch.py`` for layouts.

Attention runs through ``scaled_dot_product_attention`` (``attn_impl="sdpa"``) or an
explicit softmax (``"eager"``); both compute the same function. The regularizers need
the last layer's attention of some rows (the positive pairs): ``forward(...,
score_rows=idx)`` returns that layer's pre-softmax scores ``QK^T/sqrt(d)`` for those
rows, recomputed from the same Q and K, without touching the fused path of any row.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import UniterBatch
from .config import UniterConfig

LN_EPS = 1e-12
MASK_VALUE = -10000.0  # added to the scores of padded keys, as the official code does


class UniterTextEmbeddings(nn.Module):
    """LayerNorm(word[ids] + position[0..Lt) + token_type[0]), then dropout."""

    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class UniterImageEmbeddings(nn.Module):
    """LayerNorm(LN_img(img_linear(feat)) + LN_pos(pos_linear(box7)) + token_type[1]), then dropout."""

    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.img_linear = nn.Linear(cfg.img_dim, cfg.hidden_size)
        self.img_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.pos_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.pos_linear = nn.Linear(7, cfg.hidden_size)
        # Used only by the official pre-training (masked region modelling); kept so that
        # checkpoints round-trip with every key.
        self.mask_embedding = nn.Embedding(2, cfg.img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, img_feat: Tensor, img_pos_feat: Tensor, type_embedding: Tensor) -> Tensor:
        w = self.img_linear.weight
        feat = self.img_layer_norm(self.img_linear(img_feat.to(w.dtype)))
        pos = self.pos_layer_norm(self.pos_linear(img_pos_feat.to(w.dtype)))
        return self.dropout(self.LayerNorm(feat + pos + type_embedding))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.attn_impl = cfg.attn_impl

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def forward(self, x: Tensor, key_mask: Tensor, score_rows: Optional[Tensor] = None):
        """``key_mask`` (B, 1, 1, L) bool, True for valid keys. Returns (context, scores)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.dropout_p if self.training else 0.0
        if self.attn_impl == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, L, L)
            scores = scores + (~key_mask).to(scores.dtype) * MASK_VALUE
            probs = F.dropout(scores.softmax(dim=-1), p=p, training=self.training)
            ctx = probs @ v
        B, _, L, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        scores = None
        if score_rows is not None:
            # Pre-softmax scores of the chosen rows, in fp32, without mask or dropout.
            with torch.autocast(q.device.type, enabled=False):
                qs, ks = q[score_rows].float(), k[score_rows].float()
                scores = qs @ ks.transpose(-1, -2) / math.sqrt(self.head_dim)  # (P, h, L, L)
        return ctx, scores


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ctx: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(ctx)) + x)


class BertAttention(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x, key_mask, score_rows=None):
        ctx, scores = self.self(x, key_mask, score_rows)
        return self.output(ctx, x), scores


class BertIntermediate(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU


class BertOutput(BertSelfOutput):
    def __init__(self, cfg: UniterConfig):
        nn.Module.__init__(self)
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)


class BertLayer(nn.Module):
    """Post-LN transformer layer: a = LN(Wo ctx + x); out = LN(W2 gelu(W1 a) + a)."""

    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, key_mask, score_rows=None):
        a, scores = self.attention(x, key_mask, score_rows)
        return self.output(self.intermediate(a), a), scores


class UniterEncoder(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, key_mask, score_rows=None, score_layers=None):
        """With ``score_rows``: the pre-softmax scores of those rows in the last layer (a tensor),
        or, given ``score_layers`` (layer indices), a list with those layers' scores."""
        last = len(self.layer) - 1
        want = (last,) if score_layers is None else tuple(score_layers)
        scores = {}
        for i, layer in enumerate(self.layer):
            x, s = layer(x, key_mask, score_rows if i in want else None)
            if s is not None:
                scores[i] = s
        if score_rows is None:
            return x, None
        return x, (scores[last] if score_layers is None else [scores[i] for i in want])


class UniterPooler(nn.Module):
    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        # In the weights' precision even under autocast: a bf16 pooled state and logit would
        # round scores of magnitude ~5 to steps of 1/32, coarser than the differences
        # Winoground and the ranking are decided by (the encoder is where bf16 pays).
        with _full_precision(hidden):
            return torch.tanh(self.dense(hidden[:, 0].to(self.dense.weight.dtype)))


def _full_precision(x: Tensor):
    """Autocast off for the small head matmuls (pooler, ITM and ranking heads)."""
    return torch.autocast(x.device.type, enabled=False)


class UniterModel(nn.Module):
    """The backbone: embeddings, encoder and pooler (official prefix ``uniter.``)."""

    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = UniterTextEmbeddings(cfg)
        self.img_embeddings = UniterImageEmbeddings(cfg)
        self.encoder = UniterEncoder(cfg)
        self.pooler = UniterPooler(cfg)

    def check_batch(self, batch: UniterBatch) -> None:
        """Shape checks only (no host sync): the collate function checks the values."""
        cfg = self.config
        if batch.img_feat.shape[-1] != cfg.img_dim:
            raise ValueError(
                f"region features have width {batch.img_feat.shape[-1]}, the model expects img_dim={cfg.img_dim}"
            )
        if batch.img_pos_feat.shape[-1] != 7:
            raise ValueError(f"boxes must be 7-d in a batch, got {batch.img_pos_feat.shape[-1]}-d (use collate)")
        if batch.input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"text of {batch.input_ids.shape[1]} tokens is longer than "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )

    def embed(self, batch: UniterBatch) -> Tensor:
        txt = self.embeddings(batch.input_ids, batch.position_ids)  # (B, Lt, H)
        img = self.img_embeddings(batch.img_feat, batch.img_pos_feat,
                                  self.embeddings.token_type_embeddings.weight[1])  # (B, Lv, H)
        if img.dtype != txt.dtype:  # autocast: the image LayerNorm ran in fp32, text likewise
            img = img.to(txt.dtype)
        x = torch.cat([txt, img], dim=1)  # (B, Lt + Lv, H)
        if batch.gather_index is not None:
            x = torch.gather(x, 1, batch.gather_index[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, L, H)
        return x

    def forward(self, batch: UniterBatch, score_rows: Optional[Tensor] = None, score_layers=None):
        """Returns (last hidden states (B, L, H), pooled (B, H), last-layer scores or None; a list
        of the ``score_layers``' scores when those are given)."""
        self.check_batch(batch)
        x = self.embed(batch)
        key_mask = batch.attn_mask[:, None, None, :]  # (B, 1, 1, L)
        hidden, scores = self.encoder(x, key_mask, score_rows, score_layers)
        return hidden, self.pooler(hidden), scores


@dataclass
class UniterOutput:
    rank_logits: Tensor  # (B,) retrieval logit (rank_output)
    itm_logits: Tensor  # (B, 2) ITM logits, index 1 = match
    pooled: Tensor  # (B, H)
    last_hidden: Tensor  # (B, L, H) in the batch's layout
    last_scores: Optional[Tensor] = None  # (P, heads, L, L) last-layer QK^T/sqrt(d) of score_rows
    layer_scores: Optional[List[Tensor]] = None  # the same for each of score_layers, when given


class UniterForImageTextRetrieval(nn.Module):
    """UNITER with the ITM head (``itm_output``, H->2) and the ranking head (``rank_output``, H->1)."""

    def __init__(self, cfg: UniterConfig):
        super().__init__()
        self.config = cfg
        self.uniter = UniterModel(cfg)
        self.itm_output = nn.Linear(cfg.hidden_size, 2)
        self.rank_output = nn.Linear(cfg.hidden_size, 1)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_rank_from_itm(self) -> None:
        """Initialise ``rank_output`` from the "match" row (1) of ``itm_output``, as the official fine-tuning does."""
        self.rank_output.weight.copy_(self.itm_output.weight[1:2])
        self.rank_output.bias.copy_(self.itm_output.bias[1:2])

    def set_attn_impl(self, impl: str) -> None:
        """Switch every layer between the fused (``"sdpa"``) and explicit (``"eager"``) attention."""
        UniterConfig(attn_impl=impl)  # validates the name
        self.config.attn_impl = impl
        for layer in self.uniter.encoder.layer:
            layer.attention.self.attn_impl = impl

    def forward(self, batch: UniterBatch, score_rows: Optional[Tensor] = None, score_layers=None) -> UniterOutput:
        hidden, pooled, scores = self.uniter(batch, score_rows, score_layers)
        layered = score_layers is not None and scores is not None
        with _full_precision(pooled):  # pooled is already in the weights' precision
            rank_logits, itm_logits = self.rank_output(pooled).squeeze(-1), self.itm_output(pooled)
        return UniterOutput(
            rank_logits=rank_logits,
            itm_logits=itm_logits,
            pooled=pooled,
            last_hidden=hidden,
            last_scores=None if layered else scores,
            layer_scores=scores if layered else None,
        )

    @contextlib.contextmanager
    def low_precision_weights(self, dtype: torch.dtype = torch.bfloat16):
        """For no-grad scoring under autocast to ``dtype``: the encoder's linear weights and
        biases are held in ``dtype`` for the duration (restored after). Autocast would cast
        them on every forward (4% of a bf16 CPU forward, measured); the cast is the same
        rounding, so the scores are the same bits. The embeddings, pooler and heads, which
        run outside autocast or in full precision, keep their weights."""
        if torch.is_grad_enabled():
            raise RuntimeError("low_precision_weights is for no-grad scoring (torch.inference_mode / no_grad)")
        # The modules see copies in their parameter slots; the Parameter objects themselves
        # are untouched (their data, dtype and autograd state: DDP's gradient hooks hang on them).
        saved = []
        try:
            for m in self.uniter.encoder.modules():
                if isinstance(m, nn.Linear):
                    for name in ("weight", "bias"):
                        p = m._parameters.get(name)
                        if p is not None and p.dtype != dtype:
                            saved.append((m, name, p))
                            m._parameters[name] = p.detach().to(dtype)
            yield self
        finally:
            for m, name, p in saved:
                m._parameters[name] = p

    def scorer(self, head: str = "rank", compile: bool = False):
        """The scoring function that mining and evaluation call on batches: :meth:`score` with
        ``head``, or the same through ``torch.compile`` with dynamic shapes (compiled on first
        use, once per model and head; it fuses the elementwise work between the matmuls, and
        its ~40 s of compilation pays from a few hundred thousand pairs on)."""
        if head not in ("rank", "itm"):
            raise ValueError(f"head must be 'rank' or 'itm', got {head!r}")
        if not compile:
            return functools.partial(self.score, head=head)
        cache = self.__dict__.setdefault("_compiled_scorers", {})
        if head not in cache:
            cache[head] = torch.compile(functools.partial(self.score, head=head), dynamic=True)
        return cache[head]

    def score(self, batch: UniterBatch, head: str = "rank") -> Tensor:
        """One score per pair: the retrieval logit (``head="rank"``), or for a zero-shot
        UNITER the ITM match logit minus the no-match logit (``head="itm"``)."""
        hidden, pooled, _ = self.uniter(batch)
        with _full_precision(pooled):  # see UniterPooler: scores keep the weights' precision
            if head == "rank":
                return self.rank_output(pooled).squeeze(-1)
            if head == "itm":
                logits = self.itm_output(pooled)
                return logits[:, 1] - logits[:, 0]
        raise ValueError(f"head must be 'rank' or 'itm', got {head!r}")
