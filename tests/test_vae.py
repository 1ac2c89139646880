"""The VAE: shapes, the posterior, MAR's KL-16 loader against the reference vectors, the VQGAN trunk unchanged."""
import pytest
import torch

from seeded import DATA, load_vectors, read_keys_tsv, seeded_state_dict
from vae import PRESETS, VAE, VAEConfig


def check_against(model, vectors, images, full=False):
    """The reference outputs. The sample is mean + std * noise with std up to 11: channels-last
    convolutions (oneDNN's kernels, the model's default layout) round the logvar to 4e-5 and the
    sample to 1.3e-4 there; in the contiguous layout every output is within 1e-5 of a float64 run."""
    model = model.to(memory_format=torch.contiguous_format)
    out, noise = vectors["outputs"], vectors["inputs"]["noise"]
    scale = vectors["config"]["latent_scale"]
    assert model.config.scale == scale
    with torch.no_grad():
        encoder_out = model.encoder(images)
        posterior = model.posterior(images)
        tokens, targets = model.encode(images, noise=noise)
        decoded = model.decode(posterior.mean)
    image_atol = 2e-4 if full else 1e-4  # README: 2e-4 for full-size images
    torch.testing.assert_close(encoder_out, out["encoder_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.mean, out["posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, out["posterior_logvar"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.sample(noise), out["sample"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens, out["tokens"], atol=1e-4, rtol=0)
    assert torch.equal(targets, tokens.flatten(2).transpose(1, 2))
    torch.testing.assert_close(decoded, out["decoded_mean"], atol=image_atol, rtol=0)
    return decoded


def test_from_official_tiny_matches_reference():
    vectors = load_vectors("ldm_vae", "tiny")
    ref = vectors["config"]["vae"]
    # The file's weights are the weight rule's over its own keys: regenerate them, as for the full size.
    state = vectors["state_dict"]
    regenerated = seeded_state_dict([(k, tuple(v.shape), str(v.dtype).split(".")[1]) for k, v in state.items()],
                                    vectors["seed"])
    assert all(torch.equal(regenerated[k], v) for k, v in state.items())
    model = VAE.from_official({"model": state}, image_size=ref["resolution"]).eval()
    cfg = model.config
    assert (cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.latent_channels) == (
        ref["ch"], tuple(ref["ch_mult"]), ref["num_res_blocks"], ref["embed_dim"])
    assert cfg.attn_resolutions == tuple(ref["encoder_attn_resolutions"])
    assert cfg.decoder_attn_resolutions == tuple(ref["decoder_attn_resolutions"])
    check_against(model, vectors, vectors["inputs"]["images"])


def test_from_official_full_matches_reference(tmp_path):
    """MAR's KL-16 at its real size, from a file in its layout (weights under 'model', plus LDM's loss.*)."""
    vectors = load_vectors("ldm_vae", "full")
    state = seeded_state_dict(read_keys_tsv(DATA / "ldm_vae" / "keys.tsv"), vectors["seed"])
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": {**state, "loss.logvar": torch.zeros(())}}, path)
    del state
    model = VAE.from_official(path).eval()
    assert model.config == VAEConfig(**PRESETS["kl16"])
    images = vectors["inputs"]["images_uint8"].float() / 255
    decoded = check_against(model, vectors, images, full=True)
    out = vectors["outputs"]
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(decoded, 8), out["decoded_mean_pooled8"],
                               atol=2e-4, rtol=0)


def test_shapes_posterior_and_gradients():
    torch.manual_seed(0)
    model = VAE(VAEConfig(**PRESETS["tiny"]))
    cfg = model.config
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    tokens, targets = model.encode(images, sample=False)
    g, E = cfg.grid_size, cfg.latent_channels
    assert tokens.shape == (2, E, g, g) and targets.shape == (2, g * g, E)
    torch.testing.assert_close(model.decode_tokens(targets), model.decode_tokens(tokens))
    torch.testing.assert_close(model.decode_tokens(tokens), model.decode(model.posterior(images).mean))
    # Sampling draws around the mean; seeded draws repeat.
    a = model.encode(images, generator=torch.Generator().manual_seed(0))[0]
    b = model.encode(images, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(a, b) and not torch.equal(a, tokens)
    # The KL term: zero exactly at the prior, positive elsewhere; gradients reach the whole model.
    from vae import Posterior
    zeros = torch.zeros(1, E, g, g)
    assert Posterior(zeros, zeros).kl().item() == 0.0
    recon, posterior = model(images)
    assert recon.shape == images.shape and (posterior.kl() > 0).all()
    ((recon - images).abs().mean() + 1e-3 * posterior.kl().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_from_official_rejects_bad_checkpoints(tmp_path):
    state = dict(load_vectors("ldm_vae", "tiny")["state_dict"])
    with pytest.raises(KeyError, match="encoder.extra"):
        VAE.from_official({**state, "encoder.extra": torch.zeros(1)}, image_size=32)
    with pytest.raises(KeyError, match="quant_conv"):
        VAE.from_official({k: v for k, v in state.items() if not k.startswith("quant_conv")}, image_size=32)
    with pytest.raises(FileNotFoundError, match="kl16.ckpt"):
        VAE.from_official(tmp_path / "kl16.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.ckpt"):
        VAE.from_official(tmp_path / "bad.ckpt")
