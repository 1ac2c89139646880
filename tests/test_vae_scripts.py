"""The scripts over the VAE base: train_vqgan.py --base vae, stage 1's mean-square loss, stage 2 and
evaluate.py reading the base from the checkpoint, an official VAE checkpoint through evaluate.py --official."""
import json

import pytest
import torch

import evaluate
import train_stage1
import train_stage2
import train_vqgan
import distributed
from conftest import SMALL_ALIT, SMALL_VAE
from losses import iteration_weights, OFFICIAL_ITERATION_WEIGHTS, reconstruction_loss, stage1_terms
from model import ALIT, Iteration, make_config
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


def test_the_kl_term_has_ldms_weight_on_the_mean_losses(monkeypatch, tmp_path):
    """train_vqgan.py --base vae's loss = L1 + kl_weight * KL summed over the latent grid / pixels per image."""
    seen = {}
    backward, latent_loss = torch.Tensor.backward, VAE.latent_loss

    def recorded_latent_loss(model, posterior, images, weight):
        seen.update(posterior=posterior, images=images, weight=weight)
        seen["kl"], seen["logs"] = latent_loss(model, posterior, images, weight)
        return seen["kl"], seen["logs"]

    def recorded_reconstruction_loss(recon, images, *args):
        seen["l1"] = (recon - images).abs().mean()
        return reconstruction_loss(recon, images, *args)

    monkeypatch.setattr(torch.Tensor, "backward", lambda loss, *a, **k: (seen.setdefault("loss", loss.item()),
                                                                          backward(loss, *a, **k)))
    monkeypatch.setattr(VAE, "latent_loss", recorded_latent_loss)
    monkeypatch.setattr(train_vqgan, "reconstruction_loss", recorded_reconstruction_loss)
    monkeypatch.setattr(distributed, "average_over_ranks", lambda tensors: seen.setdefault("logged", tensors))
    train_vqgan.main(SMALL_VAE + ["--kl-weight", "10", "--steps", "1", "--val-images", "2",
                                  "--out-dir", str(tmp_path / "vae")])
    kl = 10 * seen["posterior"].kl().mean() / (3 * 32 * 32)
    assert seen["weight"] == 10 and kl > 0.01  # a visible part of the loss at this weight
    torch.testing.assert_close(seen["kl"], kl)
    assert seen["loss"] == pytest.approx((seen["l1"] + kl).item(), rel=1e-6)
    (logs,) = seen["logged"]  # [reconstruction, KL term, posterior std, token std, discriminator]
    assert logs[1].item() == pytest.approx(kl.item(), rel=1e-6) and list(seen["logs"]) == ["kl", "std", "tokens"]


def test_stage1_loss_is_the_weighted_mse_of_the_predicted_tokens():
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", base="vae"))
    N, C = model.config.num_image_tokens, model.config.vae.latent_channels
    targets = torch.randn(2, N, C)
    weights = [2.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    records, expected = [], 0.0
    for t in range(2):
        prediction = targets + 0.1 * (t + 1) * torch.randn(2, N, C)
        q = type("Q", (), {"loss": torch.tensor(0.3 * t)})()
        records.append(Iteration(t, prediction, None, None, q))
        expected += weights[t] * (prediction - targets).square().mean() + 0.3 * t * 0.5
    # the VQGAN's label smoothing and code weight do not apply
    loss, stats = stage1_terms(model, records, targets, iteration_weights=weights, label_smoothing=0.1,
                               code_weight=7.0, quantizer_weight=0.5)
    torch.testing.assert_close(loss, torch.as_tensor(expected))
    torch.testing.assert_close(stats[:2, 1], torch.stack([(r.prediction - targets).abs().mean() for r in records]))


def test_the_cpu_recipe_over_a_vae_weights_the_mse_by_how_far_it_falls(tmp_path, vae_ckpt):
    """train_stage1.py --base vae gets the VAE's iteration weights by default; a flag given wins; at the
    paper's size both bases keep the official weights."""
    def weights(*flags):
        train, cfg = train_stage1.parse_args(list(flags) + ["--vqgan-ckpt", str(vae_ckpt)])
        return iteration_weights(train.iteration_weights, cfg.rollout_iters)
    assert weights("--base", "vae") == [1.0, 1.6, 2.4, 3.2, 4.8, 6.4, 8.6, 10.8]
    assert weights("--base", "vae", "--iteration-weights", "1,1,1,1,1.25,1.5,2,2.5")[-1] == 2.5
    official = iteration_weights(OFFICIAL_ITERATION_WEIGHTS, 8)
    assert weights("--base", "vae", "--preset", "small", "--vae-official", str(vae_ckpt)) == official


def test_stage1_over_a_vae_and_the_wrong_base_refused(vae_stage1_ckpt, vqgan_ckpt, vae_ckpt):
    model = ALIT.from_checkpoint(vae_stage1_ckpt)
    assert model.config.base == "vae" and model.vae.config == VAE.from_checkpoint(vae_ckpt).config
    assert not model.config.official_vae_function
    with pytest.raises(SystemExit, match="--base-ckpt: .*base vae"):
        train_stage1.main(SMALL_ALIT + ["--base", "vae", "--vqgan-ckpt", str(vqgan_ckpt), "--steps", "1"])
    with pytest.raises(SystemExit, match="--vqgan-official is the official VQGAN; with --base vae pass --vae-official"):
        train_stage1.parse_args(["--base", "vae", "--vqgan-official", str(vqgan_ckpt)])
    with pytest.raises(SystemExit, match="--vae-official is the official VAE; with --base vqgan pass --vqgan-official"):
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
                            "--probe-test-images", "20",
                            "--familiarity-images", "6", "--out-dir", str(tmp_path / "analyze"),
                            "--l1-thresholds", "0.1,0.2"])
    assert [r["threshold"] for r in results["selection"]["L1 < threshold"]] == [0.1, 0.2]
