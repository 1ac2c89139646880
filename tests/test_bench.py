"""cost.py's analytic FLOP count against torch's FLOP counter (which skips the fused attention)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import cost
from losses import LPIPS, PatchDiscriminator
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
            model.vqgan.expected_codes(record.prediction)
    assert counter.get_total_flops() == cost.alit_forward_flops(cfg, attention=False)


def test_flop_formula_matches_counted_flops_over_a_vae():
    """Over a VAE the head regresses each 2D token's C numbers; there is no expected code."""
    cfg = make_config("tiny", base="vae", encoder_width=64, decoder_width=96, encoder_layers=1, decoder_layers=2)
    torch.manual_seed(0)
    model = ALIT(cfg).eval()
    images = torch.rand(1, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)  # the VAE's encoding (its posterior mean in eval mode), then the rollout
    assert counter.get_total_flops() == cost.alit_forward_flops(cfg, attention=False) + cost.base_encoder_flops(model)
    # the encoder's convolutions, its two attention blocks at the token grid (the last level's and the
    # middle's: QK^T and AV) and the posterior's 1x1 convolution
    C, cells = 32 * 2, cfg.grid_size ** 2
    attention, quant_conv = 2 * 2 * 2 * cells ** 2 * C, 2 * (2 * cfg.vae.latent_channels) ** 2 * cells
    assert cost.base_encoder_flops(model) == cost.conv_flops(model.vae.encoder, images) + attention + quant_conv


def test_bench_times_both_bases():
    """bench.py's stage-1 step and early-exit encode run over the VAE as over the VQGAN."""
    ceilings = {"float32": 1e9}
    for base in ("vqgan", "vae"):
        cfg = make_config("tiny", base=base)
        row = bench.bench_stage1("tiny", cfg, 2, 1, ceilings, torch.device("cpu"))
        assert row["base"] == base and row["float32"]["seconds"] > 0 and 0 < row["base_flop_share"] < 1
        adaptive = bench.bench_adaptive("tiny", cfg, 4, 1, torch.device("cpu"))
        assert adaptive["base"] == base and 0 < adaptive["token"]["fraction_of_tokens"] <= 1


def test_flop_formula_of_one_decoded_iteration_and_of_convolutions_on_meta_tensors():
    """Stage 2 decodes one iteration a step; its LPIPS, discriminator and VQGAN are counted on meta tensors."""
    cfg = make_config("tiny", encoder_width=64, decoder_width=96, encoder_layers=1, decoder_layers=2)
    torch.manual_seed(0)
    model = ALIT(cfg)
    images = torch.rand(1, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        (record,) = model(images, model.vqgan.encoder(images), iters=[2])
        model.vqgan.expected_codes(record.prediction)
    vqgan_encoder = cost.conv_flops(model.vqgan.encoder, images)
    assert counter.get_total_flops() == cost.alit_forward_flops(cfg, attention=False, iters=[2]) + vqgan_encoder
    for make, inputs in [(LPIPS, (images, images)), (lambda: PatchDiscriminator(num_layers=2), (images,))]:
        real = FlopCounterMode(display=False)
        with real, torch.no_grad():
            make()(*inputs)
        with torch.device("meta"):
            meta = cost.conv_flops(make(), *[torch.zeros(x.shape) for x in inputs])
        assert real.get_total_flops() == meta


def test_paper_cost_counts_both_stages():
    paper = cost.paper_cost(0.4)
    # stage 1 decodes all 8 iterations with the VQGAN frozen; stage 2 one, with everything trained
    assert 1 < paper["stage1_tflop_per_image"] < 10 and 0.5 < paper["stage2_tflop_per_image"] < 10
    hours = paper["stage1_tflop_per_image"] * 1e12 * 200 * 126_689 / (0.4 * 989e12) / 3600
    assert paper["stage1_gpu_hours"] == pytest.approx(hours)


def test_workers_per_gpu_feed_the_stated_utilisation():
    paper = cost.paper_cost(0.4)
    loading = bench.bench_data_loading(4, 1)
    assert loading["images_per_second_per_worker"] > 0 and 60 < loading["jpeg_kb"] < 160  # ImageNet-like files
    needed = bench.workers_per_gpu({"images_per_second_per_worker": 50.0}, paper)
    rate = 0.4 * 989e12 / (paper["stage1_tflop_per_image"] * 1e12)
    assert needed["stage1"] == {"images_per_second": pytest.approx(rate), "workers": -(-rate // 50)}


def test_memory_per_gpu_shrinks_with_checkpointing():
    memory = bench.paper_memory(make_config("tiny", encoder_layers=2, decoder_layers=2), (8, 4))
    for stage in ("stage1", "stage2"):
        assert 0 < memory[stage]["checkpointing"] < memory[stage]["plain"]
    # twice the batch, nearly twice the activations: the weights' share stays
    more = bench.paper_memory(make_config("tiny", encoder_layers=2, decoder_layers=2), (16, 8))
    assert memory["stage1"]["plain"] < more["stage1"]["plain"] < 2 * memory["stage1"]["plain"]


def test_the_gradient_all_reduce_counts_what_ddp_sends():
    cfg = make_config("tiny")
    model = ALIT(cfg)
    paper = {"utilisation": 0.4, "stage1_tflop_per_image": 1.0, "stage2_tflop_per_image": 0.5}
    reduce = cost.gradient_all_reduce(cfg, paper)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # stage 2: all but two
    assert reduce["stage1"]["gradient_bytes"] == 4 * sum(p.numel() for p in model.alit_parameters())
    assert reduce["stage2"]["gradient_bytes"] == 4 * (trained - model.vqgan.quantize.embedding.weight.numel()
                                                      - model.halted_token.numel())
    # a ring of 8 sends 2 x 7/8 of the buffer at the NVLink rate; the step is 32 images of 1 TFLOP at 40%
    assert reduce["stage1"]["one_node_seconds"] == pytest.approx(
        1.75 * reduce["stage1"]["gradient_bytes"] / cost.NVLINK_BUS_BYTES_PER_SECOND)
    assert reduce["stage1"]["step_compute_seconds"] == pytest.approx(32e12 / (0.4 * cost.H100_BF16_FLOPS))


def test_a_token_cache_would_save_under_a_tenth_of_a_paper_sized_step():
    """Stage 1 recomputes the frozen VQGAN's targets every step instead of caching them: at `small` the
    VQGAN encoder is 3% of the step's FLOPs (the cache would need 66 GB for ImageNet-100)."""
    cfg = make_config("small")
    with torch.device("meta"):
        encoder = cost.base_encoder_flops(ALIT(cfg))
    assert 0.02 < encoder / cost.stage1_flops(cfg, 1, encoder) < 0.1
