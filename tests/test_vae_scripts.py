"""The scripts over the VAE base: train_vqgan.py --base vae, stage 1's mean-square loss, stage 2 and
evaluate.py reading the base from the checkpoint, an official VAE checkpoint through evaluate.py --official."""
import json

import pytest
import torch

import evaluate
import train_stage1
import train_stage2
import train_vqgan
from conftest import SMALL_ALIT, SMALL_VAE
from model import ALIT, Iteration
from seeded import load_vectors
from vae import VAE
from vqgan import VQGAN


def test_the_vae_checkpoint_loads_as_a_vae_only(vae_ckpt, tmp_path):
    model = VAE.from_checkpoint(vae_ckpt)
    assert model.config.channels == 16 and model.config.latent_channels == 8
    with pytest.raises(ValueError, match="VAE"):
        VQGAN.from_checkpoint(vae_ckpt)
    evaluated = train_vqgan.main(SMALL_VAE + ["--eval-only", "--out-dir", str(vae_ckpt.parent), "--val-images", "8"])
    assert isinstance(evaluated, VAE)
    with pytest.raises(SystemExit, match="--codebook-size"):
        train_vqgan.parse_args(["--base", "vae", "--codebook-size", "64"])


def test_the_kl_term_has_ldms_weight_on_the_mean_losses(monkeypatch):
    """train_step's loss = L1 + kl_weight * KL summed over the latent grid / pixels per image."""
    train, cfg = train_vqgan.parse_args(SMALL_VAE + ["--kl-weight", "10"])
    torch.manual_seed(0)
    model = VAE(cfg)
    images = torch.rand(2, 3, 32, 32)
    seen = {}
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda loss, *a, **k: (seen.setdefault("loss", loss.item()),
                                                                          backward(loss, *a, **k)))
    torch.manual_seed(1)
    unchanged = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = iter([(0, (images, None))])
    logs = train_vqgan.train_step(model, model, None, unchanged, unchanged, batches, 0, train, None,
                                  type("Ctx", (), {"device": torch.device("cpu"), "enabled": False})(), False)
    torch.manual_seed(1)
    recon, posterior = model(images)
    kl = 10 * posterior.kl().mean() / (3 * 32 * 32)
    assert kl > 0.01  # a visible part of the loss at this weight
    # (a second pass of the same convolutions rounds differently in the last digits)
    assert seen["loss"] == pytest.approx(((recon - images).abs().mean() + kl).item(), rel=1e-4)
    assert logs[1].item() == pytest.approx(kl.item(), rel=1e-4)


def test_stage1_loss_is_the_weighted_mse_of_the_predicted_tokens():
    targets = torch.randn(2, 4, 3)
    weights = [2.5, 2.0]
    records, expected = [], 0.0
    for t in range(2):
        prediction = targets + 0.1 * (t + 1) * torch.randn(2, 4, 3)
        q = type("Q", (), {"loss": torch.tensor(0.3 * t)})()
        records.append(Iteration(t, prediction, None, None, q))
        expected += weights[t] * (prediction - targets).square().mean() + 0.3 * t * 0.5
    model = type("Model", (), {"config": type("Config", (), {"base": "vae", "rollout_iters": 2})()})()
    loss, stats = train_stage1.stage1_loss(model, records, targets, weights, 0.0, 1.0, 0.5)
    torch.testing.assert_close(loss, torch.as_tensor(expected))
    torch.testing.assert_close(stats[:, 1], torch.stack([(r.logits - targets).abs().mean() for r in records]))


def test_the_cpu_recipe_over_a_vae_weights_the_mse_by_how_far_it_falls(tmp_path, vae_ckpt):
    """train_stage1.py --base vae gets the VAE's iteration weights by default; a flag given wins; at the
    paper's size both bases keep the official weights."""
    def weights(*flags):
        train, cfg = train_stage1.parse_args(list(flags) + ["--vqgan-ckpt", str(vae_ckpt)])
        return train_stage1.iteration_weights(train.iteration_weights, cfg.rollout_iters)
    assert weights("--base", "vae") == [1.0, 1.6, 2.4, 3.2, 4.8, 6.4, 8.6, 10.8]
    assert weights("--base", "vae", "--iteration-weights", "1,1,1,1,1.25,1.5,2,2.5")[-1] == 2.5
    official = train_stage1.iteration_weights(train_stage1.OFFICIAL_ITERATION_WEIGHTS, 8)
    assert weights("--base", "vae", "--preset", "small", "--vae-official", str(vae_ckpt)) == official


def test_stage1_over_a_vae_and_the_wrong_base_refused(vae_stage1_ckpt, vqgan_ckpt, vae_ckpt):
    model = ALIT.from_checkpoint(vae_stage1_ckpt)
    assert model.config.base == "vae" and model.vae.config == VAE.from_checkpoint(vae_ckpt).config
    assert not model.config.official_vae_function
    with pytest.raises(SystemExit, match="--vqgan-ckpt: .*base vae"):
        train_stage1.main(SMALL_ALIT + ["--base", "vae", "--vqgan-ckpt", str(vqgan_ckpt), "--steps", "1"])
    with pytest.raises(SystemExit, match="--vqgan-official"):
        train_stage1.parse_args(["--base", "vae", "--vqgan-official", str(vqgan_ckpt)])
    with pytest.raises(SystemExit, match="--vae-official needs --base vae"):
        train_stage1.parse_args(["--vae-official", str(vae_ckpt)])


def test_stage2_fine_tunes_the_vae_too(vae_stage1_ckpt, tmp_path):
    model = train_stage2.main(["--stage1-ckpt", str(vae_stage1_ckpt), "--steps", "2", "--batch-size", "2",
                               "--log-every", "1", "--no-bf16", "--out-dir", str(tmp_path / "s2")])
    before = ALIT.from_checkpoint(vae_stage1_ckpt, ema=False)
    assert model.config.base == "vae"
    changed = [name for name, p in model.vae.named_parameters() if not torch.equal(p, before.vae.state_dict()[name])]
    assert any(name.startswith("decoder.") for name in changed) and any(name.startswith("encoder.") for name in changed)
    assert ALIT.from_checkpoint(tmp_path / "s2" / "ckpt.pt").config.base == "vae"


def test_evaluate_reads_the_base_from_the_checkpoint(vae_stage1_ckpt, tmp_path):
    results = evaluate.main(["--ckpt", str(vae_stage1_ckpt), "--compare", str(vae_stage1_ckpt), "--num-images", "12",
                             "--batch-size", "6", "--speed-images", "6", "--out-dir", str(tmp_path)])
    assert results["vqgan"]["base"] == "vae" and results["vqgan"]["l1"] > 0
    assert all("code_mse" in row for row in results["per_token_count"])
    assert all(row["criterion"].startswith("code_mse<") for row in results["adaptive_token_accuracy"])
    assert results["early_exit"]["same_counts_as_exhaustive"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["vqgan"]["base"] == "vae"


def test_an_official_vae_checkpoint_through_evaluate(tmp_path):
    """A file in the official layout (the ema entry with its gan_losses), written from the reference vectors."""
    vectors = load_vectors("alit_vae_official", "tiny")
    path = tmp_path / "alit_small_vae_quantized_latents.pth"
    torch.save({"ema": {**vectors["state_dict"], "gan_losses.0.discriminator.main.0.weight": torch.zeros(1)},
                "model": {}}, path)
    results = evaluate.main(["--official", str(path), "--heads", "4", "--num-images", "6", "--batch-size", "6",
                             "--speed-images", "3", "--out-dir", str(tmp_path / "eval")])
    assert results["checkpoint"] == str(path) and results["vqgan"]["base"] == "vae"
    model = ALIT.from_official(path, heads=4)
    assert model.config.official_vae_function and model.config.grid_size == 16


def test_analyze_runs_over_a_vae(tmp_path):
    import analyze
    from model import make_config
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", base="vae", rollout_iters=4))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": {}}, ckpt)
    results = analyze.main(["--ckpt", str(ckpt), "--num-images", "10", "--batch-size", "5", "--attention-images", "1",
                            "--classifier-images", "32", "--classifier-steps", "2", "--probe-images", "20",
                            "--familiarity-images", "6", "--out-dir", str(tmp_path / "analyze"),
                            "--l1-thresholds", "0.1,0.2"])
    assert [r["threshold"] for r in results["selection"]["L1 < threshold"]] == [0.1, 0.2]
