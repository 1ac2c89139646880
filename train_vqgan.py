"""Train the 2D tokenizer: the VQGAN that ALIT distils (the stage before stage 1).

Paper: ALIT, arXiv:2411.02393, §2 builds on a pre-trained VQGAN (Esser et al.
2021). The paper downloads one; this script trains one from scratch, with the
VQGAN losses: L1 + LPIPS reconstruction, the codebook loss, and a PatchGAN
hinge loss whose weight is set adaptively (VQGAN eq. 7) and switched on at a
discriminator start step.

    python train_vqgan.py                                  # tiny VQGAN on `shapes`, CPU ok
    python train_vqgan.py --dataset imagenet100 --data-dir /data/imagenet --preset imagenet \
        --vgg16-weights vgg16-397923af.pth --lpips-weights vgg.pth
    torchrun --nproc_per_node=8 train_vqgan.py ...         # DDP: gloo on CPU, nccl on CUDA

This file also holds the training-loop pieces train_stage1.py and train_stage2.py
import (distributed setup, flags from dataclasses, LR schedule, EMA, atomic
checkpoints with RNG states), so the three loops share one implementation.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import math
import os
import random
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DATASETS, build_dataset, save_image_grid, train_batches
from losses import (LPIPS, PatchDiscriminator, adaptive_gan_weight, adopt_weight, generator_adversarial_loss,
                    hinge_d_loss)
from vqgan import PRESETS, VQGAN, VQGANConfig


# -----------------------------------------------------------------------------
# Shared training-loop pieces

@dataclass
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def setup_distributed(device_flag: str = "auto") -> Distributed:
    """The one place the device is chosen. `RANK` in the environment (torchrun) means DDP:
    nccl with CUDA, gloo without; the device is cuda:LOCAL_RANK or cpu (which keeps freed memory)."""
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if "RANK" in os.environ:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        rank, local_rank, world = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    return Distributed(rank, local_rank, world, device)


def keep_freed_memory() -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the OS.

    glibc's malloc serves large blocks (above 32 MB at most, e.g. the VQGAN encoder's 256x256
    activations) straight from mmap, unmaps them on free, and trims the heap's free top: every
    step then faults the same memory back in page by page, zeroed by the kernel. Measured here,
    writing a fresh 64 MB tensor runs at 7 GB/s and an already mapped one at 24 GB/s. With both
    thresholds raised the heap settles after two steps, a little above the step's peak (a `mid`
    stage-1 process: 4.2 GB resident against 3.2 GB), and stops faulting: the `mid` step runs
    1.2x faster. Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    # Blocks up to 1 GB come from the heap; -1 (as size_t, the largest size) never trims it.
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def wrap_ddp(module, ctx: Distributed, find_unused_parameters=False):
    if not ctx.enabled:
        return module
    return DDP(module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (and so about twice as fast as float32): CUDA with
    bf16 support, or a CPU with AVX512-BF16 / AMX. Elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast where asked for (no GradScaler needed: bf16 has float32's range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def all_reduce_mean(tensors, ctx: Distributed):
    """Average tensors across ranks in place (used for log values and the discriminator's grads)."""
    if ctx.enabled:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(ctx.world_size)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * base_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel


def adamw(params, lr, betas, weight_decay, device):
    """AdamW with weight decay on weight matrices and kernels only (not on biases, norms, embeddings
    of shape (n,)). Fused on CUDA and on the CPU: one pass over the weights instead of the ~10 of
    the for-each version (`small`'s 207M weights on 2 cores: 0.18 s a step instead of 0.95 s)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in FUSED_ADAMW_DEVICES)


class EMA:
    """Exponential moving average of the trainable parameters, used for evaluation."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def decay_at(self, step: int) -> float:
        """Warmed-up decay, min(decay, (1 + step) / (10 + step)): with a fixed 0.999 the average of a
        300-step run would still be 0.999^300 = 74% the random initialisation."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module, step: int):
        params = dict(module.named_parameters())
        names = list(self.shadow)
        weight = 1 - self.decay_at(step)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach() for n in names], weight)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def copy_to(self, module):
        """Write the averaged weights into `module` (e.g. a copy used for evaluation)."""
        with torch.no_grad():
            params = dict(module.named_parameters())
            for name, value in self.shadow.items():
                params[name].copy_(value)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(ctx: Distributed) -> list:
    """Every rank's RNG state, in rank order (collective: all ranks must call it)."""
    if not ctx.enabled:
        return [rng_state()]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(path: Path, state: dict):
    """Atomic: write a temporary file, then rename it over the old one, so an interrupted
    save never leaves a broken checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Our own checkpoints (they hold RNG states and configs: trusted, written by this code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_state(stateful: dict, step: int, model_config: dict, train, ctx, **extra) -> dict:
    """What a checkpoint holds: the state dict of every object in `stateful` (checkpoint key ->
    object), the step, both configs and every rank's RNG state. Collective under DDP (the RNG
    states are gathered), so every rank calls it."""
    return {**{key: obj.state_dict() for key, obj in stateful.items()}, "step": step,
            "model_config": model_config, "train_config": dataclasses.asdict(train),
            "rng": gather_rng_states(ctx), **extra}


def resume(path, model_config: dict, stateful: dict, ctx, log) -> dict:
    """--resume: load `path` into every object of `stateful` (checkpoint key -> object with
    load_state_dict), restore this rank's RNG state, and return the checkpoint (step, extras)."""
    ckpt = load_checkpoint(path)
    if ckpt["model_config"] != model_config:
        sys.exit(f"error: {path} was trained with another model config: {ckpt['model_config']}")
    for key, obj in stateful.items():
        obj.load_state_dict(ckpt[key])
    set_rng_state(ckpt["rng"][ctx.rank])
    log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt


def parse_int_tuple(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v.strip())


def add_dataclass_flags(parser, cls, skip=()):
    """One --flag per dataclass field (underscores -> dashes), default None = keep the preset's value.
    Deriving the flags from the fields keeps their names from drifting."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(f.type):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = ([a for a in typing.get_args(f.type) if a is not type(None)] or [f.type])[0]  # X | None -> X
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif kind is tuple:
            group.add_argument(flag, type=parse_int_tuple, default=None, metavar="A,B,...")
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, default=None)


def dataclass_overrides(args, cls) -> dict:
    """The fields of `cls` the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def check_flags(checks):
    """Out-of-range flags stop before any work starts; each message names the flag."""
    errors = [message for ok, message in checks if not ok]
    if errors:
        sys.exit("error: " + "; ".join(errors))


def progress(total, initial, enabled):
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def generator_gan_loss(discriminator, recon, rec_loss, last_layer, disc_weight):
    """The generator's adversarial term, weighted adaptively (VQGAN eq. 7): the ratio of the
    reconstruction and GAN gradient norms at the decoder's last layer, times disc_weight."""
    discriminator.requires_grad_(False)  # trained in its own step; no grads from the generator's loss
    g_loss = generator_adversarial_loss(discriminator(recon))
    discriminator.requires_grad_(True)
    return disc_weight * adaptive_gan_weight(rec_loss, g_loss, last_layer) * g_loss


def discriminator_step(discriminator, optimizer, images, recon, ctx, bf16):
    """One hinge-loss update on real images vs the (detached) reconstructions.

    The gradients are averaged across ranks by hand: two forward passes per step (real, fake)
    keep the BatchNorm statistics of real and fake batches apart, as in taming, which DDP's
    one-backward-per-forward bookkeeping does not allow.
    """
    with autocast(ctx.device, bf16):
        loss = hinge_d_loss(discriminator(images), discriminator(recon.detach()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_mean([p.grad for p in discriminator.parameters()], ctx)
    optimizer.step()
    return loss.detach()


def restart_dead_codes(quantizer, ctx: Distributed) -> None:
    """Restart unused codes (rank 0 decides and draws; every rank gets its codebook)."""
    quantizer.restart_dead_codes()
    if ctx.enabled:
        dist.broadcast(quantizer.embedding.weight.data, src=0)


# -----------------------------------------------------------------------------
# The VQGAN training run

@dataclass
class LoopConfig:
    """Flags every training script shares; each script's TrainConfig adds its own and may
    override these defaults."""
    dataset: str = "shapes"
    data_dir: str | None = None
    out_dir: str = "out/run"
    preset: str = "tiny"
    steps: int = 1000  # optimizer steps; the LR schedule spans them
    stop_after: int = 0  # stop this run after so many steps (0: never); --resume continues on the same schedule
    batch_size: int = 32  # per rank (and per micro-step)
    train_images: int | None = None  # use only the first so many training images (shapes: the split's size)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio x the peak LR
    grad_clip: float = 1.0
    num_workers: int = 0  # DataLoader processes per rank
    log_every: int = 25
    sample_every: int = 250  # write a reconstruction grid PNG every so many steps
    save_every: int = 250
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available
    bf16: bool | None = None  # bf16 autocast; default: on where bf16 is native (recent GPUs, AVX512-BF16/AMX CPUs)
    compile: bool = False  # torch.compile the transformer blocks (ALIT stages; the first steps pay for compiling)
    resume: bool = False  # continue from <out_dir>/ckpt.pt


@dataclass
class TrainConfig(LoopConfig):
    out_dir: str = "out/vqgan"
    steps: int = 800
    lr: float = 4e-4
    weight_decay: float = 0.0  # VQGAN training uses none
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0  # applies only when --vgg16-weights/--lpips-weights are given
    codebook_weight: float = 1.0
    # Step at which the adversarial term switches on. It only helps once the autoencoder has
    # converged (taming starts it after ~250k steps); within the tiny default run it would add
    # artifacts (L1 0.06 -> 0.085 on shapes), so by default it never starts.
    disc_start: int = 10 ** 9
    disc_weight: float = 0.5  # scales the adaptive weight (taming: disc_weight)
    disc_channels: int = 64
    disc_layers: int = 2  # 3 for 256x256 (70x70 PatchGAN); 2 keeps a 32x32 image at a 2x2 patch grid
    disc_lr: float = 4e-4
    restart_every: int = 50  # move codes unused for so many steps onto recent encoder outputs (0: never)
    eval_only: bool = False  # only report val L1 and codebook usage of <out_dir>/ckpt.pt
    val_images: int = 1000  # images of the val split measured at the end of training
    vgg16_weights: str | None = None  # torchvision's vgg16-397923af.pth
    lpips_weights: str | None = None  # the lpips package's weights/v0.1/vgg.pth (or a combined LPIPS state dict)


def check_loop_flags(train: LoopConfig, presets) -> list:
    return [
        (train.dataset in DATASETS, f"--dataset must be one of {DATASETS}"),
        (train.preset is None or train.preset in presets, f"--preset must be one of {sorted(presets)}"),
        (train.steps > 0, "--steps must be positive"),
        (train.stop_after >= 0, "--stop-after must be >= 0"),
        (train.batch_size > 0, "--batch-size must be positive"),
        (0 <= train.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (min(train.log_every, train.sample_every, train.save_every) > 0, "--log/sample/save-every must be positive"),
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, TrainConfig)
    add_dataclass_flags(parser, VQGANConfig)
    args = parser.parse_args(argv)
    train = TrainConfig(**dataclass_overrides(args, TrainConfig))
    check_flags(check_loop_flags(train, PRESETS) + [
        (train.lr > 0 and train.disc_lr > 0, "--lr and --disc-lr must be positive"),
        (train.lpips_weights is None or train.vgg16_weights is not None, "--lpips-weights needs --vgg16-weights"),
    ])
    model_cfg = VQGANConfig(**{**PRESETS[train.preset], **dataclass_overrides(args, VQGANConfig)})
    return train, model_cfg


def main(argv=None):
    train, model_cfg = parse_args(argv)
    if train.eval_only:
        model = load_vqgan(Path(train.out_dir) / "ckpt.pt")
        print(format_val_metrics(evaluate_vqgan(model, train)))
        return model
    ctx = setup_distributed(train.device)
    bf16 = native_bf16(ctx.device) if train.bf16 is None else train.bf16
    out = Path(train.out_dir)
    torch.manual_seed(train.seed + ctx.rank)
    log = print if ctx.is_main else (lambda *a, **k: None)

    model = VQGAN(model_cfg).to(ctx.device)
    discriminator = PatchDiscriminator(base_channels=train.disc_channels, num_layers=train.disc_layers).to(ctx.device)
    perceptual = None
    if train.vgg16_weights:
        perceptual = LPIPS.from_pretrained(train.vgg16_weights, train.lpips_weights).to(ctx.device)
    else:
        log("no --vgg16-weights/--lpips-weights given: training without the perceptual (LPIPS) loss")
    optimizer = adamw(model.parameters(), train.lr, (0.5, 0.9), train.weight_decay, ctx.device)
    disc_optimizer = adamw(discriminator.parameters(), train.disc_lr, (0.5, 0.9), 0.0, ctx.device)

    stateful = {"model": model, "discriminator": discriminator, "optimizer": optimizer,
                "disc_optimizer": disc_optimizer}  # what a checkpoint saves and resume restores
    step = 0
    if train.resume:
        ckpt = resume(out / "ckpt.pt", dataclasses.asdict(model_cfg), stateful, ctx, log)
        step = ckpt["step"]
        model.quantize.counts_since_restart = ckpt["code_counts"]
    log(f"VQGAN {model_cfg}\ntraining {train}\ndevice {ctx.device}, {ctx.world_size} rank(s), bf16 {bf16}")

    ddp_model = wrap_ddp(model, ctx)
    dataset = build_dataset(train.dataset, "train", model_cfg.image_size, train.data_dir, num_images=train.train_images)
    val_images = torch.stack([build_dataset(train.dataset, "val", model_cfg.image_size, train.data_dir)[i][0]
                              for i in range(8)]).to(ctx.device)
    batches = train_batches(dataset, train.batch_size, ctx.rank, ctx.world_size, train.seed, step, train.num_workers)

    bar = progress(train.steps, step, ctx.is_main)
    last_layer = model.decoder.last_layer
    stop = min(train.steps, step + train.stop_after) if train.stop_after else train.steps
    while step < stop:
        _, (images, _) = next(batches)
        images = images.to(ctx.device, non_blocking=True)
        lr_scale = lr_at(step, 1.0, train.warmup_steps, train.steps, train.min_lr_ratio)
        set_lr(optimizer, train.lr * lr_scale)
        set_lr(disc_optimizer, train.disc_lr * lr_scale)
        gan_on = adopt_weight(1.0, step, train.disc_start) > 0

        # Generator (autoencoder) step.
        with autocast(ctx.device, bf16):
            recon, q = ddp_model(images)
            rec_loss = train.l1_weight * (recon.float() - images).abs().mean()
            if perceptual is not None:
                rec_loss = rec_loss + train.perceptual_weight * perceptual(recon.float(), images).mean()
            loss = rec_loss + train.codebook_weight * q.loss
            if gan_on:
                loss = loss + generator_gan_loss(discriminator, recon, rec_loss, last_layer, train.disc_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        if train.restart_every and (step + 1) % train.restart_every == 0 and step + 1 < train.steps:
            restart_dead_codes(model.quantize, ctx)
        d_loss = discriminator_step(discriminator, disc_optimizer, images, recon, ctx, bf16) if gan_on else None

        step += 1
        bar.update(1)
        if step % train.log_every == 0 or step == stop:
            logs = torch.stack([rec_loss.detach().float(), q.loss.detach(), q.perplexity, q.usage,
                                d_loss if gan_on else torch.zeros((), device=ctx.device)])
            all_reduce_mean([logs], ctx)
            rec, vq, ppl, usage, dl = logs.tolist()
            bar.set_postfix(rec=f"{rec:.4f}", vq=f"{vq:.4f}", ppl=f"{ppl:.1f}", used=f"{usage:.2f}", d=f"{dl:.3f}")
        if ctx.is_main and (step % train.sample_every == 0 or step == stop):
            save_reconstructions(model, val_images, out / f"recon_{step:06d}.png")
        if step % train.save_every == 0 or step == stop:
            state = checkpoint_state(stateful, step, dataclasses.asdict(model_cfg), train, ctx,
                                     code_counts=model.quantize.counts_since_restart)  # for the next dead-code restart
            if ctx.is_main:
                save_checkpoint(out / "ckpt.pt", state)
    bar.close()
    if ctx.enabled:
        dist.destroy_process_group()
    if ctx.is_main and step == train.steps:
        log(format_val_metrics(evaluate_vqgan(model, train)))
    log(f"done: {out / 'ckpt.pt'}")
    return model


@torch.no_grad()
def evaluate_vqgan(model: VQGAN, train: TrainConfig) -> dict:
    """Val L1 and codebook usage over the first `val_images` val images."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dataset = build_dataset(train.dataset, "val", model.config.image_size, train.data_dir,
                            num_images=train.val_images if train.dataset == "shapes" else None)
    subset = torch.utils.data.Subset(dataset, range(min(train.val_images, len(dataset))))
    l1, counts = 0.0, torch.zeros(model.config.codebook_size, device=device)
    for images, _ in torch.utils.data.DataLoader(subset, batch_size=100):
        images = images.to(device)
        recon, q = model(images)
        l1 += (recon.float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)).sum().item()
        counts += torch.bincount(q.indices.flatten(), minlength=len(counts))
    model.train(was_training)
    probs = counts / counts.sum()
    return {"images": len(subset), "l1": l1 / len(subset), "codes_used": int((counts > 0).sum()),
            "codebook_size": len(counts), "perplexity": torch.exp(-(probs * probs.clamp(min=1e-10).log()).sum()).item()}


def format_val_metrics(m: dict) -> str:
    return (f"val: L1 {m['l1']:.4f} over {m['images']} images; codebook usage {m['codes_used']}/{m['codebook_size']} "
            f"codes ({100 * m['codes_used'] / m['codebook_size']:.0f}%), perplexity {m['perplexity']:.1f}")


@torch.no_grad()
def save_reconstructions(model, images, path):
    """Row 1: originals; row 2: reconstructions through the codebook."""
    was_training = model.training
    model.eval()
    recon, _ = model(images)
    model.train(was_training)
    save_image_grid(torch.cat([images, recon.float().clamp(0, 1)]), path, nrow=len(images))


def load_vqgan(path, device="cpu") -> VQGAN:
    """A VQGAN trained by this script (its checkpoint's model weights and config)."""
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt or "discriminator" not in ckpt:
        raise ValueError(f"{path} is not a train_vqgan.py checkpoint (for the official VQGAN use --vqgan-official)")
    model = VQGAN(VQGANConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


if __name__ == "__main__":
    main()
