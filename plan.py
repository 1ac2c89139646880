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
import sys
from pathlib import Path

import torch

from cost import (H100_BF16_FLOPS, UTILISATION, all_reduce_seconds, checkpoint_bytes, discriminator_parameters,
                  per_image_flops, trained_parameters)
from data import build_dataset
from distributed import (autocast, cpus_per_rank, data_workers, launched_nodes, launched_ranks, to_stderr,
                         use_bf16)
from losses import reconstruction_loss, stage1_loss

PAPER_GLOBAL_BATCH = 256  # the official runs: 32 images per GPU x 8 GPUs, base lr at batch 256

# -----------------------------------------------------------------------------
# The run's length and batch, whatever the number of GPUs


GLOBAL_BATCH_TOLERANCE = 0.05  # how far from --global-batch the batch actually trained may be


def fit_global_batch(args, given: set, ranks: int | None = None):
    """--global-batch on the launched ranks, within GLOBAL_BATCH_TOLERANCE: a batch a rank of at most
    --batch-size (what the memory plan holds) and the fewest accumulation steps, then the closest total
    (6 GPUs train at 21 x 2 x 6 = 252 for 256). The lr follows the batch actually used (alit_plan). A
    --batch-size or --grad-accum given stays as given. Where no split comes within reach (more ranks than
    the batch has images), one error line naming the nearest GPU counts that fit."""
    ranks = launched_ranks() if ranks is None else ranks
    if args.global_batch is None or {"batch_size", "grad_accum"} <= given:
        return args
    fit = split_global_batch(args.global_batch, ranks, args.batch_size, "batch_size" in given,
                             args.grad_accum if "grad_accum" in given else None)
    if fit is None:
        fits = [n for n in range(1, 4 * ranks + 1) if split_global_batch(
            args.global_batch, n, args.batch_size, "batch_size" in given, None) is not None]
        nearest = [max((n for n in fits if n < ranks), default=None), min((n for n in fits if n > ranks), default=None)]
        sys.exit(f"error: a global batch of {args.global_batch} (within {GLOBAL_BATCH_TOLERANCE:.0%}) does not split "
                 f"over {ranks} ranks at most {args.batch_size} images a rank: launch "
                 f"{' or '.join(str(n) for n in nearest if n)} GPUs, or pass another --global-batch")
    args.batch_size, args.grad_accum = fit
    return args


def split_global_batch(total: int, ranks: int, max_batch: int, batch_fixed: bool, accum: int | None):
    """(batch a rank, accumulation) whose product with `ranks` is within GLOBAL_BATCH_TOLERANCE of
    `total`: the fewest accumulation steps, then the closest, then the largest batch; None if none is."""
    best = None
    for batch in ([max_batch] if batch_fixed else range(1, max_batch + 1)):
        for steps in [accum] if accum else {max(1, total // (batch * ranks)), max(1, -(-total // (batch * ranks)))}:
            error = abs(batch * steps * ranks - total)
            if error <= GLOBAL_BATCH_TOLERANCE * total:
                key = (steps, error, -batch)
                best = min(best, (key, (batch, steps))) if best else (key, (batch, steps))
    return best and best[1]


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
    by --dry-run as one JSON line (with no GPU and no process group needed). Each figure is what it
    assumes: the GPU (the present one, or an H100 when planned without), the CPUs this machine (or Slurm's
    --cpus-per-task) gives a rank, an H100 at cost.UTILISATION for times."""
    device: str
    world_size: int
    nodes: int
    batch_per_rank: int
    grad_accum: int
    global_batch: int
    global_batch_asked: int | None  # --global-batch (the paper's at its scale); the one above is within 5%
    train_images: int
    steps: int
    epochs: float
    warmup_steps: int
    warmup_epochs: float
    lr: float
    workers_per_rank: int
    cpus_per_rank: float
    precision: str
    all_reduce: str  # the dtype DDP sends gradients in (none on one rank)
    all_reduce_mb: float  # the gradients a step all-reduces
    grad_checkpoint: bool
    gpu: str | None  # the GPU planned for; none on the CPU
    gpu_memory_gb: float | None
    memory_budget_gb: float | None  # what a step may hold on it (fits_gpu)
    memory_gb: float | None  # a step's estimate on the GPU (step_memory)
    step_seconds: float | None  # on an H100 at cost.UTILISATION, the all-reduce after the backward included
    all_reduce_share: float | None  # of that step
    gpu_hours: float | None
    checkpoint_gb: float  # what a checkpoint holds (cost.checkpoint_bytes)
    checkpoint_every: str  # --save-every steps, or --save-minutes
    checkpoints: int | None  # written over the run (by time: from step_seconds)
    checkpoint_tb_written: float | None
    resume: dict | None  # the checkpoint in --out-dir a --resume continues: its step and global batch

    def __str__(self):
        lines = [f"run plan: {self.device} x {self.world_size} rank(s) on {self.nodes} node(s); global batch "
                 f"{self.global_batch} = {self.batch_per_rank} a rank x {self.grad_accum} accumulated x "
                 f"{self.world_size}" + (f" (for {self.global_batch_asked})" if self.global_batch_asked not in
                                         (None, self.global_batch) else "") + "; "
                 f"{self.steps} steps = {self.epochs:.1f} epochs of {self.train_images} images, warm-up "
                 f"{self.warmup_steps} ({self.warmup_epochs:.1f} epochs); peak lr {self.lr:.3g}; "
                 f"{self.workers_per_rank} data worker(s) a rank; {self.precision}, gradients all-reduced in "
                 f"{self.all_reduce}; gradient checkpointing {'on' if self.grad_checkpoint else 'off'}"]
        if self.gpu is not None:
            needs = f", needs {self.memory_gb:.1f} GB" if self.memory_gb is not None else ""
            budget = f"a step may hold {self.memory_budget_gb:.1f} GB{needs}"
            lines.append(f"  GPU {self.gpu}, {self.gpu_memory_gb:.0f} GB: {budget}; "
                         f"{self.cpus_per_rank:.3g} CPUs a rank")
        if self.step_seconds is not None:
            lines.append(f"  on H100s at {UTILISATION:.0%} of their bf16 peak: {self.step_seconds:.2f} s a step "
                         f"({self.all_reduce_share:.0%} of it all-reducing {self.all_reduce_mb:.0f} MB), "
                         f"{self.gpu_hours:,.0f} GPU-hours")
        written = f", {self.checkpoints} in the run: {size(self.checkpoint_tb_written * 1e12)} written" \
            if self.checkpoints is not None else ""
        lines.append(f"  checkpoints of {size(self.checkpoint_gb * 1e9)} every {self.checkpoint_every}{written}")
        if self.resume:
            lines.append(f"  resuming step {self.resume['step']:,} of a run at global batch "
                         f"{self.resume['global_batch']} (this one: {self.global_batch})")
        lines += [f"warning: {w}" for w in self.warnings()]
        return "\n".join(lines)

    def warnings(self) -> list:
        said = []
        if self.device == "cuda" and self.cpus_per_rank < 2:
            said.append(f"{self.cpus_per_rank:.3g} CPUs a rank (this machine's over its ranks; under srun, "
                        "--cpus-per-task): too few to decode images for a GPU (bench.py); is that what the job gets?")
        if self.all_reduce_share is not None and self.all_reduce_share > ALL_REDUCE_WARNING:
            said.append(f"the gradient all-reduce is about {self.all_reduce_share:.0%} of a step: fewer nodes"
                        + (", --bf16-gradients" if self.all_reduce == "float32" else "")
                        + ", or more images a rank (--global-batch)")
        return said

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


ALL_REDUCE_WARNING = 0.25  # a step's share of all-reducing gradients the plan warns above


def size(nbytes: float) -> str:
    unit = next((u for u in ("TB", "GB", "MB") if nbytes >= {"TB": 1e12, "GB": 1e9, "MB": 1e6}[u]), "KB")
    return f"{nbytes / {'TB': 1e12, 'GB': 1e9, 'MB': 1e6, 'KB': 1e3}[unit]:.3g} {unit}"


def print_dry_run(plan: RunPlan):
    """--dry-run: the plan as one JSON line on stdout, in words (with its warnings) on stderr."""
    to_stderr(plan)
    print(plan.to_json())


def run_plan(args, device: torch.device, lr: float, bf16: bool, costs: dict, checkpointing=(False, None)) -> RunPlan:
    """The plan of `args` on `device` and the launched ranks; checkpointing is grad_checkpointing's answer;
    `costs`: the run's own (stage_costs)."""
    images, global_batch, ranks, nodes = (count_images(args.dataset, args.data_dir, args.train_images),
                                          global_batch_of(args), launched_ranks(), launched_nodes())
    # bf16 gradients where they pay: across nodes, where the link is slow; on one node NVLink sums float32
    # in about the time (bench.py: ~2 ms a stage-1 step) and without bf16's rounding of 8-16 partial sums.
    bf16_gradients = bf16 and nodes > 1 if args.bf16_gradients is None else args.bf16_gradients
    reduce_bytes = (2 if bf16_gradients else 4) * costs["trained"] if ranks > 1 else 0
    gpu = gpu_memory(device) if device.type == "cuda" else None
    step = None
    if device.type == "cuda" and costs.get("flops_per_image"):
        compute = args.batch_size * args.grad_accum * costs["flops_per_image"] / (UTILISATION * H100_BF16_FLOPS)
        step = compute + all_reduce_seconds(reduce_bytes, ranks, nodes)
    if args.save_every:
        every, saves = f"{args.save_every} steps", args.steps // args.save_every + 1
    else:
        every = f"{args.save_minutes:g} minutes"
        saves = None if step is None else int(args.steps * step / (60 * args.save_minutes)) + 1
    return RunPlan(device=device.type, world_size=ranks, nodes=nodes,
                   batch_per_rank=args.batch_size, grad_accum=args.grad_accum, global_batch=global_batch,
                   global_batch_asked=args.global_batch,
                   train_images=images, steps=args.steps, epochs=args.steps * global_batch / images,
                   warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_steps * global_batch / images,
                   lr=lr, workers_per_rank=data_workers(args.num_workers, device), cpus_per_rank=cpus_per_rank(),
                   precision="bf16" if bf16 else "float32", grad_checkpoint=checkpointing[0],
                   all_reduce="none" if ranks == 1 else "bf16" if bf16_gradients else "float32",
                   all_reduce_mb=reduce_bytes / 1e6, gpu=gpu and gpu[0], gpu_memory_gb=gpu and gpu[1] / 1e9,
                   memory_budget_gb=gpu and FITS_GPU * (gpu[1] - CUDA_RESERVE) / 1e9,
                   memory_gb=None if checkpointing[1] is None else checkpointing[1] / 1e9,
                   step_seconds=step, all_reduce_share=step and all_reduce_seconds(reduce_bytes, ranks, nodes) / step,
                   gpu_hours=step and step * args.steps * ranks / 3600, checkpoint_gb=costs["checkpoint"] / 1e9,
                   checkpoint_every=every, checkpoints=saves,
                   checkpoint_tb_written=saves and saves * costs["checkpoint"] / 1e12,
                   resume=checkpoint_summary(args))


def checkpoint_summary(args) -> dict | None:
    """The step, global batch and images seen of the checkpoint --resume continues (read lazily: the
    weights stay on disk), or None."""
    path = Path(args.out_dir) / "ckpt.pt"
    if not args.resume or not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # resume itself says what is wrong with it
        return None
    return {key: ckpt.get(key) for key in ("step", "global_batch", "images_seen")}


def alit_costs(stage: str, cfg, args, device) -> dict:
    """What a run of `stage` ("stage1" or "stage2") costs at ALITConfig `cfg`, from cost.py: its trained
    parameters (the gradients all-reduced), its checkpoint's bytes, and on CUDA the FLOPs of an image."""
    counts = trained_parameters(cfg)
    flops = per_image_flops(cfg, getattr(args, "disc_layers", 3)) if device.type == "cuda" else {}
    if stage == "stage1":  # the frozen base is kept by file (checkpoint.Trained)
        return {"trained": counts["stage1"], "checkpoint": checkpoint_bytes(counts["stage1"]),
                "flops_per_image": flops.get("stage1")}
    disc = (cfg.rollout_iters if args.disc_per_iteration else 1) * discriminator_parameters(args.disc_layers,
                                                                                           args.disc_channels)
    return {"trained": counts["stage2"], "flops_per_image": flops.get("stage2"),
            "checkpoint": checkpoint_bytes(counts["stage2"], counts["all"] - counts["stage2"], disc)}


def base_costs(cls, cfg, args) -> dict:
    """The same for train_vqgan.py's tokenizer (`cls` at `cfg`; no EMA) and its discriminator; no FLOPs."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in cls(cfg).parameters())
    disc = discriminator_parameters(args.disc_layers, args.disc_channels)
    return {"trained": parameters, "flops_per_image": None, "checkpoint": checkpoint_bytes(0, 0, parameters + disc)}


# -----------------------------------------------------------------------------
# Memory: gradient checkpointing where a step would not fit the GPU

# Bytes a trained parameter holds in a step: float32 weight, gradient, AdamW's two moments, the EMA. Under DDP
# the gradients are its buckets (distributed.wrap_ddp: gradient_as_bucket_view), no copy more.
TRAINED_PARAMETER_BYTES = 4 + 4 + 8 + 4
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


def step_memory(module, forward_on, batch_size: int, device) -> int:
    """Bytes a training step of `module` holds at `batch_size`: every parameter (with its gradient,
    AdamW's moments and the EMA if trained) and the
    activations of forward_on(images) on one and on two images (each image adds the same). RNG states
    are left as they were."""
    weights = sum(p.numel() * (TRAINED_PARAMETER_BYTES if p.requires_grad else p.element_size())
                  for p in module.parameters())
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
    """Whether a step of step_bytes (step_memory) leaves the stated margin on a
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


def stage1_plan(args, cfg, model_of, device, model_device, log=print) -> RunPlan:
    """Stage 1's plan on `device` at ALITConfig `cfg`; model_of() is measured on model_device, made only if
    the GPU's memory decides (the paper's model takes a minute to build on a CPU)."""
    return alit_plan(args, device, log, lambda bf16, on: stage1_step_memory(model_of(), args.batch_size,
                                                                           model_device, bf16, on),
                     alit_costs("stage1", cfg, args, device))


def stage2_plan(args, cfg, model_of, perceptual, device, model_device, log=print) -> RunPlan:
    """Stage 2's plan, as stage1_plan; the step's loss goes through LPIPS when `perceptual` is loaded."""
    return alit_plan(args, device, log, lambda bf16, on: stage2_step_memory(model_of(), args, perceptual,
                                                                           model_device, bf16, on),
                     alit_costs("stage2", cfg, args, device))


def alit_plan(args, device, log, need, costs: dict) -> RunPlan:
    """lr = base lr x global batch / 256 (the official scaling, of the batch actually used), and gradient
    checkpointing where a step, needing need(bf16, checkpointing) bytes, would not fit."""
    bf16 = use_bf16(args.bf16, device)
    checkpointing = grad_checkpointing(args.grad_checkpoint, device, lambda on: need(bf16, on), log)
    return run_plan(args, device, args.base_lr * global_batch_of(args) / 256, bf16, costs, checkpointing)


def stage1_step_memory(model, batch_size: int, device, bf16: bool, checkpointing: bool) -> int:
    """Bytes a stage-1 step holds: the rollout with halting and the loss at every iteration, on random
    images, with or without gradient checkpointing."""
    saved = model.quantize.restart_state() if model.quantize is not None else None  # the probes count codes too
    weights = [1.0] * model.config.rollout_iters

    def forward_on(n):
        images = torch.rand(n, 3, model.config.image_size, model.config.image_size, device=device)
        with autocast(device, bf16):
            stage1_loss(model, images, iteration_weights=weights, halting=True)

    need = with_checkpointing(model, checkpointing, lambda: step_memory(model, forward_on, batch_size, device))
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

    return with_checkpointing(model, checkpointing, lambda: step_memory(model, forward_on, args.batch_size, device))


def with_checkpointing(model, checkpointing: bool, measure):
    """measure() with the model's gradient checkpointing set so, then as it was."""
    was = model.encoder.grad_checkpoint
    model.set_grad_checkpointing(checkpointing)
    try:
        return measure()
    finally:
        model.set_grad_checkpointing(was)
