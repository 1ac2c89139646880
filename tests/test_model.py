"""ALIT: the official loader against the reference vectors, shapes, halting, gradients, decoding."""
import pytest
import torch

from model import ALIT, PRESETS, make_config
from seeded import DATA, load_vectors, read_keys_tsv, seeded_state_dict


def tiny_model(**overrides):
    torch.manual_seed(0)
    return ALIT(make_config("tiny", **overrides))


def test_from_official_tiny_matches_reference():
    vectors = load_vectors("alit_official", "tiny")
    ref = vectors["config"]
    model = ALIT.from_official({"ema": vectors["state_dict"], "model": {}}, heads=ref["encoder_num_heads"]).eval()
    cfg = model.config
    assert (cfg.encoder_width, cfg.encoder_layers, cfg.tokens_per_iter, cfg.rollout_iters) == (
        ref["encoder_width"], ref["encoder_num_layers"], ref["num_init_latent_tokens"], ref["max_rollout_iters"])
    images, out = vectors["inputs"]["images"], vectors["outputs"]
    with torch.no_grad():
        latents = model.vqgan.encoder(images)
        first_input = torch.cat([model.image_tokens(images, latents), model.new_latent_tokens(0, len(images))], 1)
        records = model.rollout(images)
    torch.testing.assert_close(latents, out["vqgan_z"], atol=1e-4, rtol=0)
    torch.testing.assert_close(first_input, out["encoder_input"], atol=1e-4, rtol=0)
    assert len(records) == ref["max_rollout_iters"]
    for t, record in enumerate(records):
        assert torch.equal(record.indices, out["latent_indices"][t])
        torch.testing.assert_close(record.latents, out["latent_quantized"][t], atol=1e-4, rtol=0)
        torch.testing.assert_close(record.prediction, out["logits"][t], atol=1e-4, rtol=0)
        torch.testing.assert_close(record.recon, out["reconstructions"][t], atol=1e-4, rtol=0)


def test_from_official_full_small_matches_reference():
    """The real alit_small size (about 35 s on 2 cores; reading the file: tests/test_front_door.py)."""
    vectors = load_vectors("alit_official", "full")
    rows = [r for r in read_keys_tsv(DATA / "alit_official" / "keys.tsv") if not r[0].startswith("gan_losses.")]
    state = seeded_state_dict(rows, vectors["seed"])
    state["gan_losses.0.discriminator.main.0.weight"] = torch.zeros(1)  # training-only extras are dropped
    model = ALIT.from_official({"ema": state}).eval()
    del state
    assert model.config.to_dict() == make_config("small").to_dict()
    out = vectors["outputs"]
    images = vectors["inputs"]["images_uint8"].float() / 255
    with torch.no_grad():
        latents = model.vqgan.encoder(images)
        _, gt = model.vqgan.encode(images)
        first_rows = model.image_tokens(images, latents)[:, :8]
        records = model.rollout(images)
    torch.testing.assert_close(latents, out["vqgan_z"], atol=1e-4, rtol=0)
    assert torch.equal(gt, out["gt_indices"])
    torch.testing.assert_close(first_rows, out["encoder_input_first_rows"], atol=1e-4, rtol=0)
    pool = torch.nn.functional.avg_pool2d
    for t, record in enumerate(records):
        mismatch = record.indices != out["latent_indices"][t]
        if mismatch.any():  # README: accept index flips where the margin is below 1e-4, skip that iteration
            assert (out["latent_index_margins"][t][mismatch] < 1e-4).all()
            continue
        torch.testing.assert_close(record.prediction[:, :16], out["logits_first16"][t], atol=1e-4, rtol=0)
        torch.testing.assert_close(record.prediction.logsumexp(-1), out["logits_logsumexp"][t], atol=1e-4, rtol=0)
        torch.testing.assert_close(pool(record.recon, 8), out["reconstructions_pooled8"][t], atol=2e-4, rtol=0)
    torch.testing.assert_close(records[0].recon, out["reconstruction_first"], atol=2e-4, rtol=0)


def test_presets_and_bad_config():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.max_tokens <= cfg.decoder_latent_positions
        assert cfg.patch_size == cfg.vqgan.downsample and cfg.grid_size == cfg.vqgan.grid_size
    tiny = make_config("tiny")
    assert tiny.tokens_per_iter * 8 == tiny.num_image_tokens and tiny.rollout_iters == 8
    with pytest.raises(ValueError, match="patch_size"):
        make_config("tiny", patch_size=2)
    with pytest.raises(ValueError, match="unknown ALIT preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="decoder_latent_positions"):
        make_config("tiny", rollout_iters=9)


def test_rollout_shapes_and_iteration_subset():
    model = tiny_model().eval()
    cfg = model.config
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        records = model.rollout(images)
    assert len(records) == cfg.rollout_iters
    for t, r in enumerate(records):
        assert r.indices.shape == (2, (t + 1) * cfg.tokens_per_iter) and r.indices.dtype == torch.int64
        assert r.prediction.shape == (2, cfg.num_image_tokens, cfg.vqgan.codebook_size)
        assert r.recon.shape == images.shape
    with torch.no_grad():
        subset = model(images, iters=[1, 4])
    assert [r.index for r in subset] == [1, 4]
    torch.testing.assert_close(subset[1].prediction, records[4].prediction, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="iters"):
        model(images, iters=[8])


def test_decode_any_multiple_of_k():
    model = tiny_model().eval()
    cfg = model.config
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        records = model.rollout(images)
    all_lengths = model.encode(images)
    for t in (0, 3, 7):
        assert torch.equal(all_lengths[t], records[t].indices)
        logits, recon = model.decode(records[t].indices)
        torch.testing.assert_close(logits, records[t].prediction, atol=1e-5, rtol=0)
        assert logits.argmax(-1).shape == (2, cfg.num_image_tokens)  # the predicted VQGAN indices
        torch.testing.assert_close(recon, records[t].recon, atol=1e-5, rtol=0)
    for bad in (0, 5, cfg.max_tokens + cfg.tokens_per_iter):
        with pytest.raises(ValueError, match="multiple"):
            model.decode(torch.zeros(1, bad, dtype=torch.long))


def test_halting_masks_only_confident_tokens_and_is_seeded():
    model = tiny_model(halting_threshold=0.3).eval()
    cfg = model.config
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    latents, gt = model.vqgan.encode(images)
    # Make the decoder confident on a known half of the grid through the logits passed to halt().
    logits = torch.full((2, cfg.num_image_tokens, cfg.vqgan.codebook_size), -10.0)
    confident = torch.zeros(2, cfg.num_image_tokens, dtype=torch.bool)
    confident[:, ::2] = True
    logits.scatter_(2, gt[..., None], torch.where(confident, 10.0, -10.0)[..., None])
    x = torch.randn(2, 1 + cfg.num_image_tokens + 8, cfg.encoder_width)
    halted_x, halted = model.halt(x, logits, gt, torch.Generator().manual_seed(0))
    assert not (halted & ~confident).any()  # p below threshold never halts
    assert halted[confident].float().mean() > 0.9  # p ~ 1 halts almost surely
    changed = (halted_x != x).any(-1)
    assert torch.equal(changed[:, 1:1 + cfg.num_image_tokens], halted)
    assert not changed[:, 0].any() and not changed[:, 1 + cfg.num_image_tokens:].any()
    expected = (model.halted_token[0] + model.image_positions[1:])[halted.nonzero()[:, 1]]
    torch.testing.assert_close(halted_x[:, 1:1 + cfg.num_image_tokens][halted], expected)
    # In a real rollout: seeded runs repeat, and halting off equals the plain path.
    with torch.no_grad():
        a = model.rollout(images, halting=True, generator=torch.Generator().manual_seed(1))
        b = model.rollout(images, halting=True, generator=torch.Generator().manual_seed(1))
        plain, off = model(images), model(images, halting=False)
    for ra, rb in zip(a, b):
        assert torch.equal(ra.prediction, rb.prediction)
    for rp, ro in zip(plain, off):
        assert torch.equal(rp.prediction, ro.prediction) and ro.halted is None


def rollout_loss_backward(model):
    cfg = model.config
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents, gt = model.vqgan.encode(images)
    records = model(images, latents, gt, halting=True, generator=torch.Generator().manual_seed(0))
    loss = sum(torch.nn.functional.cross_entropy(r.prediction.flatten(0, 1), gt.flatten()) + r.quantized.loss
               for r in records)
    loss.backward()
    return records


@pytest.mark.parametrize("threshold", [0.55, 0.001])
def test_gradients_reach_alit_not_frozen_vqgan(threshold):
    model = tiny_model(halting_threshold=threshold, zero_init_encoder_residuals=False)
    model.vqgan.requires_grad_(False)
    records = rollout_loss_backward(model)
    halted_any = any(r.halted.any() for r in records[:-1])
    for name, p in model.named_parameters():
        if name == "halted_token" and not halted_any:
            assert p.grad is None or p.grad.abs().sum() == 0  # used only where a token halted
        elif name.startswith("vqgan."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_init_encoder_starts_as_identity_then_every_weight_learns():
    model = tiny_model()
    assert model.config.zero_init_encoder_residuals  # the tiny preset's choice
    model.vqgan.requires_grad_(False)
    x = torch.randn(2, 5, model.config.encoder_width)
    assert torch.equal(model.encoder(x), x)  # every pass starts as the identity
    rollout_loss_backward(model)
    for name, p in model.encoder.named_parameters():
        learns_first = name.endswith(("attn.proj.weight", "attn.proj.bias", "c_proj.weight", "c_proj.bias"))
        assert (p.grad.abs().sum() > 0) == learns_first, name  # behind a zero projection: no gradient yet
    torch.optim.SGD(model.alit_parameters(), lr=0.1).step()
    model.zero_grad()
    rollout_loss_backward(model)
    for name, p in model.encoder.named_parameters():
        assert p.grad.abs().sum() > 0, name


def test_continuous_latents_and_official_unquantized_layout():
    model = tiny_model(quantize_latent=False)
    assert model.quantize is None
    images = torch.rand(1, 3, 32, 32)
    records = model(images)
    assert records[0].indices is None and records[0].latents.shape == (1, 8, 12)
    with pytest.raises(ValueError, match="continuous"):
        model.encode(images)
    # A continuous official checkpoint has no quantize.embedding: from_official reads that off.
    vectors = load_vectors("alit_official", "tiny")
    state = {k: v for k, v in vectors["state_dict"].items() if not k.startswith("quantize.")}
    loaded = ALIT.from_official(state, heads=4)
    assert loaded.quantize is None and not loaded.config.quantize_latent


def test_from_official_errors(tmp_path):
    state = dict(load_vectors("alit_official", "tiny")["state_dict"])
    with pytest.raises(ValueError, match="heads"):
        ALIT.from_official(state)
    broken = {k: v for k, v in state.items() if k != "decoder.ffn.0.bias"}
    with pytest.raises(KeyError, match="head.0.bias"):
        ALIT.from_official(broken, heads=4)
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ALIT.from_official(path)


def test_grad_checkpointing_and_compile_give_the_same_loss_and_gradients():
    import losses
    images = torch.rand(2, 3, 32, 32)
    weights = losses.iteration_weights(losses.OFFICIAL_ITERATION_WEIGHTS, 8)
    import shutil
    results = []
    # torch.compile's CPU backend generates C++: without a compiler only the other two are compared
    variants = ["eager", "grad_checkpoint"] + (["compile"] if shutil.which("g++") or shutil.which("c++") else [])
    for variant in variants:
        model = tiny_model(encoder_width=64, decoder_width=64, encoder_layers=1, decoder_layers=1)
        model.set_grad_checkpointing(variant == "grad_checkpoint")
        model.vqgan.requires_grad_(False)
        if variant == "compile":
            model.compile_transformers()
        with torch.no_grad():
            latents, gt = model.vqgan.encode(images)
        records = model(images, latents, gt, halting=True, generator=torch.Generator().manual_seed(0))
        loss, _ = losses.stage1_terms(model, records, gt, iteration_weights=weights)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), *others = results
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss, atol=1e-5, rtol=1e-5)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
