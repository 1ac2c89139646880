"""What trains the models, term by term: each loss against its formula written out here, on tiny
hand-made inputs (the stage-1 loss, the reconstruction and GAN losses of stage 2 and the VQGAN, the
quantizer's codebook and commitment terms, its straight-through gradient and dead-code restarts).

dev/mutate.py checks that these tests notice when a line of the method changes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (adaptive_gan_weight, generator_adversarial_loss, generator_gan_loss,
                    hinge_d_loss, reconstruction_loss)
from model import ALIT, Iteration, make_config
from quantize import Quantized, VectorQuantizer
from losses import stage1_terms


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = ALIT(make_config("tiny"))
    model.vqgan.requires_grad_(False)  # frozen, as in stage 1
    return model


def vqgan_codes(model):
    """The VQGAN's code of every index, (codes, C): unit rows in the tiny preset (l2-normalised codebook)."""
    assert model.vqgan.quantize.l2_normalize
    return F.normalize(model.vqgan.quantize.embedding.weight, dim=-1)


# -----------------------------------------------------------------------------
# Stage 1: Σ_t λ_t CE_t + code MSE_t + quantizer loss_t


def stage1_records(model, seed=0):
    """Two decoded iterations, t = 1 and t = 4 (not 0, 1: each weight must follow its iteration),
    with random logits confident on half of the first image, and quantizer losses 0.3 and 0.7."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    B, N, V = 2, cfg.num_image_tokens, cfg.vqgan.codebook_size
    gt = torch.randint(V, (B, N), generator=g)
    records = []
    for t, q_loss in ((1, 0.3), (4, 0.7)):
        logits = 3 * torch.randn(B, N, V, generator=g)
        logits[0, :N // 2].scatter_(-1, gt[0, :N // 2, None], 30.0)
        q = Quantized(codes=None, indices=None, loss=torch.tensor(q_loss, requires_grad=True), perplexity=None,
                      usage=None)
        latents = torch.zeros(B, (t + 1) * cfg.tokens_per_iter, cfg.code_dim)
        records.append(Iteration(t, logits.requires_grad_(), latents, None, q))
    return records, gt


def cross_entropy_by_hand(logits, gt, smoothing):
    """(1 - ε) · (-log p_gt) + ε · mean over codes of (-log p_k), averaged over the grid and batch."""
    log_p = logits.float().log_softmax(-1)  # (B, N, V)
    nll = -log_p.gather(-1, gt[..., None])[..., 0]
    return ((1 - smoothing) * nll + smoothing * -log_p.mean(-1)).mean()


def code_mse_by_hand(model, logits, gt):
    """Mean over every element of (softmax(logits) @ codes - code of the true index)²."""
    codes = vqgan_codes(model)
    return ((logits.float().softmax(-1) @ codes - codes[gt]) ** 2).mean()


WEIGHTS = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]
NO_WEIGHTS = [0.0] * 8


def test_stage1_cross_entropy_term_is_weighted_per_iteration(model):
    records, gt = stage1_records(model)
    loss, _ = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.0, code_weight=0.0,
                           quantizer_weight=0.0)
    expected = 1.5 * cross_entropy_by_hand(records[0].prediction, gt, 0) + \
        4.5 * cross_entropy_by_hand(records[1].prediction, gt, 0)
    torch.testing.assert_close(loss, expected)


def test_stage1_cross_entropy_gradient_is_weighted_per_iteration(model):
    """d/d logits_t of λ_t · CE_t = λ_t · (softmax(logits_t) - onehot(gt)) / (B · N)."""
    records, gt = stage1_records(model)
    loss, _ = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.0, code_weight=0.0,
                           quantizer_weight=0.0)
    loss.backward()
    for r in records:
        onehot = F.one_hot(gt, r.prediction.shape[-1]).float()
        expected = WEIGHTS[r.index] * (r.prediction.detach().softmax(-1) - onehot) / gt.numel()
        torch.testing.assert_close(r.prediction.grad, expected)


def test_stage1_loss_on_the_device_of_its_inputs():
    """Meta tensors stand in for a GPU: the loss and its statistics stay where the logits are."""
    with torch.device("meta"):
        model = ALIT(make_config("tiny"))
        cfg = model.config
        B, N, V, K = 2, cfg.num_image_tokens, cfg.vqgan.codebook_size, cfg.tokens_per_iter
        q = Quantized(codes=None, indices=None, loss=torch.zeros(()), perplexity=None, usage=None)
        records = [Iteration(t, torch.randn(B, N, V), torch.randn(B, (t + 1) * K, cfg.code_dim), None, q)
                   for t in (1, 4)]
        gt = torch.zeros(B, N, dtype=torch.long)
    loss, stats = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.0, code_weight=1.0,
                               quantizer_weight=1.0)
    assert loss.device.type == stats.device.type == "meta" and stats.shape == (8, 3)


def test_stage1_cross_entropy_with_label_smoothing(model):
    records, gt = stage1_records(model)
    loss, _ = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.1, code_weight=0.0,
                           quantizer_weight=0.0)
    expected = sum(WEIGHTS[r.index] * cross_entropy_by_hand(r.prediction, gt, 0.1) for r in records)
    torch.testing.assert_close(loss, expected)


def test_stage1_code_term_is_mse_between_expected_and_true_code(model):
    records, gt = stage1_records(model)
    for code_weight in (1.0, 0.25):
        loss, _ = stage1_terms(model, records, gt, iteration_weights=NO_WEIGHTS, label_smoothing=0.0,
                               code_weight=code_weight, quantizer_weight=0.0)
        expected = code_weight * sum(code_mse_by_hand(model, r.prediction, gt) for r in records)
        torch.testing.assert_close(loss, expected)
    # its gradient, through the softmax: with s = softmax(logits), e = s @ codes - codes[gt] and
    # g = 2 w e / numel(e) @ codes^T, d/d logits = s * (g - Σ_k s_k g_k)
    loss.backward()
    codes = vqgan_codes(model)
    for r in records:
        s = r.prediction.detach().softmax(-1)
        e = s @ codes - codes[gt]
        g = 2 * 0.25 * e / e.numel() @ codes.T
        torch.testing.assert_close(r.prediction.grad, s * (g - (s * g).sum(-1, keepdim=True)))


def test_stage1_quantizer_term_is_added_per_iteration(model):
    records, gt = stage1_records(model)
    loss, _ = stage1_terms(model, records, gt, iteration_weights=NO_WEIGHTS, label_smoothing=0.0, code_weight=0.0,
                           quantizer_weight=2.0)
    torch.testing.assert_close(loss, torch.tensor(2.0 * (0.3 + 0.7)))
    loss.backward()
    assert records[0].quantized.loss.grad == 2.0  # the quantizer loss keeps its graph
    # continuous latents: no quantizer term
    for r in records:
        r.quantized = None
    loss, _ = stage1_terms(model, records, gt, iteration_weights=NO_WEIGHTS, label_smoothing=0.0, code_weight=0.0,
                           quantizer_weight=2.0)
    assert loss == 0


def test_stage1_loss_is_the_sum_of_its_terms_and_logs_per_iteration(model):
    records, gt = stage1_records(model)
    loss, stats = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.1, code_weight=0.2,
                               quantizer_weight=3.0)
    expected = sum(WEIGHTS[r.index] * cross_entropy_by_hand(r.prediction, gt, 0.1)
                   + 0.2 * code_mse_by_hand(model, r.prediction, gt)
                   + 3.0 * r.quantized.loss for r in records)
    torch.testing.assert_close(loss, expected)
    # stats: a [CE, token accuracy, 1] row per decoded iteration, zeros elsewhere, no graph
    assert stats.shape == (8, 3) and not stats.requires_grad
    for r in records:
        accuracy = (r.prediction.argmax(-1) == gt).float().mean()
        assert 0.25 <= accuracy < 0.5  # half of the first image is predicted right
        torch.testing.assert_close(stats[r.index], torch.stack([cross_entropy_by_hand(r.prediction, gt, 0.1), accuracy,
                                                                torch.tensor(1.0)]))
    assert not stats[[0, 2, 3, 5, 6, 7]].any()


def test_stage1_loss_is_computed_in_float32_from_bf16_logits(model):
    """Under bf16 autocast the decoder's logits are bf16; the loss is computed from them in float32."""
    records, gt = stage1_records(model)
    float32, _ = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.0, code_weight=1.0,
                              quantizer_weight=1.0)
    for r in records:
        r.prediction = r.prediction.detach().bfloat16()
    from_bf16, _ = stage1_terms(model, records, gt, iteration_weights=WEIGHTS, label_smoothing=0.0, code_weight=1.0,
                                quantizer_weight=1.0)
    expected = sum(WEIGHTS[r.index] * cross_entropy_by_hand(r.prediction, gt, 0)
                   + code_mse_by_hand(model, r.prediction, gt)
                   + r.quantized.loss for r in records)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, expected)
    torch.testing.assert_close(from_bf16, float32, rtol=1e-2, atol=0)  # only the logits' rounding differs


def test_soft_codes_are_the_expected_code_and_leave_the_codebook_alone(model):
    """softmax(logits) @ codebook, in float32 even from bf16 logits; the codebook is read detached
    (as the official code reads it through .data), so no loss trains it through this product."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, model.config.vqgan.codebook_size, generator=g).requires_grad_()
    codebook = model.vqgan.quantize.embedding.weight
    codebook.requires_grad_(True)
    try:
        soft = model.vqgan.expected_codes(logits.bfloat16())
        assert soft.dtype == torch.float32
        torch.testing.assert_close(soft, logits.bfloat16().float().softmax(-1) @ vqgan_codes(model).detach())
        soft.sum().backward()
        assert logits.grad.abs().sum() > 0 and codebook.grad is None
    finally:
        codebook.requires_grad_(False)


def test_images_from_confident_logits_are_the_vqgan_decoding_of_their_indices(model):
    """The soft code of one-hot logits is the code itself: decoding it gives the VQGAN's image of the
    predicted index grid (row-major, as the VQGAN orders its tokens)."""
    cfg = model.config
    indices = torch.randint(cfg.vqgan.codebook_size, (2, cfg.num_image_tokens),
                            generator=torch.Generator().manual_seed(2))
    logits = torch.full((2, cfg.num_image_tokens, cfg.vqgan.codebook_size), -1e4).scatter(-1, indices[..., None], 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model.images_from_prediction(logits), model.vqgan.decode_indices(indices),
                                   atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Stage 2 and the VQGAN: L_rec = w_1 · L1 + w_p · LPIPS, the hinge GAN, VQGAN eq. 7


def test_reconstruction_loss_weights_l1_and_perceptual():
    recon = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    images = torch.full((2, 3, 2, 2), 0.5)  # |recon - images| = 0.5, 0, 0.5, 0.25: mean 0.3125
    calls = []

    def perceptual(x, y):  # stands in for LPIPS: one distance per image
        calls.append((x, y))
        return torch.tensor([0.2, 0.6])

    torch.testing.assert_close(reconstruction_loss(recon, images, None, 2.0, 5.0), torch.tensor(2.0 * 0.3125))
    assert not calls  # without LPIPS, the perceptual weight does nothing
    torch.testing.assert_close(reconstruction_loss(recon, images, perceptual, 2.0, 0.5),
                               torch.tensor(2.0 * 0.3125 + 0.5 * (0.2 + 0.6) / 2))
    torch.testing.assert_close(reconstruction_loss(recon, images, perceptual, 0.0, 3.0), torch.tensor(3.0 * 0.4))
    assert len(calls) == 2


def test_reconstruction_loss_gradient_reaches_the_reconstruction():
    """d/d recon of w_1 · mean |recon - x| + w_p · mean_n P(recon_n, x_n), here with
    P(a, b) = mean (a - b)² (symmetric, as LPIPS is): w_1 · sign(recon - x) / numel + w_p · 2 (recon - x) / numel."""
    recon = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def perceptual(x, y):
        return (x - y).square().mean(dim=(1, 2, 3))

    reconstruction_loss(recon, images, perceptual, 2.0, 0.5).backward()
    difference = (recon - images).detach()
    n = difference.numel()
    torch.testing.assert_close(recon.grad, 2.0 * difference.sign() / n + 0.5 * 2 * difference / n)


def lpips_by_hand(lpips, x, y):
    """LPIPS with explicit ops: per VGG16 block, unit-normalise the features along channels, square
    their difference, weight the channels by the head and average over the pixels; sum the blocks."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = (2 * x - 1 - shift) / scale, (2 * y - 1 - shift) / scale
    distance = 0
    for block, (convs, head) in enumerate(zip(lpips.vgg, lpips.heads)):
        if block > 0:
            fx, fy = F.max_pool2d(fx, 2), F.max_pool2d(fy, 2)
        for conv in convs:
            fx = F.relu(F.conv2d(fx, conv.weight, conv.bias, padding=1))
            fy = F.relu(F.conv2d(fy, conv.weight, conv.bias, padding=1))
        nx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
        distance = distance + ((nx - ny) ** 2 * head.weight.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return distance  # (N,)


@pytest.fixture(scope="module")
def lpips():
    from losses import LPIPS
    torch.manual_seed(0)
    lpips = LPIPS()
    with torch.no_grad():
        for head in lpips.heads:
            head.weight.abs_()  # trained LPIPS heads are non-negative
    return lpips


def test_lpips_per_image_and_its_gradient_match_the_formula(lpips):
    """The perceptual term trains the generator through LPIPS's gradient: per image, on both sides."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    y[1] = 0.9 * x[1] + 0.05 * y[1]  # the second pair much nearer than the first
    x_ours, y_ours = x.clone().requires_grad_(), y.clone().requires_grad_()
    x_hand, y_hand = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours, by_hand = lpips(x_ours, y_ours), lpips_by_hand(lpips, x_hand, y_hand)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-7)
    assert ours[0] > 2 * ours[1]
    weights = torch.tensor([1.0, -3.0])
    (ours * weights).sum().backward()
    (by_hand * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hand.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(y_ours.grad, y_hand.grad, rtol=1e-4, atol=1e-8)


def test_lpips_is_zero_where_features_vanish(lpips):
    """Where every channel of a block is zero (all ReLUs off), the unit normalisation divides 0 by
    0 + 1e-10: the distance is 0 there, not NaN."""
    from losses import LPIPS
    dark = LPIPS()
    dark.load_state_dict(lpips.state_dict())
    with torch.no_grad():
        for convs in dark.vgg:
            for conv in convs:
                conv.bias.fill_(-1e3)
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    assert dark(x, y).item() == 0.0


def test_lpips_normalises_tiny_features_with_its_epsilon(lpips):
    """Features whose length is comparable to the 1e-10 of the unit normalisation: divided by
    length + 1e-10, as the formula says (not minus, not the length alone)."""
    from losses import LPIPS
    faint = LPIPS()
    faint.load_state_dict(lpips.state_dict())
    with torch.no_grad():
        for convs in faint.vgg:
            convs[-1].weight.mul_(1e-12)
            convs[-1].bias.mul_(1e-12)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    torch.testing.assert_close(faint(x, y), lpips_by_hand(faint, x, y), rtol=1e-4, atol=0)


def test_hinge_discriminator_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # 1 - real: -1, 0.5, 2 -> relu mean 2.5 / 3
    fake = torch.tensor([-3.0, 0.0, 0.5, 2.0])  # 1 + fake: -2, 1, 1.5, 3 -> relu mean 5.5 / 4
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 5.5 / 4)))
    # swapped: 1 - fake: 4, 1, 0.5, -1 -> 5.5 / 4; 1 + real: 3, 1.5, 0 -> 4.5 / 3
    torch.testing.assert_close(hinge_d_loss(fake, real), torch.tensor(0.5 * (5.5 / 4 + 4.5 / 3)))
    torch.testing.assert_close(generator_adversarial_loss(fake), torch.tensor(-(-3 + 0 + 0.5 + 2) / 4))


def linear_generator(seed=0):
    """A generator whose last layer G_L is a 1x1 conv W (3, 2), a 1x1-conv "discriminator" d (3,) + b,
    and the pieces of VQGAN eq. 7 by hand: ∇_W L1 = Σ sign(recon - x) h^T / numel,
    ∇_W (-mean D(recon)) = -d (Σ h)^T / (number of logits)."""
    torch.manual_seed(seed)
    last = torch.nn.Conv2d(2, 3, 1, bias=False)
    disc = torch.nn.Conv2d(3, 1, 1)
    h, images = torch.randn(2, 2, 4, 4), torch.rand(2, 3, 4, 4)
    recon = last(h)
    rec_loss = (recon - images).abs().mean()
    h_rows = h.permute(1, 0, 2, 3).flatten(1)  # (2, positions)
    rec_grad = torch.sign(recon - images).detach().permute(1, 0, 2, 3).flatten(1) @ h_rows.T / recon.numel()
    d = disc.weight.detach()[0, :, 0, 0]
    g_grad = -torch.outer(d, h_rows.sum(1)) / h_rows.shape[1]
    return last, disc, recon, rec_loss, rec_grad, g_grad


def test_adaptive_gan_weight_is_vqgan_eq7():
    """λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + δ), δ = 1e-4 (taming's), clamped to [0, 1e4]."""
    last, disc, recon, rec_loss, rec_grad, g_grad = linear_generator()
    g_loss = generator_adversarial_loss(disc(recon))
    weight = adaptive_gan_weight(rec_loss, g_loss, last.weight)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(weight, expected)
    # the direction of the ratio: a larger reconstruction gradient raises λ, a larger GAN gradient lowers it
    torch.testing.assert_close(adaptive_gan_weight(10 * rec_loss, g_loss, last.weight), 10 * expected, rtol=1e-4,
                               atol=0)
    torch.testing.assert_close(adaptive_gan_weight(rec_loss, 100 * g_loss, last.weight),
                               rec_grad.norm() / (100 * g_grad.norm() + 1e-4))  # about 0.17
    # δ: with no GAN gradient at all λ = ||∇ L_rec|| / 1e-4, below the clamp here ...
    torch.testing.assert_close(adaptive_gan_weight(rec_loss, 0 * g_loss, last.weight), rec_grad.norm() / 1e-4)
    # ... and the clamp
    assert adaptive_gan_weight(rec_loss, 0 * g_loss, last.weight, max_weight=3.0) == 3.0
    assert adaptive_gan_weight(1e3 * rec_loss, 0 * g_loss, last.weight) == 1e4
    assert not weight.requires_grad
    (rec_loss + g_loss).backward()  # both calls kept the graph


def test_generator_gan_loss_is_disc_weight_times_lambda_times_gan_loss():
    last, disc, recon, rec_loss, rec_grad, g_grad = linear_generator()
    loss = generator_gan_loss(disc, recon, rec_loss, last.weight, disc_weight=0.3)
    lam = rec_grad.norm() / (g_grad.norm() + 1e-4)
    g_loss = -disc(recon).mean()
    torch.testing.assert_close(loss, 0.3 * lam * g_loss)
    # its gradient is 0.3 λ ∇ L_GAN (λ a constant), and the discriminator is left alone
    loss.backward()
    torch.testing.assert_close(last.weight.grad[:, :, 0, 0], 0.3 * lam * g_grad)
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())


def test_discriminator_step_is_one_hinge_update_on_real_vs_detached_fake(monkeypatch):
    """The step's gradients are averaged over ranks before the update: here as with a second rank
    whose gradients are zero, so the update is half the local one."""
    import losses

    class TwoRanks:  # torch.distributed as seen by rank 0 of 2 whose rank 1 has zero gradients
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        get_world_size = staticmethod(lambda: 2)
        all_reduce = staticmethod(lambda tensor: tensor)

    monkeypatch.setattr(losses, "dist", TwoRanks)
    torch.manual_seed(0)
    disc = torch.nn.Conv2d(3, 1, 1)
    w0, b0 = disc.weight.detach()[0, :, 0, 0].clone(), disc.bias.detach().clone()
    images = torch.rand(2, 3, 2, 2)
    recon = (torch.rand(2, 3, 2, 2) * 4 - 2).requires_grad_()
    for p in disc.parameters():
        p.grad = torch.full_like(p, 100.0)  # stale gradients are cleared first
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.5)
    loss = losses.discriminator_step(disc, optimizer, images, recon)

    def logits(x):
        return torch.einsum("c,nchw->nhw", w0, x) + b0

    real, fake = logits(images), logits(recon.detach())
    torch.testing.assert_close(loss, 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()))
    assert not loss.requires_grad and recon.grad is None
    # d/dw of 0.5 (mean relu(1 - w.x_real - b) + mean relu(1 + w.x_fake + b))
    active_real, active_fake = (1 - real > 0).float(), (1 + fake > 0).float()
    grad_w = 0.5 * (-torch.einsum("nhw,nchw->c", active_real, images) / real.numel()
                    + torch.einsum("nhw,nchw->c", active_fake, recon.detach()) / fake.numel())
    grad_b = 0.5 * (-active_real.mean() + active_fake.mean())
    torch.testing.assert_close(disc.weight.detach()[0, :, 0, 0], w0 - 0.5 * grad_w / 2)
    torch.testing.assert_close(disc.bias.detach(), b0 - 0.5 * grad_b / 2)


def test_discriminator_gradients_are_averaged_over_ranks(monkeypatch):
    """Under DDP: the sum over ranks (all_reduce) divided by the number of ranks; in one process, untouched."""
    import losses
    parameters = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1, 1))]
    for p, grad in zip(parameters, ([1.0, -2.0], [[4.0]])):
        p.grad = torch.tensor(grad)
    grads = [p.grad for p in parameters]
    losses.average_gradients(parameters)  # no process group
    assert grads[0].tolist() == [1.0, -2.0] and grads[1].tolist() == [[4.0]]

    class TwoRanks:  # torch.distributed as seen by rank 0 of 2; rank 1's gradients are all 3
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        get_world_size = staticmethod(lambda: 2)

        @staticmethod
        def all_reduce(tensor):
            tensor.add_(3.0)

    monkeypatch.setattr(losses, "dist", TwoRanks)
    losses.average_gradients(parameters)
    assert grads[0].tolist() == [2.0, 0.5] and grads[1].tolist() == [[3.5]]


# -----------------------------------------------------------------------------
# The vector quantizer: β · ||z - sg(e)||² + ||sg(z) - e||², straight-through codes, restarts


def hand_quantizer(beta=0.4):
    """Codes (1, 0), (0, 1), (-1, 0), (3, 0), (9, 9) and inputs whose nearest codes are 0, 1, 2, 3, 0.
    The last two, (2.1, 0) and (1.9, 0), lie either side of the midpoint of (1, 0) and (3, 0): a
    search that weighs ||e||² against the dot product wrongly gets one of them wrong."""
    vq = VectorQuantizer(5, 2, beta=beta)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [3, 0], [9, 9]]))
    z = torch.tensor([[0.8, 0.1], [0.2, 0.9], [-1.5, 0.2], [2.1, 0.0], [1.9, 0.0]], requires_grad=True)
    return vq, z


NEAREST = [0, 1, 2, 3, 0]


def test_quantizer_picks_the_nearest_code():
    vq, z = hand_quantizer()
    q = vq(z)
    assert q.indices.tolist() == NEAREST
    assert torch.equal(q.codes.detach(), vq.embedding.weight[NEAREST].detach())
    assert q.usage == 4 / 5
    probs = torch.tensor([2, 1, 1, 1]) / 5
    torch.testing.assert_close(q.perplexity, torch.exp(-(probs * probs.log()).sum()))


def test_codebook_and_commitment_terms_with_beta():
    """loss = β · mean (z - sg(e))² + mean (sg(z) - e)²: the commitment term moves only the encoder
    output, by β · 2 (z - e) / numel; the codebook term moves only the codes, by 2 (e - z) / numel."""
    vq, z = hand_quantizer(beta=0.4)
    q = vq(z)
    e = vq.embedding.weight.detach()[q.indices]
    mse = ((z.detach() - e) ** 2).mean()
    torch.testing.assert_close(q.loss, (1 + 0.4) * mse)
    q.loss.backward()
    torch.testing.assert_close(z.grad, 0.4 * 2 * (z.detach() - e) / z.numel())
    expected = torch.zeros(5, 2).index_add_(0, q.indices, 2 * (e - z.detach()) / z.numel())
    torch.testing.assert_close(vq.embedding.weight.grad, expected)


@pytest.mark.parametrize("blend", [1.0, 0.3, 0.0])
def test_straight_through_gradient_reaches_the_encoder_output_unchanged(blend):
    """Forward: z + blend · (e - z), the code at blend 1. Backward: the identity, whatever the blend,
    and nothing reaches the codebook through the codes (only through the codebook term)."""
    vq, z = hand_quantizer()
    vq.blend = blend
    q = vq(z)
    e = vq.embedding.weight.detach()[NEAREST]
    torch.testing.assert_close(q.codes, z.detach() + blend * (e - z.detach()))
    upstream = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25], [2.0, 2.0], [-3.0, 1.0]])  # d(rec. loss)/d codes
    (q.codes * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert vq.embedding.weight.grad is None


def test_straight_through_gradient_with_l2_normalised_codes():
    """With l2_normalize the search and the codes live on the unit sphere: the upstream gradient reaches
    the normalised input unchanged, so the input gets (g - n (n·g)) / ||z||, n = z / ||z||."""
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, l2_normalize=True)
    z = (3 * torch.randn(6, 3)).requires_grad_()
    upstream = torch.randn(6, 3)
    q = vq(z)
    torch.testing.assert_close(q.codes.norm(dim=-1), torch.ones(6))
    (q.codes * upstream).sum().backward()
    norm = z.detach().norm(dim=-1, keepdim=True)
    n = z.detach() / norm
    torch.testing.assert_close(z.grad, (upstream - n * (n * upstream).sum(-1, keepdim=True)) / norm)
    # the loss is computed on the unit vectors too
    e = vq.codebook().detach()[q.indices]
    torch.testing.assert_close(q.loss, (1 + vq.beta) * ((n - e) ** 2).mean())


def test_quantizer_runs_on_the_device_of_its_inputs():
    """Meta tensors stand in for a GPU: the search, the loss and the usage counts stay where z is."""
    with torch.device("meta"):
        vq = VectorQuantizer(8, 3, l2_normalize=True).train()
        z = torch.randn(2, 5, 3)
    q = vq(z)
    assert {t.device.type for t in (q.codes, q.indices, q.loss, q.perplexity, q.usage)} == {"meta"}
    assert q.codes.shape == (2, 5, 3) and q.indices.shape == (2, 5)


def test_codebook_initialisation():
    """Euclidean: uniform in ±1/K (taming's init). l2-normalised: unit rows in random directions."""
    torch.manual_seed(0)
    K = 1024
    weight = VectorQuantizer(K, 8).embedding.weight.detach()
    assert weight.abs().max() <= 1 / K and weight.min() < -0.99 / K and weight.max() > 0.99 / K
    assert abs(weight.std() * K - 1 / math.sqrt(3)) < 0.02  # the std of U(-1, 1)
    weight = VectorQuantizer(K, 8, l2_normalize=True).embedding.weight.detach()
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(K))
    assert weight.mean(0).abs().max() < 0.05 and abs(weight.std() - 8 ** -0.5) < 0.02


def test_dead_code_restart_moves_codes_unused_since_the_last_restart_onto_recent_inputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 2).train()
    codes = torch.tensor([[10.0, 0], [0, 10], [-10, 0], [0, -10], [7, 7], [-7, -7]])
    with torch.no_grad():
        vq.embedding.weight.copy_(codes)
    assert vq.restart_dead_codes() == 0  # nothing counted yet: nothing moves
    assert torch.equal(vq.embedding.weight.detach(), codes)
    assert vq(torch.tensor([[9.0, 1], [1, 9]])).indices.tolist() == [0, 1]
    latest = torch.tensor([[9.0, -1], [-9, -1], [-11, 0]])
    assert vq(latest).indices.tolist() == [0, 2, 2]
    # codes 3, 4, 5 were chosen by neither batch: each moves onto one of the latest inputs
    assert vq.restart_dead_codes() == 3
    weight = vq.embedding.weight.detach()
    assert torch.equal(weight[:3], codes[:3])
    assert all(any(torch.equal(row, x) for x in latest) for row in weight[3:])
    # counting starts again: only the codes chosen since this restart are alive at the next one
    kept = torch.tensor([[0.5, 9.0], [-0.5, 11.0]])
    assert vq(kept).indices.tolist() == [1, 1]
    assert vq.restart_dead_codes() == 5
    weight = vq.embedding.weight.detach()
    assert torch.equal(weight[1], codes[1])
    assert all(any(torch.equal(row, x) for x in kept) for row in weight[[0, 2, 3, 4, 5]])


def test_dead_code_restart_uses_the_normalised_inputs_of_an_l2_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, l2_normalize=True).train()
    z = torch.tensor([[30.0, 40.0]])  # the lookup sees (0.6, 0.8)
    used = vq(z).indices.item()
    assert vq.restart_dead_codes() == 7
    for k in set(range(8)) - {used}:
        torch.testing.assert_close(vq.embedding.weight[k].detach(), torch.tensor([0.6, 0.8]))
    assert math.isclose(vq(z).usage.item(), 1 / 8)  # ties go to the lowest index


def test_dead_code_restart_under_ddp_takes_rank_0s_codebook(monkeypatch):
    """Each rank restarts on its own inputs; then every rank takes rank 0's codebook (a broadcast of
    the weights from rank 0, at every restart, whether or not this rank moved a code)."""
    import quantize
    broadcasts = []

    class FakeDistributed:  # torch.distributed as seen by rank 1 of 2
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)

        @staticmethod
        def broadcast(tensor, src):
            broadcasts.append(src)
            tensor.copy_(torch.full_like(tensor, 5.0))  # rank 0's weights

    monkeypatch.setattr(quantize, "dist", FakeDistributed)
    vq = VectorQuantizer(4, 2).train()
    vq(torch.randn(3, 2))
    vq.restart_dead_codes()
    assert broadcasts == [0] and (vq.embedding.weight == 5.0).all()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
    vq(torch.tensor([[2.0, 0], [0, 2], [-2, 0], [0, -2]]))  # every code used: nothing moves here
    assert vq.restart_dead_codes() == 0
    assert broadcasts == [0, 0] and (vq.embedding.weight == 5.0).all()
