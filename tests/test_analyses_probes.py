"""Issue 40's probes (probes.py, §A.4) and familiarity (familiarity.py, §A.2, Tab. 1): the test set's power,
the official pooling, comparisons fixed before the scores, Tab. 1's lengths and the base's floor."""
import pytest
import torch

from familiarity import against_in_distribution, set_summary, tab1_lengths
from model import make_config
from observe import encoder_outputs
from probes import (POOLINGS, SE_TARGET, compared, encoder_passes, linear_probes, pooled_blocks, pooled_features,
                    probe_claims, probed_cells)
from test_analyze import images, tiny_model

N, K, T, D = 4, 2, 3, 6


def features(n: int, seed: int, classes: int = 3) -> tuple:
    """ProbeFeatures.result() of n images whose class shows weakly in every pooled block, each block and
    iteration with noise of its own, so that probes of different cells disagree on some images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    signal = torch.nn.functional.one_hot(labels, D).float()  # (n, D)
    noisy = lambda *shape: signal + 1.5 * torch.randn(*shape, n, D, generator=generator)  # noqa: E731
    blocks = noisy(T, T)
    for t in range(T):
        blocks[t, t + 1:] = 0  # blocks not there yet (pooled_blocks)
    x = {"image": noisy(T), "blocks": blocks, "control_image": noisy(T), "control_blocks": blocks.clone(),
         "vqgan": noisy()}
    return x, labels


def test_the_claims_standard_error_halves_at_four_times_the_test_images():
    train, train_labels = features(600, seed=0)
    ses = []
    for n in (400, 1600):
        test, test_labels = features(n, seed=1)
        probes = linear_probes(train, train_labels, test, test_labels, 3, N, K)
        claims = probe_claims(probes["correct"], T, K)
        ses.append([row["se"] for rows in claims.values() for row in rows.values()])
    ratios = torch.tensor(ses[1]) / torch.tensor(ses[0])
    assert ratios.mean().item() == pytest.approx(0.5, abs=0.08)  # SE ~ 1/sqrt(n)
    assert all(0.35 < r < 0.7 for r in ratios.tolist())
    assert SE_TARGET == pytest.approx(0.039 / 3)


def test_the_official_pooling_is_one_mean_over_image_and_latent_tokens():
    outputs = [torch.randn(5, 1 + N + (t + 1) * K, D) for t in range(T)]  # [class; N image; t*K latent]
    image, blocks = pooled_blocks(outputs, N, K)
    for t in range(T):
        for j in range(1, t + 2):
            one = pooled_features(image, blocks, t, j, "one mean", N, K)
            torch.testing.assert_close(one, outputs[t][:, 1:1 + N + j * K].mean(1))  # the class token left out
            latents = outputs[t][:, 1 + N:1 + N + j * K].mean(1)
            torch.testing.assert_close(pooled_features(image, blocks, t, j, "latents", N, K), latents)
            torch.testing.assert_close(pooled_features(image, blocks, t, j, "two means", N, K),
                                       torch.cat([outputs[t][:, 1:1 + N].mean(1), latents], -1))
        # all latents so far: the official code's x[:, 1:] at this iteration, in one mean
        everything = pooled_features(image, blocks, t, t + 1, "one mean", N, K)
        torch.testing.assert_close(everything, outputs[t][:, 1:].mean(1))
    assert set(POOLINGS) == {"one mean", "two means", "latents"}


def test_the_encoder_only_passes_are_the_rollouts_encoder_outputs():
    model = tiny_model(zero_init_encoder_residuals=False)
    x = images(3)
    with torch.no_grad(), encoder_outputs(model) as recorded:
        model(x, reconstruct=True)
        passes = encoder_passes(model, x, model.base_tokens(x))
    assert len(passes) == model.config.rollout_iters
    for a, b in zip(passes, recorded):
        torch.testing.assert_close(a, b)


def test_the_compared_iterations_and_prefixes_do_not_depend_on_the_test_scores():
    assert compared(8) == {"recurrence": {"iterations": [1, 2], "against": 0},
                           "prefix": {"blocks": [2, 4], "against": 8}}
    small = make_config("small")
    assert [small.tokens_per_iter * j for j in compared(small.rollout_iters)["prefix"]["blocks"]] == [64, 128]
    T8, n = 8, 40
    cells = probed_cells(T8)
    every_prefix_at_the_last = {(T8 - 1, j) for j in range(1, T8 + 1)}
    assert {(t, 1) for t in range(T8)} | {(t, t + 1) for t in range(T8)} | every_prefix_at_the_last == set(cells)
    generator = torch.Generator().manual_seed(0)
    base = {cell: torch.rand(n, generator=generator) < 0.5 for cell in cells}
    # the test scores favour another iteration (4) and another prefix (3 blocks) in the second table
    favoured = dict(base)
    favoured[3, 1] = favoured[3, 4] = favoured[T8 - 1, 3] = torch.ones(n, dtype=torch.bool)
    claims = [probe_claims({("trained", pooling, t, j): hit for (t, j), hit in table.items() for pooling in POOLINGS},
                           T8, 8) for table in (base, favoured)]
    for rows in claims:
        a, b = rows["one mean"]["recurrence, first K"], rows["one mean"]["prefix"]
        assert (a["iterations"], a["against"], a["tokens"]) == ([2, 3], 1, [8, 8])
        assert rows["one mean"]["recurrence, all so far"]["tokens"] == [16, 24]
        assert (b["tokens"], b["against"]) == ([16, 32], 64)
    for name in ("recurrence, first K", "recurrence, all so far", "prefix"):
        assert claims[0]["one mean"][name]["difference"] == claims[1]["one mean"][name]["difference"]
    expected = ((base[1, 1].float() + base[2, 1].float()) / 2 - base[0, 1].float()).mean().item()
    assert claims[0]["one mean"]["recurrence, first K"]["difference"] == pytest.approx(expected)
    assert claims[0]["one mean"]["recurrence, first K"]["paper"] == pytest.approx(0.039)


def test_familiarity_lengths_are_a_quarter_of_the_maximum_and_the_maximum():
    assert tab1_lengths(make_config("tiny").token_counts) == (16, 64)
    assert tab1_lengths(make_config("small").token_counts) == (64, 256)  # Tab. 1's 64 and 256


def l1_table(floor: float, curve: list, n: int = 60, seed: int = 0) -> dict:
    """A familiarity table of n images whose L1 follows `curve` over the counts and whose base alone
    reconstructs at `floor`, give or take a little noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = 0.002 * torch.randn(n, generator=generator)
    return {"l1": torch.tensor(curve)[:, None] + noise, "base_l1": floor + noise, "level": torch.arange(n) % 5}


def test_familiarity_judges_gaps_relative_to_the_base_and_names_its_floors():
    counts = [8, 16, 24, 32]
    lengths = tab1_lengths(counts)
    assert lengths == (8, 32)
    criterion = {"default_threshold": 0.04, "saturation": 0.03}
    reference = l1_table(0.02, [0.08, 0.05, 0.03, 0.021])  # in distribution: passes 0.04 at 24 tokens
    # unseen, the base's floor twice as high, the gap twice as large: the same gap relative to the floor
    double = l1_table(0.04, [0.16, 0.10, 0.06, 0.042], seed=1)
    # unseen, ALIT at its base's floor from the first length on: no gap can show
    flat = l1_table(0.2, [0.2, 0.2, 0.2, 0.2], seed=2)
    ref_row = set_summary(reference, counts, lengths, criterion, True)
    assert ref_row["gap"]["difference"] == pytest.approx(0.059, abs=1e-3)
    assert ref_row["relative_gap"]["difference"] == pytest.approx(0.059 / 0.02, rel=0.05)
    assert ref_row["tokens"]["threshold"]["mean"] == 24 and ref_row["above_threshold_at_the_floor"] == 0
    row = set_summary(double, counts, lengths, criterion, True)
    claims = against_in_distribution(double, reference, counts, lengths, criterion, True, row, ref_row)
    assert claims["gap"]["verdict"] == "holds"  # the plain gap grows with the floor
    assert abs(claims["relative_gap"]["difference"]) < 0.1 and claims["relative_gap"]["verdict"] != "holds"
    row = set_summary(flat, counts, lengths, criterion, True)
    assert row["above_threshold_at_the_floor"] == 1
    claims = against_in_distribution(flat, reference, counts, lengths, criterion, True, row, ref_row)
    for name in ("gap", "relative_gap"):
        assert claims[name]["verdict"] == "inconclusive" and "within 2 SE of its base" in claims[name]["why"]
    for rule in ("default", "threshold"):
        claim = claims[f"tokens, {rule} rule"]
        assert claim["verdict"] == "inconclusive" and "above the threshold 0.04 for 100%" in claim["why"]
