"""probes.py (linear probing, §A.4) and the depth criterion: each measurement on inputs whose answer is known.
Tab. 2's segments, the recorded encoder outputs and the standard errors: test_analyze.py."""
import pytest
import torch

from probes import class_balanced, pooled_blocks, pooled_features, probe_correct
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


def test_pooled_prefixes_are_means_of_the_first_tokens():
    N, K, T, B, D = 4, 2, 3, 5, 6
    outputs = [torch.randn(B, 1 + N + (t + 1) * K, D) for t in range(T)]
    image, blocks = pooled_blocks(outputs, N, K)
    for t in range(T):
        torch.testing.assert_close(image[t], outputs[t][:, 1:1 + N].mean(1))
        for j in range(1, t + 2):
            latents = outputs[t][:, 1 + N:1 + N + j * K].mean(1)
            torch.testing.assert_close(pooled_features(image, blocks, t, j, "latents", N, K), latents)
            torch.testing.assert_close(pooled_features(image, blocks, t, j, "two means", N, K),
                                       torch.cat([image[t], latents], -1))


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
