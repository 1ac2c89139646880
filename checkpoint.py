"""Checkpoints that resume exactly: what a training run saves, where, and how it goes on.

Paper: ALIT, arXiv:2411.02393, §A.5 trains each stage for 200 epochs on 8 GPUs: days, in a cluster's
preemptible jobs. A checkpoint holds everything the next step depends on: the weights, their EMA,
the optimizers' moments, the step, both configs, and each rank's RNG states and its own training state
(dead-code counts), so that a resumed run ends bit-identical to an uninterrupted one (tests/test_chaos.py).
Rank 0 writes it in the background (`Writer`: a CPU copy, so that training goes on), atomically, the
previous one kept (`save_checkpoint`); at 256x256 every 30 minutes rather than every 250 steps (`intervals`).
Stage 1's leaves out the frozen base, recorded by file and hash (`Trained`). A run never replaces another's
unasked; rank 0 decides whether to resume and reads the checkpoint for every rank (`check_out_dir`, `read`);
a resume that would change the schedule is refused unless --accept-changes (`check_schedule`).
"""
import errno
import os
import random
import socket
import sys
import threading
import time
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distributed import WRITING, Distributed, end, restarted_worker
from weights import load_checkpoint

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


class Trained:
    """A model seen as a state dict without its frozen base (stage 1's checkpoints: the base is recorded by
    file, weights.file_record). Loading takes such a state, or an older one that still holds the base."""

    def __init__(self, model: torch.nn.Module, base: str):
        self.model, self.prefix = model, f"{base}."

    def state_dict(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(self.prefix)}

    def load_state_dict(self, state: dict):
        state = {k: v for k, v in state.items() if not k.startswith(self.prefix)}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith(self.prefix)] + list(unexpected)
        if wrong:
            raise KeyError(f"the checkpoint's model does not match this one: {wrong[:5]}")


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
    """Durable and atomic: written to a temporary file of this process's own in the same folder and flushed
    to disk, then renamed over the old checkpoint, which becomes <name>.prev.pt; the folder is flushed last.
    After a kill or a power loss the folder holds a whole checkpoint, whenever it happened."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
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


class Writer:
    """Checkpoints written off the training path: rank 0 hands a CPU copy of the state to a thread that
    writes it (save_checkpoint) while training goes on. One write at a time: a new one waits for the last,
    and so does `wait`, called before the run ends. A failed write (a full disk above all) ends the run at
    the next save or at the end, with one error line; the checkpoint before it is untouched."""

    def __init__(self):
        self.thread, self.failed = None, None

    def submit(self, path: Path, state: dict, step: int):
        self.wait()
        state = cpu_copy(state)  # training goes on changing the weights while this one is written
        WRITING.set()
        self.thread = threading.Thread(target=self.write, args=(path, state, step), name="checkpoint writer")
        self.thread.start()

    def write(self, path: Path, state: dict, step: int):
        try:
            save_checkpoint(path, state)
        except OSError as error:
            self.failed = (step, path, error)
        finally:
            WRITING.clear()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failed:
            (step, path, error), self.failed = self.failed, None  # told once: a next run starts clean
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror or error
            sys.exit(f"error: cannot write the step-{step} checkpoint to {path}: {reason}; the last checkpoint "
                     "there is untouched: make room, then continue with --resume")


WRITER = Writer()


def cpu_copy(state):
    """`state` with every tensor copied to the CPU, where nothing the training does can change it."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: cpu_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(value) for value in state)
    return state


def wait():
    """The last checkpoint whole on disk (before a run ends: at its last step or at a stop signal)."""
    WRITER.wait()


class Clock:
    """Checkpoints by wall-clock time, the paper-scale runs' rule (--save-minutes): due when that long has
    passed since the last (read on rank 0 only; the ranks agree through distributed.StopSignal.poll)."""

    def __init__(self, minutes: float | None):
        self.seconds, self.last = None if not minutes else 60 * minutes, time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.last >= self.seconds

    def reset(self):
        self.last = time.monotonic()


def checkpoint_state(stateful: dict, step: int, model_config: dict, train_config: dict, ctx, per_rank=None) -> dict:
    """What a checkpoint holds: the state dict of every object in `stateful` (checkpoint key -> object, the
    same on every rank), the step, both configs, and under "ranks" every rank's RNG state and the state of
    every object in `per_rank` (gather_per_rank). Collective under DDP, so every rank calls it."""
    return {**{key: obj.state_dict() for key, obj in stateful.items()}, "step": step,
            "model_config": model_config, "train_config": train_config, "ranks": gather_per_rank(ctx, per_rank or {})}


def save(args, step: int, stateful: dict, model_config: dict, ctx, per_rank=None, files=None):
    """<--out-dir>/ckpt.pt (collective: every rank calls it), written by rank 0 in the background (Writer).
    It records the images seen, the global batch and the schedule, so that a resume can tell a run that
    continues from one whose schedule changed; `files`: the weight files the run builds on, by record
    (stage 1's frozen base)."""
    state = checkpoint_state(stateful, step, model_config, vars(args), ctx, per_rank)
    global_batch = args.batch_size * args.grad_accum * ctx.world_size
    state |= {"global_batch": global_batch, "images_seen": args.images_seen + (step - args.start_step) * global_batch,
              **(files or {})}
    if ctx.is_main:
        WRITER.submit(Path(args.out_dir) / "ckpt.pt", state, step)


OPTIMIZER_KERNEL_OPTIONS = ("fused", "foreach", "capturable")
# What a resume must agree on with the checkpoint, unless --accept-changes: the schedule it continues.
SCHEDULE = ("global_batch", "steps", "base_lr", "lr", "warmup_steps")


def intervals(args, image_size: int):
    """--save-every, --save-minutes and --sample-every left unset. Below the paper's 256x256, a checkpoint
    every 250 steps; at it every 30 minutes: 200 epochs are ~100,000 steps, and 250 steps between
    checkpoints of gigabytes would write terabytes (a stop loses at most the half hour). Image grids every
    250 steps, or steps / 100 where more: at most about 100 a run."""
    paper = image_size >= 256
    args.save_every = args.save_every or (None if paper else 250)
    args.save_minutes = args.save_minutes or (30.0 if paper else None)
    args.sample_every = args.sample_every or max(250, -(-args.steps // 100))
    return args


def due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def check_out_dir(args, images: str, ctx=None):
    """A run never replaces another's checkpoint unasked: in an --out-dir that holds one, --resume
    continues it and --overwrite starts over (clear_out_dir); without either the script stops here.
    --resume auto continues where there is a checkpoint and starts afresh where there is none, and so
    does a restarted run (a worker torchrun restarted, a job Slurm requeued) whatever its flags: a
    restart never deletes a checkpoint. Rank 0 decides from what it sees, and every rank follows
    (`ctx`: the ranks, after distributed.setup). Sets args.resume (True or False)."""
    decision = [None]
    if ctx is None or ctx.is_main:
        ckpt = Path(args.out_dir) / "ckpt.pt"
        has_run = ckpt.exists() or previous_checkpoint(ckpt).exists()
        if args.resume and args.overwrite:
            decision = ["error: --resume continues a run, --overwrite starts over: pass one of them"]
        elif args.resume == "auto" or restarted_worker():
            decision = [(has_run, False)]
        elif not args.resume and not args.overwrite and has_run:
            decision = [f"error: --out-dir {args.out_dir} already holds a run ({ckpt.name}): pass --resume to "
                        f"continue it, --overwrite to start over (deleting its checkpoints and {images}), or "
                        "another --out-dir"]
        else:
            decision = [(bool(args.resume), args.overwrite)]
    if ctx is not None and ctx.enabled:
        dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        end()
        sys.exit(decision[0])
    args.resume, args.overwrite = decision[0]


def clear_out_dir(args, images: str, ctx: Distributed):
    """--overwrite: the old run's checkpoints and images go before the new run writes its own (rank 0)."""
    out = Path(args.out_dir)
    if args.overwrite and ctx.is_main and out.is_dir():
        old = [*out.glob("ckpt*.pt*"), *out.glob(images)]
        for path in old:
            path.unlink()
        if old:
            ctx.log(f"--overwrite: deleted {len(old)} file(s) of the previous run in {out}")


def start_or_resume(args, model_config: dict, stateful: dict, ctx, images: str, per_rank=None, files=None) -> int:
    """The step a run starts at: with --resume the checkpoint's, with everything in `stateful` and
    `per_rank` restored (resume); else 0, --out-dir cleared of an old run (--overwrite: its checkpoints
    and its `images`) and each rank seeded apart, so that its random draws (halting, restarts) differ.
    `files`: the weight files this run builds on (name -> weights.file_record), which a resumed checkpoint
    must have recorded the same. Sets args.start_step and args.images_seen, where the data stream starts."""
    if args.resume:
        ckpt = resume(Path(args.out_dir) / "ckpt.pt", model_config, stateful, ctx, per_rank, args, files)
        args.start_step = ckpt["step"]
        args.images_seen = ckpt.get("images_seen", ckpt["step"] * ckpt.get("global_batch", global_batch(args, ctx)))
        return ckpt["step"]
    clear_out_dir(args, images, ctx)
    torch.manual_seed(args.seed + ctx.rank)
    args.start_step, args.images_seen = 0, 0
    return 0


def global_batch(args, ctx) -> int:
    return args.batch_size * args.grad_accum * ctx.world_size


def first_micro_batch(args, ctx) -> int:
    """Where this rank's data stream starts (data.train_batches): the batches of --batch-size the images
    already seen fill on these ranks."""
    return args.images_seen // (args.batch_size * ctx.world_size)


def read(path: Path, ctx) -> tuple:
    """(the checkpoint at `path`, the file it came from): read by rank 0 alone and sent to every rank, so
    that all continue from the same one, whatever each rank's view of a network filesystem (which may show
    a file late, or the one before a rename), and a large checkpoint crosses the network once. When
    `path` is missing or unreadable, the checkpoint before it (ckpt.prev.pt), saying so."""
    got = [None]
    if ctx.is_main:
        try:
            got = [(load_checkpoint(path), path)]
        except (FileNotFoundError, ValueError) as error:
            previous = previous_checkpoint(path)
            if not previous.is_file():
                got = [f"error: --resume: {error}, and there is no {previous.name} to fall back to; leave out "
                       "--resume to start afresh"]
            else:
                ctx.log(f"warning: {error}; resuming from the checkpoint before it, {previous}")
                try:
                    got = [(load_checkpoint(previous), previous)]
                except ValueError as previous_error:
                    got = [f"error: --resume: {error}; and {previous_error}"]
    if ctx.enabled:
        dist.broadcast_object_list(got, src=0)
    if isinstance(got[0], str):
        end()
        sys.exit(got[0])
    return got[0]


def resume(path, model_config: dict, stateful: dict, ctx, per_rank=None, args=None, files=None) -> dict:
    """--resume: the checkpoint (read) into every object of `stateful` (checkpoint key -> object with
    load_state_dict) and this rank's state into `per_rank` and the RNGs; returns the checkpoint. The model
    must be the same, and so must the weight files it recorded (`files`); so must the schedule (SCHEDULE:
    the global batch, steps, learning rate and warm-up), unless --accept-changes. A rank the checkpoint's
    run did not have draws from a stream of its own."""
    ckpt, path = read(Path(path), ctx)
    for key, record in (files or {}).items():
        if key in ckpt and ckpt[key]["sha256"] != record["sha256"]:
            end()
            sys.exit(f"error: --resume: {path} was trained over {ckpt[key]['path']}, and this run's {record['path']} "
                     "is another file (its sha256 differs): pass the one it was trained over")
    # Fields this code no longer has (grad_checkpoint became a training flag) do not make another model,
    # nor do fields it gained since the checkpoint was written (base, vae): their defaults are what ran.
    saved = ckpt["model_config"]
    if {key: saved.get(key, value) for key, value in model_config.items()} != model_config:
        end()
        sys.exit(f"error: {path} was trained with another model config: {ckpt['model_config']}")
    if args is not None:
        check_schedule(ckpt, args, ctx, path)
    for key, obj in stateful.items():
        state = ckpt[key]
        if isinstance(obj, torch.optim.Optimizer):  # how it runs (fused, foreach) is this device's, not the writer's
            kernel = [{k: group[k] for k in OPTIMIZER_KERNEL_OPTIONS if k in group} for group in obj.param_groups]
            state = {**state, "param_groups": [{**saved, **options}
                                               for saved, options in zip(state["param_groups"], kernel)]}
        obj.load_state_dict(state)
    ranks = ckpt.get("ranks") or [{"rng": rng} for rng in ckpt["rng"]]  # checkpoints before per-rank state
    if len(ranks) != ctx.world_size:
        ctx.log(f"warning: {path} was written by {len(ranks)} rank(s), this run has {ctx.world_size}: the data order "
                "and random draws go on differently from an uninterrupted run")
    if ctx.rank < len(ranks):
        mine = ranks[ctx.rank]
        for key, obj in (per_rank or {}).items():
            if key in mine:
                obj.load_state_dict(mine[key])
            else:
                ctx.log(f"warning: {path} holds no {key!r} state (an older checkpoint): continuing without it")
        set_rng_state(mine["rng"])
    else:  # a rank added on resume: a stream of its own, not another rank's again
        torch.manual_seed(hash(("rank added on resume", ckpt["step"], ctx.rank)) % 2 ** 63)
    same_step(ckpt["step"], ctx)
    ctx.log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt


def check_schedule(ckpt: dict, args, ctx, path):
    """A resume continues the checkpoint's schedule: the global batch, the steps, the learning rate and the
    warm-up must be its own, unless --accept-changes (then this run's schedule applies from here on)."""
    before = {**ckpt.get("train_config", {}), "global_batch": ckpt.get("global_batch")}
    now = {**vars(args), "global_batch": global_batch(args, ctx)}
    changed = [f"{key.replace('_', ' ')} {before[key]} -> {now[key]}" for key in SCHEDULE
               if before.get(key) is not None and key in now and now[key] is not None and before[key] != now[key]]
    if changed and not args.accept_changes:
        end()
        sys.exit(f"error: --resume: {path} runs another schedule ({'; '.join(changed)}): continue it with its own "
                 "flags and ranks, or pass --accept-changes to go on with this run's from its images seen")
    if changed:
        ctx.log(f"--accept-changes: continuing {path} on this run's schedule ({'; '.join(changed)})")


def same_step(step: int, ctx):
    """Every rank resumes the same step, or none trains: one error line."""
    if not ctx.enabled:
        return
    steps = [None] * ctx.world_size
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        end()
        sys.exit(f"error: --resume: the ranks hold different checkpoints (steps {steps} by rank): every rank "
                 "must resume rank 0's; is --out-dir one folder they all share?")
