import sys
from pathlib import Path

# Tests import the project's flat modules (model.py, vqgan.py, ...) and tests/seeded.py.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
