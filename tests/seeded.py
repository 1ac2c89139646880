"""The reference vectors' weight rule (../shared/reference/README.md, "Weight rule").

Real checkpoints cannot ship with the tests, so each loader is proven on
stand-in weights that anyone can regenerate from a key list and a seed. This is
our own implementation of the rule the README states; test_seeded.py checks it
against the state dicts stored inside the tiny vectors, bit for bit.
"""
import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def read_keys_tsv(path):
    """`key<TAB>dtype<TAB>shape` rows -> [(key, shape tuple, dtype name)]."""
    lines = Path(path).read_text().splitlines()
    assert lines[0].split("\t") == ["key", "dtype", "shape"], f"{path}: unexpected header"
    rows = []
    for line in lines[1:]:
        if line:
            key, dtype, shape = line.split("\t")
            rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else (), dtype))
    return rows


def seeded_state_dict(rows, seed):
    """Entry i in sorted-key order draws randn(shape) from a generator seeded with seed + i."""
    position = {key: i for i, key in enumerate(sorted(key for key, _, _ in rows))}
    state = {}
    for key, shape, dtype in rows:
        dtype = getattr(torch, dtype)
        n = torch.randn(shape, generator=torch.Generator().manual_seed(seed + position[key]))
        if not dtype.is_floating_point:
            value = torch.zeros(shape)
        elif key.endswith("running_var"):
            value = 1 + 0.1 * n.abs()
        elif key.endswith("running_mean"):
            value = 0.1 * n
        elif len(shape) >= 2:
            value = n * math.sqrt(2 / math.prod(shape[1:]))  # fan-in scale
        elif key.endswith("weight"):
            value = 1 + 0.1 * n  # norm gains
        else:
            value = 0.02 * n
        state[key] = value.to(dtype)
    return state


def load_vectors(folder, name):
    """One reference file, e.g. load_vectors("official_vqgan", "tiny")."""
    return torch.load(DATA / folder / f"{name}.pt", map_location="cpu", weights_only=True)
