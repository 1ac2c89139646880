"""The vector quantizer: straight-through gradients, losses, l2 option, index round trip."""
import torch

from quantize import VectorQuantizer


def test_straight_through_and_codebook_gradients():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    encoder = torch.nn.Linear(3, 4)
    q = vq(encoder(torch.randn(10, 3)))
    (q.codes.sum() + q.loss).backward()
    assert encoder.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert vq.embedding.weight.grad.abs().sum() > 0  # from the codebook loss
    # forward value is the chosen codebook row
    torch.testing.assert_close(q.codes, vq.lookup(q.indices))


def test_indices_are_nearest_and_round_trip():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8)
    z = torch.randn(2, 5, 8)
    q = vq(z)
    assert q.indices.shape == (2, 5) and q.indices.dtype == torch.int64
    brute = torch.cdist(z.reshape(-1, 8), vq.embedding.weight).argmin(1).view(2, 5)
    assert torch.equal(q.indices, brute)
    torch.testing.assert_close(vq.lookup(q.indices), q.codes)  # equal up to the rounding of z + (e - z)


def test_l2_option_returns_unit_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 12, l2_normalize=True)
    q = vq(5 * torch.randn(7, 12))
    torch.testing.assert_close(q.codes.norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(vq.lookup(q.indices), q.codes)


def test_loss_value_and_usage_statistics():
    vq = VectorQuantizer(4, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [5, 5]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.0, 1.2], [0.0, 0.9]])
    q = vq(z)
    assert q.indices.tolist() == [0, 1, 2, 2]
    mse = ((z - vq.embedding.weight[q.indices]) ** 2).mean()
    torch.testing.assert_close(q.loss, 1.25 * mse)
    assert q.usage.item() == 0.75
    torch.testing.assert_close(q.perplexity, torch.tensor(2 ** 1.5))  # probs 1/4, 1/4, 1/2


def test_search_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(128, 12, l2_normalize=True)
    z = torch.randn(64, 12)
    expected = vq(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = vq(z.bfloat16())
    assert q.codes.dtype == torch.float32
    # bf16 input rounding may move a few near-ties; the search itself must not add more
    assert (q.indices == vq(z.bfloat16().float()).indices).all()
    assert (q.indices == expected).float().mean() > 0.9


def test_codebook_is_float32_even_with_bf16_weights():
    """A model cast to bf16 (weights, not autocast) still searches and looks up float32 codes."""
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, l2_normalize=True)
    exact = vq(torch.randn(16, 8)).indices
    vq = vq.to(torch.bfloat16)
    assert vq.codebook().dtype == torch.float32 and vq.lookup(exact).dtype == torch.float32
    assert vq(torch.randn(16, 8)).codes.dtype == torch.float32


def test_training_keeps_recent_inputs_without_their_graph():
    """The inputs a restart draws from are kept between steps: holding their autograd graph would
    keep the whole step's activations alive until the next one."""
    vq = VectorQuantizer(16, 4).train()
    z = torch.nn.Linear(3, 4)(torch.randn(10, 3))
    vq(z)
    assert not vq.recent_inputs.requires_grad and vq.recent_inputs.grad_fn is None


def test_dead_code_restart_moves_only_unused_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z = torch.randn(32, 4) + 5  # far from the initial codebook: one code wins everything
    vq.train()
    used = vq(z).indices.unique()
    before = vq.embedding.weight.clone()
    moved = vq.restart_dead_codes()
    assert moved == 16 - len(used)
    unchanged = torch.zeros(16, dtype=torch.bool)
    unchanged[used] = True
    assert torch.equal(vq.embedding.weight[unchanged], before[unchanged])
    # every moved code now sits on one of the inputs
    moved_rows = vq.embedding.weight[~unchanged]
    assert (moved_rows[:, None] - z[None]).norm(dim=-1).min(1).values.max() < 1e-6
    assert vq(z).usage > 1 / 16
