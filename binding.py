"""Object binding, measured: each 2D token assigned to the latent token it attends most, the partition
scored against the scene's true segments, per iteration and complexity level.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.3 ("Recurrent Processing of Latent
Tokens ... leading to improved object binding") and Fig. 3, 13. The paper shows the maps; on
`shapes` every object's mask is known, so the partition is scored (ARI, foreground ARI, matched
mIoU) against the same assignment shuffled over the image and against a fixed-length pass
(observe.one_pass) that adds all the tokens at once.
"""
import numpy as np
import scipy.optimize
import torch

from attention import image_to_latent, latent_to_image
from observe import token_labels
from plots import plot_binding


def adjusted_rand_index(truth: np.ndarray, pred: np.ndarray) -> float:
    """ARI of two labelings of the same items (Hubert & Arabie 1985): 1 for the same partition,
    0 in expectation for partitions drawn at random with these segment sizes. NaN for < 2 items."""
    if len(truth) < 2:
        return float("nan")
    table = contingency(truth, pred)
    pairs = lambda counts: (counts * (counts - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(truth) * (len(truth) - 1) / 2
    expected, maximum = rows * cols / total, (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one segment, or every item alone): equal or not
        return float(both == maximum)
    return float((both - expected) / (maximum - expected))


def matched_miou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over the true segments of the IoU with the predicted segment matched to each one to
    one (Hungarian); a true segment left without a match counts 0."""
    table = contingency(truth, pred)
    iou = table / (table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table)
    rows, cols = scipy.optimize.linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / len(table))


def contingency(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(true segments, predicted segments) counts of items in both."""
    _, t = np.unique(truth, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1))
    np.add.at(table, (t, p), 1)
    return table


def binding_scores(truth: np.ndarray, assignment: np.ndarray) -> dict:
    """A partition of the 2D tokens (assignment: a latent token per 2D token) against the scene's
    segments (truth: data.Scene labels per 2D token; 0 and 1 the background halves, 2+ shapes)."""
    shapes = truth >= 2
    return {"ari": adjusted_rand_index(truth, assignment),
            # the object-discovery usual; with one shape in sight there are no objects to tell apart
            "fg_ari": adjusted_rand_index(truth[shapes], assignment[shapes]) if len(np.unique(truth[shapes])) > 1
            else float("nan"),
            "miou": matched_miou(truth, assignment),
            "segments": len(np.unique(assignment)),  # how many latent tokens the partition uses
            "true_segments": len(np.unique(truth))}


class Binding:
    """What binding keeps of each batch: per image and iteration the scores of the partition by the most
    attended latent token ("recurrent"), of the same shuffled over the image (seeded), of the partition by
    the latent tokens' maps instead (each 2D token to the latent whose map is highest there), and of the
    fixed-length pass."""

    def __init__(self, config, seed: int):
        self.N, self.T, self.patch_size = config.num_image_tokens, config.rollout_iters, config.patch_size
        self.rng = np.random.default_rng(seed)
        self.scores = {name: [] for name in ("recurrent", "shuffled", "one_pass", "recurrent_latent_to_image")}

    def add(self, batch):
        N, T, rng, scores = self.N, self.T, self.rng, self.scores
        truth = token_labels([item.labels for item in batch.items], self.patch_size)  # (B, N)
        assign = torch.stack([image_to_latent(w, N).argmax(-1) for w in batch.weights]).cpu().numpy()  # (T, B, N)
        from_maps = torch.stack([latent_to_image(w, N).argmax(1) for w in batch.weights]).cpu().numpy()  # (T, B, N)
        fixed_assign = image_to_latent(batch.one_pass, N).argmax(-1).cpu().numpy()  # (B, N)
        for j in range(len(batch.images)):
            scores["recurrent"].append([binding_scores(truth[j], assign[t, j]) for t in range(T)])
            scores["shuffled"].append([binding_scores(truth[j], rng.permutation(assign[t, j])) for t in range(T)])
            scores["recurrent_latent_to_image"].append([binding_scores(truth[j], from_maps[t, j]) for t in range(T)])
            scores["one_pass"].append(binding_scores(truth[j], fixed_assign[j]))

    def result(self) -> dict:
        return self.scores


def mean_scores(rows: list) -> dict:
    """[{metric: score}] -> {metric: mean over the rows, NaN (undefined) scores left out}."""
    return {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else None
            for k in rows[0]}


def binding_summary(binding: dict, levels: torch.Tensor, T: int, K: int) -> dict:
    """Mean scores per iteration (tokens t*K), over all images and per complexity level."""
    groups = {"all": np.arange(len(levels))} | {str(int(c)): np.flatnonzero(levels.numpy() == int(c))
                                                 for c in levels.unique()}
    summary = {}
    for name, group in groups.items():
        per_iteration = {key: {(t + 1) * K: mean_scores([binding[key][i][t] for i in group]) for t in range(T)}
                         for key in ("recurrent", "shuffled", "recurrent_latent_to_image")}
        summary[name] = {**per_iteration, "one_pass": {T * K: mean_scores([binding["one_pass"][i] for i in group])}}
    return summary


def analyse(binding: dict, levels: torch.Tensor, counts: list, out) -> dict:
    """The binding scores per token count and level, and binding.png."""
    summary = binding_summary(binding, levels, len(counts), counts[0])
    plot_binding(out / "binding.png", summary, counts)
    return {"binding": summary}
