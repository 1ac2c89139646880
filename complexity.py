"""Complexity against tokens: the L1 at every token count per complexity level of `shapes`, and the
token counts an L1 threshold gives each level.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §3 and Fig. 4/5 (the tokens an image needs
follow its complexity); here the complexity is the level the shapes generator drew.
"""
import torch

from plots import plot_complexity
from selection import first_passing


def histogram_thresholds(flag: str, l1: torch.Tensor) -> list:
    """--histogram-thresholds: the L1 thresholds given, or auto: the median image's L1 at the fewest and
    at the most tokens (half the images pass at once; half never do)."""
    if flag != "auto":
        return [float(v) for v in flag.split(",")]
    return [round(l1[t].median().item(), 4) for t in (0, len(l1) - 1)]


def complexity_summary(l1: torch.Tensor, levels: torch.Tensor, thresholds: list, counts: list) -> dict:
    """l1 (T, n), levels (n,) -> the mean L1 per level and token count, and per threshold and level how
    many images each token count is chosen for (the first to pass; the most when none does)."""
    return {"l1_per_level": {int(c): {k: l1[t][levels == c].mean().item() for t, k in enumerate(counts)}
                             for c in levels.unique()},
            "chosen_tokens_per_level": {
                f"l1<{thr:g}": {int(c): {k: int((first_passing(l1 < thr)[levels == c] == t).sum())
                                         for t, k in enumerate(counts)} for c in levels.unique()}
                for thr in thresholds}}


def analyse(l1: torch.Tensor, levels: torch.Tensor, flag: str, counts: list, out) -> dict:
    """Fig. 4/5's curves and histograms (complexity.png, histograms.png)."""
    summary = complexity_summary(l1, levels, histogram_thresholds(flag, l1), counts)
    plot_complexity(out / "complexity.png", out / "histograms.png", summary, counts)
    return {"complexity": summary}
