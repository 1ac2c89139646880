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
import dataclasses
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import distributed
import flags
import plan
import vae
import vqgan
from data import build_dataset, first_images, to_unit, train_batches
from distributed import autocast, conv_memory_format
from flags import FILE, Number, Numbers
from losses import (PatchDiscriminator, discriminator_step, gan_weight_at, generator_gan_loss, load_perceptual,
                    reconstruction_loss)
from optim import adamw, lr_at, set_lr
from plots import save_image_grid
from quantize import VectorQuantizer, count_codes
from vae import VAE, VAEConfig
from vqgan import VQGAN, VQGANConfig
from weights import find_perceptual, load_model

# The tokenizers this script trains, by --base: the class, its config, its presets by --preset, and the flag
# weighting the term its training adds to the reconstruction loss (latent_loss: the codebook's, the KL).
BASES = {"vqgan": (VQGAN, VQGANConfig, vqgan.PRESETS, "codebook_weight"),
         "vae": (VAE, VAEConfig, {"imagenet": vae.PRESETS["kl16"], "tiny": vae.PRESETS["tiny"]}, "kl_weight")}

# What --lr defaults to, by the image size (flags.with_recipe).
OFFICIAL_RECIPE = dict(lr=4e-4)
CPU_RECIPE = dict(lr=1e-3)

# Set by --dataset imagenet100/imagenet unless given: the official VQGAN's size, a 70x70 PatchGAN, and
# (not in the paper, whose VQGAN comes pretrained) stage 2's schedule: 200 epochs, 20 of them warm-up,
# at a global batch of 96 (12 images per GPU on 8 GPUs) on however many ranks.
PAPER_RUN = dict(preset="imagenet", disc_layers=3, batch_size=12, global_batch=96, epochs=200, warmup_epochs=20)


def parser() -> flags.Parser:
    p = flags.Parser(__doc__)
    flags.add_run_flags(p, out_dir="out/vqgan", steps=800, batch_size=32, warmup_steps=100)
    p.add("--base", "vqgan", str, "the tokenizer: a VQGAN (codebook indices), or a KL autoencoder (vae.py: "
          "continuous tokens; the presets map to its own, imagenet -> kl16, tiny -> tiny)", choices=tuple(BASES))
    p.add("--eval-only", False, bool, "only report val L1 (and codebook usage) of <out-dir>/ckpt.pt")
    p.add("--val-images", 1000, Number(int, 1), "images of the val split measured at the end of training")
    p.add("--lr", None, Number(float, 0, ends="(]"), "AdamW's peak learning rate (betas 0.5, 0.9, as taming)",
          default_text="4e-4 at 256x256; below, 1e-3, where 800 steps must do (val L1 0.047 vs 0.056 at 4e-4)")
    p.add("--weight-decay", 0.0, Number(float, 0), "VQGAN training uses none")
    p.add("--l1-weight", 1.0, Number(float, 0), "of the L1 term of the reconstruction loss")
    p.add("--perceptual-weight", 1.0, Number(float, 0), "of LPIPS (only with --vgg16-weights/--lpips-weights)")
    p.add("--codebook-weight", 1.0, Number(float, 0), "of the quantizer's codebook + commitment loss")
    p.add("--kl-weight", 1e-6, Number(float, 0), "--base vae: of the KL term against the per-pixel loss (LDM's "
          "kl-f16: 1e-6 on sums over pixels and latents, the same ratio here on the means)")
    p.add("--disc-start", 10 ** 9, Number(int, 0), "the step the adversarial term switches on: it helps once the "
          "autoencoder has converged (taming: after ~250k steps); by default never")
    p.add("--disc-weight", 0.5, Number(float, 0), "scales the adaptive GAN weight (taming: disc_weight)")
    p.add("--disc-channels", 64, Number(int, 1), "width of the PatchGAN's first layer")
    p.add("--disc-layers", 2, Number(int, 1), "PatchGAN depth: 3 for 256x256 (70x70 patches); 2 keeps a 32x32 "
          "image at 2x2 patches")
    p.add("--disc-lr", 4e-4, Number(float, 0, ends="(]"), "the discriminator's AdamW learning rate")
    p.add("--restart-every", 50, Number(int, 0), "move codes unused for so many steps onto recent encoder outputs "
          "(0: never)")
    p.add("--vgg16-weights", None, FILE, "torchvision's VGG16 (the LPIPS trunk)",
          default_text="vgg16-397923af.pth if it is in $ALIT_WEIGHTS or the torch hub cache")
    p.add("--lpips-weights", None, FILE, "the LPIPS v0.1 VGG head (with --vgg16-weights alone: a combined LPIPS "
          "state dict)", default_text="vgg.pth if it is in $ALIT_WEIGHTS or the torch hub cache")
    # The tokenizer's size: VQGANConfig's (or VAEConfig's) fields, each default the preset's.
    preset, int_1 = "the preset's", Number(int, 1)
    p.add("--preset", None, str, "the tokenizer's size", choices=sorted(vqgan.PRESETS),
          default_text="imagenet (the official VQGAN's: 256x256 -> 16x16, 1024 codes) with --dataset "
                       "imagenet100/imagenet, else tiny (32x32 -> 8x8, 256 codes)")
    for name, kind, help in [
            ("image-size", int_1, "images are this size square"),
            ("channels", int_1, "width of the first level; level i has channels x channel-mult[i]"),
            ("channel-mult", Numbers(int_1, as_tuple=True), "one entry per resolution level; each after the first "
                                                              "halves the size"),
            ("num-res-blocks", int_1, "residual blocks per level"),
            ("latent-channels", int_1, "the size of a 2D token (VQGAN: a code)"),
            ("codebook-size", Number(int, 2), "codes a 2D token can point to (VQGAN)"),
            ("attn-resolutions", Numbers(int_1, empty_ok=True, as_tuple=True), "feature-map sizes with a "
                                                                                "self-attention block"),
            ("norm-groups", int_1, "GroupNorm groups; every channel count must be a multiple of it"),
            ("beta", Number(float, 0), "commitment weight of the quantizer (VQGAN)"),
            ("l2-normalize", bool, "cosine lookup on unit codes (VQGAN; ViT-VQGAN)")]:
        p.add(f"--{name}", None, kind, help, default_text=preset)
    return p


def parse_args(argv=None):
    args, given = flags.parse_run_args(parser(), argv, PAPER_RUN, {"preset": "tiny"})
    plan.fit_global_batch(args, given)
    if "out_dir" not in given:  # beside the VQGAN's out/vqgan, a VAE in out/vae
        args.out_dir = f"out/{args.base}"
    _, config_class, presets, _ = BASES[args.base]
    fields = {f.name for f in dataclasses.fields(config_class)}
    model_flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(VQGANConfig) if f.name in given}
    for name in sorted(set(model_flags) - fields):
        sys.exit(f"error: --{name.replace('_', '-')} does not apply to --base {args.base}: it has no codebook")
    try:
        model_cfg = config_class(**{**presets[args.preset], **model_flags})
    except ValueError as error:  # its own checks (sizes that must divide), naming the flags
        sys.exit(flags.config_error(error, config_class))
    flags.with_recipe(args, model_cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPE)
    flags.check_data(args.dataset, args.data_dir)
    plan.schedule_in_epochs(args)
    checkpoint.intervals(args, model_cfg.image_size)
    try:
        vgg16, lpips = find_perceptual(args.vgg16_weights, args.lpips_weights)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    args.vgg16_weights, args.lpips_weights = vgg16 and str(vgg16), lpips and str(lpips)
    return args, model_cfg


def schedule(step: int, args) -> tuple:
    """The learning rates' scale at `step` (the same warm-up and cosine decay for both networks) and whether
    the adversarial terms are on (from --disc-start: taming's adopt_weight)."""
    lr_scale = lr_at(step, 1.0, args.warmup_steps, args.steps, args.min_lr_ratio)
    return lr_scale, gan_weight_at(step, [(args.disc_start, 1.0)]) > 0


def main(argv=None):
    args, model_cfg = parse_args(argv)
    cls, _, _, latent_weight = BASES[args.base]
    if args.eval_only:  # the metrics of the checkpoint in --out-dir, without training
        model = load_model("--eval-only", Path(args.out_dir) / "ckpt.pt", cls.from_checkpoint)
        print(format_val_metrics(val_metrics(model, args)))
        return model
    if args.dry_run:  # no gradient checkpointing here, so no memory estimate
        plan.print_dry_run(run_plan(args, model_cfg, distributed.planned_device(args.device)))
        return None
    ctx = distributed.setup(args.device, args.dist_timeout, shared_folder=args.out_dir,
                            keep_freed=args.keep_freed_memory)
    checkpoint.check_out_dir(args, "recon_*.png", ctx)  # rank 0 decides: start, or resume
    run = run_plan(args, model_cfg, ctx.device)
    bf16 = run.precision == "bf16"
    torch.manual_seed(args.seed)  # the same initial weights on every rank

    # The tokenizer and its discriminator, outside DDP (losses.discriminator_step averages its gradients
    # by hand): rank 0's start on every rank.
    model = cls(model_cfg).to(ctx.device, memory_format=conv_memory_format(ctx.device))
    discriminator = PatchDiscriminator(base_channels=args.disc_channels, num_layers=args.disc_layers).to(ctx.device)
    distributed.broadcast_parameters(discriminator, ctx)
    perceptual = load_perceptual(args.vgg16_weights, args.lpips_weights, ctx.device, ctx.log)
    optimizer = adamw(model.parameters(), args.lr, (0.5, 0.9), args.weight_decay, ctx.device)
    disc_optimizer = adamw(discriminator.parameters(), args.disc_lr, (0.5, 0.9), 0.0, ctx.device)
    stateful = {"model": model, "discriminator": discriminator, "optimizer": optimizer,
                "disc_optimizer": disc_optimizer}  # what a checkpoint saves and resume restores
    # A VQGAN's codebook restarts its dead codes (a VAE has none). Each rank counts the codes its own batches
    # use: restarts go on from every rank's count.
    codebooks = [m for m in model.modules() if isinstance(m, VectorQuantizer)]
    per_rank = {"code_restarts": checkpoint.PerRank(c.restart_state, c.load_restart_state) for c in codebooks}
    step = checkpoint.start_or_resume(args, dataclasses.asdict(model_cfg), stateful, ctx, "recon_*.png", per_rank)
    ctx.log(f"{args.base.upper()} {model_cfg}\ntraining {vars(args)}\n{run}")
    ddp_model = distributed.wrap_ddp(model, ctx, bf16_gradients=run.all_reduce == "bf16")

    dataset = build_dataset(args.dataset, "train", model_cfg.image_size, args.data_dir, num_images=args.train_images)
    val_images = first_images(build_dataset(args.dataset, "val", model_cfg.image_size, args.data_dir), 8)
    val_images = val_images.to(ctx.device)
    batches = train_batches(dataset, args.batch_size, ctx.rank, ctx.world_size, args.seed,
                            checkpoint.first_micro_batch(args, ctx), run.workers_per_rank, args.max_bad_images,
                            pin_memory=ctx.device.type == "cuda")

    # The loop: the autoencoder's step (L1 + LPIPS, its latent term, from --disc-start the adaptively
    # weighted GAN term), the dead-code restarts, then the discriminator's step; logs, grids, checkpoints.
    bar = tqdm(total=args.steps, initial=step, disable=not ctx.is_main, dynamic_ncols=True, smoothing=0.1)
    stop = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    stop_signal = distributed.StopSignal(ctx, args.stop_check_every)  # stop after this step, saved
    clock = checkpoint.Clock(args.save_minutes)
    while step < stop:
        lr_scale, gan_on = schedule(step, args)
        set_lr(optimizer, args.lr * lr_scale)
        set_lr(disc_optimizer, args.disc_lr * lr_scale)
        reals, fakes, logs = [], [], None
        for micro in range(args.grad_accum):
            _, (images, _) = next(batches)
            images = to_unit(images.to(ctx.device, non_blocking=True))  # uint8 through the loader
            with ctx.no_sync(ddp_model, last_micro_step=micro == args.grad_accum - 1):
                with autocast(ctx.device, bf16):
                    recon, aux = ddp_model(images)  # aux: the VQGAN's Quantized, the VAE's Posterior
                    rec_loss = reconstruction_loss(recon.float(), images, perceptual, args.l1_weight,
                                                   args.perceptual_weight)
                    latent_loss, latent_logs = model.latent_loss(aux, images, getattr(args, latent_weight))
                    loss = rec_loss + latent_loss
                    if gan_on:
                        loss = loss + generator_gan_loss(discriminator, recon, rec_loss, model.decoder.last_layer,
                                                         args.disc_weight)
                (loss / args.grad_accum).backward()
            reals.append(images)
            fakes.append(recon.detach())
            micro_logs = torch.stack([rec_loss.detach().float(), *latent_logs.values()])
            logs = micro_logs if logs is None else logs + micro_logs
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.restart_every and (step + 1) % args.restart_every == 0 and step + 1 < args.steps:
            for codebook in codebooks:
                codebook.restart_dead_codes()
        d_loss = discriminator_step(discriminator, disc_optimizer, reals, fakes, autocast(ctx.device, bf16)) \
            if gan_on else torch.zeros((), device=ctx.device)
        step += 1
        bar.update(1)

        stopping, save_now = stop_signal.poll(step, ctx.is_main and clock.due())  # the same on every rank
        if stopping:
            stop = step  # the log and the checkpoint of this step, nothing else, then the loop ends
        save_now = save_now or checkpoint.due(step, args.save_every) or step == stop
        if step % args.log_every == 0 or save_now:  # this step's losses, averaged over the ranks
            logs = torch.cat([logs / args.grad_accum, d_loss[None]])
            distributed.average_over_ranks([logs])
            names = ["rec", *latent_logs, "d"]
            bar.set_postfix({name: f"{value:.4g}" for name, value in zip(names, logs.tolist())})
        if save_now:
            checkpoint.save(args, step, stateful, dataclasses.asdict(model_cfg), ctx, per_rank)
            clock.reset()
        if ctx.is_main and (checkpoint.due(step, args.sample_every) or step == stop and not stopping):
            save_reconstructions(model, val_images, Path(args.out_dir) / f"recon_{step:06d}.png", args.base)
    checkpoint.wait()
    bar.close()
    distributed.finish(ctx, stop_signal, step, args.steps, args.out_dir)
    if ctx.is_main and step == args.steps:
        ctx.log(format_val_metrics(val_metrics(model, args)))
    return model


def run_plan(args, model_cfg, device) -> plan.RunPlan:
    """The run plan on `device` (the peak lr is --lr whatever the batch, as taming's)."""
    return plan.run_plan(args, device, args.lr, distributed.use_bf16(args.bf16, device),
                         plan.base_costs(BASES[args.base][0], model_cfg, args))


@torch.no_grad()
def val_metrics(model, args) -> dict:
    """Val L1 of the tokenizer alone over the first --val-images val images (a VAE's tokens: the posterior
    mean, what ALIT's evaluation encodes), the 2D tokens' spread, and the codebook's usage where it has one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dataset = build_dataset(args.dataset, "val", model.config.image_size, args.data_dir,
                            num_images=args.val_images if args.dataset == "shapes" else None)
    subset = torch.utils.data.Subset(dataset, range(min(args.val_images, len(dataset))))
    codebooks = [m for m in model.modules() if isinstance(m, VectorQuantizer)]
    counts = torch.zeros(codebooks[0].codebook_size if codebooks else 0, device=device)
    l1, tokens = 0.0, []
    for images, _ in torch.utils.data.DataLoader(subset, batch_size=100):
        images = images.to(device)
        batch_tokens = model.tokens(images, sample=False)
        l1 += (model.reconstruct(batch_tokens).float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)).sum().item()
        tokens.append(batch_tokens.float().cpu())
        if codebooks:
            counts += count_codes(model.targets(batch_tokens), len(counts))
    model.train(was_training)
    tokens = torch.cat(tokens)
    metrics = {"images": len(subset), "l1": l1 / len(subset), "token_std": tokens.std().item(),
               "token_abs_mean": tokens.abs().mean().item()}
    if codebooks:
        probs = counts / counts.sum()
        metrics |= {"codes_used": int((counts > 0).sum()), "codebook_size": len(counts),
                    "perplexity": torch.exp(-(probs * probs.clamp(min=1e-10).log()).sum()).item()}
    return metrics


def format_val_metrics(m: dict) -> str:
    line = (f"val: L1 {m['l1']:.4f} over {m['images']} images; 2D tokens: std {m['token_std']:.3f}, mean |.| "
            f"{m['token_abs_mean']:.3f}")
    if "codes_used" in m:
        line += (f"; codebook usage {m['codes_used']}/{m['codebook_size']} codes "
                 f"({100 * m['codes_used'] / m['codebook_size']:.0f}%), perplexity {m['perplexity']:.1f}")
    return line


@torch.no_grad()
def save_reconstructions(model, images, path, base: str):
    """Row 1: the originals; row 2: the tokenizer's reconstructions (a VQGAN's through its codebook)."""
    was_training = model.training
    model.eval()
    recon = model.reconstruct(model.tokens(images, sample=False))
    model.train(was_training)
    save_image_grid(torch.cat([images, recon.float().clamp(0, 1)]), path, nrow=len(images),
                    row_labels=["original", base.upper()])


if __name__ == "__main__":
    main()
