"""FID: our Inception reproduces pytorch-fid's pool3 features, and the Fréchet distance is right.

The reference vectors (tests/data/fid_inception/tiny.pt) were made by pytorch-fid
0.3.0 itself on seeded stand-in weights; the analytic cases pin the formula.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import fid as fid_module
from fid import FeatureStats, InceptionV3, fid_from_stats, frechet_distance
from seeded import load_vectors, seeded_state_dict


@pytest.fixture(scope="module")
def vectors():
    return load_vectors("fid_inception", "tiny")


@pytest.fixture(scope="module")
def state_dict(vectors):
    # the full key list, fc and num_batches_tracked included: the seeding numbers keys in sorted order
    return seeded_state_dict(vectors["weight_specs"], vectors["seed"])


@pytest.fixture(scope="module")
def inception(state_dict):
    return InceptionV3.from_pytorch_fid(state_dict)


@pytest.mark.parametrize("name", ["64", "299", "336x320"])  # upsized, native, downsized without antialiasing
def test_features_match_pytorch_fid(inception, vectors, name):
    with torch.no_grad():
        features = inception(vectors["inputs"][f"images_{name}"])
    expected = vectors["outputs"][f"features_{name}"]
    assert features.dtype == torch.float32 and features.shape == expected.shape
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)


def test_frechet_distance_matches_pytorch_fid(vectors):
    ref = vectors["frechet"]
    fid = frechet_distance(ref["mu_a"].numpy(), ref["sigma_a"].numpy(),
                           ref["mu_b"].numpy(), ref["sigma_b"].numpy())
    assert fid == pytest.approx(ref["fid"], rel=1e-6, abs=0)


def test_feature_stats_equal_numpy_mean_and_cov(vectors):
    ref = vectors["frechet"]
    stats = FeatureStats()
    for chunk in torch.split(ref["set_a"], [1, 100, 77, 122]):  # uneven chunks, one of a single row
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    assert stats.count == 300
    np.testing.assert_allclose(mu, ref["mu_a"].numpy(), atol=1e-10, rtol=0)
    np.testing.assert_allclose(sigma, ref["sigma_a"].numpy(), atol=1e-10, rtol=0)


def test_fid_of_a_set_with_itself_is_zero(vectors):
    ref = vectors["frechet"]
    mu, sigma = ref["mu_a"].numpy(), ref["sigma_a"].numpy()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16))
    sigma = np.cov(x, rowvar=False)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_rank_deficient_covariances_give_a_finite_fid():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 64)), rng.standard_normal((10, 64)) + 0.5  # rank <= 9 in 64 dims
    fid = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fid) and fid > 0


def test_non_finite_sqrtm_retries_with_eps_on_the_diagonal(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((50, 8)), rng.standard_normal((50, 8))
    mu1, sigma1, mu2, sigma2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    eps = 1e-3  # large enough that the retry visibly differs from the plain result
    offset = eps * np.eye(8)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.trace(fid_module._sqrtm((sigma1 + offset) @ (sigma2 + offset)).real))
    # older scipy returns inf/nan for some singular products; simulate that on the first call
    real_sqrtm, calls = fid_module._sqrtm, []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(fid_module, "_sqrtm", sqrtm_failing_once)
    with pytest.warns(UserWarning, match="adding"):
        fid = frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    assert len(calls) == 2
    assert fid == pytest.approx(expected, rel=1e-10)


def test_large_imaginary_part_raises():
    # not covariances: S1 S2 has a negative eigenvalue, so its square root is imaginary (2j)
    with pytest.raises(ValueError, match="imaginary component 2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-4.0, 1.0]))


def test_fid_from_stats_warns_when_covariances_are_rank_deficient():
    # 64-d features stand in for Inception's 2048-d: the rule is images <= feature dims,
    # and scipy's sqrtm of a 2048 x 2048 matrix alone takes ~45 s on two CPU cores
    rng = torch.Generator().manual_seed(0)
    few_a, few_b = FeatureStats(), FeatureStats()
    few_a.update(torch.rand(40, 64, generator=rng))
    few_b.update(torch.rand(50, 64, generator=rng))
    with pytest.warns(UserWarning, match="FID from 40 images: covariance rank-deficient"):
        assert np.isfinite(fid_from_stats(few_a, few_b))

    many_a, many_b = FeatureStats(), FeatureStats()
    many_a.update(torch.rand(300, 64, generator=rng))
    many_b.update(torch.rand(300, 64, generator=rng))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid_from_stats(many_a, many_b)


def _all_reduce_worker(rank, world_size, init_file, features, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=world_size)
    stats = FeatureStats()
    for chunk in features[rank::world_size].split(7):
        stats.update(chunk)
    stats.all_reduce_()
    mean_cov = [torch.from_numpy(m) for m in stats.mean_cov()]  # tensors: read back with weights_only
    torch.save({"count": stats.count, "mean_cov": mean_cov}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks_equals_one_process(tmp_path):
    features = torch.randn(61, 12, generator=torch.Generator().manual_seed(0))
    single = FeatureStats()
    single.update(features)
    single.all_reduce_()  # without an initialized process group: a no-op
    mu, sigma = single.mean_cov()

    mp.spawn(_all_reduce_worker, args=(2, tmp_path / "init", features, tmp_path), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["count"] == 61
        np.testing.assert_allclose(result["mean_cov"][0].numpy(), mu, atol=1e-12, rtol=0)
        np.testing.assert_allclose(result["mean_cov"][1].numpy(), sigma, atol=1e-12, rtol=0)


def test_loader_errors_name_the_file_and_the_missing_key(state_dict, tmp_path):
    broken = dict(state_dict)
    del broken["Mixed_6c.branch7x7_2.conv.weight"]
    path = tmp_path / "pt_inception-broken.pth"
    torch.save(broken, path)
    expected = r"pt_inception-broken\.pth.*missing keys \['Mixed_6c\.branch7x7_2\.conv\.weight'\]"
    with pytest.raises(KeyError, match=expected):
        InceptionV3.from_pytorch_fid(path)


def test_loader_errors_on_an_unexpected_key(state_dict):
    extra = dict(state_dict, **{"AuxLogits.fc.weight": torch.zeros(1008, 768)})
    with pytest.raises(KeyError, match=r"unexpected keys \['AuxLogits\.fc\.weight'\]"):
        InceptionV3.from_pytorch_fid(extra)


def test_loader_errors_on_a_wrong_shape(state_dict):
    broken = dict(state_dict, **{"Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 3, 3)})
    expected = r"Mixed_7c\.branch_pool\.conv\.weight has shape \(192, 2048, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        InceptionV3.from_pytorch_fid(broken)


def test_loader_accepts_a_file_without_num_batches_tracked(state_dict, inception, tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = InceptionV3.from_pytorch_fid(path)
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    for (key, ours), theirs in zip(loaded.state_dict().items(), inception.state_dict().values()):
        assert torch.equal(ours, theirs), key
