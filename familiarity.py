"""Familiarity: images the model never saw need more tokens. The unseen variants of `shapes` (and
--ood-dir) against in-distribution images of the same complexity levels, at Tab. 1's two lengths.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.2 ("Representation Capacity Depends on
Familiarity with the Training Set") and Tab. 1: the FID gap between 64 and 256 tokens (a quarter of the
maximum, and the maximum) is 7.92 on ImageNet-100, 12.56 on COCO, 23.32 on Wikipedia images.

Per image set, against the in-distribution images (image for image at the same level on shapes):
- the gap between L1 at a quarter of the maximum tokens and at the maximum (`tab1_lengths`), and FID's
  with Inception weights;
- the same gap relative to the base's own floor. The paper's base is an ImageNet VQGAN that knows the
  pixels its test calls unfamiliar, so there out of distribution means new to the distillation module.
  Ours never saw the variants either, and ALIT cannot reconstruct below its base (observe.base_l1): on
  the unseen palette both sit near the base's large error, which shrinks the gap by construction. The
  excess over the floor at each length is reported; their gap equals the plain gap (the floor cancels),
  so the gap divided by the mean floor is the measure that removes the base's own error;
- the tokens picked by the default rule (L1 < threshold, or saturated) and by the threshold alone; the
  share of images the base alone already leaves above the threshold, which no length can pass.
The variants are reported in two groups (VARIANT_GROUPS): new to ALIT at a matched complexity, and
adding information. Every claim in L1 and tokens is judged with verdicts.verdict; FID, one number per set,
is given beside.
"""
import sys

import torch
from tqdm import tqdm

from data import VARIANTS, ShapesDataset, build_dataset
from fid import FeatureStats, fid_from_stats
from flags import paper_scale
from observe import base_l1
from plots import plot_familiarity
from selection import DEFAULT_CRITERION_CPU, DEFAULT_CRITERION_OFFICIAL, first_passing, l1_passes
from verdicts import bootstrap_se, mean_difference, verdict

# What each unseen set changes (data.VARIANTS): the familiarity claim is tested on the first group, whose
# scenes keep the level's shapes, sizes and count (the same layout, colours aside, for the palette);
# textures add stripes and checkers to every surface, information that needs tokens at any familiarity.
VARIANT_GROUPS = {"kinds": "new to ALIT, matched complexity", "palette": "new to ALIT, matched complexity",
                  "textures": "adds information", "--ood-dir": "your own images"}


def tab1_lengths(counts: list) -> tuple:
    """Tab. 1's two token counts: a quarter of the maximum (64 of 256; the nearest count) and the maximum."""
    return min(counts, key=lambda c: abs(c - counts[-1] / 4)), counts[-1]


@torch.no_grad()
def reconstruction_l1(model, dataset, n: int, batch_size: int, inception, lengths: tuple, device) -> dict:
    """L1 (T, n) of the first n images at every token count, the base alone's L1 (n,) (the floor), their
    levels (shapes), and Inception features of originals and of the reconstructions at `lengths` when FID
    is on."""
    counts = model.config.token_counts
    l1, floor, levels, real, fake = [], [], [], [], []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([item[0] for item in items]).to(device)
        recon = torch.stack([r.recon.float().clamp(0, 1) for r in model(images, reconstruct=True)])  # (T, B, 3, H, W)
        l1.append((recon - images).abs().mean(dim=(2, 3, 4)).cpu())
        floor.append(base_l1(model, images).cpu())
        levels.append(torch.tensor([item[1] for item in items]))
        if inception is not None:
            real.append(inception(images).cpu())
            fake.append(torch.stack([inception(recon[counts.index(c)]) for c in lengths]).cpu())
    return {"l1": torch.cat(l1, dim=1), "base_l1": torch.cat(floor), "level": torch.cat(levels),
            **({"real": torch.cat(real), "features": torch.cat(fake, dim=1)} if real else {})}


def chosen_tokens(l1: torch.Tensor, counts: list, threshold: float, saturation: float) -> torch.Tensor:
    """(n,) the tokens a pixel rule picks per image, from its L1 (T, n): the first count with L1 <
    threshold, or with saturation > 0 also within that fraction of its L1 at the most tokens."""
    return torch.tensor(counts)[first_passing(l1_passes(l1, threshold, saturation))].float()


def fid_at(table: dict, lengths: tuple) -> dict:
    """The FID of the reconstructions at each of `lengths` against their originals."""
    real = FeatureStats()
    real.update(table["real"])
    fids = {}
    for i, c in enumerate(lengths):
        fake = FeatureStats()
        fake.update(table["features"][i])
        fids[c] = fid_from_stats(real, fake)
    return fids


def relative_gap(gap: torch.Tensor, floor: torch.Tensor, index=None) -> float:
    """The mean gap over the mean floor (the base alone's L1), of the images at `index` (all: None)."""
    index = slice(None) if index is None else index
    return (gap[index].mean() / floor[index].mean()).item()


def set_summary(table: dict, counts: list, lengths: tuple, criterion: dict, shapes: bool) -> dict:
    """One image set: L1 at every count, the base's floor, the excess over it and the gap at Tab. 1's
    lengths (plain and relative to the floor), the tokens each rule picks, per level on shapes, FID when
    features exist."""
    l1, floor, levels = table["l1"], table["base_l1"], table["level"]
    short, full = (l1[counts.index(c)] for c in lengths)
    gap, n = short - full, len(floor)
    threshold, saturation = criterion["default_threshold"], criterion["saturation"]
    tokens = {"default": chosen_tokens(l1, counts, threshold, saturation),
              "threshold": chosen_tokens(l1, counts, threshold, 0.0)}
    row = {"images": n, "l1": dict(zip(counts, l1.mean(1).tolist())), "base_l1": floor.mean().item(),
           "excess_over_floor": {c: mean_difference(x, floor) for c, x in zip(lengths, (short, full))},
           "gap": mean_difference(short, full),
           "relative_gap": {"difference": relative_gap(gap, floor),
                            "se": bootstrap_se(lambda i: relative_gap(gap, floor, i), n)},
           "tokens": {rule: {"mean": chosen.mean().item(), "se": (chosen.std() / n ** 0.5).item()}
                      for rule, chosen in tokens.items()},
           "above_threshold_at_the_floor": (floor >= threshold).float().mean().item()}
    if shapes:
        row["per_level"] = {int(c): {"gap": gap[levels == c].mean().item(),
                                     "relative_gap": relative_gap(gap, floor, levels == c),
                                     **{f"tokens, {rule}": chosen[levels == c].mean().item()
                                        for rule, chosen in tokens.items()}} for c in levels.unique()}
    if "features" in table:
        row["fid"] = fid_at(table, lengths)
        row["fid_gap"] = row["fid"][lengths[0]] - row["fid"][lengths[1]]
    return row


def judged(difference: dict, paper=None, floor=None) -> dict:
    return {**difference, **verdict(difference["difference"], difference["se"], paper=paper, floor=floor)}


def against_in_distribution(table: dict, reference: dict, counts: list, lengths: tuple, criterion: dict,
                            paired: bool, row: dict, ref_row: dict) -> dict:
    """The paper's claims for one unseen set, each signed so that the claim is positive (unseen minus in
    distribution) and judged: a larger gap (plain, and relative to the floor), more tokens by each rule.
    `paired`: the same levels image for image (shapes' variants). A gap is at its floor where ALIT at the
    quarter length is already within 2 SE of its base in either set; the tokens where the base alone
    leaves most of the images above the threshold (no length can pass them, so the rules read the base)."""
    short = lengths[0]
    gaps = [x["l1"][counts.index(short)] - x["l1"][-1] for x in (table, reference)]
    floors = [x["base_l1"] for x in (table, reference)]
    at_floor = [name for name, r in (("unseen", row), ("in distribution", ref_row))
                if r["excess_over_floor"][short]["difference"] <= 2 * r["excess_over_floor"][short]["se"]]
    gap_floor = (f"at {short} tokens ALIT is within 2 SE of its base's L1 ({', '.join(at_floor)}): no gap can "
                 "show") if at_floor else None
    difference = row["relative_gap"]["difference"] - ref_row["relative_gap"]["difference"]
    if paired:  # resampled image for image, as the plain gaps are differenced
        se = bootstrap_se(lambda i: relative_gap(gaps[0], floors[0], i) - relative_gap(gaps[1], floors[1], i),
                          len(gaps[0]))
    else:
        se = float((row["relative_gap"]["se"] ** 2 + ref_row["relative_gap"]["se"] ** 2) ** 0.5)
    relative = {"difference": difference, "se": se}
    threshold = criterion["default_threshold"]
    censored = max(row["above_threshold_at_the_floor"], ref_row["above_threshold_at_the_floor"])
    token_floor = (f"the base alone's L1 is at or above the threshold {threshold:g} for {100 * censored:.0f}% of "
                   "the images: no length passes them") if censored > 0.5 else None
    claims = {"gap": judged(mean_difference(*gaps, paired=paired), floor=gap_floor),
              "relative_gap": judged(relative, floor=gap_floor)}
    for rule, saturation in (("default", criterion["saturation"]), ("threshold", 0.0)):
        chosen = [chosen_tokens(x["l1"], counts, threshold, saturation) for x in (table, reference)]
        claims[f"tokens, {rule} rule"] = judged(mean_difference(*chosen, paired=paired), floor=token_floor)
    if "fid_gap" in row and "fid_gap" in ref_row:  # one Frechet distance per set: no standard error
        claims["fid_gap"] = {"difference": row["fid_gap"] - ref_row["fid_gap"], "se": None,
                             "verdict": "not judged", "why": "one FID per set, no standard error at this size"}
    return claims


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
    """§A.2 at Tab. 1's lengths: the unseen variants of shapes (and --ood-dir) against the first as many
    analysed images, which on shapes have the same complexity levels image for image (data.ShapesDataset);
    familiarity.png."""
    mc = model.config
    counts, lengths = mc.token_counts, tab1_lengths(mc.token_counts)
    m = min(args.familiarity_images, per_image["l1"].shape[1])
    shapes = isinstance(dataset, ShapesDataset)
    reference = {"l1": per_image["l1"][:, :m], "base_l1": per_image["vqgan_l1"][:m],
                 "level": per_image["level"][:m] if shapes else torch.zeros(m)}
    if "real_features" in per_image:
        reference |= {"real": per_image["real_features"][:m],
                      "features": per_image["features"][[counts.index(c) for c in lengths], :m]}
    criterion = DEFAULT_CRITERION_OFFICIAL if paper_scale(mc.image_size) else DEFAULT_CRITERION_CPU
    ref_row = set_summary(reference, counts, lengths, criterion, shapes)
    summary = {"criterion": f"l1<{criterion['default_threshold']:g}"
                            + (f" or saturated ({criterion['saturation']:g})" if criterion["saturation"] else ""),
               "threshold rule": f"l1<{criterion['default_threshold']:g}", "lengths": list(lengths),
               "matched": "on the level: image i of every variant has the level of analysed image i, and the "
                          "differences are paired image for image (--ood-dir: unpaired)",
               "in distribution": {"group": "in distribution", **ref_row}}
    for name, data in tqdm(unseen_sets(dataset, m, args, mc.image_size).items(), desc="familiarity",
                           dynamic_ncols=True):
        table = reconstruction_l1(model, data, min(m, len(data)), args.batch_size, inception, lengths, device)
        paired = shapes and name in VARIANTS
        row = set_summary(table, counts, lengths, criterion, paired)
        row["vs_in_distribution"] = against_in_distribution(table, reference, counts, lengths, criterion, paired,
                                                            row, ref_row)
        summary[name] = {"group": VARIANT_GROUPS.get(name, "unseen"), **row}
    plot_familiarity(out / "familiarity.png", summary, counts)
    return {"familiarity": summary}
