"""Fig. 3's attention maps: per iteration, the attention between the latent tokens and the 2D image tokens,
drawn for a few images (the decoder's maps, as the paper's figures), and how spread out the maps are
(entropy), of the decoder's maps and of the last encoder layer's.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §2 and Fig. 3, 11-13 ("sharper & sparser
attention" as the recurrence adds tokens); §4 "Analyzing Learned Tokens for Object Discovery": the maps
are "attention maps of learned 1D latent tokens to 2D image tokens ... from the 7th layer of Ours-S
distillation-decoder" (observe.decoder_attention; the layer: --map-layer). binding.py scores the last
encoder layer's attention against the true segments (§A.3), segments.py the decoder's maps (Tab. 2).
"""
import math

import numpy as np
import torch

from data import LEVELS, SceneItem, ShapesDataset
from plots import draw_attention
from verdicts import mean_difference, verdict


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


def decoder_maps(columns):
    """(B, heads, N, tK) decoder attention columns (observe.decoder_attention) -> (B, tK, N): each latent
    token's map over the 2D cells, heads averaged (the official notebook's) and rescaled to sum to 1."""
    maps = columns.float().mean(1).transpose(1, 2)
    return maps / maps.sum(-1, keepdim=True)


class AttentionMaps:
    """What Fig. 3 keeps of each batch: every image's mean map entropy per iteration, of the first K
    latent tokens (tracked through the rollout) and of all, for the decoder's maps at block `layer`
    (0-based) and for the last encoder layer's; and of the images in `keep`, the image, its decoder maps,
    each 2D query's most attended latent token there and its segments (shapes)."""

    def __init__(self, keep: list, config, layer: int):
        self.keep, self.N, self.K, self.layer = keep, config.num_image_tokens, config.tokens_per_iter, layer
        self.entropy = {key: [] for key in ("encoder first", "encoder all", "decoder first", "decoder all")}
        self.kept = {}

    def add(self, batch):
        for source, maps in (("encoder", [latent_to_image(w, self.N) for w in batch.weights]),  # T x (B, tK, N)
                             ("decoder", [decoder_maps(c) for c in batch.decoder_maps])):
            entropy = [map_entropy(m) for m in maps]  # T x (B, tK)
            self.entropy[f"{source} first"].append(torch.stack([e[:, :self.K].mean(1) for e in entropy]).cpu())
            self.entropy[f"{source} all"].append(torch.stack([e.mean(1) for e in entropy]).cpu())  # (T, B)
        for j, i in enumerate(batch.index):
            if i in self.keep:
                item = batch.items[j]
                self.kept[i] = (batch.images[j].cpu(), [decoder_maps(c[j:j + 1])[0].cpu() for c in batch.decoder_maps],
                                [c[j].mean(0).argmax(-1).cpu() for c in batch.decoder_maps],
                                item.labels if isinstance(item, SceneItem) else None)

    def result(self) -> dict:
        return {"entropy": {key: torch.cat(v, -1) for key, v in self.entropy.items()}, "kept": self.kept,
                "layer": self.layer}


def sharper(entropy) -> dict:
    """Fig. 3's "sharper & sparser attention" as a claim: the first K tokens' mean map entropy at iteration
    1 minus at the last (positive: sharper), over the images (T, n), judged by verdicts.verdict."""
    change = mean_difference(entropy[0], entropy[-1])
    return {**change, **verdict(change["difference"], change["se"])}


def analyse(maps: dict, dataset, config, out) -> dict:
    """attention_<i>.png per image kept (Fig. 3, 11: the decoder's maps), and the mean entropy per token
    count of the decoder's and the encoder's maps, with Fig. 3's claim on each."""
    counts, K, layer = config.token_counts, config.tokens_per_iter, maps["layer"]
    source = f"decoder layer {layer + 1} of {config.decoder_layers}"
    for i, (image, image_maps, assign, masks) in maps["kept"].items():
        level = dataset.complexity_of(i) if isinstance(dataset, ShapesDataset) else None
        draw_attention(out / f"attention_{i}.png", image, image_maps, assign, masks, config, level,
                       f"{source}: the 2D queries' attention to each latent token, mean over heads")
    entropy = maps["entropy"]
    return {"attention_maps": [str(out / f"attention_{i}.png") for i in maps["kept"]],
            "attention_maps_source": source,
            # the last encoder layer's latent rows: the control beside the decoder's maps (Fig. 3 shows the latter)
            "attention_entropy": {
                f"tokens 1-{K}": dict(zip(counts, entropy["encoder first"].mean(1).tolist())),
                "all latent tokens": dict(zip(counts, entropy["encoder all"].mean(1).tolist()))},
            "attention_entropy_decoder": {
                "layer": source,
                f"tokens 1-{K}": dict(zip(counts, entropy["decoder first"].mean(1).tolist())),
                "all latent tokens": dict(zip(counts, entropy["decoder all"].mean(1).tolist()))},
            "attention_sharper": {f"decoder ({source}), tokens 1-{K}": sharper(entropy["decoder first"]),
                                  f"encoder (last layer), tokens 1-{K}": sharper(entropy["encoder first"])}}
