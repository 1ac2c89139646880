"""The run plan: what a command resolves to before its first step, printed (and by --dry-run as one JSON
line, without a GPU): the global batch on the launched ranks, the length in steps and epochs, the peak
lr, the precision, the data workers, and whether a step fits the GPU without gradient checkpointing,
measured on the model itself (`step_memory`).

Paper: ALIT, arXiv:2411.02393, §A.5; the official run scripts train 200 epochs at a global batch of 256
(stage 1) and 96 (stage 2), lr = base lr x global batch / 256.
"""
import dataclasses
import functools
import json
import math
import os

import torch

from data import build_dataset
from distributed import autocast, data_workers, launched_nodes, launched_ranks, to_stderr, use_bf16
from losses import reconstruction_loss, stage1_loss

PAPER_GLOBAL_BATCH = 256  # the official runs: 32 images per GPU x 8 GPUs, base lr at batch 256

# -----------------------------------------------------------------------------
# The run's length and batch, whatever the number of GPUs


def fit_global_batch(args, given: set, ranks: int | None = None):
    """--global-batch on the launched ranks: gradient accumulation fills what their batches lack, and where
    the ranks alone exceed it each takes a smaller batch. A --batch-size or --grad-accum given (in `given`)
    wins."""
    ranks = launched_ranks() if ranks is None else ranks
    if args.global_batch is None:
        return args
    if "batch_size" not in given and args.batch_size * ranks > args.global_batch:
        args.batch_size = max(1, args.global_batch // ranks)
    if "grad_accum" not in given:
        args.grad_accum = max(1, math.ceil(args.global_batch / (args.batch_size * ranks)))
    return args


def global_batch_of(args) -> int:
    return args.batch_size * args.grad_accum * launched_ranks()


@functools.cache
def count_images(dataset: str, data_dir: str | None, num_images: int | None) -> int:
    """Training images of --dataset/--data-dir (--train-images caps them): what an epoch is."""
    return len(build_dataset(dataset, "train", 32, data_dir, num_images=num_images))


def schedule_in_epochs(args):
    """--epochs and --warmup-epochs as optimizer steps of the global batch over the training images."""
    if args.epochs is None and args.warmup_epochs is None:
        return args
    steps_per_epoch = count_images(args.dataset, args.data_dir, args.train_images) / global_batch_of(args)
    steps = args.steps if args.epochs is None else max(1, round(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_epochs is None else round(args.warmup_epochs * steps_per_epoch)
    args.steps, args.warmup_steps = steps, warmup
    return args


@dataclasses.dataclass
class RunPlan:
    """What a command resolves to on the ranks it was launched with: printed before the first step, and
    by --dry-run as one JSON line (with no GPU and no process group needed)."""
    device: str
    world_size: int
    nodes: int
    batch_per_rank: int
    grad_accum: int
    global_batch: int
    train_images: int
    steps: int
    epochs: float
    warmup_steps: int
    warmup_epochs: float
    lr: float
    workers_per_rank: int
    precision: str
    all_reduce: str  # the dtype DDP sends gradients in (none on one rank)
    grad_checkpoint: bool
    memory_gb: float | None  # a step's estimate on the GPU (step_memory); none on the CPU

    def __str__(self):
        memory = f", {self.memory_gb:.1f} GB a step" if self.memory_gb is not None else ""
        return (f"run plan: {self.device} x {self.world_size} rank(s) on {self.nodes} node(s); global batch "
                f"{self.global_batch} = {self.batch_per_rank} a rank x {self.grad_accum} accumulated x "
                f"{self.world_size}; "
                f"{self.steps} steps = {self.epochs:.1f} epochs of {self.train_images} images, warm-up "
                f"{self.warmup_steps} ({self.warmup_epochs:.1f} epochs); peak lr {self.lr:.3g}; "
                f"{self.workers_per_rank} data worker(s) a rank; {self.precision}, gradients all-reduced in "
                f"{self.all_reduce}; gradient checkpointing "
                f"{'on' if self.grad_checkpoint else 'off'}{memory}" + (
                    "\nwarning: several nodes without GLOO_SOCKET_IFNAME: the stop check's gloo group finds peers by "
                    "host name; set it (and NCCL_SOCKET_IFNAME) to the network interface the nodes share"
                    if self.nodes > 1 and not os.environ.get("GLOO_SOCKET_IFNAME") else ""))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def print_dry_run(plan: RunPlan):
    """--dry-run: the plan as one JSON line on stdout, in words (with its warnings) on stderr."""
    to_stderr(plan)
    print(plan.to_json())


def run_plan(args, device: torch.device, lr: float, bf16: bool, checkpointing=(False, None)) -> RunPlan:
    """The plan of `args` on `device` and the launched ranks; checkpointing is grad_checkpointing's answer."""
    images, global_batch = count_images(args.dataset, args.data_dir, args.train_images), global_batch_of(args)
    return RunPlan(device=device.type, world_size=launched_ranks(), nodes=launched_nodes(),
                   batch_per_rank=args.batch_size, grad_accum=args.grad_accum, global_batch=global_batch,
                   train_images=images, steps=args.steps, epochs=args.steps * global_batch / images,
                   warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_steps * global_batch / images,
                   lr=lr, workers_per_rank=data_workers(args.num_workers, device),
                   precision="bf16" if bf16 else "float32", grad_checkpoint=checkpointing[0],
                   all_reduce="none" if launched_ranks() == 1 else "bf16" if (
                       bf16 if args.bf16_gradients is None else args.bf16_gradients) else "float32",
                   memory_gb=None if checkpointing[1] is None else checkpointing[1] / 1e9)


# -----------------------------------------------------------------------------
# Memory: gradient checkpointing where a step would not fit the GPU

# Bytes a trained parameter holds in a step: float32 weight, gradient, AdamW's two moments, the EMA.
TRAINED_PARAMETER_BYTES = 4 + 4 + 8 + 4
DDP_BUCKET_BYTES = 4  # under DDP, a float32 copy of every gradient in the buckets it all-reduces
CUDA_RESERVE = 2e9  # the CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers: outside step_memory's count
FITS_GPU = 0.85  # share of the rest a step may plan for: transient peaks and what fragmentation still costs
PLANNED_GPU_MEMORY = 85.5e9  # what --dry-run assumes on a machine without the GPU: an 80 GB H100's bytes


def saved_activation_bytes(forward) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of forward(), each storage once and
    parameters left out: the activation memory of a training step (on any device, the CPU included)."""
    saved = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            saved[(tensor.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


def step_memory(module, forward_on, batch_size: int, device, ranks: int = 1) -> int:
    """Bytes a training step of `module` holds at `batch_size`: every parameter (with its gradient,
    AdamW's moments and the EMA if trained; on several ranks DDP's gradient buckets) and the
    activations of forward_on(images) on one and on two images (each image adds the same). RNG states
    are left as they were."""
    trained = TRAINED_PARAMETER_BYTES + (DDP_BUCKET_BYTES if ranks > 1 else 0)
    weights = sum(p.numel() * (trained if p.requires_grad else p.element_size()) for p in module.parameters())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        one, two = (saved_activation_bytes(lambda: forward_on(n)) for n in (1, 2))
    return weights + one + (batch_size - 1) * (two - one)


def gpu_memory(device: torch.device) -> tuple:
    """(name, bytes) of the GPU a run plans for: the present one, or for a plan made without it an H100."""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(device)
        return gpu.name, gpu.total_memory
    return "an 80 GB H100 (assumed: no GPU here)", PLANNED_GPU_MEMORY


def fits_gpu(step_bytes: float, total_bytes: float) -> bool:
    """Whether a step of step_bytes (step_memory, DDP's buckets included) leaves the stated margin on a
    GPU of total_bytes: CUDA_RESERVE for what the count leaves out, then 1 - FITS_GPU of the rest."""
    return step_bytes <= FITS_GPU * (total_bytes - CUDA_RESERVE)


def grad_checkpointing(flag: bool | None, device: torch.device, need, log) -> tuple:
    """(--grad-checkpoint, the bytes a step then holds): by default on where a step would not fit the
    GPU. need(checkpointing) are the bytes a step holds (step_memory) without and with it. On the CPU
    no estimate is made (None): nothing is decided by it."""
    if device.type != "cuda":
        return bool(flag), None
    name, total = gpu_memory(device)
    without = need(False)
    if flag is None and not fits_gpu(without, total):
        log(f"gradient checkpointing on: a step needs {without / 1e9:.0f} GB without it, {need(True) / 1e9:.0f} GB "
            f"with it, and {name} has {total / 1e9:.0f} GB (--no-grad-checkpoint to turn it off)")
        flag = True
    return bool(flag), need(True) if flag else without


# -----------------------------------------------------------------------------
# The two ALIT stages' plans


def stage1_plan(args, model_of, device, model_device, log=print) -> RunPlan:
    """Stage 1's plan on `device`; model_of() is measured on model_device, made only if the GPU's memory
    decides (the paper's model takes a minute to build on a CPU)."""
    return alit_plan(args, device, log, lambda bf16, on: stage1_step_memory(model_of(), args.batch_size,
                                                                           model_device, bf16, on))


def stage2_plan(args, model_of, perceptual, device, model_device, log=print) -> RunPlan:
    """Stage 2's plan, as stage1_plan; the step's loss goes through LPIPS when `perceptual` is loaded."""
    return alit_plan(args, device, log, lambda bf16, on: stage2_step_memory(model_of(), args, perceptual,
                                                                           model_device, bf16, on))


def alit_plan(args, device, log, need) -> RunPlan:
    """lr = base lr x global batch / 256 (the official scaling), and gradient checkpointing where a step,
    needing need(bf16, checkpointing) bytes, would not fit."""
    bf16 = use_bf16(args.bf16, device)
    checkpointing = grad_checkpointing(args.grad_checkpoint, device, lambda on: need(bf16, on), log)
    return run_plan(args, device, args.base_lr * global_batch_of(args) / 256, bf16, checkpointing)


def stage1_step_memory(model, batch_size: int, device, bf16: bool, checkpointing: bool) -> int:
    """Bytes a stage-1 step holds: the rollout with halting and the loss at every iteration, on random
    images, with or without gradient checkpointing, on the launched ranks."""
    saved = model.quantize.restart_state() if model.quantize is not None else None  # the probes count codes too
    weights = [1.0] * model.config.rollout_iters

    def forward_on(n):
        images = torch.rand(n, 3, model.config.image_size, model.config.image_size, device=device)
        with autocast(device, bf16):
            stage1_loss(model, images, iteration_weights=weights, halting=True)

    need = with_checkpointing(model, checkpointing, lambda: step_memory(model, forward_on, batch_size, device,
                                                                        launched_ranks()))
    if saved is not None:
        model.quantize.load_restart_state(saved)
    return need


def stage2_step_memory(model, args, perceptual, device, bf16: bool, checkpointing: bool) -> int:
    """Bytes a stage-2 step holds at its largest: the loss at the last iteration (the whole encoder
    rollout), through LPIPS when it is loaded, without the discriminator (a few percent), with or
    without gradient checkpointing."""
    def forward_on(n):
        images = torch.rand(n, 3, model.config.image_size, model.config.image_size, device=device)
        with autocast(device, bf16):
            (record,) = model(images, iters=[model.config.rollout_iters - 1], reconstruct=True)
            reconstruction_loss(record.recon.float(), images, perceptual, args.l1_weight, args.perceptual_weight)

    return with_checkpointing(model, checkpointing, lambda: step_memory(model, forward_on, args.batch_size, device,
                                                                        launched_ranks()))


def with_checkpointing(model, checkpointing: bool, measure):
    """measure() with the model's gradient checkpointing set so, then as it was."""
    was = model.encoder.grad_checkpoint
    model.set_grad_checkpointing(checkpointing)
    try:
        return measure()
    finally:
        model.set_grad_checkpointing(was)
