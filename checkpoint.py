"""Checkpoints that resume exactly: what a training run saves, where, and how it goes on.

Paper: ALIT, arXiv:2411.02393, §A.5 trains each stage for 200 epochs on 8 GPUs: days, in a cluster's
preemptible jobs. A checkpoint holds everything the next step depends on: the weights, their EMA,
the optimizers' moments, the step, both configs, and each rank's RNG states and its own training state
(dead-code counts), so that a resumed run ends bit-identical to an uninterrupted one (tests/test_chaos.py).
It is written atomically, the previous one kept (`save_checkpoint`); a run never replaces another's
unasked (`check_out_dir`).
"""
import errno
import os
import random
import sys
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distributed import Distributed, restarted_worker
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


def checkpoint_state(stateful: dict, step: int, model_config: dict, train_config: dict, ctx, per_rank=None) -> dict:
    """What a checkpoint holds: the state dict of every object in `stateful` (checkpoint key ->
    object, the same on every rank), the step, both configs, and under "ranks" every rank's RNG
    state and the state of every object in `per_rank` (gather_per_rank). Collective under DDP, so
    every rank calls it."""
    return {**{key: obj.state_dict() for key, obj in stateful.items()}, "step": step,
            "model_config": model_config, "train_config": train_config,
            "ranks": gather_per_rank(ctx, per_rank or {})}


def save(args, step: int, stateful: dict, model_config: dict, ctx, per_rank=None):
    """<--out-dir>/ckpt.pt, written by rank 0 (collective: every rank calls it). A failed write, a full
    disk above all, ends the run with the last checkpoint untouched."""
    state = checkpoint_state(stateful, step, model_config, vars(args), ctx, per_rank)
    path = Path(args.out_dir) / "ckpt.pt"
    if ctx.is_main:
        try:
            save_checkpoint(path, state)
        except OSError as error:
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror or error
            sys.exit(f"error: cannot write the step-{step} checkpoint to {path}: {reason}; the last checkpoint "
                     "there is untouched: make room, then continue with --resume")


OPTIMIZER_KERNEL_OPTIONS = ("fused", "foreach", "capturable")


def check_out_dir(args, images: str):
    """A run never replaces another's checkpoint unasked: in an --out-dir that holds one, --resume
    continues it and --overwrite starts over (clear_out_dir); without either the script stops here.
    --resume auto continues where there is a checkpoint and starts afresh where there is none, and so
    does a worker torchrun restarted, whatever its flags: a restart never deletes a checkpoint.
    Decides args.resume (True or False)."""
    ckpt = Path(args.out_dir) / "ckpt.pt"
    if args.resume and args.overwrite:
        sys.exit("error: --resume continues a run, --overwrite starts over: pass one of them")
    has_run = ckpt.exists() or previous_checkpoint(ckpt).exists()
    if args.resume == "auto" or restarted_worker():
        args.resume, args.overwrite = has_run, False
    elif not args.resume and not args.overwrite and has_run:
        sys.exit(f"error: --out-dir {args.out_dir} already holds a run ({ckpt.name}): pass --resume to continue "
                 f"it, --overwrite to start over (deleting its checkpoints and {images}), or another --out-dir")
    args.resume = bool(args.resume)


def clear_out_dir(args, images: str, ctx: Distributed):
    """--overwrite: the old run's checkpoints and images go before the new run writes its own (rank 0)."""
    out = Path(args.out_dir)
    if args.overwrite and ctx.is_main and out.is_dir():
        old = [*out.glob("ckpt*.pt*"), *out.glob(images)]
        for path in old:
            path.unlink()
        if old:
            ctx.log(f"--overwrite: deleted {len(old)} file(s) of the previous run in {out}")


def start_or_resume(args, model_config: dict, stateful: dict, ctx, images: str, per_rank=None) -> int:
    """The step a run starts at: with --resume the checkpoint's, with everything in `stateful` and
    `per_rank` restored (resume); else 0, --out-dir cleared of an old run (--overwrite: its checkpoints
    and its `images`) and each rank seeded apart, so that its random draws (halting, restarts) differ."""
    if args.resume:
        return resume(Path(args.out_dir) / "ckpt.pt", model_config, stateful, ctx, per_rank)["step"]
    clear_out_dir(args, images, ctx)
    torch.manual_seed(args.seed + ctx.rank)
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
            kernel = [{k: group[k] for k in OPTIMIZER_KERNEL_OPTIONS if k in group} for group in obj.param_groups]
            state = {**state, "param_groups": [{**saved, **options}
                                               for saved, options in zip(state["param_groups"], kernel)]}
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
