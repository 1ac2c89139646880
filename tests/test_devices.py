"""Device-strict steps: each training script's step and an evaluation batch on a device that is not the CPU.

The `meta` device stands in for CUDA, which this machine lacks: a meta tensor has a shape and a dtype and
no data, and an operation that mixes it with a CPU tensor fails, so any tensor the code makes without
`device=` (or a checkpoint's tensor left where load_checkpoint put it) is caught. Calls whose output
size depends on the data (the dead codes of a restart) are stood in for. A step also must not reseed
the device's random generator (the halting draws would then follow the data order): the CUDA seeding
functions raise while it runs.
"""
import contextlib
import dataclasses
import os

import pytest
import torch

import memory
import pretrained
import quantize
import train_stage1
import train_stage2
import train_vqgan
import training
from conftest import SMALL_ALIT, SMALL_VQGAN, TinyFeatures
from data import build_dataset, train_batches
from evaluate import evaluate_batch
from fid import FeatureStats
from losses import PatchDiscriminator
from model import ALIT, make_config
from training import EMA, Distributed, PerRank, adamw
from vqgan import conv_memory_format

META = torch.device("meta")
CTX = Distributed(rank=0, local_rank=0, world_size=1, device=META)


@pytest.fixture(autouse=True)
def dead_codes_stand_in(monkeypatch):
    """nonzero has no meta kernel: the first three codes count as dead."""
    monkeypatch.setattr(quantize, "unused_codes", lambda counts: torch.arange(3, device=counts.device))


@contextlib.contextmanager
def device_generators_untouched(monkeypatch):
    def reseeded(*args, **kwargs):
        raise AssertionError("a step reseeded the device's random generator")
    with monkeypatch.context() as patch:
        for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
            patch.setattr(torch.cuda, name, reseeded)
        yield


class Perceptual(torch.nn.Module):
    """Stands in for LPIPS, whose VGG weights cannot be downloaded here."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3).requires_grad_(False)

    def forward(self, x, y):
        return (self.conv(x) - self.conv(y)).square().mean(dim=(1, 2, 3))


def shapes_batches(batch_size, image_size=32):
    return train_batches(build_dataset("shapes", "train", image_size, num_images=64), batch_size, 0, 1, seed=0)


def on_meta(tensors):
    return all(t.device == META for t in tensors)


def test_vqgan_step_with_the_gan_on_after_resume(vqgan_ckpt, monkeypatch):
    train, model_cfg = train_vqgan.parse_args(SMALL_VQGAN + ["--disc-start", "0", "--restart-every", "1"])
    model = train_vqgan.VQGAN(model_cfg).to(META)
    discriminator = PatchDiscriminator(base_channels=train.disc_channels, num_layers=train.disc_layers).to(META)
    optimizer = adamw(model.parameters(), train.lr, (0.5, 0.9), 0.0, META)
    disc_optimizer = adamw(discriminator.parameters(), train.disc_lr, (0.5, 0.9), 0.0, META)
    stateful = {"model": model, "discriminator": discriminator, "optimizer": optimizer,
                "disc_optimizer": disc_optimizer}
    per_rank = {"code_restarts": PerRank(model.quantize.restart_state, model.quantize.load_restart_state)}
    with pytest.warns(UserWarning, match="meta parameter"):  # copying a CPU checkpoint into meta does nothing
        step = training.resume(vqgan_ckpt, dataclasses.asdict(model_cfg), stateful, CTX, per_rank)["step"]
    assert model.quantize.counts_since_restart.device == META  # the checkpoint's counts, where the codebook is
    train = dataclasses.replace(train, grad_accum=2)
    batches = shapes_batches(train.batch_size)
    with device_generators_untouched(monkeypatch):
        logs = train_vqgan.train_step(model, model, discriminator, optimizer, disc_optimizer, batches, step, train,
                                      Perceptual().to(META), CTX, bf16=True)
    assert logs.shape == (5,) and on_meta([logs, optimizer.state[model.decoder.last_layer]["exp_avg"]])


def test_stage1_step_with_halting_after_resume(stage1_ckpt, vqgan_ckpt, monkeypatch):
    flags = SMALL_ALIT + ["--vqgan-ckpt", str(vqgan_ckpt), "--batch-size", "2", "--grad-accum", "2",
                          "--latent-restart-every", "1", "--loss-iters", "3"]
    train, model_cfg = train_stage1.parse_args(flags)
    vqgan = pretrained.load_base(train, model_cfg, log=lambda *a: None)
    model = ALIT(dataclasses.replace(model_cfg, vqgan=vqgan.config))
    model.vqgan = vqgan
    model.vqgan.requires_grad_(False).eval()
    model.to(META)
    optimizer = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, META)
    ema = EMA(model, 0.999)
    stateful = {"model": model, "ema": ema, "optimizer": optimizer}
    per_rank = {"latent_restarts": PerRank(model.quantize.restart_state, model.quantize.load_restart_state)}
    with pytest.warns(UserWarning, match="meta parameter"):
        step = training.resume(stage1_ckpt, model.config.to_dict(), stateful, CTX, per_rank)["step"]
    batches = shapes_batches(2)
    weights = train_stage1.iteration_weights(train.iteration_weights, model_cfg.rollout_iters)
    with device_generators_untouched(monkeypatch):
        stats, counts, finite = train_stage1.train_step(model, model, optimizer, ema, batches, 200, 1e-3, train,
                                                        weights, CTX, bf16=True)
    assert stats.shape == (8, 3) and counts.shape == (model_cfg.latent_codebook_size,)
    assert on_meta([stats, counts, finite, *ema.shadow.values(), model.quantize.embedding.weight])


def test_stage2_step_with_the_gan_and_a_perceptual_loss(stage1_ckpt, monkeypatch):
    train = train_stage2.parse_args(["--stage1-ckpt", str(stage1_ckpt), "--iteration-order", "random"])
    model = pretrained.load_stage1(train)
    model.vqgan.quantize.requires_grad_(False)
    model.halted_token.requires_grad_(False)
    model.to(META)
    discriminators = torch.nn.ModuleList([PatchDiscriminator(base_channels=8, num_layers=2)]).to(META)
    optimizer = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, META)
    disc_optimizer = adamw(discriminators.parameters(), 1e-4, (0.5, 0.9), 0.0, META)
    ema = EMA(model, 0.999)

    train = dataclasses.replace(train, grad_accum=2)
    with device_generators_untouched(monkeypatch):
        logs = train_stage2.train_step(model, model, discriminators, optimizer, disc_optimizer, ema, shapes_batches(2),
                                       7, 1e-3, 0.1, train, Perceptual().to(META), CTX, bf16=True)
    assert logs.shape == (5,) and on_meta([logs, *ema.shadow.values()])


def test_an_evaluation_batch(stage1_ckpt):
    model = ALIT.from_checkpoint(stage1_ckpt).to(META)
    images = torch.rand(3, 3, 32, 32, device=META)
    encoded = []
    model.vqgan.encoder.register_forward_hook(lambda *args: encoded.append(1))
    stats = {"real": FeatureStats(), "vqgan": FeatureStats(),
             **{f"tokens_{8 * (t + 1)}": FeatureStats() for t in range(8)},
             "l1<0.05": FeatureStats()}
    arrays, recon, codes = evaluate_batch(model, images, True, [0.05], TinyFeatures().to(META), stats)
    assert arrays["l1"].shape == (8, 3) and recon.shape == (8, 3, 3, 32, 32) and codes.shape == (3, 64)
    assert on_meta([*arrays.values(), recon, codes, stats["l1<0.05"].sum])
    assert len(encoded) == 1  # the VQGAN encoder runs once for the rollout, the targets and the VQGAN alone


def test_the_memory_estimate_runs_where_the_model_is():
    model = ALIT(make_config("tiny", encoder_width=64, decoder_width=64)).to(META)
    model.vqgan.requires_grad_(False)
    train, _ = train_stage1.parse_args(["--batch-size", "4"])
    # meta storages have no address: every saved tensor counts as one, so only the weights are pinned
    assert memory.stage1_step_memory(model, train.batch_size, META, False, False) >= \
        sum(p.numel() for p in model.alit_parameters()) * training.TRAINED_PARAMETER_BYTES


# ----------------------------------------------------------------------------- what is decided per device

def test_bf16_is_native_from_ampere_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on a V100 too
    for capability, native in [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert training.native_bf16(torch.device("cuda:0")) is native, capability
    assert training.native_bf16(META) is False


def test_data_workers_default_to_the_cpus_of_each_rank(monkeypatch):
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: set(range(48)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert training.data_workers(None, torch.device("cuda:3")) == 5  # 48 CPUs / 8 ranks, one left for the loop
    assert training.data_workers(None, torch.device("cpu")) == 0  # workers would take the model's cores
    assert training.data_workers(2, torch.device("cpu")) == 2
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert training.data_workers(None, torch.device("cuda:0")) == 1


@pytest.mark.parametrize("total_gb, expected", [(80, False), (60, True), (40, True)])
def test_checkpointing_turns_on_where_a_step_would_not_fit(monkeypatch, total_gb, expected):
    gpu = type("Properties", (), {"name": "GPU", "total_memory": total_gb * 10 ** 9})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    said = []
    need = {False: 50e9, True: 8e9}.__getitem__  # bytes a step needs without / with checkpointing
    # 60 GB: 50 GB are 83% of it, but 86% of what is left after the CUDA reserve
    assert training.grad_checkpointing(None, torch.device("cuda:0"), need, said.append) == \
           (expected, 8e9 if expected else 50e9)
    assert len(said) == expected and (not said or f"50 GB without it, 8 GB with it, and GPU has {total_gb} GB" in said[0])
    assert training.grad_checkpointing(False, torch.device("cuda:0"), need, said.append) == (False, 50e9)  # the flag wins
    assert training.grad_checkpointing(None, torch.device("cpu"), need, said.append) == (False, None)


def test_the_memory_estimate_counts_weights_and_activations_per_image():
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", encoder_width=64, decoder_width=64))
    model.vqgan.requires_grad_(False)
    estimate = {}
    for batch in (1, 3):
        train, _ = train_stage1.parse_args(["--batch-size", str(batch)])
        for on in (False, True):
            estimate[batch, on] = memory.stage1_step_memory(model, train.batch_size, torch.device("cpu"), False, on)
    weights = sum(p.numel() for p in model.alit_parameters()) * training.TRAINED_PARAMETER_BYTES
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
    monkeypatch.setattr(training.dist, "init_process_group", lambda backend, **kwargs: calls.append(("init", backend)))
    torch.backends.cudnn.benchmark = False
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4")
    ctx = training.setup_distributed("auto")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")] and ctx.device == torch.device("cuda:1")
    assert torch.backends.cudnn.benchmark  # fixed training shapes: cuDNN's fastest kernels, chosen once
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # before CUDA first allocates


def test_stage1_targets_are_float32_whatever_the_autocast():
    torch.manual_seed(0)
    vqgan = ALIT(make_config("tiny")).vqgan.eval()
    images = torch.rand(4, 3, 32, 32)
    latents, indices = pretrained.base_targets(vqgan, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop runs under it; the token cache does not
        under_autocast = pretrained.base_targets(vqgan, images)
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

def test_vae_steps_of_each_stage_and_an_evaluation_batch(vae_ckpt, vae_stage1_ckpt, monkeypatch):
    """The VAE path: its own training step (the KL term, the GAN on), stage 1 (the MSE, halting on the
    code error), stage 2 (the VAE decoder's last layer in the adaptive GAN weight) and evaluation."""
    train, cfg = train_vqgan.parse_args(SMALL_VQGAN + ["--base", "vae", "--disc-start", "0"])
    model = train_vqgan.VAE(cfg).to(META)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2).to(META)
    optimizer = adamw(model.parameters(), 1e-3, (0.5, 0.9), 0.0, META)
    disc_optimizer = adamw(discriminator.parameters(), 1e-3, (0.5, 0.9), 0.0, META)
    with device_generators_untouched(monkeypatch):
        logs = train_vqgan.train_step(model, model, discriminator, optimizer, disc_optimizer, shapes_batches(2), 0,
                                      train, Perceptual().to(META), CTX, bf16=True)
    assert logs.shape == (5,) and on_meta([logs])

    flags = SMALL_ALIT + ["--base", "vae", "--vqgan-ckpt", str(vae_ckpt), "--batch-size", "2",
                          "--halting-code-error", "10"]
    train, model_cfg = train_stage1.parse_args(flags)
    vae = pretrained.load_base(train, model_cfg, log=lambda *a: None)
    model = ALIT(dataclasses.replace(model_cfg, vae=vae.config))
    model.vae = vae.requires_grad_(False).eval()
    model.to(META)
    optimizer = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, META)
    ema = EMA(model, 0.999)
    weights = train_stage1.iteration_weights(train.iteration_weights, model_cfg.rollout_iters)
    with device_generators_untouched(monkeypatch):
        stats, counts, finite = train_stage1.train_step(model, model, optimizer, ema, shapes_batches(2), 200, 1e-3,
                                                        train, weights, CTX, bf16=True)
    assert stats.shape == (8, 3) and on_meta([stats, counts, finite, *ema.shadow.values()])

    train = train_stage2.parse_args(["--stage1-ckpt", str(vae_stage1_ckpt)])
    model = pretrained.load_stage1(train)
    model.halted_token.requires_grad_(False)
    model.to(META)
    discriminators = torch.nn.ModuleList([PatchDiscriminator(base_channels=8, num_layers=2)]).to(META)
    optimizer = adamw(model.parameters(), 1e-3, (0.9, 0.95), 0.05, META)
    disc_optimizer = adamw(discriminators.parameters(), 1e-4, (0.5, 0.9), 0.0, META)
    ema = EMA(model, 0.999)
    with device_generators_untouched(monkeypatch):
        logs = train_stage2.train_step(model, model, discriminators, optimizer, disc_optimizer, ema, shapes_batches(2),
                                       7, 1e-3, 0.1, train, Perceptual().to(META), CTX, bf16=True)
    assert logs.shape == (5,) and on_meta([logs, *ema.shadow.values()])

    model = ALIT.from_checkpoint(vae_stage1_ckpt).to(META)
    stats = {"real": FeatureStats(), "vqgan": FeatureStats(), **{f"tokens_{8 * (t + 1)}": FeatureStats() for t in range(8)}}
    arrays, recon, codes = evaluate_batch(model, torch.rand(3, 3, 32, 32, device=META), True, [], TinyFeatures().to(META),
                                          stats)
    assert arrays["code_mse"].shape == (8, 3) and on_meta([*arrays.values(), recon, codes])
