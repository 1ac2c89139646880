"""The convolutional encoder and decoder both base tokenizers are built of (vqgan.py, vae.py).

Paper: ALIT, arXiv:2411.02393, §2 distils the 2D tokens of "a pre-trained image tokenizer (VQGAN or
VAE)" (§A.5). Both are taming's convolutional trunk (Esser et al. 2021): residual blocks at falling
resolutions into a latent grid, and back. Written from scratch, in the two layouts the official
checkpoints use, so that their state dicts load by name (vqgan.py, vae.py: `from_official`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, layout)
            for i in range(num_blocks))
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
