"""The run plan of the two ALIT stages (training.RunPlan): the learning rate their batch implies, and
whether a step fits the GPU without gradient checkpointing, decided before the first step from what a
step holds at --batch-size, measured on the model itself (training.step_memory)."""
import torch

from losses import reconstruction_loss, stage1_loss
from pretrained import base_targets
from training import (RunPlan, autocast, global_batch_of, grad_checkpointing, launched_ranks, run_plan, step_memory,
                      use_bf16)


def stage1_plan(train, model_of, device, model_device, log=print) -> RunPlan:
    """Stage 1's plan on `device`; model_of() is measured on model_device, made only if the GPU's memory
    decides (the paper's model takes a minute to build on a CPU)."""
    return alit_plan(train, device, log, lambda bf16, on: stage1_step_memory(model_of(), train.batch_size,
                                                                             model_device, bf16, on))


def stage2_plan(train, model_of, perceptual, device, model_device, log=print) -> RunPlan:
    """Stage 2's plan, as stage1_plan; the step's loss goes through LPIPS when `perceptual` is loaded."""
    return alit_plan(train, device, log, lambda bf16, on: stage2_step_memory(model_of(), train, perceptual,
                                                                             model_device, bf16, on))


def alit_plan(train, device, log, need) -> RunPlan:
    """lr = base lr x global batch / 256 (the official scaling), and gradient checkpointing where a step,
    needing need(bf16, checkpointing) bytes, would not fit."""
    bf16 = use_bf16(train.bf16, device)
    checkpointing = grad_checkpointing(train.grad_checkpoint, device, lambda on: need(bf16, on), log)
    return run_plan(train, device, train.base_lr * global_batch_of(train) / 256, bf16, checkpointing)


def stage1_step_memory(model, batch_size: int, device, bf16: bool, checkpointing: bool) -> int:
    """Bytes a stage-1 step holds: the rollout with halting and the loss at every iteration, on random
    images, with or without gradient checkpointing, on the launched ranks."""
    saved = model.quantize.restart_state() if model.quantize is not None else None  # the probes count codes too
    weights = [1.0] * model.config.rollout_iters

    def forward_on(n):
        images = torch.rand(n, 3, model.config.image_size, model.config.image_size, device=device)
        latents, gt = base_targets(model.base, images)
        with autocast(device, bf16):
            stage1_loss(model, model(images, latents, gt, halting=True), gt, weights, 0.0, 1.0, 1.0)

    need = with_checkpointing(model, checkpointing, lambda: step_memory(model, forward_on, batch_size, device,
                                                                        launched_ranks()))
    if saved is not None:
        model.quantize.load_restart_state(saved)
    return need


def stage2_step_memory(model, train, perceptual, device, bf16: bool, checkpointing: bool) -> int:
    """Bytes a stage-2 step holds at its largest: the loss at the last iteration (the whole encoder
    rollout), through LPIPS when it is loaded, without the discriminator (a few percent), with or
    without gradient checkpointing."""
    def forward_on(n):
        images = torch.rand(n, 3, model.config.image_size, model.config.image_size, device=device)
        with autocast(device, bf16):
            (record,) = model(images, iters=[model.config.rollout_iters - 1], reconstruct=True)
            reconstruction_loss(record.recon.float(), images, perceptual, train.l1_weight, train.perceptual_weight)

    return with_checkpointing(model, checkpointing, lambda: step_memory(model, forward_on, train.batch_size, device,
                                                                        launched_ranks()))


def with_checkpointing(model, checkpointing: bool, measure):
    """measure() with the model's gradient checkpointing set so, then as it was."""
    was = model.encoder.grad_checkpoint
    model.set_grad_checkpointing(checkpointing)
    try:
        return measure()
    finally:
        model.set_grad_checkpointing(was)
