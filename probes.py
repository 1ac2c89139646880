"""Measurements on a frozen tokenizer: linear probes of its tokens, its attention maps as segments,
and the standard errors of the differences the analyses claim.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.4 (linear probing of the encoder's
output, mean pooled) and Tab. 2 (each latent token's attention map, thresholded at its top X% as
DINO does, scored against the true segments). analyze.py runs them on a checkpoint.
"""
import contextlib
import itertools

import numpy as np
import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Linear probing (§A.4)

@contextlib.contextmanager
def encoder_outputs(model):
    """Collects the output of every pass of model.encoder while the block runs: one (B, L, D)
    tensor per iteration of the rollout, the sequence §A.4 mean pools."""
    outputs = []
    handle = model.encoder.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    try:
        yield outputs
    finally:
        handle.remove()


def pooled_blocks(outputs: list, num_image_tokens: int, tokens_per_iter: int) -> tuple:
    """Encoder outputs of the T iterations -> (image pool (T, B, D): the mean of the processed 2D image
    tokens; block pools (T, T, B, D): [t, k] the mean of latent tokens k*K..(k+1)*K at iteration t,
    zero where block k does not exist yet (k > t)). The mean of the first j*K latent tokens is the
    mean of the first j block pools, all blocks being K tokens."""
    N, K, T = num_image_tokens, tokens_per_iter, len(outputs)
    B, D = outputs[0].shape[0], outputs[0].shape[-1]
    image = torch.stack([x[:, 1:1 + N].float().mean(1) for x in outputs])
    blocks = torch.zeros(T, T, B, D)
    for t, x in enumerate(outputs):
        latents = x[:, 1 + N:].float()
        blocks[t, :t + 1] = latents.reshape(B, t + 1, K, D).mean(2).transpose(0, 1).cpu()
    return image.cpu(), blocks


def prefix_features(image: torch.Tensor, blocks: torch.Tensor, t: int, j: int, with_image: bool) -> torch.Tensor:
    """(B, D or 2D): the mean of the first j*K latent tokens at iteration t (0-based), beside the mean
    of the 2D image tokens when with_image (§A.4 pools both; concatenated so neither drowns the other)."""
    latents = blocks[t, :j].mean(0)
    return torch.cat([image[t], latents], dim=-1) if with_image else latents


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float = 1e-3,
                     steps: int = 100):
    """Multinomial logistic regression on standardized features by full-batch L-BFGS from zero weights:
    a convex problem, so the answer depends on no seed. Returns predict(features) -> (B,) classes."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = ((features - mean) / std).double()
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(x @ weight + bias, labels) + weight_decay * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    weight, bias = weight.detach(), bias.detach()
    return lambda test: (((test - mean) / std).double() @ weight + bias).argmax(-1)


def probe_correct(train_x, train_y, test_x, test_y, classes: int) -> torch.Tensor:
    """(test images,) bool: whether a probe fit on the training features classifies each test image."""
    return fit_linear_probe(train_x, train_y, classes)(test_x) == test_y


def class_balanced(targets: list, n: int) -> list:
    """The indices of n items spread evenly over the classes of `targets`: the first item of every
    class, then the second, ... (a class short of items leaves its share to the others), in order.
    §A.4 probes ImageNet-100's classes; the first n files would hold only the first classes."""
    by_class = {}
    for i, target in enumerate(targets):
        by_class.setdefault(target, []).append(i)
    rounds = itertools.zip_longest(*by_class.values())
    return sorted([i for row in rounds for i in row if i is not None][:n])


# -----------------------------------------------------------------------------
# Attention maps as segments (Tab. 2)

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


# -----------------------------------------------------------------------------
# Standard errors

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
