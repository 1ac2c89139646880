"""Stage 2: full fine-tuning in pixel space, with an adversarial loss.

Paper: ALIT, arXiv:2411.02393, §A.5 "Training Details": "we jointly fine-tune
both the base image tokenizer modules and the latent-distillation
encoder-decoder modules with losses directly at the pixel-space ...
pixel-level reconstruction and adversarial losses ... We optimize for
reconstruction loss for first few epochs, later switching to both ... we only
compute loss at only [one] iteration, thus we only need to perform recurrent
processing of the latent-distillation encoder in each training run, executing
the latent-distillation decoder and the base tokenizer decoder only once ...
No dynamic halting is performed in this phase."

Images are decoded differentiably: softmax(logits) @ VQGAN codebook gives a soft
code grid that the (now trainable) VQGAN decoder turns into pixels; over a VAE the
predicted 2D tokens go to the (now trainable) VAE decoder. The base comes with the
checkpoint (its config's `base`).

    python train_stage2.py                      # tiny preset, from out/stage1/ckpt.pt
    torchrun --nproc_per_node=8 train_stage2.py --dataset imagenet100 --data-dir /data/imagenet  # PAPER_RUN
    python train_stage2.py --dataset imagenet100 --data-dir /data/imagenet \
        --official alit_small_vqgan_quantized_latents.pth   # fine-tune an official checkpoint
"""
import contextlib
import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from data import build_dataset, first_images, train_batches
from losses import PatchDiscriminator, gan_weight_at, generator_gan_loss, load_perceptual, reconstruction_loss
from memory import stage2_plan
from model import ALIT, PRESETS, ALITConfig, make_config
from pretrained import load_stage1
from training import (EMA, PAPER_DATASETS, LoopConfig, StopSignal, adamw, autocast, average_over_ranks,
                      broadcast_parameters, check_data, check_flags, check_loop_flags, check_out_dir,
                      discriminator_step, due, finish, lr_at, parse_flags, planned_device, print_dry_run, progress,
                      save_rollout, save_training_state, schedule_in_epochs, set_lr, setup_training, start_or_resume,
                      stop_step, to_stderr, with_recipe, wrap_ddp)
from vqgan import conv_memory_format
from weights import find_perceptual, find_weights


def parse_gan_schedule(text: str) -> list:
    """fraction:weight pairs, fractions in [0, 1], weights >= 0

    '0.5:0.1,0.75:0.2' -> [(0.5, 0.1), (0.75, 0.2)], sorted by fraction; ValueError says what is wrong."""
    pairs = []
    for item in text.split(","):
        try:
            fraction, weight = (float(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"{item!r} in {text!r} is not fraction:weight (like 0.5:0.1)") from None
        if not (0 <= fraction <= 1 and weight >= 0):
            raise ValueError(f"{item!r}: the fraction must be in [0, 1] and the weight >= 0")
        pairs.append((fraction, weight))
    return sorted(pairs)


@dataclass
class TrainConfig(LoopConfig):
    stage1_ckpt: Annotated[str, "file"] = "out/stage1/ckpt.pt"  # the train_stage1.py checkpoint fine-tuning starts from ...
    # ... or an official ALIT checkpoint (ALIT.from_official): a path, or a name looked up in
    # $ALIT_WEIGHTS and the torch hub cache
    official: Annotated[str | None, "file"] = None
    heads: Annotated[str | None, "list of int >= 1"] = None  # official checkpoints of non-preset sizes: "8" or "8,8" (encoder, decoder)
    # Default: the checkpoint's (with --dataset imagenet100/imagenet a 256x256 one); if given, the
    # checkpoint must hold a model of this preset
    preset: str | None = None
    out_dir: Annotated[str, "folder"] = "out/stage2"
    steps: Annotated[int, ">= 1"] = 600
    batch_size: Annotated[int, ">= 1"] = 16
    warmup_steps: Annotated[int, ">= 0"] = 20
    # lr = base_lr * global batch / 256. Default: OFFICIAL_RECIPE's 1e-4 at 256x256 (the paper); below
    # that (the CPU presets) CPU_RECIPE's 8e-3, lr 5e-4 at batch 16.
    base_lr: Annotated[float | None, "> 0"] = None
    weight_decay: Annotated[float, ">= 0"] = 0.05  # on weight matrices only
    ema_decay: Annotated[float, "in [0, 1)"] = 0.999  # of the weight average evaluation uses (warmed up: training.EMA)
    iteration_order: Literal["cycle", "random"] = "cycle"  # which iteration carries the loss: t = step mod T, or drawn
    l1_weight: Annotated[float, ">= 0"] = 1.0  # weight of the L1 term of the reconstruction loss
    perceptual_weight: Annotated[float, ">= 0"] = 1.0  # applies only when --vgg16-weights/--lpips-weights are given
    quantizer_loss_weight: Annotated[float, ">= 0"] = 1.0  # weight of the latent quantizer's codebook + commitment loss
    # Adversarial schedule: reconstruction only until the first fraction of the steps, then the GAN
    # weight rises in two steps (the official code raises it in two steps too; its values are not
    # in the paper).
    gan_schedule: Annotated[str, parse_gan_schedule] = "0.5:0.1,0.75:0.2"  # fraction_of_steps:disc_weight, ...
    disc_per_iteration: bool = False  # the official code: one discriminator per rollout iteration
    disc_channels: Annotated[int, ">= 1"] = 64  # width of the PatchGAN's first layer
    disc_layers: Annotated[int, ">= 1"] = 2  # PatchGAN depth: 3 for 256x256 images (70x70 patches), 2 for 32x32
    disc_lr: Annotated[float, "> 0"] = 1e-4  # the discriminator's AdamW learning rate
    # Recompute the transformer blocks in the backward pass instead of keeping their activations (~30%
    # more time). Default: on where a step would not fit the GPU (training.grad_checkpointing says so)
    grad_checkpoint: bool | None = None
    # torchvision's VGG16; default: vgg16-397923af.pth if it is in $ALIT_WEIGHTS or the torch hub cache
    vgg16_weights: Annotated[str | None, "file"] = None
    # The LPIPS v0.1 VGG head (or with --vgg16-weights alone, a combined LPIPS state dict); default:
    # vgg.pth if it is in $ALIT_WEIGHTS or the torch hub cache
    lpips_weights: Annotated[str | None, "file"] = None


# What the recipe fields above default to, by the model's image size (training.with_recipe).
OFFICIAL_RECIPE = dict(base_lr=1e-4)
CPU_RECIPE = dict(base_lr=8e-3)


# The paper's run, set by --dataset imagenet100/imagenet unless given: the official run script's 200
# epochs, 20 of them warmup, at its global batch of 96 (12 images per GPU on 8 GPUs) on however many
# ranks (training.fit_global_batch), and a 70x70 PatchGAN for 256x256 images.
PAPER_RUN = dict(batch_size=12, global_batch=96, epochs=200, warmup_epochs=20, disc_layers=3)


def parse_args(argv=None):
    train, _ = parse_flags(argv, __doc__, TrainConfig, presets=PRESETS,
                           implied=lambda given: PAPER_RUN if given.get("dataset") in PAPER_DATASETS else {})
    check_flags(check_loop_flags(train, PRESETS))
    check_data(train.dataset, train.data_dir)
    train = schedule_in_epochs(train)
    try:
        vgg16, lpips = find_perceptual(train.vgg16_weights, train.lpips_weights)
        official = find_weights("alit", "--official", train.official) if train.official else None
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    return dataclasses.replace(train, vgg16_weights=vgg16 and str(vgg16), lpips_weights=lpips and str(lpips),
                               official=official and str(official))


def trainable(model: ALIT) -> ALIT:
    """Everything trains except what no loss reaches here: the VQGAN codebook (the soft code reads it
    detached, as the official code does) and the halted token (halting is off)."""
    model.requires_grad_(True)
    if model.config.base == "vqgan":
        model.vqgan.quantize.requires_grad_(False)
    model.halted_token.requires_grad_(False)
    return model


def config_for_plan(train: TrainConfig) -> ALITConfig:
    """--dry-run's model: the start checkpoint's where it exists, else of --preset (by default the paper's
    with --dataset imagenet100/imagenet)."""
    if Path(train.official or train.stage1_ckpt).is_file():
        return load_stage1(train).config
    return make_config(train.preset or ("small" if train.dataset in PAPER_DATASETS else "tiny"))


def model_for_plan(model_cfg: ALITConfig) -> ALIT:
    """--dry-run's model, for the memory estimate only: random weights of that config."""
    return trainable(ALIT(model_cfg))


def main(argv=None):
    train = parse_args(argv)
    if train.dry_run:  # a model only if the memory estimate is made, on the CPU
        model_cfg = config_for_plan(train)
        train = with_recipe(train, model_cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPE)
        model_of = functools.cache(lambda: model_for_plan(model_cfg))
        print_dry_run(stage2_plan(train, model_of, None, planned_device(train.device), torch.device("cpu"), to_stderr))
        return None
    train = check_out_dir(train, "rollout_*.png")
    ctx = setup_training(train)
    torch.manual_seed(train.seed)

    model = trainable(load_stage1(train)).to(ctx.device)
    model.base.to(memory_format=conv_memory_format(ctx.device))
    cfg = model.config
    train = with_recipe(train, cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPE)  # the recipe of the checkpoint's size
    discriminators = build_discriminators(train, cfg.rollout_iters, ctx)
    perceptual = load_perceptual(train.vgg16_weights, train.lpips_weights, ctx.device, ctx.log)
    run = stage2_plan(train, lambda: model, perceptual, ctx.device, ctx.device, ctx.log)
    lr, bf16, workers = run.lr, run.precision == "bf16", run.workers_per_rank
    model.set_grad_checkpointing(run.grad_checkpoint)
    # The discriminators' parameters live in their own optimizer only (the official code also
    # passes them to the generator's optimizer, where weight decay would shrink them).
    optimizer = adamw(model.parameters(), lr, (0.9, 0.95), train.weight_decay, ctx.device)
    disc_optimizer = adamw(discriminators.parameters(), train.disc_lr, (0.5, 0.9), 0.0, ctx.device)
    ema = EMA(model, train.ema_decay)
    schedule = [(fraction * train.steps, weight) for fraction, weight in parse_gan_schedule(train.gan_schedule)]
    stateful = {"model": model, "ema": ema, "discriminators": discriminators, "optimizer": optimizer,
                "disc_optimizer": disc_optimizer}  # what a checkpoint saves and resume restores
    step = start_or_resume(train, cfg.to_dict(), stateful, ctx, "rollout_*.png")
    ctx.log(f"ALIT {cfg}\ntraining {train}\n{run}")
    if train.compile:
        model.compile_transformers()
    # At t = 0 the encoder never recurses, so encoder_ln_recursive gets no gradient that step.
    ddp_model = wrap_ddp(model, ctx, True, run.all_reduce == "bf16")
    dataset = build_dataset(train.dataset, "train", cfg.image_size, train.data_dir, num_images=train.train_images)
    val_images = first_images(build_dataset(train.dataset, "val", cfg.image_size, train.data_dir), 8).to(ctx.device)
    batches = train_batches(dataset, train.batch_size, ctx.rank, ctx.world_size, train.seed, step * train.grad_accum,
                            workers, train.max_bad_images, pin_memory=ctx.device.type == "cuda")

    bar = progress(train.steps, step, ctx.is_main)
    stop = stop_step(train, step)
    stop_signal = StopSignal(ctx, train.dist_timeout)  # SIGTERM/SIGINT: stop after this step, with a checkpoint
    logs = torch.zeros(5, device=ctx.device)  # summed since the last log
    while step < stop:
        disc_weight = gan_weight_at(step, schedule)
        logs += train_step(model, ddp_model, discriminators, optimizer, disc_optimizer, ema, batches, step, lr,
                           disc_weight, train, perceptual, ctx, bf16)
        step += 1
        bar.update(1)
        if stop_signal.requested():
            stop = step  # every due() below fires: logs, grid and checkpoint at this step, then the loop ends
        if due(step, train.log_every, stop) or due(step, train.save_every, stop):
            log_losses(bar, logs, disc_weight, step, train)
        if ctx.is_main and due(step, train.sample_every, stop):  # the pixels the loss sees
            save_rollout(model, val_images, Path(train.out_dir) / f"rollout_{step:06d}.png")
        if due(step, train.save_every, stop):
            save_training_state(train, step, stateful, cfg.to_dict(), ctx)
    finish(ctx, train, bar, stop_signal, step)
    return model


def build_discriminators(train: TrainConfig, iters: int, ctx) -> torch.nn.ModuleList:
    """The PatchGAN (one per iteration with --disc-per-iteration), the same on every rank: trained
    outside DDP (training.discriminator_step), it starts from rank 0's weights."""
    discriminators = torch.nn.ModuleList(
        PatchDiscriminator(base_channels=train.disc_channels, num_layers=train.disc_layers)
        for _ in range(iters if train.disc_per_iteration else 1)).to(ctx.device)
    broadcast_parameters(discriminators, ctx)
    return discriminators


def train_step(model: ALIT, ddp_model, discriminators, optimizer, disc_optimizer, ema: EMA, batches, step: int,
               lr: float, disc_weight: float, train: TrainConfig, perceptual, ctx, bf16: bool) -> torch.Tensor:
    """One step (§A.5) over --grad-accum micro-batches: the encoder up to this step's iteration, the
    decoders once, the loss in pixel space (L1 + LPIPS, and with disc_weight > 0 the adaptively weighted
    GAN term), AdamW, the EMA, then the discriminator. Returns [reconstruction loss, discriminator loss,
    latent codebook usage, perplexity, 1] on the device, without waiting for it."""
    set_lr(optimizer, lr_at(step, lr, train.warmup_steps, train.steps, train.min_lr_ratio))
    set_lr(disc_optimizer, lr_at(step, train.disc_lr, train.warmup_steps, train.steps, train.min_lr_ratio))
    t = loss_iteration(step, model.config.rollout_iters, train)
    discriminator = discriminators[t if train.disc_per_iteration else 0]
    reals, fakes, logs = [], [], torch.zeros(3, device=ctx.device)
    for micro in range(train.grad_accum):
        _, (images, _) = next(batches)
        images = images.to(ctx.device, non_blocking=True)
        last_micro = micro == train.grad_accum - 1
        with (ddp_model.no_sync() if ctx.enabled and not last_micro else contextlib.nullcontext()):
            with autocast(ctx.device, bf16):
                (record,) = ddp_model(images, iters=[t], reconstruct=True)
                recon = record.recon.float()
                rec_loss = reconstruction_loss(recon, images, perceptual, train.l1_weight, train.perceptual_weight)
                q = record.quantized
                loss = rec_loss + train.quantizer_loss_weight * q.loss if q else rec_loss
                if disc_weight > 0:
                    loss = loss + generator_gan_loss(discriminator, recon, rec_loss, model.base.decoder.last_layer,
                                                     disc_weight)
            (loss / train.grad_accum).backward()
        reals.append(images)
        fakes.append(recon.detach())
        logs += torch.stack([rec_loss.detach(), q.usage, q.perplexity]) if q else \
            torch.stack([rec_loss.detach(), *torch.zeros(2, device=ctx.device)])
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model, step)
    d_loss = torch.zeros((), device=ctx.device)
    if disc_weight > 0:
        d_loss = discriminator_step(discriminator, disc_optimizer, reals, fakes, autocast(ctx.device, bf16))
    rec, usage, perplexity = logs / train.grad_accum
    return torch.stack([rec, d_loss, usage, perplexity, torch.ones_like(d_loss)])


def loss_iteration(step: int, iters: int, train: TrainConfig) -> int:
    """The one iteration that carries this step's loss (§A.5): the encoder runs up to it, the decoder
    and the VQGAN decoder once. Drawn the same on every rank, so that all ranks run the same graph."""
    if train.iteration_order == "cycle":
        return step % iters
    return int(torch.randint(iters, (), generator=torch.Generator().manual_seed(train.seed + step)))


def log_losses(bar, logs, disc_weight, step, train):
    """Losses since the last log, averaged over ranks, on the progress bar; a non-finite loss ends
    the run before the checkpoint it would have spoiled."""
    average_over_ranks([logs])
    rec, dl, usage, ppl = (logs[:4] / logs[4]).tolist()
    if rec != rec:  # NaN
        sys.exit(f"error: non-finite loss by step {step}; stopped without saving, "
                 f"so {Path(train.out_dir) / 'ckpt.pt'} is the last good checkpoint")
    bar.set_postfix(rec=f"{rec:.4f}", d=f"{dl:.3f}", gan=f"{disc_weight:g}", used1d=f"{usage:.2f}", ppl1d=f"{ppl:.0f}")
    logs.zero_()


if __name__ == "__main__":
    main()
