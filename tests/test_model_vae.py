"""ALIT over the VAE base: the official adaptive_vae.py against the reference vectors, its two
departures from its intent (config.official_vae_function), the paper's halting, shapes, gradients."""
import pytest
import torch

from model import ALIT, make_config
from seeded import load_vectors


def official_tiny():
    vectors = load_vectors("alit_vae_official", "tiny")
    state = {**vectors["state_dict"], "gan_losses.0.discriminator.main.0.weight": torch.zeros(1)}  # dropped
    model = ALIT.from_official({"ema": state}, heads=vectors["config"]["encoder_num_heads"]).eval()
    return model, vectors


def test_from_official_tiny_matches_reference():
    model, vectors = official_tiny()
    cfg, ref = model.config, vectors["config"]
    assert cfg.base == "vae" and cfg.official_vae_function and not hasattr(model, "vqgan")
    assert (cfg.vae.latent_channels, cfg.vae.channel_mult, cfg.vae.scale) == (
        ref["vae"]["embed_dim"], tuple(ref["vae"]["ch_mult"]), ref["latent_scale"])
    assert (cfg.grid_size, cfg.tokens_per_iter, cfg.rollout_iters, cfg.halting_code_error) == (
        ref["grid_size"], ref["num_init_latent_tokens"], ref["max_rollout_iters"], ref["dynamic_halting_threshold"])
    images, noise, out = vectors["inputs"]["images"], vectors["inputs"]["posterior_noise"], vectors["outputs"]
    B, N = len(images), cfg.num_image_tokens
    with torch.no_grad():
        posterior = model.vae.posterior(images)
        tokens, targets = model.vae.encode(images, noise=noise)  # the official code samples the posterior
        first_input = torch.cat([model.image_tokens(images, tokens), model.new_latent_tokens(0, B)], 1)
        queries = torch.cat([model.mask_class_token.expand(B, 1, -1), model.mask_token.expand(B, N, -1)], 1)
        # adaptive_vae.yaml halts (in eval mode too); its halting never masks, so on or off is the same
        records = model(images, tokens, targets, halting=True, reconstruct=True)
        plain = model(images, tokens, reconstruct=True)
    torch.testing.assert_close(posterior.mean, out["posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, out["posterior_logvar"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens, out["vae_tokens"], atol=1e-4, rtol=0)
    torch.testing.assert_close(first_input, out["encoder_input"], atol=1e-4, rtol=0)
    torch.testing.assert_close(queries + model.mask_positions, out["decoder_mask_tokens"], atol=1e-4, rtol=0)
    for t, (record, same) in enumerate(zip(records, plain)):
        assert torch.equal(record.indices, out["latent_indices"][t])
        torch.testing.assert_close(record.latents, out["latent_quantized"][t], atol=1e-4, rtol=0)
        torch.testing.assert_close(record.prediction, out["decoded_code"][t], atol=1e-4, rtol=0)
        torch.testing.assert_close(record.recon, out["reconstructions"][t], atol=1e-4, rtol=0)
        assert torch.equal(same.recon, record.recon)
        assert t == cfg.rollout_iters - 1 or not record.halted.any()


def test_the_paper_method_differs_where_the_diagnostics_say():
    """Flag off: the tokens are divided by 0.2325 before decoding, and halting masks cells."""
    model, vectors = official_tiny()
    diagnostics, out = vectors["diagnostics"], vectors["outputs"]
    model.config.official_vae_function = False
    images, noise = vectors["inputs"]["images"], vectors["inputs"]["posterior_noise"]
    with torch.no_grad():
        tokens, targets = model.vae.encode(images, noise=noise)
        records = model(images, tokens, reconstruct=True)
    for t, record in enumerate(records):  # the codes are the official ones; only decoding changes
        torch.testing.assert_close(record.prediction, out["decoded_code"][t], atol=1e-4, rtol=0)
    largest = max((r.recon - o).abs().max().item() for r, o in zip(records, out["reconstructions"]))
    assert largest == pytest.approx(diagnostics["recon_max_abs_diff_if_divided_by_0.2325"], abs=1e-3)
    # Halting as adaptive_vae.py means it: with a threshold above every cell's error all cells halt.
    assert diagnostics["halting_cell_error_min"] > model.config.halting_code_error
    model.config.halting_code_error = 1e9
    with torch.no_grad():
        halting = model(images, tokens, targets, halting=True)
    assert [r.halted.sum().item() for r in halting[:-1]] == diagnostics["halting_intended_cells_masked_threshold_1e9"]
    changed = (halting[-1].indices != out["latent_indices"][-1]).sum().item()
    assert changed == diagnostics["halting_intended_last_indices_changed"]


def test_vae_base_shapes_halting_and_gradients():
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", base="vae", halting_code_error=0.5))
    cfg = model.config
    assert not hasattr(model, "vqgan") and model.base is model.vae and model.head[-1].out_features == 8
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    model.eval()
    with torch.no_grad():
        records = model.rollout(images)
        tokens = model.base_tokens(images)
    torch.testing.assert_close(tokens, model.vae.encode(images, sample=False)[0])  # eval: the posterior mean
    for t, r in enumerate(records):
        assert r.prediction.shape == (2, cfg.num_image_tokens, cfg.vae.latent_channels)
        assert r.recon.shape == images.shape
        prediction, recon = model.decode(r.indices)
        torch.testing.assert_close(prediction, r.prediction, atol=1e-5, rtol=0)
        torch.testing.assert_close(recon, r.recon, atol=1e-5, rtol=0)
    # Halting's test: mean absolute code error below the threshold, no draw.
    targets = model.base_targets(tokens)
    x = torch.randn(2, 1 + cfg.num_image_tokens + 8, cfg.encoder_width)
    prediction = targets + torch.where(torch.arange(cfg.num_image_tokens)[:, None] % 2 == 0, 0.1, 1.0)
    _, halted = model.halt(x, prediction, targets)
    assert torch.equal(halted, (torch.arange(cfg.num_image_tokens) % 2 == 0).expand(2, -1))
    # Training: the VAE samples its posterior; gradients reach ALIT, not the frozen VAE.
    model.train()
    model.vae.requires_grad_(False)
    tokens = model.base_tokens(images)
    assert not torch.equal(tokens, model.vae.encode(images, sample=False)[0])
    records = model(images, tokens, model.base_targets(tokens), halting=True)
    sum((r.prediction - model.base_targets(tokens)).square().mean() + r.quantized.loss for r in records).backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is not None for p in model.alit_parameters() if p is not model.halted_token)
    assert len(model.alit_parameters()) + len(list(model.vae.parameters())) == len(list(model.parameters()))


def test_config_names_the_base():
    cfg = make_config("tiny", base="vae")
    assert cfg.to_dict()["base"] == "vae" and cfg.base_config is cfg.vae
    from model import ALITConfig
    assert ALITConfig(**cfg.to_dict()).vae == cfg.vae
    with pytest.raises(ValueError, match="base"):
        make_config("tiny", base="vit")
    with pytest.raises(ValueError, match="VAE"):
        make_config("tiny", base="vae", patch_size=8)


def test_early_exit_with_the_code_error_criterion_equals_the_exhaustive_search():
    from selection import code_error_below, first_passing
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", base="vae")).eval()
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        tokens = model.base_tokens(images)
        targets = model.base_targets(tokens)
        records = model(images, tokens, reconstruct=True)
    errors = torch.stack([(r.prediction - targets).square().mean(dim=(1, 2)) for r in records])  # (T, B)
    threshold = errors.median().item()  # some images stop early, some do not
    criterion = code_error_below(threshold)
    assert torch.equal(criterion(targets, records[0].prediction), errors[0] < threshold)
    chosen = first_passing(errors < threshold)
    assert 0 < chosen.min() or chosen.max() < model.config.rollout_iters - 1
    choices = model.encode_adaptive(images, criterion, token_space=True)
    for i, choice in enumerate(choices):
        t = chosen[i].item()
        assert choice.num_tokens == (t + 1) * model.config.tokens_per_iter
        assert torch.equal(choice.indices, records[t].indices[i])
        torch.testing.assert_close(choice.recon, records[t].recon[i], atol=1e-5, rtol=0)


def test_the_continuous_vae_checkpoint_layout_loads():
    """alit_small_vae_continuous_latents.pth: no latent codebook; the decoder reads the factorized latents."""
    vectors = load_vectors("alit_vae_official", "tiny")
    state = {k: v for k, v in vectors["state_dict"].items() if not k.startswith("quantize.")}
    model = ALIT.from_official(state, heads=4).eval()
    assert model.quantize is None and model.config.base == "vae" and model.config.official_vae_function
    with torch.no_grad():
        records = model(vectors["inputs"]["images"], reconstruct=True)
    assert records[-1].indices is None and records[-1].prediction.shape == (2, 256, 16)
