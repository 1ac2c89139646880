"""The project's shape: the modules a reader of the method meets stand alone."""
import ast
import re
import subprocess
import sys

from conftest import ROOT

MODELS = ["model", "vqgan", "vae", "convnet", "quantize", "losses", "fid", "selection", "data", "weights"]
MACHINERY_AND_SCRIPTS = ["distributed", "checkpoint", "plan", "flags", "optim", "train_stage1", "train_stage2",
                         "train_vqgan", "evaluate", "analyze", "bench"]


def test_the_models_import_nothing_of_the_training_machinery():
    code = f"import sys; import {', '.join(MODELS)}; print(sorted(m for m in {MACHINERY_AND_SCRIPTS!r} " \
           "if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_ci_runs_the_readme_test_command_in_a_new_virtual_environment():
    def joined(text):  # a shell command's continued lines (`\\`), as the shell joins them
        return re.sub(r" \\\n\s*", " ", text)
    readme = (ROOT / "README.md").read_text()
    command = joined(readme.split("Run the tests:\n\n```bash\n", 1)[1].split("\n```", 1)[0])
    assert command.startswith("python -m venv .venv && . .venv/bin/activate && pip install ")
    assert command.endswith("python -m pytest -q tests")
    assert command in joined((ROOT / ".ci" / "run").read_text()).splitlines()


def test_no_script_imports_another():
    """Scripts sit on top and import modules (nanoGPT: train.py and sample.py both import model.py alone)."""
    scripts = {"train_vqgan", "train_stage1", "train_stage2", "evaluate", "analyze", "bench"}
    for name in scripts:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & (scripts - {name}), (name, imported & scripts)


def test_only_the_base_tokenizers_and_the_factory_name_a_base():
    """The base tokenizer is an interface: outside vqgan.py and vae.py nothing tests which one it holds."""
    tests = [f"{path.name}:{i}" for path in ROOT.glob("*.py") if path.name not in ("vqgan.py", "vae.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"\bbase\s*[!=]=|[!=]=\s*[\"'](vae|vqgan)[\"']|isinstance\([^)]*\b(VAE|VQGAN)\b", line)]
    assert not tests, tests
