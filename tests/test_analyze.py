"""analyze.py and its analyses: attention weights from the math path and the recorded rollout (observe.py),
shapes masks, binding scores (binding.py), the classifier criterion (tasks.py), Tab. 2's segments
(segments.py), the standard errors (verdicts.py), and the whole run on a tiny untrained model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import probes
from binding import adjusted_rand_index, binding_scores, matched_miou
from conftest import TinyFeatures
from data import IMAGENET100_CLASSES, LEVELS, PALETTE, ShapesDataset
from model import ALIT, make_config
from observe import encoder_outputs, token_labels
from seeded import load_vectors
from segments import segment_ious, top_mass_segment
from selection import first_passing
from tasks import true_label_rank
from verdicts import bootstrap_se, mean_difference
from vqgan import PRESETS as VQGAN_PRESETS
from vqgan import VQGANConfig


def tiny_model(**overrides):
    torch.manual_seed(0)
    vqgan = VQGANConfig(**{**VQGAN_PRESETS["tiny"], "channels": 16, "norm_groups": 8})
    return ALIT(make_config("tiny", encoder_width=64, encoder_heads=2, decoder_width=64, decoder_heads=2,
                            vqgan=vqgan, **overrides)).eval()


def images(n=4, size=32):
    data = ShapesDataset("val", size, n)
    return torch.stack([data[i][0] for i in range(n)])


def test_math_path_weights_give_what_sdpa_computes():
    # Without zero-initialised residuals every encoder pass really uses its attention output.
    model = tiny_model(zero_init_encoder_residuals=False, encoder_layers=2)
    x = images()
    with torch.no_grad():
        fused = model(x, reconstruct=True)
        attention = [block.attn for block in (*model.encoder, *model.decoder)]
        for attn in attention:
            attn.record = []
        math = model(x, reconstruct=True)
    T, K, N = model.config.rollout_iters, model.config.tokens_per_iter, model.config.num_image_tokens
    last = model.encoder[-1].attn.record
    assert len(last) == T  # one call per encoder pass
    for t, weights in enumerate(last):
        assert weights.shape == (len(x), 2, 1 + N + (t + 1) * K, 1 + N + (t + 1) * K)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    for a, b in zip(fused, math):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(b.prediction, a.prediction, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.recon, a.recon, rtol=0, atol=1e-5)
    for attn in attention:
        attn.record = None


def test_shapes_masks_match_the_rendered_pixels():
    data = ShapesDataset("val", 32, 60)
    seen_levels, nearest_own = set(), []
    for i in range(len(data)):
        image, level, labels, num_shapes, _ = data.with_masks(i)
        assert torch.equal(image, data[i][0])  # the same scene, bit for bit
        assert labels.shape == (32, 32) and 0 <= labels.min() and labels.max() <= 1 + num_shapes
        assert LEVELS[level].objects[0] <= num_shapes <= LEVELS[level].objects[1]
        seen_levels.add(level)
        pixels = (image * 255).round().permute(1, 2, 0).reshape(-1, 3)  # (H*W, 3)
        # Inside a segment (no other label within 3 pixels, the reach of the 4x Lanczos downsampling)
        # the pixels are its palette colour, give or take Lanczos' ringing: for the background halves,
        # and for the shapes of the levels without textures (stripes and checkers blend at their edges).
        padded = torch.nn.functional.pad(labels[None, None].float(), (3, 3, 3, 3), mode="replicate")
        windows = padded.unfold(2, 7, 1).unfold(3, 7, 1).reshape(32, 32, 49)
        inside = (windows == labels[..., None]).all(-1).reshape(-1)
        flat = labels.reshape(-1)
        for segment in flat[inside].unique():
            if segment < 2 or LEVELS[level].texture == 0:
                colours = pixels[inside & (flat == segment)]
                colour = colours.median(0).values
                assert (colours - colour).abs().max() <= 2, (i, int(segment))
                assert (torch.from_numpy(PALETTE).float() == colour).all(1).any(), (i, int(segment))
        if LEVELS[level].texture == 0:
            # Edges too: a pixel is nearer its own segment's colour than any other segment's (a mask
            # one pixel off gets 92% of the pixels right; the masks 99%, edge blends costing the rest).
            segments = flat.unique()
            colours = torch.stack([pixels[flat == segment].median(0).values for segment in segments])
            distance = torch.cdist(pixels, colours)  # (H*W, segments)
            own = distance[torch.arange(len(pixels)), torch.searchsorted(segments, flat)]
            nearest_own.append((own <= distance.min(1).values).float().mean().item())
    assert seen_levels == set(range(len(LEVELS)))
    assert min(nearest_own) > 0.9 and np.mean(nearest_own) > 0.97


def test_binding_score_is_one_for_the_objects_and_zero_for_chance():
    data = ShapesDataset("val", 32, 40)
    truth = token_labels([data.with_masks(i)[2] for i in range(len(data))], patch_size=4)  # (40, 64)
    rng = np.random.default_rng(0)
    random_ari, random_fg = [], []
    for labels in truth:
        renamed = rng.permutation(64)[labels]  # the same partition under other names
        scores = binding_scores(labels, renamed)
        assert scores["ari"] == pytest.approx(1) and scores["miou"] == pytest.approx(1)
        assert np.isnan(scores["fg_ari"]) or scores["fg_ari"] == pytest.approx(1)
        chance = binding_scores(labels, rng.integers(0, 16, size=labels.shape))
        random_ari.append(chance["ari"])
        random_fg.append(chance["fg_ari"])
    assert abs(np.mean(random_ari)) < 0.03 and abs(np.nanmean(random_fg)) < 0.05
    # the edge cases: one segment each, and a split of one segment
    assert adjusted_rand_index(np.zeros(5), np.ones(5)) == 1
    assert adjusted_rand_index(np.zeros(4), np.array([0, 0, 1, 1])) == 0
    assert matched_miou(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_classifier_criterion_picks_the_fewest_tokens_that_classify_correctly():
    T, classes = 4, 3
    labels = torch.tensor([0, 1, 2, 0])
    predicted = torch.tensor([[1, 1, 2, 2],   # iteration 1: right for images 1 and 2
                              [0, 2, 2, 2],   # iteration 2: image 0 right, image 1 wrong again
                              [0, 1, 2, 1],
                              [0, 1, 0, 1]])  # image 3 is never right
    logits = torch.nn.functional.one_hot(predicted, classes).float()  # (T, B, classes)
    logits[..., 0] += 0.5  # class 0 second best everywhere it is not the best
    ranks = true_label_rank(logits, labels)
    # the criterion's pass table is ranks < X (tasks.criteria), its selection the first count to pass
    assert first_passing(ranks < 1).tolist() == [1, 0, 0, T - 1]
    # top-2: image 3's label 0 is second best from the first iteration on
    assert first_passing(ranks < 2).tolist() == [0, 0, 0, 0]


def test_whole_run_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analyze.InceptionV3, "from_pytorch_fid", classmethod(lambda cls, path: TinyFeatures(8)))
    model = tiny_model(rollout_iters=4)  # 4 iterations: 10 cells to probe per table, not 22
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": {}}, ckpt)
    out = tmp_path / "analyze"
    ood = tmp_path / "ood"
    ood.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ood / f"{i}.png")
    flags = ["--ckpt", str(ckpt), "--num-images", "10", "--batch-size", "5", "--attention-images", "2",
             "--ood-dir", str(ood), "--classifier-images", "32", "--classifier-steps", "2", "--probe-images", "20",
             "--probe-test-images", "20", "--familiarity-images", "6", "--out-dir", str(out),
             "--inception-weights", "fake.pth", "--l1-thresholds", "0.1,0.2"]
    results = analyze.main(flags)
    printed = capsys.readouterr().out
    assert "| all levels |" in printed and "| L1 < threshold |" in printed and "| FID |" in printed
    assert [r["threshold"] for r in results["selection"]["L1 < threshold"]] == [0.1, 0.2]
    assert all(r["fid"] is not None for rows in results["selection"].values() for r in rows)
    for name in ("binding.png", "complexity.png", "histograms.png", "selection.png", "classifier.pt", "depth.pt",
                 "probe.png", "familiarity.png", "segments.png"):
        assert (out / name).is_file(), name
    assert len(results["attention_maps"]) == 2 and all((out / p).is_file() for p in results["attention_maps"])
    saved = json.loads((out / "analysis.json").read_text())
    T, K = model.config.rollout_iters, model.config.tokens_per_iter
    assert list(saved["binding"]["all"]["recurrent"]) == [str((t + 1) * K) for t in range(T)]
    fixed = saved["selection"]["every image at one count"]
    assert [r["dataset_representation"] for r in fixed] == pytest.approx([(t + 1) / T for t in range(T)])
    assert set(saved["fraction_for_95_percent"]) == set(saved["selection"])
    assert "depth error < threshold" in saved["selection"] and all(r["depth"] is not None for r in fixed)
    assert set(saved["task_alignment"]) == {"accuracy", "depth"}
    probe = saved["linear_probe"]
    assert list(probe["trained"]["one mean"][str(T)]) == [str((j + 1) * K) for j in range(T)]  # every prefix, last
    assert list(probe["trained"]["latents"][str(T)]) == [str(K), str(2 * K), str(T * K)]  # the claims' prefixes
    assert list(probe["untrained"]["one mean"]["1"]) == [str(K)]
    assert set(saved["familiarity"]) == {"criterion", "threshold rule", "lengths", "matched", "in distribution",
                                         "kinds", "textures", "palette", "--ood-dir"}
    assert saved["familiarity"]["--ood-dir"]["images"] == 3 and "per_level" not in saved["familiarity"]["--ood-dir"]
    segments = saved["segments"]
    assert list(segments["tables"][segments["main reading"]]["percentile"]["hungarian"]) == [
        "40%", "60%", "80%", "best X per image"]
    assert segments["maps"].startswith("decoder layer 1 of 1") and "untrained ALIT's decoder, all tokens" in segments[
        "tables"]
    from verdicts import VERDICTS
    assert all(d["verdict"] in VERDICTS for claim in segments["claims"].values() for d in claim.values())
    analyze.main(flags)  # the classifier and the depth regressor come from their caches
    printed = capsys.readouterr().out
    assert "classifier of level read from" in printed and "depth regressor read from" in printed


def write_class_colours(folder, classes, seed: int):
    """One small JPEG per class folder, a flat colour of its own (5 x 4 x 5 levels of R, G, B) under
    noise: a probe that reads the class from train/ finds it in val/, where mislaid labels score chance."""
    rng = np.random.default_rng(seed)
    colours = [(r, g, b) for r in (0, 64, 128, 192, 255) for g in (0, 85, 170, 255) for b in (0, 64, 128, 192, 255)]
    for colour, name in zip(colours, classes):
        (folder / name).mkdir(parents=True)
        pixels = np.clip(np.array(colour) + rng.normal(0, 4, (32, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name / "0.JPEG")


def test_linear_probe_of_imagenet100_classes(tmp_path, capsys):
    for seed, split in enumerate(("train", "val")):  # a fake ImageNet-100; the tiny 32x32 model crops its images
        write_class_colours(tmp_path / "in100" / split, IMAGENET100_CLASSES, seed)
    ckpt = tmp_path / "ckpt.pt"
    model = tiny_model(rollout_iters=2)  # 3 cells to probe per table
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": {}}, ckpt)
    results = analyze.main(["--ckpt", str(ckpt), "--dataset", "imagenet100", "--data-dir", str(tmp_path / "in100"),
                            "--num-images", "100", "--probe-images", "100", "--probe-test-images", "100",
                            "--attention-images", "1",
                            "--out-dir", str(tmp_path / "analyze")])
    printed = capsys.readouterr().out
    assert "the linear probe of the classes" in printed and "Linear probe of the image's class (100 classes" in printed
    probe = json.loads((tmp_path / "analyze" / "analysis.json").read_text())["linear_probe"]
    assert probe["label"] == "the image's class" and probe["classes"] == 100
    assert (probe["train_images"], probe["test_images"], probe["test_classes"]) == (100, 100, 100)
    assert probe["control_test_images"] == 25  # the untrained control scores the first quarter
    accuracies = [v for source in ("trained", "untrained") for table in probe[source].values()
                  for row in table.values() for v in row.values()]
    assert len(accuracies) == 4 * 3 and all(0 <= v <= 1 for v in accuracies + [probe["vqgan grid"]])
    assert probe["chance"] == 0.01 and set(probe["claims"]) == {"one mean", "two means", "latents"}
    # the colours are told apart (an untrained tokenizer's pooled tokens keep them): train and val labels agree
    assert probe["vqgan grid"] > 0.5 and probe["trained"]["one mean"]["2"]["16"] > 0.5
    assert (tmp_path / "analyze" / "probe.png").is_file() and "binding" not in results and "segments" not in results
    # no classes, or no train split: the line says why there is no probe
    write_class_colours(tmp_path / "mine" / "val", ["a", "b"], 0)
    for dataset, why in (("folder", "no classes either, so no linear probe"),
                         ("imagenet", "no linear probe, it trains on the train split")):
        probe_set, note = probes.probe_images(analyze.parse_args(["--dataset", dataset, "--data-dir",
                                                                   str(tmp_path / "mine")]), 32)
        assert probe_set is None and note.startswith(why), note


def test_an_official_checkpoint_is_analysed_at_its_decoder_layer_and_tab1_lengths(tmp_path):
    """README's `analyze.py --official PATH --dataset ... --ood-dir ...`: the official layout's maps come from
    the second to last decoder layer (Ours-S's 7th of 8) and familiarity is measured at a quarter of the
    maximum tokens and the maximum (Tab. 1's 64 and 256 at 256x256)."""
    vectors = load_vectors("alit_official", "tiny")  # 2 decoder layers, 4 iterations of 8 tokens
    path = tmp_path / "alit_tiny.pth"
    torch.save({"ema": vectors["state_dict"]}, path)
    for folder in ("photos", "unseen"):
        write_class_colours(tmp_path / folder, ["a", "b", "c"], seed=len(folder))
    results = analyze.main(["--official", str(path), "--heads", str(vectors["config"]["encoder_num_heads"]),
                            "--dataset", "folder", "--data-dir", str(tmp_path / "photos"), "--ood-dir",
                            str(tmp_path / "unseen"), "--attention-images", "1", "--out-dir", str(tmp_path / "an")])
    assert results["checkpoint"] == str(path) and results["tokens"] == [8, 16, 24, 32]
    assert results["attention_maps_source"] == "decoder layer 1 of 2"
    assert results["familiarity"]["lengths"] == [8, 32] and results["familiarity"]["--ood-dir"]["images"] == 3
    assert (tmp_path / "an" / "attention_0.png").is_file() and (tmp_path / "an" / "familiarity.png").is_file()


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--ckpt"):
        analyze.main(["--ckpt", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit, match="--top-x"):
        analyze.main(["--top-x", "best"])
    with pytest.raises(SystemExit, match="--l1-thresholds"):
        analyze.main(["--l1-thresholds", "low,high"])


def test_encoder_outputs_holds_one_sequence_per_iteration():
    model = tiny_model()
    N, K, T = model.config.num_image_tokens, model.config.tokens_per_iter, model.config.rollout_iters
    with torch.no_grad(), encoder_outputs(model) as passes:
        model(images(2), iters=[T - 1])
    assert [x.shape for x in passes] == [(2, 1 + N + (t + 1) * K, model.config.encoder_width) for t in range(T)]
    assert not model.encoder._forward_hooks  # removed when the block ends


def test_top_mass_of_a_map_equal_to_a_mask_is_the_mask():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[3, 4, 11, 12, 13, 20]] = True
    truth = torch.where(mask, 2, 0)[None]  # one object on the background
    for share in (0.4, 0.6, 0.8, 1.0):
        segment = top_mass_segment(mask.float(), share)
        assert torch.equal(segment, mask)
        iou, present = segment_ious(segment[None, None], truth)
        assert iou.item() == 1 and present.tolist() == [[True]]
    # distinct values: the highest tokens until the share of the mass is reached
    ramp = torch.tensor([4.0, 3.0, 2.0, 1.0])  # mass 10
    assert top_mass_segment(ramp, 0.4).tolist() == [True, False, False, False]
    assert top_mass_segment(ramp, 0.6).tolist() == [True, True, False, False]
    assert top_mass_segment(ramp, 0.8).tolist() == [True, True, True, False]


def test_segment_ious_are_each_objects_overlap_with_each_token():
    truth = torch.tensor([[0, 0, 0, 0, 2, 2, 3, 3]])
    segments = torch.tensor([[[0, 0, 0, 0, 1, 1, 1, 0],   # object 2 (IoU 2/3), object 3 (1/4)
                              [0, 0, 1, 1, 0, 0, 0, 0],   # half the background: no object's
                              [0, 0, 0, 0, 0, 0, 1, 1]]]).bool()  # object 3 exactly
    iou, present = segment_ious(segments, truth)  # objects only (shapes' labels from 2): (B, objects, tokens)
    torch.testing.assert_close(iou[0], torch.tensor([[2 / 3, 0, 0], [1 / 4, 0, 1]]))


def test_standard_errors():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 2.0, 4.0])
    paired = mean_difference(a, b)
    assert paired["difference"] == pytest.approx(0.5) and paired["se"] == pytest.approx(np.std(a - b, ddof=1) / 2)
    unpaired = mean_difference(a, b, paired=False)
    assert unpaired["se"] == pytest.approx(np.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 4))
    values = torch.from_numpy(np.random.default_rng(0).normal(size=400))
    se = bootstrap_se(lambda index: values[index].mean().item(), len(values), draws=400)
    assert se == pytest.approx(values.std().item() / 20, rel=0.15)  # the standard error of a mean


def test_the_verdict_maps_intervals_to_each_word_of_its_scale():
    from verdicts import VERDICTS, verdict
    words = {verdict(0.05, 0.01)["verdict"], verdict(-0.05, 0.01)["verdict"],
             verdict(0.001, 0.01, paper=0.2)["verdict"], verdict(0.01, 0.02, paper=0.03)["verdict"],
             verdict(0.01, 0.02)["verdict"],
             verdict(0.0, 0.0, floor="L1 at 8 tokens is the same in and out")["verdict"],
             verdict(0.3, 0.01, untestable="shuffled maps score as high")["verdict"]}
    assert words == set(VERDICTS)
    assert verdict(0.05, 0.01)["verdict"] == "holds" and verdict(0.019, 0.01)["verdict"] == "inconclusive"
    assert verdict(-0.021, 0.01)["verdict"] == "opposite"
    assert verdict(0.0, 0.01, paper=0.039)["verdict"] == "does not hold"  # 0.039 lies beyond 2 SE
    assert verdict(0.008, 0.02, paper=0.039)["verdict"] == "inconclusive"  # issue 40's probe: within 2 SE of both
    assert verdict(0.3, 0.01, untestable="why")["why"] == "why"
