"""The LightningModule: UNITER image-text retrieval fine-tuning with hard negatives (docs/reference.md §2)
plus one relation-alignment regularizer (CACR, IAIS or none; docs/reference.md §3.4).

A training batch holds ``B`` positive pairs and, for each, ``K`` candidate negative images
(for its caption) and ``K`` candidate negative captions (for its image), none a true match.
With mining on, every candidate pair is scored without gradient in eval mode and the ``k``
highest-scoring negatives of each direction are kept (official: 31 of 399); otherwise the
first ``k`` candidates (already random) are used, as in every step before ``mining_start``
(a curriculum; official: mining from step 0). The model is then trained on
``B + 2Bk`` pairs: the positives once, each against its ``k`` hard images ("t" groups) and
``k`` hard captions ("i" groups), with the hinge ranking loss on sigmoid scores

    L_rank = mean(clamp(margin + s_neg - s_pos, min=0)),

and the regularizer on the positives' last-layer relation blocks only:

    L = L_rank + lambda * w(t) * L_reg,   w(t) from the global step, so a resumed run continues.

``ranking="softmax"`` replaces the hinge by the cross-entropy of the positive in its group
(trains a model from scratch, where the sigmoid hinge saturates). ``align_weight > 0`` adds
an align-before-fuse term (in the spirit of ALBEF's contrastive loss before fusion, here
token-level): an in-batch InfoNCE on ``mean over a caption's words of the best cosine
similarity with a region of the image``, on the embedding layer's outputs, which gets a
from-scratch model off the plateau where its score ignores the pair. Both are off in the
paper settings. The losses themselves are tensor functions in :mod:`cacr.losses`.

UNITER's pre-training objectives, for pre-training on the synthetic world (all off by
default and in the paper settings): masked language modelling on the positives
(``mlm_weight``, head ``cls``), masked region feature regression (``mrfr_weight``, head
``feat_regress``: zeroed regions' features regressed from their last-layer states) and
word-region alignment by optimal transport on all trained pairs (``wra_weight``,
:mod:`cacr.ot`). The heads are trained with the model.

What the module trains and evaluates on is given to it by :meth:`RetrievalModule.attach`
(``cacr.train`` passes the data module's training pairs, validation and test splits,
Winoground-format set and tokenizer); it never reads the trainer's data module.

Everything in the step is batched over positives; no host synchronisation is needed.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from cacr.evaluation.evaluators import evaluate_retrieval, evaluate_winoground
from cacr.losses import alignment_loss, ranking_loss, softmax_ranking_loss
from cacr.model import MlmHead, PairStore, UniterBatch, UniterForImageTextRetrieval
from cacr.model.heads import RegionFeatureRegression
from cacr.ot import wra_loss
from cacr.regularizers import Regularizer


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warmup to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class RetrievalModule(pl.LightningModule):
    def __init__(
        self,
        model: Optional[UniterForImageTextRetrieval] = None,
        regularizer: Union[Regularizer, Mapping[str, Any], None] = None,
        *,
        lr: float = 5e-5,
        betas=(0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        warmup_steps: int = 500,
        margin: float = 0.2,
        ranking: str = "hinge",
        num_negatives: int = 31,
        mining: bool = True,
        mining_start: int = 0,
        mining_batch_size: Union[int, str] = 1024,
        eval_batch_size: Union[int, str] = 1024,
        eval_bf16: Union[bool, str] = False,
        seed: int = 42,
        score_head: str = "rank",
        compile_scoring: bool = False,
        train_chunk_size: Union[int, str] = 0,
        align_weight: float = 0.0,
        align_temperature: float = 0.1,
        mlm_weight: float = 0.0,
        mlm_prob: float = 0.15,
        mlm_focus: Sequence[str] = (),
        mrfr_weight: float = 0.0,
        mrfr_prob: float = 0.15,
        wra_weight: float = 0.0,
        val_winoground: bool = False,
        pressure_every: int = 0,
        model_config: Optional[Mapping[str, Any]] = None,
    ):
        """``model`` and ``regularizer`` as ``cacr.train`` builds them; without them (as in
        ``RetrievalModule.load_from_checkpoint(run.ckpt)``, which passes the checkpoint's
        hyper-parameters) the model is built from ``model_config`` (its weights then come
        from the checkpoint's state dict) and the regularizer from its recorded fields (a
        mapping: ``hparams['regularizer']``; none given: no regularizer)."""
        super().__init__()
        model, regularizer = self._rebuild(model, regularizer, model_config)
        if not (isinstance(pressure_every, int) and not isinstance(pressure_every, bool) and pressure_every >= 0):
            raise ValueError(f"module.pressure_every must be a number of steps >= 0 (0: off), got {pressure_every!r}")
        if ranking not in ("hinge", "softmax"):
            raise ValueError(f"module.ranking must be 'hinge' (official) or 'softmax', got {ranking!r}")
        for name, v, lo in (("eval_batch_size", eval_batch_size, 1), ("mining_batch_size", mining_batch_size, 1),
                            ("train_chunk_size", train_chunk_size, 0)):  # 0: the trained pairs in one batch
            if not (v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)):
                raise ValueError(f"module.{name} must be a number of pairs >= {lo} or auto, got {v!r}")
        self.model = model
        self.regularizer = regularizer
        self.save_hyperparameters(ignore=["model", "regularizer"], logger=False)
        # Enough to rebuild the model and name the regularizer from a .ckpt alone.
        self.hparams["model_config"] = model.config.to_dict()
        self.hparams["regularizer"] = dict(vars(regularizer))
        for name, p in (("mlm_prob", mlm_prob), ("mrfr_prob", mrfr_prob)):
            if not 0.0 < p <= 1.0:
                raise ValueError(f"module.{name} must be in (0, 1], got {p}")
        # UNITER's masked-language-modelling head (official name cls.predictions), only when used;
        # a checkpoint of this module fine-tunes without it (load_checkpoint skips cls.* keys).
        self.cls = MlmHead(model.config, model.uniter.embeddings.word_embeddings) if mlm_weight > 0 else None
        # Masked region feature regression (official name feat_regress), likewise only when used.
        self.feat_regress = (RegionFeatureRegression(model.config, model.uniter.img_embeddings.img_linear)
                             if mrfr_weight > 0 else None)
        self.stores: Dict[str, PairStore] = {}  # on the module's device, by split
        self._attached_stores: Dict[str, PairStore] = {}  # given by attach, moved on first use
        self.val_split = self.test_split = self.winoground = self.tokenizer = None
        self._mask_token_id: Optional[int] = None
        self._focus_ids: Optional[Tensor] = None
        self._t0: Optional[float] = None

    @staticmethod
    def _rebuild(model, regularizer, model_config):
        """The model and regularizer of :meth:`__init__`, built from their records when not given."""
        if model is None:
            if not isinstance(model_config, Mapping):
                raise ValueError("RetrievalModule: give model=, or model_config= (the model_config of a run's "
                                 ".ckpt hyper_parameters, which load_from_checkpoint passes)")
            from cacr.model import UniterConfig, build_uniter

            model = build_uniter(UniterConfig.from_dict(dict(model_config), where="model_config"))
        if regularizer is None:
            regularizer = Regularizer(name="none")
        elif isinstance(regularizer, Mapping):
            fields = {f.name for f in dataclasses.fields(Regularizer)}
            unknown = sorted(set(regularizer) - fields)
            if unknown:
                raise ValueError(f"RetrievalModule: regularizer record has unknown field(s) {unknown} "
                                 f"(expected some of {sorted(fields)})")
            regularizer = Regularizer(**regularizer)
        return model, regularizer

    # ------------------------------------------------------------------ what it trains and evaluates on
    def attach(self, *, train_store: Optional[PairStore] = None, val_split=None, test_split=None,
               winoground=None, tokenizer=None) -> "RetrievalModule":
        """Give the module its data (``cacr.train`` does, from the data module's public
        attributes): ``train_store`` every training caption and image as a
        :class:`cacr.model.PairStore` (on the CPU; moved to the module's device on first use),
        ``val_split`` the (capped) validation split scored at every validation, ``test_split``
        the split of the final test, ``winoground`` the Winoground-format set (its ``dev`` half
        at validation with ``val_winoground``, all of it at the end), ``tokenizer`` the data's
        tokenizer (its ``[MASK]`` id and the ids of ``mlm_focus``, for MLM). Returns the module."""
        if train_store is not None:
            self.stores.pop("train", None)
            self._attached_stores["train"] = train_store
        self.val_split, self.test_split = val_split, test_split
        self.winoground, self.tokenizer = winoground, tokenizer
        return self

    def store(self, split: str) -> PairStore:
        """The pairs of ``split`` on the module's device."""
        if split not in self.stores:
            if split not in self._attached_stores:
                raise ValueError(f"RetrievalModule: no {split} pairs; give them with "
                                 f"attach({split}_store=...) before fitting (cacr.train does)")
            self.stores[split] = self._attached_stores.pop(split).to(self.device)
        return self.stores[split]

    @property
    def total_steps(self) -> int:
        steps = self.trainer.max_steps
        if steps is None or steps < 0:
            raise ValueError("trainer.max_steps must be set: the LR and regularizer schedules are defined by it")
        return steps

    # ------------------------------------------------------------------ training
    @staticmethod
    def mining_pairs(batch: Dict[str, Any]):
        """The ``2BK`` candidate pairs of a batch: ``caps``, ``imgs`` (2BK,), "t" direction first."""
        cap, img, neg_img, neg_cap = batch["cap_idx"], batch["img_idx"], batch["neg_img"], batch["neg_cap"]
        K = neg_img.shape[1]
        return (torch.cat([cap.repeat_interleave(K), neg_cap.flatten()]),
                torch.cat([neg_img.flatten(), img.repeat_interleave(K)]))

    def prepare_batch(self, batch: Dict[str, Any], store: PairStore) -> Dict[str, Any]:
        """Host-side work on a training batch while its indices are still on the CPU
        (Lightning calls this before moving the batch): the width bounds become Python ints,
        and with mining the candidate pairs are sorted by length and cut into mining batches
        with exact widths, so that mining pads each batch to its own longest pair rather than
        to the data's. The step on the device then never synchronises with the host."""
        batch = dict(batch)
        batch["max_txt_len"], batch["max_regions"] = int(batch["max_txt_len"]), int(batch["max_regions"])
        if self.mines(batch["neg_img"].shape[1], int(batch.get("step", self.hparams.mining_start))):
            caps, imgs = self.mining_pairs(batch)
            batch["mine_order"], batch["mine_chunks"] = store.length_plan(caps, imgs, self.mining_batch_size)
        return batch

    def mines(self, num_candidates: int, step: int) -> bool:
        """Whether the step keeps the hardest candidates (else the first ``num_negatives``, random ones)."""
        return self.hparams.mining and num_candidates > self.hparams.num_negatives and step >= self.hparams.mining_start

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "neg_img" in batch:
            batch = self.prepare_batch(batch, self.store("train"))  # the plan reads the lengths kept on the host
        return batch

    @torch.no_grad()
    def mine(self, store: PairStore, batch: Dict[str, Any], k: int, bounds: Dict[str, int]):
        """The ``k`` highest-scoring candidates of each direction, scored in eval mode, in the
        batch's mining plan if it has one (:meth:`prepare_batch`), else in fixed-size
        batches padded to ``bounds``."""
        neg_img, neg_cap = batch["neg_img"], batch["neg_cap"]
        B, K = neg_img.shape
        caps, imgs = self.mining_pairs(batch)  # (2BK,)
        was_training = self.model.training
        self.model.eval()
        if "mine_chunks" in batch:
            order = batch["mine_order"].to(caps.device, non_blocking=True)
            caps, imgs = caps[order], imgs[order]
            chunks = batch["mine_chunks"]
        else:
            n = self.mining_batch_size
            lj = bounds["max_txt_len"] + bounds["max_regions"]
            chunks = [(s, min(s + n, caps.numel()), bounds["max_txt_len"], bounds["max_regions"], lj)
                      for s in range(0, caps.numel(), n)]
        score = self.model.scorer(compile=self.hparams.compile_scoring)
        scores = torch.cat([score(store.batch(caps[s:e], imgs[s:e], max_txt_len=lt, max_regions=lv, max_len=lj))
                            for s, e, lt, lv, lj in chunks]).float()
        if "mine_chunks" in batch:
            scores = torch.empty_like(scores).index_copy_(0, order, scores)  # back to the batch's order
        self.model.train(was_training)
        top = scores.view(2, B, K).topk(k, dim=-1).indices  # (2, B, k)
        return neg_img.gather(1, top[0]), neg_cap.gather(1, top[1])

    def compute_losses(self, batch: Dict[str, Any], step: int, total_steps: int) -> Dict[str, Tensor]:
        """The training losses of one batch (see the module docstring); no logging, no trainer needed."""
        store = self.store("train")
        cap, img, neg_img, neg_cap = batch["cap_idx"], batch["img_idx"], batch["neg_img"], batch["neg_cap"]
        bounds = {"max_txt_len": int(batch["max_txt_len"]), "max_regions": int(batch["max_regions"])}
        B, K = neg_img.shape
        k = min(self.hparams.num_negatives, K)
        mined = self.mines(K, step)
        if mined:
            hard_img, hard_cap = self.mine(store, batch, k, bounds)
        else:
            hard_img, hard_cap = neg_img[:, :k], neg_cap[:, :k]

        caps = torch.cat([cap, cap.repeat_interleave(k), hard_cap.flatten()])  # (B + 2Bk,)
        imgs = torch.cat([img, hard_img.flatten(), img.repeat_interleave(k)])
        swap = None
        swap_rows = batch.get("swap_rows")  # only in batches of a sampler with data.p_swap > 0
        if swap_rows is not None:
            if mined:
                raise ValueError("data.p_swap: box-swapped image candidates cannot be mined "
                                 "(module.mining=true); use one or the other")
            swap = torch.full((len(caps), 2), -1, dtype=torch.long, device=swap_rows.device)
            swap[B + torch.arange(B, device=swap.device) * k] = swap_rows  # each caption's first image negative
        reg = self.regularizer
        layers = reg.layer_indices(self.model.config.num_hidden_layers) if reg.enabled else None
        score_layers = None if reg.layers == "last" else layers
        chunk = self.train_chunk_size
        if chunk and 2 * B * k > chunk:
            logits, out, pairs = self._chunked_forward(store, caps, imgs, swap, B, chunk, reg.enabled, score_layers)
        else:
            pairs = store.batch(caps, imgs, **bounds, swap=swap)
            out = self.model(pairs, score_rows=torch.arange(B, device=caps.device) if reg.enabled else None,
                             score_layers=score_layers)
            logits = out.rank_logits
        neg = logits[B:].view(2, B, k).transpose(0, 1)  # (B, 2, k): "t" and "i" groups
        if self.hparams.ranking == "hinge":
            rank = ranking_loss(logits[:B], neg, self.hparams.margin)
        else:
            rank = softmax_ranking_loss(logits[:B], neg)
        w = reg.weight_at(step, total_steps)
        losses = {"rank_loss": rank, "reg_weight": torch.tensor(w), "loss": rank}
        if reg.enabled:
            per_layer = [reg(*reg.blocks(scores, pairs.word_index[:B], pairs.word_mask[:B],
                                         pairs.region_index[:B], pairs.region_mask[:B]))
                         for scores in (out.layer_scores or [out.last_scores])]
            parts = type(per_layer[0])(*(torch.stack(x).mean() for x in zip(*per_layer)))  # mean over layers
            losses.update(loss=rank + w * parts.loss, reg_loss=parts.loss, reg_loss_L=parts.loss_L,
                          reg_loss_V=parts.loss_V)
        if self.hparams.wra_weight > 0:
            wra = self.word_region_ot(out.last_hidden, pairs, B)
            losses.update(loss=losses["loss"] + self.hparams.wra_weight * wra, wra_loss=wra)
        if self.hparams.align_weight > 0 or self.cls is not None or self.feat_regress is not None:
            pos = store.batch(cap, img, **bounds)
        if self.hparams.align_weight > 0:
            align = self.alignment(pos, img)
            losses.update(loss=losses["loss"] + self.hparams.align_weight * align, align_loss=align)
        if self.cls is not None:
            mlm, mlm_acc = self.masked_lm(pos)
            losses.update(loss=losses["loss"] + self.hparams.mlm_weight * mlm, mlm_loss=mlm, mlm_acc=mlm_acc)
        if self.feat_regress is not None:
            mrfr = self.masked_region_regression(pos)
            losses.update(loss=losses["loss"] + self.hparams.mrfr_weight * mrfr, mrfr_loss=mrfr)
        n_mined = 2 * B * K if mined else 0
        losses["pairs"] = torch.tensor(float(B + 2 * B * k + n_mined))
        return losses

    @property
    def train_chunk_size(self) -> int:
        """Trained negatives per forward, after sorting them by joint width (0: all the trained
        pairs in one batch padded to the step's widths). ``module.train_chunk_size``: a number,
        or auto = 4 on a CPU for UNITER-base/large widths (hidden >= 512), where padding is
        most of the cost, else 0 (:meth:`_chunked_forward`)."""
        return self._train_chunk()[0]

    def _train_chunk(self) -> Tuple[int, str]:
        """``(module.train_chunk_size resolved, why)``."""
        setting = self.hparams.get("train_chunk_size", 0)
        if setting and self.hparams.wra_weight > 0:
            return 0, f"module.train_chunk_size={setting} unused: module.wra_weight > 0 needs every pair at one width"
        if setting == "auto":
            if self.device.type == "cpu" and self.model.config.hidden_size >= 512:
                return 4, "auto: a CPU and hidden >= 512"
            return 0, f"auto: {'hidden < 512' if self.device.type == 'cpu' else self.device.type + ', not a CPU'}"
        return int(setting), "set explicitly"

    def _chunked_forward(self, store: PairStore, caps: Tensor, imgs: Tensor, swap: Optional[Tensor], B: int,
                         chunk: int, score: bool, score_layers):
        """The training forward of the ``B + 2Bk`` pairs ``(caps, imgs)`` with little padding:
        the ``B`` positives in one batch of their own widths (with the regularizer's score
        rows), the negatives sorted by joint length and cut into batches of ``chunk``, each
        padded to its own longest pair. Returns the rank logits in the pairs' order, the
        positives' output and the positives' batch. The same function as one padded batch
        (padding changes no output), at the cost of reading the negatives' lengths on the
        host: free on a CPU, a synchronisation on a GPU."""
        pos_pairs = store.batch(caps[:B], imgs[:B])
        out = self.model(pos_pairs, score_rows=torch.arange(B, device=caps.device) if score else None,
                         score_layers=score_layers)
        order, chunks = store.length_plan(caps[B:], imgs[B:], chunk)
        order = order.to(caps.device)
        n_caps, n_imgs = caps[B:][order], imgs[B:][order]
        n_swap = swap[B:][order] if swap is not None else None
        parts = [self.model(store.batch(n_caps[s:e], n_imgs[s:e], max_txt_len=lt, max_regions=lv, max_len=lj,
                                        swap=n_swap[s:e] if n_swap is not None else None)).rank_logits
                 for s, e, lt, lv, lj in chunks]
        neg = torch.cat(parts)[torch.argsort(order)]  # back to the pairs' order
        return torch.cat([out.rank_logits, neg]), out, pos_pairs

    def mask_words(self, pos: UniterBatch):
        """UNITER's MLM corruption of a batch of positives: each word piece is chosen with
        probability ``mlm_prob``, and always if it is one of ``mlm_focus`` (at least one per
        caption; never [CLS], [SEP] or padding), and
        replaced by ``[MASK]`` (80%), a random word piece (10%) or kept (10%). Returns the
        corrupted batch and ``chosen`` (B, n) over the batch's word slots."""
        ids = pos.input_ids  # (B, Lt) text tokens with [CLS] first
        n = pos.word_mask.shape[1]
        words, wm = ids[:, 1:1 + n], pos.word_mask  # (B, n) word pieces
        u = torch.rand(wm.shape, device=ids.device)
        chosen = (u < self.hparams.mlm_prob) & wm
        if self.hparams.mlm_focus:  # these word pieces are always masked
            chosen |= torch.isin(words, self.focus_token_ids.to(words.device)) & wm
        first = u.masked_fill(~wm, 2.0).argmin(1)  # at least one per caption: the smallest draw
        chosen[torch.arange(len(ids), device=ids.device), first] = True
        how = torch.rand(wm.shape, device=ids.device)
        random_ids = torch.randint(self.num_special_tokens, self.model.config.vocab_size, wm.shape, device=ids.device)
        new = torch.where(chosen & (how < 0.8), torch.full_like(words, self.mask_token_id), words)
        new = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, new)
        return dataclasses.replace(pos, input_ids=torch.cat([ids[:, :1], new, ids[:, 1 + n:]], dim=1)), chosen

    def masked_lm(self, pos: UniterBatch):
        """MLM on the positives (:meth:`mask_words`): cross-entropy of the original word pieces
        at the chosen positions, conditioned on the whole image. Returns (loss, accuracy)."""
        masked, chosen = self.mask_words(pos)
        hidden, _, _ = self.model.uniter(masked)  # (B, L, H)
        H = hidden.shape[-1]
        at = hidden.gather(1, pos.word_index[:, :, None].expand(-1, -1, H))[chosen]  # (M, H)
        logits = self.cls(at).float()  # (M, vocab)
        target = pos.input_ids[:, 1:1 + chosen.shape[1]][chosen]
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss, (logits.argmax(-1) == target).float().mean().detach()

    def word_region_ot(self, hidden: Tensor, pairs: UniterBatch, num_positives: int) -> Tensor:
        """UNITER's WRA on the trained pairs (:mod:`cacr.ot`): the optimal-transport distance
        between a pair's last-layer word and region states, pulled down for the first
        ``num_positives`` pairs (the positives) and pushed up for the negatives."""
        H = hidden.shape[-1]
        words = hidden.gather(1, pairs.word_index[:, :, None].expand(-1, -1, H))  # (P, n, H)
        regions = hidden.gather(1, pairs.region_index[:, :, None].expand(-1, -1, H))  # (P, m, H)
        positive = torch.arange(len(hidden), device=hidden.device) < num_positives
        return wra_loss(words, regions, pairs.word_mask, pairs.region_mask, positive)

    def mask_regions(self, pos: UniterBatch):
        """UNITER's region masking for MRFR: each region is chosen with probability ``mrfr_prob``
        (at least one per image) and its features set to zero. Returns the corrupted batch and
        ``chosen`` (B, m)."""
        rm = pos.region_mask
        u = torch.rand(rm.shape, device=rm.device)
        chosen = (u < self.hparams.mrfr_prob) & rm
        first = u.masked_fill(~rm, 2.0).argmin(1)
        chosen[torch.arange(len(rm), device=rm.device), first] = True
        feat = pos.img_feat.masked_fill(chosen[:, :, None], 0.0)
        return dataclasses.replace(pos, img_feat=feat), chosen

    def masked_region_regression(self, pos: UniterBatch) -> Tensor:
        """MRFR on the positives (:meth:`mask_regions`): mean squared error between the
        ``feat_regress`` prediction at each masked region's last-layer state and its input
        features (averaged over feature dimensions and masked regions)."""
        masked, chosen = self.mask_regions(pos)
        hidden, _, _ = self.model.uniter(masked)  # (B, L, H)
        H = hidden.shape[-1]
        at = hidden.gather(1, pos.region_index[:, :, None].expand(-1, -1, H))[chosen]  # (M, H)
        pred = self.feat_regress(at).float()  # (M, img_dim)
        return torch.nn.functional.mse_loss(pred, pos.img_feat[chosen].float())

    def _attached_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("RetrievalModule: MLM needs the data's tokenizer; give it with attach(tokenizer=...)")
        return self.tokenizer

    @property
    def focus_token_ids(self) -> Tensor:
        """The ids of ``mlm_focus`` in the data's vocabulary (read on first use)."""
        if self._focus_ids is None:
            vocab = self._attached_tokenizer().token_to_id
            missing = [w for w in self.hparams.mlm_focus if w not in vocab]
            if missing:
                raise ValueError(f"module.mlm_focus: {missing} are not word pieces of the data's vocabulary")
            self._focus_ids = torch.tensor([vocab[w] for w in self.hparams.mlm_focus], dtype=torch.long)
        return self._focus_ids

    @property
    def mask_token_id(self) -> int:
        """The data's ``[MASK]`` id (read from its tokenizer on first use)."""
        if self._mask_token_id is None:
            self._mask_token_id = int(self._attached_tokenizer().mask_id)
        return self._mask_token_id

    @property
    def num_special_tokens(self) -> int:
        """Word pieces before this id are specials ([PAD], [UNK], [CLS], [SEP], [MASK] in the
        synthetic vocabulary; BERT's first 999 are specials and unused)."""
        return 5 if self.model.config.vocab_size < 1000 else 999

    def alignment(self, pos: UniterBatch, img: Tensor) -> Tensor:
        """The align-before-fuse loss of the positives ``pos`` (images ``img``) on the embedding
        layer's outputs, against every positive of the global batch: under DDP the words and
        regions of all processes are gathered (with gradient), so the loss, and the run, do not
        depend on how many processes share the batch. Another caption of the same image is not
        used as a negative."""
        x = self.model.uniter.embed(pos)  # (B, L, H)
        H = x.shape[-1]
        words = x.gather(1, pos.word_index[:, :, None].expand(-1, -1, H))  # (B, n, H)
        regions = x.gather(1, pos.region_index[:, :, None].expand(-1, -1, H))  # (B, m, H)
        return alignment_loss(words, pos.word_mask, regions, pos.region_mask, img, self.hparams.align_temperature,
                              gather_widths=self.gather_widths())

    def gather_widths(self):
        """``(words, regions)``: the widths every process pads its positives to for the
        alignment loss's DDP gather, known to all without a synchronisation (the training
        store's caption width less [CLS]/[SEP], and its most regions)."""
        store = self.store("train")
        return store.input_ids.shape[1] - 2, int(store.num_bbs_cpu.max())

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        step = self.global_step
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run repeats them.
        torch.manual_seed(self.hparams.seed * 1_000_003 + step * self.trainer.world_size + self.global_rank)
        losses = self.compute_losses(batch, step, self.total_steps)
        B = batch["cap_idx"].shape[0]
        log = {f"train/{k}": v for k, v in losses.items() if k != "pairs"}
        every = self.hparams.get("pressure_every", 0)
        if every and (step + 1) % every == 0 and "reg_loss" in losses:  # on Lightning's logging steps
            log.update(self.pressure(losses))
        log["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        now = time.perf_counter()
        if self._t0 is not None:
            log["train/positives_per_s"] = B / (now - self._t0)
            log["train/pairs_per_s"] = float(losses["pairs"]) / (now - self._t0)
        self._t0 = now
        self.log_dict(log, batch_size=B)
        self.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=B)
        return losses["loss"]

    def pressure(self, losses: Dict[str, Tensor]) -> Dict[str, float]:
        """The regularizer's pull against the ranking loss's, as gradient norms on the model
        parameters both reach: ``train/pressure`` = ||w lambda grad L_reg|| / ||grad L_rank||
        (w the schedule's factor at this step), with the two norms. Two extra backward
        passes through this step's graph, which is kept for the training step's own."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        w = float(losses["reg_weight"])
        g_rank = torch.autograd.grad(losses["rank_loss"], params, retain_graph=True, allow_unused=True)
        g_reg = torch.autograd.grad(losses["reg_loss"], params, retain_graph=True, allow_unused=True)
        both = [(a, b) for a, b in zip(g_rank, g_reg) if a is not None and b is not None]
        if not both:
            return {}
        n_rank = torch.sqrt(sum((a.double() ** 2).sum() for a, _ in both))
        n_reg = w * torch.sqrt(sum((b.double() ** 2).sum() for _, b in both))
        return {"train/grad_rank": float(n_rank), "train/grad_reg": float(n_reg),
                "train/pressure": float(n_reg / n_rank) if n_rank > 0 else float("nan")}

    def configure_optimizers(self):
        # The model's and the pre-training heads' parameters (a tied decoder weight once); no
        # weight decay for biases and LayerNorm weights. Without heads the groups are the
        # model's alone, in its order, as in checkpoints written before the heads were trained.
        norms = {id(p) for m in self.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or id(p) in norms else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps,
        )
        total, warmup = self.total_steps, self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear_decay(s, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, fn, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            return fn(self.model, *args, head=self.hparams.score_head, batch_size=self.eval_batch_size,
                      device=self.device, bf16=self.eval_bf16, **kwargs)
        finally:
            self.model.train(was_training)

    @property
    def eval_batch_size(self) -> int:
        """Pairs per evaluation forward (``module.eval_batch_size``: a number, or auto = the size
        the evaluators' ``batch_size: auto`` picks for this device and model width)."""
        return self._batch_size(self.hparams.eval_batch_size)[0]

    @property
    def mining_batch_size(self) -> int:
        """Pairs per no-grad mining forward (``module.mining_batch_size``: a number, or auto =
        1024 on a GPU, else what ``eval_batch_size: auto`` picks for this CPU and width)."""
        setting = self.hparams.mining_batch_size
        if setting == "auto" and self.device.type == "cuda":
            return 1024
        return self._batch_size(setting)[0]

    def _batch_size(self, setting) -> Tuple[int, str]:
        """``(pairs per forward, why)`` for a batch size setting: a number, or auto."""
        if setting == "auto":
            from cacr.evaluation.inputs import auto_batch_size

            size, why = auto_batch_size(self.device, self.model)
            return size, f"auto: {why}"
        return int(setting), "set explicitly"

    @property
    def eval_bf16(self) -> bool:
        """Whether evaluation scores in bf16 (``module.eval_bf16``: true, false or auto; auto = on
        CUDA and on CPUs with native bf16 matrix units, :mod:`cacr.precision`)."""
        from cacr.precision import resolve_bf16

        return resolve_bf16(self.hparams.eval_bf16, self.device)[0]

    def on_fit_start(self):
        from cacr.precision import resolve_bf16

        use, why = resolve_bf16(self.hparams.eval_bf16, self.device)
        if self.trainer.is_global_zero:
            import logging

            logging.getLogger(__name__).info("evaluation scoring in %s (%s), %d pairs per forward (%s)",
                                             "bf16" if use else "fp32", why,
                                             *self._batch_size(self.hparams.eval_batch_size))
            chunk, why = self._train_chunk()
            logging.getLogger(__name__).info(
                "trained pairs: %s (%s)", f"negatives sorted by width, {chunk} per forward" if chunk
                else "one batch per step", why)

    def validation_step(self, batch, batch_idx):
        # The val loader holds one item per rank; the evaluation itself runs once per
        # validation in on_validation_epoch_end, over the whole (capped) validation split.
        return None

    def on_validation_epoch_end(self):
        if self.val_split is None:
            raise ValueError("RetrievalModule: validation needs the validation split; give it with "
                             "attach(val_split=...) (the data has no val split?)")
        metrics = self._evaluate(evaluate_retrieval, self.val_split, compile=self.hparams.compile_scoring)
        # the recalls and counts (not the scoring record; its fp32 re-scoring share is logged)
        log = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        scoring = metrics.get("scoring", {})
        if "fp32_pairs" in scoring:
            log["val/fp32_share"] = scoring["fp32_pairs"] / scoring["pairs"]
        if self.hparams.val_winoground and self.winoground is not None:
            log.update(self.winoground_dev_metrics())
        if getattr(self, "_fit_t0", None) is not None:
            # wall seconds since this process started training (a resume restarts it), this
            # validation included: binding against wall time
            log["val/wall_s"] = time.perf_counter() - self._fit_t0
        # Every rank computed the same gathered metrics: no reduction needed.
        self.log_dict(log, rank_zero_only=False)

    def winoground_dev_metrics(self) -> Dict[str, float]:
        """Winoground-format text / image / group / binding, overall and per collapsed tag, on
        the examples of the set's ``dev`` half (all examples when they carry no ``split``): the
        half one may watch and choose settings on; the ``test`` half is only scored at the end,
        and only the dev examples are scored here."""
        from cacr.evaluation.winoground_metrics import METRICS

        dev = dev_examples(self.winoground)
        _, res = self._evaluate(evaluate_winoground, dev, n_boot=0)
        out = {f"val/wino_{m}": float(res[m]) for m in METRICS}
        for tag, r in res["by_tag"]["collapsed_tag"].items():
            out.update({f"val/wino_{tag}_{m}": float(r[m]) for m in METRICS})
        return out

    def final_evaluation(self, test: bool = True, winoground: bool = True, n_boot: int = 1000,
                         output_dir=None) -> Dict[str, Any]:
        """Test-split retrieval and the data's Winoground-format set, as reported in results.json."""
        out: Dict[str, Any] = {}
        if test and self.test_split is not None:
            out["retrieval"] = self._evaluate(evaluate_retrieval, self.test_split, progress=True,
                                              compile=self.hparams.compile_scoring)
        wino = self.winoground
        if winoground and wino is not None:
            splits = {ex.key: [ex.extra["split"]] for ex in wino.examples if "split" in ex.extra}
            scores, res = self._evaluate(evaluate_winoground, wino, progress=True, n_boot=n_boot,
                                         seed=self.hparams.seed, extra_tags={"split": splits} if splits else None)
            out["winoground"] = res
            if output_dir is not None and self.trainer.is_global_zero:
                from cacr.evaluation.scorefile import write_score_file

                write_score_file(output_dir / "winoground_scores.jsonl", wino.examples, scores)
        return out

    def on_train_start(self):
        self._t0 = None
        self._fit_t0 = time.perf_counter()


def dev_examples(wino):
    """The examples of a Winoground-format set's ``dev`` half (``split`` of its examples; all
    of them when they carry none), as a set of the same kind sharing the regions."""
    index = [e for e, ex in enumerate(wino.examples) if ex.extra.get("split", "dev") == "dev"]
    if len(index) == len(wino.examples):
        return wino
    dev = copy.copy(wino)
    dev.examples = [wino.examples[e] for e in index]
    dev.texts = [wino.texts[e] for e in index]
    dev.image_rows = wino.image_rows.view(-1, 2)[torch.tensor(index, dtype=torch.long)].flatten()  # (2N',)
    return dev
