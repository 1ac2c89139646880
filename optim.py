"""The optimizer side of every training loop: AdamW, its warm-up + cosine learning rate, and the EMA.

Paper: ALIT, arXiv:2411.02393, §A.5; the official code trains with AdamW (weight decay on weight
matrices only), a linear warm-up then cosine decay, and evaluates an exponential moving average of the
weights. Each training script's schedule function (train_stage1.schedule, ...) calls `lr_at`.
"""
import math

import torch


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
    of shape (n,)). Fused where torch has the kernel: one pass over the weights instead of ~10."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in FUSED_ADAMW_DEVICES)


class EMA:
    """Exponential moving average of the trainable parameters, used for evaluation. A checkpoint
    stores it under "ema"; ALIT.from_checkpoint puts it into a model."""

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
