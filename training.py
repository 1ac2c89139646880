"""What the three training scripts share: device and DDP, bf16, AdamW and its schedule, EMA,
checkpoints that resume exactly, and command-line flags read off dataclasses.

Paper: ALIT, arXiv:2411.02393, §A.5 "Training Details" trains in two stages (train_stage1.py,
train_stage2.py) on a VQGAN (train_vqgan.py); the official code runs them with torchrun on 8 GPUs,
AdamW, a linear warmup then cosine decay, and evaluates EMA weights. Nothing here knows a model.
"""
import argparse
import ast
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import functools
import inspect
import io
import json
import math
import os
import random
import re
import signal
import socket
import sys
import textwrap
import time
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DATASETS, build_dataset, check_layout, save_image_columns
from losses import hinge_d_loss
from weights import load_checkpoint

# -----------------------------------------------------------------------------
# Device and DDP


@dataclass
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    def log(self, *args, **kwargs):
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)


def to_stderr(*args):
    """A message beside a command's output (--dry-run's plan is its only line on stdout)."""
    print(*args, file=sys.stderr)


def planned_device(device_flag: str = "auto") -> torch.device:
    """The one place the device is chosen: --device cuda or cpu, or auto: CUDA when available. The GPU is
    cuda:LOCAL_RANK (torchrun). Touches no GPU, so that --dry-run plans a CUDA run on any machine."""
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")


def setup_distributed(device_flag: str = "auto", timeout: float = 300) -> Distributed:
    """`RANK` in the environment (torchrun) means DDP: nccl with CUDA, gloo without, on the device
    planned_device chooses. A collective that waits longer than `timeout` seconds for a lost rank ends
    the run with an error instead of a hang."""
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) \
        if "RANK" in os.environ else (0, 0, 1)
    device = planned_device(device_flag)
    use_cuda = device.type == "cuda"
    if use_cuda:
        # Growing segments instead of fixed blocks: the 8 sequence lengths of a rollout fragment fixed
        # ones. Read when CUDA first allocates, so set before; a user's own setting wins.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.cuda.set_device(device)  # before nccl starts, so that each rank's communicator is on its own GPU
        # Float32 products run as TF32 on Ampere+ GPUs (those bf16 autocast leaves in float32, and all of
        # them with --no-bf16); where rounding would flip a discrete choice, the nearest-code search,
        # quantize.exact_float32 turns it off. Training shapes are fixed: cuDNN picks its fastest kernels once.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout),
                                **restart_store(rank, world, timeout))
    return Distributed(rank, local_rank, world, device)


def restart_store(rank: int, world: int, timeout: float) -> dict:
    """A worker torchrun restarted meets the others in its own namespace of torchrun's store: the keys the
    failed attempt left there name the dead workers' addresses, which gloo would otherwise try to reach.
    Empty (torchrun's store as it is) on a first attempt."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not attempt:
        return {}
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_it, timeout=datetime.timedelta(seconds=timeout),
                          multi_tenant=True)
    return {"store": dist.PrefixStore(f"alit_attempt_{attempt}", store), "rank": rank, "world_size": world}


def keep_freed_memory() -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the OS.

    glibc serves blocks above 32 MB (a 256x256 VQGAN's activations) from mmap, unmaps them on free
    and trims the heap's free top, so every step faults the same memory in again, zeroed page by
    page. Measured on 2 CPU cores: a `mid` stage-1 step 1.2x faster, 30% more resident memory.
    Returns False, changing nothing, where the C library is not glibc. It cannot be undone.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    # Blocks up to 1 GB come from the heap; -1 (as size_t, the largest size) never trims it.
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def wrap_ddp(module, ctx: Distributed, find_unused_parameters=False, bf16_gradients=False):
    """DDP on several ranks; with bf16_gradients its buckets travel as bf16 (bf16_all_reduce)."""
    if not ctx.enabled:
        return module
    ddp = DDP(module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
              find_unused_parameters=find_unused_parameters)
    if bf16_gradients:
        ddp.register_comm_hook(None, bf16_all_reduce)
    return ddp


def bf16_all_reduce(group, bucket):
    """A DDP communication hook: the bucket's mean over ranks, sent as bf16 (half the bytes of float32)
    and summed in it, then put back into the float32 gradients. Every ALIT weight serves all iterations,
    so the all-reduce waits for the whole backward: its bytes are the step's communication time
    (bench.py). torch's own bf16 hook needs NCCL; this one runs on gloo too."""
    ranks = dist.get_world_size(group)
    gradients = bucket.buffer().to(torch.bfloat16).div_(ranks)
    sent = dist.all_reduce(gradients, group=group, async_op=True).get_future()
    return sent.then(lambda done: bucket.buffer().copy_(done.value()[0]))


def broadcast_parameters(module, ctx: Distributed):
    """Rank 0's parameters and buffers on every rank: what DDP does for the modules it wraps, for one
    trained outside it (the discriminators, whose gradients are averaged by hand)."""
    if ctx.enabled:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_over_ranks(tensors):
    """Average tensors across DDP ranks in place (nothing to do in one process): the discriminator's
    gradients (discriminator_step), the values the training scripts log."""
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor.div_(dist.get_world_size())


def discriminator_step(discriminator, optimizer, images, recon, precision=contextlib.nullcontext()):
    """One hinge-loss update (losses.hinge_d_loss) on real images vs the (detached) reconstructions,
    under `precision` (the training script's autocast). With gradient accumulation `images` and `recon`
    are lists of micro-batches: each goes through on its own, their mean loss makes the one update.

    The gradients are averaged across ranks by hand: two forward passes per step (real, fake)
    keep the BatchNorm statistics of real and fake batches apart, as in taming, which DDP's
    one-backward-per-forward bookkeeping does not allow.
    """
    if torch.is_tensor(images):
        images, recon = [images], [recon]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for real, fake in zip(images, recon):
        with precision:
            loss = hinge_d_loss(discriminator(real), discriminator(fake.detach())) / len(images)
        loss.backward()
        total = total + loss.detach()
    average_over_ranks([p.grad for p in discriminator.parameters()])
    optimizer.step()
    return total


def data_workers(num_workers: int | None, device: torch.device) -> int:
    """--num-workers, by default: on CUDA the CPUs this process may use, shared by the ranks on this
    machine, less one each for the training loop, so that decoding and cropping JPEGs never starves
    the GPU (bench.py measures how many a GPU needs); on the CPU none, as workers would take the
    cores the model computes on."""
    if num_workers is not None:
        return num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


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


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (and so about twice as fast as float32): an Ampere or
    newer GPU (compute capability 8.0+; V100 and T4 emulate bf16, slower than float32, though
    torch.cuda.is_bf16_supported() says yes), or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


AUTOCAST_DEVICES = ("cuda", "cpu")  # where torch.autocast runs (it refuses the `meta` device the tests use)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast where asked for (no GradScaler needed: bf16 has float32's range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and device.type in AUTOCAST_DEVICES \
        else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Optimizer, schedule, EMA


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


# -----------------------------------------------------------------------------
# Checkpoints that resume exactly


def rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain values (what weights_only loading reads): this
    rank's CPU generator and its GPU's. The data order needs none: data.train_batches draws it from
    the seed, the epoch and the index, in generators of its own."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class PerRank(typing.NamedTuple):
    """Training state that differs between ranks, seen as a state dict: checkpoints keep one per rank."""
    state_dict: typing.Callable[[], dict]
    load_state_dict: typing.Callable[[dict], None]


def gather_per_rank(ctx: Distributed, per_rank: dict) -> list:
    """Every rank's {"rng": RNG state, key: state of per_rank[key], ...}, in rank order (collective:
    all ranks must call it)."""
    state = {"rng": rng_state(), **{key: obj.state_dict() for key, obj in per_rank.items()}}
    if not ctx.enabled:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def previous_checkpoint(path: Path) -> Path:
    """ckpt.pt -> ckpt.prev.pt: the checkpoint before, kept for --resume in case ckpt.pt is unreadable."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, state: dict):
    """Durable and atomic: written to a temporary file in the same folder and flushed to disk, then
    renamed over the old checkpoint, which becomes <name>.prev.pt; the folder is flushed last. After a
    kill or a power loss the folder holds a whole checkpoint, whenever it happened."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back
        raise
    if path.exists():
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)  # the renames reach the disk
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def checkpoint_state(stateful: dict, step: int, model_config: dict, train, ctx, per_rank=None) -> dict:
    """What a checkpoint holds: the state dict of every object in `stateful` (checkpoint key ->
    object, the same on every rank), the step, both configs, and under "ranks" every rank's RNG
    state and the state of every object in `per_rank` (gather_per_rank). Collective under DDP, so
    every rank calls it."""
    return {**{key: obj.state_dict() for key, obj in stateful.items()}, "step": step,
            "model_config": model_config, "train_config": dataclasses.asdict(train),
            "ranks": gather_per_rank(ctx, per_rank or {})}


def save_training_state(train, step: int, stateful: dict, model_config: dict, ctx, per_rank=None):
    """<out_dir>/ckpt.pt, written by rank 0 (collective: every rank calls it). A failed write, a full
    disk above all, ends the run with the last checkpoint untouched."""
    state = checkpoint_state(stateful, step, model_config, train, ctx, per_rank)
    path = Path(train.out_dir) / "ckpt.pt"
    if ctx.is_main:
        try:
            save_checkpoint(path, state)
        except OSError as error:
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror or error
            sys.exit(f"error: cannot write the step-{step} checkpoint to {path}: {reason}; the last checkpoint "
                     "there is untouched: make room, then continue with --resume")


OPTIMIZER_KERNEL_OPTIONS = ("fused", "foreach", "capturable")


def start_or_resume(train, model_config: dict, stateful: dict, ctx, images: str, per_rank=None) -> int:
    """The step a run starts at: with --resume the checkpoint's, with everything in `stateful` and
    `per_rank` restored (resume); else 0, --out-dir cleared of an old run (--overwrite: its checkpoints
    and its `images`) and each rank seeded apart, so that its random draws (halting, restarts) differ."""
    if train.resume:
        return resume(Path(train.out_dir) / "ckpt.pt", model_config, stateful, ctx, per_rank)["step"]
    clear_out_dir(train, images, ctx)
    torch.manual_seed(train.seed + ctx.rank)
    return 0


def resume(path, model_config: dict, stateful: dict, ctx, per_rank=None) -> dict:
    """--resume: load `path` into every object of `stateful` (checkpoint key -> object with
    load_state_dict) and this rank's state into `per_rank` and the RNGs, and return the checkpoint.
    When `path` is missing or unreadable, the checkpoint before it (ckpt.prev.pt), saying so."""
    path = Path(path)
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        previous = previous_checkpoint(path)
        if not previous.is_file():
            sys.exit(f"error: --resume: {error}, and there is no {previous.name} to fall back to; "
                     "leave out --resume to start afresh")
        ctx.log(f"warning: {error}; resuming from the checkpoint before it, {previous}")
        try:
            ckpt, path = load_checkpoint(previous), previous
        except ValueError as previous_error:
            sys.exit(f"error: --resume: {error}; and {previous_error}")
    # Fields this code no longer has (grad_checkpoint became a training flag) do not make another model,
    # nor do fields it gained since the checkpoint was written (base, vae): their defaults are what ran.
    saved = ckpt["model_config"]
    if {key: saved.get(key, value) for key, value in model_config.items()} != model_config:
        sys.exit(f"error: {path} was trained with another model config: {ckpt['model_config']}")
    for key, obj in stateful.items():
        state = ckpt[key]
        if isinstance(obj, torch.optim.Optimizer):  # how it runs (fused, foreach) is this device's, not the writer's
            state = {**state, "param_groups": [{**saved, **{k: group[k] for k in OPTIMIZER_KERNEL_OPTIONS if k in group}}
                                               for saved, group in zip(state["param_groups"], obj.param_groups)]}
        obj.load_state_dict(state)
    ranks = ckpt.get("ranks") or [{"rng": rng} for rng in ckpt["rng"]]  # checkpoints before per-rank state
    if len(ranks) != ctx.world_size:
        ctx.log(f"warning: {path} was written by {len(ranks)} rank(s), this run has {ctx.world_size}: the data order "
                "and random draws go on differently from an uninterrupted run")
    mine = ranks[ctx.rank % len(ranks)]
    for key, obj in (per_rank or {}).items():
        if key in mine:
            obj.load_state_dict(mine[key])
        else:
            ctx.log(f"warning: {path} holds no {key!r} state (an older checkpoint): continuing without it")
    set_rng_state(mine["rng"])
    ctx.log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt


# -----------------------------------------------------------------------------
# Flags from dataclasses: names, defaults, allowed values and help from one source


# What a flag may be, written beside its field as typing.Annotated metadata, checked when the flag is
# parsed and shown in --help. A plain string, so that the model files need nothing from here:
#   ">= 0", "> 0", "in [0, 1]", "in (0, 1]", ...   the range of a number
#   "list of float > 0", "list of int >= 1", ...    comma-separated values, each checked ("or empty": may be none)
#   "auto or ..."                                   the word auto, or what follows
#   "folder": a folder this run may create or write in; "existing folder"; "file": not a folder
# or a function text -> value that raises ValueError with a message (a format of the script's own).
RANGE = re.compile(r"(>=|>|<=|<) (-?[\d.e-]+)$|in ([\[(])(-?[\d.e-]+), (-?[\d.e-]+)([\])])$")


def in_range(value, spec: str) -> bool:
    match = RANGE.match(spec)
    if match[1]:
        bound = float(match[2])
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[match[1]]
    low, high = float(match[4]), float(match[5])
    return (low <= value if match[3] == "[" else low < value) and (value <= high if match[6] == "]" else value < high)


def parse_number(text: str, kind, spec: str | None):
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value != value or (spec and not in_range(value, spec)):  # NaN is in no range
        raise ValueError(f"{text} is not {spec}")
    return value


def parse_flag_value(text: str, kind, spec):
    """A flag's text -> its value, checked against its spec (see above); ValueError says what is wrong."""
    if callable(spec):
        spec(text)  # raises ValueError saying what is wrong
        return text
    if spec and spec.startswith("auto or "):
        return text if text == "auto" else parse_flag_value(text, kind, spec[len("auto or "):])
    if spec and spec.startswith("list of "):
        item_kind, _, item_spec = spec[len("list of "):].removesuffix(", or empty").partition(" ")
        items = text.split(",")
        if text.strip() == "":
            if spec.endswith("or empty"):
                return () if kind is tuple else text
            raise ValueError("an empty list")
        values = []
        for position, item in enumerate(items, 1):
            if not item.strip():
                raise ValueError(f"item {position} of {text!r} is empty")
            try:
                values.append(parse_number(item.strip(), {"int": int, "float": float}[item_kind], item_spec or None))
            except ValueError as error:
                raise ValueError(f"item {position} of {text!r}: {error}") from None
        return tuple(values) if kind is tuple else text
    if spec in ("folder", "existing folder", "file"):
        return check_path(text, spec)
    if kind in (int, float):
        return parse_number(text, kind, spec)
    return kind(text)


def check_path(text: str, spec: str) -> str:
    path = Path(text)
    if not text:
        raise ValueError("an empty path")
    if spec == "file":
        if path.is_dir():
            raise ValueError(f"{text} is a folder, not a file")
        return text
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text} is a file, not a folder")
    if spec == "existing folder":
        if not path.is_dir():
            raise ValueError(f"{text} does not exist or is not a folder")
        return text
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())  # what it would be made in
    if not existing.is_dir():
        raise ValueError(f"{text} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{text} cannot be written: {existing} is not writable")
    return text


def field_spec(cls, f: dataclasses.Field):
    """(the field's type without Annotated, its spec or None): a subclass that only changes a default
    keeps its base's spec."""
    for klass in cls.__mro__:
        annotation = vars(klass).get("__annotations__", {}).get(f.name)
        if typing.get_origin(annotation) is Annotated:
            return annotation.__origin__, annotation.__metadata__[0]
    return f.type, None


def spec_text(spec) -> str:
    """How --help states a spec."""
    if spec == "or auto":
        return "the flag alone, or auto"
    if callable(spec):
        return (spec.__doc__ or "").strip().split("\n")[0]
    return spec.replace("existing folder", "an existing folder").replace("folder", "a folder to write in") \
        if spec in ("folder", "existing folder") else "a file, not a folder" if spec == "file" else spec


class FlagParser(argparse.ArgumentParser):
    """argparse with its errors as one line naming the flag, like every other mistake the scripts report."""

    def error(self, message):
        sys.exit(f"error: {re.sub(r'^argument ', '', message)} (see --help)")


def flag_error(error: ValueError, *config_classes) -> str:
    """A config's own ValueError (its __post_init__ checks) as an error line naming the flags of its fields."""
    message = str(error)
    for cls in config_classes:
        for f in dataclasses.fields(cls):
            message = re.sub(rf"\b{f.name}\b", "--" + f.name.replace("_", "-"), message)
    return f"error: {message}"


@functools.cache
def field_comments(cls) -> dict:
    """Field name -> its comment in the class source: the comment on the field's line, else the
    comment lines right above it. A subclass's comment replaces its base's; a bare override keeps it."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        lines = {}  # line number -> (comment text, whether code precedes it on that line)
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                lines[token.start[0]] = (token.string.lstrip("#").strip(), bool(token.line[:token.start[1]].strip()))
        for node in ast.parse(source).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            text = [c for n, (c, after_code) in lines.items() if node.lineno <= n <= node.end_lineno and after_code]
            if not text:
                first = node.lineno
                while first - 1 in lines and not lines[first - 1][1]:  # comment-only lines right above
                    first -= 1
                text = [lines[n][0] for n in range(first, node.lineno)]
            if text:
                comments[node.target.id] = " ".join(text)
    return comments


def allowed_values(f: dataclasses.Field, choices: dict) -> tuple | None:
    """A field's allowed values: choices[name] (e.g. a PRESETS dict), else its Literal type's."""
    if f.name in choices:
        return tuple(sorted(choices[f.name]))
    literal = [a for a in (f.type, *typing.get_args(f.type)) if typing.get_origin(a) is Literal]
    return typing.get_args(literal[0]) if literal else None


def add_dataclass_flags(parser, cls, presets: dict | None = None, choices: dict | None = None):
    """One --flag per field of `cls` (underscores -> dashes); its help is the field's comment, its
    allowed values a Literal type's (or `choices[name]`) or its Annotated spec (checked as the flag is
    parsed: parse_flag_value), and its default the field's, or "preset's value" for the fields `presets`
    (name -> overrides) set. Every flag parses to None unless given, so that dataclass_overrides hands on
    only what the user set."""
    group = parser.add_argument_group(cls.__name__)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            continue  # a nested config (ALITConfig.vqgan) comes from its preset or checkpoint
        allowed = allowed_values(f, choices or {})
        field_type, spec = field_spec(cls, f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help = comments.get(f.name, "")  # allowed values show in the metavar: --dataset {shapes,...}
        if presets and any(f.name in overrides for overrides in presets.values()):
            help += f" (default: preset's value{'; ' + spec_text(spec) if spec else ''})"
        elif not (default is None and "default" in help.lower()):  # the comment says what unset means
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help += f" (default: {'none' if shown in (None, '') else shown}{'; ' + spec_text(spec) if spec else ''})"
        elif spec:
            help += f" ({spec_text(spec)})"
        kwargs = dict(default=None, help=help.strip().replace("%", "%%"))
        kind = type(allowed[0]) if allowed else ([a for a in typing.get_args(field_type) if a is not type(None)]
                                                  or [field_type])[0]  # X | None -> X
        flag = "--" + f.name.replace("_", "-")
        if spec == "or auto":  # --flag, --flag auto, --no-flag
            def flag_or_auto(text):
                if text != "auto":
                    raise argparse.ArgumentTypeError(f"{text!r}: give the flag alone, or auto")
                return text
            group.add_argument(flag, nargs="?", const=True, type=flag_or_auto, metavar="auto", **kwargs)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False,
                               help=argparse.SUPPRESS)
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind in (int, float, str, tuple):
            def convert(text, kind=kind, spec=spec):
                try:
                    return parse_flag_value(text, kind, spec)
                except ValueError as error:
                    raise argparse.ArgumentTypeError(str(error)) from None
            metavar = "{" + ",".join(allowed) + "}" if allowed else "A,B,..." if kind is tuple or (
                isinstance(spec, str) and "list of" in spec) else None
            group.add_argument(flag, type=convert, metavar=metavar, **kwargs)


def dataclass_overrides(args, cls) -> dict:
    """The fields of `cls` the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def choice_checks(config, choices: dict | None = None) -> list:
    """A check per field with allowed values (see allowed_values); None stands for unset."""
    checks = []
    for f in dataclasses.fields(config):
        allowed, value = allowed_values(f, choices or {}), getattr(config, f.name)
        if allowed and value is not None:
            checks.append((value in allowed, f"--{f.name.replace('_', '-')} must be one of {', '.join(allowed)}"))
    return checks


def parse_flags(argv, doc: str, config_cls, model_cls=None, presets=None, implied=None):
    """The command line of a script: a --flag per field of `config_cls` and, if given, of `model_cls`,
    whose defaults come from `presets` (also --preset's choices); --help shows the first paragraph of
    `doc`. `implied(given)` returns defaults that depend on the flags given (name -> value), such as
    the paper's run for --dataset imagenet100; a flag given wins. Returns the config and the model
    fields the user set."""
    parser = FlagParser(description=doc.split("\n\n")[0])
    add_dataclass_flags(parser, config_cls, choices={"preset": presets} if presets else None)
    if model_cls is not None:
        add_dataclass_flags(parser, model_cls, presets=presets)
    args = parser.parse_args(argv)
    model_flags = dataclass_overrides(args, model_cls) if model_cls is not None else {}
    given = dataclass_overrides(args, config_cls)
    defaults = implied(given) if implied else {}
    if issubclass(config_cls, LoopConfig):
        defaults = run_length_defaults(given, defaults)
    config = config_cls(**{**defaults, **given})
    return (fit_global_batch(config, given, launched_ranks()) if isinstance(config, LoopConfig) else config), model_flags


def check_flags(checks):
    """Out-of-range flags stop before any work starts; each message names the flag."""
    errors = [message for ok, message in checks if not ok]
    if errors:
        sys.exit("error: " + "; ".join(errors))


def check_data(dataset: str, data_dir: str | None, splits=("train", "val")):
    """A wrong --data-dir stops before any work starts, with a one-line error (data.check_layout)."""
    for split in splits:
        try:
            check_layout(dataset, split, data_dir)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"error: {error}")


# The paper's data: with these and no --preset, the scripts set up the paper's model and run.
PAPER_DATASETS = ("imagenet100", "imagenet")


def paper_scale(image_size: int) -> bool:
    """Whether a model has the paper's image size (256x256, §A.5): it trains and is evaluated with the
    official recipe and criterion; the CPU presets below it need their own (README, "choices")."""
    return image_size >= 256


def with_recipe(train, image_size: int, official: dict, cpu: dict):
    """The recipe fields left unset (None): each script's OFFICIAL_RECIPE at the paper's 256x256, its
    CPU_RECIPE below (the values a few thousand CPU steps need; README, "choices")."""
    recipe = official if paper_scale(image_size) else cpu
    return dataclasses.replace(train, **{k: v for k, v in recipe.items() if getattr(train, k) is None})


def official_heads(text: str | None):
    """--heads "8" or "8,8" (encoder, decoder) -> ALIT.from_official's heads: None, 8 or (8, 8)."""
    if text is None:
        return None
    heads = tuple(int(h) for h in text.split(","))
    return heads[0] if len(heads) == 1 else heads
PAPER_GLOBAL_BATCH = 256  # the official runs: 32 images per GPU x 8 GPUs, base lr at batch 256


def launched_ranks() -> int:
    """The processes torchrun started (1 without it), known before DDP is set up."""
    return int(os.environ.get("WORLD_SIZE", 1))


def launched_nodes() -> int:
    """The machines they run on: torchrun starts LOCAL_WORLD_SIZE of them on each."""
    return -(-launched_ranks() // int(os.environ.get("LOCAL_WORLD_SIZE", launched_ranks())))


# -----------------------------------------------------------------------------
# The run's length and batch, whatever the number of GPUs


def run_length_defaults(given: dict, defaults: dict) -> dict:
    """A length given in steps wins over one implied in epochs (the paper's run), and one given both
    ways is refused."""
    for steps, epochs in (("steps", "epochs"), ("warmup_steps", "warmup_epochs")):
        if steps in given and epochs in given:
            sys.exit(f"error: --{steps.replace('_', '-')} and --{epochs.replace('_', '-')} both set the run's "
                     "length: pass one of them")
        if steps in given:
            defaults = {k: v for k, v in defaults.items() if k != epochs}
    return defaults


def fit_global_batch(train, given: dict, ranks: int):
    """--global-batch on `ranks` ranks: gradient accumulation fills what their batches lack, and where
    the ranks alone exceed it each takes a smaller batch. A --batch-size or --grad-accum given wins."""
    if train.global_batch is None:
        return train
    batch = train.batch_size
    if "batch_size" not in given and batch * ranks > train.global_batch:
        batch = max(1, train.global_batch // ranks)
    accum = train.grad_accum if "grad_accum" in given else max(1, math.ceil(train.global_batch / (batch * ranks)))
    return dataclasses.replace(train, batch_size=batch, grad_accum=accum)


def global_batch_of(train) -> int:
    return train.batch_size * train.grad_accum * launched_ranks()


@functools.cache
def count_images(dataset: str, data_dir: str | None, num_images: int | None) -> int:
    """Training images of --dataset/--data-dir (--train-images caps them): what an epoch is."""
    return len(build_dataset(dataset, "train", 32, data_dir, num_images=num_images))


def schedule_in_epochs(train):
    """--epochs and --warmup-epochs as optimizer steps of the global batch over the training images."""
    if train.epochs is None and train.warmup_epochs is None:
        return train
    steps_per_epoch = count_images(train.dataset, train.data_dir, train.train_images) / global_batch_of(train)
    steps = train.steps if train.epochs is None else max(1, round(train.epochs * steps_per_epoch))
    warmup = train.warmup_steps if train.warmup_epochs is None else round(train.warmup_epochs * steps_per_epoch)
    return dataclasses.replace(train, steps=steps, warmup_steps=warmup)


def use_bf16(flag: bool | None, device: torch.device) -> bool:
    """--bf16, by default where it is native; a CUDA run planned without its GPU assumes an Ampere+ one."""
    if flag is not None:
        return flag
    return True if device.type == "cuda" and not torch.cuda.is_available() else native_bf16(device)


@dataclass
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
    memory_gb: float | None  # a step's estimate on the GPU (training.step_memory); none on the CPU

    def __str__(self):
        memory = f", {self.memory_gb:.1f} GB a step" if self.memory_gb is not None else ""
        return (f"run plan: {self.device} x {self.world_size} rank(s) on {self.nodes} node(s); global batch "
                f"{self.global_batch} = {self.batch_per_rank} a rank x {self.grad_accum} accumulated x {self.world_size}; "
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


def run_plan(train, device: torch.device, lr: float, bf16: bool, checkpointing=(False, None)) -> RunPlan:
    """The plan of `train` on `device` and the launched ranks; checkpointing is grad_checkpointing's answer."""
    images, global_batch = count_images(train.dataset, train.data_dir, train.train_images), global_batch_of(train)
    return RunPlan(device=device.type, world_size=launched_ranks(), nodes=launched_nodes(),
                   batch_per_rank=train.batch_size, grad_accum=train.grad_accum, global_batch=global_batch,
                   train_images=images, steps=train.steps, epochs=train.steps * global_batch / images,
                   warmup_steps=train.warmup_steps, warmup_epochs=train.warmup_steps * global_batch / images,
                   lr=lr, workers_per_rank=data_workers(train.num_workers, device),
                   precision="bf16" if bf16 else "float32", grad_checkpoint=checkpointing[0],
                   all_reduce="none" if launched_ranks() == 1 else "bf16" if (
                       bf16 if train.bf16_gradients is None else train.bf16_gradients) else "float32",
                   memory_gb=None if checkpointing[1] is None else checkpointing[1] / 1e9)


# -----------------------------------------------------------------------------
# The flags every training loop has


@dataclass
class LoopConfig:
    """Flags every training script shares; each script's TrainConfig adds its own and may
    override these defaults."""
    # shapes is drawn on the fly; the others read --data-dir. imagenet100 and imagenet also mean the
    # paper's model and run (each script's PAPER_RUN) unless --preset and the others are given
    dataset: Literal[DATASETS] = "shapes"
    data_dir: Annotated[str | None, "existing folder"] = None  # root of the image folder (imagenet: <root>/train/<wnid>/*.JPEG)
    out_dir: Annotated[str, "folder"] = "out/run"  # checkpoint, image grids
    # The model's size; default: the paper's with --dataset imagenet100/imagenet, else tiny (32x32 images
    # on a CPU)
    preset: str | None = None
    steps: Annotated[int, ">= 1"] = 1000  # optimizer steps; the LR schedule spans them
    # The run's length in passes over the training set instead: sets --steps from the global batch
    # (--dataset imagenet100/imagenet: the paper's 200); --steps given wins
    epochs: Annotated[float | None, "> 0"] = None
    warmup_epochs: Annotated[float | None, ">= 0"] = None  # likewise for --warmup-steps (the paper's: 20)
    # The images an optimizer step sees over all ranks, whatever their number: --grad-accum fills what
    # the ranks' batches lack, and where the ranks alone exceed it the batch per rank shrinks (the
    # paper's with --dataset imagenet100/imagenet); default none: batch x grad-accum x ranks
    global_batch: Annotated[int | None, ">= 1"] = None
    grad_accum: Annotated[int, ">= 1"] = 1  # micro-batches per optimizer step (gradients synced on the last only)
    stop_after: Annotated[int, ">= 0"] = 0  # stop this run after so many steps (0: never); --resume continues on the same schedule
    batch_size: Annotated[int, ">= 1"] = 32  # per rank (and per micro-step)
    train_images: Annotated[int | None, ">= 1"] = None  # use only the first so many training images (shapes: the split's size)
    warmup_steps: Annotated[int, ">= 0"] = 100  # of linear LR warmup, then cosine decay
    min_lr_ratio: Annotated[float, "in [0, 1]"] = 0.1  # cosine decay ends at min_lr_ratio x the peak LR
    grad_clip: Annotated[float, "> 0"] = 1.0  # maximum gradient norm
    # DataLoader processes per rank; default: on CUDA the CPUs of this machine shared by its ranks, less
    # one each for the loop (training.data_workers); on the CPU none
    num_workers: Annotated[int | None, ">= 0"] = None
    log_every: Annotated[int, ">= 1"] = 25  # steps between the progress bar's loss figures (a sync point)
    sample_every: Annotated[int, ">= 1"] = 250  # write a reconstruction grid PNG every so many steps
    save_every: Annotated[int, ">= 1"] = 250  # steps between checkpoints (and at the end)
    seed: Annotated[int, ">= 0"] = 0  # of the weights, the data order and the augmentation
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when available
    bf16: bool | None = None  # bf16 autocast; default: on where bf16 is native (recent GPUs, AVX512-BF16/AMX CPUs)
    # Under DDP, all-reduce the gradients as bf16: half the bytes a step sends (bench.py); default: with --bf16
    bf16_gradients: bool | None = None
    compile: bool = False  # torch.compile the transformer blocks (ALIT stages; the first steps pay for compiling)
    # Continue from <out_dir>/ckpt.pt (or ckpt.prev.pt, the one before, if it is unreadable); --resume auto:
    # continue if there is one, else start afresh (what a requeued or torchrun --max-restarts job runs)
    resume: Annotated[bool | str, "or auto"] = False
    overwrite: bool = False  # start over in an --out-dir that holds a checkpoint: it and the run's images are deleted
    dry_run: bool = False  # print the resolved run plan as one JSON line and exit, without training or a GPU
    keep_freed_memory: bool = True  # on the CPU, keep freed memory in the process (training.keep_freed_memory)
    dist_timeout: Annotated[float, "> 0"] = 300  # seconds a collective waits for the other ranks: a lost rank ends the run with an error
    # A training image that fails to decode is skipped with a warning (the next one stands in); more than
    # this fraction of a batch's images failing stops the run: the data, not one file, is broken.
    max_bad_images: Annotated[float, "in [0, 1]"] = 0.25


def check_loop_flags(train: LoopConfig, presets) -> list:
    """The checks the flags' specs cannot make alone (each flag's own range is checked as it is parsed)."""
    return choice_checks(train, {"preset": presets})


def restarted_worker() -> bool:
    """Whether torchrun restarted this worker (--max-restarts) after a failure: the same command again."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0


def check_out_dir(train: LoopConfig, images: str) -> LoopConfig:
    """A run never replaces another's checkpoint unasked: in an --out-dir that holds one, --resume
    continues it and --overwrite starts over (clear_out_dir); without either the script stops here.
    --resume auto continues where there is a checkpoint and starts afresh where there is none, and so
    does a worker torchrun restarted, whatever its flags: a restart never deletes a checkpoint.
    Returns `train` with --resume decided (True or False)."""
    ckpt = Path(train.out_dir) / "ckpt.pt"
    check_flags([(not (train.resume and train.overwrite), "--resume continues a run, --overwrite starts over: "
                                                          "pass one of them")])
    has_run = ckpt.exists() or previous_checkpoint(ckpt).exists()
    if train.resume == "auto" or restarted_worker():
        return dataclasses.replace(train, resume=has_run, overwrite=False)
    if not train.resume and not train.overwrite and has_run:
        sys.exit(f"error: --out-dir {train.out_dir} already holds a run ({ckpt.name}): pass --resume to continue "
                 f"it, --overwrite to start over (deleting its checkpoints and {images}), or another --out-dir")
    return train


def setup_training(train: LoopConfig) -> Distributed:
    """A training script's ranks, device and process, before anything is built: the ranks meet
    (setup_distributed), --out-dir must be one folder they all share (check_shared_folder), and on the
    CPU freed memory stays in the process (keep_freed_memory)."""
    ctx = setup_distributed(train.device, train.dist_timeout)
    check_shared_folder(train.out_dir, ctx, "--out-dir", train.dist_timeout)
    if train.keep_freed_memory and ctx.device.type == "cpu":
        keep_freed_memory()
    return ctx


def check_shared_folder(folder, ctx: Distributed, flag: str, timeout: float):
    """Every rank must see `folder` as rank 0 writes it: rank 0 alone writes checkpoints, and every rank
    reads them on --resume. Rank 0 writes a file there; a rank that does not see it within 30 s (a
    network filesystem may show a new file late; at most half the collectives' `timeout`, which rank 0
    waits meanwhile) ends the run on every rank, with one error line naming the requirement: on several
    machines, the folder must be on a filesystem they share."""
    if not ctx.enabled:
        return
    wait = min(30.0, timeout / 2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = [f"{os.getpid()}-{time.time_ns()}" if ctx.is_main else None]
    dist.broadcast_object_list(token, src=0)
    probe = folder / f".rank0-{token[0]}"
    if ctx.is_main:
        probe.write_text(token[0])
    dist.barrier()
    deadline = time.monotonic() + wait
    while not (seen := probe.is_file()) and time.monotonic() < deadline:
        os.listdir(folder)  # reading the folder again revalidates a network filesystem's cached view
        time.sleep(0.2)
    seen_by = [None] * ctx.world_size
    dist.all_gather_object(seen_by, (seen, socket.gethostname()))
    if ctx.is_main:
        probe.unlink()
    blind = [f"rank {rank} on {host}" for rank, (ok, host) in enumerate(seen_by) if not ok]
    if blind:
        end_distributed()
        sys.exit(f"error: {flag} {folder}: {', '.join(blind)} cannot see the files rank 0 writes there; every "
                 f"rank must see the same {flag}: on several machines, a folder on a filesystem they all share "
                 "(the same network path on each)")


def clear_out_dir(train: LoopConfig, images: str, ctx: Distributed):
    """--overwrite: the old run's checkpoints and images go before the new run writes its own (rank 0)."""
    out = Path(train.out_dir)
    if train.overwrite and ctx.is_main and out.is_dir():
        old = [*out.glob("ckpt*.pt*"), *out.glob(images)]
        for path in old:
            path.unlink()
        if old:
            ctx.log(f"--overwrite: deleted {len(old)} file(s) of the previous run in {out}")


def stop_step(train: LoopConfig, step: int) -> int:
    """Where this run ends: the schedule's last step, or --stop-after steps from here."""
    return min(train.steps, step + train.stop_after) if train.stop_after else train.steps


def due(step: int, every: int, stop: int) -> bool:
    """Every `every` steps and at the run's last (logs, image grids, checkpoints)."""
    return step % every == 0 or step == stop


def progress(total, initial, enabled):
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


class StopSignal:
    """SIGTERM (a cluster preempting the job, torchrun stopping its workers) and SIGINT (Ctrl-C) end
    the run after the current step, with a checkpoint to --resume from; a second signal ends the
    process at once. Under DDP the ranks agree every step, so that all stop after the same one."""

    def __init__(self, ctx: Distributed, timeout: float):
        self.received, self.first_at, self.stopped = None, 0.0, False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        # The flag travels on the CPU (gloo) even beside nccl: checking it never waits for the GPU.
        timeout = datetime.timedelta(seconds=timeout)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if ctx.enabled else None

    def handle(self, signum, frame):
        if self.received is None:
            self.received, self.first_at = signal.Signals(signum).name, time.monotonic()
        # A cluster that signals every process of a job reaches a torchrun worker twice within moments
        # (directly, and forwarded by torchrun): that is still the first request.
        elif time.monotonic() - self.first_at > 1:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested(self) -> bool:
        """Whether any rank got a signal (collective under DDP: every rank asks after every step)."""
        flag = torch.tensor(self.received is not None, dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.stopped = bool(flag)
        return self.stopped

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def save_rollout(model, images, path, soft_codes: bool = True):
    """The images ALIT reconstructs from each token count, a column each, beside the originals."""
    grid = model.rollout_images(images, soft_codes=soft_codes) + [images]
    save_image_columns(grid, path, [*map(str, model.config.token_counts), "original"],
                       [f"val {i}" for i in range(len(images))])


def check_finite(first_nonfinite: torch.Tensor, train: LoopConfig, ctx: Distributed):
    """A non-finite loss (the first step that had one, -1 if none, over all ranks) ends the run before
    the checkpoint it would have spoiled."""
    if ctx.enabled:
        dist.all_reduce(first_nonfinite, op=dist.ReduceOp.MAX)
    if first_nonfinite.item() >= 0:
        end_distributed()
        sys.exit(f"error: non-finite loss at step {int(first_nonfinite.item()) + 1}; stopped without "
                 f"saving, so {Path(train.out_dir) / 'ckpt.pt'} is the last good checkpoint")


def end_distributed():
    """The process group's end, before the process's. gloo's worker threads free each finished collective
    a moment after it completes, taking the GIL to do so; an interpreter already exiting makes such a
    thread die inside a destructor, and the process aborts ("terminate called without an active
    exception", SIGABRT, about one 2-rank run in three when the exit follows the last collective at
    once). A tenth of a second with the GIL released lets them finish first. In one process: nothing."""
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.1)


def finish(ctx: Distributed, train: LoopConfig, bar, stop_signal: StopSignal | None = None, step: int = 0):
    bar.close()
    if stop_signal is not None:
        stop_signal.restore()
    end_distributed()
    ckpt = Path(train.out_dir) / "ckpt.pt"
    if stop_signal is not None and stop_signal.stopped and step < train.steps:
        ctx.log(f"stopped by {stop_signal.received or 'a signal to another rank'} after step {step}: "
                f"continue with the same command and --resume, from {ckpt}")
    else:
        ctx.log(f"done: {ckpt}")
