"""ALIT: the adaptive-length image tokenizer, read top to bottom.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation",
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393, §2 (the method) and Fig. 1.

An image becomes 2D image tokens (the base tokenizer's features + a patch embedding). A latent-distillation
encoder attends jointly over [2D image tokens; 1D latent tokens] and distils the image into the latent tokens.
The rollout is recurrent: every iteration appends K new learned latent tokens and runs the same encoder again,
so after iteration t the image is described by t*K tokens (32, 64, ..., 256 at paper scale). Each iteration's
latent tokens are factorized (projected to 12 dims) and quantized with one shared codebook; a decoder turns
them, together with masked 2D tokens, back into logits over the VQGAN codebook ("reverse distillation").
Between iterations, dynamic halting replaces the image tokens the decoder already reconstructs well by the
halted token, so later iterations spend their capacity on what is not yet reconstructed.

The base tokenizer (§2, §A.5: "VQGAN or VAE") is `config.base`, built by `make_base`. ALIT asks it for a few
things, which vqgan.VQGAN and vae.VAE each answer: the 2D tokens of images and the targets its decoder
predicts (`tokens`, `targets`), the prediction's numbers per cell (`prediction_size`), images from a prediction
(`decode_prediction`), halting's test (`halts`) and stage 1's loss term (`token_loss`). Over a VQGAN the targets
are codebook indices and the head predicts logits over the codebook; over a VAE the targets are the continuous
2D tokens and the head regresses them. Nothing below asks which it is.

The module layout follows our own names; `ALIT.from_official` maps the official checkpoints onto it with a
written key table, and reproduces the official forward pass numerically (tests/test_model.py against the
reference vectors).

Shapes: B batch, N = grid^2 2D tokens, K new latent tokens an iteration, t iterations so far (1-based),
L = t*K latent tokens, D width.
"""
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import vae
import vqgan
from quantize import Quantized, VectorQuantizer
from vae import VAE, VAEConfig
from vqgan import VQGAN, VQGANConfig
from weights import load_checkpoint, load_exact, load_recorded_base, read_weights, source_name


@dataclass
class ALITConfig:
    image_size: int = 256  # images are image_size x image_size (the paper: 256)
    patch_size: int = 16  # must equal the base tokenizer's downsampling factor: one 2D token per grid cell
    encoder_width: int = 1024  # width D of the latent-distillation encoder Enc (§2)
    encoder_layers: int = 8  # transformer blocks of Enc, all run again at every iteration
    encoder_heads: int = 8  # attention heads of Enc
    decoder_width: int = 1024  # width of the latent-distillation decoder Dec (§2)
    decoder_layers: int = 8  # transformer blocks of Dec
    decoder_heads: int = 8  # attention heads of Dec
    mlp_ratio: float = 4.0  # hidden width of every block's MLP, in multiples of its width
    tokens_per_iter: int = 32  # K_1D, new latent tokens per iteration (§2: "we set this atomic number to 32")
    # iterations T of the rollout (§A.5: "we unroll ... for 8 iterations, expanding token memory from 32 to 256")
    rollout_iters: int = 8
    quantize_latent: bool = True  # quantize the latent tokens; off: continuous (the official code ships such too)
    factorize_latent: bool = True  # project latents to latent_dim before quantization (§2, Yu et al. 2021)
    latent_dim: int = 12  # factorized code size
    latent_codebook_size: int = 4096  # codes of the latent codebook, one shared by all iterations (§2)
    beta: float = 0.25  # commitment weight of the latent quantizer
    halting_threshold: float = 0.55  # official code, not in the paper: tokens predicted with p >= this may halt
    # VAE base: cells whose predicted vector is within this mean absolute error of the true one halt
    # (official configs/adaptive_vae.yaml, not in the paper)
    halting_code_error: float = 0.025
    decoder_latent_positions: int = 256  # rows of the decoder's latent position table (official code: fixed 256)
    init_std: float = 0.02  # linear weights ~ truncated N(0, init_std): the official 0.02 suits widths near 1024
    # Zero the encoder blocks' output projections at init, so every pass of the shared encoder starts
    # as the identity (not the official init; see the tiny preset for why it matters there).
    zero_init_encoder_residuals: bool = False
    # the base 2D tokenizer (§2, §A.5): a VQGAN (codebook indices) or a VAE (continuous vectors)
    base: Literal["vqgan", "vae"] = "vqgan"
    # the base when base = vqgan
    vqgan: VQGANConfig = field(default_factory=lambda: VQGANConfig(**vqgan.PRESETS["imagenet"]))
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(**vae.PRESETS["kl16"]))  # the base when base = vae
    # VAE base: compute what the official adaptive_vae.py computes rather than what it evidently means
    # (set when loading its checkpoints): its halting never masks a cell (it writes the mask into the copy
    # that boolean indexing returns), and it decodes the predicted tokens without dividing by the 0.2325
    # they were scaled by. Off: the paper's method, halting as written and tokens / 0.2325 decoded.
    official_vae_function: bool = False

    @property
    def base_config(self):
        """The base tokenizer's config: the field named by `base`, `vqgan` or `vae`."""
        return getattr(self, self.base)

    def with_base(self, base_config) -> "ALITConfig":
        """This config over a base tokenizer of `base_config` (the one a checkpoint holds)."""
        return replace(self, **{self.base: base_config})

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iter * self.rollout_iters

    @property
    def token_counts(self) -> list:
        """The code lengths, one per iteration: K, 2K, ..., T*K."""
        return [self.tokens_per_iter * (t + 1) for t in range(self.rollout_iters)]

    @property
    def code_dim(self) -> int:
        """Size of the vectors the decoder receives."""
        return self.latent_dim if self.factorize_latent else self.encoder_width

    def __post_init__(self):
        if isinstance(self.vqgan, dict):
            self.vqgan = VQGANConfig(**self.vqgan)
        if isinstance(self.vae, dict):
            self.vae = VAEConfig(**self.vae)
        if self.base not in BASES:
            raise ValueError(f"ALITConfig: base must be one of {', '.join(BASES)}, got {self.base!r}")
        name, base = self.base.upper(), self.base_config
        checks = [
            (base.image_size == self.image_size, f"{name} image_size {base.image_size} != {self.image_size}"),
            (base.downsample == self.patch_size,
             f"patch_size {self.patch_size} != the {name}'s downsampling factor {base.downsample}"),
            (self.encoder_width > base.latent_channels,
             f"encoder_width {self.encoder_width} must exceed the {name} latent size {base.latent_channels}"),
            (self.encoder_width % self.encoder_heads == 0, "encoder_width must be divisible by encoder_heads"),
            (self.decoder_width % self.decoder_heads == 0, "decoder_width must be divisible by decoder_heads"),
            (self.max_tokens <= self.decoder_latent_positions,
             f"{self.max_tokens} latent tokens exceed decoder_latent_positions {self.decoder_latent_positions}"),
            (self.factorize_latent or not self.quantize_latent,
             "quantized latents must be factorized (the official code forces it too)"),
            (self.factorize_latent or self.decoder_width == self.encoder_width,
             "without factorization the decoder width must equal the encoder width"),
            (0 < self.halting_threshold <= 1, "halting_threshold must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ALITConfig: {message}")

    def to_dict(self) -> dict:
        return asdict(self)


def _paper(width, layers, heads):
    return dict(encoder_width=width, encoder_layers=layers, encoder_heads=heads,
                decoder_width=width, decoder_layers=layers, decoder_heads=heads)


PRESETS = {
    # The official alit_* models (Table 1: Ours-S, Ours-SemiLarge), 256x256 over the imagenet VQGAN.
    "small": _paper(1024, 8, 8),
    "base": _paper(768, 12, 12),
    "semilarge": _paper(1024, 16, 16),
    # Two CPU cores: 32x32 images over the tiny VQGAN's 8x8 grid, 8 new tokens (1/8 of the grid)
    # per iteration, 8 iterations, so the longest code has as many 1D tokens as there are 2D tokens.
    # One layer each: the encoder is still 8 layers deep at the last iteration, and in a few thousand
    # steps 1+1 layers learn more than 2+2 (token accuracy 0.25 vs 0.16 after 300 steps) at 2/3 of
    # the cost. At width 128, init_std 0.02 leaves the decoder blind to the latent tokens for
    # hundreds of steps; 0.1 (about 1/sqrt(width)) does not, and zero output projections then start
    # each pass of the shared encoder as the identity (as in ReZero).
    "tiny": dict(image_size=32, patch_size=4, tokens_per_iter=8, latent_codebook_size=256,
                 decoder_latent_positions=64, vqgan=VQGANConfig(**vqgan.PRESETS["tiny"]),
                 vae=VAEConfig(**vae.PRESETS["tiny"]), init_std=0.1,
                 zero_init_encoder_residuals=True, **_paper(128, 1, 4)),
}


# The base tokenizers, by ALITConfig.base: the one place that names them.
BASES = {"vqgan": VQGAN, "vae": VAE}


def make_base(config: ALITConfig) -> nn.Module:
    """The base tokenizer of `config`, randomly initialised (a trained one replaces it: ALIT.replace_base)."""
    return BASES[config.base](config.base_config)


def make_config(preset: str, **overrides) -> ALITConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown ALIT preset {preset!r}; choose from {sorted(PRESETS)}")
    return ALITConfig(**{**PRESETS[preset], **overrides})


# --- the transformer both distillation modules use -------------------------------------------

class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows in q, k, v order, like nn.MultiheadAttention's in_proj
        self.proj = nn.Linear(width, width)
        # A list to record this layer's attention weights in, (B, h, L, L) per call, for the attention
        # maps of Fig. 3; they need the math path, so the default (None) keeps SDPA's fused kernels.
        self.record = None

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        # No mask: every token sees every token, image and latent alike (§2: "joint self-attention").
        if self.record is None:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, L, L), rows: queries
            self.record.append(weights)
            y = weights @ v
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block (CLIP's ResidualAttentionBlock layout)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(width, hidden)
        self.mlp.gelu = nn.GELU()  # exact erf GELU, as the official checkpoints were trained with
        self.mlp.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.ModuleList):
    def __init__(self, width, layers, heads, mlp_ratio):
        super().__init__(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.grad_checkpoint = False  # recompute each block in backward: ALIT.set_grad_checkpointing

    def forward(self, x):
        for block in self:
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# --- what one rollout iteration produces -----------------------------------------------------

@dataclass
class Iteration:
    index: int  # t - 1: 0 for the first iteration
    # The decoder's prediction of every 2D token, (B, N, base.prediction_size): logits over the VQGAN's
    # codes, or over a VAE the token vectors themselves
    prediction: torch.Tensor
    latents: torch.Tensor  # (B, t*K, code_dim): what the decoder received (quantized codes, or continuous)
    indices: torch.Tensor | None  # (B, t*K) latent codebook indices; None without quantization
    quantized: Quantized | None  # the latent quantizer's output (loss, usage) for training
    recon: torch.Tensor | None = None  # (B, 3, H, W) image decoded from the prediction, when asked for
    halted: torch.Tensor | None = None  # (B, N) bool: image tokens replaced by the halted token after this iteration

    @property
    def num_tokens(self) -> int:
        return self.latents.shape[1]


class ALIT(nn.Module):
    def __init__(self, config: ALITConfig):
        super().__init__()
        self.config = cfg = config
        D, E = cfg.encoder_width, cfg.decoder_width
        N, K = cfg.num_image_tokens, cfg.tokens_per_iter

        # The base tokenizer (§2): a VQGAN or a VAE whose grid cells are the 2D image tokens; its
        # state-dict keys begin with its kind (vqgan.*, vae.*), as in the official checkpoints.
        setattr(self, cfg.base, make_base(cfg))
        C = cfg.base_config.latent_channels

        # 2D image tokens: the base's features joined with a learned patch embedding of the pixels.
        self.patch_embed = nn.Conv2d(3, D - C, cfg.patch_size, stride=cfg.patch_size)
        self.image_class_token = nn.Parameter(torch.empty(1, D))
        self.image_positions = nn.Parameter(torch.empty(1 + N, D))  # row 0: class token
        self.halted_token = nn.Parameter(torch.empty(1, 1, D))  # replaces halted image tokens (the Mask op)

        # 1D latent tokens: the same K learned tokens are appended at every iteration; only the
        # per-iteration embedding tells them apart.
        self.latent_tokens = nn.Parameter(torch.empty(K, D))
        self.latent_positions = nn.Parameter(torch.empty(K, D))
        self.iteration_embedding = nn.Parameter(torch.empty(cfg.rollout_iters, K, D))

        # Latent-distillation encoder, Enc.
        self.encoder_ln_pre = nn.LayerNorm(D)
        self.encoder = Transformer(D, cfg.encoder_layers, cfg.encoder_heads, cfg.mlp_ratio)
        self.encoder_ln_recursive = nn.LayerNorm(D)  # re-normalises the whole sequence before each new iteration
        self.encoder_ln_post = nn.LayerNorm(D)

        # Factorize and quantize (§2): down to latent_dim, then one l2-normalised codebook for all iterations.
        self.factorize = nn.Linear(D, cfg.latent_dim) if cfg.factorize_latent else nn.Identity()
        self.quantize = (VectorQuantizer(cfg.latent_codebook_size, cfg.latent_dim, cfg.beta, l2_normalize=True)
                         if cfg.quantize_latent else None)

        # Latent-distillation decoder, Dec: masked 2D tokens + latent tokens -> the base's prediction of
        # every 2D token: logits over the VQGAN's codes, or a VAE's C numbers (§A.5's mean-square loss).
        self.mask_class_token = nn.Parameter(torch.empty(1, E))
        self.mask_token = nn.Parameter(torch.empty(1, 1, E))
        self.mask_positions = nn.Parameter(torch.empty(1 + N, E))
        self.decoder_embed = nn.Linear(cfg.latent_dim, E) if cfg.factorize_latent else nn.Identity()
        self.decoder_latent_positions = nn.Parameter(torch.empty(cfg.decoder_latent_positions, E))
        self.decoder_ln_pre = nn.LayerNorm(E)
        self.decoder = Transformer(E, cfg.decoder_layers, cfg.decoder_heads, cfg.mlp_ratio)
        self.decoder_ln_post = nn.LayerNorm(E)
        self.head = nn.Sequential(nn.Linear(E, 2 * E), nn.Tanh(), nn.Linear(2 * E, self.base.prediction_size))

        self._init_weights()

    def _init_weights(self):
        # The official initialisation: embeddings ~ N(0, 1/width), linears truncated N(0, init_std = 0.02).
        for name, p in self.named_parameters(recurse=False):
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        for name, m in self.named_modules():
            if name.startswith((self.config.base, "quantize")):
                continue  # the base is loaded or trained separately; the quantizer has its own init
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=self.config.init_std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_encoder_residuals:
            for block in self.encoder:
                nn.init.zeros_(block.attn.proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)

    def compile_transformers(self):
        """torch.compile every transformer block in place (state-dict keys unchanged), with dynamic
        shapes: the sequence grows by K tokens every iteration."""
        for block in [*self.encoder, *self.decoder]:
            block.compile(dynamic=True)
        return self

    def set_grad_checkpointing(self, on: bool = True):
        """Recompute every transformer block in the backward pass instead of keeping its activations:
        a stage-1 step keeps the blocks' inputs only (8 encoder and 8 decoder passes of 8 blocks at the
        paper's size), for ~30% more time."""
        self.encoder.grad_checkpoint = self.decoder.grad_checkpoint = on
        return self

    def alit_parameters(self):
        """Every parameter except the base tokenizer's: what stage 1 trains."""
        frozen = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    @property
    def base(self) -> nn.Module:
        """The base tokenizer (self.vqgan or self.vae, by config.base)."""
        return getattr(self, self.config.base)

    def replace_base(self, base: nn.Module) -> "ALIT":
        """Put a trained base tokenizer in the place of the one built from the config (stage 1)."""
        setattr(self, self.config.base, base)
        return self

    def base_tokens(self, images):
        """Images -> the base's 2D tokens (B, C, g, g). A VAE's are a posterior sample in training and its
        mean in eval mode (the official code samples in both), so that evaluation is deterministic."""
        return self.base.tokens(images, sample=self.training)

    def base_targets(self, tokens):
        """2D tokens (B, C, g, g) -> what the decoder must predict: the VQGAN's codebook indices (B, N), or
        the VAE's token vectors (B, N, C), row-major."""
        return self.base.targets(tokens)

    # --- the pieces of one iteration ----------------------------------------------------------

    def image_tokens(self, images, tokens_2d):
        """[class; 2D image tokens] + positions, (B, 1+N, D); tokens_2d: the base's 2D tokens (B, C, g, g)."""
        B = len(images)
        patches = self.patch_embed(images)  # (B, D - C, g, g)
        tokens = torch.cat([tokens_2d.to(patches.dtype), patches], dim=1).flatten(2).transpose(1, 2)  # (B, N, D)
        # Unit-norm tokens: VQGAN features and patch features come on different scales.
        tokens = F.normalize(tokens, dim=-1)
        return torch.cat([self.image_class_token.expand(B, 1, -1), tokens], dim=1) + self.image_positions

    def new_latent_tokens(self, iteration: int, batch_size: int):
        """The K fresh latent tokens appended at `iteration`, (B, K, D)."""
        block = self.latent_tokens + self.latent_positions + self.iteration_embedding[iteration]
        return block.expand(batch_size, -1, -1)

    def factorize_and_quantize(self, latent_tokens):
        """Encoder output latents (B, L, D) -> (decoder input (B, L, code_dim), Quantized or None)."""
        codes = self.factorize(self.encoder_ln_post(latent_tokens))
        if self.quantize is None:
            return codes, None
        q = self.quantize(codes)
        return q.codes, q

    def predict_image_tokens(self, latents):
        """Reverse distillation: latents (B, L, code_dim) -> the prediction of every 2D token,
        (B, N, base.prediction_size): logits over the VQGAN's codes, or a VAE's token vectors."""
        B, L, _ = latents.shape
        N = self.config.num_image_tokens
        masked = torch.cat([self.mask_class_token.expand(B, 1, -1), self.mask_token.expand(B, N, -1)], dim=1)
        latents = self.decoder_embed(latents) + self.decoder_latent_positions[:L]
        x = self.decoder_ln_pre(torch.cat([masked + self.mask_positions, latents], dim=1))  # (B, 1+N+L, E)
        x = self.decoder(x)
        return self.head(self.decoder_ln_post(x[:, 1:1 + N]))  # (B, N, base.prediction_size)

    def images_from_prediction(self, prediction, hard: bool = False):
        """The prediction of every 2D token -> images (B, 3, H, W), through the base's decoder: the VQGAN's
        expected codes (its most likely ones if hard), or a VAE's predicted tokens."""
        return self.base.decode_prediction(prediction, self.config, hard=hard)

    def halt(self, x, prediction, targets, generator=None):
        """Dynamic halting, the Mask operation of §2 (T -> T+1).

        The base's test (`halts`) picks the 2D tokens the decoder already predicts well: over a VQGAN a
        cell whose true index has probability p >= 0.55 halts with probability p; over a VAE a cell whose
        vector is within 0.025 mean absolute error of the true one. Halted tokens are replaced by the
        halted token (plus its position), so the next iteration spends its capacity on what is not yet
        reconstructed. The decision is taken afresh after every iteration from that iteration's
        prediction; a cell halted before and not now keeps the encoder's processed halted token, not its
        image token.
        """
        N = self.config.num_image_tokens
        halted = self.base.halts(prediction, targets, self.config, generator)  # (B, N) bool
        replacement = (self.halted_token + self.image_positions[1:]).to(x.dtype)  # (1, N, D)
        image = torch.where(halted[..., None], replacement, x[:, 1:1 + N])
        return torch.cat([x[:, :1], image, x[:, 1 + N:]], dim=1), halted

    # --- the recurrent rollout ----------------------------------------------------------------

    def forward(self, images, tokens_2d=None, targets=None, *, halting=False, iters=None,
                reconstruct=False, generator=None):
        """The recurrent rollout of §2; returns one `Iteration` per decoded iteration.

        images: (B, 3, H, W) in [0, 1]. tokens_2d (B, C, g, g) and targets are the frozen
        base's 2D tokens and targets (base_tokens, base_targets: VQGAN indices (B, N), or VAE token
        vectors (B, N, C)); computed here when not given (training passes them in, computed under
        no_grad or read from a cache). iters: the iterations (0-based) to decode, default all;
        the encoder only runs up to the last of them. Halting needs the decoder's prediction, so it
        acts after decoded iterations only (as in the official code). reconstruct: also decode
        pixels from the prediction (images_from_prediction).
        """
        cfg = self.config
        if tokens_2d is None:
            tokens_2d = self.base_tokens(images)
        if targets is None and halting:
            targets = self.base_targets(tokens_2d)
        iters = sorted(set(range(cfg.rollout_iters) if iters is None else iters))
        if not iters or iters[0] < 0 or iters[-1] >= cfg.rollout_iters:
            raise ValueError(f"iters must be within 0..{cfg.rollout_iters - 1}, got {iters}")
        first_latent = 1 + cfg.num_image_tokens

        # What is computed once and what every iteration must recompute (§2, T -> T+1): the base's
        # encoding and the 2D image tokens are made once, at T = 0. After that nothing stays the
        # same: every pass of the encoder updates every token of the carried sequence, image and
        # latent alike (residual updates, then the re-normalisation), so no keys or values can be
        # cached from one pass to the next; the decoder's input holds all latents, the earlier ones
        # updated, so it runs in full too. Only the decoder's masked 2D tokens are constant.
        x = self.first_sequence(images, tokens_2d)  # (B, 1+N+K, D)
        records = []
        for index in range(iters[-1] + 1):  # index = t - 1
            # Enc: image tokens and all latent tokens so far; earlier latents get residual updates.
            x = self.encoder(x)  # (B, 1+N+t*K, D)
            if index in iters:
                latents, q = self.factorize_and_quantize(x[:, first_latent:])
                prediction = self.predict_image_tokens(latents)
                record = Iteration(index, prediction, latents, q.indices if q else None, q)
                if reconstruct:
                    record.recon = self.images_from_prediction(prediction)
                if halting and index < iters[-1]:
                    x, record.halted = self.halt(x, prediction, targets, generator)
                records.append(record)
            if index < iters[-1]:
                x = self.next_sequence(x, index + 1)
        return records

    def first_sequence(self, images, tokens_2d):
        """T = 0: [2D image tokens; the first K latent tokens] -> encoder_ln_pre, (B, 1+N+K, D)."""
        return self.encoder_ln_pre(torch.cat([self.image_tokens(images, tokens_2d),
                                              self.new_latent_tokens(0, len(images))], dim=1))

    def next_sequence(self, x, iteration: int):
        """T -> T+1: append K new latent tokens and re-normalise the whole sequence (§2)."""
        return self.encoder_ln_recursive(torch.cat([x, self.new_latent_tokens(iteration, len(x))], dim=1))

    def rollout(self, images, halting=False, generator=None):
        """Every iteration with its reconstruction: records[t - 1] describes the image with t*K tokens."""
        return self(images, halting=halting, reconstruct=True, generator=generator)

    # --- tokens in, tokens out ----------------------------------------------------------------

    def encode(self, images, criterion=None, halting=False, generator=None):
        """Images -> latent token indices.

        Without a criterion: a list with the (B, t*K) indices of every length t = 1..T.
        With a criterion (a function (images, reconstructions) -> (B,) bool, e.g. L1 < 0.07):
        per image, the fewest tokens whose reconstruction passes (the longest if none does), as a
        list of B tensors of different lengths. Images that pass leave the batch, so no further
        encoder, decoder or VQGAN-decoder work is spent on them.
        """
        if self.quantize is None:
            raise ValueError("encode returns codebook indices; this model has continuous latent tokens")
        if criterion is None:
            return [r.indices for r in self(images, halting=halting, generator=generator)]
        return [c.indices for c in self.encode_adaptive(images, criterion, halting=halting, generator=generator)]

    @torch.no_grad()
    def encode_adaptive(self, images, criterion, halting=False, generator=None, token_space=False):
        """Early-exit rollout; returns one `Choice` per image (see `encode`).

        criterion(images, reconstructions) -> (B,) bool on pixels, or with token_space=True
        criterion(targets, prediction) -> (B,) bool on the base's token grid (base_targets and the
        decoder's prediction; no pixel decoding at all until the final reconstruction).
        """
        cfg = self.config
        tokens_2d = self.base_tokens(images)
        targets = self.base_targets(tokens_2d)
        active = torch.arange(len(images), device=images.device)  # which original images are still running
        choices = [None] * len(images)
        first_latent = 1 + cfg.num_image_tokens
        x = self.first_sequence(images, tokens_2d)
        for index in range(cfg.rollout_iters):  # index = t - 1
            x = self.encoder(x)
            latents, q = self.factorize_and_quantize(x[:, first_latent:])
            prediction = self.predict_image_tokens(latents)
            last = index == cfg.rollout_iters - 1
            if token_space:
                done = criterion(targets[active], prediction) | last
                recon = self.images_from_prediction(prediction[done]) if done.any() else None
            else:
                recon = self.images_from_prediction(prediction)
                done = criterion(images[active], recon) | last
                recon = recon[done]
            for j, i in enumerate(active[done].tolist()):
                choices[i] = Choice((index + 1) * cfg.tokens_per_iter, q.indices[done][j], recon[j])
            if last or done.all():
                break
            keep = ~done
            x, active = x[keep], active[keep]
            if halting:
                x, _ = self.halt(x, prediction[keep], targets[active], generator)
            x = self.next_sequence(x, index + 1)
        return choices

    @torch.no_grad()
    def rollout_images(self, images, hard: bool = False):
        """The image after every iteration, T tensors (B, 3, H, W) in [0, 1], run in eval mode: decoded
        from the prediction (the pixels stage 2 trains on) or, hard, from the VQGAN's most likely codes
        (what stage 1's cross-entropy aims at, §A.5; over a VAE the same as not hard)."""
        modes = {module: module.training for module in self.modules()}  # stage 1's frozen base stays in eval
        self.eval()
        records = self(images)
        images = [self.images_from_prediction(r.prediction, hard=hard).float().clamp(0, 1) for r in records]
        for module, training in modes.items():
            module.train(training)
        return images

    @torch.no_grad()
    def decode(self, indices):
        """Latent token indices (B, k*K) of any length k = 1..T -> (the prediction of every 2D token,
        images): over a VQGAN its logits (B, N, codes), whose argmax are the predicted VQGAN indices; over a
        VAE the predicted token vectors (B, N, C)."""
        L, K = indices.shape[1], self.config.tokens_per_iter
        if self.quantize is None:
            raise ValueError("decode takes codebook indices; this model has continuous latent tokens")
        if L == 0 or L % K or L > self.config.max_tokens:
            raise ValueError(f"decode takes a multiple of {K} tokens up to {self.config.max_tokens}, got {L}")
        prediction = self.predict_image_tokens(self.quantize.lookup(indices))
        return prediction, self.images_from_prediction(prediction)

    # --- loading the official checkpoints -----------------------------------------------------

    @classmethod
    def from_official(cls, path_or_state_dict, heads=None) -> "ALIT":
        """Load an official ALIT checkpoint (with its fine-tuned VQGAN or VAE) into this code.

        Over a VAE (alit_small_vae_*_latents.pth, adaptive_vae.py) the model computes what the
        official code computes: config.official_vae_function is set (see ALITConfig).

        Accepts the checkpoint file (a dict with 'ema' and/or 'model'; 'ema' is preferred, as the
        official evaluation uses it) or a bare state dict. The architecture is read off the shapes;
        the number of attention heads is not in the shapes: it comes from the official preset of
        the same width and depth, or from `heads` (an int, or an (encoder, decoder) pair).
        """
        where = source_name(path_or_state_dict)
        state = read_weights(path_or_state_dict)
        for wrapper in ("ema", "model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        # Training-only modules (a frozen LPIPS and a discriminator per iteration) are dropped.
        state = {k: v for k, v in state.items() if not k.startswith("gan_losses.")}
        try:
            cfg = _official_config(state, heads)
        except KeyError as missing:
            raise KeyError(f"{where}: not an official ALIT checkpoint, it lacks {missing}") from None
        model = cls(cfg)
        prefix = f"base_tokenizer.{cfg.base}."
        base = BASES[cfg.base].from_official({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                             image_size=cfg.image_size)
        model.replace_base(base)
        ours = {_rename_official(k): v for k, v in state.items() if not k.startswith(prefix)}
        ours.update({f"{cfg.base}.{k}": v for k, v in base.state_dict().items()})
        load_exact(model, ours, where)
        return model

    @classmethod
    def from_checkpoint(cls, path, ema=True) -> "ALIT":
        """A model trained by train_stage1.py / train_stage2.py, in eval mode: with the EMA weights
        (what evaluation uses), or with the raw ones (ema=False: stage 2 trains on from them)."""
        ckpt = load_checkpoint(path)
        if "model_config" not in ckpt or "ema" not in ckpt:
            raise ValueError(f"{path} is not a train_stage1.py checkpoint, nor a train_stage2.py one "
                             "(official checkpoints load with ALIT.from_official)")
        known = {f.name for f in fields(ALITConfig)}  # a field since retired (grad_checkpoint) is not the model's
        model = cls(ALITConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known}))
        # The EMA averages the trained parameters only; buffers and frozen weights are the model's.
        state = {**ckpt["model"], **ckpt["ema"]} if ema else dict(ckpt["model"])
        if "base_file" in ckpt:  # stage 1's checkpoints keep the frozen base as its file
            name = model.config.base
            base = load_recorded_base(ckpt["base_file"], BASES[name], model.config.image_size, path)
            state.update({f"{name}.{k}": v for k, v in base.state_dict().items()})
        model.load_state_dict(state)
        return model.eval()


@dataclass
class Choice:  # the adaptive encoding of one image
    num_tokens: int
    indices: torch.Tensor  # (num_tokens,)
    recon: torch.Tensor  # (3, H, W)


# Official key -> ours, applied in order (regular expressions on the whole key).
OFFICIAL_KEY_MAP = [
    (r"^encoder_class_embedding$", "image_class_token"),
    (r"^encoder_positional_embedding$", "image_positions"),
    (r"^encoder_mask_token$", "halted_token"),
    (r"^latent_token_positional_embedding$", "latent_positions"),
    (r"^timestep_embedding$", "iteration_embedding"),
    (r"^pre_quantizer_mlp\.", "factorize."),
    (r"^decoder_class_embedding$", "mask_class_token"),
    (r"^decoder_mask_token$", "mask_token"),
    (r"^decoder_positional_embedding$", "mask_positions"),
    (r"^decoder\.decoder_embed\.", "decoder_embed."),
    (r"^decoder\.latent_token_positional_embedding$", "decoder_latent_positions"),
    (r"^decoder\.ln_(pre|post)\.", r"decoder_ln_\1."),
    (r"^decoder\.ffn\.", "head."),
    (r"^(encoder|decoder)\.transformer\.", r"\1."),
    # nn.MultiheadAttention's packed projections are our Linear layers: same rows, same q, k, v order.
    (r"\.attn\.in_proj_(weight|bias)$", r".attn.qkv.\1"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
]

# Heads per official (width, layers); the shapes cannot tell heads apart.
OFFICIAL_HEADS = {(c["encoder_width"], c["encoder_layers"]): c["encoder_heads"]
                  for name, c in PRESETS.items() if name != "tiny"}


def _rename_official(key: str) -> str:
    for pattern, replacement in OFFICIAL_KEY_MAP:
        key = re.sub(pattern, replacement, key)
    return key


# Per base of an official checkpoint: how its config is read off its weights, and what ALITConfig it implies.
# Over a VAE (adaptive_vae.py) the official function is reproduced (ALITConfig.official_vae_function).
OFFICIAL_BASES = {"vqgan": (vqgan.official_config, {}), "vae": (vae.official_config, {"official_vae_function": True})}


def _official_config(state: dict, heads) -> ALITConfig:
    def layers(prefix):
        return len({k.split(".")[2] for k in state if k.startswith(prefix + ".transformer.")})

    enc_width, dec_width = state["encoder_ln_pre.weight"].shape[0], state["decoder.ln_pre.weight"].shape[0]
    enc_layers, dec_layers = layers("encoder"), layers("decoder")
    if heads is None:
        found = [OFFICIAL_HEADS.get((enc_width, enc_layers)), OFFICIAL_HEADS.get((dec_width, dec_layers))]
        if None in found:
            raise ValueError(f"no official preset has width {enc_width}/{dec_width} and {enc_layers}/{dec_layers} "
                             "layers; pass heads= (an int, or an (encoder, decoder) pair)")
        heads = tuple(found)
    enc_heads, dec_heads = (heads, heads) if isinstance(heads, int) else heads
    patch = state["patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["encoder_positional_embedding"].shape[0] - 1)
    K, D = state["latent_tokens"].shape
    quantized, factorized = "quantize.embedding.weight" in state, "pre_quantizer_mlp.weight" in state
    codebook_size, latent_dim = state["quantize.embedding.weight"].shape if quantized else (4096, 12)
    latent_dim = state["pre_quantizer_mlp.weight"].shape[0] if factorized else latent_dim
    base = next((name for name in BASES if any(k.startswith(f"base_tokenizer.{name}.") for k in state)), "vqgan")
    base_state = {k.split(f"base_tokenizer.{base}.", 1)[1]: v for k, v in state.items()
                  if k.startswith(f"base_tokenizer.{base}.")}
    official_base_config, implied = OFFICIAL_BASES[base]
    bases = {"base": base, base: official_base_config(base_state, image_size=grid * patch), **implied}
    return ALITConfig(
        image_size=grid * patch, patch_size=patch, encoder_width=enc_width, encoder_layers=enc_layers,
        encoder_heads=enc_heads, decoder_width=dec_width, decoder_layers=dec_layers, decoder_heads=dec_heads,
        mlp_ratio=state["encoder.transformer.0.mlp.c_fc.weight"].shape[0] / enc_width,
        tokens_per_iter=K, rollout_iters=state["timestep_embedding"].shape[0], quantize_latent=quantized,
        factorize_latent=factorized, latent_dim=latent_dim, latent_codebook_size=codebook_size,
        decoder_latent_positions=state["decoder.latent_token_positional_embedding"].shape[0], **bases)
