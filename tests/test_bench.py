"""bench.py's analytic FLOP count against torch's FLOP counter (which skips the fused attention)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from model import ALIT, make_config


def test_flop_formula_matches_counted_flops():
    cfg = make_config("tiny", encoder_width=64, decoder_width=96, encoder_layers=1, decoder_layers=2)
    torch.manual_seed(0)
    model = ALIT(cfg)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        latents, gt = model.vqgan.encode(images)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for record in model(images, latents, gt):
            model.soft_codes(record.logits)
    assert counter.get_total_flops() == bench.alit_forward_flops(cfg, attention=False)
    vqgan = FlopCounterMode(display=False)
    with vqgan, torch.no_grad():
        model.vqgan.encoder(images)
    assert vqgan.get_total_flops() == bench.vqgan_encoder_flops(model)


def test_live_tensor_bytes_counts_allocations_and_frees():
    mb = 1 << 20
    tracker = bench.LiveTensorBytes()
    with tracker:
        a = torch.ones(mb // 4)  # 1 MiB of float32
        b = a * 2  # 2 MiB alive
        b.add_(1)  # in place: nothing new
        view = b[:10]  # a view: nothing new
        del a  # 1 MiB alive
        c = torch.zeros(2 * mb // 4)  # 3 MiB alive: the peak
        del c, view
        tracker.phase = "optimizer"
        d = b + 1
    assert tracker.peak([], []) == 3 * mb
    assert tracker.peak([], [], batch_scale=2.0) == 6 * mb  # every tensor above was made in "step"
    # b tagged as a gradient is not scaled; d (optimizer phase) never is
    assert tracker.peak([b.untyped_storage().data_ptr()], [], batch_scale=2.0) == 5 * mb
    assert tracker.peak([b.untyped_storage().data_ptr()], [d.untyped_storage().data_ptr()]) == 3 * mb
    del b, d


def test_memory_of_a_tiny_step_checkpointing_saves_and_estimates_scale():
    r = bench.bench_memory(["tiny"], 2, torch.device("cpu"))["tiny"]
    plain, ckpt = r["plain"], r["grad_checkpoint"]
    params = plain["trainable_params"] * 4
    # at least the gradients and AdamW's two moments, and far less than every allocation of the step
    assert 3 * params < ckpt["peak_bytes"] < plain["peak_bytes"] < 1e9
    assert plain["estimated_gb_at_batch_32"] * 1e9 > 8 * plain["peak_bytes"]


def test_timed_pairs_each_run_with_the_figure_sampled_around_it():
    samples = iter([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])  # before/after the three timed runs
    runs = []
    t = bench.timed(lambda: runs.append(1), 3, 1, torch.device("cpu"), alongside=lambda: next(samples))
    assert len(runs) == 4  # one warm-up
    assert t["alongside"] == [2.0, 6.0, 10.0] and len(t["times"]) == 3
    assert t["min"] <= t["median"] <= t["max"]
