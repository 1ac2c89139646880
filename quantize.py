"""Vector quantization: the one codebook lookup both tokenizers use.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393.

- The VQGAN (Esser et al. 2021) quantizes its 16x16 grid with a plain
  Euclidean nearest-code lookup (1024 codes x 256 dims at ImageNet scale).
- ALIT §2 ("We factorize and quantize the distilled latent tokens ... following
  Yu et al. 2021; 2024"): the 1D latent tokens are projected to a low-dimensional
  code space (12 dims; the projection lives in model.py) and looked up in an
  l2-normalised codebook (4096 codes), i.e. a cosine-similarity lookup.

The quantizer returns the straight-through codes, the indices, the VQ loss and
usage statistics for logging.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class Quantized:
    codes: torch.Tensor       # same shape as the input; forward = codebook row, backward = identity
    indices: torch.Tensor     # input shape without the last dim, int64
    loss: torch.Tensor        # scalar: commitment + codebook loss
    perplexity: torch.Tensor  # scalar, detached: exp(entropy of code usage in this batch)
    usage: torch.Tensor       # scalar, detached: fraction of the codebook used in this batch


def count_codes(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in `indices`, (codebook_size,) float32 on their device. Unlike
    torch.bincount, which must read the largest index first, it never waits for the GPU."""
    counts = torch.zeros(codebook_size, device=indices.device)
    return counts.index_add_(0, indices.flatten(), torch.ones(indices.numel(), device=indices.device))


def unused_codes(counts: torch.Tensor) -> torch.Tensor:
    """Indices of the codes counted zero times (a data-dependent size: the one sync of a restart)."""
    return (counts == 0).nonzero()[:, 0]


@contextlib.contextmanager
def exact_float32(device_type: str):
    """Autocast off and TF32 off: float32 products at full precision. distributed.setup_ranks lets
    float32 matmuls run as TF32 on Ampere+ GPUs (10 mantissa bits), enough to flip an argmin."""
    autocast = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else \
        contextlib.nullcontext()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, l2_normalize: bool = False):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.beta = beta  # weight of the commitment term (VQ-VAE, van den Oord et al. 2017)
        self.l2_normalize = l2_normalize
        # Named `embedding` so that official checkpoints (`quantize.embedding.weight`) load by name.
        self.embedding = nn.Embedding(codebook_size, code_dim)
        if l2_normalize:
            # Unit rows. Lookups only see directions, and Adam moves every weight by about lr a step
            # whatever its scale: rows of norm ~0.01 (the uniform init below) would turn by ~lr/0.01
            # radians a step, which scatters and collapses the codebook at the lrs a tiny model needs.
            nn.init.normal_(self.embedding.weight)
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        else:
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # Usage since the last dead-code restart and the latest inputs (training only; plain attributes,
        # not buffers, so that DDP does not overwrite them with rank 0's).
        self.counts_since_restart, self.recent_inputs = None, None
        # 1: the decoder receives the code (the paper's quantizer). Below 1 it receives
        # z + blend * (code - z): a training script can start from continuous latents and blend the
        # codes in, so that the decoder learns to read the latents before they are discrete.
        self.blend = 1.0

    def codebook(self) -> torch.Tensor:
        """(codebook_size, code_dim): the rows lookups return (unit rows when l2_normalize)."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> codes (..., code_dim), equal to `forward(z).codes` for those indices."""
        return F.embedding(indices, self.codebook())

    def forward(self, z: torch.Tensor) -> Quantized:
        # The search runs in exact float32 even under bf16 autocast or TF32: bf16 has 8 mantissa bits,
        # enough to flip the argmin between codes closer than ~1% of their norm.
        with exact_float32(z.device.type):
            z = z.float()
            if self.l2_normalize:
                z = F.normalize(z, dim=-1)
            codebook = self.codebook()
            flat = z.reshape(-1, self.code_dim)  # (M, d)
            # argmin_c ||z - e_c||^2 = argmin_c (||e_c||^2 - 2 z.e_c): one (M, codes) matrix from one product.
            distances = torch.addmm(codebook.square().sum(1), flat, codebook.t(), alpha=-2.0)  # (M, codes)
            indices = distances.argmin(dim=1)
            del distances
            chosen = F.embedding(indices, codebook).view_as(z)
            # Commitment pulls the encoder to its code, the codebook term pulls the code to the encoder.
            loss = self.beta * F.mse_loss(z, chosen.detach()) + F.mse_loss(chosen, z.detach())
            codes = z + self.blend * (chosen - z).detach()  # straight-through estimator
            counts = count_codes(indices, self.codebook_size)
            if self.training:
                since = self.counts_since_restart
                self.counts_since_restart = counts if since is None else since + counts
                self.recent_inputs = flat.detach()
            probs = counts / indices.numel()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        return Quantized(codes, indices.view(z.shape[:-1]), loss, perplexity.detach(), usage.detach())

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Move every code unused since the last call onto a random recent input vector.

        From scratch, most codes are never chosen after the first steps and never move again
        (codebook collapse: ~5% usage on `shapes`); restarting them on encoder outputs (as in
        Jukebox, Dhariwal et al. 2020) keeps the whole codebook in use. Returns how many moved.
        """
        if self.counts_since_restart is None:
            return 0
        dead = unused_codes(self.counts_since_restart)
        if len(dead):
            picks = torch.randint(len(self.recent_inputs), (len(dead),), device=self.recent_inputs.device)
            self.embedding.weight[dead] = self.recent_inputs[picks].to(self.embedding.weight.dtype)
        if dist.is_available() and dist.is_initialized():  # DDP: every rank takes rank 0's codebook
            dist.broadcast(self.embedding.weight.data, src=0)
        self.counts_since_restart = None
        return len(dead)

    def restart_state(self) -> dict:
        """What the next restart needs besides the weights: the usage counted since the last one. It
        is this rank's own (each rank counts its batches; rank 0's decide), so checkpoints keep one per
        rank. The inputs a restart draws from come from the step that restarts, so they need no saving."""
        counts = self.counts_since_restart
        return {"counts": None if counts is None else counts.cpu()}

    def load_restart_state(self, state: dict):
        counts = state["counts"]  # checkpoints load on the CPU: the counts go where the codebook is
        self.counts_since_restart = None if counts is None else counts.to(self.embedding.weight.device)
