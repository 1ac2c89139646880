"""The project's shape: the modules a reader of the method meets stand alone."""
import subprocess
import sys

from conftest import ROOT

MODELS = ["model", "vqgan", "vae", "quantize", "losses", "fid", "selection", "data", "weights", "probes"]


def test_the_models_import_nothing_of_the_training_machinery():
    code = f"import sys; import {', '.join(MODELS)}; print(sorted(m for m in ('training', 'train_stage1', " \
           "'train_stage2', 'train_vqgan', 'evaluate', 'analyze', 'bench') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_ci_runs_the_readme_test_command_in_a_new_virtual_environment():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("Run the tests:\n\n```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("python -m venv .venv && . .venv/bin/activate && pip install ")
    assert command.endswith("python -m pytest -q tests")
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
