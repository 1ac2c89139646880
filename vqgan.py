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
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import Quantized, VectorQuantizer
from weights import load_checkpoint, load_exact, read_weights, source_name


@dataclass
class VQGANConfig:
    image_size: Annotated[int, ">= 1"] = 256  # images are image_size x image_size
    channels: Annotated[int, ">= 1"] = 128  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: Annotated[tuple, "list of int >= 1"] = (1, 1, 2, 2, 4)  # one entry per resolution level; each level after the first halves H, W
    num_res_blocks: Annotated[int, ">= 1"] = 2  # residual blocks per level, in the encoder and in the decoder
    latent_channels: Annotated[int, ">= 1"] = 256  # dimension of the latent grid = dimension of a code (z_channels = embed_dim)
    codebook_size: Annotated[int, ">= 2"] = 1024  # codes a 2D token can point to
    attn_resolutions: Annotated[tuple, "list of int >= 1, or empty"] = ()  # feature-map sizes that get a self-attention block (taming: (16,); MaskGIT: none)
    norm_groups: Annotated[int, ">= 1"] = 32  # GroupNorm groups, every channel count must be a multiple of it
    beta: Annotated[float, ">= 0"] = 0.25  # commitment weight of the quantizer
    l2_normalize: bool = False  # cosine lookup on unit codes (ViT-VQGAN, Yu et al. 2021); the official VQGAN is Euclidean

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def __post_init__(self):
        self.channel_mult, self.attn_resolutions = tuple(self.channel_mult), tuple(self.attn_resolutions)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor {self.downsample}")
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


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with a residual path, in either layout of the trunk (see Encoder)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, layout: str = "maskgit"):
        super().__init__()
        ldm = layout == "ldm"  # LDM's convolutions have biases, MaskGIT's inside the blocks do not
        self.shortcut_from_input = ldm
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=ldm)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=ldm)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels if ldm else out_channels, out_channels, 1, bias=ldm)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            if self.shortcut_from_input:  # LDM: the usual projection of the input x (in -> out channels)
                return self.nin_shortcut(x) + h
            # Checkpoint quirk of the MaskGIT VQGAN: when the width changes, the shortcut is taken
            # from the block's own output h (out -> out channels) and the input x is discarded.
            return self.nin_shortcut(h) + h
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (taming's AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Level(nn.Module):
    """One resolution level: residual blocks (each optionally followed by attention)."""

    def __init__(self, in_channels, out_channels, num_blocks, attention, groups, layout="maskgit"):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, layout) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(num_blocks if attention else 0))

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """LDM's learned downsampling: zero-pad right and bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Middle(nn.Module):
    def __init__(self, channels, attention, groups, layout="maskgit"):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, layout)
        if attention:
            self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, layout)

    def forward(self, x):
        x = self.block_1(x)
        if hasattr(self, "attn_1"):
            x = self.attn_1(x)
        return self.block_2(x)


# The two layouts of one convolutional trunk (taming's Encoder/Decoder, Esser et al. 2021):
# - "maskgit", the VQGAN the official ALIT code ships (see the module docstring);
# - "ldm", LDM's AutoencoderKL (Rombach et al. 2022) as MAR's KL-16 VAE has it, the VAE base of
#   the official adaptive_vae.py: biases on every conv, the shortcut projects the block's input,
#   a padded stride-2 conv downsamples, a 3x3 encoder conv_out, attention always in the middle,
#   num_res_blocks + 1 blocks per decoder level.
LAYOUTS = ("maskgit", "ldm")


class Encoder(nn.Module):
    def __init__(self, cfg, layout: str = "maskgit", out_channels: int | None = None):
        """cfg: a VQGANConfig or a vae.VAEConfig (the trunk's fields); out_channels: default latent_channels."""
        super().__init__()
        ldm = layout == "ldm"
        widths = [cfg.channels * m for m in cfg.channel_mult]
        groups = cfg.norm_groups
        self.conv_in = nn.Conv2d(3, cfg.channels, 3, padding=1, bias=ldm)
        self.down = nn.ModuleList()
        resolution = cfg.image_size
        for i, width in enumerate(widths):
            self.down.append(Level(cfg.channels if i == 0 else widths[i - 1], width, cfg.num_res_blocks,
                                   resolution in cfg.attn_resolutions, groups, layout))
            if ldm and i < len(widths) - 1:
                self.down[i].downsample = Downsample(width)
            resolution //= 1 if i == len(widths) - 1 else 2
        self.mid = Middle(widths[-1], ldm or resolution in cfg.attn_resolutions, groups, layout)
        self.norm_out = Normalize(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels or cfg.latent_channels, 3 if ldm else 1, padding=int(ldm))

    def forward(self, images):
        h = self.conv_in(images)
        for i, level in enumerate(self.down):
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
            elif i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg, layout: str = "maskgit", attn_resolutions: tuple | None = None):
        """attn_resolutions: where the decoder's levels attend, default cfg.attn_resolutions."""
        super().__init__()
        ldm = layout == "ldm"
        attn_resolutions = cfg.attn_resolutions if attn_resolutions is None else attn_resolutions
        widths = [cfg.channels * m for m in cfg.channel_mult]
        groups = cfg.norm_groups
        resolution = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1], ldm or resolution in attn_resolutions, groups, layout)
        # up[i] is level i (same numbering as the encoder); the forward pass runs them from the last to 0.
        levels = {}
        for i in reversed(range(len(widths))):
            in_width = widths[i + 1] if i + 1 < len(widths) else widths[-1]
            levels[i] = Level(in_width, widths[i], cfg.num_res_blocks + int(ldm), resolution in attn_resolutions,
                              groups, layout)
            if i > 0:
                levels[i].upsample = Upsample(widths[i])
                resolution *= 2
        self.up = nn.ModuleList(levels[i] for i in range(len(widths)))
        self.norm_out = Normalize(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, latents):
        h = self.mid(self.conv_in(latents))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates through (VQGAN eq. 7)."""
        return self.conv_out.weight


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The layout the VQGAN's weights (hence its activations) should have on `device`: channels-last,
    fastest for oneDNN's and cuDNN's convolutions, where GroupNorm keeps it; where GroupNorm has no
    channels-last kernel (CUDA, in some PyTorch versions) it would copy every activation to
    channels-first and back around each of its ~40 calls, so the contiguous layout is used there.
    Asked of the device itself: one GroupNorm on a 2x2 map."""
    probe = torch.zeros(1, 2, 2, 2, device=device).to(memory_format=torch.channels_last)
    keeps = F.group_norm(probe, 1).is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if keeps else torch.contiguous_format


class VQGAN(nn.Module):
    """Images (N, 3, H, W) in [0, 1] <-> a (N, g, g) grid of codebook indices, g = H / downsample."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.beta, cfg.l2_normalize)
        # Channels-last conv weights make every convolution run channels-last, the layout oneDNN (CPU)
        # and cuDNN (GPU) convolve fastest; conv_memory_format says where it pays.
        self.to(memory_format=torch.channels_last)

    def quantize_latents(self, latents: torch.Tensor) -> Quantized:
        """(N, C, g, g) continuous latents -> codes (N, C, g, g), indices (N, g*g) in row-major order."""
        q = self.quantize(latents.permute(0, 2, 3, 1))
        return Quantized(q.codes.permute(0, 3, 1, 2), q.indices.flatten(1), q.loss, q.perplexity, q.usage)

    def encode(self, images: torch.Tensor):
        """-> (continuous pre-quantization latents (N, C, g, g), indices (N, g*g))."""
        latents = self.encoder(images)
        return latents, self.quantize_latents(latents).indices

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
        """Training pass: -> (reconstructions, Quantized)."""
        q = self.quantize_latents(self.encoder(images))
        return self.decode(q.codes), q

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
