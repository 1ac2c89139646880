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
