"""Evaluation: the paper's measurements of reconstructions per token count.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393.

The paper judges a tokenizer by how well each token count reconstructs the
image: reconstruction FID (rFID, Table 1, computed by fid.py) and L1 loss
(Fig. 2) at 32 ... 256 tokens, and the token-selection-criterion plots (Fig. 7)
that pick a token count per image by thresholding the reconstruction loss. This
file holds the evaluation run (the criteria: selection.py, figures: plots.py, table and csv: report.py).

    python evaluate.py                          # out/stage2/ckpt.pt on `shapes`
    python evaluate.py --official alit_small_vqgan_quantized_latents.pth --dataset imagenet100 \
        --data-dir /data/imagenet              # FID with pt_inception-2015-12-05-6726825d.pth found by name
    python evaluate.py --official alit_small_vqgan_quantized_latents.pth --dataset folder --data-dir my_images/

The base tokenizer (VQGAN or VAE) comes with the checkpoint. Over a VAE the token-space criterion is
the code error (the mean squared error of the predicted 2D token vectors, selection.code_error_below),
in place of the token accuracy, and the base's own row is the VAE's (posterior mean, decoded).
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import scipy.stats
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import DATASETS, build_dataset
from fid import FeatureStats, InceptionV3, fid_from_stats
from model import ALIT
from vqgan import conv_memory_format
from quantize import count_codes
from plots import plot_sweep, save_fig2_grid, save_halting_figure, spread_rows
from report import markdown_report, write_sweep_csv
# The criteria live in selection.py (analyze.py and bench.py import them from there too).
from selection import (DEFAULT_CRITERION_CPU, DEFAULT_CRITERION_OFFICIAL, code_error, code_error_below,  # noqa: F401
                       first_passing, l1_below, l1_passes, psnr, token_accuracy_above)
from training import (PAPER_DATASETS, check_data, check_flags, choice_checks, data_workers, end_distributed,
                      keep_freed_memory, official_heads, paper_scale, parse_flags, setup_distributed)
from weights import find_weights, not_found

# -----------------------------------------------------------------------------
# The evaluation run: every token count, adaptive allocation, complexity

PROTOCOLS = {
    "crop": "the paper's code: center crop to the model size, no resizing",
    "resize": "TiTok: resize the shorter side to the model size, then center crop",
}


@dataclass
class EvalConfig:
    ckpt: Annotated[str, "file"] = "out/stage2/ckpt.pt"  # a train_stage1.py / train_stage2.py checkpoint ...
    # A second checkpoint reported beside --ckpt, per token count (default: stage 1, which stage 2 must
    # not undo); skipped when it is missing or is --ckpt itself.
    compare: Annotated[str | None, "file"] = "out/stage1/ckpt.pt"
    # ... or an official ALIT checkpoint (ALIT.from_official): a path, or a name looked up in
    # $ALIT_WEIGHTS and the torch hub cache
    official: Annotated[str | None, "file"] = None
    heads: Annotated[str | None, "list of int >= 1"] = None  # official checkpoints of non-preset sizes: "8" or "8,8" (encoder, decoder)
    use_ema: bool = True  # evaluate the EMA weights of our checkpoints
    dataset: Literal[DATASETS] = "shapes"  # shapes is drawn on the fly; the others read --data-dir
    data_dir: Annotated[str | None, "existing folder"] = None  # root of the image folder (imagenet: <root>/val/<wnid>/*)
    split: Literal["train", "val"] = "val"  # the images evaluated
    num_images: Annotated[int | None, ">= 1"] = None  # default: the whole split (shapes: 1000)
    protocol: Literal[tuple(PROTOCOLS)] = "crop"  # how images are cut to the model size (PROTOCOLS)
    batch_size: Annotated[int, ">= 1"] = 50  # images per forward pass
    # pytorch-fid's Inception; default: pt_inception-2015-12-05-6726825d.pth if it is in $ALIT_WEIGHTS or
    # the torch hub cache (where pytorch-fid downloads it), else no FID
    inception_weights: Annotated[str | None, "file"] = None
    # L1 thresholds of the adaptive allocation sweep (Fig. 7). Default: 0.03,0.05,0.07,0.1,0.15 at
    # 256x256; 0.03,0.04,0.05,0.07 below
    thresholds: Annotated[str | None, "list of float > 0"] = None
    token_thresholds: Annotated[str, "list of float in [0, 1]"] = "0.3,0.5,0.7,0.8,0.9"  # token-accuracy thresholds of the cheaper criterion
    # VAE base: code-error thresholds of the token-space criterion, in multiples of the mean code MSE at
    # the longest code (the predicted vectors' scale is the VAE's own)
    code_thresholds: Annotated[str, "list of float > 0"] = "1.1,1.25,1.5,2,3,5"
    # The default criterion (allocation summary, complexity vs tokens): L1 below --default-threshold,
    # or within --saturation of the image's L1 at the longest code. Default: the official encode's
    # 0.07 and no saturation at 256x256; below that 0.04 and 0.03: the simple shapes scenes get
    # below 0.04, the complex ones never do, and they stop where more tokens stop helping instead of
    # all taking the longest code (early exit times the threshold alone: saturation needs the longest).
    default_threshold: Annotated[float | None, "> 0"] = None
    saturation: Annotated[float | None, "in [0, 1]"] = None  # a fraction: 0.02 stops an image once it is within 2% of its longest code's L1
    halting: bool = False  # the official code halts in eval too, which makes reconstructions random
    grid_images: Annotated[int, ">= 1"] = 8  # rows of reconstructions.png and halting.png, from simple to complex images
    speed_images: Annotated[int, ">= 1"] = 64  # images timed for early exit vs running every iteration
    out_dir: Annotated[str, "folder"] = "out/eval"  # metrics.json, the sweep's CSV and plot, reconstructions.png, halting.png
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when available
    # DataLoader processes per rank; default: on CUDA the CPUs this process may use shared by the ranks, less
    # one each; 0 on the CPU
    num_workers: Annotated[int | None, ">= 0"] = None
    seed: Annotated[int, ">= 0"] = 0  # of the halting draws (with --halting)
    keep_freed_memory: bool = True  # on the CPU, keep freed memory in the process (training.keep_freed_memory)


def parse_args(argv=None) -> EvalConfig:
    cfg, _ = parse_flags(argv, __doc__, EvalConfig)
    check_flags(choice_checks(cfg))
    check_data(cfg.dataset, cfg.data_dir, (cfg.split,))
    try:
        official = find_weights("alit", "--official", cfg.official) if cfg.official else None
        inception = find_weights("inception", "--inception-weights", cfg.inception_weights)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    return dataclasses.replace(cfg, official=official and str(official), inception_weights=inception and str(inception))


def load_model(cfg: EvalConfig, device, flag="--ckpt") -> ALIT:
    """--official or --ckpt, in eval mode. With --dataset imagenet100/imagenet, the default --ckpt must
    hold a 256x256 model (the paper's): the shapes pipeline's 32x32 one is not evaluated on ImageNet unasked."""
    try:
        if cfg.official:
            flag = "--official"
            model = ALIT.from_official(cfg.official, heads=official_heads(cfg.heads)).eval()
        elif not Path(cfg.ckpt).is_file():
            sys.exit(f"error: {flag} {cfg.ckpt} not found (train it, or pass --official PATH)")
        else:
            model = ALIT.from_checkpoint(cfg.ckpt, ema=cfg.use_ema)
    except (KeyError, ValueError, RuntimeError) as error:  # not a checkpoint of that kind: one line naming it
        sys.exit(f"error: {flag}: {error.args[0]}")
    model.to(device).base.to(memory_format=conv_memory_format(device))
    if cfg.official:
        return model
    size = model.config.image_size
    if cfg.dataset in PAPER_DATASETS and cfg.ckpt == EvalConfig.ckpt and not paper_scale(size):
        sys.exit(f"error: {flag} {cfg.ckpt} holds a {size}x{size} model, not one of the paper's 256x256 models "
                 f"--dataset {cfg.dataset} is evaluated with: pass --ckpt of an ImageNet run, or --official CKPT "
                 f"(a --ckpt given explicitly is evaluated whatever its size)")
    return model


# What a run writes into --out-dir.
OUTPUTS = ("metrics.json", "adaptive_sweep.csv", "adaptive_sweep.png", "reconstructions.png", "halting.png")


@torch.no_grad()
def evaluate(model: ALIT, dataset, cfg: EvalConfig, ctx, inception=None, workers: int = 0):
    """One pass over the data: every token count, the base VQGAN, and the inputs of every criterion.

    Under torchrun each rank evaluates every world_size-th batch; the per-image arrays come back
    on every rank in the dataset's order and the FID statistics are summed over ranks, so the
    numbers are those of one process. Returns per-image arrays (all (T, n) over token counts),
    the FID statistics and, on rank 0, the first batch (for the Fig. 2 grid).
    """
    T, K = model.config.rollout_iters, model.config.tokens_per_iter
    thresholds = [float(t) for t in cfg.thresholds.split(",")]
    code_counts = torch.zeros(model.config.latent_codebook_size if model.quantize else 0, device=ctx.device)
    stats = {"real": FeatureStats(), "vqgan": FeatureStats(), **{f"tokens_{(t + 1) * K}": FeatureStats() for t in range(T)},
             **{f"l1<{thr:g}": FeatureStats() for thr in thresholds}} if inception else None
    mine = range(ctx.rank, math.ceil(len(dataset) / cfg.batch_size), ctx.world_size)  # this rank's batches
    rows = [i for b in mine for i in range(b * cfg.batch_size, min(len(dataset), (b + 1) * cfg.batch_size))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), cfg.batch_size, num_workers=workers)
    batches, keep = [], None
    for b, (images, targets) in zip(mine, tqdm(loader, desc="evaluate", dynamic_ncols=True, disable=not ctx.is_main)):
        images = images.to(ctx.device)
        # The halting draws (--halting) depend on the batch alone, not on which rank runs it.
        generator = torch.Generator(ctx.device).manual_seed(cfg.seed + b)
        arrays, recon, codes = evaluate_batch(model, images, cfg.halting, thresholds, inception, stats, generator)
        batches.append((b, {**{k: v.cpu() for k, v in arrays.items()}, "target": targets}))
        if codes is not None:
            code_counts += count_codes(codes, len(code_counts))
        if b == 0:
            keep = (images.cpu(), recon.cpu(), targets)
    if ctx.enabled:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, batches)
        batches = sorted((batch for rank in everyone for batch in rank), key=lambda batch: batch[0])
        dist.all_reduce(code_counts)
        for stat in (stats or {}).values():
            stat.all_reduce_(ctx.device)
    per_image = {k: torch.cat([arrays[k] for _, arrays in batches], dim=-1) for k in batches[0][1]}
    per_image["codebook"] = codebook_usage(code_counts.cpu())
    return per_image, stats, keep


def evaluate_batch(model: ALIT, images, halting: bool, thresholds, inception=None, stats=None, generator=None):
    """Every token count of one batch, on its device: ({"l1", "mse", "token_acc"} (T, B) and
    {"vqgan_l1", "vqgan_mse"} (B,)), the reconstructions (T, B, 3, H, W), and the latent indices of
    the longest code (None without quantization); Inception features go into `stats`. Over a VAE
    "code_mse" (T, B) replaces "token_acc", and the "vqgan_*" arrays are the VAE's."""
    T, K, B = model.config.rollout_iters, model.config.tokens_per_iter, len(images)
    if model.config.base == "vae":  # the posterior mean (eval mode), once, for the rollout and the VAE alone
        tokens = model.base_tokens(images)
        targets = model.base_targets(tokens)
        records = model(images, tokens, targets, halting=halting, reconstruct=True, generator=generator)
        vqgan_recon = model.vae.decode_tokens(tokens).float().clamp(0, 1)
        token_space = {"code_mse": torch.stack([code_error(targets, r.logits) for r in records])}
    else:
        latents = model.vqgan.encoder(images)  # once, for the rollout, its token accuracy and the VQGAN alone
        vqgan = model.vqgan.quantize_latents(latents)
        records = model(images, latents, vqgan.indices, halting=halting, reconstruct=True, generator=generator)
        vqgan_recon = model.vqgan.decode(vqgan.codes).float().clamp(0, 1)
        token_space = {"token_acc": torch.stack([(r.logits.argmax(-1) == vqgan.indices).float().mean(1) for r in records])}
    recon = torch.stack([r.recon.float().clamp(0, 1) for r in records])  # (T, B, 3, H, W)
    l1 = (recon - images).abs().mean(dim=(2, 3, 4))  # (T, B)
    arrays = {"l1": l1, "mse": (recon - images).square().mean(dim=(2, 3, 4)), **token_space,
              "vqgan_l1": (vqgan_recon - images).abs().mean(dim=(1, 2, 3)),
              "vqgan_mse": (vqgan_recon - images).square().mean(dim=(1, 2, 3))}
    if inception is not None:
        stats["real"].update(inception(images))
        stats["vqgan"].update(inception(vqgan_recon))
        features = inception(recon.flatten(0, 1)).view(T, B, -1)
        for t in range(T):
            stats[f"tokens_{(t + 1) * K}"].update(features[t])
        for thr in thresholds:  # the allocation's reconstructions reuse the features above
            chosen = first_passing(l1 < thr)
            stats[f"l1<{thr:g}"].update(features[chosen, torch.arange(B, device=chosen.device)])
    return arrays, recon, records[-1].indices


def codebook_usage(counts: torch.Tensor) -> dict | None:
    """How much of the latent codebook the longest codes of the evaluated images use: a collapsed
    codebook (one code for every token) carries no information whatever the decoder does."""
    if not len(counts):
        return None
    probs = counts / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": len(counts),
            "fraction_used": (counts > 0).float().mean().item(),
            "perplexity": torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum()).item()}


def per_count_rows(per_image: dict, counts: list, fid=lambda name: None) -> list:
    """L1, MSE, PSNR, token accuracy (VAE: code MSE) (and rFID) at every token count (Table 1, Fig. 2)."""
    key, name = ("token_acc", "token_accuracy") if "token_acc" in per_image else ("code_mse", "code_mse")
    return [{"tokens": c, "l1": per_image["l1"][t].mean().item(), "mse": per_image["mse"][t].mean().item(),
             "psnr": psnr(per_image["mse"][t]).mean().item(), name: per_image[key][t].mean().item(),
             "rfid": fid(f"tokens_{c}")} for t, c in enumerate(counts)]


def allocation_summary(chosen: torch.Tensor, per_image: dict, model: ALIT) -> dict:
    """Token counts chosen per image -> histogram, dataset representation and quality there."""
    K, T = model.config.tokens_per_iter, model.config.rollout_iters
    tokens = (chosen + 1) * K
    n = len(chosen)
    pick = (chosen, torch.arange(n))
    return {
        "mean_tokens": tokens.float().mean().item(),
        # §A.2: the dataset's cumulative token count as a fraction of the maximum
        "dataset_representation": tokens.sum().item() / (n * T * K),
        "histogram": {int((t + 1) * K): int((chosen == t).sum()) for t in range(T)},
        "l1": per_image["l1"][pick].mean().item(),
        "psnr": psnr(per_image["mse"][pick]).mean().item(),
    }


def main(argv=None):
    # Setup: the flags, the ranks, the seed and the output folder.
    cfg = parse_args(argv)
    ctx = setup_distributed(cfg.device)
    if cfg.keep_freed_memory and ctx.device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)

    # Model: the checkpoint, then the criterion defaults of its image size (flags left unset only).
    model = load_model(cfg, ctx.device)
    replaced = [name for name in OUTPUTS if (out / name).exists()]
    if replaced:
        ctx.log(f"replacing {', '.join(replaced)} in {out} (another --out-dir keeps them)")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    mc = model.config
    defaults = DEFAULT_CRITERION_OFFICIAL if paper_scale(mc.image_size) else DEFAULT_CRITERION_CPU
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})

    # Data: the images, cut to the model size as --protocol says, and the Inception network for rFID.
    ctx.log(f"protocol {cfg.protocol!r}: {PROTOCOLS[cfg.protocol]}")
    dataset = build_dataset(cfg.dataset, cfg.split, mc.image_size, cfg.data_dir, train=False,
                            eval_protocol="resize" if cfg.protocol == "resize" else "crop", num_images=cfg.num_images)
    workers = data_workers(cfg.num_workers, ctx.device)
    inception = load_inception(cfg, ctx)

    # Evaluate: one pass over the images; every measurement below is computed from its per-image arrays.
    per_image, stats, keep = evaluate(model, dataset, cfg, ctx, inception, workers)
    fid = (lambda name: fid_from_stats(stats["real"], stats[name])) if inception else (lambda name: None)
    # 1. Every token count (Table 1, Fig. 2), beside --compare's and the base tokenizer's own.
    rows = per_count_rows(per_image, mc.token_counts, fid)
    compare = compare_checkpoint(cfg, dataset, ctx, workers, mc)
    base_row = {"base": mc.base, "tokens": mc.num_image_tokens, "l1": per_image["vqgan_l1"].mean().item(),
                "mse": per_image["vqgan_mse"].mean().item(), "psnr": psnr(per_image["vqgan_mse"]).mean().item(),
                "rfid": fid("vqgan")}
    # 2. Adaptive allocation (Fig. 7): per image, the fewest tokens that pass a criterion.
    sweeps, pixel_choice, matched_threshold = adaptive_sweeps(per_image, cfg, model, fid)
    # 3. Early exit: the batched adaptive encode against running every iteration for every image.
    speed = time_early_exit(model, dataset, cfg, matched_threshold, ctx)
    # 4. Complexity (§3): does a more complex image get more tokens? (`shapes` records how complex.)
    complexity = complexity_vs_tokens(per_image, pixel_choice, cfg, model) if cfg.dataset == "shapes" else None

    # Results: the same on every rank; rank 0 alone writes them.
    results = {"protocol": cfg.protocol, "images": per_image["l1"].shape[1], "dataset": cfg.dataset,
               "checkpoint": cfg.official or cfg.ckpt, "halting": cfg.halting, "per_token_count": rows,
               "vqgan": base_row, "codebook": per_image["codebook"], "compare": compare,
               **sweeps, "early_exit": speed, "complexity": complexity}
    end_distributed()
    if ctx.is_main:
        write_outputs(results, model, per_image, keep, cfg, ctx.device, with_fid=inception is not None)
    return results


def load_inception(cfg: EvalConfig, ctx):
    """pytorch-fid's Inception on the device, or None (logging where its weights are looked for): no rFID."""
    if not cfg.inception_weights:
        ctx.log("no --inception-weights given: reporting everything but FID; "
                + not_found("inception", "--inception-weights"))
        return None
    try:
        return InceptionV3.from_pytorch_fid(cfg.inception_weights).to(ctx.device)
    except (KeyError, ValueError, RuntimeError) as error:
        sys.exit(f"error: --inception-weights: {error.args[0]}")


def compare_checkpoint(cfg: EvalConfig, dataset, ctx, workers: int, mc) -> dict | None:
    """--compare's rows per token count and codebook usage, or None: missing, --ckpt itself, or other counts."""
    if not cfg.compare or cfg.official or not Path(cfg.compare).is_file() or \
            Path(cfg.compare).resolve() == Path(cfg.ckpt).resolve():
        return None
    other = load_model(EvalConfig(ckpt=cfg.compare, use_ema=cfg.use_ema), ctx.device, flag="--compare")
    if other.config.rollout_iters != mc.rollout_iters or other.config.tokens_per_iter != mc.tokens_per_iter:
        return None
    other_images = evaluate(other, dataset, cfg, ctx, None, workers)[0]
    return {"checkpoint": cfg.compare, "per_token_count": per_count_rows(other_images, mc.token_counts),
            "codebook": other_images["codebook"]}


def adaptive_sweeps(per_image: dict, cfg: EvalConfig, model: ALIT, fid) -> tuple:
    """Per --thresholds L1 (rFID too), the same saturated, and the token-space criterion beside the default pixel
    one: their four entries of metrics.json, the default's choices and the matched token criterion's threshold."""
    sweep, saturated_sweep = [], []
    for thr in [float(v) for v in cfg.thresholds.split(",")]:
        chosen = first_passing(per_image["l1"] < thr)
        sweep.append({"criterion": f"l1<{thr:g}", "threshold": thr, **allocation_summary(chosen, per_image, model),
                      "rfid": fid(f"l1<{thr:g}")})
        if cfg.saturation:  # the same thresholds, saturated images stopping early (no FID: not cached)
            chosen = first_passing(l1_passes(per_image["l1"], thr, cfg.saturation))
            saturated_sweep.append({"criterion": criterion_name(thr, cfg.saturation), "threshold": thr,
                                    **allocation_summary(chosen, per_image, model)})
    # The cheaper token-space criterion beside the default pixel one, matched by the closest mean token count.
    pixel_choice = first_passing(l1_passes(per_image["l1"], cfg.default_threshold, cfg.saturation))
    token_sweep = []
    if model.config.base == "vae":  # the code error, thresholds in multiples of the longest code's mean
        longest = per_image["code_mse"][-1].mean().item()
        token_criteria = [(f"code_mse<{m * longest:.3g}", m * longest, per_image["code_mse"] < m * longest)
                          for m in (float(v) for v in cfg.code_thresholds.split(","))]
    else:
        token_criteria = [(f"token_acc>={thr:g}", thr, per_image["token_acc"] >= thr)
                          for thr in (float(v) for v in cfg.token_thresholds.split(","))]
    for name, thr, passes in token_criteria:
        chosen = first_passing(passes)
        token_sweep.append({"criterion": name, "threshold": thr, **allocation_summary(chosen, per_image, model),
                            "same_count_as_pixel_default": (chosen == pixel_choice).float().mean().item()})
    pixel_default = allocation_summary(pixel_choice, per_image, model)
    matched = min(token_sweep, key=lambda r: abs(r["mean_tokens"] - pixel_default["mean_tokens"]))
    versus = {"pixel": criterion_name(cfg.default_threshold, cfg.saturation), **pixel_default,
              "token": matched["criterion"], "token_mean_tokens": matched["mean_tokens"],
              "same_count": matched["same_count_as_pixel_default"]}
    return ({"adaptive_l1": sweep, "adaptive_l1_saturated": saturated_sweep, "adaptive_token_accuracy": token_sweep,
             "pixel_vs_token_criterion": versus}, pixel_choice, matched["threshold"])


def complexity_vs_tokens(per_image: dict, chosen: torch.Tensor, cfg: EvalConfig, model: ALIT) -> dict:
    """Per complexity level, the mean token count the default criterion chose (`chosen`) and the L1 at
    every count, and how the level and the count rank together (Spearman)."""
    K, T, counts = model.config.tokens_per_iter, model.config.rollout_iters, model.config.token_counts
    level = per_image["target"]
    levels = level.unique()
    varies = len(levels) > 1 and len(chosen.unique()) > 1  # else Spearman is undefined
    rho = float(scipy.stats.spearmanr(level.numpy(), chosen.numpy())[0]) if varies else None
    images_per_length = torch.bincount(chosen, minlength=T)
    return {"spearman_complexity_vs_tokens": rho, "criterion": criterion_name(cfg.default_threshold, cfg.saturation),
            "lengths_chosen_for_5pct": int((images_per_length >= 0.05 * len(chosen)).sum()),
            "mean_tokens_per_level": {int(c): ((chosen[level == c] + 1) * K).float().mean().item() for c in levels},
            "l1_per_level_per_tokens": {int(c): {counts[t]: per_image["l1"][t][level == c].mean().item()
                                                 for t in range(T)} for c in levels}}


def write_outputs(results: dict, model: ALIT, per_image: dict, keep, cfg: EvalConfig, device, with_fid: bool):
    """Rank 0's part: OUTPUTS into --out-dir, and the markdown report printed."""
    out, T = Path(cfg.out_dir), model.config.rollout_iters
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    sweep, saturated_sweep = results["adaptive_l1"], results["adaptive_l1_saturated"]
    write_sweep_csv(out / "adaptive_sweep.csv", sweep + saturated_sweep + results["adaptive_token_accuracy"])
    fixed = [{**row, "dataset_representation": (t + 1) / T} for t, row in enumerate(results["per_token_count"])]
    plot_sweep(out / "adaptive_sweep.png", sweep, saturated_sweep, fixed, with_fid)
    order, labels = spread_rows(keep, per_image, cfg.grid_images, cfg.dataset == "shapes")
    save_fig2_grid(keep, per_image, out / "reconstructions.png", order, labels, model.config.token_counts)
    save_halting_figure(model, keep[0][order].to(device), labels, out / "halting.png", cfg.seed)
    print(markdown_report(results))
    print("wrote " + ", ".join(str(out / name) for name in OUTPUTS))


def criterion_name(threshold: float, saturation: float) -> str:
    return f"l1<{threshold:g}" + (f" or <={1 + saturation:g}x longest" if saturation else "")


def time_early_exit(model: ALIT, dataset, cfg: EvalConfig, token_threshold: float, ctx) -> dict:
    """Seconds to encode `speed_images` images adaptively (pixel and token criterion, early exit)
    against running every iteration and decoding every reconstruction for every image (what the
    official encode does), and whether early exit picks the same counts as the exhaustive search.
    Under torchrun each rank times its share of the images; the seconds are the slowest rank's."""
    n = min(cfg.speed_images, len(dataset))
    share = range(ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size)
    images = torch.stack([dataset[i][0] for i in share]).to(ctx.device)
    pixel = l1_below(cfg.default_threshold)
    token = code_error_below(token_threshold) if model.config.base == "vae" else token_accuracy_above(token_threshold)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else lambda: None  # the GPU's work, not its queueing

    def exhaustive():
        records = model.rollout(images)
        return first_passing(torch.stack([pixel(images, r.recon) for r in records])).cpu()

    with torch.no_grad():
        exhaustive()  # warm-up
        seconds, results = [], {}
        for name, run in [("every_iteration", exhaustive),
                          ("early_exit_pixel", lambda: model.encode_adaptive(images, pixel)),
                          ("early_exit_token", lambda: model.encode_adaptive(images, token, token_space=True))]:
            sync()
            start = time.perf_counter()
            results[name] = run()
            sync()
            seconds.append(time.perf_counter() - start)
    tokens = torch.stack([(results["every_iteration"] + 1) * model.config.tokens_per_iter,
                          torch.tensor([c.num_tokens for c in results["early_exit_pixel"]]),
                          torch.tensor([c.num_tokens for c in results["early_exit_token"]])])  # (3, this rank's images)
    if ctx.enabled:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, (tokens, seconds))
        tokens = torch.cat([rank_tokens for rank_tokens, _ in everyone], dim=1)
        seconds = [max(rank_seconds[i] for _, rank_seconds in everyone) for i in range(len(seconds))]
    timings = dict(zip(["every_iteration", "early_exit_pixel", "early_exit_token"], seconds))
    return {"images": n, "seconds": timings,
            "speedup_pixel": timings["every_iteration"] / timings["early_exit_pixel"],
            "speedup_token": timings["every_iteration"] / timings["early_exit_token"],
            "same_counts_as_exhaustive": (tokens[1] == tokens[0]).float().mean().item(),
            "mean_tokens_pixel": tokens[1].float().mean().item(),
            "mean_tokens_token": tokens[2].float().mean().item()}


if __name__ == "__main__":
    main()
