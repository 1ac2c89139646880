"""The VQGAN: shapes, range, the official loader against the reference vectors, overfitting."""
import pytest
import torch

from seeded import DATA, load_vectors, read_keys_tsv, seeded_state_dict
from vqgan import PRESETS, VQGAN, VQGANConfig


def tiny_vqgan(**overrides):
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**{**PRESETS["tiny"], **overrides}))


def test_shapes_and_round_trip():
    model = tiny_vqgan().eval()
    cfg = model.config
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    latents, indices = model.encode(images)
    assert latents.shape == (2, cfg.latent_channels, cfg.grid_size, cfg.grid_size)
    assert indices.shape == (2, cfg.grid_size ** 2) and indices.dtype == torch.int64
    recon, q = model(images)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert torch.equal(q.indices, indices)
    # indices -> codes -> image equals decoding the quantized latents
    torch.testing.assert_close(model.decode_indices(indices), model.decode(q.codes), atol=1e-5, rtol=0)


def test_attention_option_builds_and_runs():
    model = tiny_vqgan(attn_resolutions=(8,))
    assert any("attn" in k for k in model.state_dict())
    recon, _ = model(torch.rand(1, 3, 32, 32))
    assert recon.shape == (1, 3, 32, 32)


def test_from_official_tiny_matches_reference():
    vectors = load_vectors("official_vqgan", "tiny")
    model = VQGAN.from_official(vectors["state_dict"]).eval()
    ddconfig = vectors["config"]["ddconfig"]
    assert model.config.channel_mult == tuple(ddconfig["ch_mult"])
    assert model.config.num_res_blocks == ddconfig["num_res_blocks"]
    out = vectors["outputs"]
    with torch.no_grad():
        z, indices = model.encode(vectors["inputs"]["images"])
        q = model.quantize_latents(z)
        decoded = model.decode(q.codes)
        from_indices = model.decode_indices(indices)
    torch.testing.assert_close(z, out["z"], atol=1e-4, rtol=0)
    assert torch.equal(indices, out["indices"])
    torch.testing.assert_close(q.codes, out["z_q"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, out["decoded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(from_indices, out["decoded_from_indices"], atol=1e-4, rtol=0)


def test_from_official_full_matches_reference(tmp_path):
    vectors = load_vectors("official_vqgan", "full")
    state = seeded_state_dict(read_keys_tsv(DATA / "official_vqgan" / "keys.tsv"), vectors["seed"])
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": state}, path)  # the official file wraps the weights like this
    model = VQGAN.from_official(path).eval()
    assert model.config == VQGANConfig(**PRESETS["imagenet"])
    out = vectors["outputs"]
    with torch.no_grad():
        z, indices = model.encode(vectors["inputs"]["images_uint8"].float() / 255)
        q = model.quantize_latents(z)
        decoded = model.decode(q.codes)
    torch.testing.assert_close(z, out["z"], atol=1e-4, rtol=0)
    assert torch.equal(indices, out["indices"])
    torch.testing.assert_close(q.codes, out["z_q"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, out["decoded"], atol=2e-4, rtol=0)


def test_from_official_rejects_bad_checkpoints(tmp_path):
    state = dict(load_vectors("official_vqgan", "tiny")["state_dict"])
    extra = dict(state, **{"quant_conv.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="quant_conv"):
        VQGAN.from_official(extra)
    path = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        VQGAN.from_official(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="missing.ckpt"):
        VQGAN.from_official(path)
    with pytest.raises(KeyError, match="conv_in"):
        VQGAN.from_official({"foo": torch.zeros(1)})
