"""Chaos: each training script with its recipe, interrupted again and again and launched again with the
same command (--resume auto, as a requeued job), ends bit-identical to the run that was never
interrupted, on 2 gloo ranks; so does a run whose worker torchrun restarts.

The faults come at moments drawn from a seeded generator (so a failure repeats): SIGKILL to one rank
at the start of a step (torchrun then stops the other), SIGTERM to the launcher and its workers (as a
preempting cluster sends; they stop after the step with a checkpoint), and SIGKILL while rank 0 writes
a checkpoint (half of it on disk). Between launches nothing but the output folder survives.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

import weights
from conftest import SMALL_ALIT, SMALL_VQGAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY, FAULTS = 12, 2, 3

# python DRIVER <script> <fault> <step> <rank to hit> <the script's flags...>
DRIVER = """
import io, os, signal, sys
sys.path.insert(0, {root!r})
import torch
script, fault, at, victim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
module = __import__(script)
rank = int(os.environ.get("RANK", 0))
lr_at, save, fired = module.lr_at, torch.save, []

def faulty_lr_at(step, *args):  # every step's first call; a worker torchrun restarted is spared
    if step == at and not fired and rank == victim and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        fired.append(step)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "term":  # the launcher and every worker, as a cluster preempting the job does
            os.killpg(0, signal.SIGTERM)
    return lr_at(step, *args)

def faulty_save(state, f, *args, **kwargs):
    if fault == "kill-in-save" and isinstance(state, dict) and state.get("step") == at:
        buffer = io.BytesIO()
        save(state, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(state, f, *args, **kwargs)

module.lr_at, torch.save = faulty_lr_at, faulty_save
module.main(sys.argv[5:])
"""


def launch(tmp_path, script, flags, ranks, fault="none", at=-1, victim=0, restarts=0):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    launcher = [sys.executable] if ranks == 1 and not restarts else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
         f"--max-restarts={restarts}"]
    # A session of its own: the signals sent to its process group never reach pytest.
    return subprocess.run([*launcher, str(driver), script, fault, str(at), str(victim), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, start_new_session=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """uninterrupted(script, flags): the out-dir of the run of `flags` on 2 ranks never interrupted, run
    once for the tests of this module (the recipe's flags are the same for each)."""
    done = {}

    def run(script, flags):
        if script not in done:
            folder = tmp_path_factory.mktemp(f"{script}_whole")
            result = launch(folder, script, flags + ["--out-dir", str(folder / "whole")], 2)
            assert result.returncode == 0, result.stderr[-3000:]
            done[script] = folder / "whole"
        return done[script]
    return run


def saved_step(out):
    path = out / "ckpt.pt"
    return weights.load_checkpoint(path)["step"] if path.is_file() else 0


def assert_bit_identical(a_dir, b_dir):
    a, b = weights.load_checkpoint(a_dir / "ckpt.pt"), weights.load_checkpoint(b_dir / "ckpt.pt")
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema", "discriminator", "discriminators"):
        for key, value in a.get(part, {}).items():
            assert torch.equal(value, b[part][key]), (part, key, (value.float() - b[part][key].float()).abs().max())
    for part in ("optimizer", "disc_optimizer"):
        for index, state in a.get(part, {"state": {}})["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b[part]["state"][index][key]), (part, index, key)
    assert len(a["ranks"]) == len(b["ranks"])


def recipe(name, tmp_path, vqgan_ckpt, stage1_ckpt):
    """Each script's recipe, short: the VQGAN with dead-code restarts and the GAN from step 6; stage 1
    with the CPU recipe (rollout warm-up, continuous then blended codes, latent restarts); stage 2 with
    its GAN schedule (on from half the steps)."""
    common = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "2"]
    return {"train_vqgan": SMALL_VQGAN + common + ["--restart-every", "3", "--disc-start", "6", "--val-images", "8"],
            "train_stage1": SMALL_ALIT + common + ["--vqgan-ckpt", str(vqgan_ckpt), "--latent-restart-every", "3"],
            "train_stage2": common + ["--stage1-ckpt", str(stage1_ckpt), "--disc-channels", "16", "--no-bf16",
                                      "--log-every", "2", "--warmup-steps", "2"]}[name]


# On 2 ranks, where a fault can hit either; one process meets each fault in tests/test_faults.py and
# resumes bit-exactly in each script's own test.
@pytest.mark.parametrize("script", ["train_vqgan", "train_stage1", "train_stage2"])
def test_interrupted_again_and_again_ends_bit_identical(tmp_path, vqgan_ckpt, stage1_ckpt, uninterrupted, script,
                                                       ranks=2):
    flags = recipe(script, tmp_path, vqgan_ckpt, stage1_ckpt)
    whole = uninterrupted(script, flags)

    out = tmp_path / "chaos"
    draw = random.Random(f"{script}-{ranks}")  # the moments and kinds of faults, repeatable
    history = []
    while len(history) < FAULTS and saved_step(out) < STEPS - SAVE_EVERY:
        done = saved_step(out)
        fault = draw.choice(["kill", "term", "kill-in-save"])
        # a step after the last checkpoint; a checkpoint's own step to be killed while writing it
        reach = done + max(SAVE_EVERY, (STEPS - done) // (FAULTS - len(history)))  # room for the faults to come
        first_save = (done // SAVE_EVERY + 1) * SAVE_EVERY
        at = draw.randrange(first_save, max(reach, first_save) + 1, SAVE_EVERY) if fault == "kill-in-save" else \
            draw.randrange(done + 1, min(reach, STEPS - 2) + 1)
        victim = draw.randrange(ranks) if fault == "kill" else 0
        result = launch(tmp_path, script, flags + ["--out-dir", str(out), "--resume", "auto"], ranks, fault, at, victim)
        history.append((fault, at, victim, result.returncode, saved_step(out)))
        # a SIGKILL at step `at` loses it, a SIGTERM finishes it and saves, one while saving loses that checkpoint
        saved = saved_step(out)
        expected = {"kill": saved <= at, "term": saved == at + 1, "kill-in-save": saved < at}
        assert expected[fault], (history, result.stderr[-3000:])
    assert len(history) >= 2, history
    final = launch(tmp_path, script, flags + ["--out-dir", str(out), "--resume", "auto"], ranks)
    assert final.returncode == 0, (history, final.stderr[-3000:])
    assert_bit_identical(whole, out)


def test_a_worker_torchrun_restarts_resumes_whatever_its_flags(tmp_path, uninterrupted):
    """torchrun --max-restarts 1 runs the same command again after a worker dies: with --overwrite it
    still continues from the last checkpoint (a restart never deletes one), bit-identical in the end."""
    flags = recipe("train_vqgan", tmp_path, None, None)
    whole = uninterrupted("train_vqgan", flags)
    out = tmp_path / "restarted"
    result = launch(tmp_path, "train_vqgan", flags + ["--out-dir", str(out), "--overwrite"], 2, "kill", 7, 1,
                    restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'ckpt.pt'} at step 6" in result.stdout + result.stderr
    assert_bit_identical(whole, out)
