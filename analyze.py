"""Analyses: what the adaptive tokens attend to, bind and cost, as one command.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §2 and Fig. 3 (recurrence
sharpens the latent tokens' attention), §A.3 and Tab. 2 (object binding), §3 and
Fig. 4/5 (complexity against tokens), §A.2 and Fig. 6-9 (token selection against the
task of interest), §A.4 (linear probing).

One pass over the images records the rollout (observe.py); each analysis keeps what it needs of
every batch and has a file of its own:

1. attention.py: attention maps (Fig. 3, 11, 13): per iteration, the 2D queries' attention to each latent
   token at a decoder layer (--map-layer; the paper's 7th of 8), averaged over heads, drawn; the entropy
   of these maps and of the last encoder layer's latent rows.
2. binding.py: object binding, measured: the paper shows the maps and scores them against ImageNet-S
   segments; on `shapes` every object's mask is known, so each 2D token is assigned to the latent
   token it attends most and the partition is scored against the objects (ARI, foreground ARI,
   matched mIoU), per iteration and complexity level, against the same assignment shuffled over
   the image and a fixed-length pass.
3. complexity.py: complexity curves (Fig. 4/5): L1 against tokens per level, and the token counts
   chosen per level at two L1 thresholds.
4. tasks.py: task-aligned selection (Fig. 6-9): a small classifier and a small depth regressor trained
   here on original `shapes` images select tokens (classifier top-X correct, depth error < threshold,
   beside L1 < threshold and token accuracy); judges of another architecture and seed score the tasks
   of interest beside L1, PSNR (and FID), so that TSC = TOI can fail.
5. probes.py: linear probing (§A.4): a linear classifier on the mean-pooled encoder output (one mean over
   image and latent tokens, as the official code) per iteration and per prefix of latent tokens, against
   the pooled VQGAN grid and an untrained ALIT, scored on a test set of its own sized for the claims'
   power; of a shapes label, or of the class on photos with classes (imagenet100, imagenet), as §A.4 does.
6. familiarity.py: familiarity (§A.2): `shapes` variants the model never saw (data.VARIANTS, and
   --ood-dir) against in-distribution images of the same complexity levels, at Tab. 1's lengths (a
   quarter of the maximum tokens and the maximum), relative to the base's own floor.
7. segments.py: Tab. 2's protocol: the decoder's maps (heads averaged, and per head) thresholded at the
   top X of their cells (percentile) and of their mass (DINO), scored per true segment (best token and
   Hungarian), against the maps shuffled, an untrained ALIT and the encoder's maps.

The claims' standard errors: verdicts.py; the figures: plots.py; the printed report: report.py.

    python analyze.py                           # out/stage2/ckpt.pt on `shapes` -> out/analyze/
    python analyze.py --official alit_small.pth --dataset imagenet100 --data-dir /data/imagenet
"""
import json
import sys
import time
from pathlib import Path

import torch

import attention
import binding
import complexity
import distributed
import familiarity
import flags
import observe
import probes
import segments
import tasks
from data import DATASETS, ShapesDataset, build_dataset
from fid import InceptionV3
from flags import EXISTING_FOLDER, FILE, FOLDER, Number, Numbers
from model import ALIT
from report import analysis_report
from selection import DEFAULT_CRITERION_CPU
from weights import load_alit


def parser() -> flags.Parser:
    p = flags.Parser(__doc__)
    p.add("--ckpt", "out/stage2/ckpt.pt", FILE, "a train_stage1.py / train_stage2.py checkpoint ...")
    p.add("--official", None, FILE, "... or an official ALIT checkpoint (ALIT.from_official)")
    p.add("--heads", None, Numbers(Number(int, 1)), "official checkpoints of non-preset sizes: 8 or 8,8 (encoder, "
          "decoder)")
    p.add("--use-ema", True, bool, "analyze the EMA weights of our checkpoints")
    p.add("--dataset", "shapes", str, "the images analysed; binding, complexity and the classifier need shapes "
          "(masks, levels, labels), other datasets get the rest", choices=DATASETS)
    p.add("--data-dir", None, EXISTING_FOLDER, "root of the image folder (imagenet: <root>/val/<wnid>/*)")
    p.add("--split", "val", str, "the split whose images are analysed", choices=("train", "val"))
    p.add("--num-images", 500, Number(int, 2), "the first so many images of the split")
    p.add("--protocol", "crop", str, "photos: center crop (the paper's code) or resize, then crop",
          choices=("crop", "resize"))
    p.add("--batch-size", 50, Number(int, 1), "images per forward pass (attention weights of every iteration are "
          "held per batch)")
    p.add("--attention-images", 3, Number(int, 0), "images drawn in attention_<i>.png (Fig. 3), spread over the "
          "complexity levels")
    p.add("--l1-thresholds", "auto", Numbers(Number(float, 0, ends="(]"), auto=True), "thresholds of the L1 criterion "
          "(Fig. 7); auto: the 5th, 10th, ..., 95th percentiles of every image's L1 at every token count, which "
          "spreads the selections from few tokens to all")
    p.add("--saturation", DEFAULT_CRITERION_CPU["saturation"], Number(float, 0, 1), "a third pixel criterion beside "
          "L1 < threshold (0: none): L1 < threshold, or within this fraction of the image's L1 at the most tokens, "
          "where more tokens stop helping (evaluate.py's default below 256x256)")
    p.add("--token-thresholds", "auto", Numbers(Number(float, 0, 1), auto=True), "thresholds of the token-space "
          "criterion (token accuracy >= threshold); auto as --l1-thresholds")
    p.add("--histogram-thresholds", "auto", Numbers(Number(float, 0, ends="(]"), auto=True), "the two L1 thresholds "
          "of histograms.png (Fig. 4/5); auto: the median image's L1 at the fewest and at the most tokens (half "
          "the images pass at once; half never do)")
    p.add("--top-x", "1,2,3", Numbers(Number(int, 1)), "the classifier criterion: the true label among the X "
          "highest scores (Fig. 8's Top-X)")
    p.add("--label", "level", str, "what the classifier predicts: the complexity level (5 classes) or how many "
          "shapes were drawn (12)", choices=tuple(observe.LABELS))
    p.add("--classifier-images", 4000, Number(int, 1), "training images of the four task models (shapes train "
          "split): the criteria's classifier and depth regressor and their independent judges, cached in --out-dir")
    p.add("--classifier-steps", 800, Number(int, 1), "their optimizer steps, batch 32")
    p.add("--depth-thresholds", "auto", Numbers(Number(float, 0, ends="(]"), auto=True), "thresholds of the depth "
          "criterion: the depth regressor's mean error on the reconstruction against its prediction on the "
          "original (the paper's pseudo-ground truth), in layers; auto as --l1-thresholds")
    p.add("--probe-images", 1000, Number(int, 2), "train-split images the linear probes are fit on (§A.4; photos: "
          "spread evenly over the classes, read as the analysed images are)")
    p.add("--probe-test-images", 2000, Number(int, 2), "val-split images the linear probes are scored on, an "
          "encoder-only pass of their own: enough that the claims' standard error is at most a third of §A.4's "
          "+3.9 points (probes.SE_TARGET); the untrained control scores the first quarter; photos: spread evenly over "
          "the classes")
    p.add("--familiarity-images", 150, Number(int, 2), "images per unseen variant of shapes (§A.2), beside as "
          "many of the analysed ones")
    p.add("--ood-dir", None, EXISTING_FOLDER, "your own out-of-distribution images, measured as the variants are")
    p.add("--map-layer", None, Number(int, 1), "the decoder layer (1-based) whose attention gives Tab. 2's and "
          "Fig. 3's maps, the 2D queries' attention to each latent token; default the second to last (the paper's "
          "7th of 8), the last of a one-layer decoder")
    p.add("--segment-thresholds", "0.4,0.6,0.8", Numbers(Number(float, 0, 1, "(]")), "Tab. 2's X: a segment is a "
          "map's top X of cells (percentile, Tab. 2's header) or of attention mass (DINO's), both scored")
    p.add("--best-x-grid", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", Numbers(Number(float, 0, 1, "(]")), "the X a "
          "best X per image is chosen among (Tab. 2's threshold adjusted per image), with --segment-thresholds")
    p.add("--inception-weights", None, FILE, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth: FID as a task "
          "of interest too (a Frechet distance per selection, some 50 of them, seconds each on a CPU)")
    p.add("--out-dir", "out/analyze", FOLDER, "PNGs, analysis.json, the cached classifier")
    p.add("--device", "auto", str, "auto: CUDA when available", choices=("auto", "cuda", "cpu"))
    p.add("--seed", 0, Number(int, 0), "of the task models (their judges: --seed + 1), and of the shuffled baseline")
    p.add("--keep-freed-memory", True, bool, "on the CPU, keep freed memory in the process "
          "(distributed.keep_freed_memory)")
    return p


def parse_args(argv=None):
    args, _ = parser().parse(argv)
    return args


def segment_shares(args) -> list:
    """Every X Tab. 2's segments are scored at: --segment-thresholds and --best-x-grid."""
    return segments.share_grid(segments.fractions(args.segment_thresholds), segments.fractions(args.best_x_grid))


def analysed_images(args, image_size: int):
    """--dataset's --split at the model's image size, or one error line."""
    try:
        return build_dataset(args.dataset, args.split, image_size, args.data_dir, train=False,
                             eval_protocol=args.protocol, num_images=args.num_images)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: --dataset {args.dataset} / --data-dir: {error}")


@torch.no_grad()
def measure(model: ALIT, control: ALIT | None, dataset, n: int, args, nets: dict | None, inception, device) -> dict:
    """One pass over the first n images (observe.batches), each analysis keeping what it needs of every
    batch: {analysis: what it kept}. Photos get no shapes measure (binding, segments, the task models)."""
    layer = observe.map_layer(args.map_layer, model.config)
    seen = {"reconstructions": observe.Reconstructions(model, inception),
            "attention": attention.AttentionMaps(attention.spread_images(dataset, n, args.attention_images),
                                                 model.config, layer)}
    if isinstance(dataset, ShapesDataset):
        seen |= {"tasks": tasks.TaskOutcomes(nets, args.label), "binding": binding.Binding(model.config, args.seed),
                 "segments": segments.Segments(model.config, segment_shares(args), args.seed)}
    for batch in observe.batches(model, control, dataset, n, args.batch_size, device, layer):
        for collector in seen.values():
            collector.add(batch)
    return {name: collector.result() for name, collector in seen.items()}


def main(argv=None):
    args = parse_args(argv)
    device = distributed.setup(args.device, keep_freed=args.keep_freed_memory).device
    start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_alit(args.official, args.heads, args.ckpt, "--ckpt", args.use_ema,
                      "train it, or pass --official PATH").to(device).eval()
    mc = model.config
    counts = mc.token_counts
    try:
        observe.map_layer(args.map_layer, mc)
    except ValueError as error:
        sys.exit(f"error: {error}")
    dataset = analysed_images(args, mc.image_size)
    shapes = isinstance(dataset, ShapesDataset)
    probe_set, probe_note = probes.probe_images(args, mc.image_size)
    if not shapes:
        print(f"--dataset {args.dataset}: no object masks or levels: attention maps, the L1/PSNR/FID selection"
              f"{' and the linear probe of the classes' if probe_set else ''} only (binding, complexity and the "
              f"classifier need --dataset shapes){'; ' + probe_note if probe_note else ''}")
    n = min(args.num_images, len(dataset))
    nets = tasks.task_nets(args, mc.image_size, device) if shapes else None
    inception = InceptionV3.from_pytorch_fid(args.inception_weights).to(device) if args.inception_weights else None
    control = observe.untrained_control(model, args.seed) if probe_set else None  # §A.4's and Tab. 2's control

    seen = measure(model, control, dataset, n, args, nets, inception, device)
    per_image = seen["reconstructions"] | seen.get("tasks", {})
    results = {"checkpoint": args.official or args.ckpt, "dataset": args.dataset, "images": n, "tokens": counts,
               "config": dict(vars(args))}
    results |= attention.analyse(seen["attention"], dataset, mc, out)
    if shapes:
        results |= binding.analyse(seen["binding"], per_image["level"], counts, out)
        results |= complexity.analyse(per_image["l1"], per_image["level"], args.histogram_thresholds, counts, out)
    results |= tasks.analyse(per_image, args, counts, out)
    if probe_set:
        results |= probes.analyse(model, control, probe_set, args, device, out)
    if shapes or args.ood_dir:
        results |= familiarity.analyse(model, dataset, per_image, args, inception, device, out)
    if shapes:
        results |= segments.analyse(seen["segments"], segment_shares(args),
                                    segments.fractions(args.segment_thresholds), counts, mc,
                                    observe.map_layer(args.map_layer, mc), out)

    results["seconds"] = time.perf_counter() - start
    (out / "analysis.json").write_text(json.dumps(results, indent=2))
    print(analysis_report(results))
    print(f"wrote {out / 'analysis.json'} and the PNGs in {out} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
