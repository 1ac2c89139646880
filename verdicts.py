"""The analyses' claims judged: a difference with its standard error, and whether it holds.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1). The paper reports single numbers (Tab. 2,
Fig. 6-9, §A.4); analyze.py claims what they show only where the difference from the control
exceeds its sampling error over the analysed images. Every analysis judges with the rule here.
"""
import numpy as np
import torch


def mean_difference(a, b, paired: bool = True) -> dict:
    """Mean of a minus mean of b with its standard error: per-item differences when paired (the same
    images), else the two samples' errors combined."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if paired:
        d = a - b
        return {"difference": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    return {"difference": float(a.mean() - b.mean()),
            "se": float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))}


def bootstrap_se(statistic, n: int, draws: int = 200, seed: int = 0) -> float:
    """The standard error of statistic(indices of n items) over resamplings of the items with
    replacement, for statistics with no closed form (a selection's curve, a fraction of tokens)."""
    rng = np.random.default_rng(seed)
    values = [statistic(torch.from_numpy(rng.integers(0, n, n))) for _ in range(draws)]
    return float(np.std([v for v in values if v is not None and np.isfinite(v)], ddof=1))


def holds(difference: float, se: float) -> bool:
    """A claimed difference holds when it is positive beyond two standard errors (about 97.5% one-sided
    under a normal sampling error)."""
    return difference > 2 * se
