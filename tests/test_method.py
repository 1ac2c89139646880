"""The method's other moving parts, each against its rule written out here on tiny hand-made inputs:
dynamic halting (§2, the Mask op) and where the rollout applies it, the EMA and its warm-up, the
learning-rate schedule, the stage schedules (rollout warm-up, code blending, iteration weights, the
stage-2 loss iteration and GAN weight) and the token-selection criteria.

dev/mutate.py checks that these tests notice when a line of the method changes.
"""
import math

import pytest
import torch

import selection
from model import ALIT, make_config
import train_stage1
import train_stage2
from losses import gan_weight_at, iteration_weights
from optim import EMA, lr_at
from train_stage2 import parse_gan_schedule

# -----------------------------------------------------------------------------
# Dynamic halting


def true_index_probability(logits, gt):
    """p = softmax(logits)[true VQGAN index], (B, N)."""
    return logits.softmax(-1).gather(-1, gt[..., None])[..., 0]


def test_halt_masks_tokens_at_or_above_the_threshold_with_probability_p():
    """A 2D token halts iff p >= threshold and a uniform draw u < p; a halted token becomes
    halted_token + its position; the class token, the other image tokens and the latents stay."""
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", halting_threshold=0.5))
    cfg = model.config
    B, N, V = 2, cfg.num_image_tokens, cfg.vqgan.codebook_size
    gt = torch.randint(V, (B, N))
    # p on a ladder around the threshold: 0.5 itself is exact (two equal logits, the rest -1e4 -> 0)
    ladder = torch.tensor([0.2, 0.45, 0.5, 0.5, 0.7, 0.9, 1.0, 0.5])
    p_wanted = ladder.repeat(B * N // len(ladder)).view(B, N)
    other = (gt + 1) % V
    logits = torch.full((B, N, V), -1e4)
    logits.scatter_(-1, gt[..., None], p_wanted.log()[..., None])
    logits.scatter_(-1, other[..., None], (1 - p_wanted).clamp(min=1e-30).log()[..., None])
    p = true_index_probability(logits, gt)
    assert (p == 0.5).sum() == 3 * B * N // 8
    x = torch.randn(B, 1 + N + 3 * cfg.tokens_per_iter, cfg.encoder_width)

    new_x, halted = model.halt(x, logits, gt, torch.Generator().manual_seed(3))
    u = torch.rand(B, N, generator=torch.Generator().manual_seed(3))
    expected = (p >= 0.5) & (u < p)
    assert torch.equal(halted, expected)
    assert expected[p == 0.5].any() and not expected[p == 0.5].all()  # p = threshold may halt, by the draw
    assert expected[p == 1.0].all() and not expected[p < 0.5].any()
    expected_x = x.clone()
    replacement = (model.halted_token[0] + model.image_positions[1:]).detach().expand(B, N, -1)
    expected_x[:, 1:1 + N][expected] = replacement[expected]
    assert torch.equal(new_x.detach(), expected_x)


def test_halted_tokens_train_the_halted_token_and_their_positions():
    """The gradient of a halted token goes to halted_token and to its position's embedding; the
    gradient of every other token goes to the token it was."""
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", halting_threshold=0.3))
    B, N, V, D = 2, model.config.num_image_tokens, model.config.vqgan.codebook_size, model.config.encoder_width
    gt = torch.randint(V, (B, N))
    logits = torch.randn(B, N, V).scatter(-1, gt[..., None], 8.0)  # p ~ 0.9: most tokens halt, not all
    x = torch.randn(B, 1 + N + 8, D, requires_grad=True)
    new_x, halted = model.halt(x, logits, gt, torch.Generator().manual_seed(0))
    assert 0 < halted.sum() < B * N
    weights = torch.randn(new_x.shape)
    (new_x * weights).sum().backward()
    image_weights = weights[:, 1:1 + N]
    torch.testing.assert_close(model.halted_token.grad[0, 0], image_weights[halted].sum(0))
    torch.testing.assert_close(model.image_positions.grad[1:], (image_weights * halted[..., None]).sum(0))
    expected = weights.clone()
    expected[:, 1:1 + N][halted] = 0
    assert torch.equal(x.grad, expected)


def test_halting_draws_on_the_device_of_its_inputs():
    """Meta tensors stand in for a GPU: the uniform draws must be made where p is."""
    with torch.device("meta"):
        model = ALIT(make_config("tiny"))
        x, logits = torch.randn(2, 1 + 64 + 8, 128), torch.randn(2, 64, 256)
        gt = torch.zeros(2, 64, dtype=torch.long)
    new_x, halted = model.halt(x, logits, gt)
    assert new_x.device.type == halted.device.type == "meta" and halted.shape == (2, 64)


def test_halting_decides_in_float32_from_bf16_logits():
    """Under bf16 autocast the logits are bf16; p is computed from them in float32. Two logits 2^-9
    apart give p = 0.49951 < 0.5, which bf16 would round to 0.5 and let halt."""
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", halting_threshold=0.5))
    B, N, V = 2, model.config.num_image_tokens, model.config.vqgan.codebook_size
    gt = torch.zeros(B, N, dtype=torch.long)
    logits = torch.full((B, N, V), -1e4, dtype=torch.bfloat16)
    logits[..., 0], logits[..., 1] = 0.0, 2.0 ** -9
    assert true_index_probability(logits.float(), gt).max() < 0.5
    x = torch.randn(B, 1 + N + 8, model.config.encoder_width)
    _, halted = model.halt(x, logits, gt, torch.Generator().manual_seed(0))
    assert not halted.any()


def test_rollout_runs_the_encoder_up_to_the_last_decoded_iteration_and_the_decoder_once_each():
    """§A.5, stage 2: the loss at one iteration t needs t + 1 encoder passes and one decoder pass;
    the VQGAN's indices are looked up only when halting needs them."""
    torch.manual_seed(0)
    model = ALIT(make_config("tiny"))
    calls = {"encoder": 0, "decoder": 0, "vqgan_quantize": 0}
    for name, module in [("encoder", model.encoder), ("decoder", model.decoder),
                         ("vqgan_quantize", model.vqgan.quantize)]:
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(images, iters=[2])
        assert calls == {"encoder": 3, "decoder": 1, "vqgan_quantize": 0}
        model(images, iters=[1, 4], halting=True)
    assert calls == {"encoder": 3 + 5, "decoder": 1 + 2, "vqgan_quantize": 1}


def test_rollout_refuses_iterations_outside_the_rollout():
    torch.manual_seed(0)
    model = ALIT(make_config("tiny"))
    images = torch.rand(1, 3, 32, 32)
    for iters in ([], [-1, 2], [3, 8]):
        with pytest.raises(ValueError, match="iters"):
            model(images, iters=iters)


@pytest.fixture(scope="module")
def confident_model():
    """An untrained tiny model made confident (its last layer scaled up), with the grid it predicts
    taken as the true one: about half of the tokens reach p >= 0.5, so halting acts."""
    torch.manual_seed(0)
    model = ALIT(make_config("tiny", halting_threshold=0.5, zero_init_encoder_residuals=False)).eval()
    with torch.no_grad():
        model.head[2].weight.mul_(6)
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        latents, _ = model.vqgan.encode(images)
        gt = model(images, latents, iters=[0])[0].prediction.argmax(-1)
    return model, images, latents, gt


def test_rollout_halts_after_each_decoded_iteration_but_the_last(confident_model):
    model, images, latents, gt = confident_model
    with torch.no_grad():
        plain = model(images, latents, gt)
        halting = model(images, latents, gt, halting=True, iters=[0, 1, 2], generator=torch.Generator().manual_seed(5))
    assert all(r.halted is None for r in plain)
    assert halting[-1].halted is None
    # after iteration t, draw t of the generator against that iteration's p
    draws = torch.Generator().manual_seed(5)
    for r in halting[:-1]:
        u = torch.rand(gt.shape, generator=draws)
        p = true_index_probability(r.prediction, gt)
        assert torch.equal(r.halted, (p >= 0.5) & (u < p))
        assert 0.1 < r.halted.float().mean() < 0.9
    # it changes what the next iterations see, not the iteration it was decided on
    assert torch.equal(halting[0].prediction, plain[0].prediction)
    assert not torch.allclose(halting[1].prediction, plain[1].prediction, atol=1e-3)


def test_rollout_halts_only_after_decoded_iterations(confident_model):
    """Halting needs the decoder's prediction: skipping iteration 0's decoding skips its halting."""
    model, images, latents, gt = confident_model
    with torch.no_grad():
        plain = model(images, latents, gt)
        subset = model(images, latents, gt, halting=True, iters=[1, 2], generator=torch.Generator().manual_seed(5))
    assert [r.index for r in subset] == [1, 2]
    torch.testing.assert_close(subset[0].prediction, plain[1].prediction, atol=1e-5, rtol=0)
    u = torch.rand(gt.shape, generator=torch.Generator().manual_seed(5))  # the first draw: after iteration 1
    p = true_index_probability(subset[0].prediction, gt)
    assert torch.equal(subset[0].halted, (p >= 0.5) & (u < p))


def test_rollout_halting_without_indices_uses_the_vqgan_encoding(confident_model):
    model, images, latents, _ = confident_model
    with torch.no_grad():
        _, vqgan_indices = model.vqgan.encode(images)
        given = model(images, latents, vqgan_indices, halting=True, generator=torch.Generator().manual_seed(1))
        computed = model(images, halting=True, generator=torch.Generator().manual_seed(1))
    for a, b in zip(given, computed):
        torch.testing.assert_close(a.prediction, b.prediction, atol=1e-5, rtol=0)
        assert a.halted is None or torch.equal(a.halted, b.halted)


# -----------------------------------------------------------------------------
# EMA and learning rate


def test_ema_decay_warms_up_to_its_value():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.999)
    for step in (0, 1, 5, 100):
        assert math.isclose(ema.decay_at(step), (1 + step) / (10 + step))  # 0.1, 0.18, 0.4, 0.918
    assert ema.decay_at(10_000) == 0.999  # capped: (1 + step) / (10 + step) = 0.9991 here
    assert EMA(torch.nn.Linear(2, 2), decay=0.5).decay_at(100) == 0.5


def test_ema_update_averages_the_trainable_parameters():
    """shadow <- d · shadow + (1 - d) · param, d = decay_at(step), for the trainable parameters only."""
    module = torch.nn.Linear(2, 2)
    module.bias.requires_grad_(False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2], [3, 4]]))
    ema = EMA(module, decay=0.99)
    assert list(ema.state_dict()) == ["weight"]  # frozen parameters are not averaged
    assert not ema.shadow["weight"].requires_grad  # an average, not a trainable tensor with a graph
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[11.0, 12], [13, 14]]))  # the shadow is a copy, not the parameter
    w0, w1 = torch.tensor([[1.0, 2], [3, 4]]), torch.tensor([[11.0, 12], [13, 14]])
    ema.update(module, step=0)  # d = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * w0 + 0.9 * w1)
    ema.update(module, step=10_000)  # d = 0.99
    torch.testing.assert_close(ema.shadow["weight"], 0.99 * (0.1 * w0 + 0.9 * w1) + 0.01 * w1)
    torch.testing.assert_close(module.weight.detach(), w1)  # the model itself is left alone
    # a saved average loads back by value
    other = EMA(torch.nn.Linear(2, 2), decay=0.99)
    other.load_state_dict({"weight": ema.shadow["weight"]})
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    assert other.shadow["weight"] is not ema.shadow["weight"]


def test_lr_warms_up_linearly_then_decays_by_a_cosine_to_its_floor():
    """lr = base · (step + 1) / warmup during warm-up, then
    base · (r + (1 - r) · (1 + cos(π · progress)) / 2), progress = (step - warmup) / (total - warmup) <= 1."""
    base, warmup, total, r = 2.0, 10, 110, 0.1
    for step, expected in [(0, 0.2), (4, 1.0), (9, 2.0), (10, 2.0),
                           (35, 2 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)),
                           (60, 2 * (0.1 + 0.9 * 0.5)), (110, 0.2), (500, 0.2)]:
        assert math.isclose(lr_at(step, base, warmup, total, r), expected, rel_tol=1e-12), step
    assert lr_at(0, base, 0, total, r) == base  # no warm-up
    assert math.isclose(lr_at(5, base, 0, 5, 0.0), 0.0, abs_tol=1e-12)  # total = warm-up: at the floor at once
    assert lr_at(7, base, 8, 8, 0.5) == base
    assert lr_at(3, base, 2, 2, 0.5) == 1.0  # no decay steps: at the floor once warmed up
    assert lr_at(1, base, 0, 1, 0.0) == 0.0  # one decay step: from base to the floor


# -----------------------------------------------------------------------------
# Stage 1's schedules


def stage1_at(step, *flags, iters=8):
    """train_stage1.schedule at `step` of the run its flags describe (through its own parse_args)."""
    args, _ = train_stage1.parse_args(list(flags))
    return train_stage1.schedule(step, args, 1.0, iters)


def test_rollout_length_grows_from_one_iteration_to_all():
    """1 + floor(step / (warmup · steps) · (T - 1)) iterations, at most T; all of them without warm-up."""
    flags = ["--rollout-warmup", "0.5", "--steps", "100"]
    lengths = {step: len(stage1_at(step, *flags).iters) for step in (0, 7, 8, 25, 49, 50, 99)}
    assert lengths == {0: 1, 7: 1, 8: 2, 25: 4, 49: 7, 50: 8, 99: 8}
    assert stage1_at(0, "--rollout-warmup", "0", "--steps", "100").iters == list(range(8))


def test_loss_iterations_are_drawn_from_seed_plus_step_within_the_rollout():
    """--loss-iters n: n of the rollout's iterations, drawn alike on every rank from (seed, step)."""
    for step in (0, 3, 40):
        now = stage1_at(step, "--loss-iters", "3", "--seed", "5", "--rollout-warmup", "0", "--steps", "100")
        assert now.iters == torch.randperm(8, generator=torch.Generator().manual_seed(5 + step))[:3].tolist()
    assert len(stage1_at(0, "--loss-iters", "3", "--steps", "100").iters) == 1  # the warm-up rolls out one


def test_code_blend_goes_from_continuous_to_quantized():
    """0 until continuous_until · steps, then (step + 1 - start) / (end - start), then 1."""
    def blends(continuous_until, blend_until, steps, at):
        return [stage1_at(step, "--continuous-until", str(continuous_until), "--blend-until", str(blend_until),
                          "--steps", str(steps)).blend for step in at]
    at = (0, 28, 29, 30, 39, 48, 49, 99)
    assert blends(0.3, 0.5, 100, at) == pytest.approx([0.0, 0.0, 0.0, 0.05, 0.5, 0.95, 1.0, 1.0])
    assert blends(0.0, 0.0, 100, [0]) == [1.0]
    # a switch without blending (end = start): continuous for the first half, quantized from step 50
    assert blends(0.5, 0.5, 100, (48, 49, 50)) == [0.0, 0.0, 1.0]
    assert blends(0.1, 0.1, 10, (0, 1)) == [0.0, 1.0]  # the same after one step


def test_latent_restarts_every_n_steps_until_a_fraction_of_the_run():
    restarts = [step for step in range(40) if stage1_at(step, "--latent-restart-every", "4", "--restart-until", "0.5",
                                                          "--steps", "40").restart]
    assert restarts == [3, 7, 11, 15, 19]  # after steps 4, 8, ..., 20: the 20th is half the run
    assert not any(stage1_at(step, "--latent-restart-every", "0", "--steps", "40").restart for step in range(40))


def test_iteration_weights_are_padded_with_one_and_cut_to_the_rollout():
    assert iteration_weights("2.5,2,1.5", 5) == [2.5, 2.0, 1.5, 1.0, 1.0]
    assert iteration_weights("1,2,3,4", 2) == [1.0, 2.0]


# -----------------------------------------------------------------------------
# Stage 2's schedules


def stage2_at(step, *flags, peak_lr=1.0, iters=8):
    """train_stage2.schedule at `step` of the run its flags describe (through its own parse_args)."""
    return train_stage2.schedule(step, train_stage2.parse_args(list(flags)), peak_lr, iters)


def test_loss_iteration_cycles_or_is_drawn_from_seed_plus_step():
    assert [stage2_at(step, "--seed", "3").iteration for step in (0, 1, 7, 8, 13)] == [0, 1, 7, 0, 5]
    drawn = ["--iteration-order", "random", "--seed", "3"]
    for step in (0, 1, 17):
        expected = int(torch.randint(8, (), generator=torch.Generator().manual_seed(3 + step)))
        assert stage2_at(step, *drawn).iteration == expected  # the same on every rank
    picks = [stage2_at(step, *drawn).iteration for step in range(64)]
    assert set(picks) == set(range(8))


def test_gan_weight_follows_the_schedule():
    schedule = parse_gan_schedule("0.75:0.2, 0.5:0.1")
    assert schedule == [(0.5, 0.1), (0.75, 0.2)]  # sorted by fraction
    flags = ["--gan-schedule", "0.75:0.2,0.5:0.1", "--steps", "100"]  # train_stage2 runs it in steps
    weights = {step: stage2_at(step, *flags).gan_weight for step in (0, 49, 50, 74, 75, 99)}
    assert weights == {0: 0.0, 49: 0.0, 50: 0.1, 74: 0.1, 75: 0.2, 99: 0.2}
    now = stage2_at(5, "--steps", "100", "--warmup-steps", "10", "--disc-lr", "0.5", peak_lr=2.0)
    assert (now.lr, now.disc_lr) == (2.0 * 6 / 10, 0.5 * 6 / 10)  # both warm up alike
    assert gan_weight_at(0, [(0.0, 0.3)]) == 0.3
    assert parse_gan_schedule("1:0,0:0") == [(0.0, 0.0), (1.0, 0.0)]  # the bounds are allowed


@pytest.mark.parametrize("text", ["0.5", "0.5:0.1:2", "1.5:0.1", "-0.1:0.1", "0.5:-0.1", "a:b", "", "0.5:0.1,"])
def test_gan_schedule_refuses_malformed_entries(text):
    with pytest.raises(ValueError):
        parse_gan_schedule(text)


# -----------------------------------------------------------------------------
# Token-selection criteria


def test_l1_criterion_is_strict_and_clamps_the_reconstruction():
    images = torch.full((4, 3, 2, 2), 0.5)
    recon = torch.stack([torch.full((3, 2, 2), v) for v in (0.75, -4.0, 7.0, 0.625)])
    # mean |clamp(recon, 0, 1) - images| per image: 0.25, 0.5 (clamped to 0), 0.5 (clamped to 1), 0.125
    assert selection.l1_below(0.25)(images, recon).tolist() == [False, False, False, True]
    assert selection.l1_below(0.5)(images, recon).tolist() == [True, False, False, True]
    assert selection.l1_below(0.5000001)(images, recon).tolist() == [True, True, True, True]
    assert selection.l1_below(0.04).__name__ == "l1<0.04"


def test_token_accuracy_criterion():
    gt = torch.tensor([[0, 1, 2, 3], [3, 3, 3, 3]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0, 0], [3, 3, 3, 0]]), 4).float()
    # accuracies 0.5 and 0.75; at or above the threshold passes
    assert selection.token_accuracy_above(0.5)(gt, logits).tolist() == [True, True]
    assert selection.token_accuracy_above(0.75)(gt, logits).tolist() == [False, True]
    assert selection.token_accuracy_above(0.76)(gt, logits).tolist() == [False, False]
    assert selection.token_accuracy_above(0.9).__name__ == "token_acc>=0.9"


def test_code_error_criterion_is_the_mse_of_the_expected_code():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    gt = torch.tensor([[1, 2], [0, 0]])
    logits = torch.tensor([[[-1e4, 0, -1e4], [-1e4, 0, 0]],  # code 1 exactly; half code 1, half code 2
                           [[0, 0, 0], [0, -1e4, -1e4]]])  # the mean of all codes; code 0 exactly
    # image 0: token 1 expects (0.5, 1) vs (0, 2): squared errors 0.25 + 1 -> mean over 2 tokens x 2 dims 1.25 / 4
    # image 1: token 0 expects (1/3, 2/3) vs (0, 0): 1/9 + 4/9 -> 5 / 9 / 4
    errors = torch.tensor([1.25 / 4, 5 / 36])
    assert selection.code_error_below(0.3125001, codebook)(gt, logits).tolist() == [True, True]
    assert selection.code_error_below(0.3125, codebook)(gt, logits).tolist() == [False, True]
    assert selection.code_error_below(5 / 36 - 1e-6, codebook)(gt, logits).tolist() == [False, False]
    assert (errors < 0.2).tolist() == selection.code_error_below(0.2, codebook)(gt, logits).tolist()
    assert selection.code_error_below(0.01, codebook).__name__ == "code_mse<0.01"
    # from bf16 logits (autocast) the same decisions, computed in float32
    assert selection.code_error_below(0.3125001, codebook)(gt, logits.bfloat16()).tolist() == [True, True]


def test_first_passing_iteration_or_the_last():
    passes = torch.tensor([[False, False, True, False],
                           [True, False, True, False],
                           [True, True, False, False]])
    assert selection.first_passing(passes).tolist() == [1, 2, 0, 2]
    # on the criterion's device (evaluation on a GPU): the meta device refuses a CPU tensor among its own
    assert selection.first_passing(passes.to("meta")).device.type == "meta"


def test_psnr():
    torch.testing.assert_close(selection.psnr(torch.tensor([0.01, 1.0, 0.0])), torch.tensor([20.0, 0.0, 100.0]))


def test_l1_passes_threshold_or_saturation():
    l1 = torch.tensor([[0.10, 0.30], [0.045, 0.206], [0.04, 0.20]])  # (T = 3, B = 2)
    assert selection.l1_passes(l1, 0.05).tolist() == [[False, False], [True, False], [True, False]]
    # within 3% of the longest code's L1 also passes: 0.206 <= 1.03 * 0.2, not 0.3
    assert selection.l1_passes(l1, 0.05, saturation=0.03).tolist() == [[False, False], [True, True], [True, True]]
    assert selection.l1_passes(l1, 0.05, saturation=0.02).tolist() == [[False, False], [True, False], [True, True]]
    assert selection.l1_passes(torch.tensor([[0.25], [0.5]]), 0.25).tolist() == [[False], [False]]  # strictly below
    # "within" includes the bound (exact in binary: 1.5 * 0.25 = 0.375)
    assert selection.l1_passes(torch.tensor([[0.375], [0.25]]), 0.1, saturation=0.5).tolist() == [[True], [True]]
