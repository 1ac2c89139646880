"""Analyses: what the adaptive tokens attend to, bind and cost, as one command.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §2 and Fig. 3 (recurrence
sharpens the latent tokens' attention), §A.3 and Tab. 2 (object binding), §3 and
Fig. 4/5 (complexity against tokens), §A.2 and Fig. 6-9 (token selection against the
task of interest).

1. Attention maps (Fig. 3, 13): per iteration, the attention of latent tokens to the 2D
   image tokens, last encoder layer, averaged over heads.
2. Object binding, measured: the paper shows the maps and scores them against ImageNet-S
   segments; on `shapes` every object's mask is known, so each 2D token is assigned to
   the latent token it attends most and the partition is scored against the objects
   (ARI, foreground ARI, matched mIoU), per iteration and complexity level, against the
   same assignment shuffled over the image and a fixed-length pass.
3. Complexity curves (Fig. 4/5): L1 against tokens per level, and the token counts
   chosen per level at two L1 thresholds.
4. Task-aligned selection (Fig. 6-9): a small classifier and a small depth regressor trained
   here on original `shapes` images are the tasks of interest beside L1, PSNR (and FID);
   tokens are selected by L1 < threshold, classifier top-X correct, depth error < threshold
   or token accuracy.
5. Linear probing (§A.4): a linear classifier on the mean-pooled encoder output per iteration
   and per prefix of latent tokens, against the pooled VQGAN grid and an untrained ALIT; of a
   shapes label, or of the class on photos with classes (imagenet100, imagenet), as §A.4 does.
6. Familiarity (§A.2): `shapes` variants the model never saw (data.VARIANTS, and --ood-dir)
   against in-distribution images of the same complexity levels.
7. Tab. 2's protocol: each of the first K latent tokens' maps thresholded at its top X% of
   attention mass, scored against the true segments, against a shuffled map and an untrained ALIT.

    python analyze.py                           # out/stage2/ckpt.pt on `shapes` -> out/analyze/
    python analyze.py --official alit_small.pth --dataset imagenet100 --data-dir /data/imagenet
"""
import colorsys
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import numpy as np
import scipy.optimize
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import (BACKGROUND_DEPTH, DATASETS, LEVELS, VARIANTS, SceneItem, ShapesDataset, build_dataset, class_names,
                  majority_pool)
from fid import FeatureStats, InceptionV3, fid_from_stats
from model import ALIT
from plots import COLOURS, FRACTION_TICKS, Panel, Series, draw_panels
from probes import (bootstrap_se, class_balanced, encoder_outputs, mean_difference, pooled_blocks, prefix_features,
                    probe_correct, segment_iou, top_mass_segment)
from selection import (DEFAULT_CRITERION_CPU, DEFAULT_CRITERION_OFFICIAL, depth_error, first_passing, l1_passes,
                       psnr)
from training import (check_flags, choice_checks, keep_freed_memory, official_heads, paper_scale, parse_flags,
                      setup_distributed)

LABELS = {  # what the classifier of the task of interest predicts, all known to the shapes generator
    "level": "the complexity level (data.LEVELS: how many shapes, how large, how often textured)",
    "shapes": "the number of shapes drawn",
}


@dataclass
class AnalyzeConfig:
    ckpt: Annotated[str, "file"] = "out/stage2/ckpt.pt"  # a train_stage1.py / train_stage2.py checkpoint ...
    official: Annotated[str | None, "file"] = None  # ... or an official ALIT checkpoint (ALIT.from_official)
    heads: Annotated[str | None, "list of int >= 1"] = None  # official checkpoints of non-preset sizes: "8" or "8,8" (encoder, decoder)
    use_ema: bool = True  # analyze the EMA weights of our checkpoints
    # Binding, complexity and the classifier need shapes (masks, levels, labels); other datasets get the rest.
    dataset: Literal[DATASETS] = "shapes"
    data_dir: Annotated[str | None, "existing folder"] = None  # root of the image folder (imagenet: <root>/val/<wnid>/*)
    split: Literal["train", "val"] = "val"  # the images analysed
    num_images: Annotated[int, ">= 2"] = 500  # the first so many images of the split
    protocol: Literal["crop", "resize"] = "crop"  # photos: center crop (the paper's code) or resize, then crop
    batch_size: Annotated[int, ">= 1"] = 50  # images per forward pass (attention weights of every iteration are held per batch)
    attention_images: Annotated[int, ">= 0"] = 3  # images drawn in attention_<i>.png (Fig. 3), spread over the complexity levels
    # Thresholds of the L1 criterion (Fig. 7); auto: the 5th, 10th, ..., 95th percentiles of every
    # image's L1 at every token count, which spreads the selections from few tokens to all.
    l1_thresholds: Annotated[str, "auto or list of float > 0"] = "auto"
    # A third pixel criterion beside L1 < threshold (0: none): L1 < threshold, or within this fraction of
    # the image's L1 at the most tokens, where more tokens stop helping (evaluate.py's default below 256x256).
    saturation: Annotated[float, "in [0, 1]"] = DEFAULT_CRITERION_CPU["saturation"]
    token_thresholds: Annotated[str, "auto or list of float in [0, 1]"] = "auto"  # of the token-space criterion (token accuracy >= threshold); auto as above
    # The two L1 thresholds of histograms.png (Fig. 4/5); auto: the median image's L1 at the fewest and at the
    # most tokens (half the images pass at once; half never do).
    histogram_thresholds: Annotated[str, "auto or list of float > 0"] = "auto"
    top_x: Annotated[str, "list of int >= 1"] = "1,2,3"  # the classifier criterion: the true label among the X highest scores (Fig. 8's Top-X)
    # What the classifier predicts: the complexity level (5 classes) or how many shapes were drawn (12).
    label: Literal[tuple(LABELS)] = "level"
    classifier_images: Annotated[int, ">= 1"] = 4000  # training images of the classifier and the depth regressor (shapes train split), cached in --out-dir
    classifier_steps: Annotated[int, ">= 1"] = 800  # their optimizer steps, batch 64
    # Thresholds of the depth criterion: the depth regressor's mean error on the reconstruction against its
    # prediction on the original (the paper's pseudo-ground truth), in layers; auto as --l1-thresholds.
    depth_thresholds: Annotated[str, "auto or list of float > 0"] = "auto"
    # Train-split images the linear probes are fit on (§A.4; photos: spread evenly over the classes, read
    # as the analysed images are), scored on the analysed images.
    probe_images: Annotated[int, ">= 2"] = 2000
    familiarity_images: Annotated[int, ">= 2"] = 250  # images per unseen variant of shapes (§A.2), beside as many of the analysed ones
    ood_dir: Annotated[str | None, "existing folder"] = None  # your own out-of-distribution images, measured as the variants are
    top_mass: Annotated[str, "list of float in (0, 1]"] = "0.4,0.6,0.8"  # Tab. 2's thresholds: a segment is the top X of a map's attention mass
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth: FID as a task of interest too (a Frechet
    # distance per selection, some 50 of them, seconds each on a CPU)
    inception_weights: Annotated[str | None, "file"] = None
    out_dir: Annotated[str, "folder"] = "out/analyze"  # PNGs, analysis.json, the cached classifier
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when available
    seed: Annotated[int, ">= 0"] = 0  # of the classifier, and of the shuffled baseline
    keep_freed_memory: bool = True  # on the CPU, keep freed memory in the process (training.keep_freed_memory)


def parse_args(argv=None) -> AnalyzeConfig:
    cfg, _ = parse_flags(argv, __doc__, AnalyzeConfig)
    check_flags(choice_checks(cfg))
    return cfg


def load_model(cfg: AnalyzeConfig, device) -> ALIT:
    if cfg.official:
        if not Path(cfg.official).is_file():
            sys.exit(f"error: --official {cfg.official} not found")
        return ALIT.from_official(cfg.official, heads=official_heads(cfg.heads)).to(device).eval()
    if not Path(cfg.ckpt).is_file():
        sys.exit(f"error: --ckpt {cfg.ckpt} not found (train it, or pass --official PATH)")
    try:
        return ALIT.from_checkpoint(cfg.ckpt, ema=cfg.use_ema).to(device)
    except ValueError as error:
        sys.exit(f"error: --ckpt: {error}")


# -----------------------------------------------------------------------------
# 1-2. Attention and object binding (Fig. 3, §A.3)

def one_pass(model: ALIT, images):
    """The fixed-length baseline: the encoder run once over [2D image tokens; all T*K latent tokens],
    the sequence the rollout reaches at its last iteration but without the recurrence. The weights
    were never trained on it: it asks what the same tokens bind to when they are not added in turn."""
    T = model.config.rollout_iters
    tokens = [model.image_tokens(images, model.base_tokens(images))]
    tokens += [model.new_latent_tokens(t, len(images)) for t in range(T)]
    return model.encoder(model.encoder_ln_pre(torch.cat(tokens, dim=1)))


def token_accuracy(model: ALIT, logits, targets):
    """(B,) the fraction of 2D tokens predicted right: the VQGAN index, or over a VAE the vector within
    halting's tolerance (mean absolute error below halting_code_error, the cells that would halt)."""
    if model.config.base == "vae":
        return ((logits.float() - targets).abs().mean(-1) < model.config.halting_code_error).float().mean(1)
    return (logits.argmax(-1) == targets).float().mean(1)


def image_to_latent(weights, num_image_tokens: int):
    """(B, L, L) attention (rows: queries) -> (B, N, L1D): how much each 2D token attends to each
    latent token."""
    return weights[:, 1:1 + num_image_tokens, 1 + num_image_tokens:]


def latent_to_image(weights, num_image_tokens: int):
    """(B, L, L) -> (B, L1D, N): each latent token's attention over the 2D image tokens, rescaled
    to sum to 1 over them (the maps of Fig. 3)."""
    maps = weights[:, 1 + num_image_tokens:, 1:1 + num_image_tokens]
    return maps / maps.sum(-1, keepdim=True)


def adjusted_rand_index(truth: np.ndarray, pred: np.ndarray) -> float:
    """ARI of two labelings of the same items (Hubert & Arabie 1985): 1 for the same partition,
    0 in expectation for partitions drawn at random with these segment sizes. NaN for < 2 items."""
    if len(truth) < 2:
        return float("nan")
    table = contingency(truth, pred)
    pairs = lambda counts: (counts * (counts - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(truth) * (len(truth) - 1) / 2
    expected, maximum = rows * cols / total, (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one segment, or every item alone): equal or not
        return float(both == maximum)
    return float((both - expected) / (maximum - expected))


def matched_miou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over the true segments of the IoU with the predicted segment matched to each one to
    one (Hungarian); a true segment left without a match counts 0."""
    table = contingency(truth, pred)
    iou = table / (table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table)
    rows, cols = scipy.optimize.linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / len(table))


def contingency(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(true segments, predicted segments) counts of items in both."""
    _, t = np.unique(truth, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1))
    np.add.at(table, (t, p), 1)
    return table


def binding_scores(truth: np.ndarray, assignment: np.ndarray) -> dict:
    """A partition of the 2D tokens (assignment: a latent token per 2D token) against the scene's
    segments (truth: data.Scene labels per 2D token; 0 and 1 the background halves, 2+ shapes)."""
    shapes = truth >= 2
    return {"ari": adjusted_rand_index(truth, assignment),
            # the object-discovery usual; with one shape in sight there are no objects to tell apart
            "fg_ari": adjusted_rand_index(truth[shapes], assignment[shapes]) if len(np.unique(truth[shapes])) > 1
            else float("nan"),
            "miou": matched_miou(truth, assignment),
            "segments": len(np.unique(assignment)),  # how many latent tokens the partition uses
            "true_segments": len(np.unique(truth))}


def token_labels(masks, patch_size: int) -> np.ndarray:
    """(B, S, S) pixel labels -> (B, N): each 2D token's segment, the one covering most of its patch."""
    return np.stack([majority_pool(m.numpy(), patch_size).reshape(-1) for m in masks])


# -----------------------------------------------------------------------------
# 4. The tasks of interest: a classifier and a depth regressor of shapes scenes (Fig. 6-9 use
# ResNet-18 and DepthAnythingV2 on ImageNet)

class Classifier(nn.Module):
    """A small CNN that sees 32x32 images (larger ones are resized): three stride-2 convolutions,
    cheap enough to train in a minute on a CPU."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),  # (B, w, 16, 16)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2w, 8, 8)
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 4w, 4, 4)
            nn.Flatten(), nn.Linear(16 * 4 * width, classes))

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, classes) logits
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.net(images - 0.5)


def num_classes(label: str) -> int:
    return len(LEVELS) if label == "level" else LEVELS[-1].objects[1]


def class_of(label: str, level: int, num_shapes: int) -> int:
    return level if label == "level" else num_shapes - 1


def probe_label(item, label: str) -> int:
    """The linear probe's label of a dataset item: on shapes (a SceneItem) --label of the scene; on
    photos the image's class, which §A.4 probes."""
    return class_of(label, item.level, item.num_shapes) if isinstance(item, SceneItem) else item[1]


def items_of(dataset, indices) -> list:
    """The items at `indices`: shapes scenes with their masks, levels and depth; photos as (image, class)."""
    return [dataset.with_masks(i) if isinstance(dataset, ShapesDataset) else dataset[i] for i in indices]


class DepthNet(nn.Module):
    """A small CNN that sees 32x32 images (larger ones are resized) and gives each pixel's depth in
    layers from the front (data.Scene.depth), which it can only tell from occlusions: features on the
    8x8 grid with a receptive field of the whole image, each cell predicting its 4x4 pixels. As cheap
    to train as the classifier (Fig. 6/9 use DepthAnythingV2)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),  # (B, w, 16, 16)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2w, 8, 8)
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU(),  # receptive field 31 pixels
            nn.Conv2d(4 * width, 16, 1), nn.PixelShuffle(4))  # (B, 1, 32, 32)

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, H, W) layers from the front
        size = images.shape[-1]
        if size != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        depth = self.net(images - 0.5) + BACKGROUND_DEPTH  # most pixels are background
        if size != 32:
            depth = F.interpolate(depth, size=(size, size), mode="bilinear", align_corners=False)
        return depth[:, 0]


def task_net(cfg: AnalyzeConfig, task: str, image_size: int, device) -> nn.Module:
    """The classifier of `cfg.label` (task "classifier") or the depth regressor ("depth"), trained on
    original shapes images, or read from its cache in --out-dir when trained with the same settings."""
    settings = {"label": cfg.label if task == "classifier" else "depth", "image_size": image_size,
                "images": cfg.classifier_images, "steps": cfg.classifier_steps, "seed": cfg.seed}
    path = Path(cfg.out_dir) / f"{task}.pt"
    name = f"classifier of {cfg.label}" if task == "classifier" else "depth regressor"
    new_net = (lambda: Classifier(num_classes(cfg.label))) if task == "classifier" else DepthNet
    net = new_net()
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("settings") == settings:
            net.load_state_dict(cached["model"])
            print(f"{name} read from {path}")
            return net.to(device).eval()
    start = time.perf_counter()
    data = ShapesDataset("train", image_size, cfg.classifier_images, seed=cfg.seed)
    images, targets = [], []
    for i in range(len(data)):
        item = data.with_masks(i)
        images.append(item.image)
        targets.append(torch.tensor(class_of(cfg.label, item.level, item.num_shapes)) if task == "classifier"
                       else item.depth)
    images, targets = torch.stack(images).to(device), torch.stack(targets).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = new_net().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    # Convolutions this small gain nothing from a second CPU thread and lose much when the cores are
    # shared: 800 steps took 12 s on one thread, over 60 s on two, beside another training run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in tqdm(range(cfg.classifier_steps), desc=name, dynamic_ncols=True):
        batch = torch.randint(len(images), (64,), generator=generator).to(device)
        x, y = images[batch], targets[batch]
        flip = torch.rand(len(x), generator=generator).to(device) < 0.5  # a mirror image is the same scene
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if task == "classifier":
            loss = F.cross_entropy(net(x), y)
        else:
            loss = F.mse_loss(net(x), torch.where(flip[:, None, None], y.flip(-1), y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    torch.save({"settings": settings, "model": net.state_dict()}, path)
    print(f"{name}: trained in {time.perf_counter() - start:.0f} s, saved to {path}")
    return net.eval()


def true_label_rank(logits, labels):
    """(..., B, classes), (B,) -> (..., B): how many classes score above the true one (0: top-1 correct)."""
    true = logits.gather(-1, labels.expand(logits.shape[:-1])[..., None])
    return (logits > true).sum(-1)


def classifier_selection(ranks, x: int):
    """The classifier criterion (Fig. 8's Top-X): per image, the first iteration whose reconstruction
    the classifier ranks the true label among its x best; the last iteration if none does."""
    return first_passing(ranks < x)


# -----------------------------------------------------------------------------
# The pass over the images

@torch.no_grad()
def measure(model: ALIT, control: ALIT, dataset, cfg: AnalyzeConfig, nets: dict, inception, keep: list, device):
    """Per image and token count: L1, MSE, token accuracy, the classifier's rank of the true label,
    the depth regressor's errors, binding scores, Tab. 2's segment scores (also of the untrained
    `control`) and the pooled encoder output for the linear probes (and Inception features); the
    attention maps of the images in `keep`. Photos get no shapes measure, and probe features only
    with a `control` (main passes one when they have classes)."""
    mc = model.config
    N, K, T = mc.num_image_tokens, mc.tokens_per_iter, mc.rollout_iters
    shapes = isinstance(dataset, ShapesDataset)
    shares = [float(v) for v in cfg.top_mass.split(",")]
    attention = model.encoder[-1].attn  # the last layer, as in the paper's maps
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    out = {key: [] for key in ("l1", "mse", "token_acc", "vqgan_l1", "entropy_first", "entropy_all", "level", "rank",
                               "rank_original", "features", "label", "depth", "depth_criterion", "depth_original",
                               "depth_flat")}
    binding = {name: [] for name in ("recurrent", "shuffled", "one_pass", "recurrent_latent_to_image")}
    segments = {name: [] for name in ("recurrent", "shuffled", "untrained")}
    probe = {name: [] for name in ("image", "blocks", "control_image", "control_blocks", "vqgan")}
    kept, real_features = {}, []
    n = min(cfg.num_images, len(dataset))
    for start in tqdm(range(0, n, cfg.batch_size), desc="analyze", dynamic_ncols=True):
        index = list(range(start, min(n, start + cfg.batch_size)))
        items = items_of(dataset, index)
        images = torch.stack([item[0] for item in items]).to(device)
        tokens_2d = model.base_tokens(images)
        targets = model.base_targets(tokens_2d)
        attention.record = []
        try:
            with encoder_outputs(model) as passes:
                records = model(images, tokens_2d, reconstruct=True)
            weights = [w.float().mean(1) for w in attention.record]  # T x (B, 1+N+tK, 1+N+tK), heads averaged
            attention.record = []
            one_pass(model, images)
            fixed = attention.record[0].float().mean(1)
        finally:
            attention.record = None
        maps = [latent_to_image(w, N) for w in weights]  # T x (B, tK, N)
        # Fig. 3's "sharper & sparser attention": each map's entropy over the 2D tokens, 1 = uniform.
        entropy = [-(m * m.clamp(min=1e-12).log()).sum(-1) / math.log(N) for m in maps]  # T x (B, tK)
        out["entropy_first"].append(torch.stack([e[:, :K].mean(1) for e in entropy]).cpu())  # tokens 1..K, tracked
        out["entropy_all"].append(torch.stack([e.mean(1) for e in entropy]).cpu())
        recon = torch.stack([r.recon.float().clamp(0, 1) for r in records])  # (T, B, 3, H, W)
        out["l1"].append((recon - images).abs().mean(dim=(2, 3, 4)).cpu())
        out["mse"].append((recon - images).square().mean(dim=(2, 3, 4)).cpu())
        out["token_acc"].append(torch.stack([token_accuracy(model, r.logits, targets) for r in records]).cpu())
        out["vqgan_l1"].append((vqgan_reconstruction(model, images) - images).abs().mean(dim=(1, 2, 3)).cpu())
        if inception is not None:
            real_features.append(inception(images).cpu())
            out["features"].append(inception(recon.flatten(0, 1)).view(T, len(images), -1).cpu())
        for j, i in enumerate(index):
            if i in keep:
                kept[i] = (images[j].cpu(), [m[j].cpu() for m in maps],
                           [image_to_latent(w[j:j + 1], N)[0].argmax(-1).cpu() for w in weights],
                           items[j][2] if shapes else None)
        if control is not None:  # the linear probes' test features: shapes, and photos with classes
            control_maps, control_passes = control_rollout(control, images)
            for name, outputs in (("", passes), ("control_", control_passes)):
                image, blocks = pooled_blocks(outputs, N, K)
                probe[name + "image"].append(image)
                probe[name + "blocks"].append(blocks)
            probe["vqgan"].append(base_grid(model, images, tokens_2d).float().mean((2, 3)).cpu())  # the 2D tokenizer's grid, pooled
            out["label"].append(torch.tensor([probe_label(item, cfg.label) for item in items]))
        if not shapes:
            continue
        labels = out["label"][-1].to(device)
        out["level"].append(torch.tensor([item.level for item in items]))
        out["rank"].append(true_label_rank(nets["classifier"](recon.flatten(0, 1)).view(T, len(images), -1), labels).cpu())
        out["rank_original"].append(true_label_rank(nets["classifier"](images), labels).cpu())
        # Depth, the second task of interest against the true depth, and the criterion against the
        # regressor's own estimate on the original (Fig. 6/9's pseudo-ground truth).
        depth, net = torch.stack([item.depth for item in items]).to(device), nets["depth"]
        out["depth"].append(torch.stack([(net(r) - depth).abs().flatten(1).mean(1) for r in recon]).cpu())
        out["depth_criterion"].append(torch.stack([depth_error(net, images, r) for r in recon]).cpu())
        out["depth_original"].append((net(images) - depth).abs().flatten(1).mean(1).cpu())
        out["depth_flat"].append((depth - BACKGROUND_DEPTH).abs().flatten(1).mean(1).cpu())  # a regressor that sees nothing
        truth = token_labels([item.labels for item in items], mc.patch_size)  # (B, N)
        first = torch.stack([m[:, :K] for m in maps]).cpu()  # (T, B, K, N): the tokens every iteration has
        shuffled = first.gather(-1, torch.rand(first.shape, generator=generator).argsort(-1))
        for name, tokens in (("recurrent", first), ("shuffled", shuffled),
                             ("untrained", torch.stack([m[:, :K] for m in control_maps]).cpu())):
            segments[name].append(segment_scores(tokens, torch.from_numpy(truth), shares))
        assign = torch.stack([image_to_latent(w, N).argmax(-1) for w in weights]).cpu().numpy()  # (T, B, N)
        from_maps = torch.stack([m.argmax(1) for m in maps]).cpu().numpy()  # each 2D token's highest map
        fixed_assign = image_to_latent(fixed, N).argmax(-1).cpu().numpy()
        for j in range(len(images)):
            binding["recurrent"].append([binding_scores(truth[j], assign[t, j]) for t in range(T)])
            binding["shuffled"].append([binding_scores(truth[j], rng.permutation(assign[t, j])) for t in range(T)])
            binding["recurrent_latent_to_image"].append([binding_scores(truth[j], from_maps[t, j]) for t in range(T)])
            binding["one_pass"].append(binding_scores(truth[j], fixed_assign[j]))
    per_image = {k: torch.cat(v, dim=1 if k == "features" else -1) for k, v in out.items() if v}
    if real_features:
        per_image["real_features"] = torch.cat(real_features)
    per_image["segments"] = {k: torch.cat(v) for k, v in segments.items() if v}
    per_image["probe"] = {k: torch.cat(v, dim=-2) for k, v in probe.items() if v}  # images along the one before D
    return per_image, binding, kept


def untrained_control(model: ALIT, seed: int) -> ALIT:
    """An ALIT of the same size that never trained (§A.4's and Tab. 2's control), on the trained VQGAN:
    it asks what the architecture gives before training. The official initialisation, residuals not
    zeroed, so that its passes do mix the tokens (zeroed, every pass would be the identity)."""
    torch.manual_seed(seed)
    config = dataclasses.replace(model.config, zero_init_encoder_residuals=False)
    control = ALIT(config).to(next(model.parameters()).device).eval()
    control.base.load_state_dict(model.base.state_dict())
    return control


@torch.no_grad()
def control_rollout(control: ALIT, images) -> tuple:
    """The untrained control's encoder over `images`: the attention maps of its latent tokens per
    iteration (T x (B, tK, N)) and its encoder outputs (for the probes). Decodes the last iteration only."""
    attention, N = control.encoder[-1].attn, control.config.num_image_tokens
    attention.record = []
    try:
        with encoder_outputs(control) as passes:
            control(images, iters=[control.config.rollout_iters - 1])
        maps = [latent_to_image(w.float().mean(1), N) for w in attention.record]
    finally:
        attention.record = None
    return maps, passes


def segment_scores(maps: torch.Tensor, truth: torch.Tensor, shares: list) -> torch.Tensor:
    """Tab. 2's protocol: maps (T, B, K, N), the attention of K latent tokens over the 2D tokens at each
    iteration, truth (B, N) segment labels -> (B, T, len(shares)): per image the mean over the K tokens
    of the IoU of each token's top-X segment with the shape it overlaps best (Tab. 2 scores against
    ImageNet-S's object segments; the background halves are left out)."""
    return torch.stack([torch.stack([segment_iou(top_mass_segment(m, share), truth, first_object=2).mean(-1)
                                     for share in shares], -1) for m in maps], 1)


def mean_scores(rows: list) -> dict:
    """[{metric: score}] -> {metric: mean over the rows, NaN (undefined) scores left out}."""
    return {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else None
            for k in rows[0]}


def binding_summary(binding: dict, levels: torch.Tensor, T: int, K: int) -> dict:
    """Mean scores per iteration (tokens t*K), over all images and per complexity level."""
    groups = {"all": np.arange(len(levels))} | {str(int(c)): np.flatnonzero(levels.numpy() == int(c))
                                                 for c in levels.unique()}
    summary = {}
    for name, group in groups.items():
        summary[name] = {
            "recurrent": {(t + 1) * K: mean_scores([binding["recurrent"][i][t] for i in group]) for t in range(T)},
            "shuffled": {(t + 1) * K: mean_scores([binding["shuffled"][i][t] for i in group]) for t in range(T)},
            "recurrent_latent_to_image": {(t + 1) * K: mean_scores([binding["recurrent_latent_to_image"][i][t]
                                                                     for i in group]) for t in range(T)},
            "one_pass": {T * K: mean_scores([binding["one_pass"][i] for i in group])},
        }
    return summary


# -----------------------------------------------------------------------------
# 3-4. Complexity and token selection from the per-image tables

def thresholds(flag: str, values: torch.Tensor) -> list:
    if flag != "auto":
        return [float(v) for v in flag.split(",")]
    return sorted(set(np.quantile(values.numpy(), np.linspace(0.05, 0.95, 19)).round(4).tolist()))


def selection_row(name: str, chosen, per_image: dict, T: int, fid=None, **extra) -> dict:
    """What a selection (an iteration per image) costs, as the fraction of the maximum tokens
    (§A.2's dataset representation), and what it gives on every task of interest."""
    pick = (chosen, torch.arange(len(chosen)))
    return {"criterion": name, **extra, "dataset_representation": ((chosen + 1).float().mean() / T).item(),
            "l1": per_image["l1"][pick].mean().item(), "psnr": psnr(per_image["mse"][pick]).mean().item(),
            "accuracy": (per_image["rank"][pick] == 0).float().mean().item() if "rank" in per_image else None,
            "depth": per_image["depth"][pick].mean().item() if "depth" in per_image else None,
            "fid": fid(chosen) if fid else None}


TASKS = {"l1": ("L1", False), "psnr": ("PSNR", True), "accuracy": ("classifier accuracy", True),
         "depth": ("depth error (layers)", False), "fid": ("FID", False)}


def fraction_reaching(rows: list, task: str, best: float, higher_is_better: bool, share: float = 0.95):
    """The smallest dataset representation among `rows` whose `task` reaches `share` of `best` (the
    max-token performance: at least share x best, or for losses at most best / share)."""
    good = [r["dataset_representation"] for r in rows if r[task] is not None and
            (r[task] >= share * best if higher_is_better else r[task] <= best / share)]
    return min(good, default=None)


# -----------------------------------------------------------------------------
# 5. Linear probing (§A.4)

class ProbeImages(NamedTuple):
    """The linear probes' training images: `indices` of the train split `data`, labelled with one of
    `classes` classes, which `label` names."""
    data: object
    indices: list
    classes: int
    label: str


def probe_images(cfg: AnalyzeConfig, image_size: int) -> tuple:
    """Where §A.4's probes train: (ProbeImages, None), or (None, why there is no probe). On shapes
    --probe-images train-split scenes, labelled by --label. On photos with classes, as §A.4 on
    ImageNet-100: the class of --probe-images train-split images spread evenly over the classes, read
    as the analysed images are (the evaluation transform, no augmentation: one fixed view of each
    image, like the test images)."""
    if cfg.dataset == "shapes":
        data = ShapesDataset("train", image_size, cfg.probe_images, seed=cfg.seed)
        return ProbeImages(data, list(range(len(data))), num_classes(cfg.label), LABELS[cfg.label]), None
    if cfg.dataset == "folder":
        return None, "no classes either, so no linear probe"
    try:
        classes = class_names(cfg.dataset, "train", cfg.data_dir)
        data = build_dataset(cfg.dataset, "train", image_size, cfg.data_dir, train=False, eval_protocol=cfg.protocol)
    except (ValueError, FileNotFoundError) as error:
        return None, f"no linear probe, it trains on the train split ({error})"
    if classes != class_names(cfg.dataset, cfg.split, cfg.data_dir):  # targets are folder indices
        return None, f"no linear probe: the class folders of train/ and {cfg.split}/ differ"
    return ProbeImages(data, class_balanced(data.targets, cfg.probe_images), len(classes),
                       "the image's class"), None


@torch.no_grad()
def probe_training_set(model: ALIT, control: ALIT, probe_set: ProbeImages, cfg: AnalyzeConfig, device) -> tuple:
    """The pooled encoder outputs of the trained model and the untrained control, and the pooled VQGAN
    grid, of the probe's training images (probes.pooled_blocks), with their labels."""
    N, K, T = model.config.num_image_tokens, model.config.tokens_per_iter, model.config.rollout_iters
    features, labels = {name: [] for name in ("image", "blocks", "control_image", "control_blocks", "vqgan")}, []
    for start in tqdm(range(0, len(probe_set.indices), cfg.batch_size), desc="probe features", dynamic_ncols=True):
        items = items_of(probe_set.data, probe_set.indices[start:start + cfg.batch_size])
        images = torch.stack([item[0] for item in items]).to(device)
        for name, net in (("", model), ("control_", control)):
            with encoder_outputs(net) as passes:
                net(images, iters=[T - 1])
            image, blocks = pooled_blocks(passes, N, K)
            features[name + "image"].append(image)
            features[name + "blocks"].append(blocks)
        features["vqgan"].append(base_grid(model, images).float().mean((2, 3)).cpu())
        labels += [probe_label(item, cfg.label) for item in items]
    return {k: torch.cat(v, dim=-2) for k, v in features.items()}, torch.tensor(labels)


def linear_probes(train: dict, train_labels, test: dict, test_labels, classes: int, K: int) -> dict:
    """Probe accuracy on the test images per iteration t and pooled prefix of j*K latent tokens, with
    and without the pooled image tokens, for the trained encoder and the untrained control; the pooled
    VQGAN grid beside them. Keeps each probe's per-image correctness (key "correct") for the claims."""
    T = train["blocks"].shape[0]
    tables, correct = {}, {}
    for source, prefix in (("trained", ""), ("untrained", "control_")):
        for pooled, with_image in (("latents", False), ("latents and image tokens", True)):
            table = {}
            for t in range(T):
                for j in range(1, t + 2):
                    hit = probe_correct(prefix_features(train[prefix + "image"], train[prefix + "blocks"], t, j, with_image),
                                        train_labels,
                                        prefix_features(test[prefix + "image"], test[prefix + "blocks"], t, j, with_image),
                                        test_labels, classes)
                    correct[source, pooled, t, j] = hit
                    table.setdefault(t + 1, {})[j * K] = hit.float().mean().item()
            tables.setdefault(source, {})[pooled] = table
    correct["vqgan"] = probe_correct(train["vqgan"], train_labels, test["vqgan"], test_labels, classes)
    tables["vqgan grid"] = correct["vqgan"].float().mean().item()
    tables["chance"] = max(torch.bincount(test_labels, minlength=classes).tolist()) / len(test_labels)
    tables["correct"] = correct
    return tables


def probe_claims(probes: dict, T: int, K: int) -> dict:
    """§A.4's two claims, for each pooling (§A.4 pools the latent and the image tokens; the latents
    alone are what the decoder gets), as differences in probe accuracy with their standard errors
    over the test images: (a) "recurrence": the first K tokens after 2-3 iterations (the better of the
    two) probe better than after one; (b) "prefix": at the last iteration, pooling the first T/4-T/2
    blocks (the paper's 64-128 of 256 tokens; the best of them) probes better than pooling all T."""
    correct, claims = probes["correct"], {}
    accuracy = lambda pooled, t, j: correct["trained", pooled, t, j].float()  # noqa: E731
    for pooled in ("latents and image tokens", "latents"):
        later = max(range(1, min(3, T)), key=lambda t: accuracy(pooled, t, 1).mean().item(), default=0)
        recurrence = mean_difference(accuracy(pooled, later, 1), accuracy(pooled, 0, 1))
        best = max(range(max(1, T // 4), max(1, T // 2) + 1), key=lambda j: accuracy(pooled, T - 1, j).mean().item())
        prefix = mean_difference(accuracy(pooled, T - 1, best), accuracy(pooled, T - 1, T))
        claims[pooled] = {"recurrence": {"iteration": later + 1, "tokens": K, **recurrence,
                                         "holds": recurrence["difference"] > 2 * recurrence["se"]},
                          "prefix": {"tokens": best * K, "of": T * K, **prefix,
                                     "holds": prefix["difference"] > 2 * prefix["se"]}}
    return claims


# -----------------------------------------------------------------------------
# 6. Familiarity (§A.2)

@torch.no_grad()
def reconstruction_l1(model: ALIT, dataset, n: int, cfg: AnalyzeConfig, inception, device) -> dict:
    """L1 (T, n) of the first n images at every token count, their levels (shapes), and Inception
    features of originals and reconstructions when FID is on."""
    T = model.config.rollout_iters
    l1, vqgan, levels, real, fake = [], [], [], [], []
    for start in range(0, n, cfg.batch_size):
        items = [dataset[i] for i in range(start, min(n, start + cfg.batch_size))]
        images = torch.stack([item[0] for item in items]).to(device)
        recon = torch.stack([r.recon.float().clamp(0, 1) for r in model(images, reconstruct=True)])
        l1.append((recon - images).abs().mean(dim=(2, 3, 4)).cpu())
        vqgan.append((vqgan_reconstruction(model, images) - images).abs().mean(dim=(1, 2, 3)).cpu())
        levels.append(torch.tensor([item[1] for item in items]))
        if inception is not None:
            real.append(inception(images).cpu())
            fake.append(inception(recon.flatten(0, 1)).view(T, len(images), -1).cpu())
    return {"l1": torch.cat(l1, dim=1), "vqgan_l1": torch.cat(vqgan), "level": torch.cat(levels),
            **({"real": torch.cat(real), "features": torch.cat(fake, dim=1)} if real else {})}


def base_grid(model: ALIT, images, tokens_2d=None):
    """The 2D tokenizer's own grid (B, C, g, g): the VQGAN's codes, or the VAE's tokens (scaled, as ALIT
    sees them); tokens_2d: model.base_tokens(images) if already computed."""
    tokens_2d = model.base_tokens(images) if tokens_2d is None else tokens_2d
    return tokens_2d if model.config.base == "vae" else model.vqgan.quantize_latents(tokens_2d).codes


def vqgan_reconstruction(model: ALIT, images):
    """The 2D tokenizer alone: the VQGAN's decoding of its own 64 codes (or the VAE's of its tokens),
    the floor the adaptive tokens reconstruct from (an unseen colour has no code)."""
    if model.config.base == "vae":
        return model.vae.decode_tokens(base_grid(model, images)).float().clamp(0, 1)
    return model.vqgan.decode(base_grid(model, images)).float().clamp(0, 1)


def familiarity_summary(table: dict, reference: dict | None, counts: list, criterion: dict, shapes: bool) -> dict:
    """One image set against the in-distribution `reference` (None: it is the reference): L1 at every
    count, the gap between the shortest and the longest code, the tokens the default criterion picks
    (per level on shapes), FID when features exist."""
    l1, levels = table["l1"], table["level"]
    gap = l1[0] - l1[-1]
    tokens = torch.tensor(counts)[first_passing(l1_passes(l1, criterion["default_threshold"], criterion["saturation"]))]
    row = {"images": l1.shape[1], "l1": dict(zip(counts, l1.mean(1).tolist())), "vqgan_l1": table["vqgan_l1"].mean().item(),
           "gap": gap.mean().item(), "gap_se": (gap.std() / math.sqrt(len(gap))).item(),
           "tokens": tokens.float().mean().item(), "tokens_se": (tokens.float().std() / math.sqrt(len(tokens))).item()}
    if shapes:
        row["per_level"] = {int(c): {"gap": gap[levels == c].mean().item(),
                                     "tokens": tokens[levels == c].float().mean().item()} for c in levels.unique()}
    if "features" in table:
        real = FeatureStats()
        real.update(table["real"])
        fids = []
        for t in range(len(counts)):
            fake = FeatureStats()
            fake.update(table["features"][t])
            fids.append(fid_from_stats(real, fake))
        row["fid"] = dict(zip(counts, fids))
        row["fid_gap"] = fids[0] - fids[-1]
    if reference is not None:
        ref_gap = reference["l1"][0] - reference["l1"][-1]
        ref_tokens = torch.tensor(counts)[first_passing(l1_passes(reference["l1"], criterion["default_threshold"],
                                                                  criterion["saturation"]))]
        row["gap_vs_in_distribution"] = mean_difference(gap, ref_gap, paired=False)
        row["tokens_vs_in_distribution"] = mean_difference(tokens.float(), ref_tokens.float(), paired=False)
        row["holds"] = (row["gap_vs_in_distribution"]["difference"] > 2 * row["gap_vs_in_distribution"]["se"]
                        and row["tokens_vs_in_distribution"]["difference"] > 2 * row["tokens_vs_in_distribution"]["se"])
    return row


def familiarity(model: ALIT, dataset, per_image: dict, cfg: AnalyzeConfig, inception, device) -> dict:
    """§A.2: the unseen variants of shapes (and --ood-dir) against the first as many analysed images,
    which on shapes have the same complexity levels image for image (data.ShapesDataset)."""
    mc = model.config
    counts = mc.token_counts
    m = min(cfg.familiarity_images, per_image["l1"].shape[1])
    shapes = isinstance(dataset, ShapesDataset)
    reference = {"l1": per_image["l1"][:, :m], "vqgan_l1": per_image["vqgan_l1"][:m],
                 "level": per_image["level"][:m] if shapes else torch.zeros(m)}
    if "real_features" in per_image:
        reference |= {"real": per_image["real_features"][:m], "features": per_image["features"][:, :m]}
    sets = {}
    if shapes:
        sets = {variant: ShapesDataset(cfg.split, mc.image_size, m, seed=0, variant=variant)
                for variant in VARIANTS if variant != "seen"}
    if cfg.ood_dir:
        try:
            sets["--ood-dir"] = build_dataset("folder", "val", mc.image_size, cfg.ood_dir, train=False,
                                              eval_protocol=cfg.protocol, num_images=m)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"error: --ood-dir: {error}")
    criterion = DEFAULT_CRITERION_OFFICIAL if paper_scale(mc.image_size) else DEFAULT_CRITERION_CPU
    summary = {"criterion": f"l1<{criterion['default_threshold']:g}"
                            + (f" or saturated ({criterion['saturation']:g})" if criterion["saturation"] else ""),
               "in distribution": familiarity_summary(reference, None, counts, criterion, shapes)}
    for name, data in tqdm(sets.items(), desc="familiarity", dynamic_ncols=True):
        table = reconstruction_l1(model, data, min(m, len(data)), cfg, inception, device)
        summary[name] = familiarity_summary(table, reference, counts, criterion, shapes and name in VARIANTS)
    return summary


# -----------------------------------------------------------------------------
# 4 (continued). Depth as criterion and task: TSC = TOI, and which task needs more tokens

def curve(passes: torch.Tensor, task: torch.Tensor, index) -> tuple:
    """A selection by the pass table `passes` (T, n) on the images `index`: (dataset representation,
    mean of the task table (T, n) over the selected counts)."""
    chosen = first_passing(passes[:, index])
    return ((chosen + 1).float().mean() / len(passes)).item(), task[chosen, index].mean().item()


def matched_advantage(own: list, other: list, higher_is_better: bool):
    """How much better the task does under its own criterion's selections (`own`: [(fraction, task)])
    than under another's (`other`) at the same fractions of the tokens, interpolated along the other's
    curve, averaged over own's selections within its range; None without overlap."""
    other = sorted(other)
    xs, ys = [x for x, _ in other], [y for _, y in other]
    gains = [(y - np.interp(x, xs, ys)) * (1 if higher_is_better else -1) for x, y in own if xs[0] <= x <= xs[-1]]
    return float(np.mean(gains)) if gains else None


def task_alignment(per_image: dict, tables: dict, seed: int) -> dict:
    """Fig. 6 and 9: for each task of interest with a criterion of its own (top-1 accuracy: the
    classifier's top-1 correct, as Fig. 6 left; depth error: depth error < threshold), its advantage
    under its own criterion over every other criterion at matched dataset representation, with
    bootstrap standard errors over the images."""
    tasks = {"accuracy": ("classifier top-X correct", [per_image["rank"] == 0], (per_image["rank"] == 0).float(), True),
             "depth": ("depth error < threshold", tables["depth error < threshold"], per_image["depth"], False)}
    n = per_image["l1"].shape[1]
    result = {}
    for task, (own, own_tables, values, higher) in tasks.items():
        for other in tables:
            if other == own:
                continue

            def statistic(index):
                return matched_advantage([curve(p, values, index) for p in own_tables],
                                         [curve(p, values, index) for p in tables[other]], higher)
            value = statistic(torch.arange(n))
            se = bootstrap_se(statistic, n, seed=seed) if value is not None else None
            result.setdefault(task, {})[other] = {"advantage": value, "se": se,
                                                 "holds": value is not None and value > 2 * se}
    return result


def tokens_per_task(per_image: dict, counts: list) -> dict:
    """Per image, the fewest tokens whose reconstruction does as well on each task as the original
    (classifier: top-1 correct; depth: an error within 1/0.95 of the original's, the rule of
    fraction_reaching), on the images the classifier gets right; paired difference depth - classifier."""
    right = per_image["rank_original"] == 0
    counts = torch.tensor(counts)
    classify = counts[first_passing(per_image["rank"][:, right] == 0)].float()
    depth = counts[first_passing(per_image["depth"][:, right] <= per_image["depth_original"][right] / 0.95)].float()
    difference = mean_difference(depth, classify)
    return {"images": int(right.sum()), "classification": classify.mean().item(), "depth": depth.mean().item(),
            **difference, "holds": difference["difference"] > 2 * difference["se"]}


# -----------------------------------------------------------------------------
# 7. Tab. 2's protocol

def segment_summary(segments: dict, shares: list, counts: list) -> dict:
    """Mean segment mIoU per top-X share and iteration, and with X chosen per image (its best), for the
    trained maps, the shuffled maps and the untrained control; the rise from the first to the last
    iteration and the margin over each control at the last, with standard errors over the images."""
    summary = {}
    for name, scores in segments.items():  # (n, T, shares)
        table = {f"{share:.0%}": dict(zip(counts, scores[:, :, s].mean(0).tolist())) for s, share in enumerate(shares)}
        table["best per image"] = dict(zip(counts, scores.max(-1).values.mean(0).tolist()))
        summary[name] = table
    trained = segments["recurrent"]
    first = shares.index(min(shares))
    rise = mean_difference(trained[:, -1, first], trained[:, 0, first])
    summary["claims"] = {"rise": {"share": f"{shares[first]:.0%}", **rise, "holds": rise["difference"] > 2 * rise["se"]}}
    for control in ("shuffled", "untrained"):
        margin = mean_difference(trained[:, -1].max(-1).values, segments[control][:, -1].max(-1).values)
        summary["claims"][f"over {control}"] = {**margin, "holds": margin["difference"] > 2 * margin["se"]}
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    device = setup_distributed(cfg.device).device
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg, device)
    mc = model.config
    N, K, T = mc.num_image_tokens, mc.tokens_per_iter, mc.rollout_iters
    counts = [(t + 1) * K for t in range(T)]
    try:
        dataset = build_dataset(cfg.dataset, cfg.split, mc.image_size, cfg.data_dir, train=False,
                                eval_protocol=cfg.protocol, num_images=cfg.num_images)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: --dataset {cfg.dataset} / --data-dir: {error}")
    shapes = isinstance(dataset, ShapesDataset)
    probe_set, probe_note = probe_images(cfg, mc.image_size)
    if not shapes:
        print(f"--dataset {cfg.dataset}: no object masks or levels: attention maps, the L1/PSNR/FID selection"
              f"{' and the linear probe of the classes' if probe_set else ''} only (binding, complexity and the "
              f"classifier need --dataset shapes){'; ' + probe_note if probe_note else ''}")
    n = min(cfg.num_images, len(dataset))
    keep = spread_images(dataset, n, cfg.attention_images)
    nets = {task: task_net(cfg, task, mc.image_size, device) for task in ("classifier", "depth")} if shapes else None
    inception = InceptionV3.from_pytorch_fid(cfg.inception_weights).to(device) if cfg.inception_weights else None
    control = untrained_control(model, cfg.seed) if probe_set else None  # §A.4's and Tab. 2's control

    per_image, binding, kept = measure(model, control, dataset, cfg, nets, inception, keep, device)
    results = {"checkpoint": cfg.official or cfg.ckpt, "dataset": cfg.dataset, "images": n, "tokens": counts,
               "config": asdict(cfg)}

    # 1. Attention maps (Fig. 3).
    for i, (image, maps, assign, masks) in kept.items():
        level = dataset.complexity_of(i) if shapes else None
        draw_attention(out / f"attention_{i}.png", image, maps, assign, masks, mc, level)
    results["attention_maps"] = [str(out / f"attention_{i}.png") for i in kept]
    results["attention_entropy"] = {f"tokens 1-{K}": dict(zip(counts, per_image["entropy_first"].mean(1).tolist())),
                                    "all latent tokens": dict(zip(counts, per_image["entropy_all"].mean(1).tolist()))}

    # 2. Object binding.
    if shapes:
        results["binding"] = binding_summary(binding, per_image["level"], T, K)
        plot_binding(out / "binding.png", results["binding"], counts)

    # 3. Complexity (Fig. 4/5).
    l1 = per_image["l1"]
    if shapes:
        levels = per_image["level"]
        hist_thresholds = ([float(v) for v in cfg.histogram_thresholds.split(",")] if cfg.histogram_thresholds != "auto"
                           else [round(l1[t].median().item(), 4) for t in (0, T - 1)])
        results["complexity"] = {
            "l1_per_level": {int(c): {k: l1[t][levels == c].mean().item() for t, k in enumerate(counts)}
                             for c in levels.unique()},
            "chosen_tokens_per_level": {f"l1<{thr:g}": {int(c): {k: int((first_passing(l1 < thr)[levels == c] == t).sum())
                                                                    for t, k in enumerate(counts)}
                                                         for c in levels.unique()} for thr in hist_thresholds}}
        plot_complexity(out / "complexity.png", out / "histograms.png", results["complexity"], counts)

    # 4. Task-aligned selection (Fig. 7/8).
    fid = None
    if inception is not None:
        real = FeatureStats()
        real.update(per_image["real_features"])

        def fid(chosen):
            stats = FeatureStats()
            stats.update(per_image["features"][chosen, torch.arange(len(chosen))])
            return fid_from_stats(real, stats)
    rows = {"every image at one count": [selection_row(f"{k} tokens", torch.full((n,), t), per_image, T, fid, tokens=k)
                                         for t, k in enumerate(counts)],
            "L1 < threshold": [selection_row(f"l1<{thr:g}", first_passing(l1 < thr), per_image, T, fid, threshold=thr)
                               for thr in thresholds(cfg.l1_thresholds, l1)],
            "token accuracy >= threshold": [
                selection_row(f"token_acc>={thr:g}", first_passing(per_image["token_acc"] >= thr), per_image, T, fid,
                              threshold=thr) for thr in thresholds(cfg.token_thresholds, per_image["token_acc"])]}
    if cfg.saturation > 0:
        rows[f"L1 < threshold or saturated ({cfg.saturation:g})"] = [
            selection_row(f"l1<{thr:g} or saturated", first_passing(l1_passes(l1, thr, cfg.saturation)), per_image, T,
                          fid, threshold=thr) for thr in thresholds(cfg.l1_thresholds, l1)]
    if shapes:
        top_x = [int(float(v)) for v in cfg.top_x.split(",")]
        depth_thresholds = thresholds(cfg.depth_thresholds, per_image["depth_criterion"])
        rows["classifier top-X correct"] = [
            selection_row(f"top-{x:g} correct", classifier_selection(per_image["rank"], x), per_image, T, fid, top_x=x)
            for x in top_x]
        rows["depth error < threshold"] = [
            selection_row(f"depth<{thr:g}", first_passing(per_image["depth_criterion"] < thr), per_image, T, fid,
                          threshold=thr) for thr in depth_thresholds]
        results["classifier"] = {"label": cfg.label, "classes": num_classes(cfg.label), "what": LABELS[cfg.label],
                                 "accuracy_on_originals": (per_image["rank_original"] == 0).float().mean().item()}
        results["depth_regressor"] = {"error_on_originals": per_image["depth_original"].mean().item(),
                                      "error_of_background_depth_everywhere": per_image["depth_flat"].mean().item()}
        # Fig. 6/9: does each task do best per token under its own criterion, and which needs more tokens?
        tables = {"L1 < threshold": [l1 < thr for thr in thresholds(cfg.l1_thresholds, l1)],
                  "token accuracy >= threshold": [per_image["token_acc"] >= thr
                                                  for thr in thresholds(cfg.token_thresholds, per_image["token_acc"])],
                  "classifier top-X correct": [per_image["rank"] < x for x in top_x],
                  "depth error < threshold": [per_image["depth_criterion"] < thr for thr in depth_thresholds]}
        results["task_alignment"] = task_alignment(per_image, tables, cfg.seed)
        results["tokens_per_task"] = tokens_per_task(per_image, counts)
    best = rows["every image at one count"][-1]
    tasks = [task for task in TASKS if best[task] is not None]
    results["selection"] = rows
    results["fraction_for_95_percent"] = {
        criterion: {task: fraction_reaching(r, task, best[task], TASKS[task][1]) for task in tasks}
        for criterion, r in rows.items()}
    plot_selection(out / "selection.png", rows, tasks)

    # 5. Linear probing (§A.4), on a label the tokenizer never trained on (it trains on reconstruction).
    if probe_set:
        train, train_labels = probe_training_set(model, control, probe_set, cfg, device)
        probes = linear_probes(train, train_labels, per_image["probe"], per_image["label"], probe_set.classes, K)
        probes["claims"] = probe_claims(probes, T, K)
        probes.pop("correct")
        results["linear_probe"] = {"label": probe_set.label, "classes": probe_set.classes,
                                   "train_images": len(probe_set.indices), "test_images": n,
                                   "test_classes": len(per_image["label"].unique()), **probes}
        plot_probe(out / "probe.png", results["linear_probe"], counts)

    # 6. Familiarity (§A.2).
    if shapes or cfg.ood_dir:
        results["familiarity"] = familiarity(model, dataset, per_image, cfg, inception, device)
        plot_familiarity(out / "familiarity.png", results["familiarity"], counts)

    # 7. Tab. 2's protocol.
    if shapes:
        shares = [float(v) for v in cfg.top_mass.split(",")]
        results["segments"] = segment_summary(per_image["segments"], shares, counts)
        plot_segments(out / "segments.png", results["segments"], counts)

    results["seconds"] = time.perf_counter() - start
    (out / "analysis.json").write_text(json.dumps(results, indent=2))
    print(report(results, tasks))
    print(f"wrote {out / 'analysis.json'} and the PNGs in {out} in {results['seconds']:.0f} s")
    return results


def spread_images(dataset, n: int, count: int) -> list:
    """`count` image indices among the first n: on shapes the first image of evenly spaced levels."""
    if not isinstance(dataset, ShapesDataset):
        return list(range(min(count, n)))
    wanted = np.linspace(0, len(LEVELS) - 1, count).round().astype(int).tolist() if count else []
    chosen = []
    for level in wanted:
        found = next((i for i in range(n) if dataset.complexity_of(i) == level and i not in chosen), None)
        if found is not None:
            chosen.append(found)
    return chosen


# -----------------------------------------------------------------------------
# Figures and the report

INFERNO = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB along an inferno-like ramp (dark: low attention, light: high)."""
    position = np.clip(values, 0, 1) * (len(INFERNO) - 1)
    low = np.floor(position).astype(int).clip(max=len(INFERNO) - 2)
    frac = (position - low)[..., None]
    return INFERNO[low] * (1 - frac) + INFERNO[low + 1] * frac


def distinct_colours(count: int) -> np.ndarray:
    """`count` colours around the hue circle in golden-ratio steps, so neighbours in index differ."""
    return np.array([colorsys.hsv_to_rgb((j * 0.618034) % 1, 0.75, 0.95) for j in range(count)]) * 255


def draw_attention(path, image, maps, assign, masks, mc, level, cell: int = 64):
    """Fig. 3/13 for one image: a row per iteration; the image, its segments (shapes), each 2D token
    coloured by the latent token it attends most, then the attention maps over the image of the
    first K latent tokens as the rollout updates them, and of the K tokens added at that iteration."""
    K, T, g = mc.tokens_per_iter, mc.rollout_iters, mc.grid_size
    font = ImageFont.load_default(size=13)
    photo = np.asarray(Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                       .resize((cell, cell), Image.BICUBIC), dtype=np.float32)

    def grid_image(rgb):  # (g, g, 3) -> a cell, token cells kept square and sharp
        return Image.fromarray(rgb.astype(np.uint8)).resize((cell, cell), Image.NEAREST)

    def overlay(values):  # a map over the 2D tokens, scaled to its maximum, laid over the image
        tile = np.asarray(grid_image(heat(values.reshape(g, g).numpy() / values.max().item())), dtype=np.float32)
        return Image.fromarray((0.3 * photo + 0.7 * tile).round().astype(np.uint8))

    lead = ["image", "segments", "binding"] if masks is not None else ["image", "binding"]
    gap, left, top = 12, 96, 76
    width = left + len(lead) * (cell + 4) + 2 * (gap + K * (cell + 4))
    canvas = Image.new("RGB", (width, top + T * (cell + 4) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    title = (f"level {level}: " if level is not None else "") + "attention of latent tokens to the 2D image tokens " \
        "(last encoder layer, mean over heads; each map scaled to its maximum)"
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 26), "binding: each 2D token in the colour of the latent token it attends most (one colour per "
              "latent token)", fill="black", font=font)
    x_first = left + len(lead) * (cell + 4) + gap
    x_new = x_first + K * (cell + 4) + gap
    for c, name in enumerate(lead):
        draw.text((left + c * (cell + 4) + cell / 2, top - 8), name, fill="black", font=font, anchor="mb")
    for x, text in [(x_first, f"tokens 1-{K} (added at iteration 1), as the rollout updates them"),
                    (x_new, f"the {K} tokens added at this iteration")]:
        draw.text((x, top - 8), text, fill="black", font=font, anchor="lb")
    segments = None
    if masks is not None:
        labels = majority_pool(masks.numpy(), mc.patch_size)
        segments = grid_image(distinct_colours(int(labels.max()) + 1)[labels])
    colours = distinct_colours(T * K)
    for t in range(T):
        y = top + t * (cell + 4)
        draw.text((8, y + cell / 2), f"iteration {t + 1}\n{(t + 1) * K} tokens", fill="black", font=font, anchor="lm")
        tiles = [Image.fromarray(photo.round().astype(np.uint8))] + ([segments] if segments is not None else [])
        tiles.append(grid_image(colours[assign[t].view(g, g).numpy()]))
        for c, tile in enumerate(tiles):
            canvas.paste(tile, (left + c * (cell + 4), y))
        for k in range(K):
            canvas.paste(overlay(maps[t][k]), (x_first + k * (cell + 4), y))
            canvas.paste(overlay(maps[t][t * K + k]), (x_new + k * (cell + 4), y))
    canvas.save(path)


def plot_binding(path, summary: dict, counts: list):
    """Binding score against tokens, one curve per complexity level, beside the shuffled baseline
    and the fixed-length pass (§A.3, Tab. 2: does recurrence sharpen binding?)."""
    panels = []
    for metric, name in (("ari", "ARI"), ("fg_ari", "foreground ARI"), ("miou", "matched mIoU")):
        series = [Series(f"level {level}" if level != "all" else "all levels",
                         [(k, s[metric]) for k, s in groups["recurrent"].items()], COLOURS[i])
                  for i, (level, groups) in enumerate(summary.items()) if level != "all"]
        everything = summary["all"]
        series += [Series("all levels", [(k, s[metric]) for k, s in everything["recurrent"].items()], (0, 0, 0)),
                   Series("all, shuffled over the image", [(k, s[metric]) for k, s in everything["shuffled"].items()],
                          (0, 0, 0), dashed=True),
                   Series(f"all, one pass of {counts[-1]} tokens",
                          [(k, s[metric]) for k, s in everything["one_pass"].items()], COLOURS[7])]
        panels.append(Panel(f"{name}: 2D tokens by most-attended latent", "latent tokens", name, series,
                            xticks=[(k, str(k)) for k in counts]))
    draw_panels(path, panels)


def plot_complexity(curves_path, histograms_path, complexity: dict, counts: list):
    """Fig. 4/5: L1 against tokens per complexity level; the token counts each level gets."""
    series = [Series(f"level {level}", list(row.items()), COLOURS[i])
              for i, (level, row) in enumerate(complexity["l1_per_level"].items())]
    draw_panels(curves_path, [Panel("L1 against tokens, per complexity level (Fig. 4/5)", "tokens", "L1", series,
                                    xticks=[(k, str(k)) for k in counts])])
    panels = []
    for criterion, per_level in complexity["chosen_tokens_per_level"].items():
        series = [Series(f"level {level}", [(t, hist[k] / max(1, sum(hist.values()))) for t, k in enumerate(counts)],
                         COLOURS[i]) for i, (level, hist) in enumerate(per_level.items())]
        panels.append(Panel(f"tokens chosen by {criterion} (the most when none passes)", "tokens", "fraction of the level's images", series,
                            xticks=[(t, str(k)) for t, k in enumerate(counts)], bars=True))
    draw_panels(histograms_path, panels)


def plot_selection(path, rows: dict, tasks: list):
    """Fig. 7/8: each task of interest against the dataset representation its selection costs, one
    curve per token-selection criterion."""
    panels = []
    for task in tasks:
        name = TASKS[task][0]
        series = [Series(criterion, [(r["dataset_representation"], r[task]) for r in criterion_rows], COLOURS[i],
                         labels=[f"top-{r['top_x']}" for r in criterion_rows] if "top_x" in criterion_rows[0] else None)
                  for i, (criterion, criterion_rows) in enumerate(rows.items())]
        panels.append(Panel(f"{name} against dataset representation", "fraction of the maximum tokens", name, series,
                            xticks=FRACTION_TICKS))
    draw_panels(path, panels, size=(460, 360), columns=2)


def plot_probe(path, probe: dict, counts: list):
    """§A.4: probe accuracy per iteration (the first K tokens and all so far), and at the last iteration
    per pooled prefix, beside the untrained control, the pooled VQGAN grid and chance."""
    K, last = counts[0], len(counts)
    flat = lambda name, value, colour, xs: Series(name, [(x, value) for x in xs], colour, dashed=True)  # noqa: E731
    per_iteration, per_prefix = [], []
    for i, (source, pooled) in enumerate([(s, p) for s in ("trained", "untrained")
                                          for p in ("latents and image tokens", "latents")]):
        table, colour = probe[source][pooled], COLOURS[i]
        name = f"{source}, {pooled}"
        per_iteration += [Series(f"{name}, first {K}", [(counts[t], table[t + 1][K]) for t in range(last)], colour),
                          Series(f"{name}, all so far", [(counts[t], table[t + 1][counts[t]]) for t in range(last)],
                                 colour, dashed=True)]
        per_prefix.append(Series(name, list(table[last].items()), colour))
    for panel in (per_iteration, per_prefix):
        panel += [flat("pooled VQGAN grid", probe["vqgan grid"], COLOURS[7], counts),
                  flat("chance (the most frequent class)", probe["chance"], (0, 0, 0), counts)]
    ticks = [(k, str(k)) for k in counts]
    draw_panels(path, [Panel("linear probe per iteration (Sec. A.4)", "tokens at the iteration", "probe accuracy",
                             per_iteration, xticks=ticks),
                       Panel(f"linear probe at iteration {last}, by pooled prefix", "first tokens pooled",
                             "probe accuracy", per_prefix, xticks=ticks)])


def plot_familiarity(path, familiarity: dict, counts: list):
    """§A.2: L1 against tokens per image set, and per complexity level the gap between the shortest
    and the longest code and the tokens the default criterion picks."""
    sets = [(name, row) for name, row in familiarity.items() if isinstance(row, dict) and "l1" in row]
    colour = lambda i: (0, 0, 0) if i == 0 else COLOURS[i - 1]  # noqa: E731 (in distribution in black)
    panels = [Panel("L1 against tokens, unseen images (Sec. A.2)", "tokens", "L1",
                    [Series(name, list(row["l1"].items()), colour(i)) for i, (name, row) in enumerate(sets)],
                    xticks=[(k, str(k)) for k in counts])]
    levelled = [(i, name, row) for i, (name, row) in enumerate(sets) if "per_level" in row]
    if levelled:
        levels = sorted(levelled[0][2]["per_level"])
        for key, title in (("gap", f"L1 at {counts[0]} minus L1 at {counts[-1]} tokens"),
                           ("tokens", f"tokens the default criterion picks ({familiarity['criterion']})")):
            panels.append(Panel(title, "complexity level", "tokens" if key == "tokens" else "L1 gap",
                                [Series(name, [(c, row["per_level"][c][key]) for c in levels], colour(i))
                                 for i, name, row in levelled], xticks=[(c, str(c)) for c in levels], bars=True))
    draw_panels(path, panels)


def plot_segments(path, segments: dict, counts: list):
    """Tab. 2: the mIoU of the first K latent tokens' top-X segments per iteration, per share and with
    the share chosen per image, beside the shuffled maps and the untrained control."""
    ticks = [(k, str(k)) for k in counts]
    shares = [key for key in segments["recurrent"] if key != "best per image"]
    per_share = [Series(f"top {share} of the mass", list(segments["recurrent"][share].items()), COLOURS[i])
                 for i, share in enumerate(shares)]
    per_share.append(Series("best share per image", list(segments["recurrent"]["best per image"].items()), (0, 0, 0)))
    controls = [Series(f"{label}, best share per image", list(segments[name]["best per image"].items()), colour,
                       dashed=name != "recurrent")
                for name, label, colour in (("recurrent", "trained", (0, 0, 0)), ("shuffled", "maps shuffled", COLOURS[7]),
                                            ("untrained", "untrained ALIT", COLOURS[3]))]
    draw_panels(path, [Panel(f"first {counts[0]} tokens' maps as segments (Tab. 2)", "tokens at the iteration", "mIoU",
                             per_share, xticks=ticks),
                       Panel("against the controls", "tokens at the iteration", "mIoU", controls, xticks=ticks)])


def report(r: dict, tasks: list) -> str:
    def num(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    counts = r["tokens"]
    lines = [f"## {r['dataset']}, {r['images']} images, {r['checkpoint']}"]
    lines += ["", "Entropy of the latent tokens' attention over the 2D tokens (last encoder layer; 1 = uniform over "
              "the image, lower = more localized), per token count:"]
    lines += [f"- {name}: " + ", ".join(f"{k}: {v:.3f}" for k, v in row.items())
              for name, row in r["attention_entropy"].items()]
    if "binding" in r:
        b = r["binding"]
        lines += ["", "Object binding: each 2D token assigned to the latent token it attends most (last encoder layer), "
                  "scored against the scene's segments (ARI; 1 = the objects exactly, 0 = chance):", "",
                  "| ARI | " + " | ".join(str(k) for k in counts) + f" | one pass of {counts[-1]} |",
                  "| --- |" + " ---: |" * (len(counts) + 1)]
        for level, groups in b.items():
            name = "all levels" if level == "all" else f"level {level}"
            lines.append(f"| {name} | " + " | ".join(num(s["ari"]) for s in groups["recurrent"].values())
                         + f" | {num(groups['one_pass'][counts[-1]]['ari'])} |")
        lines.append("| all, shuffled | " + " | ".join(num(s["ari"]) for s in b["all"]["shuffled"].values()) + " | - |")
        for metric, name in (("fg_ari", "foreground ARI"), ("miou", "matched mIoU")):
            lines.append(f"\n{name}, all levels, per token count: "
                         + ", ".join(f"{k}: {num(s[metric])}" for k, s in b["all"]["recurrent"].items())
                         + f"; shuffled at {counts[-1]}: {num(b['all']['shuffled'][counts[-1]][metric])}"
                         + f"; one pass of {counts[-1]}: {num(b['all']['one_pass'][counts[-1]][metric])}")
        lines.append("latent tokens the partition uses (mean), all levels: " + ", ".join(
            f"{k}: {s['segments']:.1f}" for k, s in b["all"]["recurrent"].items())
            + f"; one pass: {b['all']['one_pass'][counts[-1]]['segments']:.1f}"
            + f"; true segments (background halves and visible shapes): {b['all']['one_pass'][counts[-1]]['true_segments']:.1f}")
        lines.append("ARI, all levels, partition from the latent tokens' maps instead (each 2D token to the latent "
                     "whose map is highest there): " + ", ".join(
                         f"{k}: {num(s['ari'])}" for k, s in b["all"]["recurrent_latent_to_image"].items()))
    if "complexity" in r:
        c = r["complexity"]
        lines += ["", "| L1 per level | " + " | ".join(str(k) for k in counts) + " |",
                  "| ---: |" + " ---: |" * len(counts)]
        for level, row in c["l1_per_level"].items():
            lines.append(f"| {level} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
        for criterion, per_level in c["chosen_tokens_per_level"].items():
            means = {level: sum(k * v for k, v in hist.items()) / max(1, sum(hist.values()))
                     for level, hist in per_level.items()}
            lines.append(f"\n{criterion}: mean tokens per level " + ", ".join(f"{lv}: {m:.1f}" for lv, m in means.items()))
    if "classifier" in r:
        c = r["classifier"]
        lines.append(f"\nclassifier of {c['what']} ({c['classes']} classes): top-1 accuracy "
                     f"{c['accuracy_on_originals']:.3f} on the original images")
    lines += ["", "Fraction of the maximum tokens at which each task reaches 95% of its performance at the maximum "
              "(losses within 1/0.95 of it; - : not within the criterion's range):", "",
              "| criterion | " + " | ".join(TASKS[t][0] for t in tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for criterion, fractions in r["fraction_for_95_percent"].items():
        lines.append(f"| {criterion} | " + " | ".join(num(fractions[t], ".2f") for t in tasks) + " |")
    best = r["selection"]["every image at one count"][-1]
    lines.append(f"\nat {counts[-1]} tokens: " + ", ".join(f"{TASKS[t][0]} {num(best[t], '.4f')}" for t in tasks))
    return "\n".join(lines + report_experiments(r))


def difference(d: dict, fmt: str = "+.3f") -> str:
    """A difference with its standard error, and whether it holds (beyond two of them) when claimed."""
    verdict = "" if "holds" not in d else " (holds)" if d["holds"] else " (does not hold)"
    return f"{d['difference']:{fmt}} ± {d['se']:{fmt[1:]}}{verdict}"


def report_experiments(r: dict) -> list:
    """The report of §A.4's probes, §A.2's familiarity, depth as criterion and task, and Tab. 2."""
    counts, lines = r["tokens"], []
    num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    if "depth_regressor" in r:
        d = r["depth_regressor"]
        lines += [f"\ndepth regressor: error {d['error_on_originals']:.3f} layers on the originals "
                  f"(background depth everywhere: {d['error_of_background_depth_everywhere']:.3f})",
                  "\nTSC = TOI (Fig. 6/9): each task's advantage under its own criterion over another's at the "
                  "same fraction of tokens (± bootstrap SE):"]
        for task, others in r["task_alignment"].items():
            lines.append(f"- {TASKS[task][0]}: " + "; ".join(
                f"over {other}: " + ("-" if a["advantage"] is None else f"{a['advantage']:+.4f} ± {a['se']:.4f}")
                for other, a in others.items()))
        t = r["tokens_per_task"]
        lines.append(f"tokens until as good as the original ({t['images']} images the classifier gets right): "
                     f"classification {t['classification']:.1f}, depth {t['depth']:.1f}; depth - classification "
                     + difference(t, "+.2f"))
    if "linear_probe" in r:
        p = r["linear_probe"]
        lines += ["", f"Linear probe of {p['label']} ({p['classes']} classes; {p['train_images']} train images, "
                  f"{p['test_images']} test of {p['test_classes']} classes), "
                  f"latents and image tokens pooled; rows: iteration, columns: first tokens pooled:", "",
                  "| iteration | " + " | ".join(str(k) for k in counts) + " |", "| --- |" + " ---: |" * len(counts)]
        for t, row in p["trained"]["latents and image tokens"].items():
            lines.append(f"| {t} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in counts) + " |")
        last = len(counts)
        lines.append(f"untrained, iteration {last}, all: {p['untrained']['latents and image tokens'][last][counts[-1]]:.3f}; "
                     f"latents only, trained: {p['trained']['latents'][last][counts[-1]]:.3f}; pooled VQGAN grid "
                     f"{p['vqgan grid']:.3f}; chance {p['chance']:.3f}")
        for pooled, claims in p["claims"].items():
            a, b = claims["recurrence"], claims["prefix"]
            lines.append(f"{pooled}: (a) first {a['tokens']} tokens, iteration {a['iteration']} - iteration 1: "
                         f"{difference(a)}; (b) iteration {last}, first {b['tokens']} - all {b['of']} tokens: {difference(b)}")
    if "familiarity" in r:
        f = r["familiarity"]
        lines += ["", f"Familiarity (§A.2): L1 gap {counts[0]} - {counts[-1]} tokens and tokens picked by "
                  f"{f['criterion']}, against in distribution:", "",
                  f"| images | VQGAN L1 | L1 at {counts[0]} | L1 at {counts[-1]} | gap | gap - in distribution | tokens | "
                  "tokens - in distribution | FID gap |", "| --- |" + " ---: |" * 8]
        for name, row in f.items():
            if not isinstance(row, dict):
                continue
            gap = difference(row["gap_vs_in_distribution"], "+.4f") if "gap_vs_in_distribution" in row else "-"
            tokens = difference(row["tokens_vs_in_distribution"], "+.1f") if "tokens_vs_in_distribution" in row else "-"
            lines.append(f"| {name} | {row['vqgan_l1']:.4f} | {row['l1'][counts[0]]:.4f} | {row['l1'][counts[-1]]:.4f} | {row['gap']:.4f} | "
                         f"{gap} | {row['tokens']:.1f} | {tokens} | {num(row.get('fid_gap'), '.2f')} |")
    if "segments" in r:
        s = r["segments"]
        lines += ["", "Tab. 2's protocol: mIoU of the first tokens' top-X segments with the true segments:", "",
                  "| top X | " + " | ".join(str(k) for k in counts) + " |", "| --- |" + " ---: |" * len(counts)]
        for name in ("recurrent", "shuffled", "untrained"):
            for share, row in s[name].items():
                label = share if name == "recurrent" else f"{share}, {name}"
                if name == "recurrent" or share == "best per image":
                    lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
        c = s["claims"]
        lines.append(f"rise at {c['rise']['share']}, last - first iteration: {difference(c['rise'])}; best share per "
                     f"image at the last, over shuffled: {difference(c['over shuffled'])}, over untrained: "
                     f"{difference(c['over untrained'])}")
    return lines


if __name__ == "__main__":
    main()
