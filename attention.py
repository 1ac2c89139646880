"""Fig. 3's attention maps: per iteration, the attention of the latent tokens over the 2D image tokens
(last encoder layer, mean over heads), drawn for a few images, and how spread out they are (entropy).

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §2 and Fig. 3, 11-13 ("sharper & sparser
attention" as the recurrence adds tokens). binding.py and segments.py score the same maps against
the true segments (§A.3, Tab. 2).
"""
import math

import numpy as np
import torch

from data import LEVELS, SceneItem, ShapesDataset
from plots import draw_attention


def image_to_latent(weights, num_image_tokens: int):
    """(B, L, L) attention (rows: queries) -> (B, N, L1D): how much each 2D token attends to each
    latent token."""
    return weights[:, 1:1 + num_image_tokens, 1 + num_image_tokens:]


def latent_to_image(weights, num_image_tokens: int):
    """(B, L, L) -> (B, L1D, N): each latent token's attention over the 2D image tokens, rescaled
    to sum to 1 over them (the maps of Fig. 3)."""
    maps = weights[:, 1 + num_image_tokens:, 1:1 + num_image_tokens]
    return maps / maps.sum(-1, keepdim=True)


def map_entropy(maps):
    """(..., N) maps -> (...): Fig. 3's "sharper & sparser attention" as each map's entropy over the
    2D tokens, 1 = uniform."""
    return -(maps * maps.clamp(min=1e-12).log()).sum(-1) / math.log(maps.shape[-1])


def spread_images(dataset, n: int, count: int) -> list:
    """`count` image indices among the first n, the ones drawn: on shapes the first image of evenly
    spaced levels."""
    if not isinstance(dataset, ShapesDataset):
        return list(range(min(count, n)))
    wanted = np.linspace(0, len(LEVELS) - 1, count).round().astype(int).tolist() if count else []
    chosen = []
    for level in wanted:
        found = next((i for i in range(n) if dataset.complexity_of(i) == level and i not in chosen), None)
        if found is not None:
            chosen.append(found)
    return chosen


class AttentionMaps:
    """What Fig. 3 keeps of each batch: every image's mean map entropy per iteration, of the first K
    latent tokens (tracked through the rollout) and of all; and of the images in `keep`, the image, its
    maps, each 2D token's most attended latent token and its segments (shapes)."""

    def __init__(self, keep: list, config):
        self.keep, self.N, self.K = keep, config.num_image_tokens, config.tokens_per_iter
        self.entropy_first, self.entropy_all, self.kept = [], [], {}

    def add(self, batch):
        maps = [latent_to_image(w, self.N) for w in batch.weights]  # T x (B, tK, N)
        entropy = [map_entropy(m) for m in maps]  # T x (B, tK)
        self.entropy_first.append(torch.stack([e[:, :self.K].mean(1) for e in entropy]).cpu())  # (T, B)
        self.entropy_all.append(torch.stack([e.mean(1) for e in entropy]).cpu())
        for j, i in enumerate(batch.index):
            if i in self.keep:
                item = batch.items[j]
                self.kept[i] = (batch.images[j].cpu(), [m[j].cpu() for m in maps],
                                [image_to_latent(w[j:j + 1], self.N)[0].argmax(-1).cpu() for w in batch.weights],
                                item.labels if isinstance(item, SceneItem) else None)

    def result(self) -> dict:
        return {"entropy_first": torch.cat(self.entropy_first, -1), "entropy_all": torch.cat(self.entropy_all, -1),
                "kept": self.kept}


def analyse(maps: dict, dataset, config, out) -> dict:
    """attention_<i>.png per image kept (Fig. 3), and the mean entropy per token count."""
    counts = config.token_counts
    for i, (image, image_maps, assign, masks) in maps["kept"].items():
        level = dataset.complexity_of(i) if isinstance(dataset, ShapesDataset) else None
        draw_attention(out / f"attention_{i}.png", image, image_maps, assign, masks, config, level)
    return {"attention_maps": [str(out / f"attention_{i}.png") for i in maps["kept"]],
            "attention_entropy": {
                f"tokens 1-{config.tokens_per_iter}": dict(zip(counts, maps["entropy_first"].mean(1).tolist())),
                "all latent tokens": dict(zip(counts, maps["entropy_all"].mean(1).tolist()))}}
