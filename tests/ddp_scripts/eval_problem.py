"""A small random UNITER and ragged random captions/images, shared by the engine tests and
the 2-process DDP script (both build it from the same seed)."""
import torch

from cacr.model import UniterConfig, UniterForImageTextRetrieval

IMG_DIM = 16


def tiny_model(seed: int = 0) -> UniterForImageTextRetrieval:
    torch.manual_seed(seed)
    cfg = UniterConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=40, img_dim=IMG_DIM)
    model = UniterForImageTextRetrieval(cfg)
    with torch.no_grad():  # larger weights than BERT's init, so that scores differ visibly
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def ragged_data(n_captions: int, n_images: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    captions = []
    for _ in range(n_captions):
        t = int(torch.randint(1, 12, (1,), generator=g))
        words = torch.randint(5, 60, (t,), generator=g)
        captions.append(torch.cat([torch.tensor([2]), words, torch.tensor([3])]))
    images = []
    for _ in range(n_images):
        m = int(torch.randint(1, 10, (1,), generator=g))
        feat = torch.randn(m, IMG_DIM, generator=g)
        xy = torch.rand(m, 2, generator=g) * 0.5
        wh = torch.rand(m, 2, generator=g) * 0.5
        boxes = torch.cat([xy, xy + wh], dim=1)  # (m, 4) x1 y1 x2 y2
        images.append((feat, boxes))
    return captions, images
