"""What a run costs, counted from its config rather than timed: FLOPs, an H100's time, the gradient
all-reduce, checkpoint bytes. bench.py reports them beside what it measures; plan.py states them in
each run plan (step time, GPU-hours, all-reduce share, checkpoint size and bytes written).

Paper: ALIT, arXiv:2411.02393, §A.5 (200 epochs a stage, Ours-S at 256x256); the official run scripts'
global batch of 256 (stage 1) and 96 (stage 2), 32 and 12 a GPU on 8 GPUs.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from losses import LPIPS, PatchDiscriminator
from model import ALIT, ALITConfig, make_base, make_config
from quantize import VectorQuantizer

H100_BF16_FLOPS = 989e12  # NVIDIA's H100 SXM datasheet: dense bf16 tensor-core peak, without sparsity
UTILISATION = 0.4  # share of that peak the paper's runs are costed at (bench.py --utilisation)
IMAGENET100_TRAIN_IMAGES = 126_689  # the CMC class list's training images (data.IMAGENET100_CLASSES)
PAPER_EPOCHS = 200  # both stages: the official run scripts (--epochs 200; the paper gives no numbers)
GAN_FRACTION = 0.5  # stage 2's steps with the adversarial terms on (train_stage2.py --gan-schedule)
PAPER_BATCH_PER_GPU = (32, 12)  # stage 1, stage 2: the official run scripts on 8 GPUs
# Assumed NCCL all-reduce bus bandwidths: NVLink within an 8-H100 node, one 400 Gb/s NIC between nodes
NVLINK_BUS_BYTES_PER_SECOND = 360e9
NODE_LINK_BYTES_PER_SECOND = 50e9

# -----------------------------------------------------------------------------
# FLOPs, counted from the config

def transformer_flops(width: int, layers: int, tokens: int, mlp_ratio: float, attention=True) -> float:
    """Forward FLOPs of `layers` blocks over `tokens` tokens: q, k, v and output projections (4 w^2) and
    the MLP (2 mlp_ratio w^2) per token, 2 FLOPs a multiply-add, plus attention's QK^T and AV."""
    per_token = 2 * (4 + 2 * mlp_ratio) * width ** 2
    return layers * (tokens * per_token + (2 * 2 * tokens ** 2 * width if attention else 0))


def conv_flops(module, *inputs) -> float:
    """Forward FLOPs of the convolutions of `module` on `inputs`, whole batches (meta tensors will do)."""
    total = 0.0

    def count(conv, _, output):
        nonlocal total
        total += 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] \
            * output[0, 0].numel() * len(output) // conv.groups
    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        module(*inputs)
    for h in hooks:
        h.remove()
    return total


def base_encoder_flops(model: ALIT) -> float:
    """Forward FLOPs of the base tokenizer's encoding of one image, what stage 1 runs for its targets: the
    encoder, then the VQGAN's nearest-code search or the VAE's posterior; counted by torch on the model's
    device (meta tensors will do), as the VAE's encoder attends at its token grid."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.base.encode(torch.zeros(1, 3, model.config.image_size, model.config.image_size,
                                      device=next(model.parameters()).device))
    return counter.get_total_flops()


def alit_forward_flops(cfg: ALITConfig, attention=True, iters=None) -> float:
    """Forward FLOPs of one image decoding iterations `iters` (0-based; default all, as stage 1), the
    encoder run up to the last. At iteration t (1-based) both transformers see 1 + N + t*K tokens;
    t*K latents are factorized, quantized and embedded; the head's logits give the expected code (over
    a VAE the head regresses the C numbers of each 2D token)."""
    N, K, D, E = cfg.num_image_tokens, cfg.tokens_per_iter, cfg.encoder_width, cfg.decoder_width
    C, codes = cfg.base_config.latent_channels, cfg.base_config.prediction_size
    decoded = {t + 1 for t in (range(cfg.rollout_iters) if iters is None else iters)}
    flops = 2 * N * 3 * cfg.patch_size ** 2 * (D - C)  # patch embedding
    for t in range(1, max(decoded) + 1):
        tokens, latents = 1 + N + t * K, t * K
        flops += transformer_flops(D, cfg.encoder_layers, tokens, cfg.mlp_ratio, attention)
        if t in decoded:
            flops += transformer_flops(E, cfg.decoder_layers, tokens, cfg.mlp_ratio, attention)
            flops += 2 * latents * (D * cfg.latent_dim + cfg.latent_dim * E)  # factorize + decoder_embed
            flops += 2 * latents * cfg.latent_codebook_size * cfg.latent_dim  # codebook distances
            flops += 2 * N * (E * 2 * E + 2 * E * codes)  # the head
            if cfg.base_config.discrete:
                flops += 2 * N * codes * C  # the expected code: softmax(logits) @ codebook
    return flops


def stage1_flops(cfg: ALITConfig, batch: int, base_flops: float) -> float:
    """One stage-1 step: backward = 2 x forward for ALIT; the frozen base encoder runs forward only."""
    return batch * (3 * alit_forward_flops(cfg) + base_flops)


def stage2_flops(cfg: ALITConfig, vqgan_flops: float, lpips_flops: float, disc_flops: float) -> float:
    """One stage-2 image, averaged over the iterations taking turns to carry the loss (§A.5): ALIT up to
    it and the whole VQGAN, trained now, 3x forward; LPIPS (on both images) 2x, for the backwards of the
    loss and the adaptive weight; with GAN terms the discriminator 3x on each of fake, fake and real."""
    T = cfg.rollout_iters
    alit = sum(alit_forward_flops(cfg, iters=[t]) for t in range(T)) / T
    return 3 * (alit + vqgan_flops) + 2 * lpips_flops + GAN_FRACTION * 9 * disc_flops


def per_image_flops(cfg: ALITConfig, disc_layers: int = 3) -> dict:
    """Training FLOPs an image costs in each stage at `cfg`'s size (its base, LPIPS and a PatchGAN of
    `disc_layers`, convolutions counted on meta tensors)."""
    with torch.device("meta"):
        base, lpips, disc = make_base(cfg), LPIPS(), PatchDiscriminator(num_layers=disc_layers)
        image = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
        latents = torch.zeros(1, cfg.base_config.latent_channels, cfg.grid_size, cfg.grid_size)
    encoder, decoder = conv_flops(base.encoder, image), conv_flops(base.decoder, latents)
    return {"stage1": stage1_flops(cfg, 1, encoder),
            "stage2": stage2_flops(cfg, encoder + decoder, conv_flops(lpips, image, image), conv_flops(disc, image))}


def paper_cost(utilisation: float) -> dict:
    """H100-hours of the paper's `small` (Ours-S) runs, 200 epochs a stage (at global batch 256 and 96 in
    the official scripts, which the FLOPs do not depend on)."""
    per_image = per_image_flops(make_config("small"))
    rate = utilisation * H100_BF16_FLOPS
    seconds = {k: v * PAPER_EPOCHS * IMAGENET100_TRAIN_IMAGES / rate for k, v in per_image.items()}
    return {"utilisation": utilisation, "epochs": PAPER_EPOCHS, "images": IMAGENET100_TRAIN_IMAGES,
            **{f"{k}_tflop_per_image": v / 1e12 for k, v in per_image.items()},
            **{f"{k}_gpu_hours": v / 3600 for k, v in seconds.items()}}


# -----------------------------------------------------------------------------
# The gradient all-reduce

def ring_all_reduce_seconds(nbytes: float, ranks: int, bus_bytes_per_second: float) -> float:
    """A ring all-reduce sends and receives 2 (n - 1) / n of the buffer on every rank, at the slowest link."""
    return 2 * (ranks - 1) / ranks * nbytes / bus_bytes_per_second


def trained_parameters(cfg: ALITConfig) -> dict:
    """Parameters of the ALIT at `cfg`: "stage1" trained there (all but the base), "stage2" trained there
    (all but the base's codebook and the halted token: train_stage2.trainable), "all"; counted on meta."""
    with torch.device("meta"):
        model = ALIT(cfg)
    frozen = [p for m in model.base.modules() if isinstance(m, VectorQuantizer) for p in m.parameters()]
    everything = sum(p.numel() for p in model.parameters())
    return {"stage1": sum(p.numel() for p in model.alit_parameters()), "all": everything,
            "stage2": everything - sum(p.numel() for p in frozen) - model.halted_token.numel()}


def all_reduce_seconds(gradient_bytes: float, ranks: int, nodes: int) -> float:
    """A step's gradient all-reduce on `ranks` GPUs: over NVLink on one node, over the node link across
    several (the slowest link sets the ring's pace)."""
    if ranks <= 1:
        return 0.0
    return ring_all_reduce_seconds(gradient_bytes, ranks, NVLINK_BUS_BYTES_PER_SECOND if nodes <= 1
                                   else NODE_LINK_BYTES_PER_SECOND)


def gradient_all_reduce(cfg: ALITConfig, paper: dict) -> dict:
    """The float32 gradients DDP all-reduces each step of the paper's runs, and how long that takes on one
    8-GPU NVLink node and across two, against the step's compute on an H100 at the paper utilisation.
    Every ALIT weight serves all 8 iterations, so no gradient is ready before the backward's last part
    reaches the first iteration: the reduction cannot hide behind the backward."""
    counts = trained_parameters(cfg)
    rate = paper["utilisation"] * H100_BF16_FLOPS
    result = {}
    for stage, batch in zip(("stage1", "stage2"), PAPER_BATCH_PER_GPU):
        compute = batch * paper[f"{stage}_tflop_per_image"] * 1e12 / rate
        seconds = {"one_node": all_reduce_seconds(4 * counts[stage], 8, 1),
                   "two_nodes": all_reduce_seconds(4 * counts[stage], 16, 2)}
        result[stage] = {"gradient_bytes": 4 * counts[stage], "step_compute_seconds": compute,
                         **{f"{k}_seconds": v for k, v in seconds.items()},
                         **{f"{k}_overhead": v / compute for k, v in seconds.items()}}
    return result


# -----------------------------------------------------------------------------
# Checkpoints

# Bytes a checkpoint holds a parameter in: float32 weights; with its EMA and AdamW's two moments if trained
TRAINED_CHECKPOINT_BYTES = 4 + 4 + 8
FROZEN_CHECKPOINT_BYTES = 4


def checkpoint_bytes(trained: int, frozen: int = 0, trained_without_ema: int = 0) -> int:
    """A checkpoint's size: trained parameters with their EMA and AdamW's moments, frozen ones alone, and
    a discriminator's (trained, no EMA). RNG states and configs are kilobytes."""
    return TRAINED_CHECKPOINT_BYTES * trained + FROZEN_CHECKPOINT_BYTES * frozen + 12 * trained_without_ema


def discriminator_parameters(disc_layers: int, disc_channels: int = 64) -> int:
    with torch.device("meta"):
        discriminator = PatchDiscriminator(base_channels=disc_channels, num_layers=disc_layers)
        return sum(p.numel() for p in discriminator.parameters())
