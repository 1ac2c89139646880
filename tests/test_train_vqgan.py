"""train_vqgan.py: overfitting, exact resume, flag errors (on 2 ranks: tests/test_chaos.py)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import optim
import train_vqgan
import weights
from data import build_dataset
from vqgan import PRESETS, VQGAN, VQGANConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import SMALL_VQGAN

SMALL = SMALL_VQGAN + ["--disc-channels", "8", "--log-every", "2", "--sample-every", "100", "--warmup-steps", "2",
                       "--val-images", "8"]


def test_vqgan_overfits_one_batch():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**{**PRESETS["tiny"], "channels": 16, "norm_groups": 8}))
    images = torch.stack([build_dataset("shapes", "train", 32)[i][0] for i in range(4)])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        recon, q = model(images)
        loss = (recon - images).abs().mean() + q.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((recon - images).abs().mean().item())
    assert losses[-1] < 0.4 * losses[0], losses[::20]
    # images come out in the [0, 1] range they went in (up to the fit's error)
    inside = ((recon > -0.05) & (recon < 1.05)).float().mean()
    assert inside > 0.99, inside


def run(tmp_path, name, *extra):
    return train_vqgan.main(SMALL + ["--out-dir", str(tmp_path / name), "--disc-start", "2", *extra])


def test_resume_continues_bit_exactly(tmp_path):
    whole = run(tmp_path, "whole", "--steps", "6", "--save-every", "3")
    run(tmp_path, "parts", "--steps", "6", "--save-every", "3", "--stop-after", "3")
    resumed = run(tmp_path, "parts", "--steps", "6", "--save-every", "3", "--resume")
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    a = weights.load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    b = weights.load_checkpoint(tmp_path / "parts" / "ckpt.pt")
    for (key, x), y in zip(a["discriminator"].items(), b["discriminator"].values()):
        assert torch.equal(x, y), key
    assert (tmp_path / "whole" / "recon_000006.png").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cifar"], "--dataset"),
    (["--steps", "0"], "--steps"),
    (["--lpips-weights", "x.pth"], "--vgg16-weights"),
    (["--channels", "12"], "--norm-groups"),
])
def test_bad_flags_are_named(flags, message, capsys):
    with pytest.raises((SystemExit, ValueError), match=message):
        train_vqgan.parse_args(flags)


def test_resume_without_checkpoint_names_it(tmp_path):
    with pytest.raises(SystemExit, match="ckpt.pt"):
        run(tmp_path, "none", "--steps", "2", "--resume")


def test_ema_warms_up_then_uses_its_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = optim.EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # decay (1 + 0) / (10 + 0) = 0.1: the average moves 90% of the way at once
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    assert ema.decay_at(10_000) == 0.999



# A fresh process each: keep_freed_memory() changes the allocator for the rest of its process.
TOY_STEPS = """
import resource, sys, torch, distributed
kept = distributed.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for step in range(12):  # a toy training step: activations of a few sizes, all freed at its end
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2 ** 24)  # 64 MB: above the largest block glibc serves from its heap by default
    y = torch.cat([x * i for i in range(1, 4)])
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(kept, sum(faults[-6:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory() tunes glibc's malloc")
def test_keep_freed_memory_stops_faulting_in_the_same_memory_every_step():
    def run_steps(mode):
        kept, faults = subprocess.run([sys.executable, "-c", TOY_STEPS, mode], cwd=ROOT, capture_output=True,
                                      text=True, check=True).stdout.split()
        return kept, int(faults)

    _, default_faults = run_steps("default")
    kept, faults = run_steps("keep")
    assert kept == "True"
    assert default_faults > 6 * 100_000, default_faults  # ~450 MB a step, faulted in again, 4 KB at a time
    assert faults < default_faults / 10, (faults, default_faults)  # the heap has settled
