"""Evaluation: the paper's measurements of reconstructions per token count.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393.

The paper judges a tokenizer by how well each token count reconstructs the
image: reconstruction FID (rFID, Table 1) and L1 loss (Fig. 2) at 32 ... 256
tokens, and the token-selection-criterion plots (Fig. 7) that pick a token
count per image by thresholding the reconstruction loss.

This first part is FID exactly as pytorch-fid computes it, because that is the
number published tokenizers report: the FID variant of InceptionV3 (pool3,
2048-d features), running feature statistics that can be summed across DDP
ranks, and the Fréchet distance between two Gaussians. (Fig. 7's FID uses
VGG16 features according to the paper's text; that variant is not here.)
"""
import argparse
import csv
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import scipy.stats
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from PIL import Image, ImageDraw
from tqdm import tqdm

from data import build_dataset, save_image_grid
from model import ALIT
from vqgan import copy_state_dict, load_state_dict, source_name

# -----------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid's network, torchvision's Inception3 key names)


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        # no conv bias: the BatchNorm shift plays its role
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        # eps 0.001 is TF's BatchNorm default, which the ported weights were trained with
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def fid_avg_pool(x):
    # pytorch-fid patch: TF's Inception graph averages only over the real pixels at
    # the border (count_include_pad=False); torchvision counts the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(fid_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a); same as torchvision."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """Factorized 7x7 convolutions (1x7 then 7x1) on the 17x17 grid."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(fid_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a); same as torchvision."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """The 8x8 blocks, whose 3x3 branches split into parallel 1x3 and 3x1 convolutions."""

    def __init__(self, in_channels, pool):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        if self.pool == "avg":
            pooled = fid_avg_pool(x)
        else:
            # pytorch-fid patch: the TF graph's last block (Mixed_7c) max-pools here,
            # likely a slip in that graph (the Inception paper averages), but every
            # published FID was computed with it.
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


class InceptionV3(nn.Module):
    """The FID variant of InceptionV3 used by pytorch-fid (pool3, 2048-d).

    pytorch-fid ports the TF Inception graph of the original FID code
    (2015-12-05) so that its numbers match TF's; every deviation from
    torchvision's Inception3 is marked "pytorch-fid patch". Only the path to
    the pool3 features is built: no classifier, no auxiliary head.
    """

    image_size = 299  # the resolution the TF graph resizes every input to
    feature_dim = 2048

    def __init__(self):
        super().__init__()
        # block 0: 299 -> 73
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        # block 1: 73 -> 35
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        # block 2: 35 -> 17
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        # block 3: 17 -> 8 -> pool3
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, images, autocast_dtype=None):
        """(N, 3, H, W) in [0, 1], any H, W -> (N, 2048) float32 pool3 features.

        autocast_dtype (e.g. torch.bfloat16) is for speed benchmarks only: published
        FIDs are float32 numbers, so the default stays float32.
        """
        # plain bilinear without antialiasing, even when shrinking: that is what
        # pytorch-fid does, and antialiasing would visibly move the features
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=False)
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            x = self.Conv2d_1a_3x3(x)
            x = self.Conv2d_2a_3x3(x)
            x = self.Conv2d_2b_3x3(x)
            x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
            x = self.Conv2d_3b_1x1(x)
            x = self.Conv2d_4a_3x3(x)
            x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                          self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                          self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
                x = block(x)  # ends at (N, 2048, 8, 8)
            x = F.adaptive_avg_pool2d(x, 1)  # pool3
        return x.flatten(1).float()  # (N, 2048)

    @classmethod
    def from_pytorch_fid(cls, path_or_state_dict):
        """Load pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its state dict)."""
        theirs = load_state_dict(path_or_state_dict)
        # The file is torchvision's Inception3 with a 1008-way classifier (fc), which pool3
        # features never reach; num_batches_tracked only counts training steps and may or may
        # not be stored, so ours stand in for it.
        theirs = {k: v for k, v in theirs.items()
                  if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        model = cls()
        theirs.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
        copy_state_dict(model, theirs, source_name(path_or_state_dict))
        # a fixed feature extractor: eval() for the running BatchNorm statistics,
        # no grads so calling it outside no_grad does not build a graph
        return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Feature statistics and the Fréchet distance


class FeatureStats:
    """Mean and covariance of features, accumulated as float64 sums.

    Memory stays (d, d) however many images are seen, and sums add across DDP
    ranks. The raw second moment is precise enough for Inception features (means
    of order their spread); float64 keeps the n*mu*mu^T subtraction exact to ~1e-12.
    """

    def __init__(self):
        self.count = 0
        self.sum = None        # (d,) float64, on the device of the first features
        self.sum_outer = None  # (d, d) float64: sum of x x^T

    def update(self, features):
        features = features.detach().to(torch.float64)  # (n, d)
        if self.sum is None:
            d = features.shape[1]
            self.sum = features.new_zeros(d)
            self.sum_outer = features.new_zeros(d, d)
        self.count += features.shape[0]
        self.sum += features.sum(dim=0)
        self.sum_outer += features.T @ features

    def all_reduce_(self):
        """Sum the statistics of all DDP ranks in place (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        assert self.sum is not None, "every rank must update() before all_reduce_()"
        # one float64 buffer, one collective; counts stay exact in float64 up to 2^53
        packed = torch.cat([self.sum.new_tensor([self.count]), self.sum, self.sum_outer.flatten()])
        dist.all_reduce(packed)
        d = self.sum.numel()
        self.count = int(packed[0].item())
        self.sum = packed[1:1 + d]
        self.sum_outer = packed[1 + d:].view(d, d)
        return self

    def mean_cov(self):
        """(mu, sigma) as float64 numpy arrays; sigma divides by n - 1 like np.cov(rowvar=False)."""
        assert self.count >= 2, f"a covariance needs at least 2 samples, got {self.count}"
        n = self.count
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# scipy >= 1.16 deprecates sqrtm's disp argument (and always returns just the root);
# older scipy needs disp=False not to print, and then returns (root, error estimate)
_SQRTM_HAS_DISP = tuple(int(part) for part in scipy.__version__.split(".")[:2]) < (1, 16)


def _sqrtm(matrix):
    with warnings.catch_warnings():
        # singular products are expected below 2048 images; pytorch-fid's disp=False
        # silences scipy too, and the finiteness check in frechet_distance is the guard
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        if _SQRTM_HAS_DISP:
            root, _ = scipy.linalg.sqrtm(matrix, disp=False)
            return root
        return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)): pytorch-fid's calculate_frechet_distance."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    assert mu1.shape == mu2.shape, f"means differ in shape: {mu1.shape} vs {mu2.shape}"
    assert sigma1.shape == sigma2.shape, f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}"
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of a singular covariance product is not finite; "
                      f"adding {eps} to the diagonals")
        offset = eps * np.eye(sigma1.shape[0])
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # S1 S2 has nonnegative eigenvalues in exact arithmetic, so its root is real; rounding
    # can leave tiny imaginary parts, a large one means the inputs are not covariances
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm(S1 S2) has imaginary component {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a, b):
    """FID between two FeatureStats (e.g. real images and reconstructions)."""
    n, dim = min(a.count, b.count), a.sum.numel()
    if n <= dim:
        # n samples give a covariance of rank <= n - 1, so sqrtm works on a singular
        # product and FID is biased upward; published numbers use 50k images
        warnings.warn(f"FID from {n} images: covariance rank-deficient, not comparable to published numbers")
    mu1, sigma1 = a.mean_cov()
    mu2, sigma2 = b.mean_cov()
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# -----------------------------------------------------------------------------
# Token-selection criteria (§A.2 "Representational capacity depends on downstream task").
# A criterion says, per image, whether a reconstruction is good enough; the adaptive encoding
# gives each image the fewest tokens that pass. Users can plug in their own (the paper also
# uses classification and depth error, which need models that cannot be downloaded here).

def l1_below(threshold: float):
    """Pixel criterion, the paper's self-supervised one: mean |x - x̂| < threshold (0.07 in the
    official code's encode)."""
    def criterion(images, reconstructions):  # (B, 3, H, W) each -> (B,) bool
        return (reconstructions.float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)) < threshold
    criterion.__name__ = f"l1<{threshold:g}"
    return criterion


def token_accuracy_above(threshold: float):
    """Token-space criterion (needs no pixel decoding): the fraction of 2D tokens whose VQGAN
    index the decoder predicts correctly is at least `threshold`."""
    def criterion(gt_indices, logits):  # (B, N), (B, N, codes) -> (B,) bool
        return (logits.argmax(-1) == gt_indices).float().mean(1) >= threshold
    criterion.__name__ = f"token_acc>={threshold:g}"
    return criterion


def code_error_below(threshold: float, codebook: torch.Tensor):
    """Token-space criterion on a continuous scale: the mean squared distance between the
    decoder's expected code (softmax(logits) @ codebook, what the VQGAN decoder would receive) and
    the true code is below `threshold`. codebook: (codes, C), e.g. model.vqgan.quantize.codebook()."""
    def criterion(gt_indices, logits):
        expected = logits.float().softmax(-1) @ codebook
        return (expected - codebook[gt_indices]).square().mean(dim=(1, 2)) < threshold
    criterion.__name__ = f"code_mse<{threshold:g}"
    return criterion


def first_passing(passes: torch.Tensor) -> torch.Tensor:
    """(T, B) bool -> (B,) index of the first iteration that passes, T - 1 if none does."""
    T = passes.shape[0]
    order = torch.where(passes, torch.arange(T)[:, None], T - 1)
    return order.min(0).values


# -----------------------------------------------------------------------------
# The evaluation run: every token count, adaptive allocation, complexity

PROTOCOLS = {
    "crop": "the paper's code: center crop to the model size, no resizing",
    "resize": "TiTok: resize the shorter side to the model size, then center crop",
}


@dataclass
class EvalConfig:
    ckpt: str = "out/stage2/ckpt.pt"  # a train_stage1.py / train_stage2.py checkpoint ...
    official: str | None = None  # ... or an official ALIT checkpoint (ALIT.from_official)
    heads: str | None = None  # official checkpoints of non-preset sizes: "8" or "8,8" (encoder, decoder)
    use_ema: bool = True  # evaluate the EMA weights of our checkpoints
    dataset: str = "shapes"
    data_dir: str | None = None
    split: str = "val"
    num_images: int | None = None  # default: the whole split (shapes: 1000)
    protocol: str = "crop"
    batch_size: int = 50
    inception_weights: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    thresholds: str = "0.03,0.05,0.07,0.1,0.15"  # L1 thresholds of the adaptive allocation sweep (Fig. 7)
    token_thresholds: str = "0.3,0.5,0.7,0.8,0.9"  # token-accuracy thresholds of the cheaper criterion
    default_threshold: float = 0.07  # the official encode's L1 threshold
    halting: bool = False  # the official code halts in eval too, which makes reconstructions random
    grid_images: int = 8
    speed_images: int = 64  # images timed for early exit vs running every iteration
    out_dir: str = "out/eval"
    device: str = "auto"
    seed: int = 0


def load_model(cfg: EvalConfig, device) -> ALIT:
    if cfg.official:
        heads = None if cfg.heads is None else tuple(int(h) for h in cfg.heads.split(","))
        heads = heads[0] if heads and len(heads) == 1 else heads
        return ALIT.from_official(cfg.official, heads=heads).to(device).eval()
    from train_stage1 import load_alit
    if not Path(cfg.ckpt).is_file():
        sys.exit(f"error: --ckpt {cfg.ckpt} not found (train it, or pass --official PATH)")
    return load_alit(cfg.ckpt, use_ema=cfg.use_ema, device=device)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


@torch.no_grad()
def evaluate(model: ALIT, loader, cfg: EvalConfig, inception=None, device="cpu"):
    """One pass over the data: every token count, the base VQGAN, and the inputs of every criterion.

    Returns per-image arrays (all (T, n) over token counts) and the FID statistics.
    """
    T = model.config.rollout_iters
    thresholds = [float(t) for t in cfg.thresholds.split(",")]
    per_image = {"l1": [], "mse": [], "token_acc": [], "vqgan_l1": [], "vqgan_mse": [], "target": []}
    stats = {"real": FeatureStats(), "vqgan": FeatureStats(),
             **{f"tokens_{(t + 1) * model.config.tokens_per_iter}": FeatureStats() for t in range(T)},
             **{f"l1<{thr:g}": FeatureStats() for thr in thresholds}} if inception else None
    keep = None  # the first batch, for the Fig. 2 grid
    generator = torch.Generator(device).manual_seed(cfg.seed)
    for images, targets in tqdm(loader, desc="evaluate", dynamic_ncols=True):
        images = images.to(device)
        _, gt_indices = model.vqgan.encode(images)
        records = model.rollout(images, halting=cfg.halting, generator=generator)
        recon = torch.stack([r.recon.float().clamp(0, 1) for r in records])  # (T, B, 3, H, W)
        vqgan_recon = model.vqgan(images)[0].float().clamp(0, 1)
        l1 = (recon - images).abs().mean(dim=(2, 3, 4))  # (T, B)
        mse = (recon - images).square().mean(dim=(2, 3, 4))
        per_image["l1"].append(l1.cpu())
        per_image["mse"].append(mse.cpu())
        per_image["token_acc"].append(torch.stack([(r.logits.argmax(-1) == gt_indices).float().mean(1)
                                                   for r in records]).cpu())
        per_image["vqgan_l1"].append((vqgan_recon - images).abs().mean(dim=(1, 2, 3)).cpu())
        per_image["vqgan_mse"].append((vqgan_recon - images).square().mean(dim=(1, 2, 3)).cpu())
        per_image["target"].append(targets)
        if keep is None:
            keep = (images.cpu(), recon.cpu(), targets)
        if inception is not None:
            B = len(images)
            stats["real"].update(inception(images))
            stats["vqgan"].update(inception(vqgan_recon))
            features = inception(recon.flatten(0, 1)).view(T, B, -1)
            for t in range(T):
                stats[f"tokens_{(t + 1) * model.config.tokens_per_iter}"].update(features[t])
            for thr in thresholds:  # the allocation's reconstructions reuse the features above
                chosen = first_passing(l1.cpu() < thr).to(features.device)
                stats[f"l1<{thr:g}"].update(features[chosen, torch.arange(B)])
    per_image = {k: torch.cat(v, dim=-1) for k, v in per_image.items()}
    return per_image, stats, keep


def allocation_summary(chosen: torch.Tensor, per_image: dict, model: ALIT) -> dict:
    """Token counts chosen per image -> histogram, dataset representation and quality there."""
    K, T = model.config.tokens_per_iter, model.config.rollout_iters
    tokens = (chosen + 1) * K
    n = len(chosen)
    pick = (chosen, torch.arange(n))
    return {
        "mean_tokens": tokens.float().mean().item(),
        # §A.2: the dataset's cumulative token count as a fraction of the maximum
        "dataset_representation": tokens.sum().item() / (n * T * K),
        "histogram": {int((t + 1) * K): int((chosen == t).sum()) for t in range(T)},
        "l1": per_image["l1"][pick].mean().item(),
        "psnr": psnr(per_image["mse"][pick]).mean().item(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate ALIT: L1, PSNR and rFID at every token count, "
                                                 "adaptive token allocation, complexity analysis.")
    from train_vqgan import add_dataclass_flags, check_flags, dataclass_overrides, setup_distributed
    add_dataclass_flags(parser, EvalConfig)
    cfg = EvalConfig(**dataclass_overrides(parser.parse_args(argv), EvalConfig))
    check_flags([(cfg.protocol in PROTOCOLS, f"--protocol must be one of {sorted(PROTOCOLS)}"),
                 (cfg.batch_size > 0, "--batch-size must be positive"),
                 (0 < cfg.default_threshold, "--default-threshold must be positive")])
    device = setup_distributed(cfg.device).device
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg, device)
    mc = model.config
    K, T = mc.tokens_per_iter, mc.rollout_iters
    counts = [(t + 1) * K for t in range(T)]
    print(f"protocol {cfg.protocol!r}: {PROTOCOLS[cfg.protocol]}")
    dataset = build_dataset(cfg.dataset, cfg.split, mc.image_size, cfg.data_dir, train=False,
                            eval_protocol="resize" if cfg.protocol == "resize" else "crop", num_images=cfg.num_images)
    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, shuffle=False)
    inception = None
    if cfg.inception_weights:
        inception = InceptionV3.from_pytorch_fid(cfg.inception_weights).to(device)
    else:
        print("no --inception-weights given: reporting everything but FID")

    per_image, stats, keep = evaluate(model, loader, cfg, inception, device)
    n = per_image["l1"].shape[1]
    fid = (lambda name: fid_from_stats(stats["real"], stats[name])) if inception else (lambda name: None)

    # 1. Every token count (Table 1, Fig. 2).
    rows = [{"tokens": c, "l1": per_image["l1"][t].mean().item(), "mse": per_image["mse"][t].mean().item(),
             "psnr": psnr(per_image["mse"][t]).mean().item(), "token_accuracy": per_image["token_acc"][t].mean().item(),
             "rfid": fid(f"tokens_{c}")} for t, c in enumerate(counts)]
    vqgan_row = {"tokens": mc.num_image_tokens, "l1": per_image["vqgan_l1"].mean().item(),
                 "mse": per_image["vqgan_mse"].mean().item(), "psnr": psnr(per_image["vqgan_mse"]).mean().item(),
                 "rfid": fid("vqgan")}

    # 2. Adaptive allocation, pixel criterion (Fig. 7): per image, the fewest tokens with L1 < threshold.
    thresholds = [float(v) for v in cfg.thresholds.split(",")]
    sweep = []
    for thr in thresholds:
        chosen = first_passing(per_image["l1"] < thr)
        sweep.append({"criterion": f"l1<{thr:g}", "threshold": thr, **allocation_summary(chosen, per_image, model),
                      "rfid": fid(f"l1<{thr:g}")})
    # The cheaper token-space criterion, side by side: its choices vs the pixel criterion's at the
    # default threshold, matched by the token threshold whose mean token count is closest.
    pixel_choice = first_passing(per_image["l1"] < cfg.default_threshold)
    token_sweep = []
    for thr in [float(v) for v in cfg.token_thresholds.split(",")]:
        chosen = first_passing(per_image["token_acc"] >= thr)
        token_sweep.append({"criterion": f"token_acc>={thr:g}", "threshold": thr,
                            **allocation_summary(chosen, per_image, model),
                            "same_count_as_pixel_default": (chosen == pixel_choice).float().mean().item()})
    pixel_default = allocation_summary(pixel_choice, per_image, model)
    matched = min(token_sweep, key=lambda r: abs(r["mean_tokens"] - pixel_default["mean_tokens"]))

    # 3. Early exit: the batched adaptive encode against running every iteration for every image.
    speed = time_early_exit(model, dataset, cfg, matched["threshold"], device)

    # 4. Complexity (§3): does a more complex image get more tokens?
    complexity = None
    if cfg.dataset == "shapes":
        level = per_image["target"]
        varies = len(level.unique()) > 1 and len(pixel_choice.unique()) > 1  # else Spearman is undefined
        complexity = {
            "spearman_complexity_vs_tokens":
                float(scipy.stats.spearmanr(level.numpy(), pixel_choice.numpy())[0]) if varies else None,
            "threshold": cfg.default_threshold,
            "mean_tokens_per_level": {int(c): ((pixel_choice[level == c] + 1) * K).float().mean().item()
                                      for c in level.unique()},
            "l1_per_level_per_tokens": {int(c): {counts[t]: per_image["l1"][t][level == c].mean().item()
                                                 for t in range(T)} for c in level.unique()},
        }

    results = {"protocol": cfg.protocol, "images": n, "dataset": cfg.dataset, "checkpoint": cfg.official or cfg.ckpt,
               "halting": cfg.halting, "per_token_count": rows, "vqgan": vqgan_row,
               "adaptive_l1": sweep, "adaptive_token_accuracy": token_sweep,
               "pixel_vs_token_criterion": {"pixel": f"l1<{cfg.default_threshold:g}", **pixel_default,
                                            "token": matched["criterion"],
                                            "token_mean_tokens": matched["mean_tokens"],
                                            "same_count": matched["same_count_as_pixel_default"]},
               "early_exit": speed, "complexity": complexity}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_sweep_csv(out / "adaptive_sweep.csv", sweep + token_sweep)
    plot_sweep(out / "adaptive_sweep.png", sweep, inception is not None)
    save_fig2_grid(keep, per_image, out / "reconstructions.png", cfg.grid_images, cfg.dataset == "shapes")
    print(markdown_report(results))
    print(f"wrote {out / 'metrics.json'}, {out / 'adaptive_sweep.csv'}, {out / 'adaptive_sweep.png'}, "
          f"{out / 'reconstructions.png'}")
    return results


def time_early_exit(model: ALIT, dataset, cfg: EvalConfig, token_threshold: float, device) -> dict:
    """Seconds to encode `speed_images` images adaptively (pixel and token criterion, early exit)
    against running every iteration and decoding every reconstruction for every image (what the
    official encode does), and whether early exit picks the same counts as the exhaustive search."""
    n = min(cfg.speed_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    pixel, token = l1_below(cfg.default_threshold), token_accuracy_above(token_threshold)

    def exhaustive():
        records = model.rollout(images)
        return first_passing(torch.stack([pixel(images, r.recon) for r in records]).cpu())

    with torch.no_grad():
        exhaustive()  # warm-up
        timings, results = {}, {}
        for name, run in [("every_iteration", exhaustive),
                          ("early_exit_pixel", lambda: model.encode_adaptive(images, pixel)),
                          ("early_exit_token", lambda: model.encode_adaptive(images, token, token_space=True))]:
            start = time.perf_counter()
            results[name] = run()
            timings[name] = time.perf_counter() - start
    exhaustive_tokens = (results["every_iteration"] + 1) * model.config.tokens_per_iter
    early_tokens = torch.tensor([c.num_tokens for c in results["early_exit_pixel"]])
    return {"images": n, "seconds": timings,
            "speedup_pixel": timings["every_iteration"] / timings["early_exit_pixel"],
            "speedup_token": timings["every_iteration"] / timings["early_exit_token"],
            "same_counts_as_exhaustive": (early_tokens == exhaustive_tokens).float().mean().item(),
            "mean_tokens_pixel": early_tokens.float().mean().item(),
            "mean_tokens_token": sum(c.num_tokens for c in results["early_exit_token"]) / n}


def write_sweep_csv(path, rows):
    fields = ["criterion", "threshold", "mean_tokens", "dataset_representation", "l1", "psnr", "rfid"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(path, sweep, with_fid: bool, size=(360, 280)):
    """Fig. 7 with PIL: dataset representation (x) against L1 (and rFID) of the allocation."""
    panels = [("l1", "L1")] + ([("rfid", "rFID")] if with_fid else [])
    width, height = size
    canvas = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = 52, 16, 28, 40
    for p, (key, label) in enumerate(panels):
        x0 = p * width
        xs = [r["dataset_representation"] for r in sweep]
        ys = [r[key] for r in sweep]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-9

        def to_px(x, y):
            return (x0 + left + x * (width - left - right),
                    top + (1 - (y - lo) / (hi - lo)) * (height - top - bottom))

        draw.rectangle([x0 + left, top, x0 + width - right, height - bottom], outline="black")
        for tick in (0, 0.25, 0.5, 0.75, 1.0):
            px, _ = to_px(tick, lo)
            draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
            draw.text((px - 10, height - bottom + 6), f"{tick:.2f}", fill="black")
        for value in (lo, hi):
            _, py = to_px(0, value)
            draw.text((x0 + 4, py - 6), f"{value:.3g}", fill="black")
        points = sorted(to_px(x, y) for x, y in zip(xs, ys))
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        for (px, py), r in zip([to_px(x, y) for x, y in zip(xs, ys)], sweep):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(214, 39, 40))
            draw.text((px + 4, py - 12), f"{r['threshold']:g}", fill="gray")
        draw.text((x0 + left, 8), f"{label} vs dataset representation (L1 threshold labels)", fill="black")
        draw.text((x0 + width // 2 - 60, height - 16), "fraction of max tokens", fill="black")
    canvas.save(path)


def save_fig2_grid(keep, per_image, path, rows: int, by_complexity: bool):
    """Fig. 2: rows are images from simple to complex (by recorded complexity on `shapes`, else by
    the L1 at the fewest tokens), columns are the token counts, then the original."""
    images, recon, targets = keep
    difficulty = targets.float() if by_complexity else per_image["l1"][0, :len(images)]
    # spread the rows over the range of difficulty: sort, then take evenly spaced images
    order = difficulty.argsort(stable=True)
    order = order[torch.linspace(0, len(order) - 1, min(rows, len(order))).round().long()]
    columns = [recon[t, order] for t in range(recon.shape[0])] + [images[order]]
    save_image_grid(torch.stack(columns, dim=1).flatten(0, 1), path, nrow=len(columns))


def markdown_report(r: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"## {r['dataset']} {r['images']} images, protocol {r['protocol']}, {r['checkpoint']}", "",
             "| tokens | L1 | PSNR | token acc. | rFID |", "| ---: | ---: | ---: | ---: | ---: |"]
    for row in r["per_token_count"]:
        lines.append(f"| {row['tokens']} | {row['l1']:.4f} | {row['psnr']:.2f} | {row['token_accuracy']:.3f} | "
                     f"{num(row['rfid'], '.2f')} |")
    v = r["vqgan"]
    lines.append(f"| VQGAN ({v['tokens']} 2D) | {v['l1']:.4f} | {v['psnr']:.2f} | - | {num(v['rfid'], '.2f')} |")
    lines += ["", "| adaptive criterion | mean tokens | dataset repr. | L1 | PSNR | rFID |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["adaptive_l1"] + r["adaptive_token_accuracy"]:
        lines.append(f"| {row['criterion']} | {row['mean_tokens']:.1f} | {row['dataset_representation']:.3f} | "
                     f"{row['l1']:.4f} | {row['psnr']:.2f} | {num(row.get('rfid'), '.2f')} |")
    c, s = r["pixel_vs_token_criterion"], r["early_exit"]
    lines += ["", f"{c['pixel']} (mean {c['mean_tokens']:.1f} tokens) vs {c['token']} (mean "
              f"{c['token_mean_tokens']:.1f}): same token count for {100 * c['same_count']:.0f}% of images",
              f"early exit on {s['images']} images: pixel criterion {s['speedup_pixel']:.2f}x, token criterion "
              f"{s['speedup_token']:.2f}x faster than running every iteration; same counts as the exhaustive "
              f"search for {100 * s['same_counts_as_exhaustive']:.0f}% of images"]
    if r["complexity"]:
        cx = r["complexity"]
        counts = list(next(iter(cx["l1_per_level_per_tokens"].values())))
        lines += ["", "| complexity level | " + " | ".join(f"L1 @ {c}" for c in counts) + " |",
                  "| ---: |" + " ---: |" * len(counts)]
        for level, row in cx["l1_per_level_per_tokens"].items():
            lines.append(f"| {level} | " + " | ".join(f"{row[c]:.4f}" for c in counts) + " |")
        lines.append("")
        rho = cx["spearman_complexity_vs_tokens"]
        lines.append(f"complexity vs chosen tokens (l1<{cx['threshold']:g}): Spearman "
                     f"{'undefined (one count for all)' if rho is None else format(rho, '.3f')}; mean tokens per level "
                     + ", ".join(f"{k}: {v:.1f}" for k, v in cx["mean_tokens_per_level"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
