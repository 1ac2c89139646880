"""tasks.py's task models that are not their own judges (issue 40): TSC = TOI scored by an independent judge
can fail where the criterion's own model says it holds; "tokens needed" holds at every larger count and
counts the censored images; the depth task is one a small regressor does better than the background depth
everywhere."""
import types

import numpy as np
import pytest
import torch

import tasks
from data import BACKGROUND_DEPTH, ShapesDataset
from verdicts import mean_difference, verdict


def test_tsc_toi_fails_when_an_independent_judge_scores_a_criterion_model_fooled_by_reconstructions():
    T, n = 8, 400
    rng = np.random.default_rng(0)
    # The judge (and the truth): image i's reconstructions carry its class from count ready[i] on.
    ready = torch.from_numpy(rng.integers(0, T, n))
    t = torch.arange(T)[:, None]
    rank_judge = (t < ready).long()  # (T, n) 0 where the judge is right
    # The criterion's model is right on every original, but on reconstructions from a count unrelated to
    # what they hold (fooled[i]): it accepts some that lost the class and refuses some that kept it.
    fooled = torch.from_numpy(rng.integers(0, T, n))
    rank = (t < fooled).long()
    # L1 falls as the reconstruction gains what the judge needs: its thresholds select near ready[i].
    l1 = 0.3 + 0.05 * (ready - t).float() + torch.from_numpy(rng.normal(0, 0.01, (T, n))).float()
    per_image = {"rank": rank, "rank_judge": rank_judge, "rank_original": torch.zeros(n, dtype=torch.long),
                 "rank_judge_original": torch.zeros(n, dtype=torch.long), "label": torch.arange(n) % 5}
    tables = {"L1 < threshold": [l1 < thr for thr in np.linspace(0.15, 0.6, 10)],
              "classifier top-X correct": [rank < 1]}
    alignment = tasks.task_alignment(per_image, tables, seed=0)["accuracy"]
    own, judged = alignment["criterion's own model"]["least"], alignment["independent judge"]["least"]
    # Its own selections look right to the criterion's model (TSC = TOI "holds" by construction) ...
    assert own["difference"] > 0.3 and verdict(own["difference"], own["se"])["verdict"] == "holds"
    # ... and are worse than L1's at the same tokens to the independent judge: the claim fails.
    assert judged["difference"] < -0.1 and verdict(judged["difference"], judged["se"])["verdict"] == "opposite"
    assert tasks.untestable(per_image, "accuracy", "_judge") is None  # both scorers can decide it
    # A criterion model as right as the judge gets no advantage from being its own judge: both readings agree.
    per_image["rank"] = rank_judge
    agree = tasks.task_alignment(per_image, {**tables, "classifier top-X correct": [rank_judge < 1]}, seed=0)
    assert agree["accuracy"]["independent judge"] == agree["accuracy"]["criterion's own model"]


def test_tokens_needed_hold_at_every_larger_count_and_censored_images_count_at_the_longest():
    counts = [8, 16, 24, 32]
    # per image (transposed to (T, n)): where the judge is right (rank 0), and its depth error
    rank_judge = torch.tensor([[0, 1, 0, 0],    # image 0 right at 8, wrong at 16: it needs 24, not 8
                               [1, 1, 1, 0],    # image 1 right at 32 only: censored, counted at 32
                               [1, 0, 0, 0],    # image 2: 16
                               [0, 1, 1, 1]]).T  # image 3 wrong at the longest code: nothing to reach
    depth_judge = torch.tensor([[0.5, 0.2, 0.3, 0.2],    # within 1/0.95 of 0.2 at 16, not at 24: censored
                                [0.2, 0.2, 0.2, 0.2],    # 8
                                [0.21, 0.5, 0.2, 0.2],   # within at 8, not at 16: 24
                                [0.1, 0.1, 0.1, 0.1]]).T
    assert tasks.settled(rank_judge == 0).tolist() == [2, 3, 1, 3]
    needed = tasks.tokens_per_task({"rank_judge": rank_judge, "depth_judge": depth_judge}, counts)
    assert needed["images"] == 3
    assert needed["classification"] == {"tokens": pytest.approx((24 + 32 + 16) / 3), "censored": pytest.approx(1 / 3)}
    assert needed["depth"] == {"tokens": pytest.approx((32 + 8 + 24) / 3), "censored": pytest.approx(1 / 3)}
    paired = mean_difference(torch.tensor([32.0, 8, 24]), torch.tensor([24.0, 32, 16]))
    assert (needed["difference"], needed["se"]) == (pytest.approx(paired["difference"]), pytest.approx(paired["se"]))


def test_a_small_depth_regressor_reads_the_depth_better_than_the_background_depth_everywhere():
    args = types.SimpleNamespace(label="level", seed=0, classifier_images=300, classifier_steps=300)
    scenes = tasks.training_scenes(args, 32)
    torch.manual_seed(0)
    net = tasks.train_task_net("depth", tasks.build_task_net("depth", "level"), scenes, args, "cpu")
    val = ShapesDataset("val", 32, 100)
    items = [val.with_masks(i) for i in range(len(val))]
    images, depth = torch.stack([item.image for item in items]), torch.stack([item.depth for item in items])
    with torch.no_grad():
        error = (net(images) - depth).abs().flatten(1).mean(1)
    flat = (depth - BACKGROUND_DEPTH).abs().flatten(1).mean(1)
    clear = mean_difference(flat, error)
    assert clear["difference"] > 4 * clear["se"] and error.mean() < 0.9 * flat.mean()
    # the judge's architecture predicts the same maps' shape at another image size
    judge = tasks.build_task_net("depth_judge", "level").eval()
    assert judge(torch.rand(2, 3, 64, 64)).shape == (2, 64, 64) and net(torch.rand(2, 3, 64, 64)).shape == (2, 64, 64)


def test_four_task_models_train_once_and_are_read_back_for_the_same_settings(tmp_path, capsys):
    args = types.SimpleNamespace(label="level", seed=0, classifier_images=8, classifier_steps=2, out_dir=str(tmp_path))
    nets = tasks.task_nets(args, 32, torch.device("cpu"))
    assert set(nets) == set(tasks.TASK_NETS) and "training the" in capsys.readouterr().out
    # each judge differs from its criterion's model in architecture and seed
    settings = {name: torch.load(tmp_path / f"{name}.pt", weights_only=True)["settings"] for name in nets}
    for model in ("classifier", "depth"):
        own, judge = settings[model], settings[model + "_judge"]
        assert own["architecture"] != judge["architecture"] and own["seed"] != judge["seed"]
    again = tasks.task_nets(args, 32, torch.device("cpu"))
    assert capsys.readouterr().out.count("read from") == 4
    for name, net in nets.items():
        for a, b in zip(net.state_dict().values(), again[name].state_dict().values()):
            assert torch.equal(a, b)
    args.seed = 1  # other settings: trained anew
    tasks.task_nets(args, 32, torch.device("cpu"))
    assert "read from" not in capsys.readouterr().out
