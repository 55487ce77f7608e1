"""cacr/losses.py on tensors: each loss against an obvious loop, and the alignment loss's DDP
gather (2 gloo processes, half the batch each) against one process with the whole batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cacr.losses import alignment_loss, ranking_loss, softmax_ranking_loss, word_region_alignment_logits


def test_ranking_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(5, generator=g), torch.randn(5, 2, 3, generator=g)
    want = []
    for b in range(5):
        for d in range(2):
            for j in range(3):
                want.append(max(0.0, 0.2 + torch.sigmoid(neg[b, d, j]).item() - torch.sigmoid(pos[b]).item()))
    assert ranking_loss(pos, neg, 0.2).item() == pytest.approx(sum(want) / len(want), abs=1e-6)


def test_softmax_ranking_loss_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(4, generator=g), torch.randn(4, 2, 3, generator=g)
    want = [-torch.log_softmax(torch.cat([pos[b:b + 1], neg[b, d]]), 0)[0] for b in range(4) for d in range(2)]
    assert softmax_ranking_loss(pos, neg).item() == pytest.approx(torch.stack(want).mean().item(), abs=1e-6)


def _ragged(B=4, n=5, m=6, H=8, seed=2, n_words=(5, 1, 3, 4), n_regions=(2, 6, 1, 4)):
    g = torch.Generator().manual_seed(seed)
    words, regions = torch.randn(B, n, H, generator=g), torch.randn(B, m, H, generator=g)
    word_mask = torch.arange(n)[None] < torch.tensor(n_words)[:, None]
    region_mask = torch.arange(m)[None] < torch.tensor(n_regions)[:, None]
    return words, word_mask, regions, region_mask


def _pair_logit(words, n_words, regions, n_regions, temperature):
    """Mean over the caption's words of the best cosine with a region, over the temperature."""
    cos = torch.nn.functional.cosine_similarity
    best = [max(cos(words[i], regions[j], dim=0) for j in range(n_regions)) for i in range(n_words)]
    return torch.stack(best).mean() / temperature


def test_word_region_alignment_matches_a_loop_on_ragged_inputs():
    words, word_mask, regions, region_mask = _ragged()
    got = word_region_alignment_logits(words, word_mask, regions, region_mask, temperature=0.5)
    for a in range(4):
        for b in range(4):
            want = _pair_logit(words[a], int(word_mask[a].sum()), regions[b], int(region_mask[b].sum()), 0.5)
            assert got[a, b].item() == pytest.approx(want.item(), abs=1e-5)


def _alignment_loop(words, word_mask, regions, region_mask, images, temperature):
    """One positive at a time: its caption against every image, its image against every caption,
    the other positives of its own image left out."""
    B, terms = words.shape[0], []
    nw, nr = word_mask.sum(1).tolist(), region_mask.sum(1).tolist()
    for b in range(B):
        others = [j for j in range(B) if j == b or images[j] != images[b]]
        t2i = torch.stack([_pair_logit(words[b], nw[b], regions[j], nr[j], temperature) for j in others])
        i2t = torch.stack([_pair_logit(words[j], nw[j], regions[b], nr[b], temperature) for j in others])
        target = others.index(b)
        terms.append(0.5 * (-torch.log_softmax(t2i, 0)[target] - torch.log_softmax(i2t, 0)[target]))
    return torch.stack(terms).mean()


def test_alignment_loss_matches_a_loop_and_skips_captions_of_the_same_image():
    words, word_mask, regions, region_mask = _ragged()
    images = torch.tensor([3, 7, 3, 9])  # positives 0 and 2 share an image: not each other's negative
    got = alignment_loss(words, word_mask, regions, region_mask, images, temperature=0.5)
    want = _alignment_loop(words, word_mask, regions, region_mask, images, 0.5)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


# ----------------------------------------------------------------------------- the DDP gather


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_loss(rank: int, world: int, port: int, widths, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        words, word_mask, regions, region_mask = _ragged(B=6, n=7, m=5, seed=3, n_words=(7, 1, 3, 4, 2, 5),
                                                         n_regions=(2, 5, 1, 4, 3, 3))
        images = torch.tensor([0, 1, 0, 2, 3, 1])
        half = slice(3 * rank, 3 * rank + 3)
        # each process holds its positives cut to their own longest caption and image
        w_len, r_len = int(word_mask[half].sum(1).max()), int(region_mask[half].sum(1).max())
        w = words[half, :w_len].clone().requires_grad_(True)
        r = regions[half, :r_len].clone().requires_grad_(True)
        loss = alignment_loss(w, word_mask[half, :w_len], r, region_mask[half, :r_len], images[half], 0.5,
                              gather_widths=widths)
        loss.backward()
        out[rank] = (loss.item(), w.grad.clone(), r.grad.clone())
    finally:
        dist.destroy_process_group()


def _worker(rank, world, port, widths, queue):
    out = {}
    _rank_loss(rank, world, port, widths, out)
    loss, gw, gr = out[rank]
    queue.put((rank, loss, gw.tolist(), gr.tolist()))  # plain lists: shared tensors die with the process


@pytest.mark.parametrize("widths", [(7, 5), None], ids=["given_widths", "agreed_widths"])
def test_alignment_loss_over_two_processes_equals_one_process(widths):
    """Each process's loss is the mean over its positives of the global batch's loss terms,
    so the mean of the two processes' losses is the one-process loss, and their gradients
    (summed over processes, as DDP averages the mean loss) are the one-process gradients."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, widths, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, loss, gw, gr = queue.get(timeout=120)
        got[rank] = (loss, torch.tensor(gw), torch.tensor(gr))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    words, word_mask, regions, region_mask = _ragged(B=6, n=7, m=5, seed=3, n_words=(7, 1, 3, 4, 2, 5),
                                                     n_regions=(2, 5, 1, 4, 3, 3))
    images = torch.tensor([0, 1, 0, 2, 3, 1])
    w, r = words.clone().requires_grad_(True), regions.clone().requires_grad_(True)
    one = alignment_loss(w, word_mask, r, region_mask, images, 0.5)
    one.backward()
    assert (got[0][0] + got[1][0]) / 2 == pytest.approx(one.item(), abs=1e-5)
    for rank in range(2):
        half = slice(3 * rank, 3 * rank + 3)
        gw, gr = got[rank][1], got[rank][2]
        # DDP averages gradients over the 2 processes: 0.5 * (sum over ranks) = one-process gradient
        assert torch.allclose(gw / 2, w.grad[half, :gw.shape[1]], atol=1e-6)
        assert torch.allclose(gr / 2, r.grad[half, :gr.shape[1]], atol=1e-6)
