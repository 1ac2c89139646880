"""The project's shape: the modules a reader of the method meets stand alone."""
import subprocess
import sys

from conftest import ROOT

MODELS = ["model", "vqgan", "quantize", "losses", "fid", "selection", "data", "weights"]


def test_the_models_import_nothing_of_the_training_machinery():
    code = f"import sys; import {', '.join(MODELS)}; print(sorted(m for m in ('training', 'train_stage1', " \
           "'train_stage2', 'train_vqgan', 'evaluate', 'analyze', 'bench') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
