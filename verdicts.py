"""The analyses' claims judged on one scale: a difference with its standard error, and its verdict.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1). The paper reports single numbers (Tab. 1, Tab. 2,
Fig. 6-9, §A.4); analyze.py says what ours shows only as far as its sampling error over the analysed
images allows. Every analysis judges with `verdict`, beside the paper's number and the control.
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


# The one scale every claim of analyze.py is judged on (`verdict`).
VERDICTS = ("holds", "opposite", "does not hold", "inconclusive", "not testable at this size")


def verdict(difference: float, se: float, paper: float | None = None, floor: str | None = None,
            untestable: str | None = None) -> dict:
    """{"verdict": one of VERDICTS, "why": the reason} of a measured difference, signed so that the paper's
    claim is positive, and its standard error; `paper`: the paper's own difference in the same units, where
    it gives one. Its interval is the difference ± 2 SE:
    - holds: the interval is above 0;
    - opposite: the interval is below 0, the other side of what the paper claims;
    - does not hold: the interval holds 0 but not the paper's difference (an effect that size is absent);
    - inconclusive: the interval holds 0 and the paper's difference (or the paper gives none); or the
      metric sits at its floor (`floor`: which, and why), where no difference can show;
    - not testable at this size (`untestable`: why): a control shows the metric cannot move here."""
    if untestable:
        return {"verdict": "not testable at this size", "why": untestable}
    if floor:
        return {"verdict": "inconclusive", "why": f"at its floor: {floor}"}
    low, high = difference - 2 * se, difference + 2 * se
    interval = f"{difference:+.4g} ± {2 * se:.2g} (2 SE)"
    if low > 0:
        return {"verdict": "holds", "why": f"{interval} is above 0"}
    if high < 0:
        return {"verdict": "opposite", "why": f"{interval} is below 0"}
    if paper is not None and not low <= paper <= high:
        return {"verdict": "does not hold", "why": f"{interval} holds 0 but not the paper's {paper:+.4g}"}
    return {"verdict": "inconclusive", "why": f"{interval} holds 0" + (
        f" and the paper's {paper:+.4g}" if paper is not None else "")}
