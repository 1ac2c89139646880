"""The project's shape: the modules a reader of the method meets stand alone."""
import ast
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


# A training script reads like nanoGPT's train.py: main() setup -> data -> model -> optimizer -> loop -> save on
# one screen, the machinery (finding weights, memory probes, flags) in the modules it imports.
LONGEST_MAIN = 60
LONGEST_FILE = {"train_stage1.py": 300, "train_stage2.py": 300, "train_vqgan.py": 350, "evaluate.py": 450}


def test_each_script_main_fits_a_screen_and_each_script_its_budget():
    for name, budget in LONGEST_FILE.items():
        source = (ROOT / name).read_text()
        assert len(source.splitlines()) <= budget, f"{name}: {len(source.splitlines())} lines, budget {budget}"
        (main,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "main"]
        length = main.end_lineno - main.lineno + 1
        assert length <= LONGEST_MAIN, f"{name}: main() runs {length} lines, at most {LONGEST_MAIN}"
