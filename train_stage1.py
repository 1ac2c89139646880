"""Stage 1: latent-distillation pretraining, with the VQGAN frozen.

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
import contextlib
import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Annotated
from pathlib import Path

import torch

from data import build_dataset, first_images, train_batches
from losses import stage1_loss
from memory import stage1_plan
from model import ALIT, ALITConfig, PRESETS, make_config
from pretrained import VQGAN_CKPT, base_targets, find_base, frozen_base, load_base
from quantize import count_codes
from training import (EMA, PAPER_DATASETS, PAPER_GLOBAL_BATCH, LoopConfig, PerRank, StopSignal, adamw, autocast,
                      average_over_ranks, check_data, check_finite, check_flags, check_loop_flags, check_out_dir, due,
                      finish, flag_error, lr_at, parse_flags, planned_device, print_dry_run, progress, save_rollout,
                      save_training_state, schedule_in_epochs, set_lr, setup_training, start_or_resume, stop_step,
                      to_stderr, with_recipe, wrap_ddp)
from vqgan import conv_memory_format

# Per-iteration weights of the cross-entropy (official code, not in the paper): the first,
# shortest codes carry the most information per token, so they are weighted up.
OFFICIAL_ITERATION_WEIGHTS = "2.5,2.0,1.5,1.25,1.0,1.0,1.0,1.0"
# The CPU recipe's mirror image: in a few thousand steps the last iterations, rolled out last and at the
# lowest learning rates, are the least trained, and the official weights leave the longest codes worse.
CPU_ITERATION_WEIGHTS = "1.0,1.0,1.0,1.0,1.25,1.5,2.0,2.5"
# Over a VAE they weight an MSE falling 4.3x from the first iteration to the last (the cross-entropy: by a
# sixth), leaving the last iterations a quarter of the pull; so each is multiplied by the first iteration's
# code MSE over its own (0.092 ... 0.021, the tiny VAE's seed-0 run with the weights above).
CPU_VAE_ITERATION_WEIGHTS = "1.0,1.6,2.4,3.2,4.8,6.4,8.6,10.8"


@dataclass
class TrainConfig(LoopConfig):
    out_dir: Annotated[str, "folder"] = "out/stage1"
    steps: Annotated[int, ">= 1"] = 1500
    batch_size: Annotated[int, ">= 1"] = 16
    vqgan_ckpt: Annotated[str, "file"] = VQGAN_CKPT  # a train_vqgan.py checkpoint (with --base vae, of --base vae: out/vae/ckpt.pt) ...
    # ... or the VQGAN of the official code (VQGAN.from_official): a path, or a name looked up in
    # $ALIT_WEIGHTS and the torch hub cache; default for the 256x256 presets: vqgan.ckpt found there
    vqgan_official: Annotated[str | None, "file"] = None
    # --base vae: MAR's KL-16 (VAE.from_official), as --vqgan-official; default for the 256x256
    # presets: vae.ckpt or kl16.ckpt found there
    vae_official: Annotated[str | None, "file"] = None
    warmup_steps: Annotated[int, ">= 0"] = 50  # of linear LR warmup, then cosine decay (official: 20 of 200 epochs)
    # lr = base_lr * global batch / 256. Default: the official 1.5e-4 at 256x256 (the paper); below
    # that (the CPU presets) 3.2e-2, lr 2e-3 at batch 16, because a few thousand steps need large ones.
    base_lr: Annotated[float | None, "> 0"] = None
    weight_decay: Annotated[float, ">= 0"] = 0.05  # on weight matrices only
    ema_decay: Annotated[float, "in [0, 1)"] = 0.999  # of the weight average evaluation uses (warmed up: training.EMA)
    halting: bool = True  # dynamic halting during training (§A.5)
    # 0: loss at every iteration; n: at n random iterations per step (saves compute), the same on every rank
    loss_iters: Annotated[int, ">= 0"] = 0
    label_smoothing: Annotated[float, "in [0, 1)"] = 0.0  # the official criterion is named LabelSmoothing(0.1) but only its NLL term acts
    code_loss_weight: Annotated[float, ">= 0"] = 1.0  # weight of the MSE between the softmax-expected code and the true code (VQGAN base)
    quantizer_loss_weight: Annotated[float, ">= 0"] = 1.0  # weight of the latent quantizer's codebook + commitment loss
    # The CPU recipe, not in the paper: each default is CPU_RECIPE's below 256x256, OFFICIAL_RECIPE's at 256.

    # Cross-entropy (VAE: MSE) weight per iteration, padded with 1 (default 1,1,1,1,1.25,1.5,2,2.5 below
    # 256x256, over a VAE 1,1.6,2.4,3.2,4.8,6.4,8.6,10.8; the official 2.5,2,1.5,1.25,1,1,1,1 at 256)
    iteration_weights: Annotated[str | None, "list of float >= 0"] = None
    # Rollout warm-up: the loss covers iterations 1..t, t growing from 1 to all over this fraction of
    # the steps (default 0.15 below 256x256; 0, every iteration from the first step, at 256).
    rollout_warmup: Annotated[float | None, "in [0, 1]"] = None
    # The decoder reads the latents unquantized until this fraction of the steps (default 0.3 below
    # 256x256, 0 at 256) ...
    continuous_until: Annotated[float | None, "in [0, 1]"] = None
    # ... then the codes are blended in until this one (VectorQuantizer.blend; default 0.5 below
    # 256x256, 0 at 256)
    blend_until: Annotated[float | None, "in [0, 1]"] = None
    # Move latent codes no token chose for so many steps onto recent encoder outputs (default 25 below
    # 256x256, 0 = never at 256) ...
    latent_restart_every: Annotated[int | None, ">= 0"] = None
    restart_until: Annotated[float, "in [0, 1]"] = 0.75  # ... until this fraction of the steps, so that the EMA weights settle
    # Recompute the transformer blocks in the backward pass instead of keeping their activations (~30%
    # more time). Default: on where a step would not fit the GPU (training.grad_checkpointing says so)
    grad_checkpoint: bool | None = None


# What the recipe fields above default to. A few thousand CPU steps need all of these: the shared
# encoder learns the first tokens several times faster with fewer iterations behind them (and
# those steps are cheap), and quantized from the first step the latent codes carry nothing for
# hundreds of steps. The official run needs none of them.
CPU_RECIPE = dict(base_lr=3.2e-2, iteration_weights=CPU_ITERATION_WEIGHTS, rollout_warmup=0.15, continuous_until=0.3,
                  blend_until=0.5, latent_restart_every=25)
CPU_VAE_RECIPE = {**CPU_RECIPE, "iteration_weights": CPU_VAE_ITERATION_WEIGHTS}  # --base vae
OFFICIAL_RECIPE = dict(base_lr=1.5e-4, iteration_weights=OFFICIAL_ITERATION_WEIGHTS, rollout_warmup=0.0,
                       continuous_until=0.0, blend_until=0.0, latent_restart_every=0)


# The paper's run, set by --dataset imagenet100/imagenet unless given: the official run script's 200
# epochs, 20 of them warmup, at a global batch of 256 (32 images per GPU on 8 GPUs) on however many
# ranks (training.fit_global_batch).
PAPER_RUN = dict(preset="small", batch_size=32, global_batch=PAPER_GLOBAL_BATCH, epochs=200, warmup_epochs=20)


def implied_defaults(given: dict) -> dict:
    return PAPER_RUN if given.get("dataset") in PAPER_DATASETS else {"preset": "tiny"}


def parse_args(argv=None):
    train, model_flags = parse_flags(argv, __doc__, TrainConfig, ALITConfig, PRESETS, implied_defaults)
    check_flags(check_loop_flags(train, PRESETS))
    try:
        model_cfg = make_config(train.preset, **model_flags)
    except ValueError as error:  # its own checks (sizes that must divide), naming the flags
        sys.exit(flag_error(error, ALITConfig))
    train = with_recipe(train, model_cfg.image_size, OFFICIAL_RECIPE,
                        CPU_VAE_RECIPE if model_cfg.base == "vae" else CPU_RECIPE)
    check_flags([(train.continuous_until <= train.blend_until < 1 or train.blend_until == train.continuous_until == 0,
                  "--blend-until must lie between --continuous-until and 1: the model is saved quantized")])
    check_flags([(train.loss_iters <= model_cfg.rollout_iters, f"--loss-iters must be <= {model_cfg.rollout_iters}")])
    check_data(train.dataset, train.data_dir)
    return find_base(schedule_in_epochs(train), model_cfg), model_cfg


def iteration_weights(text: str, iters: int) -> list:
    weights = [float(w) for w in text.split(",")]
    return (weights + [1.0] * iters)[:iters]


def main(argv=None):
    train, model_cfg = parse_args(argv)
    train = check_out_dir(train, "rollout_*.png")
    if train.dry_run:  # a model only if the memory estimate is made, on the CPU
        model_of = functools.cache(lambda: model_for_plan(model_cfg))
        print_dry_run(stage1_plan(train, model_of, planned_device(train.device), torch.device("cpu"), to_stderr))
        return None
    ctx = setup_training(train)
    torch.manual_seed(train.seed)  # the same initial weights on every rank (DDP also broadcasts them)

    model = build_model(train, model_cfg, ctx)
    model_cfg = model.config  # with the base tokenizer's exact config, from its checkpoint
    run = stage1_plan(train, lambda: model, ctx.device, ctx.device, ctx.log)
    lr, bf16 = run.lr, run.precision == "bf16"
    model.set_grad_checkpointing(run.grad_checkpoint)
    optimizer = adamw(model.parameters(), lr, (0.9, 0.95), train.weight_decay, ctx.device)
    ema = EMA(model, train.ema_decay)
    weights = iteration_weights(train.iteration_weights, model_cfg.rollout_iters)
    stateful = {"model": model, "ema": ema, "optimizer": optimizer}  # what a checkpoint saves and resume restores
    # Each rank counts the latent codes its own batches use: dead-code restarts go on from every rank's count.
    per_rank = {"latent_restarts": PerRank(model.quantize.restart_state, model.quantize.load_restart_state)} \
        if model.quantize is not None else {}
    step = start_or_resume(train, model_cfg.to_dict(), stateful, ctx, "rollout_*.png", per_rank)
    ctx.log(f"ALIT {model_cfg}\n{sum(p.numel() for p in model.alit_parameters()) / 1e6:.2f}M trainable "
            f"parameters\ntraining {train}\n{run}")
    if train.compile:
        model.compile_transformers()
    # Frozen params never get gradients; when only a subset of iterations is decoded, halting
    # (hence the halted token) and later iterations' embeddings may not run at all in a step.
    ddp_model = wrap_ddp(model, ctx, bool(train.loss_iters or train.rollout_warmup), run.all_reduce == "bf16")
    dataset = build_dataset(train.dataset, "train", model_cfg.image_size, train.data_dir, num_images=train.train_images)
    val_images = first_images(build_dataset(train.dataset, "val", model_cfg.image_size, train.data_dir), 8)
    val_images = val_images.to(ctx.device)
    batches = train_batches(dataset, train.batch_size, ctx.rank, ctx.world_size, train.seed, step * train.grad_accum,
                            run.workers_per_rank, train.max_bad_images, pin_memory=ctx.device.type == "cuda")

    bar = progress(train.steps, step, ctx.is_main)
    stats = torch.zeros(model_cfg.rollout_iters, 3, device=ctx.device)  # summed since the last log
    code_counts = torch.zeros(model_cfg.latent_codebook_size if model_cfg.quantize_latent else 0, device=ctx.device)
    first_nonfinite = torch.full((), -1, device=ctx.device)  # checked at log/save steps only: no sync per step
    stop = stop_step(train, step)
    stop_signal = StopSignal(ctx, train.dist_timeout)  # SIGTERM/SIGINT: stop after this step, with a checkpoint
    while step < stop:
        step_stats, step_counts, finite = train_step(model, ddp_model, optimizer, ema, batches, step, lr, train,
                                                     weights, ctx, bf16)
        stats += step_stats
        code_counts += step_counts
        first_nonfinite = torch.where((first_nonfinite < 0) & ~finite, step, first_nonfinite)
        step += 1
        bar.update(1)
        if stop_signal.requested():
            stop = step  # every due() below fires: logs, grid and checkpoint at this step, then the loop ends
        if due(step, train.log_every, stop) or due(step, train.save_every, stop):
            log_stats(bar, stats, code_counts, first_nonfinite, train, ctx, vae=model_cfg.base == "vae")
        if ctx.is_main and due(step, train.sample_every, stop):  # the VQGAN codes stage 1 predicts
            save_rollout(model, val_images, Path(train.out_dir) / f"rollout_{step:06d}.png", soft_codes=False)
        if due(step, train.save_every, stop):
            save_training_state(train, step, stateful, model_cfg.to_dict(), ctx, per_rank)
    finish(ctx, train, bar, stop_signal, step)
    return model


def build_model(train: TrainConfig, model_cfg: ALITConfig, ctx) -> ALIT:
    """ALIT around the frozen base tokenizer it distils (§3), on the run's device."""
    base = load_base(train, model_cfg, ctx.log)
    model = ALIT(dataclasses.replace(model_cfg, **{model_cfg.base: base.config}))
    setattr(model, model_cfg.base, base)
    frozen_base(model)
    if not train.halting:
        model.halted_token.requires_grad_(False)  # only halting uses it; DDP wants every trained param used
    model.to(ctx.device)
    model.base.to(memory_format=conv_memory_format(ctx.device))
    return model


def train_step(model: ALIT, ddp_model, optimizer, ema: EMA, batches, step: int, lr: float, train: TrainConfig,
               weights, ctx, bf16: bool):
    """One optimizer step over --grad-accum micro-batches: the rollout up to this step's length with
    halting, the loss at its iterations, AdamW, the dead-code restarts and the EMA. Returns, on the
    device and without waiting for it: the per-iteration [CE, accuracy, 1] sums (stage1_loss), the
    latent codes the longest codes used, and whether every micro-batch's loss was finite."""
    set_lr(optimizer, lr_at(step, lr, train.warmup_steps, train.steps, train.min_lr_ratio))
    if model.quantize is not None:
        model.quantize.blend = code_blend(step, train)
    iters = loss_iterations(step, train, model.config.rollout_iters)
    stats = torch.zeros(model.config.rollout_iters, 3, device=ctx.device)
    code_counts = torch.zeros(model.config.latent_codebook_size if model.quantize else 0, device=ctx.device)
    finite = torch.ones((), dtype=torch.bool, device=ctx.device)
    for micro in range(train.grad_accum):
        _, batch = next(batches)
        images = batch[0].to(ctx.device, non_blocking=True)
        vqgan_latents, gt_indices = base_targets(model.base, images)
        last_micro = micro == train.grad_accum - 1
        with (ddp_model.no_sync() if ctx.enabled and not last_micro else contextlib.nullcontext()):
            with autocast(ctx.device, bf16):
                records = ddp_model(images, vqgan_latents, gt_indices, halting=train.halting, iters=iters)
                loss, micro_stats = stage1_loss(model, records, gt_indices, weights, train.label_smoothing,
                                                train.code_loss_weight, train.quantizer_loss_weight)
            (loss / train.grad_accum).backward()
        stats += micro_stats
        if records[-1].indices is not None:  # codebook usage of the longest code, over the log window
            code_counts += count_codes(records[-1].indices, len(code_counts))
        finite &= torch.isfinite(loss)
    torch.nn.utils.clip_grad_norm_(model.alit_parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if model.quantize is not None and train.latent_restart_every and \
            (step + 1) % train.latent_restart_every == 0 and step + 1 <= train.restart_until * train.steps:
        model.quantize.restart_dead_codes()
    ema.update(model, step)
    return stats, code_counts, finite


def loss_iterations(step: int, train: TrainConfig, iters: int) -> list:
    """The iterations (0-based) this step decodes and puts in the loss: all of the rollout's length,
    or --loss-iters of them drawn from (seed, step), alike on every rank: a rank drawing a deeper
    rollout than the others would keep them waiting every step."""
    rollout = rollout_length(step, train, iters)
    if not train.loss_iters:
        return list(range(rollout))
    return torch.randperm(rollout, generator=torch.Generator().manual_seed(train.seed + step))[:train.loss_iters].tolist()


def model_for_plan(model_cfg: ALITConfig) -> ALIT:
    """--dry-run's model, for the memory estimate only: of the preset, its VQGAN random."""
    return frozen_base(ALIT(model_cfg))


def rollout_length(step: int, train: TrainConfig, iters: int) -> int:
    """How many iterations this step rolls out: one at first, all after --rollout-warmup."""
    if not train.rollout_warmup:
        return iters
    return min(iters, 1 + int(step / (train.rollout_warmup * train.steps) * (iters - 1)))


def code_blend(step: int, train: TrainConfig) -> float:
    """VectorQuantizer.blend at this step: 0 (continuous) until --continuous-until, 1 from --blend-until."""
    start, end = train.continuous_until * train.steps, train.blend_until * train.steps
    return 1.0 if end == 0 else min(1.0, max(0.0, (step + 1 - start) / max(1.0, end - start)))


def log_stats(bar, stats, code_counts, first_nonfinite, train, ctx, vae=False):
    """Cross-entropy, per-iteration token accuracy and the fraction of latent codes the longest codes
    used since the last log, over all ranks, on the progress bar; a non-finite loss ends the run
    before the checkpoint it would have spoiled."""
    average_over_ranks([stats, code_counts])
    check_finite(first_nonfinite, train, ctx)
    ce, accuracy, _ = (stats.sum(0) / stats[:, 2].sum().clamp(min=1)).tolist()
    per_iteration = (stats[:, 1] / stats[:, 2].clamp(min=1)).tolist()
    used = f"{(code_counts > 0).float().mean().item():.2f}" if len(code_counts) else "-"
    if vae:  # the MSE and the per-iteration mean absolute code error
        bar.set_postfix(mse=f"{ce:.4f}", err="/".join(f"{a:.3f}" for a in per_iteration), codes_used=used)
    else:
        bar.set_postfix(ce=f"{ce:.3f}", acc="/".join(f"{a:.2f}" for a in per_iteration), codes_used=used)
    stats.zero_()
    code_counts.zero_()


if __name__ == "__main__":
    main()
