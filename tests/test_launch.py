"""The paper's commands as users launch them, read off each script's own --dry-run plan: 1 GPU, 8, two
nodes of 8; the same 200 epochs at the paper's global batch, data workers on every GPU, and what a
restarted or requeued job resumes. No GPU needed: the plan touches none."""
import json

import pytest
import torch

import plan as planning
import train_stage1
import train_stage2
import train_vqgan
import weights
from data import IMAGENET100_CLASSES
from test_front_door import write_images

SCRIPTS = {"train_vqgan": train_vqgan, "train_stage1": train_stage1, "train_stage2": train_stage2}
PAPER_GLOBAL_BATCH = {"train_vqgan": 96, "train_stage1": 256, "train_stage2": 96}
BASE_LR = {"train_stage1": 1.5e-4, "train_stage2": 1e-4}  # x global batch / 256 (the VQGAN's lr is not scaled)


@pytest.fixture(scope="module")
def imagenet100(tmp_path_factory):
    """A fake ImageNet-100 of 300 training images (3 a class), for the length of an epoch."""
    root = tmp_path_factory.mktemp("imagenet100")
    for i, wnid in enumerate(IMAGENET100_CLASSES):
        write_images(root / "train" / wnid, 3, i)
        write_images(root / "val" / wnid, 1, i)
    return root


def dry_run(script, argv, capsys, said=None) -> dict:
    """The plan the script prints for argv + --dry-run: one JSON line, exit 0, nothing else on stdout
    (`said` gets what it wrote on stderr: the plan in words)."""
    capsys.readouterr()
    assert SCRIPTS[script].main([*map(str, argv), "--dry-run"]) is None
    out, err = capsys.readouterr()
    (line,) = out.strip().splitlines()
    if said is not None:
        said.append(err)
    return json.loads(line)


def launched(monkeypatch, ranks: int, per_node: int):
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))


def paper_dry_run(script, imagenet100, capsys, tmp_path, monkeypatch, said=None) -> dict:
    """The plan of `script` with --dataset imagenet100 on CUDA, the memory estimate stood in for (it takes a
    minute at `small` on a CPU; test_the_plan_of_the_cpu_run_and_its_memory_estimate checks it)."""
    for module in (train_stage1, train_stage2):
        monkeypatch.setattr(module, "model_for_plan", lambda config: config)
    for name in ("stage1_step_memory", "stage2_step_memory"):
        monkeypatch.setattr(planning, name, lambda model, *args: 30e9)
    return dry_run(script, ["--dataset", "imagenet100", "--data-dir", imagenet100, "--device", "cuda",
                            "--stage1-ckpt" if script == "train_stage2" else "--out-dir", tmp_path / "none"], capsys,
                   said)


@pytest.mark.parametrize("ranks, per_node", [(1, 1), (2, 2), (3, 3), (6, 6), (8, 8), (12, 8), (16, 8)])
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_paper_run_is_200_epochs_at_the_paper_batch_on_any_number_of_gpus(script, ranks, per_node, imagenet100,
                                                                            monkeypatch, capsys, tmp_path):
    launched(monkeypatch, ranks, per_node)
    plan = paper_dry_run(script, imagenet100, capsys, tmp_path, monkeypatch)
    assert (plan["device"], plan["world_size"], plan["nodes"]) == ("cuda", ranks, -(-ranks // per_node))
    paper = PAPER_GLOBAL_BATCH[script]
    assert plan["global_batch"] == plan["batch_per_rank"] * plan["grad_accum"] * plan["world_size"]
    assert abs(plan["global_batch"] - paper) <= 0.05 * paper and plan["global_batch_asked"] == paper
    assert plan["batch_per_rank"] <= {"train_stage1": 32, "train_stage2": 12, "train_vqgan": 12}[script]
    assert plan["train_images"] == 300 and abs(plan["epochs"] - 200) <= 1 and abs(plan["warmup_epochs"] - 20) <= 1
    assert plan["workers_per_rank"] >= 1 and plan["precision"] == "bf16"
    if script in BASE_LR:  # the lr of the batch actually used
        assert plan["lr"] == pytest.approx(BASE_LR[script] * plan["global_batch"] / 256)
        assert plan["memory_gb"] == 30 and plan["grad_checkpoint"] is False
        assert plan["step_seconds"] > 0 and plan["gpu_hours"] > 0
    # at 256x256 a checkpoint every 30 minutes, not every 250 steps; stage 1's without its frozen base
    assert plan["checkpoint_every"] == "30 minutes" and plan["checkpoint_gb"] > 0
    assert (plan["all_reduce"], plan["all_reduce_mb"] > 0) == (
        ("none", False) if ranks == 1 else ("bf16" if plan["nodes"] > 1 else "float32", True))


def test_a_global_batch_the_ranks_cannot_split_is_refused_naming_the_counts_that_can(imagenet100, monkeypatch,
                                                                                     capsys, tmp_path):
    launched(monkeypatch, 64, 8)  # 96 images over 64 GPUs: 64 or 128
    with pytest.raises(SystemExit) as error:
        paper_dry_run("train_stage2", imagenet100, capsys, tmp_path, monkeypatch)
    text = str(error.value.code)
    assert text.startswith("error: a global batch of 96 (within 5%) does not split over 64 ranks") and "\n" not in text
    assert "launch 50 or 92 GPUs" in text, text  # 50 x 2 = 100, 92 x 1 = 92: within 5% of 96


def test_the_plan_says_what_a_cluster_run_costs_and_warns_where_it_hurts(imagenet100, monkeypatch, capsys, tmp_path):
    launched(monkeypatch, 16, 8)
    said = []
    plan = paper_dry_run("train_stage2", imagenet100, capsys, tmp_path, monkeypatch, said)
    assert plan["all_reduce_share"] > planning.ALL_REDUCE_WARNING  # 6 images a rank, across two nodes
    assert "warning: the gradient all-reduce is about" in said[0]
    assert plan["gpu"].startswith("an 80 GB H100 (assumed") and plan["memory_budget_gb"] < plan["gpu_memory_gb"]
    assert plan["checkpoints"] * plan["checkpoint_gb"] == pytest.approx(1e3 * plan["checkpoint_tb_written"])
    monkeypatch.setenv("SLURM_NTASKS", "16")  # srun with a task a GPU and 1 CPU each
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.delenv("RANK", raising=False)
    said = []
    assert paper_dry_run("train_stage1", imagenet100, capsys, tmp_path, monkeypatch, said)["cpus_per_rank"] == 1
    assert "warning: 1 CPUs a rank" in said[0]


def test_a_length_or_batch_given_wins_and_one_given_twice_is_refused(imagenet100, monkeypatch, capsys):
    launched(monkeypatch, 8, 8)
    data = ["--dataset", "imagenet100", "--data-dir", str(imagenet100)]
    plan = dry_run("train_stage1", data + ["--steps", "7", "--batch-size", "4"], capsys)
    assert (plan["steps"], plan["batch_per_rank"], plan["grad_accum"], plan["global_batch"]) == (7, 4, 8, 256)
    assert plan["warmup_epochs"] == pytest.approx(20, abs=1)  # the paper's warm-up stays
    plan = dry_run("train_stage2", data + ["--epochs", "3", "--global-batch", "48"], capsys)
    assert (plan["batch_per_rank"], plan["grad_accum"], plan["steps"]) == (6, 1, round(3 * 300 / 48))
    for flags in (["--steps", "7", "--epochs", "2"], ["--warmup-steps", "7", "--warmup-epochs", "2"]):
        with pytest.raises(SystemExit, match="both set the run's length: pass one of them"):
            train_stage1.main(data + flags + ["--dry-run"])


def test_the_plan_of_the_cpu_run_and_its_memory_estimate(monkeypatch, capsys):
    plan = dry_run("train_stage1", [], capsys)  # the first command: tiny, shapes, the CPU
    assert (plan["device"], plan["workers_per_rank"], plan["memory_gb"], plan["global_batch"]) == ("cpu", 0, None, 16)
    assert (plan["steps"], plan["lr"]) == (1500, pytest.approx(3.2e-2 * 16 / 256))
    launched(monkeypatch, 2, 2)
    plan = dry_run("train_stage1", ["--device", "cuda", "--batch-size", "3", "--no-bf16"], capsys)
    torch.manual_seed(0)
    model = train_stage1.frozen_base(train_stage1.ALIT(train_stage1.make_config("tiny")))
    train, _ = train_stage1.parse_args(["--batch-size", "3"])
    # within 1%: which cells halt (random weights, random draws) changes a few saved tensors
    assert plan["memory_gb"] == pytest.approx(planning.stage1_step_memory(model, train.batch_size, torch.device("cpu"),
                                                                          False,
                                                                         False) / 1e9, rel=0.01)
    assert plan["grad_checkpoint"] is False and plan["precision"] == "float32"
    monkeypatch.setattr(planning, "PLANNED_GPU_MEMORY", 2e9 + plan["memory_gb"] * 1e9)  # no room left: on
    assert dry_run("train_stage1", ["--device", "cuda", "--batch-size", "3", "--no-bf16"], capsys)["grad_checkpoint"]


def test_a_restarted_worker_resumes_and_never_deletes_a_checkpoint(tmp_path, monkeypatch, capsys):
    flags = ["--channels", "16", "--norm-groups", "8", "--batch-size", "2", "--no-bf16", "--val-images", "4",
             "--out-dir", str(tmp_path)]
    train_vqgan.main(flags + ["--steps", "3", "--stop-after", "2"])
    first = weights.load_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts ran the command again
    train_vqgan.main(flags + ["--steps", "3", "--overwrite"])
    assert "resumed from" in capsys.readouterr().out
    assert weights.load_checkpoint(tmp_path / "ckpt.prev.pt")["step"] == first["step"] == 2
    assert weights.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3
