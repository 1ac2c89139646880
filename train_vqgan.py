"""Train the 2D tokenizer: the VQGAN (or VAE) that ALIT distils (the stage before stage 1).

Paper: ALIT, arXiv:2411.02393, §2 builds on a pre-trained VQGAN (Esser et al.
2021) or VAE. The paper downloads one; this script trains one from scratch, with the
VQGAN losses: L1 + LPIPS reconstruction, the codebook loss, and a PatchGAN
hinge loss whose weight is set adaptively (VQGAN eq. 7) and switched on at a
discriminator start step. With --base vae (vae.py) the codebook loss gives way
to LDM's KL term (Rombach et al. 2022), with its weight.

    python train_vqgan.py                                  # tiny VQGAN on `shapes`, CPU ok
    python train_vqgan.py --base vae                       # tiny VAE on `shapes`, in out/vae
    python train_vqgan.py --dataset imagenet100 --data-dir /data/imagenet   # the imagenet preset (PAPER_RUN)
    torchrun --nproc_per_node=8 train_vqgan.py ...         # DDP: gloo on CPU, nccl on CUDA
"""
import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from typing import Annotated, Literal
from pathlib import Path

import torch

from data import build_dataset, first_images, save_image_grid, train_batches
from losses import PatchDiscriminator, gan_weight_at, generator_gan_loss, load_perceptual, reconstruction_loss
from quantize import count_codes
from training import (PAPER_DATASETS, LoopConfig, PerRank, RunPlan, StopSignal, adamw, autocast, average_over_ranks,
                      broadcast_parameters, check_data, check_flags, check_loop_flags, check_out_dir,
                      discriminator_step, due, finish, flag_error, lr_at, parse_flags, planned_device, print_dry_run,
                      progress, run_plan, save_training_state, schedule_in_epochs, set_lr, setup_training,
                      start_or_resume, stop_step, use_bf16, with_recipe, wrap_ddp)
from vae import PRESETS as VAE_PRESETS
from vae import VAE, VAEConfig
from vqgan import PRESETS, VQGAN, VQGANConfig, conv_memory_format
from weights import find_perceptual


@dataclass
class TrainConfig(LoopConfig):
    out_dir: Annotated[str, "folder"] = "out/vqgan"  # (--base vae: out/vae)
    # The tokenizer: a VQGAN (codebook indices), or a KL autoencoder (vae.py: continuous tokens; the
    # presets map to its own, imagenet -> kl16 (MAR's KL-16), tiny -> tiny; the codebook flags do not apply)
    base: Literal["vqgan", "vae"] = "vqgan"
    # The VQGAN's size; default: imagenet (the official VQGAN's: 256x256 -> 16x16, 1024 codes) with
    # --dataset imagenet100/imagenet, else tiny (32x32 -> 8x8, 256 codes)
    preset: str | None = None
    steps: Annotated[int, ">= 1"] = 800
    # AdamW's peak learning rate (betas 0.5, 0.9, as taming). Default: OFFICIAL_RECIPE's 4e-4 at 256x256;
    # CPU_RECIPE's 1e-3 below, where 800 steps must do (the tiny VQGAN's val L1 after them: 0.047 at
    # 1e-3, 0.056 at 4e-4)
    lr: Annotated[float | None, "> 0"] = None
    weight_decay: Annotated[float, ">= 0"] = 0.0  # VQGAN training uses none
    l1_weight: Annotated[float, ">= 0"] = 1.0  # weight of the L1 term of the reconstruction loss
    perceptual_weight: Annotated[float, ">= 0"] = 1.0  # applies only when --vgg16-weights/--lpips-weights are given
    codebook_weight: Annotated[float, ">= 0"] = 1.0  # weight of the quantizer's codebook + commitment loss
    # --base vae: weight of the KL term against the per-pixel reconstruction loss (LDM's kl-f16 config:
    # 1e-6 on sums over pixels and latents, the same ratio here on the means)
    kl_weight: Annotated[float, ">= 0"] = 1e-6
    # Step at which the adversarial term switches on. It helps only once the autoencoder has
    # converged (taming starts it after ~250k steps), so by default it never starts.
    disc_start: Annotated[int, ">= 0"] = 10 ** 9
    disc_weight: Annotated[float, ">= 0"] = 0.5  # scales the adaptive weight (taming: disc_weight)
    disc_channels: Annotated[int, ">= 1"] = 64  # width of the PatchGAN's first layer
    disc_layers: Annotated[int, ">= 1"] = 2  # PatchGAN depth: 3 for 256x256 (70x70 patches); 2 keeps a 32x32 image at 2x2 patches
    disc_lr: Annotated[float, "> 0"] = 4e-4  # the discriminator's AdamW learning rate
    restart_every: Annotated[int, ">= 0"] = 50  # move codes unused for so many steps onto recent encoder outputs (0: never)
    eval_only: bool = False  # only report val L1 and codebook usage of <out_dir>/ckpt.pt
    val_images: Annotated[int, ">= 1"] = 1000  # images of the val split measured at the end of training
    # torchvision's VGG16; default: vgg16-397923af.pth if it is in $ALIT_WEIGHTS or the torch hub cache
    vgg16_weights: Annotated[str | None, "file"] = None
    # The LPIPS v0.1 VGG head (or with --vgg16-weights alone, a combined LPIPS state dict); default:
    # vgg.pth if it is in $ALIT_WEIGHTS or the torch hub cache
    lpips_weights: Annotated[str | None, "file"] = None


# What the recipe fields above default to, by the image size (training.with_recipe).
OFFICIAL_RECIPE = dict(lr=4e-4)
CPU_RECIPE = dict(lr=1e-3)


# Set by --dataset imagenet100/imagenet unless given: the official VQGAN's size, a 70x70 PatchGAN, and
# (not in the paper, whose VQGAN comes pretrained) stage 2's schedule: 200 epochs, 20 of them warmup,
# at a global batch of 96 (12 images per GPU on 8 GPUs) on however many ranks.
PAPER_RUN = dict(preset="imagenet", disc_layers=3, batch_size=12, global_batch=96, epochs=200, warmup_epochs=20)


# --base vae: the VAE preset of each --preset.
VAE_PRESET = {"imagenet": "kl16", "tiny": "tiny"}


def implied_defaults(given: dict) -> dict:
    where = {"out_dir": "out/vae"} if given.get("base") == "vae" else {}  # beside the VQGAN's out/vqgan
    return {**(PAPER_RUN if given.get("dataset") in PAPER_DATASETS else {"preset": "tiny"}), **where}


def parse_args(argv=None):
    train, model_flags = parse_flags(argv, __doc__, TrainConfig, VQGANConfig, PRESETS, implied_defaults)
    check_flags(check_loop_flags(train, PRESETS))
    if train.base == "vae":
        vqgan_only = sorted(set(model_flags) - {f.name for f in dataclasses.fields(VAEConfig)})
        check_flags([(not vqgan_only, f"--{(vqgan_only or ['x'])[0].replace('_', '-')} is a VQGAN flag; "
                                      "--base vae has no codebook")])
    try:
        if train.base == "vae":
            model_cfg = VAEConfig(**{**VAE_PRESETS[VAE_PRESET[train.preset]], **model_flags})
        else:
            model_cfg = VQGANConfig(**{**PRESETS[train.preset], **model_flags})
    except ValueError as error:  # its own checks (sizes that must divide), naming the flags
        sys.exit(flag_error(error, VQGANConfig))
    train = with_recipe(train, model_cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPE)
    check_data(train.dataset, train.data_dir)
    train = schedule_in_epochs(train)
    try:
        vgg16, lpips = find_perceptual(train.vgg16_weights, train.lpips_weights)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    return dataclasses.replace(train, vgg16_weights=vgg16 and str(vgg16), lpips_weights=lpips and str(lpips)), model_cfg


def main(argv=None):
    train, model_cfg = parse_args(argv)
    if train.eval_only:
        return evaluate_checkpoint(train)
    if train.dry_run:  # no gradient checkpointing here, so no memory estimate
        print_dry_run(plan(train, planned_device(train.device)))
        return None
    train = check_out_dir(train, "recon_*.png")
    ctx = setup_training(train)
    run = plan(train, ctx.device)
    bf16, workers = run.precision == "bf16", run.workers_per_rank
    torch.manual_seed(train.seed)  # the same initial weights on every rank

    model = (VAE if train.base == "vae" else VQGAN)(model_cfg).to(ctx.device, memory_format=conv_memory_format(ctx.device))
    # Outside DDP (training.discriminator_step averages its gradients by hand): rank 0's start on every rank.
    discriminator = PatchDiscriminator(base_channels=train.disc_channels, num_layers=train.disc_layers).to(ctx.device)
    broadcast_parameters(discriminator, ctx)
    perceptual = load_perceptual(train.vgg16_weights, train.lpips_weights, ctx.device, ctx.log)
    optimizer = adamw(model.parameters(), train.lr, (0.5, 0.9), train.weight_decay, ctx.device)
    disc_optimizer = adamw(discriminator.parameters(), train.disc_lr, (0.5, 0.9), 0.0, ctx.device)

    stateful = {"model": model, "discriminator": discriminator, "optimizer": optimizer,
                "disc_optimizer": disc_optimizer}  # what a checkpoint saves and resume restores
    # Each rank counts the codes its own batches use: dead-code restarts go on from every rank's count.
    per_rank = {"code_restarts": PerRank(model.quantize.restart_state, model.quantize.load_restart_state)
                } if train.base == "vqgan" else {}
    step = start_or_resume(train, dataclasses.asdict(model_cfg), stateful, ctx, "recon_*.png", per_rank)
    ctx.log(f"{train.base.upper()} {model_cfg}\ntraining {train}\n{run}")

    ddp_model = wrap_ddp(model, ctx, bf16_gradients=run.all_reduce == "bf16")
    dataset = build_dataset(train.dataset, "train", model_cfg.image_size, train.data_dir, num_images=train.train_images)
    val_images = first_images(build_dataset(train.dataset, "val", model_cfg.image_size, train.data_dir), 8)
    val_images = val_images.to(ctx.device)
    batches = train_batches(dataset, train.batch_size, ctx.rank, ctx.world_size, train.seed, step * train.grad_accum,
                            workers, train.max_bad_images, pin_memory=ctx.device.type == "cuda")

    bar = progress(train.steps, step, ctx.is_main)
    stop = stop_step(train, step)
    stop_signal = StopSignal(ctx, train.dist_timeout)  # SIGTERM/SIGINT: stop after this step, with a checkpoint
    while step < stop:
        logs = train_step(model, ddp_model, discriminator, optimizer, disc_optimizer, batches, step, train, perceptual,
                          ctx, bf16)
        step += 1
        bar.update(1)
        if stop_signal.requested():
            stop = step  # every due() below fires: logs, grid and checkpoint at this step, then the loop ends
        if due(step, train.log_every, stop):
            log_losses(bar, logs, train.base)
        if ctx.is_main and due(step, train.sample_every, stop):
            save_reconstructions(model, val_images, Path(train.out_dir) / f"recon_{step:06d}.png")
        if due(step, train.save_every, stop):
            save_training_state(train, step, stateful, dataclasses.asdict(model_cfg), ctx, per_rank)
    finish(ctx, train, bar, stop_signal, step)
    if ctx.is_main and step == train.steps:
        ctx.log(format_val_metrics(evaluate_vqgan(model, train)))
    return model


def evaluate_checkpoint(train: TrainConfig):
    """--eval-only: the metrics of the checkpoint in --out-dir, without training."""
    try:
        model = (VAE if train.base == "vae" else VQGAN).from_checkpoint(Path(train.out_dir) / "ckpt.pt")
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: --eval-only: {error}")
    print(format_val_metrics(evaluate_vqgan(model, train)))
    return model


def log_losses(bar, logs, base: str):
    """This step's losses, averaged over ranks, on the progress bar."""
    average_over_ranks([logs])
    rec, vq, ppl, usage, dl = logs.tolist()
    if base == "vae":  # the KL term, the posterior's mean std and the tokens' std
        bar.set_postfix(rec=f"{rec:.4f}", kl=f"{vq:.2e}", std=f"{ppl:.3f}", tokens=f"{usage:.2f}", d=f"{dl:.3f}")
    else:
        bar.set_postfix(rec=f"{rec:.4f}", vq=f"{vq:.4f}", ppl=f"{ppl:.1f}", used=f"{usage:.2f}", d=f"{dl:.3f}")


def plan(train: TrainConfig, device) -> RunPlan:
    """The run plan on `device` (the peak lr is --lr whatever the batch, as taming's)."""
    bf16 = use_bf16(train.bf16, device)
    return run_plan(train, device, train.lr, bf16)


def train_step(model: VQGAN, ddp_model, discriminator, optimizer, disc_optimizer, batches, step: int,
               train: TrainConfig, perceptual, ctx, bf16: bool) -> torch.Tensor:
    """One step over --grad-accum micro-batches: the autoencoder (L1 + LPIPS, the codebook loss, and
    from --disc-start the adaptively weighted GAN term), the dead-code restarts, then the discriminator.
    Returns [reconstruction loss, VQ loss, perplexity, codebook usage, discriminator loss] on the device,
    without waiting for it; a VAE: the KL term instead of the codebook loss, [reconstruction loss,
    weighted KL term, the posterior's mean std, the tokens' std, discriminator loss]."""
    lr_scale = lr_at(step, 1.0, train.warmup_steps, train.steps, train.min_lr_ratio)
    set_lr(optimizer, train.lr * lr_scale)
    set_lr(disc_optimizer, train.disc_lr * lr_scale)
    gan_on = gan_weight_at(step, [(train.disc_start, 1.0)]) > 0
    reals, fakes, logs = [], [], torch.zeros(4, device=ctx.device)
    for micro in range(train.grad_accum):
        _, (images, _) = next(batches)
        images = images.to(ctx.device, non_blocking=True)
        last_micro = micro == train.grad_accum - 1
        with (ddp_model.no_sync() if ctx.enabled and not last_micro else contextlib.nullcontext()):
            with autocast(ctx.device, bf16):
                recon, q = ddp_model(images)
                rec_loss = reconstruction_loss(recon.float(), images, perceptual, train.l1_weight,
                                               train.perceptual_weight)
                if train.base == "vae":  # q: the posterior. LDM sums both terms; over means the KL gets 1/pixels
                    kl_loss = train.kl_weight * q.kl().mean() / images[0].numel()
                    loss = rec_loss + kl_loss
                else:
                    loss = rec_loss + train.codebook_weight * q.loss
                if gan_on:
                    loss = loss + generator_gan_loss(discriminator, recon, rec_loss, model.decoder.last_layer,
                                                     train.disc_weight)
            (loss / train.grad_accum).backward()
        reals.append(images)
        fakes.append(recon.detach())
        if train.base == "vae":
            logs += torch.stack([rec_loss.detach().float(), kl_loss.detach().float(), q.std.detach().float().mean(),
                                 (q.mean * model.config.scale).detach().float().std()])
        else:
            logs += torch.stack([rec_loss.detach().float(), q.loss.detach(), q.perplexity, q.usage])
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if train.base == "vqgan" and train.restart_every and (step + 1) % train.restart_every == 0 and step + 1 < train.steps:
        model.quantize.restart_dead_codes()
    d_loss = discriminator_step(discriminator, disc_optimizer, reals, fakes, autocast(ctx.device, bf16)) if gan_on \
        else torch.zeros((), device=ctx.device)
    return torch.cat([logs / train.grad_accum, d_loss[None]])


@torch.no_grad()
def evaluate_vqgan(model: VQGAN, train: TrainConfig) -> dict:
    """Val L1 and codebook usage over the first `val_images` val images; a VAE: L1 from the posterior
    mean (what ALIT's evaluation encodes) and the tokens' spread."""
    if isinstance(model, VAE):
        return evaluate_vae(model, train)
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
        counts += count_codes(q.indices, len(counts))
    model.train(was_training)
    probs = counts / counts.sum()
    return {"images": len(subset), "l1": l1 / len(subset), "codes_used": int((counts > 0).sum()),
            "codebook_size": len(counts), "perplexity": torch.exp(-(probs * probs.clamp(min=1e-10).log()).sum()).item()}


@torch.no_grad()
def evaluate_vae(model: VAE, train: TrainConfig) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dataset = build_dataset(train.dataset, "val", model.config.image_size, train.data_dir,
                            num_images=train.val_images if train.dataset == "shapes" else None)
    subset = torch.utils.data.Subset(dataset, range(min(train.val_images, len(dataset))))
    l1, tokens = 0.0, []
    for images, _ in torch.utils.data.DataLoader(subset, batch_size=100):
        images = images.to(device)
        batch_tokens, _ = model.encode(images, sample=False)
        l1 += (model.decode_tokens(batch_tokens).float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)).sum().item()
        tokens.append(batch_tokens.float().cpu())
    model.train(was_training)
    tokens = torch.cat(tokens)
    return {"images": len(subset), "l1": l1 / len(subset), "token_std": tokens.std().item(),
            "token_abs_mean": tokens.abs().mean().item()}


def format_val_metrics(m: dict) -> str:
    if "token_std" in m:
        return (f"val: L1 {m['l1']:.4f} over {m['images']} images (posterior mean); tokens (x scale): std "
                f"{m['token_std']:.3f}, mean |.| {m['token_abs_mean']:.3f}")
    return (f"val: L1 {m['l1']:.4f} over {m['images']} images; codebook usage {m['codes_used']}/{m['codebook_size']} "
            f"codes ({100 * m['codes_used'] / m['codebook_size']:.0f}%), perplexity {m['perplexity']:.1f}")


@torch.no_grad()
def save_reconstructions(model, images, path):
    """Row 1: originals; row 2: reconstructions through the codebook."""
    was_training = model.training
    model.eval()
    recon = model.decode_tokens(model.encode(images, sample=False)[0]) if isinstance(model, VAE) else model(images)[0]
    model.train(was_training)
    save_image_grid(torch.cat([images, recon.float().clamp(0, 1)]), path, nrow=len(images),
                    row_labels=["original", "VAE" if isinstance(model, VAE) else "VQGAN"])


if __name__ == "__main__":
    main()
