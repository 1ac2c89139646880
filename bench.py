"""Speed and memory of training and encoding, and what the paper's runs cost (nanoGPT's bench.py).

In one run, on the device present: the stage-1 step (§A.5: 8 iterations, halting on) of the paper's
`small` and a `mid` model (`mid` over both bases, the VQGAN and the VAE), in seconds and as a fraction
of the matmul ceiling (FLOPs counted from the config), float32 and bf16 where native; the frozen base's
share of it; adaptive encoding with early exit against every iteration, over each base; peak memory;
the paper's runs on ImageNet-100 in H100-hours; data loading (JPEG decoding and cropping, per
DataLoader worker) against what an H100 consumes, so how many workers a GPU needs; and each stage's
memory per GPU at the paper's batch, with and without gradient checkpointing.

    python bench.py            # several minutes on 2 CPU cores: a `small` step alone takes ~30 s
    python bench.py --quick    # about a minute: tiny sizes
"""
import argparse
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import flags
import plan
from cost import (H100_BF16_FLOPS, NODE_LINK_BYTES_PER_SECOND, NVLINK_BUS_BYTES_PER_SECOND, PAPER_BATCH_PER_GPU,
                  UTILISATION, base_encoder_flops, gradient_all_reduce, paper_cost, stage1_flops)
from data import PALETTE, build_dataset
from distributed import autocast, keep_freed_memory, native_bf16
from flags import FILE, Number
from losses import (LPIPS, OFFICIAL_ITERATION_WEIGHTS, base_targets, iteration_weights,
                    stage1_loss)
from model import ALIT, BASES, ALITConfig, make_config
from optim import adamw
from quantize import VectorQuantizer
from selection import first_passing, l1_below, token_score_passes

H100_MEMORY = 80e9  # bytes, the H100 SXM's HBM3


def parser() -> flags.Parser:
    p = flags.Parser(__doc__)
    p.add("--quick", False, bool, "tiny sizes and fewer repetitions: about a minute")
    p.add("--out", None, FILE, "also write the numbers as JSON here")
    p.add("--reps", None, Number(int, 1), "timed runs per measurement",
          default_text="2, `small` 1 (~30 s a step on a CPU), --quick 5")
    p.add("--utilisation", UTILISATION, Number(float, 0, 1, "(]"), "share of the H100's dense bf16 peak the paper's "
          "runs are costed at")
    p.add("--keep-freed-memory", True, bool, "on the CPU, as the training scripts do (distributed.keep_freed_memory)")
    return p


# `mid`: 256x256 over the imagenet VQGAN like `small`, at a size whose step a CPU times in seconds
MID = dict(encoder_width=384, encoder_layers=4, encoder_heads=4, decoder_width=256, decoder_layers=4, decoder_heads=4)


def timed(fn, reps: int, warmup: int, device, statistic=statistics.median) -> float:
    """Seconds of fn(): the median (or `statistic`) of `reps` runs after `warmup` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistic(times)


def matmul_flops(dtype, n: int, device) -> float:
    """The ceiling: FLOP/s of the fastest of 10 n^3 products."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, 10, 2, device, statistic=min)


# -----------------------------------------------------------------------------
# Model FLOPs, counted from the config

def write_photo_folder(root, classes, images_per_class: int, size=(500, 375), seed: int = 0) -> list:
    """Photo-like JPEGs in ImageNet's layout, <root>/<class>/<i>.JPEG, at ImageNet's most common size
    (500x375; quality 95: ~100 KB each, about ImageNet's mean): smooth colour fields, a few shapes
    and sensor noise, so that decoding one costs what a photo costs. For benchmarks and the GPU smoke test,
    which cannot download ImageNet. Returns the files written."""
    rng, files = np.random.default_rng(seed), []
    width, height = size
    for c in classes:
        for i in range(images_per_class):
            field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            draw = ImageDraw.Draw(field)
            for _ in range(int(rng.integers(2, 6))):
                x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
                colour = tuple(PALETTE[rng.integers(len(PALETTE))].tolist())
                draw.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=colour)
            pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (height, width, 3))
            path = Path(root) / c / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
            files.append(path)
    return files


def bench_data_loading(images: int, reps: int) -> dict:
    """Images/s one DataLoader worker delivers for training at 256x256 (JPEG decoding, random resized
    crop, flip: ImageFiles' training transform) on a generated folder of ImageNet-sized JPEGs."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_photo_folder(folder, ["n0"], images)
        dataset = build_dataset("folder", "train", 256, data_dir=folder)
        seconds = timed(lambda: [dataset[i] for i in range(len(dataset))], reps, 1, torch.device("cpu"))
        kilobytes = sum(f.stat().st_size for f in files) / len(files) / 1e3
    return {"images": images, "jpeg_kb": kilobytes, "images_per_second_per_worker": images / seconds}


def workers_per_gpu(loading: dict, paper: dict) -> dict:
    """Workers a GPU needs to be fed: the images/s each stage's step consumes on an H100 at the stated
    utilisation (from its FLOPs), over what one worker delivers on this machine's CPU."""
    rates = {stage: paper["utilisation"] * H100_BF16_FLOPS / (paper[f"{stage}_tflop_per_image"] * 1e12)
             for stage in ("stage1", "stage2")}
    return {stage: {"images_per_second": rate, "workers": math.ceil(rate / loading["images_per_second_per_worker"])}
            for stage, rate in rates.items()}


def paper_memory(cfg: ALITConfig, batches=PAPER_BATCH_PER_GPU) -> dict:
    """Bytes a GPU holds in a step of each stage at the paper's batch per GPU (stage 1: 32, stage 2: 12),
    bf16 as on the GPU, without and with gradient checkpointing: plan.step_memory (weights,
    gradients, AdamW, EMA and the activations autograd keeps, measured here on one and two images)."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = ALIT(cfg)
    model.base.requires_grad_(False)
    result = {"stage1": {"batch": batches[0], **{("checkpointing" if on else "plain"): plan.stage1_step_memory(
        model, batches[0], device, True, on) for on in (False, True)}}}
    model.requires_grad_(True)  # stage 2 trains everything but the base's codebook and the halting token
    for module in model.base.modules():
        if isinstance(module, VectorQuantizer):
            module.requires_grad_(False)
    model.halted_token.requires_grad_(False)
    stage2 = argparse.Namespace(batch_size=batches[1], l1_weight=1.0, perceptual_weight=1.0)  # train_stage2's
    result["stage2"] = {"batch": batches[1], **{("checkpointing" if on else "plain"): plan.stage2_step_memory(
        model, stage2, LPIPS(), device, True, on) for on in (False, True)}}
    return result


def stage1_step(model, optimizer, images, bf16, weights):  # train_stage1.py's, its loss
    with autocast(images.device, bf16):
        loss, _, _ = stage1_loss(model, images, iteration_weights=weights, halting=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_stage1(name, cfg, batch, reps, ceilings, device) -> dict:
    torch.manual_seed(0)
    model = ALIT(cfg).to(device)
    model.base.requires_grad_(False)
    optimizer = adamw(model.alit_parameters(), 1e-4, (0.9, 0.95), 0.05, device)  # as train_stage1.py
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    weights = iteration_weights(OFFICIAL_ITERATION_WEIGHTS, cfg.rollout_iters)
    base_flops = base_encoder_flops(model)
    flops = stage1_flops(cfg, batch, base_flops)
    row = {"config": name, "base": cfg.base, "batch": batch, "flops_per_step": flops,
           "base_flop_share": batch * base_flops / flops}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for precision in ceilings:  # two warm-ups: with keep_freed_memory the CPU heap settles in the second
        seconds = timed(lambda: stage1_step(model, optimizer, images, precision == "bf16", weights), reps, 2, device)
        row[precision] = {"seconds": seconds, "fraction_of_ceiling": flops / seconds / ceilings[precision]}
    # What precomputing the frozen base's targets would save of a step (a token cache): its encoder's share
    row["base_share"] = timed(lambda: base_targets(model.base, images), reps, 1, device) / row["float32"]["seconds"]
    # CUDA: the allocator's peak; CPU: the process's peak resident size (KiB on Linux), which only grows
    row["peak_memory_gb"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    return row


def threshold_for(table, fraction, higher_is_better=False):
    """The threshold on a (T, B) table (images stop at a value below it, or at or above it where higher is
    better) stopping them at `fraction` of T."""
    values = table.flatten().sort().values
    passes = (lambda thr: table >= thr) if higher_is_better else (lambda thr: table < thr)  # noqa: E731
    stops = lambda thr: (first_passing(passes(thr)) + 1).float().mean().item() / len(table)
    return min(((values[1:] + values[:-1]) / 2).tolist(), key=lambda thr: abs(stops(thr) - fraction))


def bench_adaptive(name, cfg, batch, reps, device) -> dict:
    torch.manual_seed(0)
    model = ALIT(cfg).to(device).eval()
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    runs = []  # the timed exhaustive rollouts: their reconstructions set the thresholds
    with torch.no_grad():
        gt = model.base_targets(model.base_tokens(images))
        every = timed(lambda: runs.append(model.rollout(images)), reps, 0, device)
    records = runs[-1]
    # the pixel criterion (L1) and the base's token-space one (token accuracy, a VAE's code MSE)
    tables = {"pixel": torch.stack([(r.recon.float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)) for r in records]),
              "token": torch.stack([model.base.token_score(r.prediction, gt) for r in records])}
    result = {"config": name, "base": cfg.base, "batch": batch, "every_iteration_seconds": every}
    for kind, table in tables.items():
        higher = kind == "token" and model.base.higher_score_is_better
        thr = threshold_for(table.cpu(), 0.5, higher)
        criterion = l1_below(thr) if kind == "pixel" else token_score_passes(model.base, thr)
        seconds = timed(lambda: model.encode_adaptive(images, criterion, token_space=kind == "token"), reps, 0, device)
        passes = table.cpu() >= thr if higher else table.cpu() < thr
        stop = (first_passing(passes) + 1).float().mean().item() / cfg.rollout_iters
        result[kind] = {"fraction_of_tokens": stop, "seconds": seconds, "speedup": every / seconds}
    return result


def parse_args(argv=None):
    return parser().parse(argv)[0]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    reps, n = args.reps or (5 if args.quick else 2), 1024 if args.quick else 2048
    ceilings = {"float32": matmul_flops(torch.float32, n, device)}
    if native_bf16(device):  # emulated bf16 runs several times slower than float32: not timed
        ceilings["bf16"] = matmul_flops(torch.bfloat16, n, device)
    report = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "quick": args.quick, "matrix_size": n, "ceiling_flops": ceilings}
    # `mid` (or `tiny`) over each base: the VQGAN, and the VAE (at 256x256 MAR's KL-16)
    name, size = ("tiny", {}) if args.quick else ("mid", MID)
    over_each_base = [make_config("tiny" if args.quick else "small", base=base, **size) for base in BASES]
    # smallest first: the CPU's peak resident size only grows
    configs = [(name, model_cfg, 16 if args.quick else 4, reps) for model_cfg in over_each_base]
    if not args.quick:
        configs.append(("small", make_config("small"), 2, args.reps or 1))
    report["stage1"] = [bench_stage1(*c, ceilings, device) for c in configs]
    # A `mid` rollout decodes 8 reconstructions an image at 256x256: each encode runs once there.
    report["adaptive"] = [bench_adaptive(name, model_cfg, *((32, reps) if args.quick else (8, 1)), device)
                          for model_cfg in over_each_base]
    report["paper"] = paper_cost(args.utilisation)
    report["data_loading"] = bench_data_loading(16 if args.quick else 64, reps)
    report["workers_per_gpu"] = workers_per_gpu(report["data_loading"], report["paper"])
    report["gradient_all_reduce"] = gradient_all_reduce(make_config("small"), report["paper"])
    report["memory"] = paper_memory(*((make_config("tiny"), (16, 16)) if args.quick else (make_config("small"),)))
    report["memory"]["config"] = "tiny" if args.quick else "small"
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(r: dict) -> str:
    c, a, p = r["ceiling_flops"], r["adaptive"], r["paper"]
    d, w, m, g = r["data_loading"], r["workers_per_gpu"], r["memory"], r["gradient_all_reduce"]
    lines = [f"device {r['device']}, {r['threads']} threads, torch {r['torch']}; matmul ceiling ({r['matrix_size']}^3, "
             "fastest of 10): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in c.items()), "",
             "| stage-1 step | base | batch | GFLOP/step | precision | s/step | of the ceiling | base share (of FLOPs) "
             "| peak memory |", "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in r["stage1"]:
        share = f"{100 * s['base_share']:.0f}% ({100 * s['base_flop_share']:.1f}%)"
        lines += [f"| {s['config']} | {s['base']} | {s['batch']} | {s['flops_per_step'] / 1e9:.0f} | {k} | "
                  f"{s[k]['seconds']:.2f} | {100 * s[k]['fraction_of_ceiling']:.0f}% | {share} | "
                  f"{s['peak_memory_gb']:.1f} GB |" for k in c]
    exits = [f"adaptive encode, {e['config']} over the {e['base'].upper()}, batch {e['batch']}, untrained: every "
             f"iteration {e['every_iteration_seconds']:.2f} s; early exit, " + "; ".join(
                 f"{k} criterion {e[k]['seconds']:.2f} s at {e[k]['fraction_of_tokens']:.2f} of the tokens, "
                 f"{e[k]['speedup']:.2f}x" for k in ("pixel", "token")) for e in a]
    return "\n".join(lines + [
        f"(peak memory: {'CUDA allocator' if r['device'] == 'cuda' else 'peak resident size of the process'})", "",
        *exits, "",
        f"the paper's runs of `small` on ImageNet-100 ({p['images']:,} images, {p['epochs']} epochs a stage as in the "
        f"official scripts; stage 2 with GAN terms on half the steps) on one H100 at {100 * p['utilisation']:.0f}% of "
        f"{H100_BF16_FLOPS / 1e12:.0f} TFLOP/s: stage 1 {p['stage1_tflop_per_image']:.2f} TFLOP/image, "
        f"{p['stage1_gpu_hours']:.0f} GPU-hours; stage 2 {p['stage2_tflop_per_image']:.2f} TFLOP/image, "
        f"{p['stage2_gpu_hours']:.0f} GPU-hours", "",
        f"data loading: one worker decodes, crops and flips {d['images_per_second_per_worker']:.0f} images/s "
        f"({d['jpeg_kb']:.0f} KB 500x375 JPEGs -> 256x256, this CPU); the H100 above takes "
        f"{w['stage1']['images_per_second']:.0f} images/s in stage 1 and {w['stage2']['images_per_second']:.0f} in "
        f"stage 2: {w['stage1']['workers']} and {w['stage2']['workers']} worker(s) per GPU", "",
        "gradient all-reduce of the paper's runs (float32; ring at an assumed "
        f"{NVLINK_BUS_BYTES_PER_SECOND / 1e9:.0f} GB/s on one NVLink node of 8, {NODE_LINK_BYTES_PER_SECOND / 1e9:.0f} "
        "GB/s across two; after the backward, which cannot hide it): " + "; ".join(
            f"{stage.replace('stage', 'stage ')} {g[stage]['gradient_bytes'] / 1e9:.2f} GB a step, one node "
            f"{1e3 * g[stage]['one_node_seconds']:.1f} ms (+{100 * g[stage]['one_node_overhead']:.0f}% of a "
            f"{1e3 * g[stage]['step_compute_seconds']:.0f} ms step), two nodes "
            f"{1e3 * g[stage]['two_nodes_seconds']:.1f} "
            f"ms (+{100 * g[stage]['two_nodes_overhead']:.0f}%)" for stage in ("stage1", "stage2")), "",
        f"memory per GPU, `{m['config']}`, bf16 (weights, gradients, AdamW, EMA, activations; "
        f"{H100_MEMORY / 1e9:.0f} GB on an H100): " + "; ".join(
            f"{stage.replace('stage', 'stage ')} at batch {m[stage]['batch']} {m[stage]['plain'] / 1e9:.1f} GB, with "
            f"gradient checkpointing {m[stage]['checkpointing'] / 1e9:.1f} GB" for stage in ("stage1", "stage2"))])


if __name__ == "__main__":
    main()
