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
import argparse
import json
import math
import sys
import time
from pathlib import Path

import scipy.stats
import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import flags
from data import DATASETS, build_dataset
from distributed import conv_memory_format
from fid import FeatureStats, InceptionV3, fid_from_stats
from flags import EXISTING_FOLDER, FILE, FOLDER, PAPER_DATASETS, Number, Numbers
from model import ALIT
from plots import plot_sweep, save_fig2_grid, save_halting_figure, spread_rows
from quantize import count_codes
from report import markdown_report, write_sweep_csv
from selection import (DEFAULT_CRITERION_CPU, DEFAULT_CRITERION_OFFICIAL, first_passing, l1_below, l1_passes, psnr,
                       token_score_passes)
from weights import find_weights, load_alit, not_found

# -----------------------------------------------------------------------------
# The evaluation run: every token count, adaptive allocation, complexity

PROTOCOLS = {
    "crop": "the paper's code: center crop to the model size, no resizing",
    "resize": "TiTok: resize the shorter side to the model size, then center crop",
}


DEFAULT_CKPT = "out/stage2/ckpt.pt"


def parser() -> flags.Parser:
    p = flags.Parser(__doc__)
    p.add("--ckpt", DEFAULT_CKPT, FILE, "a train_stage1.py / train_stage2.py checkpoint ...")
    p.add("--compare", "out/stage1/ckpt.pt", FILE, "a second checkpoint reported beside --ckpt, per token count "
          "(stage 1, which stage 2 must not undo); skipped when it is missing or is --ckpt itself")
    p.add("--official", None, FILE, "... or an official ALIT checkpoint (ALIT.from_official): a path, or a name "
          "looked up in $ALIT_WEIGHTS and the torch hub cache")
    p.add("--heads", None, Numbers(Number(int, 1)), "official checkpoints of non-preset sizes: 8 or 8,8 (encoder, "
          "decoder)")
    p.add("--use-ema", True, bool, "evaluate the EMA weights of our checkpoints")
    p.add("--dataset", "shapes", str, "shapes is drawn on the fly; the others read --data-dir", choices=DATASETS)
    p.add("--data-dir", None, EXISTING_FOLDER, "root of the image folder (imagenet: <root>/val/<wnid>/*)")
    p.add("--split", "val", str, "the images evaluated", choices=("train", "val"))
    p.add("--num-images", None, Number(int, 1), "the first so many images", default_text="the whole split "
          "(shapes: 1000)")
    p.add("--protocol", "crop", str, "how images are cut to the model size (PROTOCOLS)", choices=tuple(PROTOCOLS))
    p.add("--batch-size", 50, Number(int, 1), "images per forward pass")
    p.add("--inception-weights", None, FILE, "pytorch-fid's Inception",
          default_text="pt_inception-2015-12-05-6726825d.pth if it is in $ALIT_WEIGHTS or the torch hub cache, "
                       "else no FID")
    p.add("--thresholds", None, Numbers(Number(float, 0, ends="(]")), "L1 thresholds of the adaptive allocation "
          "sweep (Fig. 7)", default_text="0.03,0.05,0.07,0.1,0.15 at 256x256; 0.03,0.04,0.05,0.07 below")
    p.add("--token-thresholds", "0.3,0.5,0.7,0.8,0.9", Numbers(Number(float, 0, 1)), "token-accuracy thresholds of "
          "the cheaper criterion (VQGAN)")
    p.add("--code-thresholds", "1.1,1.25,1.5,2,3,5", Numbers(Number(float, 0, ends="(]")), "VAE: code-error "
          "thresholds of the token-space criterion, in multiples of the mean code MSE at the longest code")
    p.add("--default-threshold", None, Number(float, 0, ends="(]"), "the default criterion (allocation summary, "
          "complexity vs tokens): L1 below this, or within --saturation of the image's L1 at the longest code",
          default_text="the official encode's 0.07 at 256x256; 0.04 below, where complex scenes never get there")
    p.add("--saturation", None, Number(float, 0, 1), "a fraction: 0.02 stops an image once it is within 2%% of its "
          "longest code's L1", default_text="none at 256x256; 0.03 below")
    p.add("--halting", False, bool, "the official code halts in eval too, which makes reconstructions random")
    p.add("--grid-images", 8, Number(int, 1), "rows of reconstructions.png and halting.png, simple to complex")
    p.add("--speed-images", 64, Number(int, 1), "images timed for early exit vs running every iteration")
    p.add("--out-dir", "out/eval", FOLDER, "metrics.json, the sweep's CSV and plot, reconstructions.png, halting.png")
    p.add("--device", "auto", str, "auto: CUDA when available", choices=("auto", "cuda", "cpu"))
    p.add("--num-workers", None, Number(int, 0), "DataLoader processes per rank", default_text="on CUDA the CPUs "
          "this process may use shared by the ranks, less one each; 0 on the CPU")
    p.add("--seed", 0, Number(int, 0), "of the halting draws (with --halting)")
    p.add("--keep-freed-memory", True, bool, "on the CPU, keep freed memory in the process "
          "(distributed.keep_freed_memory)")
    return p


def parse_args(argv=None):
    args, _ = parser().parse(argv)
    flags.check_data(args.dataset, args.data_dir, (args.split,))
    try:
        official = find_weights("alit", "--official", args.official) if args.official else None
        inception = find_weights("inception", "--inception-weights", args.inception_weights)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    args.official, args.inception_weights = official and str(official), inception and str(inception)
    return args


def load_checkpoint_model(args, device, flag="--ckpt") -> ALIT:
    """--official or --ckpt, in eval mode. With --dataset imagenet100/imagenet, the default --ckpt must
    hold a 256x256 model (the paper's): the shapes pipeline's 32x32 one is not evaluated on ImageNet unasked."""
    model = load_alit(args.official, args.heads, args.ckpt, flag, args.use_ema, "train it, or pass --official PATH")
    model.eval()
    model.to(device).base.to(memory_format=conv_memory_format(device))
    size = model.config.image_size
    if not args.official and args.dataset in PAPER_DATASETS and args.ckpt == DEFAULT_CKPT and \
            not flags.paper_scale(size):
        sys.exit(f"error: {flag} {args.ckpt} holds a {size}x{size} model, not one of the paper's 256x256 models "
                 f"--dataset {args.dataset} is evaluated with: pass --ckpt of an ImageNet run, or --official CKPT "
                 f"(a --ckpt given explicitly is evaluated whatever its size)")
    return model


# What a run writes into --out-dir.
OUTPUTS = ("metrics.json", "adaptive_sweep.csv", "adaptive_sweep.png", "reconstructions.png", "halting.png")


@torch.no_grad()
def evaluate(model: ALIT, dataset, args, ctx, inception=None, workers: int = 0):
    """One pass over the data: every token count, the base tokenizer alone, and the inputs of every criterion.

    Under torchrun each rank evaluates every world_size-th batch; the per-image arrays come back
    on every rank in the dataset's order and the FID statistics are summed over ranks, so the
    numbers are those of one process. Returns per-image arrays (all (T, n) over token counts),
    the FID statistics and, on rank 0, the first batch (for the Fig. 2 grid).
    """
    T, K = model.config.rollout_iters, model.config.tokens_per_iter
    thresholds = [float(t) for t in args.thresholds.split(",")]
    code_counts = torch.zeros(model.config.latent_codebook_size if model.quantize else 0, device=ctx.device)
    stats = {"real": FeatureStats(), "base": FeatureStats(),
             **{f"tokens_{(t + 1) * K}": FeatureStats() for t in range(T)},
             **{f"l1<{thr:g}": FeatureStats() for thr in thresholds}} if inception else None
    mine = range(ctx.rank, math.ceil(len(dataset) / args.batch_size), ctx.world_size)  # this rank's batches
    rows = [i for b in mine for i in range(b * args.batch_size, min(len(dataset), (b + 1) * args.batch_size))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), args.batch_size, num_workers=workers)
    batches, keep = [], None
    for b, (images, targets) in zip(mine, tqdm(loader, desc="evaluate", dynamic_ncols=True, disable=not ctx.is_main)):
        images = images.to(ctx.device)
        # The halting draws (--halting) depend on the batch alone, not on which rank runs it.
        generator = torch.Generator(ctx.device).manual_seed(args.seed + b)
        arrays, recon, codes = evaluate_batch(model, images, args.halting, thresholds, inception, stats, generator)
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
    """Every token count of one batch, on its device: ({"l1", "mse", the base's token score} (T, B) and
    {"base_l1", "base_mse"} (B,), the base tokenizer alone), the reconstructions (T, B, 3, H, W), and the
    latent indices of the longest code (None without quantization); Inception features go into `stats`.
    The token score is the token accuracy over a VQGAN ("token_acc"), the code MSE over a VAE ("code_mse")."""
    T, K, B = model.config.rollout_iters, model.config.tokens_per_iter, len(images)
    # The base's 2D tokens once (a VAE's: the posterior mean, eval mode), for the rollout, its token score and
    # the base alone.
    tokens = model.base_tokens(images)
    targets = model.base_targets(tokens)
    records = model(images, tokens, targets, halting=halting, reconstruct=True, generator=generator)
    base_recon = model.base.reconstruct(tokens).float().clamp(0, 1)
    scores = torch.stack([model.base.token_score(r.prediction, targets) for r in records])
    recon = torch.stack([r.recon.float().clamp(0, 1) for r in records])  # (T, B, 3, H, W)
    l1 = (recon - images).abs().mean(dim=(2, 3, 4))  # (T, B)
    arrays = {"l1": l1, "mse": (recon - images).square().mean(dim=(2, 3, 4)), model.base.token_score_name: scores,
              "base_l1": (base_recon - images).abs().mean(dim=(1, 2, 3)),
              "base_mse": (base_recon - images).square().mean(dim=(1, 2, 3))}
    if inception is not None:
        stats["real"].update(inception(images))
        stats["base"].update(inception(base_recon))
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
    args = parse_args(argv)
    ctx = distributed.setup(args.device, keep_freed=args.keep_freed_memory)
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)

    # Model: the checkpoint, then the criterion defaults of its image size (flags left unset only).
    model = load_checkpoint_model(args, ctx.device)
    replaced = [name for name in OUTPUTS if (out / name).exists()]
    if replaced:
        ctx.log(f"replacing {', '.join(replaced)} in {out} (another --out-dir keeps them)")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    mc = model.config
    flags.with_recipe(args, mc.image_size, DEFAULT_CRITERION_OFFICIAL, DEFAULT_CRITERION_CPU)

    # Data: the images, cut to the model size as --protocol says, and the Inception network for rFID.
    ctx.log(f"protocol {args.protocol!r}: {PROTOCOLS[args.protocol]}")
    dataset = build_dataset(args.dataset, args.split, mc.image_size, args.data_dir, train=False,
                            eval_protocol="resize" if args.protocol == "resize" else "crop", num_images=args.num_images)
    workers = distributed.data_workers(args.num_workers, ctx.device)
    inception = load_inception(args, ctx)

    # Evaluate: one pass over the images; every measurement below is computed from its per-image arrays.
    per_image, stats, keep = evaluate(model, dataset, args, ctx, inception, workers)
    fid = (lambda name: fid_from_stats(stats["real"], stats[name])) if inception else (lambda name: None)
    # 1. Every token count (Table 1, Fig. 2), beside --compare's and the base tokenizer's own.
    rows = per_count_rows(per_image, mc.token_counts, fid)
    compare = compare_checkpoint(args, dataset, ctx, workers, mc)
    base_row = {"base": mc.base, "tokens": mc.num_image_tokens, "l1": per_image["base_l1"].mean().item(),
                "mse": per_image["base_mse"].mean().item(), "psnr": psnr(per_image["base_mse"]).mean().item(),
                "rfid": fid("base")}
    # 2. Adaptive allocation (Fig. 7): per image, the fewest tokens that pass a criterion.
    sweeps, pixel_choice, matched_threshold = adaptive_sweeps(per_image, args, model, fid)
    # 3. Early exit: the batched adaptive encode against running every iteration for every image.
    speed = time_early_exit(model, dataset, args, matched_threshold, ctx)
    # 4. Complexity (§3): does a more complex image get more tokens? (`shapes` records how complex.)
    complexity = complexity_vs_tokens(per_image, pixel_choice, args, model) if args.dataset == "shapes" else None

    # Results: the same on every rank; rank 0 alone writes them.
    results = {"protocol": args.protocol, "images": per_image["l1"].shape[1], "dataset": args.dataset,
               "checkpoint": args.official or args.ckpt, "halting": args.halting, "per_token_count": rows,
               "vqgan": base_row,  # the base tokenizer alone ("base" says which), under metrics.json's name
               "codebook": per_image["codebook"], "compare": compare,
               **sweeps, "early_exit": speed, "complexity": complexity}
    distributed.end()
    if ctx.is_main:
        write_outputs(results, model, per_image, keep, args, ctx.device, with_fid=inception is not None)
    return results


def load_inception(args, ctx):
    """pytorch-fid's Inception on the device, or None (logging where its weights are looked for): no rFID."""
    if not args.inception_weights:
        ctx.log("no --inception-weights given: reporting everything but FID; "
                + not_found("inception", "--inception-weights"))
        return None
    try:
        return InceptionV3.from_pytorch_fid(args.inception_weights).to(ctx.device)
    except (KeyError, ValueError, RuntimeError) as error:
        sys.exit(f"error: --inception-weights: {error.args[0]}")


def compare_checkpoint(args, dataset, ctx, workers: int, mc) -> dict | None:
    """--compare's rows per token count and codebook usage, or None: missing, --ckpt itself, or other counts."""
    if not args.compare or args.official or not Path(args.compare).is_file() or \
            Path(args.compare).resolve() == Path(args.ckpt).resolve():
        return None
    compared = argparse.Namespace(**{**vars(args), "ckpt": args.compare, "official": None})
    other = load_checkpoint_model(compared, ctx.device, flag="--compare")
    if other.config.rollout_iters != mc.rollout_iters or other.config.tokens_per_iter != mc.tokens_per_iter:
        return None
    other_images = evaluate(other, dataset, args, ctx, None, workers)[0]
    return {"checkpoint": args.compare, "per_token_count": per_count_rows(other_images, mc.token_counts),
            "codebook": other_images["codebook"]}


def adaptive_sweeps(per_image: dict, args, model: ALIT, fid) -> tuple:
    """Per --thresholds L1 (rFID too), the same saturated, and the token-space criterion beside the default pixel
    one: their four entries of metrics.json, the default's choices and the matched token criterion's threshold."""
    sweep, saturated_sweep = [], []
    for thr in [float(v) for v in args.thresholds.split(",")]:
        chosen = first_passing(per_image["l1"] < thr)
        sweep.append({"criterion": f"l1<{thr:g}", "threshold": thr, **allocation_summary(chosen, per_image, model),
                      "rfid": fid(f"l1<{thr:g}")})
        if args.saturation:  # the same thresholds, saturated images stopping early (no FID: not cached)
            chosen = first_passing(l1_passes(per_image["l1"], thr, args.saturation))
            saturated_sweep.append({"criterion": criterion_name(thr, args.saturation), "threshold": thr,
                                    **allocation_summary(chosen, per_image, model)})
    # The cheaper token-space criterion beside the default pixel one, matched by the closest mean token count.
    pixel_choice = first_passing(l1_passes(per_image["l1"], args.default_threshold, args.saturation))
    token_sweep = []
    name, scores = model.base.token_score_name, per_image[model.base.token_score_name]
    if model.base.higher_score_is_better:  # a score in [0, 1] (token accuracy): the thresholds as given
        token_criteria = [(f"{name}>={thr:g}", thr, scores >= thr)
                          for thr in (float(v) for v in args.token_thresholds.split(","))]
    else:  # an error on the base's own scale (code MSE): thresholds in multiples of the longest code's mean
        longest = scores[-1].mean().item()
        token_criteria = [(f"{name}<{m * longest:.3g}", m * longest, scores < m * longest)
                          for m in (float(v) for v in args.code_thresholds.split(","))]
    for name, thr, passes in token_criteria:
        chosen = first_passing(passes)
        token_sweep.append({"criterion": name, "threshold": thr, **allocation_summary(chosen, per_image, model),
                            "same_count_as_pixel_default": (chosen == pixel_choice).float().mean().item()})
    pixel_default = allocation_summary(pixel_choice, per_image, model)
    matched = min(token_sweep, key=lambda r: abs(r["mean_tokens"] - pixel_default["mean_tokens"]))
    versus = {"pixel": criterion_name(args.default_threshold, args.saturation), **pixel_default,
              "token": matched["criterion"], "token_mean_tokens": matched["mean_tokens"],
              "same_count": matched["same_count_as_pixel_default"]}
    return ({"adaptive_l1": sweep, "adaptive_l1_saturated": saturated_sweep, "adaptive_token_accuracy": token_sweep,
             "pixel_vs_token_criterion": versus}, pixel_choice, matched["threshold"])


def complexity_vs_tokens(per_image: dict, chosen: torch.Tensor, args, model: ALIT) -> dict:
    """Per complexity level, the mean token count the default criterion chose (`chosen`) and the L1 at
    every count, and how the level and the count rank together (Spearman)."""
    K, T, counts = model.config.tokens_per_iter, model.config.rollout_iters, model.config.token_counts
    level = per_image["target"]
    levels = level.unique()
    varies = len(levels) > 1 and len(chosen.unique()) > 1  # else Spearman is undefined
    rho = float(scipy.stats.spearmanr(level.numpy(), chosen.numpy())[0]) if varies else None
    images_per_length = torch.bincount(chosen, minlength=T)
    return {"spearman_complexity_vs_tokens": rho, "criterion": criterion_name(args.default_threshold, args.saturation),
            "lengths_chosen_for_5pct": int((images_per_length >= 0.05 * len(chosen)).sum()),
            "mean_tokens_per_level": {int(c): ((chosen[level == c] + 1) * K).float().mean().item() for c in levels},
            "l1_per_level_per_tokens": {int(c): {counts[t]: per_image["l1"][t][level == c].mean().item()
                                                 for t in range(T)} for c in levels}}


def write_outputs(results: dict, model: ALIT, per_image: dict, keep, args, device, with_fid: bool):
    """Rank 0's part: OUTPUTS into --out-dir, and the markdown report printed."""
    out, T = Path(args.out_dir), model.config.rollout_iters
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    sweep, saturated_sweep = results["adaptive_l1"], results["adaptive_l1_saturated"]
    write_sweep_csv(out / "adaptive_sweep.csv", sweep + saturated_sweep + results["adaptive_token_accuracy"])
    fixed = [{**row, "dataset_representation": (t + 1) / T} for t, row in enumerate(results["per_token_count"])]
    plot_sweep(out / "adaptive_sweep.png", sweep, saturated_sweep, fixed, with_fid)
    order, labels = spread_rows(keep, per_image, args.grid_images, args.dataset == "shapes")
    save_fig2_grid(keep, per_image, out / "reconstructions.png", order, labels, model.config.token_counts)
    save_halting_figure(model, keep[0][order].to(device), labels, out / "halting.png", args.seed)
    print(markdown_report(results))
    print("wrote " + ", ".join(str(out / name) for name in OUTPUTS))


def criterion_name(threshold: float, saturation: float) -> str:
    return f"l1<{threshold:g}" + (f" or <={1 + saturation:g}x longest" if saturation else "")


def time_early_exit(model: ALIT, dataset, args, token_threshold: float, ctx) -> dict:
    """Seconds to encode `speed_images` images adaptively (pixel and token criterion, early exit)
    against running every iteration and decoding every reconstruction for every image (what the
    official encode does), and whether early exit picks the same counts as the exhaustive search.
    Under torchrun each rank times its share of the images; the seconds are the slowest rank's."""
    n = min(args.speed_images, len(dataset))
    share = range(ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size)
    images = torch.stack([dataset[i][0] for i in share]).to(ctx.device)
    pixel = l1_below(args.default_threshold)
    token = token_score_passes(model.base, token_threshold)
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
