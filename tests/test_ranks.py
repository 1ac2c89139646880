"""What only several processes show, on 2 gloo ranks: evaluation sharded over ranks gives one process's
numbers; the discriminator, trained outside DDP, stays the same on every rank; --loss-iters draws alike on
every rank; two "nodes" without a shared filesystem end at once with one error line, never hang.

Each run is a driver script under torchrun that records what each rank did (files named by RANK).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import weights
from conftest import SMALL_ALIT, SMALL_VQGAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def run(tmp_path, driver: str, args, ranks: int | None):
    """`driver` (Python, sees RECORDS: a folder, and ARGS: the script's flags) on `ranks` torchrun
    processes, or in one plain process when ranks is None; one thread a process."""
    path = tmp_path / "driver.py"
    path.write_text(f"import os, sys\nsys.path[:0] = [{ROOT!r}, {TESTS!r}]\nRECORDS, ARGS = sys.argv[1], sys.argv[2:]\n"
                    + textwrap.dedent(driver))
    launcher = [sys.executable] if ranks is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={ranks}"]
    records = tmp_path / f"records{ranks}"
    records.mkdir(exist_ok=True)
    result = subprocess.run([*launcher, str(path), str(records), *map(str, args)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return records, result


EVALUATE = """
import evaluate
from conftest import TinyFeatures
evaluate.InceptionV3.from_pytorch_fid = lambda path: TinyFeatures()  # FID features: a stand-in network
evaluate.main(ARGS)
"""


# Over a VQGAN, and (fewer images, no second checkpoint: the same code paths) over a VAE.
@pytest.mark.parametrize("checkpoint, images", [("stage1_ckpt", 44), ("vae_stage1_ckpt", 20)])
def test_evaluate_on_two_ranks_equals_one_process(tmp_path, checkpoint, images, request):
    stage1_ckpt = request.getfixturevalue(checkpoint)
    fake_weights = tmp_path / "inception.pth"
    fake_weights.write_bytes(b"stand-in")
    common = ["--ckpt", stage1_ckpt, "--compare", stage1_ckpt if images == 44 else tmp_path / "none",
              "--num-images", images, "--batch-size", 8, "--speed-images", 8, "--halting",
              "--inception-weights", fake_weights]
    run(tmp_path, EVALUATE, common + ["--out-dir", tmp_path / "one"], ranks=None)
    _, result = run(tmp_path, EVALUATE, common + ["--out-dir", tmp_path / "two"], ranks=2)
    assert result.stdout.count("| tokens | L1 |") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    seconds = ("seconds", "speedup_pixel", "speedup_token")
    for key in one:
        if key == "early_exit":
            one[key], two[key] = ({k: v for k, v in r[key].items() if k not in seconds} for r in (one, two))
        if key != "checkpoint":
            assert json.dumps(two[key]) == json.dumps(one[key]) or close(two[key], one[key]), key
    assert one["per_token_count"][0]["rfid"] is not None and one["images"] == images
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def close(a, b, rel=1e-5):
    """Equal structures whose numbers agree to `rel` (sums over ranks add in another order)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= rel * max(1.0, abs(a), abs(b))
    return a == b


DISCRIMINATORS = """
import torch, train_vqgan
made = []
class Recorded(train_vqgan.PatchDiscriminator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append((self, {name: p.detach().clone() for name, p in self.named_parameters()}))
train_vqgan.PatchDiscriminator = Recorded
train_vqgan.main(ARGS)
(discriminator, start), = made
torch.save({"start": start, "end": dict(discriminator.named_parameters())}, f"{RECORDS}/{os.environ['RANK']}.pt")
"""


def test_the_discriminator_stays_the_same_on_every_rank(tmp_path):
    records, _ = run(tmp_path, DISCRIMINATORS, SMALL_VQGAN + ["--batch-size", 2, "--steps", 3, "--disc-start", 0,
                                                              "--out-dir", tmp_path / "vq"], ranks=2)
    zero, one = (torch.load(records / f"{rank}.pt") for rank in (0, 1))
    for name, value in zero["end"].items():
        assert torch.equal(one["end"][name], value), name
        assert not torch.equal(value, zero["start"][name]), name  # it trained


STAGE1 = """
import json, torch, model, train_stage1
forward, iterations = model.ALIT.forward, []
def recorded(self, *args, iters=None, **kwargs):
    if torch.is_grad_enabled():
        iterations.append(list(iters))
    return forward(self, *args, iters=iters, **kwargs)
model.ALIT.forward = recorded
train_stage1.main(ARGS)
open(f"{RECORDS}/{os.environ['RANK']}.json", "w").write(json.dumps(iterations))
"""


def test_the_same_loss_iterations_on_every_rank(tmp_path, vqgan_ckpt):
    records, result = run(tmp_path, STAGE1, SMALL_ALIT + [
        "--vqgan-ckpt", vqgan_ckpt, "--loss-iters", 3, "--steps", 4, "--batch-size", 2, "--out-dir", tmp_path / "s1"],
        ranks=2)
    zero, one = (json.loads((records / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero == one and len(zero) == 4 and any(step != zero[0] for step in zero), zero


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("second_node_holds", ["nothing", "another run"])
def test_two_nodes_without_a_shared_filesystem_end_at_once_with_one_error(tmp_path, second_node_holds):
    """Rank 0 and rank 1 as two machines (one rank each) whose --out-dir is a folder of their own: the
    first holds a checkpoint to resume, the second none or a stale one of another run. Both end within
    --dist-timeout + 30 s, each with one error line naming the shared filesystem."""
    flags = SMALL_VQGAN + ["--batch-size", "2", "--steps", "2", "--val-images", "4"]
    first = run_vqgan(tmp_path, flags + ["--out-dir", tmp_path / "node0"])
    assert first.returncode == 0, first.stderr[-2000:]
    if second_node_holds == "another run":
        run_vqgan(tmp_path, flags + ["--steps", "1", "--out-dir", tmp_path / "node1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    timeout = 10
    ranks = [subprocess.Popen([sys.executable, "train_vqgan.py", *map(str, flags), "--steps", "4", "--resume", "auto",
                               "--dist-timeout", str(timeout), "--out-dir", tmp_path / f"node{rank}"], cwd=ROOT,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    start = time.monotonic()
    ended = [rank.communicate(timeout=timeout + 30 + 60) for rank in ranks]  # + 60: starting python and torch
    assert time.monotonic() - start < timeout + 30 + 60
    for process, (_, stderr) in zip(ranks, ended):
        assert process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("error: --out-dir") and "rank 1 on" in line, line
        assert "a filesystem they all share" in line, line
    assert weights.load_checkpoint(tmp_path / "node0" / "ckpt.pt")["step"] == 2  # nothing written


def run_vqgan(tmp_path, flags):
    return subprocess.run([sys.executable, "train_vqgan.py", *map(str, flags)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


BF16_GRADIENTS = """
import torch, distributed
ctx = distributed.setup_ranks("cpu")
def gradients(bf16):
    torch.manual_seed(ctx.rank)
    model = torch.nn.Linear(64, 8)
    ddp = distributed.wrap_ddp(model, ctx, bf16_gradients=bf16)
    ddp(torch.randn(4, 64) * (ctx.rank + 1) / 3).square().sum().backward()
    return model.weight.grad
torch.save({bf16: gradients(bf16) for bf16 in (False, True)}, f"{RECORDS}/{ctx.rank}.pt")
distributed.end()  # as the scripts end: an exit right after the last all-reduce could abort
"""


def test_bf16_gradients_are_the_mean_over_ranks_to_bf16_rounding(tmp_path):
    records, _ = run(tmp_path, BF16_GRADIENTS, [], ranks=2)
    zero, one = (torch.load(records / f"{rank}.pt") for rank in (0, 1))
    assert torch.equal(zero[True], one[True]) and torch.equal(zero[False], one[False])
    assert not torch.equal(zero[True], zero[False])  # sent as bf16 ...
    # ... so within its rounding: each rank's half and their sum rounded to 8 bits of mantissa
    assert (zero[True] - zero[False]).abs().max() <= 2 ** -7 * zero[False].abs().max()
