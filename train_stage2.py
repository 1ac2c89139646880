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
import functools
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import checkpoint
import distributed
import flags
import plan
from data import build_dataset, first_images, to_unit, train_batches
from distributed import autocast, conv_memory_format
from flags import FILE, PAPER_DATASETS, Custom, Number, Numbers
from losses import (PatchDiscriminator, discriminator_step, gan_weight_at, generator_gan_loss, load_perceptual,
                    reconstruction_loss)
from model import ALIT, PRESETS, make_config
from optim import EMA, adamw, lr_at, set_lr
from plots import save_rollout
from quantize import VectorQuantizer
from weights import find_perceptual, find_weights, load_alit


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


# What --base-lr defaults to, by the model's image size (flags.with_recipe).
OFFICIAL_RECIPE = dict(base_lr=1e-4)
CPU_RECIPE = dict(base_lr=8e-3)

# The paper's run, set by --dataset imagenet100/imagenet unless given: the official run script's 200
# epochs, 20 of them warm-up, at its global batch of 96 (12 images per GPU on 8 GPUs) on however many
# ranks (plan.fit_global_batch), and a 70x70 PatchGAN for 256x256 images.
PAPER_RUN = dict(batch_size=12, global_batch=96, epochs=200, warmup_epochs=20, disc_layers=3)


def parser() -> flags.Parser:
    p = flags.Parser(__doc__)
    flags.add_run_flags(p, out_dir="out/stage2", steps=600, batch_size=16, warmup_steps=20)
    p.add("--stage1-ckpt", "out/stage1/ckpt.pt", FILE, "the train_stage1.py checkpoint fine-tuning starts from ...")
    p.add("--official", None, FILE, "... or an official ALIT checkpoint (ALIT.from_official): a path, or a name "
          "looked up in $ALIT_WEIGHTS and the torch hub cache")
    p.add("--heads", None, Numbers(Number(int, 1)), "official checkpoints of non-preset sizes: 8 or 8,8 (encoder, "
          "decoder)")
    p.add("--preset", None, str, "if given, the checkpoint must hold a model of this preset", choices=sorted(PRESETS),
          default_text="the checkpoint's (with --dataset imagenet100/imagenet a 256x256 one)")
    p.add("--base-lr", None, Number(float, 0, ends="(]"), "lr = base lr x global batch / 256",
          default_text="the official 1e-4 at 256x256; below, 8e-3 (lr 5e-4 at batch 16)")
    p.add("--weight-decay", 0.05, Number(float, 0), "on weight matrices only")
    p.add("--ema-decay", 0.999, Number(float, 0, 1, "[)"), "of the weight average evaluation uses (warmed up: "
          "optim.EMA)")
    p.add("--iteration-order", "cycle", str, "which iteration carries the loss: t = step mod T, or drawn",
          choices=("cycle", "random"))
    p.add("--l1-weight", 1.0, Number(float, 0), "of the L1 term of the reconstruction loss")
    p.add("--perceptual-weight", 1.0, Number(float, 0), "of LPIPS (only with --vgg16-weights/--lpips-weights)")
    p.add("--quantizer-loss-weight", 1.0, Number(float, 0), "of the latent quantizer's codebook + commitment loss")
    p.add("--gan-schedule", "0.5:0.1,0.75:0.2", Custom(parse_gan_schedule), "reconstruction only until the first "
          "fraction of the steps, then the GAN weight rises in steps (the official code's two; values not in the "
          "paper)")
    p.add("--disc-per-iteration", False, bool, "the official code: one discriminator per rollout iteration")
    p.add("--disc-channels", 64, Number(int, 1), "width of the PatchGAN's first layer")
    p.add("--disc-layers", 2, Number(int, 1), "PatchGAN depth: 3 for 256x256 images (70x70 patches), 2 for 32x32")
    p.add("--disc-lr", 1e-4, Number(float, 0, ends="(]"), "the discriminator's AdamW learning rate")
    p.add("--grad-checkpoint", None, bool, "recompute the transformer blocks in the backward pass (~30%% more "
          "time)", default_text="on where a step would not fit the GPU (plan.grad_checkpointing says so)")
    p.add("--vgg16-weights", None, FILE, "torchvision's VGG16 (the LPIPS trunk)",
          default_text="vgg16-397923af.pth if it is in $ALIT_WEIGHTS or the torch hub cache")
    p.add("--lpips-weights", None, FILE, "the LPIPS v0.1 VGG head (with --vgg16-weights alone: a combined LPIPS "
          "state dict)", default_text="vgg.pth if it is in $ALIT_WEIGHTS or the torch hub cache")
    return p


def parse_args(argv=None):
    args, given = flags.parse_run_args(parser(), argv, PAPER_RUN, {})
    plan.fit_global_batch(args, given)
    flags.check_data(args.dataset, args.data_dir)
    plan.schedule_in_epochs(args)
    try:
        vgg16, lpips = find_perceptual(args.vgg16_weights, args.lpips_weights)
        official = find_weights("alit", "--official", args.official) if args.official else None
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    args.vgg16_weights, args.lpips_weights = vgg16 and str(vgg16), lpips and str(lpips)
    args.official = official and str(official)
    return args


class Schedule(NamedTuple):
    lr: float  # ALIT's learning rate at this step
    disc_lr: float  # the discriminator's
    iteration: int  # the one iteration (0-based) that carries this step's loss
    gan_weight: float  # of the adversarial term; 0: reconstruction only


def schedule(step: int, args, peak_lr: float, iters: int) -> Schedule:
    """Stage 2 at `step` (§A.5): both learning rates' warm-up and cosine decay; the iteration carrying the
    loss (the encoder runs up to it, the decoder and the base's decoder once), in turn (--iteration-order
    cycle) or drawn from (seed, step), alike on every rank so that all run the same graph; and the GAN
    weight: reconstruction only for the first part of the run, then --gan-schedule's steps."""
    lr = lambda peak: lr_at(step, peak, args.warmup_steps, args.steps, args.min_lr_ratio)  # noqa: E731
    iteration = step % iters if args.iteration_order == "cycle" else \
        int(torch.randint(iters, (), generator=torch.Generator().manual_seed(args.seed + step)))
    gan = [(fraction * args.steps, weight) for fraction, weight in parse_gan_schedule(args.gan_schedule)]
    return Schedule(lr(peak_lr), lr(args.disc_lr), iteration, gan_weight_at(step, gan))


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:  # the plan as one JSON line, without a GPU; a model only if the memory estimate needs one
        model_cfg = config_for_plan(args)
        flags.with_recipe(args, model_cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPE)
        checkpoint.intervals(args, model_cfg.image_size)
        model_of = functools.cache(lambda: model_for_plan(model_cfg))
        plan.print_dry_run(plan.stage2_plan(args, model_cfg, model_of, None, distributed.planned_device(args.device),
                                            torch.device("cpu"), distributed.to_stderr))
        return None
    ctx = distributed.setup(args.device, args.dist_timeout, shared_folder=args.out_dir,
                            keep_freed=args.keep_freed_memory)
    checkpoint.check_out_dir(args, "rollout_*.png", ctx)  # rank 0 decides: start, or resume
    torch.manual_seed(args.seed)

    # The model: stage 1's (or an official one), everything trainable, and the discriminator(s), the same on
    # every rank: trained outside DDP (losses.discriminator_step), they start from rank 0's weights.
    model = trainable(start_model(args)).to(ctx.device)
    model.base.to(memory_format=conv_memory_format(ctx.device))
    cfg = model.config
    flags.with_recipe(args, cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPE)  # the recipe of the checkpoint's size
    checkpoint.intervals(args, cfg.image_size)
    discriminators = torch.nn.ModuleList(
        PatchDiscriminator(base_channels=args.disc_channels, num_layers=args.disc_layers)
        for _ in range(cfg.rollout_iters if args.disc_per_iteration else 1)).to(ctx.device)
    distributed.broadcast_parameters(discriminators, ctx)
    perceptual = load_perceptual(args.vgg16_weights, args.lpips_weights, ctx.device, ctx.log)
    run = plan.stage2_plan(args, cfg, lambda: model, perceptual, ctx.device, ctx.device, ctx.log)
    bf16 = run.precision == "bf16"
    model.set_grad_checkpointing(run.grad_checkpoint)

    # The optimizers (the discriminators' parameters in their own only: the official code also passes them to
    # the generator's, where weight decay would shrink them), the EMA, and where the run starts.
    optimizer = adamw(model.parameters(), run.lr, (0.9, 0.95), args.weight_decay, ctx.device)
    disc_optimizer = adamw(discriminators.parameters(), args.disc_lr, (0.5, 0.9), 0.0, ctx.device)
    ema = EMA(model, args.ema_decay)
    stateful = {"model": model, "ema": ema, "discriminators": discriminators, "optimizer": optimizer,
                "disc_optimizer": disc_optimizer}  # what a checkpoint saves and resume restores
    step = checkpoint.start_or_resume(args, cfg.to_dict(), stateful, ctx, "rollout_*.png")
    ctx.log(f"ALIT {cfg}\ntraining {vars(args)}\n{run}")
    if args.compile:
        model.compile_transformers()
    # At t = 0 the encoder never recurses, so encoder_ln_recursive gets no gradient that step.
    ddp_model = distributed.wrap_ddp(model, ctx, True, run.all_reduce == "bf16")

    dataset = build_dataset(args.dataset, "train", cfg.image_size, args.data_dir, num_images=args.train_images)
    val_images = first_images(build_dataset(args.dataset, "val", cfg.image_size, args.data_dir), 8).to(ctx.device)
    batches = train_batches(dataset, args.batch_size, ctx.rank, ctx.world_size, args.seed,
                            checkpoint.first_micro_batch(args, ctx), run.workers_per_rank, args.max_bad_images,
                            pin_memory=ctx.device.type == "cuda")

    # The loop (§A.5): the encoder up to this step's iteration, the decoders once, the loss in pixel space
    # (L1 + LPIPS, and once the GAN is on the adaptively weighted adversarial term), AdamW, the EMA, then the
    # discriminator's step; logs, grids and checkpoints when due, every rank after the same step.
    bar = tqdm(total=args.steps, initial=step, disable=not ctx.is_main, dynamic_ncols=True, smoothing=0.1)
    logs = torch.zeros(5, device=ctx.device)  # [rec. loss, disc. loss, latent codes used, perplexity, 1], summed
    stop = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    stop_signal = distributed.StopSignal(ctx, args.stop_check_every)  # stop after this step, saved
    clock = checkpoint.Clock(args.save_minutes)
    while step < stop:
        now = schedule(step, args, run.lr, cfg.rollout_iters)
        set_lr(optimizer, now.lr)
        set_lr(disc_optimizer, now.disc_lr)
        discriminator = discriminators[now.iteration if args.disc_per_iteration else 0]
        reals, fakes, step_logs = [], [], torch.zeros(3, device=ctx.device)
        for micro in range(args.grad_accum):
            _, (images, _) = next(batches)
            images = to_unit(images.to(ctx.device, non_blocking=True))  # uint8 through the loader
            with ctx.no_sync(ddp_model, last_micro_step=micro == args.grad_accum - 1):
                with autocast(ctx.device, bf16):
                    (record,) = ddp_model(images, iters=[now.iteration], reconstruct=True)
                    recon = record.recon.float()
                    rec_loss = reconstruction_loss(recon, images, perceptual, args.l1_weight, args.perceptual_weight)
                    q = record.quantized
                    loss = rec_loss + args.quantizer_loss_weight * q.loss if q else rec_loss
                    if now.gan_weight > 0:
                        loss = loss + generator_gan_loss(discriminator, recon, rec_loss, model.base.decoder.last_layer,
                                                         now.gan_weight)
                (loss / args.grad_accum).backward()
            reals.append(images)
            fakes.append(recon.detach())
            step_logs += torch.stack([rec_loss.detach(), q.usage, q.perplexity]) if q else \
                torch.stack([rec_loss.detach(), *torch.zeros(2, device=ctx.device)])
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step)
        d_loss = discriminator_step(discriminator, disc_optimizer, reals, fakes, autocast(ctx.device, bf16)) \
            if now.gan_weight > 0 else torch.zeros((), device=ctx.device)
        rec, usage, perplexity = step_logs / args.grad_accum
        logs += torch.stack([rec, d_loss, usage, perplexity, torch.ones_like(d_loss)])
        step += 1
        bar.update(1)

        stopping, save_now = stop_signal.poll(step, ctx.is_main and clock.due())  # the same on every rank
        if stopping:
            stop = step  # the log and the checkpoint of this step, nothing else, then the loop ends
        save_now = save_now or checkpoint.due(step, args.save_every) or step == stop
        if step % args.log_every == 0 or save_now:
            # Over all ranks; a non-finite loss ends the run before the checkpoint it would spoil.
            distributed.average_over_ranks([logs])
            rec, d, used, ppl = (logs[:4] / logs[4]).tolist()
            if rec != rec:  # NaN
                distributed.end()
                sys.exit(f"error: non-finite loss by step {step}; stopped without saving, "
                         f"so {Path(args.out_dir) / 'ckpt.pt'} is the last good checkpoint")
            bar.set_postfix(rec=f"{rec:.4f}", d=f"{d:.3f}", gan=f"{now.gan_weight:g}", used1d=f"{used:.2f}",
                            ppl1d=f"{ppl:.0f}")
            logs.zero_()
        if save_now:
            checkpoint.save(args, step, stateful, cfg.to_dict(), ctx)
            clock.reset()
        if ctx.is_main and (checkpoint.due(step, args.sample_every) or step == stop and not stopping):
            save_rollout(model, val_images, Path(args.out_dir) / f"rollout_{step:06d}.png")  # the pixels the loss sees
    checkpoint.wait()
    bar.close()
    distributed.finish(ctx, stop_signal, step, args.steps, args.out_dir)
    return model


def start_model(args) -> ALIT:
    """The model stage 2 starts from, with its raw weights (training continues from them, not from the EMA):
    the stage-1 checkpoint or an official one. With --preset, it must hold a model of that preset; with
    --dataset imagenet100/imagenet and no --preset, a 256x256 one (the paper's)."""
    flag, path = ("--official", args.official) if args.official else ("--stage1-ckpt", args.stage1_ckpt)
    model = load_alit(args.official, args.heads, args.stage1_ckpt, "--stage1-ckpt", False,
                      "run train_stage1.py first, or pass --official CKPT")
    cfg = model.train().config
    if args.preset is not None:
        try:  # the base may be the official one or our own: compare everything else
            expected = make_config(args.preset, base=cfg.base, vqgan=cfg.vqgan, vae=cfg.vae,
                                   official_vae_function=cfg.official_vae_function).to_dict()
        except ValueError:
            expected = None
        if expected != cfg.to_dict():
            sys.exit(f"error: {path} holds a model of another preset than --preset {args.preset!r}: {cfg}")
    elif args.dataset in PAPER_DATASETS and not flags.paper_scale(cfg.image_size):
        sys.exit(f"error: {flag} {path} holds a {cfg.image_size}x{cfg.image_size} model, not the paper's "
                 f"256x256 one that --dataset {args.dataset} trains: pass {flag} of a --dataset {args.dataset} "
                 "stage-1 run or --official CKPT (or --preset tiny to fine-tune a tiny model on these images)")
    return model


def trainable(model: ALIT) -> ALIT:
    """Everything trains but what no loss reaches here: the base's codebook (the expected code reads the
    VQGAN's codebook detached, as the official code does) and the halted token (halting is off)."""
    model.requires_grad_(True)
    for module in model.base.modules():
        if isinstance(module, VectorQuantizer):
            module.requires_grad_(False)
    model.halted_token.requires_grad_(False)
    return model


def model_for_plan(model_cfg) -> ALIT:
    """--dry-run's model, for the memory estimate only: random weights of that config."""
    return trainable(ALIT(model_cfg))


def config_for_plan(args):
    """--dry-run's model: the start checkpoint's where it exists, else of --preset (by default the paper's
    with --dataset imagenet100/imagenet)."""
    if Path(args.official or args.stage1_ckpt).is_file():
        return start_model(args).config
    return make_config(args.preset or ("small" if args.dataset in PAPER_DATASETS else "tiny"))


if __name__ == "__main__":
    main()
