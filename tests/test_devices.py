"""Device-strict steps: each training script's step and an evaluation batch on a device that is not the CPU.

The `meta` device stands in for CUDA, which this machine lacks: a meta tensor has a shape and a dtype and
no data, and an operation that mixes it with a CPU tensor fails, so any tensor the code makes without
`device=` (or a checkpoint's tensor left where load_checkpoint put it) is caught. Calls whose output
size depends on the data (the dead codes of a restart) are stood in for. A step also must not reseed
the device's random generator (the halting draws would then follow the data order): the CUDA seeding
functions raise while it runs.
"""
import contextlib
import os
import shutil
import signal

import pytest
import torch

import checkpoint
import distributed
import losses
import plan
import quantize
import train_stage1
import train_stage2
import train_vqgan
from conftest import SMALL_ALIT, SMALL_VQGAN, TinyFeatures
from data import train_batches
from evaluate import evaluate_batch
from fid import FeatureStats
from model import ALIT, make_config
from distributed import conv_memory_format

META = torch.device("meta")


@pytest.fixture(autouse=True)
def dead_codes_stand_in(monkeypatch):
    """nonzero has no meta kernel: the first three codes count as dead."""
    monkeypatch.setattr(quantize, "unused_codes", lambda counts: torch.arange(3, device=counts.device))


def forbid_reseeding_the_device(patch):
    def reseeded(*args, **kwargs):
        raise AssertionError("a step reseeded the device's random generator")
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
        patch.setattr(torch.cuda, name, reseeded)


class Perceptual(torch.nn.Module):
    """Stands in for LPIPS, whose VGG weights cannot be downloaded here."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3).requires_grad_(False)

    def forward(self, x, y):
        return (self.conv(x) - self.conv(y)).square().mean(dim=(1, 2, 3))


class FirstLog(Exception):
    """A script reached its first log: one whole step ran."""


def one_step_on_meta(script, argv, monkeypatch, resumed=None) -> dict:
    """script.main(argv) with the `meta` device as the run's device (distributed.planned_device), stopped at
    its first log, after one whole step: its --grad-accum micro-steps, the optimizer, the restarts, the EMA
    and the discriminator. From the loop on, reseeding the device's generator fails the test (the scripts
    seed before it). `resumed(stateful)` checks what --resume restored. Returns {"logged": the tensors the
    log averages over the ranks, "stateful": what a checkpoint would save}."""
    seen = {}
    handlers = {s: signal.getsignal(s) for s in distributed.StopSignal.SIGNALS}
    start_or_resume, stop_signal = checkpoint.start_or_resume, distributed.StopSignal

    def start(args, model_config, stateful, ctx, images, per_rank=None, files=None):
        seen["stateful"] = stateful
        with pytest.warns(UserWarning, match="meta parameter") if args.resume else contextlib.nullcontext():
            step = start_or_resume(args, model_config, stateful, ctx, images, per_rank, files)  # CPU into meta: none
        if resumed:
            resumed(stateful)
        return step

    def the_loop_starts(*args):
        forbid_reseeding_the_device(patch)
        return stop_signal(*args)

    def logged(tensors):
        seen["logged"] = tensors
        raise FirstLog

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "planned_device", lambda flag="auto": META)
        patch.setattr(checkpoint, "start_or_resume", start)
        patch.setattr(distributed, "StopSignal", the_loop_starts)
        patch.setattr(distributed, "average_over_ranks", logged)
        try:
            with pytest.raises(FirstLog):
                script.main([*argv, "--log-every", "1"])  # the first log comes after the first step
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    return seen


def on_meta(tensors):
    return all(t.device == META for t in tensors)


def optimizer_state(optimizer):
    """AdamW's moments (its step counts are CPU tensors by design, unless fused or capturable)."""
    return [value for state in optimizer.state.values() for key, value in state.items() if key != "step"]


def resumable_copy(ckpt, tmp_path):
    """A run folder holding a copy of a fixture's checkpoint, for --resume."""
    (tmp_path / "run").mkdir()
    shutil.copy(ckpt, tmp_path / "run" / "ckpt.pt")
    return str(tmp_path / "run")


def test_vqgan_step_with_the_gan_on_after_resume(vqgan_ckpt, monkeypatch, tmp_path):
    monkeypatch.setattr(train_vqgan, "load_perceptual", lambda *args: Perceptual().to(META))

    def counts_where_the_codebook_is(stateful):  # the checkpoint's dead-code counts, moved to the device
        assert stateful["model"].quantize.counts_since_restart.device == META

    seen = one_step_on_meta(train_vqgan, SMALL_VQGAN + [
        "--disc-start", "0", "--restart-every", "1", "--grad-accum", "2", "--bf16", "--steps", "4", "--resume",
        "--accept-changes", "--out-dir", resumable_copy(vqgan_ckpt, tmp_path)], monkeypatch,
        counts_where_the_codebook_is)
    (logs,) = seen["logged"]
    stateful = seen["stateful"]
    assert logs.shape == (5,) and on_meta([logs, *optimizer_state(stateful["optimizer"]),
                                           *optimizer_state(stateful["disc_optimizer"])])


def test_stage1_step_with_halting_after_resume(stage1_ckpt, vqgan_ckpt, monkeypatch, tmp_path):
    seen = one_step_on_meta(train_stage1, SMALL_ALIT + [
        "--vqgan-ckpt", str(vqgan_ckpt), "--batch-size", "2", "--grad-accum", "2", "--latent-restart-every", "1",
        "--restart-until", "1", "--loss-iters", "3", "--rollout-warmup", "0", "--bf16", "--steps", "4", "--resume",
        "--accept-changes",
        "--out-dir", resumable_copy(stage1_ckpt, tmp_path)], monkeypatch)
    stats, counts = seen["logged"]
    model, ema = seen["stateful"]["model"].model, seen["stateful"]["ema"]  # Trained: without its base
    assert stats.shape == (8, 3) and counts.shape == (model.config.latent_codebook_size,)
    assert on_meta([stats, counts, *ema.shadow.values(), model.quantize.embedding.weight,
                    *optimizer_state(seen["stateful"]["optimizer"])])


def test_stage2_step_with_the_gan_and_a_perceptual_loss(stage1_ckpt, monkeypatch, tmp_path):
    monkeypatch.setattr(train_stage2, "load_perceptual", lambda *args: Perceptual().to(META))
    seen = one_step_on_meta(train_stage2, [
        "--stage1-ckpt", str(stage1_ckpt), "--iteration-order", "random", "--gan-schedule", "0:0.1",
        "--disc-channels", "8", "--batch-size", "2", "--grad-accum", "2", "--bf16", "--steps", "2",
        "--out-dir", str(tmp_path / "s2")], monkeypatch)
    (logs,) = seen["logged"]
    assert logs.shape == (5,) and on_meta([logs, *seen["stateful"]["ema"].shadow.values(),
                                           *optimizer_state(seen["stateful"]["disc_optimizer"])])


def test_an_evaluation_batch(stage1_ckpt):
    model = ALIT.from_checkpoint(stage1_ckpt).to(META)
    images = torch.rand(3, 3, 32, 32, device=META)
    encoded = []
    model.vqgan.encoder.register_forward_hook(lambda *args: encoded.append(1))
    stats = {"real": FeatureStats(), "base": FeatureStats(),
             **{f"tokens_{8 * (t + 1)}": FeatureStats() for t in range(8)},
             "l1<0.05": FeatureStats()}
    arrays, recon, codes = evaluate_batch(model, images, True, [0.05], TinyFeatures().to(META), stats)
    assert arrays["l1"].shape == (8, 3) and recon.shape == (8, 3, 3, 32, 32) and codes.shape == (3, 64)
    assert on_meta([*arrays.values(), recon, codes, stats["l1<0.05"].sum])
    assert len(encoded) == 1  # the VQGAN encoder runs once for the rollout, the targets and the VQGAN alone


def test_the_memory_estimate_runs_where_the_model_is():
    model = ALIT(make_config("tiny", encoder_width=64, decoder_width=64)).to(META)
    model.base.requires_grad_(False)
    train, _ = train_stage1.parse_args(["--batch-size", "4"])
    # meta storages have no address: every saved tensor counts as one, so only the weights are pinned
    assert plan.stage1_step_memory(model, train.batch_size, META, False, False) >= \
        sum(p.numel() for p in model.alit_parameters()) * plan.TRAINED_PARAMETER_BYTES


# ----------------------------------------------------------------------------- what is decided per device

def test_bf16_is_native_from_ampere_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on a V100 too
    for capability, native in [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert distributed.native_bf16(torch.device("cuda:0")) is native, capability
    assert distributed.native_bf16(META) is False


def test_data_workers_default_to_the_cpus_of_each_rank(monkeypatch):
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(48)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.data_workers(None, torch.device("cuda:3")) == 5  # 48 CPUs / 8 ranks, one left for the loop
    assert distributed.data_workers(None, torch.device("cpu")) == 0  # workers would take the model's cores
    assert distributed.data_workers(2, torch.device("cpu")) == 2
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert distributed.data_workers(None, torch.device("cuda:0")) == 1


@pytest.mark.parametrize("total_gb, expected", [(80, False), (60, True), (40, True)])
def test_checkpointing_turns_on_where_a_step_would_not_fit(monkeypatch, total_gb, expected):
    gpu = type("Properties", (), {"name": "GPU", "total_memory": total_gb * 10 ** 9})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    said = []
    need = {False: 50e9, True: 8e9}.__getitem__  # bytes a step needs without / with checkpointing
    # 60 GB: 50 GB are 83% of it, but 86% of what is left after the CUDA reserve
    assert plan.grad_checkpointing(None, torch.device("cuda:0"), need, said.append) == \
           (expected, 8e9 if expected else 50e9)
    assert len(said) == expected
    assert not said or f"50 GB without it, 8 GB with it, and GPU has {total_gb} GB" in said[0]
    assert plan.grad_checkpointing(False, torch.device("cuda:0"), need, said.append) == (False, 50e9)  # the flag wins
    assert plan.grad_checkpointing(None, torch.device("cpu"), need, said.append) == (False, None)


def test_the_memory_estimate_counts_weights_and_activations_per_image():
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", encoder_width=64, decoder_width=64))
    model.base.requires_grad_(False)
    estimate = {}
    for batch in (1, 3):
        train, _ = train_stage1.parse_args(["--batch-size", str(batch)])
        for on in (False, True):
            estimate[batch, on] = plan.stage1_step_memory(model, train.batch_size, torch.device("cpu"), False, on)
    weights = sum(p.numel() for p in model.alit_parameters()) * plan.TRAINED_PARAMETER_BYTES
    for on in (False, True):
        per_image = (estimate[3, on] - estimate[1, on]) / 2
        assert estimate[1, on] > weights and per_image > 0
    assert estimate[3, True] < estimate[3, False]
    # the largest saved tensors of one image: the logits over the VQGAN codes at 8 iterations, float32
    assert (estimate[3, False] - estimate[1, False]) / 2 > 8 * 64 * 256 * 4
    assert model.encoder.grad_checkpoint is False and model.quantize.counts_since_restart is None  # left as found


def test_layout_and_exact_search_are_decided_where_they_act(torch_flags):
    assert conv_memory_format(torch.device("cpu")) == torch.channels_last  # the CPU's GroupNorm keeps it
    torch.backends.cuda.matmul.allow_tf32 = True
    with quantize.exact_float32("cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 is False and not torch.is_autocast_enabled("cpu")
    assert torch.backends.cuda.matmul.allow_tf32 is True
    indices = torch.tensor([[3, 1, 3], [0, 3, 9]])
    assert torch.equal(quantize.count_codes(indices, 10), torch.bincount(indices.flatten(), minlength=10).float())


def test_the_cuda_setup_picks_its_gpu_before_nccl_starts(monkeypatch, torch_flags):
    calls = []
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # set by the setup, put back by monkeypatch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: calls.append(("init", backend)))
    torch.backends.cudnn.benchmark = False
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4")
    ctx = distributed.setup_ranks("auto")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")] and ctx.device == torch.device("cuda:1")
    assert torch.backends.cudnn.benchmark  # fixed training shapes: cuDNN's fastest kernels, chosen once
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # before CUDA first allocates


def test_stage1_targets_are_float32_whatever_the_autocast():
    torch.manual_seed(0)
    vqgan = ALIT(make_config("tiny")).vqgan.eval()
    images = torch.rand(4, 3, 32, 32)
    latents, indices = losses.base_targets(vqgan, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop runs under it; the token cache does not
        under_autocast = losses.base_targets(vqgan, images)
    assert latents.dtype == torch.float32 and torch.equal(under_autocast[0], latents)
    assert torch.equal(under_autocast[1], indices)


class WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor(os.getpid()), index


def test_data_workers_start_once_for_the_whole_run():
    batches = train_batches(WorkerPid(), 4, 0, 1, seed=0, num_workers=1)
    pids = {int(pid) for _ in range(6) for pid in next(batches)[1][0]}  # 3 epochs of 2 batches
    assert len(pids) == 1 and pids != {os.getpid()}


# ----------------------------------------------------------------------------- the VAE base

def test_vae_steps_of_each_stage_and_an_evaluation_batch(vae_ckpt, vae_stage1_ckpt, monkeypatch, tmp_path):
    """The VAE path: its own training step (the KL term, the GAN on), stage 1 (the MSE, halting on the
    code error), stage 2 (the VAE decoder's last layer in the adaptive GAN weight) and evaluation."""
    monkeypatch.setattr(train_vqgan, "load_perceptual", lambda *args: Perceptual().to(META))
    (logs,) = one_step_on_meta(train_vqgan, SMALL_VQGAN + [
        "--base", "vae", "--disc-start", "0", "--bf16", "--out-dir", str(tmp_path / "vae")], monkeypatch)["logged"]
    assert logs.shape == (5,) and on_meta([logs])

    stats, counts = one_step_on_meta(train_stage1, SMALL_ALIT + [
        "--base", "vae", "--vqgan-ckpt", str(vae_ckpt), "--batch-size", "2", "--halting-code-error", "10",
        "--rollout-warmup", "0", "--bf16", "--out-dir", str(tmp_path / "s1")], monkeypatch)["logged"]
    assert stats.shape == (8, 3) and on_meta([stats, counts])

    monkeypatch.setattr(train_stage2, "load_perceptual", lambda *args: Perceptual().to(META))
    seen = one_step_on_meta(train_stage2, ["--stage1-ckpt", str(vae_stage1_ckpt), "--gan-schedule", "0:0.1",
                                           "--disc-channels", "8", "--batch-size", "2", "--bf16",
                                           "--out-dir", str(tmp_path / "s2")], monkeypatch)
    (logs,) = seen["logged"]
    assert logs.shape == (5,) and on_meta([logs, *seen["stateful"]["ema"].shadow.values()])

    model = ALIT.from_checkpoint(vae_stage1_ckpt).to(META)
    stats = {"real": FeatureStats(), "base": FeatureStats(),
             **{f"tokens_{8 * (t + 1)}": FeatureStats() for t in range(8)}}
    arrays, recon, codes = evaluate_batch(model, torch.rand(3, 3, 32, 32, device=META), True, [],
                                          TinyFeatures().to(META),
                                          stats)
    assert arrays["code_mse"].shape == (8, 3) and on_meta([*arrays.values(), recon, codes])
