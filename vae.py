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

import torch
import torch.nn as nn

from convnet import Decoder, Encoder
from weights import load_checkpoint, load_exact, read_weights, source_name


@dataclass
class VAEConfig:
    image_size: int = 256  # images are image_size x image_size
    channels: int = 128  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 1, 2, 2, 4)  # one entry per resolution level; each level after the first halves H, W
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more)
    latent_channels: int = 16  # E, the size of a 2D token (KL-16: embed_dim = z_channels = 16)
    attn_resolutions: tuple = (16,)  # encoder feature-map sizes with self-attention (KL-16: 16)
    decoder_attn_resolutions: tuple = ()  # decoder ones (KL-16: none; both middles always attend)
    norm_groups: int = 32  # GroupNorm groups, every channel count must be a multiple of it
    scale: float = 0.2325  # 2D tokens = posterior sample x scale (MAR, LDMVAEWrapper; not in the paper)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    # Its 2D tokens are vectors: ALIT regresses each one's numbers.
    discrete = False

    @property
    def prediction_size(self) -> int:
        return self.latent_channels

    def describe(self) -> str:
        """What ALIT's shapes depend on: the grid and the tokens' size."""
        return f"{self.image_size}px -> {self.grid_size}x{self.grid_size} x {self.latent_channels}"

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.decoder_attn_resolutions = tuple(self.decoder_attn_resolutions)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor "
                             f"{self.downsample}")
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

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, E, g, g) unscaled latents (a posterior sample or mean) -> images, trained to lie in [0, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, E, g, g) or (N, g*g, E) 2D tokens (scaled, as `tokens` returns them) -> images."""
        if tokens.dim() == 3:  # row-major (N, g*g, E)
            g = math.isqrt(tokens.shape[1])
            tokens = tokens.transpose(1, 2).reshape(len(tokens), -1, g, g)
        return self.decode(tokens / self.config.scale)

    def forward(self, images: torch.Tensor, generator=None):
        """Training pass (train_vqgan.py --base vae): -> (reconstructions from a posterior sample, Posterior)."""
        posterior = self.posterior(images)
        return self.decode(posterior.sample(generator=generator)), posterior

    def latent_loss(self, posterior: Posterior, images, weight: float) -> tuple:
        """What train_vqgan.py adds to the reconstruction loss: the KL term times weight (--kl-weight), and
        what it logs: that term, the posterior's mean std and the tokens' std. LDM sums both terms over
        the pixels and the latents; here both are means, so the KL gets 1 / the pixels of an image."""
        kl = weight * posterior.kl().mean() / images[0].numel()
        return kl, {"kl": kl.detach().float(), "std": posterior.std.detach().float().mean(),
                    "tokens": (posterior.mean * self.config.scale).detach().float().std()}

    # --- the base tokenizer's side of ALIT: what model.py asks of a vqgan.VQGAN and of a VAE alike -----
    # The 2D tokens are continuous vectors: ALIT's decoder regresses each cell's vector (§A.5: "mean-square
    # reconstruction loss when using VAE as the base-tokenizer"), and decoding divides the scale back out.

    def tokens(self, images: torch.Tensor, sample: bool = True, noise=None, generator=None) -> torch.Tensor:
        """Images -> the 2D tokens ALIT distils, (N, E, g, g): a posterior sample times the scale (the
        official get_img_tokens), or with sample=False the posterior mean times the scale (ALIT's
        evaluation: deterministic)."""
        posterior = self.posterior(images)
        z = posterior.sample(noise, generator) if sample or noise is not None else posterior.mean
        return z * self.config.scale

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """2D tokens -> what ALIT's decoder predicts: the tokens themselves, (N, g*g, E) row-major."""
        return tokens.detach().flatten(2).transpose(1, 2)

    def encode(self, images: torch.Tensor, sample: bool = True, noise=None, generator=None) -> tuple:
        """-> (tokens (N, E, g, g), targets (N, g*g, E)): for ALIT's image tokens and its decoder, both
        the tokens."""
        tokens = self.tokens(images, sample, noise, generator)
        return tokens, tokens.flatten(2).transpose(1, 2)

    @property
    def prediction_size(self) -> int:
        """The numbers ALIT's decoder head gives a cell: its token vector."""
        return self.config.prediction_size

    def decode_prediction(self, prediction: torch.Tensor, config, hard: bool = False) -> torch.Tensor:
        """ALIT's predicted 2D tokens (N, g*g, E) -> images, divided by the scale (the latents the decoder
        was trained on). With config.official_vae_function, as the official adaptive_vae.py does: not
        divided. `hard` is for bases with discrete codes."""
        if config.official_vae_function:
            g = self.config.grid_size
            return self.decode(prediction.view(len(prediction), g, g, -1).permute(0, 3, 1, 2))
        return self.decode_tokens(prediction)

    def halts(self, prediction, targets, config, generator=None) -> torch.Tensor:
        """Dynamic halting's test (§2), (N, g*g) bool, without a draw: the predicted vector within
        config.halting_code_error mean absolute error of the true one (official configs/adaptive_vae.yaml,
        not in the paper). With config.official_vae_function nothing halts: adaptive_vae.py writes its
        mask into the copy boolean indexing returns."""
        error = (prediction.detach().float() - targets.float()).abs().mean(-1)  # (N, g*g)
        return (error < config.halting_code_error) & (not config.official_vae_function)

    def token_loss(self, prediction, targets, label_smoothing: float = 0.0, code_weight: float = 1.0) -> tuple:
        """Stage 1's loss at one iteration (§A.5, adaptive_vae.py): (the mean-square error of the predicted
        tokens, which the caller weights per iteration; nothing unweighted; [MSE, mean absolute error] to
        log). The VQGAN's label smoothing and code weight do not apply."""
        error = prediction.float() - targets.float()  # (N, g*g, E)
        mse = error.square().mean()
        return mse, None, torch.stack([mse.detach(), error.detach().abs().mean()])

    token_loss_names = ("mse", "err")  # how a training log names token_loss's two figures

    def correct_cells(self, prediction, targets, config) -> torch.Tensor:
        """(N, g*g) bool: the cells whose vector is within halting's tolerance of the true one."""
        return (prediction.float() - targets).abs().mean(-1) < config.halting_code_error

    # The token-space criterion (§A.2's selection without decoding pixels): the code error.
    token_score_name, higher_score_is_better = "code_mse", False

    def token_score(self, prediction, targets) -> torch.Tensor:
        """(N,) the mean-square error of the predicted token vectors."""
        return (prediction.float() - targets.float()).square().mean(dim=(1, 2))

    def code_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokenizer's own grid of its 2D tokens, (N, E, g, g): the tokens, as ALIT sees them."""
        return tokens

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokenizer alone: its 2D tokens decoded, images (N, 3, H, W)."""
        return self.decode_tokens(tokens)

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
