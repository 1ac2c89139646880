"""The other 2D image tokenizer ALIT is built on: a KL autoencoder (a VAE), written from scratch.

Paper: ALIT, arXiv:2411.02393, §2 and §A.5: distillation runs over "a pre-trained image tokenizer
(VQGAN or VAE)"; "we use mean-square reconstruction loss when using VAE as the base-tokenizer".
The VAE's 2D tokens are continuous vectors, not pointers into a codebook.

The official code's VAE (base_tokenizers/vae_ldm.py, LDMVAEWrapper) is MAR's KL-16 (Li et al.
2024), LDM's AutoencoderKL (Rombach et al. 2022): vqgan.py's convolutional trunk in its "ldm"
layout, whose encoder ends in 2E channels, a 1x1 quant_conv (2E -> 2E) giving the mean and the
log-variance of a diagonal Gaussian posterior, and a 1x1 post_quant_conv (E -> E) in front of the
decoder. The 2D tokens are a posterior sample times 0.2325 (MAR's scale, which brings KL-16's
latents to about unit variance; LDMVAEWrapper.get_img_tokens).

As the VQGAN here, it reads and writes images in [0, 1]: the official ALIT code feeds the VAE its
[0, 1] images (MAR trained KL-16 on [-1, 1]; ALIT's stage 2 fine-tunes it on [0, 1]).
Its losses (L1, LPIPS, the KL term, PatchGAN) live in losses.py and train_vqgan.py.
"""
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn

from vqgan import Decoder, Encoder
from weights import load_checkpoint, load_exact, read_weights, source_name


@dataclass
class VAEConfig:
    image_size: Annotated[int, ">= 1"] = 256  # images are image_size x image_size
    channels: Annotated[int, ">= 1"] = 128  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: Annotated[tuple, "list of int >= 1"] = (1, 1, 2, 2, 4)  # one entry per resolution level; each level after the first halves H, W
    num_res_blocks: Annotated[int, ">= 1"] = 2  # residual blocks per encoder level (the decoder has one more)
    latent_channels: Annotated[int, ">= 1"] = 16  # E, the size of a 2D token (KL-16: embed_dim = z_channels = 16)
    attn_resolutions: Annotated[tuple, "list of int >= 1, or empty"] = (16,)  # encoder feature-map sizes with self-attention (KL-16: 16)
    decoder_attn_resolutions: Annotated[tuple, "list of int >= 1, or empty"] = ()  # decoder ones (KL-16: none; both middles always attend)
    norm_groups: Annotated[int, ">= 1"] = 32  # GroupNorm groups, every channel count must be a multiple of it
    scale: Annotated[float, "> 0"] = 0.2325  # 2D tokens = posterior sample x scale (MAR, LDMVAEWrapper; not in the paper)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions, self.decoder_attn_resolutions = tuple(self.attn_resolutions), tuple(self.decoder_attn_resolutions)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor {self.downsample}")
        for c in [self.channels * m for m in self.channel_mult]:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not a multiple of norm_groups {self.norm_groups}")


PRESETS = {
    # MAR's KL-16, the official ALIT code's VAE: 256x256 -> 16x16 tokens of 16 dims.
    "kl16": dict(image_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 latent_channels=16, attn_resolutions=(16,)),
    # Two CPU cores: 32x32 images -> 8x8 tokens, the tiny VQGAN's grid; attention at the token grid
    # as KL-16 has it. 8 dims a token: 16 at 8x8 would keep a third of the pixels' numbers.
    "tiny": dict(image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 latent_channels=8, attn_resolutions=(8,), norm_groups=8),
}


@dataclass
class Posterior:
    """The diagonal Gaussian q(z | image) of LDM's DiagonalGaussianDistribution."""
    mean: torch.Tensor  # (B, E, g, g)
    logvar: torch.Tensor  # (B, E, g, g), clamped to [-30, 20] as LDM does

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """mean + std * noise, noise ~ N(0, I) unless given (the reparameterisation: gradients reach both)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over the latent grid, (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VAE(nn.Module):
    """Images (N, 3, H, W) in [0, 1] <-> continuous 2D tokens (N, E, g, g), g = H / downsample."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        E = cfg.latent_channels
        self.encoder = Encoder(cfg, layout="ldm", out_channels=2 * E)
        self.decoder = Decoder(cfg, layout="ldm", attn_resolutions=cfg.decoder_attn_resolutions)
        self.quant_conv = nn.Conv2d(2 * E, 2 * E, 1)  # encoder features -> (mean, logvar)
        self.post_quant_conv = nn.Conv2d(E, E, 1)
        self.to(memory_format=torch.channels_last)  # as the VQGAN: the layout convolutions run fastest in

    def posterior(self, images: torch.Tensor) -> Posterior:
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)  # 2 x (B, E, g, g)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def encode(self, images: torch.Tensor, sample: bool = True, noise=None, generator=None):
        """-> (2D tokens (N, E, g, g), the same as targets (N, g*g, E) in row-major order).

        The tokens are a posterior sample times the scale (the official get_img_tokens), or with
        sample=False the posterior mean times the scale. The pair mirrors VQGAN.encode's (features
        for ALIT's image tokens, what ALIT's decoder must predict): here both are the tokens."""
        posterior = self.posterior(images)
        z = posterior.sample(noise, generator) if sample or noise is not None else posterior.mean
        tokens = z * self.config.scale
        return tokens, tokens.flatten(2).transpose(1, 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, E, g, g) unscaled latents (a posterior sample or mean) -> images, trained to lie in [0, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, E, g, g) or (N, g*g, E) 2D tokens (scaled, as encode returns them) -> images."""
        if tokens.dim() == 3:  # row-major (N, g*g, E)
            g = math.isqrt(tokens.shape[1])
            tokens = tokens.transpose(1, 2).reshape(len(tokens), -1, g, g)
        return self.decode(tokens / self.config.scale)

    def forward(self, images: torch.Tensor, generator=None):
        """Training pass: -> (reconstructions from a posterior sample, Posterior)."""
        posterior = self.posterior(images)
        return self.decode(posterior.sample(generator=generator)), posterior

    @classmethod
    def from_official(cls, path_or_state_dict, image_size: int | None = None) -> "VAE":
        """Load MAR's KL-16 checkpoint (kl16.ckpt; the official ALIT code's vae.ckpt).

        The weights sit under 'model' (or 'state_dict', or bare); the architecture is read off the
        keys and shapes. Key table: LDM's names are ours, module for module (encoder.down.<level>.
        block/attn/downsample, decoder.up.<level>.block/attn/upsample, mid.block_1/attn_1/block_2,
        quant_conv, post_quant_conv); an LDM training file's `loss.*` (LPIPS, discriminator) is
        dropped, as MAR's strict=False load ignores it.
        """
        state = read_weights(path_or_state_dict)
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        model = cls(official_config(state, image_size, source_name(path_or_state_dict)))
        load_exact(model, state, source_name(path_or_state_dict))
        return model

    @classmethod
    def from_checkpoint(cls, path) -> "VAE":
        """A VAE trained by train_vqgan.py --base vae: its checkpoint's config and weights."""
        ckpt = load_checkpoint(path)
        if ckpt.get("train_config", {}).get("base") != "vae" or "model_config" not in ckpt:
            raise ValueError(f"{path} is not a train_vqgan.py --base vae checkpoint (MAR's KL-16 loads with "
                             "VAE.from_official)")
        model = cls(VAEConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model


def official_config(state: dict, image_size: int | None = None, where: str = "state dict") -> VAEConfig:
    """The VAEConfig of an LDM/MAR state dict. The image size is not stored; it defaults to a 16x16
    token grid, as the official code uses KL-16 (the network is fully convolutional; the size only
    says which levels' feature maps the attention resolutions name)."""
    try:
        channels = state["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
        latent_channels = state["post_quant_conv.weight"].shape[0]
        mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // channels for i in levels)
        state["quant_conv.weight"]
    except KeyError as missing:
        raise KeyError(f"{where}: not an LDM/MAR KL autoencoder checkpoint, it lacks {missing}") from None
    image_size = image_size or 16 * 2 ** (len(mult) - 1)

    def attention(prefix):  # level i's feature maps are image_size / 2^i
        return tuple(sorted({image_size // 2 ** i for i in levels if f"{prefix}.{i}.attn.0.q.weight" in state},
                            reverse=True))
    return VAEConfig(image_size=image_size, channels=channels, channel_mult=mult, num_res_blocks=len(blocks),
                     latent_channels=latent_channels, attn_resolutions=attention("encoder.down"),
                     decoder_attn_resolutions=attention("decoder.up"),
                     norm_groups=32)  # LDM's, fixed in its code
