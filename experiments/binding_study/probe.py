"""How fast can this UNITER learn binding when it is given nothing but the binding signal?

A diagnostic beside the gate (LOG.md, "The gate"): the same model class
(``UniterForImageTextRetrieval``, any size), trained on freshly sampled scenes of the
synthetic world (no data reuse, so no memorising), with a loss that only binding can
lower. Each positive (scene, caption "A rel B" true of it) is scored against

- its order swap "B rel A" (false of the scene: the relations are strict), and
- the scene with A's and B's boxes exchanged (the caption becomes false),

with a softmax over the three (``--loss swap``), optionally plus the other captions of the
batch as easy negatives (``--in-batch``). Binding (``s00 - s01 - s10 + s11 > 0``) is
measured every ``--eval-every`` steps on ``--n-eval`` fresh Winoground-format pairs built by
the world's own generators (half relation swaps, half attribute swaps), whose layouts are
never trained on. It answers "is binding learnable by this model, and in how many steps?"
apart from the recipe's other objectives and its finite caption set.

    python experiments/binding_study/probe.py --layers 4 --steps 3000 --out /tmp/probe.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from cacr.data.synthetic import (  # noqa: E402
    CATEGORIES, COLOURS, POSITIONS, RELATIONS, TEMPLATES, Region, SyntheticConfig, World, absolute_captions, attribute_swap_example, caption_for, layout,
    relation_holds, relation_swap_example, swap_boxes, synthetic_vocab,
)
from cacr.data.tokenizer import WordPieceTokenizer  # noqa: E402
from cacr.model import MlmHead, PairExample, UniterConfig, UniterForImageTextRetrieval, collate  # noqa: E402

KINDS = {"colour": COLOURS, "category": CATEGORIES, "relation": POSITIONS}  # the relation words are the position words


def masked_lm(model, head, tok, batch, n: int, r, kinds, mode: str = "one"):
    """MLM on the first ``n`` pairs of ``batch`` (the positives), predicted from the whole pair.
    ``mode="one"``: one content word per caption (of ``kinds``: colour, category, relation) is
    replaced by [MASK]. ``mode="focus"``: the project's recipe (``module.mlm_focus``): every
    relation word, and each other word piece with probability 0.15. Returns (loss, {kind: accuracy})."""
    vocab = tok.token_to_id
    ids = batch.input_ids[:n].clone()
    kind_of = {vocab[w]: k for k, words in KINDS.items() if k in kinds for w in words}
    rows, cols, kind = [], [], []
    for b in range(n):
        if mode == "focus":
            words = list(range(1, int(batch.txt_lens[b]) - 1))  # not [CLS] / [SEP]
            chosen = [j for j in words if kind_of.get(int(ids[b, j])) == "relation" or r.random() < 0.15]
            for j in chosen or [words[int(r.integers(len(words)))]]:
                rows.append(b), cols.append(j), kind.append(kind_of.get(int(ids[b, j]), "other"))
            continue
        slots = [j for j, t in enumerate(ids[b].tolist()) if t in kind_of]
        j = slots[int(r.integers(len(slots)))]
        rows.append(b), cols.append(j), kind.append(kind_of[ids[b, j].item()])
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    target = ids[rows, cols].clone()
    ids[rows, cols] = vocab["[MASK]"]
    sub = dataclasses.replace(batch, **{f: getattr(batch, f)[:n] for f in (
        "img_feat", "img_pos_feat", "attn_mask", "gather_index", "txt_lens", "num_bbs", "word_index",
        "word_mask", "region_index", "region_mask")}, input_ids=ids)
    hidden, _, _ = model.uniter(sub)
    logits = head(hidden[rows, cols])  # compact layout: text token j sits at joint position j
    hit = (logits.argmax(-1) == target).float()
    acc = {k: hit[[i for i, x in enumerate(kind) if x == k]].mean().item() for k in set(kind)}
    return F.cross_entropy(logits, target), acc


def boxes6(regions) -> torch.Tensor:
    b = torch.tensor(np.stack([g.box for g in regions]), dtype=torch.float32)
    return torch.cat([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1)


def example(tok, caption: str, regions, perm) -> PairExample:
    regions = [regions[i] for i in perm]  # region order carries nothing
    feat = torch.tensor(np.stack([g.feature for g in regions]), dtype=torch.float32)
    # [CLS] words [SEP], as the project's captions are read (cacr.data.datasets): the score reads
    # position 0. (Before 2026-11-30 session 6 the probe left the two out: runs A-I.)
    return PairExample(torch.tensor(tok.with_specials(tok.encode(caption))), feat, boxes6(regions))


def eval_set(world: World, n: int, seed: int):
    r = np.random.default_rng([seed, 7])
    out = []
    for k in range(n):
        img0, img1, c0, c1, _ = (relation_swap_example if k % 2 == 0 else attribute_swap_example)(world, r)
        out.append((img0, img1, c0, c1, r.permutation(len(img0))))
    return out


@torch.no_grad()
def binding(model, tok, items, batch=256):
    model.eval()
    pairs = []
    for img0, img1, c0, c1, perm in items:
        pairs += [example(tok, c, im, perm) for c in (c0, c1) for im in (img0, img1)]
    s = torch.cat([model.score(collate(pairs[i:i + batch])) for i in range(0, len(pairs), batch)]).view(-1, 4)
    d = s[:, 0] - s[:, 1] - s[:, 2] + s[:, 3]
    text = ((s[:, 0] > s[:, 2]) & (s[:, 3] > s[:, 1]))
    image = ((s[:, 0] > s[:, 1]) & (s[:, 3] > s[:, 2]))
    model.train()
    half = len(items) // 2
    return {"binding": 100 * (d > 0).float().mean().item(),
            "binding_relation": 100 * (d[0::2] > 0).float().mean().item(),
            "binding_object": 100 * (d[1::2] > 0).float().mean().item(),
            "group": 100 * (text & image).float().mean().item(), "n": len(items), "half": half}


def fresh_scene(world: World, r, held_out):
    while True:
        regions = world.scene(r)
        if layout(regions) not in held_out:
            return regions


class Scenes:
    """Where training scenes come from: fresh every draw (``pool=0``: nothing can be memorised),
    or a fixed pool of ``pool`` scenes drawn with replacement (a finite training set, as
    ``train.py``'s world is). No scene repeats a held-out layout."""

    def __init__(self, world: World, r, held_out, pool: int = 0):
        self.world, self.r, self.held_out = world, r, held_out
        self.pool = [fresh_scene(world, r, held_out) for _ in range(pool)]
        self.holding = {}  # (name, name) -> indices of the pool scenes holding both objects
        for i, regions in enumerate(self.pool):
            names = [g.name() for g in regions if g.kind == "object"]
            for a in names:
                for b in names:
                    if a != b:
                        self.holding.setdefault((a, b), []).append(i)

    def draw(self):
        return self.pool[int(self.r.integers(len(self.pool)))] if self.pool else fresh_scene(self.world, self.r, self.held_out)

    def other(self, a: Region, b: Region, rel: str, tries: int = 5000):
        """Another scene holding objects named as ``a`` and ``b`` of which "a rel b" is false
        (train.py's ``data.hard_pool=objects`` image negatives), or None if none is found."""
        def false_of(regions):
            named = {g.name(): g for g in regions if g.kind == "object"}
            return a.name() in named and b.name() in named and not relation_holds(named[a.name()], named[b.name()], rel)
        if self.pool:
            cands = self.holding.get((a.name(), b.name()), [])
            for i in self.r.permutation(len(cands)):
                if false_of(self.pool[cands[int(i)]]):
                    return self.pool[cands[int(i)]]
            return None
        for _ in range(tries):
            regions = fresh_scene(self.world, self.r, self.held_out)
            if false_of(regions):
                return regions
        return None


def training_items(world: World, r, held_out, n: int, scenes: "Scenes" = None, image_negative: str = "swap"):
    """``n`` (scene, caption true of it, its order swap, an image negative, region order of the
    scene, region order of the negative) tuples. The image negative is the scene with the two
    named objects' boxes exchanged (``"swap"``) or another scene holding both objects of which
    the caption is false (``"other"``; the swap where none is found). Scenes come from
    ``scenes`` (default: fresh ones)."""
    scenes = scenes or Scenes(world, r, held_out)
    out = []
    for _ in range(n):
        regions = scenes.draw()
        objs = [k for k, g in enumerate(regions) if g.kind == "object"]
        facts = [(a, b, rel) for a in objs for b in objs if a != b for rel in RELATIONS
                 if relation_holds(regions[a], regions[b], rel)]
        a, b, rel = facts[int(r.integers(len(facts)))]
        template = TEMPLATES[int(r.integers(len(TEMPLATES)))]
        neg = scenes.other(regions[a], regions[b], rel) if image_negative == "other" else None
        if neg is None:
            neg = swap_boxes(regions, a, b)
        perm = r.permutation(len(regions))
        out.append((regions, caption_for(regions[a], regions[b], rel, template),
                    caption_for(regions[b], regions[a], rel, template), neg, perm,
                    perm if len(neg) == len(regions) and image_negative == "swap" else r.permutation(len(neg))))
    return out


def training_batch(world: World, r, tok, held_out, n: int, in_batch: bool, scenes: "Scenes" = None,
                   image_negative: str = "swap"):
    """The items of :func:`training_items` as one batch: ``n`` positives, then their text
    swaps, their image negatives (and, with ``in_batch``, the next positive's caption on each
    image: mostly an easy negative, sometimes true). Returns (batch, number of groups)."""
    items = training_items(world, r, held_out, n, scenes, image_negative)
    groups = [[example(tok, cap, regions, perm) for regions, cap, _, _, perm, _ in items],
              [example(tok, swapped, regions, perm) for regions, _, swapped, _, perm, _ in items],
              [example(tok, cap, neg, neg_perm) for _, cap, _, neg, _, neg_perm in items]]
    if in_batch:
        pos = groups[0]
        groups.append([PairExample(pos[(i + 1) % n].input_ids, p.img_feat, p.img_pos_feat) for i, p in enumerate(pos)])
    return collate([e for g in groups for e in g]), len(groups)


def absolute_items(world: World, r, held_out, n: int, scenes: "Scenes" = None):
    """``n`` (scene, caption placing one of its objects on the grid's edge, "a red cube is
    left") pairs, the world's own absolute captions (``cacr.data.synthetic.absolute_captions``);
    scenes from ``scenes`` (default: fresh ones)."""
    scenes = scenes or Scenes(world, r, held_out)
    return [(regions, absolute_captions(r, regions, 1)[0]) for regions in (scenes.draw() for _ in range(n))]


def absolute_batch(world: World, r, tok, held_out, n: int, scenes: "Scenes" = None):
    return collate([example(tok, cap, regions, r.permutation(len(regions)))
                    for regions, cap in absolute_items(world, r, held_out, n, scenes)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="positives per step")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--min-objects", type=int, default=2)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--min-distractors", type=int, default=1)
    p.add_argument("--max-distractors", type=int, default=3)
    p.add_argument("--in-batch", action="store_true", help="add the next positive's caption as an easy negative")
    p.add_argument("--mlm", type=float, default=0.0, help="weight of one-content-word MLM on the positives")
    p.add_argument("--mlm-kinds", default="colour,category,relation")
    p.add_argument("--mlm-mode", choices=("one", "focus"), default="one",
                   help="one content word per caption, or the project's: relation words always + 15%% of the rest")
    p.add_argument("--absolute", type=int, default=0,
                   help="extra pairs per step with an absolute-position caption ('a red cube is left'), for MLM")
    p.add_argument("--rank", type=float, default=1.0, help="weight of the swap ranking loss")
    p.add_argument("--image-negative", choices=("swap", "other"), default="swap",
                   help="the positive's scene with the two named objects' boxes exchanged, or another scene "
                        "holding both objects of which the caption is false (train.py's data.hard_pool=objects)")
    p.add_argument("--pool", type=int, default=0,
                   help="train on a fixed pool of this many scenes (train.py's finite world); 0: fresh scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the curve")
    p.add_argument("--stop-binding", type=float, default=None,
                   help="stop (and save) after the first evaluation whose binding, on the probe's own fresh pairs, "
                        "is at least this: a pre-trained checkpoint part-way up (binding_study/study.py --pretrainer probe)")
    p.add_argument("--exclude-layouts", default=None,
                   help="a world's winoground/scenes.jsonl: no training scene repeats one of its object layouts "
                        "(as train.py's worlds never do; study.py passes the study's set)")
    p.add_argument("--save", default=None,
                   help="state dict of the model after every evaluation (UNITER keys: model.checkpoint= loads it)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # The study world's defaults (conf/data/synthetic.yaml) but for the sub-world sizes given.
    wcfg = SyntheticConfig(seed=0, img_dim=64, vocab_size=64, noise=0.2, n_categories=4, n_colours=3,
                           min_objects=a.min_objects, max_objects=a.max_objects,
                           min_distractors=a.min_distractors, max_distractors=a.max_distractors)
    world = World(wcfg)
    tok = WordPieceTokenizer(synthetic_vocab(64), name="synthetic")
    items = eval_set(world, a.n_eval, a.seed + 1000)
    held_out = {layout(x) for it in items for x in it[:2]}
    if a.exclude_layouts:
        from cacr.data.negatives import scene_layout
        from cacr.data.synthetic import load_scenes

        held_out |= {scene_layout(s) for s in load_scenes(a.exclude_layouts).values()}
    cfg = UniterConfig(vocab_size=64, hidden_size=a.hidden, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, intermediate_size=4 * a.hidden, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, max_position_embeddings=64, img_dim=64)
    model = UniterForImageTextRetrieval(cfg)
    head = MlmHead(cfg, model.uniter.embeddings.word_embeddings) if a.mlm else None
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    mlm_acc = {}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / a.warmup) * max(0.0, 1 - s / a.steps))
    r = np.random.default_rng([a.seed, 1])
    scenes = Scenes(world, r, held_out, a.pool)
    curve, t0, losses = [], time.time(), []
    for step in range(1, a.steps + 1):
        batch, k = training_batch(world, r, tok, held_out, a.batch, a.in_batch, scenes, a.image_negative)
        s = model(batch).rank_logits.view(k, a.batch)
        # positive against its text swap and its image swap (and the easy negative, if any)
        loss = a.rank * F.cross_entropy(s.t(), torch.zeros(a.batch, dtype=torch.long))
        if head is not None:
            mlm, acc = masked_lm(model, head, tok, batch, a.batch, r, a.mlm_kinds.split(","), a.mlm_mode)
            loss = loss + a.mlm * mlm
            if a.absolute:
                ab = absolute_batch(world, r, tok, held_out, a.absolute, scenes)
                mlm2, acc2 = masked_lm(model, head, tok, ab, a.absolute, r, ["relation"])
                loss = loss + a.mlm * mlm2
                acc["absolute"] = acc2["relation"]
            for kind, v in acc.items():
                mlm_acc.setdefault(kind, []).append(v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            m = binding(model, tok, items)
            m.update(step=step, loss=float(np.mean(losses)), seconds=round(time.time() - t0, 1),
                     mlm_acc={k: float(np.mean(v)) for k, v in mlm_acc.items()})
            losses, mlm_acc = [], {}
            curve.append(m)
            print(f"step {step}: loss {m['loss']:.3f} (chance {math.log(k):.3f}) binding {m['binding']:.1f} "
                  f"(relation {m['binding_relation']:.1f}, object {m['binding_object']:.1f}) group {m['group']:.1f} "
                  f"mlm {' '.join(f'{k} {v:.2f}' for k, v in sorted(m['mlm_acc'].items()))} [{m['seconds']:.0f} s]", flush=True)
            stop = a.stop_binding is not None and m["binding"] >= a.stop_binding
            if a.save:  # the model first, then the curve that says where it stopped
                tmp = a.save + ".tmp"
                torch.save(model.state_dict(), tmp)
                os.replace(tmp, a.save)
            if a.out:  # after every evaluation, so a stopped run keeps its curve
                tmp = a.out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"args": vars(a), "curve": curve, **({"stopped_at": step} if stop else {})}, f, indent=1)
                os.replace(tmp, a.out)
            if stop:
                print(f"binding {m['binding']:.1f} >= {a.stop_binding}: stopped at step {step}", flush=True)
                break


if __name__ == "__main__":
    main()
