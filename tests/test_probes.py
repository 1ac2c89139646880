"""probes.py and the depth criterion: each measurement on inputs whose answer is known."""
import numpy as np
import pytest
import torch

from probes import (bootstrap_se, class_balanced, encoder_outputs, mean_difference, pooled_blocks, prefix_features,
                    probe_correct, segment_iou, top_mass_segment)
from selection import depth_error, depth_error_below, first_passing


def clusters(n: int, classes: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    """n points around `classes` centres far apart (linearly separable), and their labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


def test_probe_scores_one_on_separable_features_and_chance_on_shuffled_labels():
    x, y = clusters(800, 4)
    assert probe_correct(x[:400], y[:400], x[400:], y[400:], 4).all()
    shuffled = y[torch.randperm(800, generator=torch.Generator().manual_seed(1))]
    accuracy = probe_correct(x[:400], shuffled[:400], x[400:], shuffled[400:], 4).float().mean().item()
    assert abs(accuracy - 0.25) < 0.08  # chance, give or take 3.5 standard errors of 400 images


def test_class_balanced_spreads_the_images_over_the_classes():
    targets = [0] * 5 + [1] * 2 + [2] * 5  # sorted files: the first n would all be class 0
    assert class_balanced(targets, 6) == [0, 1, 5, 6, 7, 8]  # two of each
    assert class_balanced(targets, 9) == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # class 1 has two; 0 and 2 take its share
    assert class_balanced(targets, 100) == list(range(12))


def test_top_mass_of_a_map_equal_to_a_mask_is_the_mask():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[3, 4, 11, 12, 13, 20]] = True
    truth = torch.where(mask, 2, 0)[None]  # one object on the background
    for share in (0.4, 0.6, 0.8, 1.0):
        segment = top_mass_segment(mask.float(), share)
        assert torch.equal(segment, mask)
        assert segment_iou(segment[None, None], truth).item() == segment_iou(segment[None, None], truth, 2).item() == 1
    # distinct values: the highest tokens until the share of the mass is reached
    ramp = torch.tensor([4.0, 3.0, 2.0, 1.0])  # mass 10
    assert top_mass_segment(ramp, 0.4).tolist() == [True, False, False, False]
    assert top_mass_segment(ramp, 0.6).tolist() == [True, True, False, False]
    assert top_mass_segment(ramp, 0.8).tolist() == [True, True, True, False]


def test_segment_iou_is_the_best_overlap_with_a_true_segment():
    truth = torch.tensor([[0, 0, 0, 0, 2, 2, 3, 3]])
    segments = torch.tensor([[[0, 0, 0, 0, 1, 1, 1, 0],   # object 2 (IoU 2/3) beats object 3 (1/3)
                              [0, 0, 1, 1, 0, 0, 0, 0],   # half the background: 2/4
                              [0, 0, 0, 0, 0, 0, 1, 1]]]).bool()  # object 3 exactly
    assert segment_iou(segments, truth)[0].tolist() == pytest.approx([2 / 3, 1 / 2, 1])
    # scored against the objects alone (shapes' labels from 2), the background half matches nothing
    assert segment_iou(segments, truth, first_object=2)[0].tolist() == pytest.approx([2 / 3, 0, 1])


def test_pooled_prefixes_are_means_of_the_first_tokens():
    N, K, T, B, D = 4, 2, 3, 5, 6
    outputs = [torch.randn(B, 1 + N + (t + 1) * K, D) for t in range(T)]
    image, blocks = pooled_blocks(outputs, N, K)
    for t in range(T):
        torch.testing.assert_close(image[t], outputs[t][:, 1:1 + N].mean(1))
        for j in range(1, t + 2):
            latents = outputs[t][:, 1 + N:1 + N + j * K].mean(1)
            torch.testing.assert_close(prefix_features(image, blocks, t, j, False), latents)
            torch.testing.assert_close(prefix_features(image, blocks, t, j, True), torch.cat([image[t], latents], -1))


def test_encoder_outputs_holds_one_sequence_per_iteration():
    from test_analyze import images, tiny_model
    model = tiny_model()
    N, K, T = model.config.num_image_tokens, model.config.tokens_per_iter, model.config.rollout_iters
    with torch.no_grad(), encoder_outputs(model) as passes:
        model(images(2), iters=[T - 1])
    assert [x.shape for x in passes] == [(2, 1 + N + (t + 1) * K, model.config.encoder_width) for t in range(T)]
    assert not model.encoder._forward_hooks  # removed when the block ends


def test_standard_errors():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 2.0, 4.0])
    paired = mean_difference(a, b)
    assert paired["difference"] == pytest.approx(0.5) and paired["se"] == pytest.approx(np.std(a - b, ddof=1) / 2)
    unpaired = mean_difference(a, b, paired=False)
    assert unpaired["se"] == pytest.approx(np.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 4))
    values = torch.from_numpy(np.random.default_rng(0).normal(size=400))
    se = bootstrap_se(lambda index: values[index].mean().item(), len(values), draws=400)
    assert se == pytest.approx(values.std().item() / 20, rel=0.15)  # the standard error of a mean


def test_depth_criterion_compares_the_estimates_on_reconstruction_and_original():
    depth_net = lambda images: 10 * images.mean(1)  # noqa: E731 (any estimate of depth per pixel)
    images = 0.9 * torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # room for +0.05 within [0, 1]
    recon = images.clone()
    recon[1] += 0.05  # every pixel off by 0.05 in every channel: 0.5 off in depth
    recon[2] = 1 - recon[2]
    errors = depth_error(depth_net, images, recon)
    assert errors[0] == 0 and errors[1].item() == pytest.approx(0.5, abs=1e-5) and errors[2] > 0.5
    assert depth_error_below(0.6, depth_net)(images, recon).tolist() == [True, True, False]
    # on a table of every token count, the fewest tokens below the threshold, as analyze.py selects
    table = torch.tensor([[0.9, 0.2], [0.5, 0.1], [0.1, 0.1]])  # (T, B)
    assert first_passing(table < 0.6).tolist() == [1, 0]
