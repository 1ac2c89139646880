"""A distributed run: the device, the ranks and DDP, the stop signal and the shared-folder check.

Paper: ALIT, arXiv:2411.02393, §A.5 trains both stages on 8 GPUs with the official code's torchrun
scripts. Here one process is one rank: several ranks launched (torchrun, or Slurm's srun: `launch`)
mean DDP, nccl on CUDA and gloo on the CPU; rank 0 logs and saves. What a rank needs before, around and
after the training loop is here, each a call the training scripts make by name (train_stage1.py: `setup`,
`wrap_ddp`, `StopSignal`, `end`).
"""
import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# The ranks and the device


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

    def no_sync(self, ddp_model, last_micro_step: bool):
        """DDP's gradient all-reduce on the last micro-step of an accumulation only (no_sync before)."""
        return ddp_model.no_sync() if self.enabled and not last_micro_step else contextlib.nullcontext()


def to_stderr(*args):
    """A message beside a command's output (--dry-run's plan is its only line on stdout)."""
    print(*args, file=sys.stderr)


# GPUs a node is assumed to hold where the launch does not say (a plan made away from the cluster).
ASSUMED_GPUS_PER_NODE = 8


def launch() -> dict:
    """How this process was launched, known before DDP is set up: {"rank", "local_rank", "world_size",
    "local_world_size", "restarts", "launched"}. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and
    LOCAL_WORLD_SIZE; where RANK is unset, `srun` with one task a GPU sets SLURM_PROCID, SLURM_LOCALID,
    SLURM_NTASKS and SLURM_NTASKS_PER_NODE, read the same way (they then also need MASTER_ADDR and
    MASTER_PORT, as torchrun sets them). WORLD_SIZE alone is a plan's (--dry-run away from the cluster).
    `launched`: several ranks really started (DDP). `restarts`: torchrun's restarts of this worker, or
    Slurm's requeues of the job: a restarted run continues, whatever its flags."""
    env = os.environ
    restarts = max(int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), int(env.get("SLURM_RESTART_COUNT", 0)))
    tasks = int(env.get("SLURM_NTASKS", 1))
    if "RANK" not in env and tasks > 1 and "SLURM_PROCID" in env:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            sys.exit(f"error: srun started {tasks} tasks, the ranks of one run, but {' and '.join(missing)} "
                     "is not set: export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
                     "and MASTER_PORT=29500 before srun, or launch with torchrun")
        per_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(tasks)).split("(")[0])
        return {"rank": int(env["SLURM_PROCID"]), "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "world_size": tasks, "local_world_size": int(per_node), "restarts": restarts, "launched": True}
    world = int(env.get("WORLD_SIZE", 1))
    per_node = env.get("LOCAL_WORLD_SIZE") or (torch.cuda.device_count() if torch.cuda.is_available() else
                                               min(world, ASSUMED_GPUS_PER_NODE))
    return {"rank": int(env.get("RANK", 0)), "local_rank": int(env.get("LOCAL_RANK", 0)), "world_size": world,
            "local_world_size": max(1, int(per_node)), "restarts": restarts, "launched": "RANK" in env}


def planned_device(device_flag: str = "auto") -> torch.device:
    """The one place the device is chosen: --device cuda or cpu, or auto: CUDA when available. The GPU is
    cuda:<local rank>. Touches no GPU, so that --dry-run plans a CUDA run on any machine."""
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    return torch.device(f"cuda:{launch()['local_rank']}" if use_cuda else "cpu")


def launched_ranks() -> int:
    """The processes torchrun (or srun) started, 1 without it, known before DDP is set up."""
    return launch()["world_size"]


def launched_nodes() -> int:
    """The machines they run on: the launcher starts local_world_size of them on each."""
    ranks = launch()
    return -(-ranks["world_size"] // ranks["local_world_size"])


def restarted_worker() -> bool:
    """Whether this run is the same command again after a failure: a worker torchrun restarted
    (--max-restarts), or a job Slurm requeued."""
    return launch()["restarts"] > 0


def setup(device_flag: str = "auto", timeout: float = 300, shared_folder=None, keep_freed: bool = True) -> Distributed:
    """A script's ranks, device and process, before anything is built: the ranks meet (setup_ranks);
    `shared_folder` (a training run's --out-dir) must be one folder they all share (check_shared_folder);
    on the CPU freed memory stays in the process (keep_freed_memory)."""
    ctx = setup_ranks(device_flag, timeout)
    if shared_folder is not None:
        check_shared_folder(shared_folder, ctx, "--out-dir", timeout)
    if keep_freed and ctx.device.type == "cpu":
        keep_freed_memory()
    return ctx


def setup_ranks(device_flag: str = "auto", timeout: float = 300) -> Distributed:
    """Several launched ranks (torchrun, or srun: launch) mean DDP: nccl with CUDA, gloo without, on
    the device planned_device chooses. A collective that waits longer than `timeout` seconds for a lost rank ends
    the run with an error instead of a hang."""
    ranks = launch()
    rank, local_rank, world = (ranks["rank"], ranks["local_rank"], ranks["world_size"]) if ranks["launched"] \
        else (0, 0, 1)
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
    if ranks["launched"]:
        store = restart_store(rank, world, timeout) or {"rank": rank, "world_size": world}  # env:// for the rest
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout), **store)
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


def data_workers(num_workers: int | None, device: torch.device) -> int:
    """--num-workers, by default: on CUDA the CPUs this process may use, shared by the ranks on this
    machine, less one each for the training loop, so that decoding and cropping JPEGs never starves
    the GPU (bench.py measures how many a GPU needs); on the CPU none, as workers would take the
    cores the model computes on."""
    if num_workers is not None:
        return num_workers
    if device.type != "cuda":
        return 0
    return max(1, int(cpus_per_rank()) - 1)


def cpus_per_rank() -> float:
    """The CPUs a rank has: under srun with a task a GPU, Slurm's --cpus-per-task; else the CPUs this process
    may use (a job's share of its node, or the planning machine's) over the ranks launched on it."""
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_CPUS_PER_TASK" in os.environ and "RANK" not in os.environ:
        return float(os.environ["SLURM_CPUS_PER_TASK"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus / launch()["local_world_size"]


# -----------------------------------------------------------------------------
# Precision and memory layout


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


def use_bf16(flag: bool | None, device: torch.device) -> bool:
    """--bf16, by default where it is native; a CUDA run planned without its GPU assumes an Ampere+ one."""
    if flag is not None:
        return flag
    return True if device.type == "cuda" and not torch.cuda.is_available() else native_bf16(device)


AUTOCAST_DEVICES = ("cuda", "cpu")  # where torch.autocast runs (it refuses the `meta` device the tests use)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast where asked for (no GradScaler needed: bf16 has float32's range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and device.type in AUTOCAST_DEVICES \
        else contextlib.nullcontext()


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The layout the VQGAN's weights (hence its activations) should have on `device`: channels-last,
    fastest for oneDNN's and cuDNN's convolutions, where GroupNorm keeps it; where GroupNorm has no
    channels-last kernel (CUDA, in some PyTorch versions) it would copy every activation to
    channels-first and back around each of its ~40 calls, so the contiguous layout is used there.
    Asked of the device itself: one GroupNorm on a 2x2 map."""
    probe = torch.zeros(1, 2, 2, 2, device=device).to(memory_format=torch.channels_last)
    keeps = F.group_norm(probe, 1).is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if keeps else torch.contiguous_format




# -----------------------------------------------------------------------------
# DDP


def wrap_ddp(module, ctx: Distributed, find_unused_parameters=False, bf16_gradients=False):
    """DDP on several ranks; with bf16_gradients its buckets travel as bf16 (bf16_all_reduce). The gradients
    are views into DDP's buckets (no copy of them into the buckets, nor the memory of a second set);
    `find_unused_parameters` only for a step that can leave a parameter without a gradient (a walk of the
    autograd graph every step)."""
    if not ctx.enabled:
        return module
    ddp = DDP(module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
              find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
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


# -----------------------------------------------------------------------------
# Around the loop: the shared folder, the stop signal, a loss gone wrong, the end


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
        end()
        sys.exit(f"error: {flag} {folder}: {', '.join(blind)} cannot see the files rank 0 writes there; every "
                 f"rank must see the same {flag}: on several machines, a folder on a filesystem they all share "
                 "(the same network path on each)")


# Set while a checkpoint is being written (checkpoint.Writer): a repeated stop signal waits for it.
WRITING = threading.Event()


class StopSignal:
    """SIGTERM (a cluster preempting the job, torchrun or Slurm stopping it), SIGUSR1 or SIGUSR2 (Slurm's
    warning before the time limit: #SBATCH --signal=USR1@N) and SIGINT (Ctrl-C) end the run after its
    current step with a checkpoint to --resume from. A second signal more than a second later ends the
    process at once, unless a checkpoint is being written: then the write finishes first (the run is
    ending anyway). Every `every` steps the ranks agree (`poll`) on whether any got a signal, and on
    whether rank 0's clock says a checkpoint is due: one small all-reduce on the run's device."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, ctx: Distributed, every: int | None = None):
        # Asking waits for the GPU on CUDA: every 10 steps there (a stop within seconds at the paper's size)
        self.ctx, self.every = ctx, every or (10 if ctx.device.type == "cuda" else 1)
        self.received, self.first_at, self.stopped = None, 0.0, False
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame):
        if self.received is None:
            self.received, self.first_at = signal.Signals(signum).name, time.monotonic()
        # A cluster that signals every process of a job reaches a torchrun worker twice within moments
        # (directly, and forwarded by torchrun): that is still the first request.
        elif time.monotonic() - self.first_at > 1 and not WRITING.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def poll(self, step: int, save_due: bool = False) -> tuple:
        """(stop, save): whether any rank got a signal, and whether a checkpoint is due by the clock
        (`save_due`, rank 0's), the same on every rank. Asked only every `every` steps: (False, False) else."""
        if step % self.every:
            return False, False
        stop, save = self.received is not None, save_due
        if self.ctx.enabled:
            flags = torch.tensor([stop, save], dtype=torch.int32, device=self.ctx.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, save = (bool(flag) for flag in flags.tolist())
        self.stopped = self.stopped or stop
        return stop, save

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def check_finite(first_nonfinite: torch.Tensor, out_dir, ctx: Distributed):
    """A non-finite loss (the first step that had one, -1 if none, over all ranks) ends the run before
    the checkpoint it would have spoiled."""
    if ctx.enabled:
        dist.all_reduce(first_nonfinite, op=dist.ReduceOp.MAX)
    if first_nonfinite.item() >= 0:
        end()
        sys.exit(f"error: non-finite loss at step {int(first_nonfinite.item()) + 1}; stopped without "
                 f"saving, so {Path(out_dir) / 'ckpt.pt'} is the last good checkpoint")


def end():
    """The process group's end, before the process's. gloo's worker threads free each finished collective
    a moment after it completes, taking the GIL to do so; an interpreter already exiting makes such a
    thread die inside a destructor, and the process aborts ("terminate called without an active
    exception", SIGABRT, about one 2-rank run in three when the exit follows the last collective at
    once). A tenth of a second with the GIL released lets them finish first. In one process: nothing."""
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.1)


def finish(ctx: Distributed, stop_signal: StopSignal, step: int, steps: int, out_dir):
    """The run's end on every rank: the signal handlers put back, the process group ended, and one last
    line: done, or stopped by a signal after `step` of `steps`, and how to continue."""
    stop_signal.restore()
    end()
    ckpt = Path(out_dir) / "ckpt.pt"
    if stop_signal.stopped and step < steps:
        ctx.log(f"stopped by {stop_signal.received or 'a signal to another rank'} after step {step}: "
                f"continue with the same command and --resume, from {ckpt}")
    else:
        ctx.log(f"done: {ckpt}")
