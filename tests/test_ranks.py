"""What only several processes show, on 2 gloo ranks: evaluation sharded over ranks gives one process's
numbers; the discriminator, trained outside DDP, stays the same on every rank; a token cache that takes
longer to build than --dist-timeout is built by both ranks and trains; --loss-iters draws alike on every rank.

Each run is a driver script under torchrun that records what each rank did (files named by RANK).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import SMALL_ALIT, SMALL_VQGAN
from data import TokenCache, build_dataset, build_token_cache

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


def test_a_token_cache_slower_than_the_timeout_and_the_same_loss_iterations_on_every_rank(tmp_path, vqgan_ckpt):
    images, cache = 6000, tmp_path / "cache"  # about 5-12 s to build on 2 cores: well over the 2 s timeout
    records, result = run(tmp_path, STAGE1, SMALL_ALIT + [
        "--vqgan-ckpt", vqgan_ckpt, "--token-cache", cache, "--train-images", images, "--dist-timeout", 2,
        "--loss-iters", 3, "--steps", 4, "--batch-size", 2, "--out-dir", tmp_path / "s1"], ranks=2)
    built = float(result.stdout.split("built the token cache in ")[1].split(" s")[0])
    assert built > 2, result.stdout  # longer than any collective may wait
    zero, one = (json.loads((records / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero == one and len(zero) == 4 and any(step != zero[0] for step in zero), zero

    # the same cache as one process builds
    import train_stage1
    from vqgan import VQGAN
    vqgan = VQGAN.from_checkpoint(vqgan_ckpt)
    views = build_dataset("shapes", "train", 32, train=False, num_images=images)
    description = json.loads((cache / "meta.json").read_text())["description"]
    build_token_cache(views, lambda x: train_stage1.vqgan_targets(vqgan, x), tmp_path / "one", description)
    two_ranks, one_process = TokenCache(views, cache), TokenCache(views, tmp_path / "one")
    assert len(two_ranks.latents) == 2 and len(one_process.latents) == 1
    for name in ("latents", "indices"):
        a, b = (torch.cat([torch.from_numpy(shard[:].copy()) for shard in getattr(c, name)]) for c in (two_ranks, one_process))
        assert torch.equal(a, b), name
