"""Stage 1: latent-distillation pretraining, with the base tokenizer frozen.

Paper: ALIT, arXiv:2411.02393, §A.5 "Training Details": "we only train the
latent-distillation encoder-decoder modules in this stage, using image token
reconstruction loss ... cross-entropy loss comparing predicted logits with the
ground-truth VQGAN-codebook index at each 2D token position. We unroll the
recurrent token allocation procedure for 8 iterations ... All the recurrent
rollouts are trained end-to-end ... we perform dynamic halting of the image
tokens in each iteration." Over a VAE (--base vae): "we use mean-square
reconstruction loss when using VAE as the base-tokenizer". The loss: losses.stage1_loss.

    python train_stage1.py                      # tiny preset on `shapes`, from out/vqgan/ckpt.pt
    python train_stage1.py --base vae          # over the tiny VAE, from out/vae/ckpt.pt
    python train_stage1.py --dataset imagenet100 --data-dir /data/imagenet   # the paper's run (PAPER_RUN)
    torchrun --nproc_per_node=8 train_stage1.py ...   # DDP: gloo on CPU, nccl on CUDA
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
from flags import FILE, Number, Numbers
from losses import OFFICIAL_ITERATION_WEIGHTS, iteration_weights, stage1_loss
from model import ALIT, BASES, PRESETS, ALITConfig, make_config
from optim import EMA, adamw, lr_at, set_lr
from plots import save_rollout
from quantize import count_codes
from weights import file_record, find_base, load_base

# What the recipe flags default to (flags.with_recipe): the official run's at 256x256; below it, per base,
# what a few thousand CPU steps need. The shared encoder learns the first tokens several times faster
# with fewer iterations behind them (and those steps are cheap), and quantized from the first step the
# latent codes carry nothing for hundreds of steps. The CPU weights mirror the official ones: in a few
# thousand steps the last iterations, rolled out last and at the lowest learning rates, are the least
# trained. Over a VAE they weight an MSE falling 4.3x from the first iteration to the last (the
# cross-entropy: by a sixth), so each is multiplied by the first iteration's code MSE over its own
# (0.092 ... 0.021, the tiny VAE's seed-0 run with the VQGAN's weights).
OFFICIAL_RECIPE = dict(base_lr=1.5e-4, iteration_weights=OFFICIAL_ITERATION_WEIGHTS, rollout_warmup=0.0,
                       continuous_until=0.0, blend_until=0.0, latent_restart_every=0)
CPU_RECIPE = dict(base_lr=3.2e-2, iteration_weights="1.0,1.0,1.0,1.0,1.25,1.5,2.0,2.5", rollout_warmup=0.15,
                  continuous_until=0.3, blend_until=0.5, latent_restart_every=25)
CPU_RECIPES = {"vqgan": CPU_RECIPE, "vae": {**CPU_RECIPE, "iteration_weights": "1.0,1.6,2.4,3.2,4.8,6.4,8.6,10.8"}}

# The paper's run, set by --dataset imagenet100/imagenet unless given: the official run script's 200
# epochs, 20 of them warm-up, at a global batch of 256 (32 images per GPU on 8 GPUs) on however many
# ranks (plan.fit_global_batch).
PAPER_RUN = dict(preset="small", batch_size=32, global_batch=plan.PAPER_GLOBAL_BATCH, epochs=200, warmup_epochs=20)


def parser() -> flags.Parser:
    p = flags.Parser(__doc__)
    flags.add_run_flags(p, out_dir="out/stage1", steps=1500, batch_size=16, warmup_steps=50)
    p.add("--base-ckpt", None, FILE, "the frozen base: a train_vqgan.py checkpoint", aliases=("--vqgan-ckpt",),
          default_text="out/vqgan/ckpt.pt, with --base vae out/vae/ckpt.pt")
    p.add("--vqgan-official", None, FILE, "... or the official code's VQGAN (VQGAN.from_official): a path, or a name "
          "looked up in $ALIT_WEIGHTS and the torch hub cache", default_text="at 256x256: vqgan.ckpt found there")
    p.add("--vae-official", None, FILE, "--base vae: MAR's KL-16 (VAE.from_official), as --vqgan-official",
          default_text="at 256x256: vae.ckpt or kl16.ckpt found there")
    p.add("--base-lr", None, Number(float, 0, ends="(]"), "lr = base lr x global batch / 256",
          default_text="the official 1.5e-4 at 256x256; below, 3.2e-2 (lr 2e-3 at batch 16)")
    p.add("--weight-decay", 0.05, Number(float, 0), "on weight matrices only")
    p.add("--ema-decay", 0.999, Number(float, 0, 1, "[)"), "of the weight average evaluation uses (warmed up: "
          "optim.EMA)")
    p.add("--halting", True, bool, "dynamic halting during training (§A.5)")
    p.add("--loss-iters", 0, Number(int, 0), "0: the loss at every iteration; n: at n random iterations a step, "
          "the same on every rank (saves compute)")
    p.add("--label-smoothing", 0.0, Number(float, 0, 1, "[)"), "the official criterion is named LabelSmoothing(0.1) "
          "but only its NLL term acts")
    p.add("--code-loss-weight", 1.0, Number(float, 0), "of the MSE between the expected and the true code (VQGAN)")
    p.add("--quantizer-loss-weight", 1.0, Number(float, 0), "of the latent quantizer's codebook + commitment loss")
    p.add("--iteration-weights", None, Numbers(Number(float, 0)), "token loss weight per iteration, padded with 1",
          default_text="1,1,1,1,1.25,1.5,2,2.5 below 256x256, over a VAE 1,1.6,2.4,3.2,4.8,6.4,8.6,10.8; "
                       "the official 2.5,2,1.5,1.25,1,1,1,1 at 256")
    p.add("--rollout-warmup", None, Number(float, 0, 1), "the loss covers iterations 1..t, t growing from 1 to all "
          "over this fraction of the steps", default_text="0.15 below 256x256; 0 at 256")
    p.add("--continuous-until", None, Number(float, 0, 1), "the decoder reads the latents unquantized until this "
          "fraction of the steps ...", default_text="0.3 below 256x256, 0 at 256")
    p.add("--blend-until", None, Number(float, 0, 1), "... then the codes are blended in until this one "
          "(VectorQuantizer.blend)", default_text="0.5 below 256x256, 0 at 256")
    p.add("--latent-restart-every", None, Number(int, 0), "move latent codes no token chose for so many steps "
          "onto recent encoder outputs ...", default_text="25 below 256x256, 0 (never) at 256")
    p.add("--restart-until", 0.75, Number(float, 0, 1), "... until this fraction of the steps, so that the EMA "
          "weights settle")
    p.add("--grad-checkpoint", None, bool, "recompute the transformer blocks in the backward pass (~30%% more "
          "time)", default_text="on where a step would not fit the GPU (plan.grad_checkpointing says so)")
    add_model_flags(p)
    return p


def add_model_flags(p: flags.Parser):
    """ALITConfig's fields (model.py says why each is what it is), each default the preset's."""
    p.add("--preset", None, str, "the model's size", choices=sorted(PRESETS),
          default_text="small with --dataset imagenet100/imagenet, else tiny (32x32 images on a CPU)")
    preset, int_1 = "the preset's", Number(int, 1)
    for name, kind, help in [
            ("image-size", int_1, "images are this size square (the paper: 256)"),
            ("patch-size", int_1, "the base tokenizer's downsampling factor: one 2D token per grid cell"),
            ("encoder-width", int_1, "width D of the latent-distillation encoder Enc (§2)"),
            ("encoder-layers", int_1, "transformer blocks of Enc, all run again at every iteration"),
            ("encoder-heads", int_1, "attention heads of Enc"),
            ("decoder-width", int_1, "width of the latent-distillation decoder Dec (§2)"),
            ("decoder-layers", int_1, "transformer blocks of Dec"),
            ("decoder-heads", int_1, "attention heads of Dec"),
            ("mlp-ratio", Number(float, 0, ends="(]"), "hidden width of every block's MLP, in multiples of its width"),
            ("tokens-per-iter", int_1, "K, new latent tokens per iteration (§2: 32)"),
            ("rollout-iters", int_1, "iterations T of the rollout (§A.5: 8)"),
            ("quantize-latent", bool, "quantize the latent tokens; off: continuous"),
            ("factorize-latent", bool, "project the latents to --latent-dim before quantizing (§2)"),
            ("latent-dim", int_1, "the factorized code size"),
            ("latent-codebook-size", Number(int, 2), "codes of the latent codebook all iterations share (§2)"),
            ("beta", Number(float, 0), "commitment weight of the latent quantizer"),
            ("halting-threshold", Number(float, 0, 1, "(]"), "a VQGAN cell predicted with p >= this may halt "
                                                              "(official code)"),
            ("halting-code-error", Number(float, 0, ends="(]"), "a VAE cell within this mean absolute error halts "
                                                                 "(official code)"),
            ("decoder-latent-positions", int_1, "rows of the decoder's latent position table (official: 256)"),
            ("init-std", Number(float, 0, ends="(]"), "linear weights ~ truncated N(0, init-std)"),
            ("zero-init-encoder-residuals", bool, "start every pass of the shared encoder as the identity"),
            ("official-vae-function", bool, "compute what the official adaptive_vae.py computes (ALITConfig)")]:
        p.add(f"--{name}", None, kind, help, default_text=preset)
    p.add("--base", None, str, "the base 2D tokenizer (§2, §A.5): a VQGAN (codebook indices) or a VAE (continuous "
          "vectors)", choices=tuple(BASES), default_text=preset)


# The flags that are ALITConfig fields.
MODEL_FLAGS = [f for f in ALITConfig.__dataclass_fields__ if f not in ("vqgan", "vae")]


def parse_args(argv=None):
    args, given = flags.parse_run_args(parser(), argv, PAPER_RUN, {"preset": "tiny"})
    plan.fit_global_batch(args, given)
    try:
        model_cfg = make_config(args.preset, **{name: getattr(args, name) for name in MODEL_FLAGS if name in given})
    except ValueError as error:  # its own checks (sizes that must divide), naming the flags
        sys.exit(flags.config_error(error, ALITConfig))
    flags.with_recipe(args, model_cfg.image_size, OFFICIAL_RECIPE, CPU_RECIPES[model_cfg.base])
    flags.check(args.continuous_until <= args.blend_until < 1 or args.blend_until == args.continuous_until == 0,
                "--blend-until must lie between --continuous-until and 1: the model is saved quantized")
    flags.check(args.loss_iters <= model_cfg.rollout_iters, f"--loss-iters must be <= {model_cfg.rollout_iters}")
    flags.check_data(args.dataset, args.data_dir)
    plan.schedule_in_epochs(args)
    checkpoint.intervals(args, model_cfg.image_size)
    find_base(args, model_cfg.base, official_fits=flags.paper_scale(model_cfg.image_size))
    return args, model_cfg


class Schedule(NamedTuple):
    lr: float  # the learning rate of this step
    iters: list  # the iterations (0-based) this step decodes and puts in the loss
    blend: float  # VectorQuantizer.blend: 0, the latents unquantized, to 1, the codes
    restart: bool  # whether dead latent codes move onto recent encoder outputs after this step


def schedule(step: int, args, peak_lr: float, iters: int) -> Schedule:
    """Stage 1 at `step`: the lr's linear warm-up and cosine decay; the rollout's length, one iteration at
    first and all after --rollout-warmup, the loss at all of them or at --loss-iters drawn from (seed,
    step), alike on every rank (a rank rolling out further would keep the others waiting); the codes
    blended in between --continuous-until and --blend-until; dead-code restarts every
    --latent-restart-every steps until --restart-until. At 256x256 only the lr changes (OFFICIAL_RECIPE)."""
    rollout = iters if not args.rollout_warmup else \
        min(iters, 1 + int(step / (args.rollout_warmup * args.steps) * (iters - 1)))
    loss_iters = list(range(rollout)) if not args.loss_iters else \
        torch.randperm(rollout, generator=torch.Generator().manual_seed(args.seed + step))[:args.loss_iters].tolist()
    start, end = args.continuous_until * args.steps, args.blend_until * args.steps
    blend = 1.0 if end == 0 else min(1.0, max(0.0, (step + 1 - start) / max(1.0, end - start)))
    restart = bool(args.latent_restart_every) and (step + 1) % args.latent_restart_every == 0 and \
        step + 1 <= args.restart_until * args.steps
    return Schedule(lr_at(step, peak_lr, args.warmup_steps, args.steps, args.min_lr_ratio), loss_iters, blend, restart)


def main(argv=None):
    args, model_cfg = parse_args(argv)
    if args.dry_run:  # the plan as one JSON line, without a GPU; a model only if the memory estimate needs one
        checkpoint.check_out_dir(args, "rollout_*.png")
        model_of = functools.cache(lambda: model_for_plan(model_cfg))
        plan.print_dry_run(plan.stage1_plan(args, model_cfg, model_of, distributed.planned_device(args.device),
                                            torch.device("cpu"), distributed.to_stderr))
        return None
    ctx = distributed.setup(args.device, args.dist_timeout, shared_folder=args.out_dir,
                            keep_freed=args.keep_freed_memory)
    checkpoint.check_out_dir(args, "rollout_*.png", ctx)  # rank 0 decides: start, or resume

    # The model: ALIT around the frozen base tokenizer it distils (§2), on the run's device.
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    base = load_base(args, model_cfg.base, BASES[model_cfg.base], model_cfg.base_config, ctx.log)
    base_file = base_record(args)  # the checkpoints keep the frozen base as its file, not its weights
    model_cfg = model_cfg.with_base(base.config)  # the base's exact config, from its checkpoint
    model = frozen_base(ALIT(model_cfg).replace_base(base))
    model.halted_token.requires_grad_(args.halting)  # only halting uses it; DDP wants every trained param used
    model.to(ctx.device)
    model.base.to(memory_format=conv_memory_format(ctx.device))
    run = plan.stage1_plan(args, model_cfg, lambda: model, ctx.device, ctx.device, ctx.log)
    bf16, T = run.precision == "bf16", model_cfg.rollout_iters
    model.set_grad_checkpointing(run.grad_checkpoint)

    # The optimizer, the EMA, and where the run starts: step 0, or a checkpoint's step with all of this.
    optimizer = adamw(model.parameters(), run.lr, (0.9, 0.95), args.weight_decay, ctx.device)
    ema = EMA(model, args.ema_decay)
    weights = iteration_weights(args.iteration_weights, T)
    # What a checkpoint saves and resume restores: ALIT without its frozen base (kept by file: base_file).
    stateful = {"model": checkpoint.Trained(model, model_cfg.base), "ema": ema, "optimizer": optimizer}
    # Each rank counts the latent codes its own batches use: dead-code restarts go on from every rank's count.
    per_rank = {"latent_restarts": checkpoint.PerRank(model.quantize.restart_state, model.quantize.load_restart_state)
                } if model.quantize is not None else {}
    step = checkpoint.start_or_resume(args, model_cfg.to_dict(), stateful, ctx, "rollout_*.png", per_rank, base_file)
    ctx.log(f"ALIT {model_cfg}\n{sum(p.numel() for p in model.alit_parameters()) / 1e6:.2f}M trainable "
            f"parameters\ntraining {vars(args)}\n{run}")
    if args.compile:
        model.compile_transformers()
    # When only some iterations are decoded, halting (hence the halted token) and later iterations'
    # embeddings may not run in a step: DDP must look for unused parameters then.
    ddp_model = distributed.wrap_ddp(model, ctx, bool(args.loss_iters or args.rollout_warmup), run.all_reduce == "bf16")

    # The data: an endless stream of this rank's batches from where the run stands; 8 images for the grids.
    dataset = build_dataset(args.dataset, "train", model_cfg.image_size, args.data_dir, num_images=args.train_images)
    val_images = first_images(build_dataset(args.dataset, "val", model_cfg.image_size, args.data_dir), 8)
    val_images = val_images.to(ctx.device)
    batches = train_batches(dataset, args.batch_size, ctx.rank, ctx.world_size, args.seed,
                            checkpoint.first_micro_batch(args, ctx), run.workers_per_rank, args.max_bad_images,
                            pin_memory=ctx.device.type == "cuda")

    # The loop: forward and loss, backward, the optimizer step and the restarts, the EMA, then the logs,
    # the checkpoint and the image grid when due, every rank after the same step.
    bar = tqdm(total=args.steps, initial=step, disable=not ctx.is_main, dynamic_ncols=True, smoothing=0.1)
    stats = torch.zeros(T, 3, device=ctx.device)  # per iteration [token loss, accuracy, 1], summed since the last log
    code_counts = torch.zeros(model_cfg.latent_codebook_size if model.quantize else 0, device=ctx.device)
    first_nonfinite = torch.full((), -1, device=ctx.device)  # checked at logs only: no sync every step
    stop = min(args.steps, step + args.stop_after) if args.stop_after else args.steps
    stop_signal = distributed.StopSignal(ctx, args.stop_check_every)  # stop after this step, saved
    clock = checkpoint.Clock(args.save_minutes)
    while step < stop:
        now = schedule(step, args, run.lr, T)
        set_lr(optimizer, now.lr)
        if model.quantize is not None:
            model.quantize.blend = now.blend
        for micro in range(args.grad_accum):
            _, (images, _) = next(batches)
            images = to_unit(images.to(ctx.device, non_blocking=True))  # uint8 through the loader
            with ctx.no_sync(ddp_model, last_micro_step=micro == args.grad_accum - 1):
                with autocast(ctx.device, bf16):
                    loss, micro_stats, records = stage1_loss(
                        model, images, forward=ddp_model, iteration_weights=weights, iters=now.iters,
                        halting=args.halting, label_smoothing=args.label_smoothing, code_weight=args.code_loss_weight,
                        quantizer_weight=args.quantizer_loss_weight)
                (loss / args.grad_accum).backward()
            stats += micro_stats
            if records[-1].indices is not None:  # codebook usage of the longest code, over the log window
                code_counts += count_codes(records[-1].indices, len(code_counts))
            first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(loss), step, first_nonfinite)
        torch.nn.utils.clip_grad_norm_(model.alit_parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if now.restart and model.quantize is not None:
            model.quantize.restart_dead_codes()
        ema.update(model, step)
        step += 1
        bar.update(1)

        stopping, save_now = stop_signal.poll(step, ctx.is_main and clock.due())  # the same on every rank
        if stopping:
            stop = step  # the log and the checkpoint of this step, nothing else, then the loop ends
        save_now = save_now or checkpoint.due(step, args.save_every) or step == stop
        if step % args.log_every == 0 or save_now:
            # Over all ranks; a non-finite loss ends the run before the checkpoint it would spoil.
            distributed.average_over_ranks([stats, code_counts])
            distributed.check_finite(first_nonfinite, args.out_dir, ctx)
            loss_name, score_name = model.base.token_loss_names
            token_loss = (stats[:, 0].sum() / stats[:, 2].sum().clamp(min=1)).item()
            per_iteration = (stats[:, 1] / stats[:, 2].clamp(min=1)).tolist()
            used = f"{(code_counts > 0).float().mean().item():.2f}" if len(code_counts) else "-"
            bar.set_postfix({loss_name: f"{token_loss:.4g}", score_name: "/".join(f"{a:.3g}" for a in per_iteration),
                             "codes_used": used})
            stats.zero_()
            code_counts.zero_()
        if save_now:
            checkpoint.save(args, step, stateful, model_cfg.to_dict(), ctx, per_rank, base_file)
            clock.reset()
        if ctx.is_main and (checkpoint.due(step, args.sample_every) or step == stop and not stopping):
            save_rollout(model, val_images, Path(args.out_dir) / f"rollout_{step:06d}.png", hard=True)  # its codes
    checkpoint.wait()
    bar.close()
    distributed.finish(ctx, stop_signal, step, args.steps, args.out_dir)
    return model


def model_for_plan(model_cfg: ALITConfig) -> ALIT:
    """--dry-run's model, for the memory estimate only: of the preset, its base random."""
    return frozen_base(ALIT(model_cfg))


def base_record(args) -> dict:
    """Stage 1's frozen base as a checkpoint records it: its file, how to read it, and its hash (checked when
    the checkpoint is resumed, or loaded by ALIT.from_checkpoint)."""
    official = bool(args.official_base)
    return {"base_file": file_record(args.official_base if official else args.base_ckpt, official)}


def frozen_base(model: ALIT) -> ALIT:
    """Stage 1 trains the latent-distillation modules only: the base gets no gradient, no optimizer state,
    and stays outside the EMA, in eval mode."""
    model.base.requires_grad_(False).eval()
    return model


if __name__ == "__main__":
    main()
