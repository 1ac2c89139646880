"""FID exactly as pytorch-fid computes it: the number published tokenizers report (rFID, Table 1).

Paper: ALIT, arXiv:2411.02393, Table 1 reports reconstruction FID at 32 ... 256 tokens. This
file is pytorch-fid's inception.py + fid_score.py: the FID variant of InceptionV3 (pool3,
2048-d features) with its `from_pytorch_fid` loader, feature statistics that sum across DDP
ranks, and the Fréchet distance between two Gaussians. (Fig. 7's FID uses VGG16 features
according to the paper's text; that variant is not here.)
"""
import warnings

import numpy as np
import scipy
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from weights import load_exact, read_weights, source_name

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
        theirs = read_weights(path_or_state_dict)
        # The file is torchvision's Inception3 with a 1008-way classifier (fc), which pool3
        # features never reach; num_batches_tracked only counts training steps and may or may
        # not be stored, so ours stand in for it.
        theirs = {k: v for k, v in theirs.items()
                  if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        model = cls()
        theirs.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
        load_exact(model, theirs, source_name(path_or_state_dict))
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

    def all_reduce_(self, device=None):
        """Sum the statistics of all DDP ranks in place (no-op without torch.distributed). A rank that
        saw no images takes part with zeros (on `device`, where the backend needs its tensors)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        on = self.sum.device if self.sum is not None else device
        d = torch.tensor([0 if self.sum is None else self.sum.numel()], device=on)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        d = int(d.item())
        if self.sum is None:
            self.sum, self.sum_outer = torch.zeros(d, dtype=torch.float64, device=on), torch.zeros(
                d, d, dtype=torch.float64, device=on)
        # one float64 buffer, one collective; counts stay exact in float64 up to 2^53
        packed = torch.cat([self.sum.new_tensor([self.count]), self.sum, self.sum_outer.flatten()])
        dist.all_reduce(packed)
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
