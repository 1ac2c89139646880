"""train_stage2.py: where gradients go, exact resume, errors (on 2 ranks: tests/test_chaos.py)."""

import pytest
import torch

import train_stage2
from losses import PatchDiscriminator, generator_gan_loss
from losses import discriminator_step
from model import ALIT
from weights import load_checkpoint

SMALL = ["--no-bf16", "--batch-size", "2", "--log-every", "2", "--sample-every", "100", "--warmup-steps", "1",
         "--disc-channels", "8", "--gan-schedule", "0.25:0.1,0.5:0.2"]


def stage2(tmp_path, stage1_ckpt, name, *extra):
    return train_stage2.main(SMALL + ["--stage1-ckpt", str(stage1_ckpt), "--out-dir", str(tmp_path / name), *extra])


def test_gradients_reach_vqgan_and_alit_and_discriminator_only_through_its_loss(stage1_ckpt):
    model = ALIT.from_checkpoint(stage1_ckpt, ema=False).train()
    model.requires_grad_(True)
    model.vqgan.quantize.requires_grad_(False)
    model.halted_token.requires_grad_(False)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    images = torch.rand(2, 3, 32, 32)
    (record,) = model(images, iters=[2], reconstruct=True)
    rec_loss = (record.recon - images).abs().mean()
    loss = rec_loss + record.quantized.loss + generator_gan_loss(
        discriminator, record.recon, rec_loss, model.vqgan.decoder.last_layer, 0.1)
    loss.backward()
    for prefix in ("vqgan.decoder.", "vqgan.encoder.", "encoder.", "decoder.", "patch_embed", "head.", "quantize."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    assert all(p.grad is None for p in discriminator.parameters())  # the generator's loss leaves it alone
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    discriminator_step(discriminator, optimizer, images, record.recon)
    assert all(p.grad is not None for p in discriminator.parameters())
    for n, p in model.named_parameters():  # ... and its own loss leaves the generator alone
        if n in before:
            assert torch.equal(p.grad, before[n]), n


def test_resume_continues_bit_exactly(tmp_path, stage1_ckpt):
    whole = stage2(tmp_path, stage1_ckpt, "whole", "--steps", "4", "--save-every", "2")
    stage2(tmp_path, stage1_ckpt, "parts", "--steps", "4", "--save-every", "2", "--stop-after", "2")
    resumed = stage2(tmp_path, stage1_ckpt, "parts", "--steps", "4", "--save-every", "2", "--resume")
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    a = load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "parts" / "ckpt.pt")
    for key in a["discriminators"]:
        assert torch.equal(a["discriminators"][key], b["discriminators"][key]), key
    assert (tmp_path / "whole" / "rollout_000004.png").is_file()


def test_discriminator_per_iteration_option(tmp_path, stage1_ckpt):
    stage2(tmp_path, stage1_ckpt, "per", "--steps", "3", "--disc-per-iteration", "--gan-schedule", "0:0.1")
    ckpt = load_checkpoint(tmp_path / "per" / "ckpt.pt")
    rollout_iters = ckpt["model_config"]["rollout_iters"]
    assert len({k.split(".")[0] for k in ckpt["discriminators"]}) == rollout_iters


def test_stage1_checkpoint_errors(tmp_path, stage1_ckpt, vqgan_ckpt):
    with pytest.raises(SystemExit, match="not found"):
        stage2(tmp_path, tmp_path / "missing.pt", "x", "--steps", "1")
    with pytest.raises(SystemExit, match="another preset"):
        stage2(tmp_path, stage1_ckpt, "x", "--steps", "1", "--preset", "small")
    with pytest.raises(SystemExit, match="not a train_stage1.py checkpoint"):
        stage2(tmp_path, vqgan_ckpt, "x", "--steps", "1")
    with pytest.raises(SystemExit, match="--gan-schedule"):
        train_stage2.parse_args(["--gan-schedule", "half:0.1"])
