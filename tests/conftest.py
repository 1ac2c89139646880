import sys
from pathlib import Path

# Tests import the project's flat modules (model.py, vqgan.py, ...) and tests/seeded.py.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import pytest
import torch

# Smallest settings the training scripts accept: every loop runs in seconds on 2 CPU cores.
# float32 everywhere: exact comparisons (resume, 1 vs 2 processes) need it, whatever the CPU.
SMALL_VQGAN = ["--channels", "16", "--norm-groups", "8", "--batch-size", "4", "--no-bf16"]
SMALL_ALIT = ["--encoder-width", "64", "--encoder-layers", "1", "--encoder-heads", "2", "--decoder-width", "64",
              "--decoder-layers", "1", "--decoder-heads", "2", "--log-every", "2", "--sample-every", "100",
              "--warmup-steps", "2", "--no-bf16"]



class TinyFeatures(torch.nn.Module):
    """Stands in for the FID Inception (whose weights cannot be downloaded here)."""

    def __init__(self, features: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, features, 4, stride=4)

    def forward(self, images):
        return self.conv(images).mean(dim=(2, 3))


@pytest.fixture(scope="session", autouse=True)
def empty_weight_folders(tmp_path_factory):
    """Pretrained files are looked up by name in $ALIT_WEIGHTS and the torch hub cache
    (weights.find_weights): the tests see empty ones, whatever this machine holds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        patch.delenv("ALIT_WEIGHTS", raising=False)
        yield


@pytest.fixture(scope="session")
def vqgan_ckpt(tmp_path_factory):
    import train_vqgan
    out = tmp_path_factory.mktemp("vqgan")
    train_vqgan.main(SMALL_VQGAN + ["--steps", "2", "--out-dir", str(out), "--val-images", "8"])
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory, vqgan_ckpt):
    import train_stage1
    out = tmp_path_factory.mktemp("stage1")
    train_stage1.main(SMALL_ALIT + ["--vqgan-ckpt", str(vqgan_ckpt), "--steps", "2", "--batch-size", "2",
                                    "--out-dir", str(out)])
    return out / "ckpt.pt"
