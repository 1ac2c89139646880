"""The first command on a GPU: every script for a few steps at the paper's `small` preset, 256x256.

    python -m pytest -q -s tests/test_cuda.py     # skipped without CUDA; a few minutes on one GPU

On a generated ImageNet-100-like folder (bench.write_photo_folder: 100 class folders of ImageNet-sized
JPEGs) with seeded stand-in weights for LPIPS and the FID Inception (the real ones cannot ship with the
tests), it trains the VQGAN, stage 1 and stage 2 for a few steps each and evaluates, checks that each
loss falls, and prints per script: the step time, the fraction of the GPU's bf16 matmul peak the step
reaches (FLOPs counted by bench.py), the peak memory and, for the stages, plan.step_memory's
estimate of it. It also measures what only a GPU can: gradient checkpointing's memory and time, the
VQGAN's layout (distributed.conv_memory_format) against the other one, how many target tokens TF32
convolutions change, and, with two GPUs, the same scripts under torchrun.

ALIT_TEST_CUDA=cpu runs the same path on the CPU at the tiny preset (nothing it prints means anything
there: it checks that this file works).
"""
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import bench
import cost
import evaluate
import losses
import plan
import train_stage1
import train_stage2
import train_vqgan
from bench import write_photo_folder
from conftest import saved_torch_flags
from data import IMAGENET100_CLASSES
from distributed import autocast, conv_memory_format
from losses import LPIPS, PatchDiscriminator
from seeded import load_vectors, seeded_state_dict
from test_losses import HEAD_ROWS, VGG16_ROWS
from vqgan import VQGAN

DRY_RUN = os.environ.get("ALIT_TEST_CUDA") == "cpu"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN), reason="needs a CUDA GPU")
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")
PRESET = ["--preset", "tiny"] if DRY_RUN else []  # else --dataset imagenet100's: small, 256x256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = {}  # what each test measured, for the ones after it


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_reset():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> float:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else float("nan")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_photo_folder(root / "train", IMAGENET100_CLASSES, 4)
    write_photo_folder(root / "val", IMAGENET100_CLASSES, 1, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Seeded stand-ins at the real key layouts: LPIPS's VGG16 and head, pytorch-fid's Inception."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {"vgg16": folder / "vgg16-397923af.pth", "lpips": folder / "vgg.pth",
             "inception": folder / "pt_inception-2015-12-05-6726825d.pth"}
    torch.save(seeded_state_dict(VGG16_ROWS, seed=7), paths["vgg16"])
    torch.save({k: v.abs() for k, v in seeded_state_dict(HEAD_ROWS, seed=8).items()}, paths["lpips"])
    inception = load_vectors("fid_inception", "tiny")
    torch.save(seeded_state_dict(inception["weight_specs"], inception["seed"]), paths["inception"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def bf16_peak() -> float:
    """FLOP/s of the fastest of ten 8192^3 bf16 products: what this GPU's tensor cores reach."""
    return bench.matmul_flops(torch.bfloat16, 1024 if DRY_RUN else 8192, DEVICE)


def timed_steps(monkeypatch, module, loss, record):
    """Wrap module.<loss>, which the script's loop calls once a step (at --grad-accum 1): the seconds from
    one call to the next (a whole step, synchronised) and record(its result)."""
    real, seconds, values, last = getattr(module, loss), [], [], []

    def call(*args, **kwargs):
        sync()
        now = time.perf_counter()
        if last:
            seconds.append(now - last[0])
        last[:] = [now]
        result = real(*args, **kwargs)
        values.append(record(result))
        return result

    monkeypatch.setattr(module, loss, call)
    return seconds, values


def report(name, seconds, flops_per_step, peak, memory, estimate=None):
    step = statistics.median(seconds[len(seconds) // 2:])  # warmed up: cuDNN's search and the allocator settled
    line = (f"\n{name}: {step * 1e3:.0f} ms/step, {100 * flops_per_step / step / peak:.0f}% of the bf16 matmul peak "
            f"({peak / 1e12:.0f} TFLOP/s), peak memory {memory / 1e9:.2f} GB")
    if estimate is not None:
        line += f" (plan.step_memory estimated {estimate / 1e9:.2f} GB: x{memory / estimate:.2f})"
    print(line)
    return step


def falls(values, name):
    first, last = statistics.mean(values[:3]), statistics.mean(values[-3:])
    assert last < first, f"{name} did not fall: {values}"


def test_vqgan(imagenet, weights, tmp_path_factory, monkeypatch, bf16_peak):
    out = tmp_path_factory.mktemp("vqgan")
    seconds, reconstruction = timed_steps(monkeypatch, train_vqgan, "reconstruction_loss", lambda loss: loss.item())
    peak_memory_reset()
    model = train_vqgan.main(["--dataset", "imagenet100", "--data-dir", imagenet, *PRESET, "--steps", "30",
                              "--batch-size", "8", "--grad-accum", "1", "--disc-start", "15", "--val-images", "16",
                              "--log-every", "5",
                              "--vgg16-weights", weights["vgg16"], "--lpips-weights", weights["lpips"],
                              "--out-dir", str(out)])
    falls(reconstruction[:15], "the VQGAN's reconstruction loss")
    size = model.config.image_size
    with torch.device("meta"):
        image = torch.zeros(1, 3, size, size)
        convs = cost.conv_flops(VQGAN(model.config), image) + cost.conv_flops(LPIPS(), image, image)
    report("train_vqgan.py (imagenet preset, batch 8, GAN from step 15)", seconds, 3 * 8 * convs, bf16_peak,
           peak_memory())
    RESULTS["vqgan"] = out / "ckpt.pt"


def test_vqgan_layout_and_tf32_targets():
    """What distributed.conv_memory_format and losses.base_targets decide, measured on this GPU."""
    vqgan = VQGAN.from_checkpoint(RESULTS["vqgan"]).to(DEVICE)
    images = torch.rand(16, 3, vqgan.config.image_size, vqgan.config.image_size, device=DEVICE)
    seconds = {}
    for layout in (torch.channels_last, torch.contiguous_format):
        vqgan.to(memory_format=layout)

        def step():
            recon, q = vqgan(images)
            (recon.float().abs().mean() + q.loss).backward()

        with autocast(DEVICE, True):
            seconds[layout] = bench.timed(step, 3, 2, DEVICE)
    chosen = conv_memory_format(DEVICE)
    other = torch.contiguous_format if chosen == torch.channels_last else torch.channels_last
    print(f"\nVQGAN step, bf16, batch 16: {chosen} (chosen) {seconds[chosen] * 1e3:.0f} ms, {other} "
          f"{seconds[other] * 1e3:.0f} ms")
    vqgan.to(memory_format=chosen)
    indices = {}
    with saved_torch_flags():
        for allowed in (True, False):
            torch.backends.cudnn.allow_tf32 = allowed
            indices[allowed] = losses.base_targets(vqgan.eval(), images)[1]
    print(f"stage-1 targets: TF32 convolutions change {100 * (indices[True] != indices[False]).float().mean():.2f}% "
          "of the tokens of exact float32")


def test_stage1(imagenet, tmp_path_factory, monkeypatch, bf16_peak):
    out = tmp_path_factory.mktemp("stage1")
    seconds, ce = timed_steps(monkeypatch, train_stage1, "stage1_loss",
                              lambda result: (result[1][:, 0].sum() / result[1][:, 2].sum()).item())
    flags = ["--dataset", "imagenet100", "--data-dir", imagenet, *PRESET, "--vqgan-ckpt", str(RESULTS["vqgan"]),
             "--batch-size", "8", "--grad-accum", "1", "--base-lr", "3.2e-2", "--warmup-steps", "5", "--log-every", "5"]
    peak_memory_reset()
    model = train_stage1.main(flags + ["--steps", "40", "--out-dir", str(out)])
    falls(ce, "stage 1's cross-entropy")
    batch_flops = cost.stage1_flops(model.config, 8, cost.base_encoder_flops(model))
    train, _ = train_stage1.parse_args(flags)
    estimate = plan.stage1_step_memory(model, 8, DEVICE, True, False)
    plain = report("train_stage1.py (small, batch 8, halting, bf16)", seconds, batch_flops, bf16_peak, peak_memory(),
                   estimate)
    assert DRY_RUN or 0.5 < peak_memory() / estimate < 1.5, "plan.step_memory is off: fix its model"
    RESULTS["stage1"] = out / "ckpt.pt"

    seconds.clear()
    peak_memory_reset()
    train_stage1.main(flags + ["--steps", "10", "--grad-checkpoint", "--out-dir", str(out.parent / "checkpointed")])
    checkpointed = report("  with --grad-checkpoint", seconds, batch_flops, bf16_peak, peak_memory())
    print(f"  gradient checkpointing: x{checkpointed / plain:.2f} the time")


def test_stage2(imagenet, weights, tmp_path_factory, monkeypatch, bf16_peak):
    out = tmp_path_factory.mktemp("stage2")
    seconds, rec = timed_steps(monkeypatch, train_stage2, "reconstruction_loss", lambda loss: loss.item())
    peak_memory_reset()
    model = train_stage2.main(["--dataset", "imagenet100", "--data-dir", imagenet, *PRESET, "--stage1-ckpt",
                               str(RESULTS["stage1"]), "--steps", "32", "--batch-size", "4", "--grad-accum", "1",
                               "--warmup-steps", "4", "--base-lr", "8e-3", "--gan-schedule", "0.5:0.1",
                               "--log-every", "4",
                               "--vgg16-weights", weights["vgg16"], "--lpips-weights", weights["lpips"],
                               "--out-dir", str(out)])
    # the iterations take turns carrying the loss: the last round of 8 against the first
    assert statistics.mean(rec[-8:]) < statistics.mean(rec[:8]), rec
    with torch.device("meta"):
        image = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
        base = VQGAN(model.config.vqgan)
        convs = cost.conv_flops(base.encoder, image) + cost.conv_flops(
            base.decoder, torch.zeros(1, model.config.vqgan.latent_channels, *[model.config.grid_size] * 2))
        lpips, disc = cost.conv_flops(LPIPS(), image, image), cost.conv_flops(
            PatchDiscriminator(num_layers=3), image)
    report("train_stage2.py (small, batch 4, GAN on half the steps, LPIPS)", seconds,
           4 * cost.stage2_flops(model.config, convs, lpips, disc), bf16_peak, peak_memory())
    RESULTS["stage2"] = out / "ckpt.pt"


def test_evaluate(imagenet, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    sync()
    start = time.perf_counter()
    results = evaluate.main(["--dataset", "imagenet100", "--data-dir", imagenet, "--ckpt", str(RESULTS["stage2"]),
                             "--compare", str(RESULTS["stage1"]), "--inception-weights", weights["inception"],
                             "--batch-size", "25", "--out-dir", str(out)])
    print(f"\nevaluate.py: {results['images']} images in {time.perf_counter() - start:.1f} s, with FID")
    assert results["per_token_count"][-1]["rfid"] is not None and (out / "reconstructions.png").is_file()


@pytest.mark.skipif(DRY_RUN or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus(imagenet, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for script, flags in [
            ("train_stage1.py", ["--dataset", "imagenet100", "--data-dir", imagenet, "--vqgan-ckpt",
                                 str(RESULTS["vqgan"]), "--batch-size", "8", "--grad-accum", "1", "--steps", "10",
                                 "--out-dir", str(out / "stage1")]),
            ("train_stage2.py", ["--dataset", "imagenet100", "--data-dir", imagenet, "--stage1-ckpt",
                                 str(out / "stage1" / "ckpt.pt"), "--batch-size", "4", "--grad-accum", "1",
                                 "--steps", "8", "--gan-schedule", "0.5:0.1", "--vgg16-weights", weights["vgg16"],
                                 "--lpips-weights",
                                 weights["lpips"], "--out-dir", str(out / "stage2")]),
            ("evaluate.py", ["--dataset", "imagenet100", "--data-dir", imagenet,
                             "--ckpt", str(out / "stage2" / "ckpt.pt"),
                             "--compare", str(out / "stage1" / "ckpt.pt"), "--inception-weights", weights["inception"],
                             "--out-dir", str(out / "eval")])]:
        start = time.perf_counter()
        result = subprocess.run([*torchrun, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                                timeout=900, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"\ntorchrun --nproc_per_node=2 {script}: {time.perf_counter() - start:.0f} s")
