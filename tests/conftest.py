import contextlib
import os
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
SMALL_VAE = ["--base", "vae"] + SMALL_VQGAN  # train_vqgan.py's tiny VAE at the same width
SMALL_ALIT = ["--encoder-width", "64", "--encoder-layers", "1", "--encoder-heads", "2", "--decoder-width", "64",
              "--decoder-layers", "1", "--decoder-heads", "2", "--log-every", "2", "--sample-every", "100",
              "--warmup-steps", "2", "--no-bf16"]


# ----------------------------------------------------------------------------- process-wide state
# Torch's backend flags live in C behind module proxies: `monkeypatch.setattr` cannot put them back
# (from pytest 9.2 its undo deletes an attribute the proxy's __dict__ never held, raises, and stops
# undoing the test's other patches). They are saved and restored by value instead.

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCH_FLAGS = {
    "torch.backends.cuda.matmul.allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32,
                                              lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    "torch.backends.cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32,
                                        lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "torch.backends.cudnn.benchmark": (lambda: torch.backends.cudnn.benchmark,
                                       lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
}
REAL_CUDA_IS_AVAILABLE = torch.cuda.is_available


@contextlib.contextmanager
def saved_torch_flags():
    """Whatever the block sets of TORCH_FLAGS is put back, by value, when it ends."""
    saved = {name: get() for name, (get, _) in TORCH_FLAGS.items()}
    try:
        yield
    finally:
        for name, (_, put) in TORCH_FLAGS.items():
            put(saved[name])


@pytest.fixture
def torch_flags():
    """For a test that sets torch's backend flags (or calls code that does): restored after it."""
    with saved_torch_flags():
        yield


def process_state() -> dict:
    return {"torch.cuda.is_available": torch.cuda.is_available,
            **{f"${name}": os.environ.get(name) for name in DISTRIBUTED_ENV},
            **{name: get() for name, (get, _) in TORCH_FLAGS.items()}}


@pytest.fixture(autouse=True)
def leaves_no_state_behind(request):
    """A test that leaves the device, the ranks or torch's flags changed would change every later
    test: it fails by name (at its teardown), and the state is put back for the tests after it."""
    before = process_state()
    yield  # autouse, so set up before and torn down after the test's own monkeypatch
    changed = {name: value for name, value in process_state().items() if value != before[name]}
    if not changed:
        return
    torch.cuda.is_available = REAL_CUDA_IS_AVAILABLE
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
        if before[f"${name}"] is not None:
            os.environ[name] = before[f"${name}"]
    for name, (_, put) in TORCH_FLAGS.items():
        put(before[name])
    pytest.fail(f"{request.node.nodeid} left process-wide state changed: "
                + ", ".join(f"{name} {before[name]!r} -> {value!r}" for name, value in changed.items()), pytrace=False)


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


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory):
    import train_vqgan
    out = tmp_path_factory.mktemp("vae")
    train_vqgan.main(SMALL_VAE + ["--steps", "2", "--out-dir", str(out), "--val-images", "8"])
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def vae_stage1_ckpt(tmp_path_factory, vae_ckpt):
    import train_stage1
    out = tmp_path_factory.mktemp("vae_stage1")
    train_stage1.main(SMALL_ALIT + ["--base", "vae", "--vqgan-ckpt", str(vae_ckpt), "--steps", "2", "--batch-size", "2",
                                    "--out-dir", str(out)])
    return out / "ckpt.pt"
