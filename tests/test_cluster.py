"""What a week on a cluster meets, through the scripts' own entry points on gloo ranks: a job requeued on
another number of GPUs, stage 1's checkpoints without the frozen base, ranks shown different files, and
ranks that Slurm's srun started (no torchrun). Each multi-rank run is a set of plain processes with the
variables a launcher sets, one thread each."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train_stage1
import train_vqgan
from conftest import SMALL_ALIT, SMALL_VQGAN
from model import ALIT
from weights import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
VQGAN_FLAGS = SMALL_VQGAN + ["--batch-size", "2", "--val-images", "4", "--log-every", "1", "--save-every", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(n: int, argv, env_of=None, code: str = "import train_vqgan; train_vqgan.main(sys.argv[1:])",
          timeout: float = 300) -> list:
    """`code` in n processes as the ranks of one run (torchrun's variables, or env_of(rank)'s, where None
    unsets one); returns each one's (returncode, stdout, stderr)."""
    port = free_port()
    processes = []
    for rank in range(n):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)} \
            if env_of is None else env_of(rank)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))},
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env}
        env = {k: v for k, v in env.items() if v is not None}  # None: unset
        program = f"import sys; sys.path[:0] = [{ROOT!r}, {TESTS!r}]\n{code}"
        processes.append(subprocess.Popen([sys.executable, "-c", program, *map(str, argv)], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
        return [(p.returncode, *output) for p, output in zip(processes, outputs)]
    finally:
        for p in processes:
            p.kill()


def last_error(stderr: str) -> str:
    line = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr, stderr[-3000:]
    return line


def test_a_checkpoint_of_2_ranks_resumed_on_3_refuses_unless_the_change_is_accepted(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = VQGAN_FLAGS + ["--steps", "6", "--out-dir", out]
    assert all(code == 0 for code, *_ in ranks(2, flags + ["--stop-after", "2"]))  # global batch 2 x 2
    saved = load_checkpoint(out / "ckpt.pt")
    assert (saved["step"], saved["global_batch"], saved["images_seen"]) == (2, 4, 8)

    monkeypatch.setenv("WORLD_SIZE", "3")  # the plan shows the checkpoint beside the run that would resume it
    capsys.readouterr()
    train_vqgan.main([*map(str, flags), "--resume", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["resume"] == {"step": 2, "global_batch": 4, "images_seen": 8} and plan["global_batch"] == 6

    refused = ranks(3, flags + ["--resume"])  # requeued on 3 GPUs: a global batch of 6
    for code, _, stderr in refused:
        line = last_error(stderr)
        assert code == 1 and line.startswith("error: --resume:") and "global batch 4 -> 6" in line, line
        assert "--accept-changes" in line
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2  # nothing trained

    accepted = ranks(3, flags + ["--resume", "--accept-changes", "--stop-after", "1"])
    assert all(code == 0 for code, *_ in accepted), accepted[0][2][-3000:]
    assert "--accept-changes: continuing" in accepted[0][1]
    resumed = load_checkpoint(out / "ckpt.pt")
    assert (resumed["step"], resumed["global_batch"], resumed["images_seen"]) == (3, 6, 8 + 6)
    assert len(resumed["ranks"]) == 3
    # the added rank draws from a stream of its own, not rank 0's or rank 1's again
    streams = [r["rng"]["torch"] for r in resumed["ranks"]]
    assert not torch.equal(streams[2], streams[0]) and not torch.equal(streams[2], streams[1])


def test_a_stage1_checkpoint_keeps_the_frozen_base_by_file_and_checks_it(tmp_path, vqgan_ckpt):
    base = tmp_path / "vqgan.pt"
    shutil.copy(vqgan_ckpt, base)
    flags = SMALL_ALIT + ["--base-ckpt", str(base), "--batch-size", "2", "--steps", "2", "--out-dir",
                          str(tmp_path / "s1")]
    model = train_stage1.main(flags)
    ckpt = load_checkpoint(tmp_path / "s1" / "ckpt.pt")
    assert not [k for k in ckpt["model"] if k.startswith("vqgan.")] and ckpt["base_file"]["path"] == str(base)
    loaded = ALIT.from_checkpoint(tmp_path / "s1" / "ckpt.pt", ema=False)  # the base read back from its file
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.manual_seed(0)  # reading the base draws nothing from the caller's stream (stage 2's discriminator next)
    ALIT(loaded.config)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ALIT.from_checkpoint(tmp_path / "s1" / "ckpt.pt")
    assert torch.equal(torch.rand(3), expected)

    other = tmp_path / "other.pt"  # another VQGAN where the recorded one was
    state = torch.load(base, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    shutil.copy(other, base)
    with pytest.raises(ValueError, match="was trained over another .*vqgan.pt .its sha256 differs"):
        ALIT.from_checkpoint(tmp_path / "s1" / "ckpt.pt")
    with pytest.raises(SystemExit) as error:
        train_stage1.main(flags + ["--steps", "3", "--resume"])
    text = str(error.value.code)
    assert text.startswith("error: --resume:") and "sha256 differs" in text and "\n" not in text, text
    base.unlink()
    with pytest.raises(ValueError, match="keeps its frozen base as the file .*, which is gone"):
        ALIT.from_checkpoint(tmp_path / "s1" / "ckpt.pt")


SHOWN_A_STALE_FILE = """
import os, checkpoint, train_vqgan
read = checkpoint.read
def read_then_stale(path, ctx):  # rank 1 ends up holding an older checkpoint than rank 0
    ckpt, where = read(path, ctx)
    return ({**ckpt, "step": ckpt["step"] - 2}, where) if ctx.rank == 1 else (ckpt, where)
if os.environ.get("STALE_AFTER_BROADCAST"):
    checkpoint.read = read_then_stale
elif os.environ["RANK"] == "1":  # rank 1's view of the folder: the checkpoint before, under ckpt.pt's name
    import weights
    checkpoint.load_checkpoint = lambda path: weights.load_checkpoint(path.with_name("ckpt.prev.pt"))
train_vqgan.main(sys.argv[1:])
"""


def test_ranks_shown_different_checkpoints_resume_rank_0s_or_stop_with_one_line(tmp_path):
    out = tmp_path / "run"
    flags = VQGAN_FLAGS + ["--steps", "6", "--out-dir", out]
    assert all(code == 0 for code, *_ in ranks(2, flags + ["--stop-after", "4"]))  # ckpt.pt at 4, ckpt.prev.pt at 2
    # rank 1 would read step 2: only rank 0 reads, and every rank continues from its step 4
    results = ranks(2, flags + ["--resume", "--stop-after", "1"], code=SHOWN_A_STALE_FILE)
    assert all(code == 0 for code, *_ in results), results[1][2][-3000:]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 5

    # ranks holding different steps (whatever the cause) never train: one line each, within the timeout
    results = ranks(2, flags + ["--resume", "--dist-timeout", "20"], code=SHOWN_A_STALE_FILE, timeout=120,
                    env_of=lambda rank: {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                         "LOCAL_WORLD_SIZE": "2", "STALE_AFTER_BROADCAST": "1"})
    for code, _, stderr in results:
        line = last_error(stderr)
        assert code == 1 and line.startswith("error: --resume: the ranks hold different checkpoints"), line
    assert load_checkpoint(out / "ckpt.pt")["step"] == 5


def slurm_task(rank: int, restarts: int = 0) -> dict:
    """What `srun --ntasks=2` sets for task `rank` (no RANK: torchrun is not in the way)."""
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_RESTART_COUNT": str(restarts)}


def test_srun_tasks_run_as_the_ranks_of_one_run_and_a_requeue_resumes_deleting_nothing(tmp_path):
    out = tmp_path / "run"
    flags = VQGAN_FLAGS + ["--steps", "4", "--out-dir", out]
    results = ranks(2, flags + ["--stop-after", "2"], env_of=slurm_task)
    assert all(code == 0 for code, *_ in results), results[0][2][-3000:]
    assert "cpu x 2 rank(s)" in results[0][1] and not results[1][1].strip()  # rank 0 alone speaks
    assert len(load_checkpoint(out / "ckpt.pt")["ranks"]) == 2

    # the batch script says --overwrite; Slurm requeued the job: it continues, and deletes nothing
    results = ranks(2, flags + ["--overwrite"], env_of=lambda rank: slurm_task(rank, restarts=1))
    assert all(code == 0 for code, *_ in results), results[0][2][-3000:]
    assert "resumed from" in results[0][1] and "--overwrite: deleted" not in results[0][1]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 4 and load_checkpoint(out / "ckpt.prev.pt")["step"] == 2

    no_address = ranks(1, flags, env_of=lambda rank: {**slurm_task(rank), "MASTER_ADDR": None}, timeout=60)
    code, _, stderr = no_address[0]
    assert code == 1 and last_error(stderr).startswith("error:") and "MASTER_ADDR" in stderr
