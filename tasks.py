"""Task-aligned token selection: which token counts each selection criterion picks, and what the
reconstructions it picks give each task of interest.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.2 "Representational capacity depends on
downstream task" and Fig. 6-9. The paper's tasks of interest are ResNet-18's classification and
DepthAnythingV2's depth on ImageNet, each network both the criterion and the judge. Here four small
networks are trained on original `shapes` images (cached in --out-dir): a classifier and a depth
regressor that select tokens (the token-selection criteria, TSC), and a judge of each task, of another
architecture and seed, that scores the task of interest (TOI) beside L1, PSNR and FID. Tokens are
selected by L1 < threshold (Fig. 7), token accuracy, the classifier's top-X correct (Fig. 8) or depth
error < threshold (Fig. 9). TSC = TOI (Fig. 6) asks whether each task does best under its own
criterion, and "tokens needed" (§A.2) whether depth needs more tokens than classification: both scored
by the judges, and TSC = TOI also by the criterion's own model, the paper's reading.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import BACKGROUND_DEPTH, ShapesDataset
from fid import FeatureStats, fid_from_stats
from observe import LABELS, class_of, label_of, num_classes
from plots import plot_selection
from selection import first_passing, l1_passes, psnr
from verdicts import mean_difference, verdict

# Each task of interest: its name, and whether higher is better.
TASKS = {"l1": ("L1", False), "psnr": ("PSNR", True), "accuracy": ("top-1 accuracy (judge)", True),
         "depth": ("depth error (judge, layers)", False), "fid": ("FID", False)}

# -----------------------------------------------------------------------------
# The tasks of interest: a classifier and a depth regressor of shapes scenes, twice over
#
# Fig. 6/9 select tokens with ResNet-18 (DepthAnythingV2) and score the selection with the same network:
# a criterion that picks, per image, the count its own model gets right makes that model right by
# construction. So each task has two models trained on the same original images: the criterion's, which
# selects the tokens (TSC), and a judge of another architecture and seed, which only scores the task of
# interest (TOI). All four train in about a minute and a half of one CPU core.


def conv_bn(inputs: int, outputs: int, stride: int = 1, dilation: int = 1) -> list:
    return [nn.Conv2d(inputs, outputs, 3, stride=stride, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(outputs), nn.ReLU()]


def at_32(images):
    """(B, 3, H, W) -> (B, 3, 32, 32): the task models see 32x32 images (larger ones are resized)."""
    if images.shape[-1] == 32:
        return images
    return F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)


def at_size(depth, size: int):
    """(B, 1, 32, 32) -> (B, size, size), the depth back at the image's size."""
    if size != 32:
        depth = F.interpolate(depth, size=(size, size), mode="bilinear", align_corners=False)
    return depth[:, 0]


class Classifier(nn.Module):
    """The classification criterion's model: three stride-2 convolutions, flattened into a linear layer."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),  # (B, w, 16, 16)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2w, 8, 8)
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 4w, 4, 4)
            nn.Flatten(), nn.Linear(16 * 4 * width, classes))

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, classes) logits
        return self.net(at_32(images) - 0.5)


class PooledClassifier(nn.Module):
    """The classification judge: batch-normalised convolutions, max-pooled, then one global average pool
    (no position survives to the linear layer, unlike Classifier's flattened grid)."""

    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            *conv_bn(3, width, stride=2), *conv_bn(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            *conv_bn(2 * width, 4 * width), nn.MaxPool2d(2), *conv_bn(4 * width, 4 * width),  # (B, 4w, 4, 4)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, classes) logits
        return self.net(at_32(images) - 0.5)


class DepthNet(nn.Module):
    """The depth criterion's model, a small U-Net: each pixel's depth in layers from the front
    (data.Scene.depth), which it can only tell from occlusions. Features at 16x16 and 8x8 (receptive
    field 31 pixels, about the largest shape) come back up through skips from 32x32, so that the depth
    steps at the shapes' outlines land on the right pixels: predicting 4x4 pixels per cell of the 8x8
    grid, as this project first did, scored 0.29 layers against 0.34 for the background everywhere."""

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        self.fine = nn.Sequential(*conv_bn(3, w))  # (B, w, 32, 32)
        self.middle = nn.Sequential(*conv_bn(w, 2 * w, stride=2))  # (B, 2w, 16, 16)
        self.coarse = nn.Sequential(*conv_bn(2 * w, 4 * w, stride=2), *conv_bn(4 * w, 4 * w),
                                    *conv_bn(4 * w, 4 * w))  # (B, 4w, 8, 8)
        self.up_middle = nn.Sequential(*conv_bn(6 * w, 2 * w))
        self.up_fine = nn.Sequential(*conv_bn(3 * w, w), nn.Conv2d(w, 1, 1))

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, H, W) layers from the front
        fine = self.fine(at_32(images) - 0.5)
        middle = self.middle(fine)
        up = self.up_middle(torch.cat([F.interpolate(self.coarse(middle), scale_factor=2), middle], 1))
        depth = self.up_fine(torch.cat([F.interpolate(up, scale_factor=2), fine], 1))
        return at_size(depth + BACKGROUND_DEPTH, images.shape[-1])  # most pixels are background


class DilatedDepthNet(nn.Module):
    """The depth judge: one resolution (16x16) widened by dilated convolutions (dilations 1, 2, 4, 8;
    receptive field 63 pixels) instead of DepthNet's 8x8 bottleneck, then one convolution at 32x32 over
    the upsampled features and the image."""

    def __init__(self, width: int = 16, head: int = 8):
        super().__init__()
        self.trunk = nn.Sequential(*conv_bn(3, width, stride=2),
                                   *[m for d in (1, 2, 4, 8) for m in conv_bn(width, width, dilation=d)])
        self.head = nn.Sequential(*conv_bn(width + 3, head), nn.Conv2d(head, 1, 1))

    def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B, H, W) layers from the front
        x = at_32(images) - 0.5
        features = F.interpolate(self.trunk(x), scale_factor=2, mode="bilinear", align_corners=False)
        return at_size(self.head(torch.cat([features, x], 1)) + BACKGROUND_DEPTH, images.shape[-1])


# Every task model: its task, architecture and seed (added to --seed), and the name the report gives it.
# The judges differ from the criterion's models in both, so that no selection is good by construction.
TASK_NETS = {
    "classifier": ("classification", Classifier, 0, "classifier"),
    "classifier_judge": ("classification", PooledClassifier, 1, "classifier judge"),
    "depth": ("depth", DepthNet, 0, "depth regressor"),
    "depth_judge": ("depth", DilatedDepthNet, 1, "depth judge"),
}
BATCH = 32  # images per step of every task model


def build_task_net(name: str, label: str) -> nn.Module:
    task, architecture, _, _ = TASK_NETS[name]
    return architecture(num_classes(label)) if task == "classification" else architecture()


def task_nets(args, image_size: int, device) -> dict:
    """{name: model} for every TASK_NETS entry, each trained on original shapes images, or read from its
    cache in --out-dir (<name>.pt) when trained with the same settings."""
    nets, stale = {}, {}
    for name, (task, architecture, seed, what) in TASK_NETS.items():
        settings = {"label": args.label if task == "classification" else "depth", "image_size": image_size,
                    "architecture": architecture.__name__, "images": args.classifier_images,
                    "steps": args.classifier_steps, "batch": BATCH, "seed": args.seed + seed}
        path = Path(args.out_dir) / f"{name}.pt"
        cached = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        if cached.get("settings") == settings:
            nets[name] = build_task_net(name, args.label)
            nets[name].load_state_dict(cached["model"])
            print(f"{what}{' of ' + args.label if task == 'classification' else ''} read from {path}")
        else:
            stale[name] = (settings, path)
    if stale:
        print(f"training the {', '.join(TASK_NETS[name][3] for name in stale)}, two at a time ...")
        start = time.perf_counter()
        trained = train_task_nets(list(stale), args, image_size, device)
        for name, (settings, path) in stale.items():
            torch.save({"settings": settings, "model": trained[name].state_dict()}, path)
        print(f"trained in {time.perf_counter() - start:.0f} s, saved to {Path(args.out_dir)}")
        nets |= trained
    return {name: net.to(device).eval() for name, net in nets.items()}


def training_scenes(args, image_size: int) -> dict:
    """--classifier-images train-split scenes, drawn once for every task model: {"images", "classification"
    (the class of --label), "depth"}."""
    data = ShapesDataset("train", image_size, args.classifier_images, seed=args.seed)
    items = [data.with_masks(i) for i in range(len(data))]
    return {"images": torch.stack([item.image for item in items]),
            "classification": torch.tensor([class_of(args.label, item.level, item.num_shapes) for item in items]),
            "depth": torch.stack([item.depth for item in items])}


def train_task_nets(names: list, args, image_size: int, device) -> dict:
    """The task models `names`, each trained from its own seeded start for --classifier-steps of BATCH
    scenes, mirrored at random, two at a time."""
    scenes = {key: value.to(device) for key, value in training_scenes(args, image_size).items()}
    starts = {}
    for name in names:  # built here, one after another: the global RNG gives each its seeded weights
        torch.manual_seed(args.seed + TASK_NETS[name][2])
        starts[name] = build_task_net(name, args.label).to(device, memory_format=torch.channels_last)  # 18% faster
    names = sorted(names, key=lambda name: TASK_NETS[name][0] != "depth")  # the slower first: both end together
    # Convolutions this small gain little from a second thread inside one step (33 against 42 ms a step),
    # and lose much when the cores are shared, so each net runs on one thread, two nets at once.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            trained = pool.map(lambda name: train_task_net(name, starts[name], scenes, args, device), names)
            return dict(zip(names, trained))
    finally:
        torch.set_num_threads(threads)


def train_task_net(name: str, net: nn.Module, scenes: dict, args, device) -> nn.Module:
    """One task model trained: cross-entropy for a classifier; for depth the Huber loss, which takes the
    shapes' depth steps as L1 does (the error depth is scored by) without L1's pull of every pixel to the
    background's depth, where some starts stay."""
    task, _, seed, _ = TASK_NETS[name]
    images, targets = scenes["images"], scenes[task]
    generator = torch.Generator().manual_seed(args.seed + seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=args.classifier_steps, pct_start=0.1)
    net.train()
    for _ in range(args.classifier_steps):
        batch = torch.randint(len(images), (BATCH,), generator=generator).to(device)
        x, y = images[batch], targets[batch]
        flip = (torch.rand(len(x), generator=generator) < 0.5).to(device)  # a mirror image is the same scene
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        if task == "classification":
            loss = F.cross_entropy(net(x), y)
        else:
            loss = F.smooth_l1_loss(net(x), torch.where(flip[:, None, None], y.flip(-1), y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.to(memory_format=torch.contiguous_format).eval()


def true_label_rank(logits, labels):
    """(..., B, classes), (B,) -> (..., B): how many classes score above the true one (0: top-1 correct)."""
    true = logits.gather(-1, labels.expand(logits.shape[:-1])[..., None])
    return (logits > true).sum(-1)


class TaskOutcomes:
    """What the task models keep of each batch, per image (and token count): each classifier's rank of the
    true label and each depth model's error against the true depth, on the reconstructions and on the
    original; the depth criterion, the depth model's error on a reconstruction against its own estimate on
    the original (Fig. 6/9's pseudo-ground truth); the error of the background depth everywhere; the class.
    Tables of the judges end in _judge; the criterion's models' have no suffix."""

    def __init__(self, nets: dict, label: str):
        self.nets, self.label = nets, label
        self.tables = {}

    def keep(self, key: str, value):
        self.tables.setdefault(key, []).append(value.cpu())

    def add(self, batch):
        images, recon, items = batch.images, batch.recon, batch.items
        labels = torch.tensor([label_of(item, self.label) for item in items]).to(images.device)
        depth = torch.stack([item.depth for item in items]).to(images.device)  # (B, H, W)
        self.keep("label", labels)
        for suffix in ("", "_judge"):
            classifier, regressor = self.nets["classifier" + suffix], self.nets["depth" + suffix]
            logits = classifier(recon.flatten(0, 1)).view(len(recon), len(images), -1)  # (T, B, classes)
            self.keep("rank" + suffix, true_label_rank(logits, labels))  # (T, B)
            self.keep(f"rank{suffix}_original", true_label_rank(classifier(images), labels))  # (B,)
            estimate = regressor(recon.flatten(0, 1)).view(len(recon), *depth.shape)  # (T, B, H, W)
            on_original = regressor(images)  # (B, H, W)
            self.keep("depth" + suffix, (estimate - depth).abs().flatten(2).mean(2))  # (T, B)
            self.keep(f"depth{suffix}_original", (on_original - depth).abs().flatten(1).mean(1))
            if not suffix:  # selection.depth_error, from the estimates made above
                self.keep("depth_criterion", (estimate - on_original).abs().flatten(2).mean(2))
        self.keep("depth_flat", (depth - BACKGROUND_DEPTH).abs().flatten(1).mean(1))  # sees nothing

    def result(self) -> dict:
        """{name: (T, n) per token count, or (n,)}."""
        return {k: torch.cat(v, dim=-1) for k, v in self.tables.items()}


# -----------------------------------------------------------------------------
# Selections (Fig. 7/8)

def thresholds(flag: str, values: torch.Tensor) -> list:
    """A threshold flag's values, or auto: the 5th, 10th, ..., 95th percentiles of every image's value at
    every token count, which spreads the selections from few tokens to all."""
    if flag != "auto":
        return [float(v) for v in flag.split(",")]
    return sorted(set(np.quantile(values.numpy(), np.linspace(0.05, 0.95, 19)).round(4).tolist()))


def criteria(per_image: dict, args) -> dict:
    """Every token-selection criterion as its pass tables, one per threshold (or top-X):
    {criterion: [(name, (T, n) bool passes, {"threshold" or "top_x": value})]}; the classifier's and the
    depth criterion on shapes only."""
    l1, accuracy = per_image["l1"], per_image["token_acc"]
    tables = {"L1 < threshold": [(f"l1<{thr:g}", l1 < thr, {"threshold": thr})
                                 for thr in thresholds(args.l1_thresholds, l1)],
              "token accuracy >= threshold": [(f"token_acc>={thr:g}", accuracy >= thr, {"threshold": thr})
                                              for thr in thresholds(args.token_thresholds, accuracy)]}
    if args.saturation > 0:
        tables[f"L1 < threshold or saturated ({args.saturation:g})"] = [
            (f"l1<{thr:g} or saturated", l1_passes(l1, thr, args.saturation), {"threshold": thr})
            for thr in thresholds(args.l1_thresholds, l1)]
    if "rank" in per_image:
        depth = per_image["depth_criterion"]
        tables["classifier top-X correct"] = [(f"top-{x:g} correct", per_image["rank"] < x, {"top_x": x})
                                              for x in [int(float(v)) for v in args.top_x.split(",")]]
        tables["depth error < threshold"] = [(f"depth<{thr:g}", depth < thr, {"threshold": thr})
                                             for thr in thresholds(args.depth_thresholds, depth)]
    return tables


def selection_row(name: str, chosen, per_image: dict, T: int, fid=None, **extra) -> dict:
    """What a selection (an iteration per image) costs, as the fraction of the maximum tokens
    (§A.2's dataset representation), and what it gives on every task of interest (the classifier's and
    the depth regressor's scored by their independent judges)."""
    pick = (chosen, torch.arange(len(chosen)))
    return {"criterion": name, **extra, "dataset_representation": ((chosen + 1).float().mean() / T).item(),
            "l1": per_image["l1"][pick].mean().item(), "psnr": psnr(per_image["mse"][pick]).mean().item(),
            "accuracy": (per_image["rank_judge"][pick] == 0).float().mean().item() if "rank" in per_image else None,
            "depth": per_image["depth_judge"][pick].mean().item() if "rank" in per_image else None,
            "fid": fid(chosen) if fid else None}


def selection_fid(per_image: dict):
    """FID as a task of interest: chosen (n,) iterations -> the Frechet distance of the selected
    reconstructions' features to the originals'. None without Inception features."""
    if "real_features" not in per_image:
        return None
    real = FeatureStats()
    real.update(per_image["real_features"])

    def fid(chosen):
        stats = FeatureStats()
        stats.update(per_image["features"][chosen, torch.arange(len(chosen))])
        return fid_from_stats(real, stats)
    return fid


def selections(per_image: dict, tables: dict, counts: list) -> dict:
    """Fig. 7/8's rows: every image at one count, then each criterion's selections (the first count to
    pass per image)."""
    T, n, fid = len(counts), per_image["l1"].shape[1], selection_fid(per_image)
    rows = {"every image at one count": [selection_row(f"{k} tokens", torch.full((n,), t), per_image, T, fid, tokens=k)
                                         for t, k in enumerate(counts)]}
    for criterion, table in tables.items():
        rows[criterion] = [selection_row(name, first_passing(passes), per_image, T, fid, **extra)
                           for name, passes, extra in table]
    return rows


def fraction_reaching(rows: list, task: str, best: float, higher_is_better: bool, share: float = 0.95):
    """The smallest dataset representation among `rows` whose `task` reaches `share` of `best` (the
    max-token performance: at least share x best, or for losses at most best / share)."""
    good = [r["dataset_representation"] for r in rows if r[task] is not None and
            (r[task] >= share * best if higher_is_better else r[task] <= best / share)]
    return min(good, default=None)


# -----------------------------------------------------------------------------
# TSC = TOI (Fig. 6/9) and the tokens each task needs (§A.2), scored by the independent judges

# Each task of interest with a criterion of its own (Fig. 6 left: top-1 under the classifier's criterion;
# Fig. 9: depth under the depth criterion), and the tables that score it: by the independent judge (the
# protocol) and by the criterion's own model (the paper's reading, kept beside to show the difference).
OWN_CRITERION = {"accuracy": "classifier top-X correct", "depth": "depth error < threshold"}
SCORERS = {"independent judge": "_judge", "criterion's own model": ""}
TOP_1 = "classifier top-1 correct"  # the classifier's own selection: Fig. 6 left's best top-1, of its top-X ones
DEPTH_SHARE = 0.95  # "as well as" for depth: an error within 1/0.95 of the reference's (fraction_reaching's rule)


def task_score(per_image: dict, task: str, suffix: str) -> torch.Tensor:
    """(T, n): top-1 correct (1/0) or the depth error, per token count and image, by the scorer `suffix`."""
    return (per_image["rank" + suffix] == 0).float() if task == "accuracy" else per_image["depth" + suffix]


def curves(tables: dict, scores: dict, index) -> dict:
    """Every selection by the pass tables `tables` ({criterion: [(T, n) bool]}) on the images `index`, as
    curves {criterion: {score name: [(dataset representation, mean of the score (T, n) over the selected
    counts)]}} for every table of `scores` ({name: (T, n)}): each selection is made once for all scores."""
    result = {}
    for criterion, passes in tables.items():
        result[criterion] = {name: [] for name in scores}
        for p in passes:
            chosen = first_passing(p[:, index])
            fraction = ((chosen + 1).float().mean() / len(p)).item()
            for name, score in scores.items():
                result[criterion][name].append((fraction, score[chosen, index].mean().item()))
    return result


def matched_advantage(own: list, other: list, higher_is_better: bool):
    """How much better the task does under its own criterion's selections (`own`: [(fraction, task)])
    than under another's (`other`) at the same fractions of the tokens, interpolated along the other's
    curve, averaged over own's selections within its range; None without overlap."""
    other = sorted(other)
    xs, ys = [x for x, _ in other], [y for _, y in other]
    gains = [(y - np.interp(x, xs, ys)) * (1 if higher_is_better else -1) for x, y in own if xs[0] <= x <= xs[-1]]
    return float(np.mean(gains)) if gains else None


def bootstrap_ses(statistics, n: int, draws: int = 200, seed: int = 0) -> dict:
    """verdicts.bootstrap_se for a statistic with several values ({key: value} of the images' indices),
    computed once per resampling: {key: standard error, None where fewer than two resamplings give one}."""
    rng = np.random.default_rng(seed)
    drawn = [statistics(torch.from_numpy(rng.integers(0, n, n))) for _ in range(draws)]
    values = {key: [d[key] for d in drawn if d[key] is not None] for key in drawn[0]}
    return {key: float(np.std(v, ddof=1)) if len(v) > 1 else None for key, v in values.items()}


def task_alignment(per_image: dict, tables: dict, seed: int) -> dict:
    """Fig. 6 and 9, for each task with a criterion of its own and each scorer (SCORERS): the task's
    advantage under its own criterion over every other criterion at matched dataset representation, and
    the least of them (TSC = TOI holds when the own criterion beats every other), with bootstrap standard
    errors over the images. tables: {criterion: [(T, n) bool passes]}; the classifier's own is top-1
    correct, by the criterion's model (Fig. 6 left)."""
    n = per_image["rank"].shape[1]
    tasks = {task: own for task, own in OWN_CRITERION.items() if own in tables}
    tables = tables | {TOP_1: [per_image["rank"] == 0]}
    scores = {(task, scorer): task_score(per_image, task, suffix)
              for task in tasks for scorer, suffix in SCORERS.items()}

    def advantages(index):
        drawn, result = curves(tables, scores, index), {}
        for (task, scorer) in scores:
            own, higher = tasks[task], TASKS[task][1]
            mine = drawn[TOP_1 if task == "accuracy" else own][task, scorer]
            over = {other: matched_advantage(mine, drawn[other][task, scorer], higher)
                    for other in tables if other not in (own, TOP_1)}
            known = [v for v in over.values() if v is not None]
            result |= {(task, scorer, other): v for other, v in over.items()}
            result[task, scorer, "least"] = min(known) if len(known) == len(over) else None
        return result
    value, se = advantages(torch.arange(n)), bootstrap_ses(advantages, n, seed=seed)
    result = {}
    for (task, scorer, other), v in value.items():
        entry = result.setdefault(task, {}).setdefault(scorer, {"over": {}})
        if other == "least":
            entry["least"] = {"difference": v, "se": se[task, scorer, other]}
        else:
            entry["over"][other] = {"advantage": v, "se": se[task, scorer, other]}
    return result


def settled(good: torch.Tensor) -> torch.Tensor:
    """(T, n) bool -> (n,) index of the first count from which `good` holds at every larger count
    (T - 1 where only the last holds; T - 1 too where none does)."""
    return first_passing(good.flip(0).int().cumprod(0).flip(0).bool())


def tokens_per_task(per_image: dict, counts: list) -> dict:
    """§A.2, "classification requires fewer tokens": per image, the fewest tokens from which the task is
    done as well as by the longest code and stays so at every larger count, by the independent judges:
    classification, top-1 correct (on the images the judge classifies right at the longest code, so that
    there is something to reach); depth, an error within 1/DEPTH_SHARE of the longest code's. Censored:
    the images that reach it only at the longest code, counted there. Paired difference depth -
    classification over the same images."""
    right = per_image["rank_judge"][-1] == 0
    depth = per_image["depth_judge"][:, right]
    needed = {"classification": settled(per_image["rank_judge"][:, right] == 0),
              "depth": settled(depth <= depth[-1:] / DEPTH_SHARE)}
    counts = torch.tensor(counts)
    result = {"images": int(right.sum()), "rule": f"top-1 correct; depth error within 1/{DEPTH_SHARE:g} of the "
              f"longest code's ({counts[-1]} tokens), at that count and every larger one"}
    for task, index in needed.items():
        result[task] = {"tokens": counts[index].float().mean().item(),
                        "censored": (index == len(counts) - 1).float().mean().item()}
    if right.sum() < 2:
        return result | {"difference": None, "se": None}
    return result | mean_difference(counts[needed["depth"]].float(), counts[needed["classification"]].float())


SCORE_NAMES = {"accuracy": "top-1 accuracy", "depth": "depth error"}
MODEL_OF = {"accuracy": "classifier", "depth": "depth"}  # the TASK_NETS name of each task's criterion model


def original_score(per_image: dict, task: str, suffix: str) -> torch.Tensor:
    """(n,): top-1 correct (1/0) or the depth error on the original images, by the scorer `suffix`."""
    return (per_image[f"rank{suffix}_original"] == 0).float() if task == "accuracy" else \
        per_image[f"depth{suffix}_original"]


def control_score(per_image: dict, task: str) -> torch.Tensor:
    """(n,): what a model that sees nothing scores: chance (the share of the analysed images' most frequent
    class), or the error of the background depth everywhere."""
    if task == "accuracy":
        labels = per_image["label"]
        return torch.full(labels.shape, torch.bincount(labels).max().item() / len(labels))
    return per_image["depth_flat"]


def over_control(per_image: dict, task: str, score: torch.Tensor) -> dict:
    """How far a per-image score (n,) beats the control's, paired; positive: better."""
    control = control_score(per_image, task)
    return mean_difference(score, control) if TASKS[task][1] else mean_difference(control, score)


def task_models_scores(per_image: dict) -> dict:
    """Each task model's score (top-1 accuracy, or depth error in layers) on the original images and on the
    reconstructions of the fewest and of the most tokens, beside its control's, and how far its score on
    the originals beats the control."""
    scores = {}
    for task, model in MODEL_OF.items():
        for suffix in ("", "_judge"):
            _, architecture, seed, role = TASK_NETS[model + suffix]
            original, reconstructed = original_score(per_image, task, suffix), task_score(per_image, task, suffix)
            scores[model + suffix] = {
                "role": role, "architecture": architecture.__name__, "seed_offset": seed, "score": SCORE_NAMES[task],
                "originals": original.mean().item(), "fewest_tokens": reconstructed[0].mean().item(),
                "most_tokens": reconstructed[-1].mean().item(), "control": control_score(per_image, task).mean().item(),
                "control_name": "chance" if task == "accuracy" else "background depth everywhere",
                "over_control": over_control(per_image, task, original)}
    return scores


def untestable(per_image: dict, task: str, suffix: str) -> str | None:
    """Why the scorer `suffix` cannot decide a claim on `task`, or None: it does not beat its control on
    the originals, or on the longest code's reconstructions, or its score does not move between the
    fewest and the most tokens (then no selection can move it)."""
    role, score = TASK_NETS[MODEL_OF[task] + suffix][3], task_score(per_image, task, suffix)
    for images, row in (("originals", original_score(per_image, task, suffix)),
                        ("longest code's reconstructions", score[-1])):
        clear = over_control(per_image, task, row)
        if clear["difference"] <= 2 * clear["se"]:
            return f"the {role} is not 2 SE clear of its control on the {images}"
    moves = mean_difference(score[-1], score[0])
    if abs(moves["difference"]) <= 2 * moves["se"]:
        return (f"the {role}'s {SCORE_NAMES[task]} is the same at the fewest and the most tokens "
                f"({score[0].mean():.3f}, {score[-1].mean():.3f}): no selection can move it")
    return None


# The claims, with the paper's word for each (no number: Fig. 6 and 9 are plots, §A.2 prose).
CLAIMS = {
    "accuracy": ("top-1 accuracy is best under the classification criterion", "Fig. 6 left: best top-1 with "
                 "TSC = classification"),
    "depth": ("depth error is best under the depth criterion", "Fig. 9: TSC = TOI gives the best TOI"),
    "tokens": ("depth needs more tokens than classification", "§A.2, Fig. 6: \"classification requires fewer "
               "tokens\""),
}


def task_claims(per_image: dict, alignment: dict, needed: dict) -> dict:
    """Claims (1)-(3) on verdicts.verdict's scale, each with the paper's statement and its control; (1) and
    (2) scored by the independent judges and, labelled, by the criterion's own models."""
    claims = {}
    for task, by_scorer in alignment.items():
        claim, paper = CLAIMS[task]
        for scorer, suffix in SCORERS.items():
            least = by_scorer[scorer]["least"]
            why = untestable(per_image, task, suffix) or (
                "the criteria's token fractions do not overlap" if least["se"] is None else None)
            claims[f"{claim} ({scorer} scores it)"] = {
                "paper": paper, "control": "every other criterion at the same fraction of the tokens; the least "
                "advantage", "scorer": scorer, **least, **verdict(least["difference"], least["se"], untestable=why)}
    claim, paper = CLAIMS["tokens"]
    why = (untestable(per_image, "accuracy", "_judge") or untestable(per_image, "depth", "_judge")
           or ("fewer than two images to compare" if needed["se"] is None else None))
    claims[f"{claim} (independent judges score it)"] = {
        "paper": paper, "control": f"the same {needed['images']} images, paired", "scorer": "independent judge",
        "difference": needed["difference"], "se": needed["se"],
        **verdict(needed["difference"], needed["se"], untestable=why)}
    return claims


def task_models(per_image: dict, tables: dict, args, counts: list) -> dict:
    """The task models' scores, TSC = TOI against the four criteria that are not L1's saturated variant,
    the tokens each task needs, and the claims' verdicts."""
    aligned = ("L1 < threshold", "token accuracy >= threshold", "classifier top-X correct", "depth error < threshold")
    scores = task_models_scores(per_image)
    alignment = task_alignment(per_image, {c: [p for _, p, _ in tables[c]] for c in aligned}, args.seed)
    needed = tokens_per_task(per_image, counts)
    return {"classifier": {"label": args.label, "classes": num_classes(args.label), "what": LABELS[args.label],
                           "accuracy_on_originals": scores["classifier"]["originals"]},
            "depth_regressor": {"error_on_originals": scores["depth"]["originals"],
                                "error_of_background_depth_everywhere": scores["depth"]["control"]},
            "task_nets": scores, "task_alignment": alignment, "tokens_per_task": needed,
            "task_claims": task_claims(per_image, alignment, needed)}


def analyse(per_image: dict, args, counts: list, out) -> dict:
    """Every selection and what it gives each task (selection.png), the fraction of the tokens at which
    each task reaches 95% of its best, and on shapes the task models' entries (task_models)."""
    tables = criteria(per_image, args)
    rows = selections(per_image, tables, counts)
    results = task_models(per_image, tables, args, counts) if "rank" in per_image else {}
    best = rows["every image at one count"][-1]
    tasks = [task for task in TASKS if best[task] is not None]
    results["selection"] = rows
    results["fraction_for_95_percent"] = {
        criterion: {task: fraction_reaching(r, task, best[task], TASKS[task][1]) for task in tasks}
        for criterion, r in rows.items()}
    plot_selection(out / "selection.png", rows, {task: TASKS[task][0] for task in tasks})
    return results
