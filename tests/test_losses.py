"""losses.py: LPIPS loading and formula, the PatchGAN, and the VQGAN GAN-loss pieces."""
import re

import pytest
import torch
import torch.nn.functional as F

from losses import (LPIPS, VGG16_BLOCK_WIDTHS, VGG16_CONV_INDICES, PatchDiscriminator, adaptive_gan_weight,
                    gan_weight_at, generator_adversarial_loss, hinge_d_loss)
from seeded import DATA, read_keys_tsv, seeded_state_dict

# torchvision vgg16-397923af.pth: the conv stack at its real shapes. Its classifier
# (124M values) is kept at toy shapes: the loader drops classifier.* by name.
VGG16_ROWS = [(f"features.{index}.{param}", shape, "float32")
              for (index, c_in, c_out) in zip(
                  [i for block in VGG16_CONV_INDICES for i in block],
                  [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512],
                  [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512])
              for param, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,)))]
CLASSIFIER_ROWS = [(f"classifier.{i}.{param}", shape, "float32") for i in (0, 3, 6)
                   for param, shape in (("weight", (4, 8)), ("bias", (4,)))]
# lpips weights/v0.1/vgg.pth
HEAD_ROWS = [(f"lin{b}.model.1.weight", (1, width, 1, 1), "float32") for b, width in enumerate(VGG16_BLOCK_WIDTHS)]
ALIT_PREFIX = "gan_losses.0."


def alit_rows(part):
    """Real key layout of the official ALIT checkpoint's gan_losses.0.<part>.*, prefix stripped."""
    prefix = ALIT_PREFIX + part + "."
    return [(key[len(prefix):], shape, dtype)
            for key, shape, dtype in read_keys_tsv(DATA / "alit_official" / "keys.tsv") if key.startswith(prefix)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    vgg = seeded_state_dict(VGG16_ROWS + CLASSIFIER_ROWS, seed=7)
    # Real LPIPS heads are non-negative (its training clamps them), so a distance is >= 0.
    head = {key: value.abs() for key, value in seeded_state_dict(HEAD_ROWS, seed=8).items()}
    paths = {"vgg": folder / "vgg16-397923af.pth", "head": folder / "vgg.pth"}
    torch.save(vgg, paths["vgg"])
    torch.save(head, paths["head"])
    return vgg, head, paths


@pytest.fixture(scope="module")
def lpips(weights):
    return LPIPS.from_pretrained(weights[2]["vgg"], weights[2]["head"])


def images(seed, n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_lpips_is_a_distance(lpips):
    x, y = images(0), images(1)
    distance = lpips(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    assert lpips(x, x).abs().max() < 1e-6
    torch.testing.assert_close(lpips(y, x), distance)


def test_lpips_is_frozen_but_passes_gradients(lpips):
    x = images(0).requires_grad_()
    lpips(x, images(1)).sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert not lpips.training
    assert not any(p.requires_grad or p.grad is not None for p in lpips.parameters())


def test_lpips_formula_by_hand(weights, lpips):
    """Recompute LPIPS from the raw torchvision / lpips tensors with explicit ops."""
    vgg, head, _ = weights
    x, y = images(2, n=1), images(3, n=1)
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    expected = torch.zeros(1)
    fx, fy = (2 * x - 1 - shift) / scale, (2 * y - 1 - shift) / scale
    for block, conv_indices in enumerate(VGG16_CONV_INDICES):
        if block > 0:
            fx, fy = F.max_pool2d(fx, 2, 2), F.max_pool2d(fy, 2, 2)
        for i in conv_indices:
            w, b = vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]
            fx, fy = F.conv2d(fx, w, b, padding=1).relu(), F.conv2d(fy, w, b, padding=1).relu()
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        per_pixel = ((nx - ny) ** 2 * head[f"lin{block}.model.1.weight"]).sum(1)  # (1, h, w)
        expected += per_pixel.mean()
    torch.testing.assert_close(lpips(x, y), expected, rtol=1e-5, atol=1e-7)


def test_lpips_combined_layout_matches_two_files(weights, lpips, tmp_path):
    """The taming / lpips-module layout, with the keys the official ALIT checkpoint holds."""
    rows = alit_rows("perceptual_loss")
    vgg, head, _ = weights
    combined = {f"net.slice{b + 1}.{i}.{p}": vgg[f"features.{i}.{p}"]
                for b, indices in enumerate(VGG16_CONV_INDICES) for i in indices for p in ("weight", "bias")}
    combined.update(head)
    combined["scaling_layer.shift"] = combined["scaling_layer.scale"] = torch.full((1, 3, 1, 1), 9.0)  # ignored
    assert combined.keys() == {key for key, _, _ in rows}
    combined.update({f"lins.{b}.model.1.weight": head[f"lin{b}.model.1.weight"] for b in range(5)})  # lpips alias
    torch.save(combined, tmp_path / "vgg_lpips_full.pth")
    from_combined = LPIPS.from_pretrained(tmp_path / "vgg_lpips_full.pth")
    x, y = images(4), images(5)
    assert torch.equal(from_combined(x, y), lpips(x, y))


@pytest.mark.parametrize("which, key, change", [
    ("vgg", "features.28.bias", "drop"),
    ("vgg", "features.10.weight", "reshape"),
    ("head", "lin2.model.1.weight", "reshape"),
    ("head", "lin9.model.1.weight", "add"),
])
def test_lpips_bad_file_names_file_and_key(weights, tmp_path, which, key, change):
    state = dict(weights[0] if which == "vgg" else weights[1])
    if change == "drop":
        del state[key]
    elif change == "reshape":
        state[key] = state[key][:, :-1]
    else:
        state[key] = torch.zeros(1, 64, 1, 1)
    path = tmp_path / f"broken_{which}.pth"
    torch.save(state, path)
    files = {**weights[2], which: path}
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{re.escape(key)}"):
        LPIPS.from_pretrained(files["vgg"], files["head"])


def test_discriminator_patch_grid_init_and_taming_layout():
    disc = PatchDiscriminator(base_channels=8)
    assert disc(images(0, size=32)).shape == (2, 1, 2, 2)
    assert disc(images(0, size=64)).shape == (2, 1, 6, 6)
    full = PatchDiscriminator()
    conv_weights = torch.cat([m.weight.flatten() for m in full.modules() if isinstance(m, torch.nn.Conv2d)])
    bn_gains = torch.cat([m.weight for m in full.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(conv_weights.std() - 0.02) < 1e-3 and abs(bn_gains.mean() - 1) < 5e-3
    full.load_state_dict(seeded_state_dict(alit_rows("discriminator"), seed=3))  # strict: official keys, shapes


def test_hinge_losses():
    ones = torch.ones(2, 1, 3, 3)
    assert hinge_d_loss(1.5 * ones, -2 * ones) == 0
    assert hinge_d_loss(0 * ones, 0 * ones) == 1.0
    assert hinge_d_loss(0.5 * ones, -2 * ones) > 0 and hinge_d_loss(2 * ones, 0.5 * ones) > 0
    assert generator_adversarial_loss(-ones) > generator_adversarial_loss(0 * ones) > generator_adversarial_loss(ones)


def test_discriminator_learns_to_separate_one_batch():
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, num_layers=2)
    optimizer = torch.optim.Adam(disc.parameters(), lr=2e-3)
    real, fake = images(0, n=4).mul(0.2).add(0.4), images(1, n=4)
    losses = []
    for _ in range(10):
        loss = hinge_d_loss(disc(real), disc(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    decoder = torch.nn.Linear(4, 3, bias=False)  # the "last layer" G_L
    z, target, d = torch.randn(5, 4), torch.randn(5, 3), torch.randn(3)
    out = decoder(z)
    nll = (out - target).abs().mean()
    g_loss = -(out @ d).mean()  # a linear "discriminator"
    weight = adaptive_gan_weight(nll, g_loss, decoder.weight)
    # d nll / dW = sign(out - target)^T z / numel,  d g_loss / dW = -(d outer sum_n z_n) / N
    nll_grad = torch.sign(out - target).detach().T @ z / out.numel()
    g_grad = -torch.outer(d, z.sum(0)) / z.shape[0]
    torch.testing.assert_close(weight, nll_grad.norm() / (g_grad.norm() + 1e-4))
    assert not weight.requires_grad
    assert adaptive_gan_weight(nll, 0 * g_loss, decoder.weight, max_weight=7.0) == 7.0
    (nll + weight * g_loss).backward()  # the graph survived both calls


def test_the_gan_joins_at_its_first_step():  # train_vqgan's --disc-start: taming's adopt_weight
    assert gan_weight_at(4, [(5, 0.8)]) == 0.0
    assert gan_weight_at(5, [(5, 0.8)]) == 0.8
