"""evaluate.py: early exit equals exhaustive search, criteria, and the whole report end to end."""
import json

import pytest
import torch
from PIL import Image

import evaluate
from conftest import TinyFeatures
from data import build_dataset
from selection import first_passing, l1_below, l1_passes, token_accuracy_above, token_score_passes
from model import ALIT, make_config
from seeded import load_vectors


def batch(n=8):
    return torch.stack([build_dataset("shapes", "val", 32)[i][0] for i in range(n)])


def spread_threshold(table):
    """A threshold between observed values that gives the images the most different counts."""
    values = table.flatten().sort().values
    candidates = (values[1:] + values[:-1]) / 2
    return max(candidates.tolist(), key=lambda thr: len(set(first_passing(table < thr).tolist())))


def test_early_exit_chooses_what_exhaustive_search_chooses(stage1_ckpt):
    model = ALIT.from_checkpoint(stage1_ckpt)
    images = batch()
    with torch.no_grad():
        records = model.rollout(images)
        _, gt = model.vqgan.encode(images)
    l1 = torch.stack([(r.recon.clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)) for r in records])
    thr = spread_threshold(l1)
    expected = first_passing(l1 < thr)
    assert len(set(expected.tolist())) > 1  # the batch really needs different counts
    choices = model.encode_adaptive(images, l1_below(thr))
    K = model.config.tokens_per_iter
    assert [c.num_tokens for c in choices] == ((expected + 1) * K).tolist()
    for c, t, i in zip(choices, expected.tolist(), range(len(images))):
        assert torch.equal(c.indices, records[t].indices[i])
        torch.testing.assert_close(c.recon, records[t].recon[i], atol=1e-5, rtol=0)
    # the token-space criterion, with no pixel decoding in the loop
    accuracy = torch.stack([(r.prediction.argmax(-1) == gt).float().mean(1) for r in records])
    thr = -spread_threshold(-accuracy)
    expected = first_passing(accuracy >= thr)  # the criterion's own comparison, ties included
    choices = model.encode_adaptive(images, token_accuracy_above(thr), token_space=True)
    assert [c.num_tokens for c in choices] == ((expected + 1) * K).tolist()
    # encode() returns the same indices as the choices
    assert all(torch.equal(a, c.indices)
               for a, c in zip(model.encode(images, l1_below(1.0)), model.encode_adaptive(images, l1_below(1.0))))


def test_criteria_are_plain_functions():
    images = batch(4)
    assert l1_below(0.01)(images, images).all()
    assert not l1_below(0.01)(images, 1 - images).any()
    gt = torch.randint(10, (2, 5))
    logits = torch.nn.functional.one_hot(gt, 10).float()
    logits[1, :3] = logits[1, :3].roll(1, dims=-1)  # 2 of 5 right in the second image
    assert token_accuracy_above(0.4)(gt, logits).tolist() == [True, True]
    assert token_accuracy_above(0.5)(gt, logits).tolist() == [True, False]
    # evaluate.py's token-space criterion is the base's own: over a VQGAN, the token accuracy
    vqgan = ALIT(make_config("tiny")).base
    for threshold in (0.4, 0.5):
        assert token_score_passes(vqgan, threshold)(gt, logits).tolist() == \
            token_accuracy_above(threshold)(gt, logits).tolist()


def test_saturated_images_stop_where_more_tokens_stop_helping():
    l1 = torch.tensor([[0.09, 0.20], [0.05, 0.12], [0.04, 0.101], [0.03, 0.100]])  # (T=4 counts, 2 images)
    assert first_passing(l1_passes(l1, 0.045)).tolist() == [2, 3]  # the paper's threshold alone
    # the first image reaches the threshold; the second never does, but gains < 2% after its third count
    assert first_passing(l1_passes(l1, 0.045, saturation=0.02)).tolist() == [2, 2]


def test_end_to_end_report(tmp_path, stage1_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(evaluate.InceptionV3, "from_pytorch_fid", classmethod(lambda cls, path: TinyFeatures()))
    out = tmp_path / "eval"
    copy = tmp_path / "copy.pt"  # compared with itself, row for row
    copy.write_bytes(stage1_ckpt.read_bytes())
    fake = tmp_path / "fake.pth"
    fake.touch()  # the stand-in above reads nothing from it
    results = evaluate.main(["--ckpt", str(stage1_ckpt), "--num-images", "24", "--batch-size", "12",
                             "--inception-weights", str(fake), "--speed-images", "8", "--out-dir", str(out),
                             "--compare", str(copy)])
    printed = capsys.readouterr().out
    assert "protocol 'crop'" in printed and "| tokens | L1 |" in printed
    saved = json.loads((out / "metrics.json").read_text())
    rows = saved["per_token_count"]
    K = rows[0]["tokens"]
    assert [r["tokens"] for r in rows] == [K * (t + 1) for t in range(len(rows))]
    assert all(r["rfid"] is not None and r["l1"] > 0 for r in rows)
    assert len(saved["adaptive_l1_saturated"]) == len(saved["adaptive_l1"])  # tiny: the CPU criterion
    assert saved["complexity"]["criterion"] == "l1<0.04 or <=1.03x longest"
    for row in saved["adaptive_l1"] + saved["adaptive_l1_saturated"]:
        assert sum(row["histogram"].values()) == 24
        assert 0 < row["dataset_representation"] <= 1 and row.get("rfid", 0) is not None
    rho = saved["complexity"]["spearman_complexity_vs_tokens"]
    assert rho is None or -1 <= rho <= 1
    assert set(saved["complexity"]["l1_per_level_per_tokens"]) <= {"0", "1", "2", "3", "4"}
    assert saved["early_exit"]["same_counts_as_exhaustive"] == 1.0
    assert [r["l1"] for r in saved["compare"]["per_token_count"]] == [r["l1"] for r in rows]
    usage = saved["codebook"]
    assert usage == saved["compare"]["codebook"] and 0 < usage["fraction_used"] <= 1
    assert usage["codes_used"] == round(usage["fraction_used"] * usage["codebook_size"])
    assert f"{usage['codes_used']}/{usage['codebook_size']} codes used" in printed
    for name in evaluate.OUTPUTS:
        assert (out / name).is_file()
    with Image.open(out / "halting.png") as halting:  # 9 columns of 64-px cells: 8 token counts, the original
        assert halting.size[0] > 9 * 64
    assert results["protocol"] == "crop"


def test_official_checkpoint_and_resize_protocol(tmp_path, capsys):
    vectors = load_vectors("alit_official", "tiny")
    path = tmp_path / "alit_tiny.pth"
    torch.save({"ema": vectors["state_dict"]}, path)
    results = evaluate.main(["--official", str(path), "--heads", "4", "--num-images", "8", "--protocol", "resize",
                             "--speed-images", "4", "--out-dir", str(tmp_path / "eval")])
    assert "no --inception-weights given" in capsys.readouterr().out
    assert results["protocol"] == "resize" and len(results["per_token_count"]) == 4
    assert all(r["rfid"] is None for r in results["per_token_count"])


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--protocol"):
        evaluate.main(["--protocol", "stretch"])
    with pytest.raises(SystemExit, match="--ckpt"):
        evaluate.main(["--ckpt", str(tmp_path / "none.pt")])
