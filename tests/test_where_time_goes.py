"""dev/where_time_goes.py: its parts add up to the run's wall time and are given to the right pass."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def where_time_goes(*args) -> dict:
    """Runs the tool (in its own process: it rewires classes); {part: (seconds, share, calls)}."""
    run = subprocess.run([sys.executable, str(ROOT / "dev" / "where_time_goes.py"), *map(str, args)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| ([\d.-]+) \| ([\d.-]+)% \| (\d*) \|$", run.stdout, re.M)
    return {part: (float(s), float(share), int(calls) if calls else None) for part, s, share, calls in rows}


def test_stage1_passes_are_counted_per_iteration_and_the_parts_add_up(tmp_path):
    vqgan = where_time_goes("train_vqgan.py", "--steps", 2, "--batch-size", 4, "--val-images", 8,
                            "--out-dir", tmp_path / "vq", "--no-bf16")
    assert vqgan["backward"][2] == 2 and vqgan["optimizer"][2] == 2 and vqgan["data"][2] == 2
    assert vqgan["end-of-run evaluation"][2] == 1 and "encoder passes" not in vqgan
    stage1 = where_time_goes("train_stage1.py", "--steps", 3, "--batch-size", 2, "--rollout-warmup", 0,
                             "--vqgan-ckpt", tmp_path / "vq" / "ckpt.pt", "--out-dir", tmp_path / "s1", "--no-bf16")
    # Eight encoder passes and eight decodes a step; the grid's rollout is the grid's (one call: save_rollout).
    assert stage1["encoder passes"][2] == stage1["decoder passes (+ head)"][2] == 3 * 8
    assert stage1["halting"][2] == 3 * 7 and stage1["image grids"][2] == 1 and stage1["EMA"][2] == 3
    assert stage1["other (setup, the loop, small ops)"][0] >= 0
    assert abs(sum(share for _, share, _ in stage1.values()) - 100) < 0.5
