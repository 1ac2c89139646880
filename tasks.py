"""Task-aligned token selection: which token counts each selection criterion picks, and what the
reconstructions it picks give each task of interest.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.2 "Representational capacity depends on
downstream task" and Fig. 6-9. The paper's tasks of interest are ResNet-18's classification and
DepthAnythingV2's depth on ImageNet; here a small classifier and a small depth regressor trained on
original `shapes` images (cached in --out-dir) stand beside L1, PSNR and FID. Tokens are selected
by L1 < threshold (Fig. 7), token accuracy, the classifier's top-X correct (Fig. 8) or depth error
< threshold (Fig. 9); TSC = TOI (Fig. 6) asks whether each task does best under its own criterion.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import BACKGROUND_DEPTH, ShapesDataset
from fid import FeatureStats, fid_from_stats
from observe import LABELS, class_of, label_of, num_classes
from plots import plot_selection
from selection import depth_error, first_passing, l1_passes, psnr
from verdicts import bootstrap_se, holds, mean_difference

# Each task of interest: its name, and whether higher is better.
TASKS = {"l1": ("L1", False), "psnr": ("PSNR", True), "accuracy": ("classifier accuracy", True),
         "depth": ("depth error (layers)", False), "fid": ("FID", False)}

# -----------------------------------------------------------------------------
# The tasks of interest: a classifier and a depth regressor of shapes scenes


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


def task_nets(args, image_size: int, device) -> dict:
    """{"classifier": the classifier of --label, "depth": the depth regressor}, each trained on original
    shapes images, or read from its cache in --out-dir when trained with the same settings."""
    nets = {}
    for task in ("classifier", "depth"):
        settings = {"label": args.label if task == "classifier" else "depth", "image_size": image_size,
                    "images": args.classifier_images, "steps": args.classifier_steps, "seed": args.seed}
        path = Path(args.out_dir) / f"{task}.pt"
        name = f"classifier of {args.label}" if task == "classifier" else "depth regressor"
        cached = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        if cached.get("settings") == settings:
            nets[task] = Classifier(num_classes(args.label)) if task == "classifier" else DepthNet()
            nets[task].load_state_dict(cached["model"])
            print(f"{name} read from {path}")
            nets[task] = nets[task].to(device).eval()
            continue
        start = time.perf_counter()
        nets[task] = train_task_net(task, args, image_size, device)
        torch.save({"settings": settings, "model": nets[task].state_dict()}, path)
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s, saved to {path}")
    return nets


def train_task_net(task: str, args, image_size: int, device) -> nn.Module:
    """The classifier of --label (task "classifier") or the depth regressor ("depth"), trained from a seeded
    start for --classifier-steps of batch 64 on --classifier-images train-split scenes, mirrored at random."""
    data = ShapesDataset("train", image_size, args.classifier_images, seed=args.seed)
    images, targets = [], []
    for i in range(len(data)):
        item = data.with_masks(i)
        images.append(item.image)
        targets.append(torch.tensor(class_of(args.label, item.level, item.num_shapes)) if task == "classifier"
                       else item.depth)
    images, targets = torch.stack(images).to(device), torch.stack(targets).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = (Classifier(num_classes(args.label)) if task == "classifier" else DepthNet()).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    # Convolutions this small gain nothing from a second CPU thread and lose much when the cores are
    # shared: 800 steps took 12 s on one thread, over 60 s on two, beside another training run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    name = f"classifier of {args.label}" if task == "classifier" else "depth regressor"
    for _ in tqdm(range(args.classifier_steps), desc=name, dynamic_ncols=True):
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
    return net.eval()


def true_label_rank(logits, labels):
    """(..., B, classes), (B,) -> (..., B): how many classes score above the true one (0: top-1 correct)."""
    true = logits.gather(-1, labels.expand(logits.shape[:-1])[..., None])
    return (logits > true).sum(-1)


class TaskOutcomes:
    """What the tasks of interest keep of each batch, per image (and token count): the classifier's rank of
    the true label, on the reconstructions and the original; the depth regressor's error against the true
    depth, on the reconstructions and the original, and against its own estimate on the original (the
    depth criterion: Fig. 6/9's pseudo-ground truth); and the error of the background depth everywhere."""

    def __init__(self, nets: dict, label: str):
        self.nets, self.label = nets, label
        self.tables = {key: [] for key in ("rank", "rank_original", "depth", "depth_criterion", "depth_original",
                                           "depth_flat")}

    def add(self, batch):
        images, recon, items, tables = batch.images, batch.recon, batch.items, self.tables
        labels = torch.tensor([label_of(item, self.label) for item in items]).to(images.device)
        logits = self.nets["classifier"](recon.flatten(0, 1)).view(len(recon), len(images), -1)  # (T, B, classes)
        tables["rank"].append(true_label_rank(logits, labels).cpu())  # (T, B)
        tables["rank_original"].append(true_label_rank(self.nets["classifier"](images), labels).cpu())  # (B,)
        depth, net = torch.stack([item.depth for item in items]).to(images.device), self.nets["depth"]  # (B, H, W)
        tables["depth"].append(torch.stack([(net(r) - depth).abs().flatten(1).mean(1) for r in recon]).cpu())  # (T, B)
        tables["depth_criterion"].append(torch.stack([depth_error(net, images, r) for r in recon]).cpu())
        tables["depth_original"].append((net(images) - depth).abs().flatten(1).mean(1).cpu())
        tables["depth_flat"].append((depth - BACKGROUND_DEPTH).abs().flatten(1).mean(1).cpu())  # sees nothing

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
    (§A.2's dataset representation), and what it gives on every task of interest."""
    pick = (chosen, torch.arange(len(chosen)))
    return {"criterion": name, **extra, "dataset_representation": ((chosen + 1).float().mean() / T).item(),
            "l1": per_image["l1"][pick].mean().item(), "psnr": psnr(per_image["mse"][pick]).mean().item(),
            "accuracy": (per_image["rank"][pick] == 0).float().mean().item() if "rank" in per_image else None,
            "depth": per_image["depth"][pick].mean().item() if "depth" in per_image else None,
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
# Depth as criterion and task (Fig. 6/9): TSC = TOI, and which task needs more tokens

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
    bootstrap standard errors over the images. tables: {criterion: [(T, n) bool passes]}."""
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
                                                 "holds": value is not None and holds(value, se)}
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
            **difference, "holds": holds(difference["difference"], difference["se"])}


def task_models(per_image: dict, tables: dict, args, counts: list) -> dict:
    """The classifier and the depth regressor on the originals, TSC = TOI against the four criteria that
    are not L1's saturated variant, and the tokens each task needs."""
    aligned = ("L1 < threshold", "token accuracy >= threshold", "classifier top-X correct", "depth error < threshold")
    return {"classifier": {"label": args.label, "classes": num_classes(args.label), "what": LABELS[args.label],
                           "accuracy_on_originals": (per_image["rank_original"] == 0).float().mean().item()},
            "depth_regressor": {"error_on_originals": per_image["depth_original"].mean().item(),
                                "error_of_background_depth_everywhere": per_image["depth_flat"].mean().item()},
            "task_alignment": task_alignment(per_image, {c: [p for _, p, _ in tables[c]] for c in aligned}, args.seed),
            "tokens_per_task": tokens_per_task(per_image, counts)}


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
