"""Familiarity: images the model never saw need more tokens. The unseen variants of `shapes` (and
--ood-dir) against in-distribution images of the same complexity levels.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.2 ("Not all images are worth the same
representation": the capacity an image needs follows its familiarity). Per image set: L1 at every
token count, the gap between the shortest and the longest code, and the tokens the default
criterion picks, each against the in-distribution images with its standard error.
"""
import math
import sys

import torch
from tqdm import tqdm

from data import VARIANTS, ShapesDataset, build_dataset
from fid import FeatureStats, fid_from_stats
from flags import paper_scale
from observe import base_l1
from plots import plot_familiarity
from selection import DEFAULT_CRITERION_CPU, DEFAULT_CRITERION_OFFICIAL, first_passing, l1_passes
from verdicts import holds, mean_difference


@torch.no_grad()
def reconstruction_l1(model, dataset, n: int, batch_size: int, inception, device) -> dict:
    """L1 (T, n) of the first n images at every token count, their levels (shapes), and Inception
    features of originals and reconstructions when FID is on."""
    T = model.config.rollout_iters
    l1, vqgan, levels, real, fake = [], [], [], [], []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([item[0] for item in items]).to(device)
        recon = torch.stack([r.recon.float().clamp(0, 1) for r in model(images, reconstruct=True)])  # (T, B, 3, H, W)
        l1.append((recon - images).abs().mean(dim=(2, 3, 4)).cpu())
        vqgan.append(base_l1(model, images).cpu())
        levels.append(torch.tensor([item[1] for item in items]))
        if inception is not None:
            real.append(inception(images).cpu())
            fake.append(inception(recon.flatten(0, 1)).view(T, len(images), -1).cpu())
    return {"l1": torch.cat(l1, dim=1), "vqgan_l1": torch.cat(vqgan), "level": torch.cat(levels),
            **({"real": torch.cat(real), "features": torch.cat(fake, dim=1)} if real else {})}


def chosen_tokens(l1: torch.Tensor, counts: list, criterion: dict) -> torch.Tensor:
    """(n,) the tokens the default pixel criterion picks per image, from its L1 (T, n)."""
    passes = l1_passes(l1, criterion["default_threshold"], criterion["saturation"])
    return torch.tensor(counts)[first_passing(passes)]


def fid_per_count(table: dict, counts: list) -> list:
    """The FID of the reconstructions at every token count against their originals."""
    real = FeatureStats()
    real.update(table["real"])
    fids = []
    for t in range(len(counts)):
        fake = FeatureStats()
        fake.update(table["features"][t])
        fids.append(fid_from_stats(real, fake))
    return fids


def familiarity_summary(table: dict, reference: dict | None, counts: list, criterion: dict, shapes: bool) -> dict:
    """One image set against the in-distribution `reference` (None: it is the reference): L1 at every
    count, the gap between the shortest and the longest code, the tokens the default criterion picks
    (per level on shapes), FID when features exist."""
    l1, levels = table["l1"], table["level"]
    gap = l1[0] - l1[-1]
    tokens = chosen_tokens(l1, counts, criterion)
    row = {"images": l1.shape[1], "l1": dict(zip(counts, l1.mean(1).tolist())),
           "vqgan_l1": table["vqgan_l1"].mean().item(),
           "gap": gap.mean().item(), "gap_se": (gap.std() / math.sqrt(len(gap))).item(),
           "tokens": tokens.float().mean().item(), "tokens_se": (tokens.float().std() / math.sqrt(len(tokens))).item()}
    if shapes:
        row["per_level"] = {int(c): {"gap": gap[levels == c].mean().item(),
                                     "tokens": tokens[levels == c].float().mean().item()} for c in levels.unique()}
    if "features" in table:
        fids = fid_per_count(table, counts)
        row["fid"] = dict(zip(counts, fids))
        row["fid_gap"] = fids[0] - fids[-1]
    if reference is not None:
        ref_gap = reference["l1"][0] - reference["l1"][-1]
        ref_tokens = chosen_tokens(reference["l1"], counts, criterion)
        row["gap_vs_in_distribution"] = gaps = mean_difference(gap, ref_gap, paired=False)
        row["tokens_vs_in_distribution"] = more = mean_difference(tokens.float(), ref_tokens.float(), paired=False)
        row["holds"] = holds(gaps["difference"], gaps["se"]) and holds(more["difference"], more["se"])
    return row


def unseen_sets(dataset, m: int, args, image_size: int) -> dict:
    """The image sets measured against the analysed ones: on shapes every unseen variant (data.VARIANTS),
    m images each; and --ood-dir's first m images."""
    sets = {}
    if isinstance(dataset, ShapesDataset):
        sets = {variant: ShapesDataset(args.split, image_size, m, seed=0, variant=variant)
                for variant in VARIANTS if variant != "seen"}
    if args.ood_dir:
        try:
            sets["--ood-dir"] = build_dataset("folder", "val", image_size, args.ood_dir, train=False,
                                              eval_protocol=args.protocol, num_images=m)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"error: --ood-dir: {error}")
    return sets


def analyse(model, dataset, per_image: dict, args, inception, device, out) -> dict:
    """§A.2: the unseen variants of shapes (and --ood-dir) against the first as many analysed images,
    which on shapes have the same complexity levels image for image (data.ShapesDataset); familiarity.png."""
    mc = model.config
    counts = mc.token_counts
    m = min(args.familiarity_images, per_image["l1"].shape[1])
    shapes = isinstance(dataset, ShapesDataset)
    reference = {"l1": per_image["l1"][:, :m], "vqgan_l1": per_image["vqgan_l1"][:m],
                 "level": per_image["level"][:m] if shapes else torch.zeros(m)}
    if "real_features" in per_image:
        reference |= {"real": per_image["real_features"][:m], "features": per_image["features"][:, :m]}
    sets = unseen_sets(dataset, m, args, mc.image_size)
    criterion = DEFAULT_CRITERION_OFFICIAL if paper_scale(mc.image_size) else DEFAULT_CRITERION_CPU
    summary = {"criterion": f"l1<{criterion['default_threshold']:g}"
                            + (f" or saturated ({criterion['saturation']:g})" if criterion["saturation"] else ""),
               "in distribution": familiarity_summary(reference, None, counts, criterion, shapes)}
    for name, data in tqdm(sets.items(), desc="familiarity", dynamic_ncols=True):
        table = reconstruction_l1(model, data, min(m, len(data)), args.batch_size, inception, device)
        summary[name] = familiarity_summary(table, reference, counts, criterion, shapes and name in VARIANTS)
    plot_familiarity(out / "familiarity.png", summary, counts)
    return {"familiarity": summary}
