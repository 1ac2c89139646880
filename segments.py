"""Tab. 2's protocol: each of the first K latent tokens' attention maps thresholded at its top X% of the
attention mass, the segment scored against the true segments, per iteration, against the same maps
shuffled over the image and against an untrained ALIT.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.3 and Tab. 2 ("To extract a segment from a
token attn map, we threshold the top X% of the attn map", as DINO does; mIoU against ImageNet-S's
segments, which rises over the iterations). Here the true segments are those of `shapes`.
"""
import torch
import torch.nn.functional as F

from attention import latent_to_image
from observe import token_labels
from plots import plot_segments
from verdicts import holds, mean_difference


def top_mass_segment(maps: torch.Tensor, share: float) -> torch.Tensor:
    """(..., N) attention over the 2D tokens -> (..., N) bool: the tokens that hold the top `share` of
    the map's mass (DINO's thresholding, Caron et al. 2021): the highest tokens until their sum reaches
    share x the total, and every token as high as the last one taken (ties stay together)."""
    values, _ = maps.sort(-1, descending=True)
    cumulative = values.cumsum(-1)
    last = (cumulative < share * cumulative[..., -1:]).sum(-1, keepdim=True).clamp(max=maps.shape[-1] - 1)
    return maps >= values.gather(-1, last)


def segment_iou(segments: torch.Tensor, truth: torch.Tensor, first_object: int = 0) -> torch.Tensor:
    """segments (B, S, N) bool, truth (B, N) segment labels -> (B, S): each segment's IoU with the true
    segment it overlaps best among labels >= first_object (the objects: on shapes 2, past the two
    background halves, whose size would reward a map spread over half the image)."""
    true = F.one_hot(truth, int(truth.max()) + 1).transpose(1, 2).bool()[:, first_object:]  # (B, labels, N)
    both = (segments[:, :, None] & true[:, None]).sum(-1).float()
    either = (segments[:, :, None] | true[:, None]).sum(-1).float()
    present = true.any(-1)[:, None]  # labels that do occur in the image
    return torch.where(present, both / either.clamp(min=1), 0.0).max(-1).values


def segment_scores(maps: torch.Tensor, truth: torch.Tensor, shares: list) -> torch.Tensor:
    """Tab. 2's protocol: maps (T, B, K, N), the attention of K latent tokens over the 2D tokens at each
    iteration, truth (B, N) segment labels -> (B, T, len(shares)): per image the mean over the K tokens
    of the IoU of each token's top-X segment with the shape it overlaps best (Tab. 2 scores against
    ImageNet-S's object segments; the background halves are left out)."""
    return torch.stack([torch.stack([segment_iou(top_mass_segment(m, share), truth, first_object=2).mean(-1)
                                     for share in shares], -1) for m in maps], 1)


def top_mass_shares(flag: str) -> list:
    """--top-mass "0.4,0.6,0.8" -> the shares of the attention mass a segment holds."""
    return [float(v) for v in flag.split(",")]


class Segments:
    """What Tab. 2 keeps of each batch: segment_scores of the first K latent tokens' maps (the tokens every
    iteration has), of the same maps shuffled over the 2D tokens (seeded), and of the untrained control's."""

    def __init__(self, config, shares: list, seed: int):
        self.N, self.K, self.patch_size, self.shares = (config.num_image_tokens, config.tokens_per_iter,
                                                        config.patch_size, shares)
        self.generator = torch.Generator().manual_seed(seed)
        self.scores = {name: [] for name in ("recurrent", "shuffled", "untrained")}

    def first_maps(self, weights: list) -> torch.Tensor:
        """T x (B, L, L) attention -> (T, B, K, N): the maps of the first K latent tokens."""
        return torch.stack([latent_to_image(w, self.N)[:, :self.K] for w in weights]).cpu()

    def add(self, batch):
        truth = torch.from_numpy(token_labels([item.labels for item in batch.items], self.patch_size))  # (B, N)
        first = self.first_maps(batch.weights)
        shuffled = first.gather(-1, torch.rand(first.shape, generator=self.generator).argsort(-1))
        for name, maps in (("recurrent", first), ("shuffled", shuffled),
                           ("untrained", self.first_maps(batch.control_weights))):
            self.scores[name].append(segment_scores(maps, truth, self.shares))

    def result(self) -> dict:
        """{name: (n, T, shares)}."""
        return {k: torch.cat(v) for k, v in self.scores.items()}


def segment_summary(segments: dict, shares: list, counts: list) -> dict:
    """Mean segment mIoU per top-X share and iteration, and with X chosen per image (its best), for the
    trained maps, the shuffled maps and the untrained control; the rise from the first to the last
    iteration and the margin over each control at the last, with standard errors over the images."""
    summary = {}
    for name, scores in segments.items():  # (n, T, shares)
        table = {f"{share:.0%}": dict(zip(counts, scores[:, :, s].mean(0).tolist())) for s, share in enumerate(shares)}
        table["best per image"] = dict(zip(counts, scores.max(-1).values.mean(0).tolist()))
        summary[name] = table
    trained = segments["recurrent"]
    first = shares.index(min(shares))
    rise = mean_difference(trained[:, -1, first], trained[:, 0, first])
    summary["claims"] = {"rise": {"share": f"{shares[first]:.0%}", **rise,
                                  "holds": holds(rise["difference"], rise["se"])}}
    for control in ("shuffled", "untrained"):
        margin = mean_difference(trained[:, -1].max(-1).values, segments[control][:, -1].max(-1).values)
        summary["claims"][f"over {control}"] = {**margin, "holds": holds(margin["difference"], margin["se"])}
    return summary


def analyse(segments: dict, shares: list, counts: list, out) -> dict:
    """Tab. 2's table and claims, and segments.png."""
    summary = segment_summary(segments, shares, counts)
    plot_segments(out / "segments.png", summary, counts)
    return {"segments": summary}
