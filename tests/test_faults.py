"""Faults and hostile files: no checkpoint loads code, a killed or preempted run loses nothing, a lost
rank ends the others with an error, and images that stop decoding mid-epoch are skipped, then stop the run.

Runs that get signalled or killed are subprocesses (DRIVER below injects the fault into train_vqgan.py);
they are compared with runs in this process, as in test_train_vqgan's exact-resume test.
"""
import errno
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import distributed
import weights
from data import build_dataset, train_batches
from model import ALIT
from test_train_vqgan import SMALL, run
from vqgan import VQGAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--steps", "5", "--save-every", "2"]

# python -c DRIVER <fault> <step> <marker file> <train_vqgan.py flags...>
DRIVER = """
import io, os, signal, sys, time
import torch, train_vqgan
fault, at, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lr_at, save = train_vqgan.lr_at, torch.save

def faulty_lr_at(step, *args):  # called at the start of every step
    if step == at and fault == "sigterm":  # as a cluster does: to every process, DataLoader workers too
        os.killpg(0, signal.SIGTERM)
    if step == at and fault == "sigusr1":  # Slurm's warning before the time limit (#SBATCH --signal=USR1@N)
        os.killpg(0, signal.SIGUSR1)
    if step == at and fault == "sigterm-in-save":
        os.kill(os.getpid(), signal.SIGTERM)
    if step == at and fault == "sigterm-twice":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.5)  # repeats within a second count as one request (distributed.StopSignal)
        os.kill(os.getpid(), signal.SIGTERM)
    if step == at and fault == "sigterm-rank1" and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    if step == at and fault == "rank1-exits" and os.environ["RANK"] == "1":
        os._exit(1)
    if step == at and fault == "rank1-hangs" and os.environ["RANK"] == "1":
        time.sleep(600)
    return lr_at(step, *args)

def slow_save(state, f, *args, **kwargs):  # the step-`at` checkpoint: half of it, then a stall to be killed in
    if fault == "sigterm-in-save" and isinstance(state, dict) and state.get("step") == at + 1:
        time.sleep(1.5)  # the stop's checkpoint is being written when a second SIGTERM comes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    if fault == "kill-in-save" and isinstance(state, dict) and state.get("step") == at:
        buffer = io.BytesIO()
        save(state, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        open(marker, "w").close()
        time.sleep(600)
    save(state, f, *args, **kwargs)

train_vqgan.lr_at, torch.save = faulty_lr_at, slow_save
train_vqgan.main(sys.argv[4:])
"""


def driver(fault, at, out, *flags, env=None, popen=False):
    cmd = [sys.executable, "-c", DRIVER, fault, str(at), str(out) + ".marker", *SMALL, "--disc-start", "2", *flags,
           "--out-dir", str(out)]
    # As many threads as this process's runs: CPU kernels sum in an order that depends on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    # A session of its own: the signals it sends to its process group never reach pytest.
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)


def two_ranks(fault, at, out, *flags):
    """Rank 0 and rank 1 of a gloo run, started as torchrun would (without it: nothing else reacts to
    a failed rank); returns (returncode, stdout, stderr) of each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [driver(fault, at, out, *flags, popen=True,
                    env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    results = []
    try:
        results.append(ranks[0].communicate(timeout=90))
        results.append(ranks[1].communicate(timeout=90 if fault.startswith("sigterm") else 0.1))  # or it hangs
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    return [(process.returncode, *result) for process, result in zip(ranks, results + [("", "")] * 2)]


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A run that ends in an error inside its loop leaves its SIGTERM/SIGINT handlers installed."""
    handlers = {s: signal.getsignal(s) for s in distributed.StopSignal.SIGNALS}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run: the folder of its checkpoints (ckpt.pt at step 5, ckpt.prev.pt at 4)."""
    out = tmp_path_factory.mktemp("faults")
    run(out, "whole", *STEPS)
    return out / "whole"


def assert_same_training(a_dir, b_dir):
    a, b = weights.load_checkpoint(a_dir / "ckpt.pt"), weights.load_checkpoint(b_dir / "ckpt.pt")
    assert a["step"] == b["step"]
    for part in ("model", "discriminator"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), ("optimizer", index, key)


# ----------------------------------------------------------------------------- hostile checkpoint files

class Payload:
    """Unpickling this creates `path`: what a hostile checkpoint would run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def hostile_checkpoint(kind, path, whole):
    path.parent.mkdir(parents=True, exist_ok=True)
    good = (whole / "ckpt.pt").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        state = weights.load_checkpoint(whole / "ckpt.pt")
        torch.save({**state, "model_config": Payload(path.parent / "pwned")}, path)


@pytest.mark.parametrize("kind, message", [("truncated", "truncated or corrupt"), ("empty", "empty"),
                                           ("pickle", r"refused: it holds a pickled \S*open")])
def test_hostile_checkpoints_give_one_line_errors_and_run_nothing(tmp_path, whole, kind, message):
    out = tmp_path / "run"
    hostile_checkpoint(kind, out / "ckpt.pt", whole)
    for flags in (["--eval-only"], ["--resume", "--steps", "6"]):
        with pytest.raises(SystemExit) as error:
            run(tmp_path, "run", *flags)
        text = str(error.value.code)
        assert text.startswith("error: ") and "\n" not in text and str(out / "ckpt.pt") in text, text
        assert re.search(message, text), text
    for load in (VQGAN.from_checkpoint, ALIT.from_checkpoint):
        with pytest.raises(ValueError, match=message):
            load(out / "ckpt.pt")
    assert not (out / "pwned").exists()  # nothing was executed
    if kind == "pickle":  # ... though the payload is live: plain unpickling runs it
        pickle.loads(pickle.dumps(Payload(tmp_path / "live")))
        assert (tmp_path / "live").exists()


def test_checkpoints_with_a_numpy_rng_state_still_load(tmp_path):
    """Checkpoints written before RNG states were stored as tensors hold numpy's as an array."""
    torch.save({"rng": [{"python": random.getstate(), "numpy": np.random.get_state(),
                         "torch": torch.get_rng_state()}]}, tmp_path / "old.pt")
    expected = np.random.rand(3)
    checkpoint.set_rng_state(weights.load_checkpoint(tmp_path / "old.pt")["rng"][0])
    assert np.array_equal(np.random.rand(3), expected)


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, whole, capsys):
    shutil.copytree(whole, tmp_path / "fallback")
    hostile_checkpoint("truncated", tmp_path / "fallback" / "ckpt.pt", whole)
    run(tmp_path, "fallback", *STEPS, "--resume")  # from step 4 (ckpt.prev.pt) to 5 again
    assert "resuming from the checkpoint before it" in capsys.readouterr().out
    assert_same_training(whole, tmp_path / "fallback")


# ----------------------------------------------------------------------------- saving under faults

def test_full_disk_keeps_the_last_checkpoint(tmp_path, whole, monkeypatch):
    shutil.copytree(whole, tmp_path / "full")
    before = {name: (tmp_path / "full" / name).read_bytes() for name in ("ckpt.pt", "ckpt.prev.pt")}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as error:
        run(tmp_path, "full", "--steps", "6", "--save-every", "2", "--resume", "--accept-changes")  # step 6: no room
    text = str(error.value.code)
    assert text.startswith("error: ") and "\n" not in text and "the disk is full" in text, text
    assert str(tmp_path / "full" / "ckpt.pt") in text
    assert {name: (tmp_path / "full" / name).read_bytes() for name in before} == before
    assert not list((tmp_path / "full").glob("ckpt.pt.*.tmp"))


def test_kill_9_while_writing_a_checkpoint_loses_nothing(tmp_path, whole):
    out = tmp_path / "killed"
    process = driver("kill-in-save", 4, out, *STEPS, popen=True)  # the step-4 checkpoint stalls half-written
    deadline = time.monotonic() + 120
    while not os.path.exists(str(out) + ".marker") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.kill()
    _, stderr = process.communicate(timeout=30)
    assert os.path.exists(str(out) + ".marker"), stderr[-2000:]
    (half_written,) = out.glob("ckpt.pt.*.tmp")  # named by its process: ranks on other nodes never share one
    assert half_written.stat().st_size > 0
    assert weights.load_checkpoint(out / "ckpt.pt")["step"] == 2
    run(tmp_path, "killed", *STEPS, "--resume")
    assert_same_training(whole, out)


# ----------------------------------------------------------------------------- signals

def test_sigterm_stops_after_the_step_and_resumes_bit_exactly(tmp_path, whole):
    at = random.randrange(4)  # the signal arrives during step at + 1
    out = tmp_path / "stopped"
    result = driver("sigterm", at, out, *STEPS, "--num-workers", "1")
    assert result.returncode == 0, (at, result.stderr[-2000:])
    assert f"stopped by SIGTERM after step {at + 1}: continue with the same command and --resume" in result.stdout
    assert weights.load_checkpoint(out / "ckpt.pt")["step"] == at + 1, at
    run(tmp_path, "stopped", *STEPS, "--resume")
    assert_same_training(whole, out)


def test_sigusr1_stops_with_the_checkpoint_of_that_step_and_nothing_else(tmp_path, whole):
    out = tmp_path / "usr1"
    result = driver("sigusr1", 2, out, *STEPS, "--num-workers", "1")  # during step 3
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped by SIGUSR1 after step 3" in result.stdout
    assert weights.load_checkpoint(out / "ckpt.pt")["step"] == 3
    assert not list(out.glob("recon_*.png"))  # no image grid on the way out: the checkpoint only
    run(tmp_path, "usr1", *STEPS, "--resume")
    assert_same_training(whole, out)


def test_a_second_sigterm_while_the_stop_checkpoint_is_written_leaves_it_whole(tmp_path, whole):
    out = tmp_path / "saving"
    result = driver("sigterm-in-save", 2, out, *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert weights.load_checkpoint(out / "ckpt.pt")["step"] == 3 and not list(out.glob("*.tmp"))
    run(tmp_path, "saving", *STEPS, "--resume")
    assert_same_training(whole, out)


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    out = tmp_path / "twice"
    result = driver("sigterm-twice", 2, out, *STEPS)  # both during step 3
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert weights.load_checkpoint(out / "ckpt.pt")["step"] == 2  # step 3 was never finished


def test_ddp_ranks_stop_after_the_same_step_and_rank_0_writes(tmp_path):
    (code0, out0, err0), (code1, _, err1) = two_ranks("sigterm-rank1", 2, tmp_path / "ddp", "--steps", "5")
    assert code0 == code1 == 0, (err0[-2000:], err1[-2000:])
    assert "stopped by a signal to another rank after step 3" in out0
    ckpt = weights.load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert ckpt["step"] == 3 and len(ckpt["ranks"]) == 2


# ----------------------------------------------------------------------------- a lost rank

@pytest.mark.parametrize("fault", ["rank1-exits", "rank1-hangs"])
def test_a_lost_rank_ends_the_others_with_an_error(tmp_path, fault):
    start = time.monotonic()
    (code, _, stderr), _ = two_ranks(fault, 2, tmp_path / "ddp", "--steps", "5", "--dist-timeout", "3")
    assert code not in (0, None), stderr[-2000:]  # without the timeout, gloo would wait 30 minutes
    expected = "Timed out waiting 3000ms" if fault == "rank1-hangs" else "Connection"
    assert expected in stderr, stderr[-2000:]
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- images that stop decoding

def test_images_that_stop_decoding_mid_epoch_are_skipped_then_stop_the_run(tmp_path):
    for i in range(8):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    dataset = build_dataset("folder", "train", 32, data_dir=str(tmp_path / "images"))

    def truncate(i):
        path = tmp_path / "images" / f"{i}.png"
        path.write_bytes(path.read_bytes()[:100])
        return str(path)

    bad = truncate(5)  # after the listing
    batches = train_batches(dataset, 4, 0, 1, seed=0, max_bad_images=0.25)
    with pytest.warns(UserWarning, match=f"skipping unreadable image {bad}"):
        epoch = [next(batches) for _ in range(2)]
    assert all(images.shape == (4, 3, 32, 32) for _, (images, _) in epoch)  # the next image stood in
    assert dataset.skipped == [bad]

    truncate(1), truncate(2)  # 3 of 8: one batch of 4 has at least 2 (> 0.25 x 4)
    for workers in (0, 1):
        batches = train_batches(dataset, 4, 0, 1, seed=0, num_workers=workers, max_bad_images=0.25)
        with warnings.catch_warnings(), pytest.raises(SystemExit) as error:
            warnings.simplefilter("ignore")
            for _ in range(2):
                next(batches)
        text = str(error.value.code)
        assert text.startswith("error: ") and "\n" not in text and "--max-bad-images 0.25" in text, text
