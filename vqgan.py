"""The 2D image tokenizer ALIT is built on: a VQGAN, written from scratch.

Paper: ALIT, arXiv:2411.02393, §2 "Latent Distillation of 2D Image Tokens to 1D
Tokens": a pre-trained VQGAN maps a 256x256 image to 16x16 spatial tokens, each
a pointer into its codebook; ALIT distils those 2D tokens into 1D tokens.

The architecture is the one the official ALIT code ships: the MaskGIT/MAGE
variant of the taming VQGAN (Esser et al. 2021), which differs from taming:
- no attention blocks and no quant_conv/post_quant_conv (attention at chosen
  resolutions is available here as an option, as in taming; off in the paper);
- 2x2 average-pool downsampling; nearest-neighbour x2 upsampling + 3x3 conv;
- num_res_blocks per decoder level (taming has one more);
- the residual-block shortcut quirk (see ResnetBlock);
- it reads and writes images in [0, 1] directly (no rescaling to [-1, 1]).

Its losses (L1, LPIPS, PatchGAN) live in losses.py and train_vqgan.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from convnet import Decoder, Encoder
from quantize import Quantized, VectorQuantizer
from weights import load_checkpoint, load_exact, read_weights, source_name


@dataclass
class VQGANConfig:
    image_size: int = 256  # images are image_size x image_size
    channels: int = 128  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 1, 2, 2, 4)  # one entry per resolution level; each level after the first halves H, W
    num_res_blocks: int = 2  # residual blocks per level, in the encoder and in the decoder
    latent_channels: int = 256  # dimension of the latent grid = dimension of a code (z_channels = embed_dim)
    codebook_size: int = 1024  # codes a 2D token can point to
    attn_resolutions: tuple = ()  # feature-map sizes that get a self-attention block (taming: (16,); MaskGIT: none)
    norm_groups: int = 32  # GroupNorm groups, every channel count must be a multiple of it
    beta: float = 0.25  # commitment weight of the quantizer
    # cosine lookup on unit codes (ViT-VQGAN, Yu et al. 2021); the official VQGAN is Euclidean
    l2_normalize: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    # Its 2D tokens are codebook indices: ALIT predicts a distribution over the codes (a logit each).
    discrete = True

    @property
    def prediction_size(self) -> int:
        return self.codebook_size

    def describe(self) -> str:
        """What ALIT's shapes depend on: the grid, the codes and their size."""
        return (f"{self.image_size}px -> {self.grid_size}x{self.grid_size}, {self.codebook_size} codes x "
                f"{self.latent_channels}")

    def __post_init__(self):
        self.channel_mult, self.attn_resolutions = tuple(self.channel_mult), tuple(self.attn_resolutions)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor "
                             f"{self.downsample}")
        for c in [self.channels * m for m in self.channel_mult]:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not a multiple of norm_groups {self.norm_groups}")


PRESETS = {
    # The checkpoint the paper builds on: 256x256 -> 16x16 tokens, 1024 codes x 256 dims.
    "imagenet": dict(image_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                     latent_channels=256, codebook_size=1024),
    # Two CPU cores: 32x32 images -> 8x8 tokens; trains to recognisable shapes in a few minutes.
    "tiny": dict(image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 latent_channels=32, codebook_size=256, norm_groups=8,
                 l2_normalize=True),  # from scratch, a Euclidean codebook collapses to ~5% usage here
}


class VQGAN(nn.Module):
    """Images (N, 3, H, W) in [0, 1] <-> a (N, g, g) grid of codebook indices, g = H / downsample."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.beta, cfg.l2_normalize)
        # Channels-last conv weights make every convolution run channels-last, the layout oneDNN (CPU)
        # and cuDNN (GPU) convolve fastest; distributed.conv_memory_format says where it pays.
        self.to(memory_format=torch.channels_last)

    def quantize_latents(self, latents: torch.Tensor) -> Quantized:
        """(N, C, g, g) continuous latents -> codes (N, C, g, g), indices (N, g*g) in row-major order."""
        q = self.quantize(latents.permute(0, 2, 3, 1))
        return Quantized(q.codes.permute(0, 3, 1, 2), q.indices.flatten(1), q.loss, q.perplexity, q.usage)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, g, g) code grid (quantized, or any soft mixture of codes) -> images, trained to lie in [0, 1]."""
        return self.decoder(latents)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, g*g) or (N, g, g) indices -> (N, C, g, g) code grid."""
        if indices.dim() == 2:  # row-major (N, g*g)
            g = math.isqrt(indices.shape[1])
            indices = indices.view(-1, g, g)
        return self.quantize.lookup(indices).permute(0, 3, 1, 2)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.codes_from_indices(indices))

    def forward(self, images: torch.Tensor):
        """Training pass (train_vqgan.py): -> (reconstructions, Quantized)."""
        q = self.quantize_latents(self.encoder(images))
        return self.decode(q.codes), q

    def latent_loss(self, q: Quantized, images, weight: float) -> tuple:
        """What train_vqgan.py adds to the reconstruction loss: the codebook and commitment terms times
        weight (--codebook-weight), and what it logs of them."""
        return weight * q.loss, {"vq": q.loss.detach(), "ppl": q.perplexity, "used": q.usage}

    # --- the base tokenizer's side of ALIT: what model.py asks of a VQGAN and of a vae.VAE alike -----
    # ALIT distils the 2D tokens into 1D ones, and its decoder predicts, for every grid cell, the
    # index of the cell's nearest code: a distribution over the codebook (logits).

    def tokens(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images -> the 2D tokens ALIT distils, (N, C, g, g): the encoder's latents before quantization
        (the official code's). `sample` is for bases with a posterior; a VQGAN's tokens are fixed."""
        return self.encoder(images)

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """2D tokens -> what ALIT's decoder predicts: each cell's nearest code, (N, g*g) indices."""
        return self.quantize_latents(tokens.detach()).indices

    def encode(self, images: torch.Tensor, sample: bool = False) -> tuple:
        """-> (tokens (N, C, g, g), targets (N, g*g))."""
        tokens = self.tokens(images, sample)
        return tokens, self.targets(tokens)

    @property
    def prediction_size(self) -> int:
        """The numbers ALIT's decoder head gives a cell: a logit per code."""
        return self.config.prediction_size

    def expected_codes(self, prediction: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ codebook, (N, g*g, C): the expected code at every cell. The official code
        reads the codebook through `.data`, so no stage trains it through this product: detached."""
        return prediction.float().softmax(-1) @ self.quantize.codebook().detach()

    def decode_prediction(self, prediction: torch.Tensor, config=None, hard: bool = False) -> torch.Tensor:
        """ALIT's prediction (N, g*g, codes) -> images: each cell's expected code through the decoder,
        not re-quantized (the pixels stage 2 trains on); hard=True: the most likely codes instead
        (what stage 1's cross-entropy aims at)."""
        if hard:
            return self.decode_indices(prediction.argmax(-1))
        g = self.config.grid_size
        return self.decode(self.expected_codes(prediction).view(len(prediction), g, g, -1).permute(0, 3, 1, 2))

    def halts(self, prediction, targets, config, generator=None) -> torch.Tensor:
        """Dynamic halting's test (§2, the Mask of T -> T+1), (N, g*g) bool: p, the predicted probability
        of the cell's true code; at p >= config.halting_threshold (0.55: official code, not in the
        paper) the cell halts with probability p."""
        p = prediction.detach().float().softmax(-1).gather(-1, targets[..., None])[..., 0]  # (N, g*g)
        return (p >= config.halting_threshold) & (torch.rand(p.shape, generator=generator, device=p.device) < p)

    def token_loss(self, prediction, targets, label_smoothing: float = 0.0, code_weight: float = 1.0) -> tuple:
        """Stage 1's loss at one iteration (§A.5): (the cross-entropy against the true indices, which the
        caller weights per iteration; code_weight x the MSE of the expected code against the true code,
        unweighted (official code, not in the paper); [CE, token accuracy] to log)."""
        logits = prediction.float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=label_smoothing)
        code = F.mse_loss(self.expected_codes(logits), self.quantize.lookup(targets).float())
        accuracy = self.correct_cells(logits, targets).float().mean()
        return ce, code_weight * code, torch.stack([ce.detach(), accuracy])

    token_loss_names = ("ce", "acc")  # how a training log names token_loss's two figures

    def correct_cells(self, prediction, targets, config=None) -> torch.Tensor:
        """(N, g*g) bool: the cells whose most likely code is the true one."""
        return prediction.argmax(-1) == targets

    # The token-space criterion (§A.2's selection without decoding pixels): token accuracy.
    token_score_name, higher_score_is_better = "token_acc", True

    def token_score(self, prediction, targets) -> torch.Tensor:
        """(N,) the fraction of cells whose true code is the most likely one."""
        return self.correct_cells(prediction, targets).float().mean(1)

    def code_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokenizer's own code grid of its 2D tokens, (N, C, g, g): their nearest codes."""
        return self.quantize_latents(tokens).codes

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokenizer alone: its 2D tokens quantized and decoded, images (N, 3, H, W)."""
        return self.decode(self.code_grid(tokens))

    @classmethod
    def from_official(cls, path_or_state_dict, image_size: int | None = None) -> "VQGAN":
        """Load the VQGAN checkpoint the official ALIT code uses (MaskGIT/MAGE layout).

        Stored directly or under 'state_dict'; the architecture is read off its keys and shapes.
        """
        state = read_weights(path_or_state_dict)
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model = cls(official_config(state, image_size, source_name(path_or_state_dict)))
        load_exact(model, state, source_name(path_or_state_dict))
        return model

    @classmethod
    def from_checkpoint(cls, path) -> "VQGAN":
        """A VQGAN trained by train_vqgan.py: its checkpoint's config and weights."""
        ckpt = load_checkpoint(path)
        if "model_config" not in ckpt or "discriminator" not in ckpt:
            raise ValueError(f"{path} is not a train_vqgan.py checkpoint (the official VQGAN loads with "
                             "VQGAN.from_official, --vqgan-official)")
        if ckpt.get("train_config", {}).get("base") == "vae":
            raise ValueError(f"{path} holds a VAE (train_vqgan.py --base vae): vae.VAE.from_checkpoint reads it")
        model = cls(VQGANConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model


def official_config(state: dict, image_size: int | None = None, where: str = "state dict") -> VQGANConfig:
    """The VQGANConfig of an official state dict. The image size is not stored; the official code
    pairs this VQGAN with a 16x16 token grid, so it defaults to 16 x the downsampling factor (any
    size works: the network is fully convolutional)."""
    try:
        channels = state["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
        codebook_size, latent_channels = state["quantize.embedding.weight"].shape
        mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // channels for i in levels)
    except KeyError as missing:
        raise KeyError(f"{where}: not an official VQGAN checkpoint, it lacks {missing}") from None
    return VQGANConfig(image_size=image_size or 16 * 2 ** (len(mult) - 1), channels=channels, channel_mult=mult,
                       num_res_blocks=len(blocks), latent_channels=latent_channels, codebook_size=codebook_size)
