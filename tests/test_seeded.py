"""Our weight rule regenerates the stored tiny state dicts bit for bit."""
import pytest
import torch

from seeded import load_vectors, seeded_state_dict


@pytest.mark.parametrize("folder", ["official_vqgan", "alit_official"])
def test_weight_rule_matches_stored_state_dict(folder):
    vectors = load_vectors(folder, "tiny")
    stored = vectors["state_dict"]
    rows = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in stored.items()]
    regenerated = seeded_state_dict(rows, vectors["seed"])
    assert regenerated.keys() == stored.keys()
    for key, value in stored.items():
        assert torch.equal(regenerated[key], value), key
