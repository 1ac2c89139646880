"""Linear probing (§A.4): a linear classifier on the mean-pooled encoder output per iteration and per
prefix of latent tokens, against the pooled grid of the 2D tokenizer, an untrained ALIT and chance.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.4 (linear probing of the encoder's output,
"mean pooling both the processed image tokens and 1D latent tokens"; (a) Ours-L's first 32 tokens probe
at 55.6% after one iteration and 59.5% after 2-3, and (b) the first 64-128 of 256 tokens probe better
than all of them). Of a shapes label (--label), or of the class on photos with classes (imagenet100,
imagenet), as §A.4 does on ImageNet-100: fit on --probe-images train-split images, scored on
--probe-test-images val-split images, enough that the claims' standard error is at most a third of the
paper's effect (SE_TARGET). The comparisons are fixed by the rollout's length before any score is seen
(`compared`): (a) iterations 2 and 3 averaged against iteration 1, in both readings (the first K latent
tokens, and all latent tokens so far); (b) at the last iteration, the first quarter and the first half
of the tokens averaged against all of them. The untrained control is fit on the same training images and
scored on the first quarter of the test images (CONTROL_SHARE).
"""
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import ShapesDataset, build_dataset, class_names
from observe import LABELS, items_of, label_of, num_classes
from plots import plot_probe
from verdicts import mean_difference, verdict

# §A.4's claim (a) at the paper's scale: 55.6% -> 59.5% top-1, in accuracy.
PAPER_RECURRENCE = 0.595 - 0.556
# The test set is large enough when the claims' standard error is at most a third of the paper's effect:
# an effect that size then lies 3 SE from 0, so the interval of ± 2 SE cannot hold both 0 and it.
SE_TARGET = PAPER_RECURRENCE / 3

# The untrained control is fit on all the training images and scored on the first test images, this share of
# them: it stands beside the claims, not in them, so its accuracy needs no such power, and its rollout
# costs as much as the trained encoder's.
CONTROL_SHARE = 4

# How the encoder's output at one iteration becomes one feature vector per image (`pooled_features`).
POOLINGS = {
    "one mean": "one mean over the processed image tokens and the latent tokens together, as the official "
                "code's image_and_latent_all_tokens (x[:, 1:], the class token left out) and §A.4's words",
    "two means": "the image tokens' mean beside the latent tokens' mean, concatenated (what this project "
                 "probed before issue 40: neither group drowns the other)",
    "latents": "the latent tokens' mean alone, what the decoder reads",
}

# -----------------------------------------------------------------------------
# The probe

def pooled_blocks(outputs: list, num_image_tokens: int, tokens_per_iter: int) -> tuple:
    """Encoder outputs of the T iterations -> (image pool (T, B, D): the mean of the processed 2D image
    tokens; block pools (T, T, B, D): [t, k] the mean of latent tokens k*K..(k+1)*K at iteration t,
    zero where block k does not exist yet (k > t)). The mean of the first j*K latent tokens is the
    mean of the first j block pools, all blocks being K tokens."""
    N, K, T = num_image_tokens, tokens_per_iter, len(outputs)
    B, D = outputs[0].shape[0], outputs[0].shape[-1]
    image = torch.stack([x[:, 1:1 + N].float().mean(1) for x in outputs])
    blocks = torch.zeros(T, T, B, D)
    for t, x in enumerate(outputs):
        latents = x[:, 1 + N:].float()
        blocks[t, :t + 1] = latents.reshape(B, t + 1, K, D).mean(2).transpose(0, 1).cpu()
    return image.cpu(), blocks


def pooled_features(image: torch.Tensor, blocks: torch.Tensor, t: int, j: int, pooling: str,
                    num_image_tokens: int, tokens_per_iter: int) -> torch.Tensor:
    """(B, D, or 2D for "two means"): the encoder's output at iteration t (0-based) pooled over the N
    image tokens and the first j*K latent tokens, as POOLINGS[pooling] says."""
    N, jK = num_image_tokens, j * tokens_per_iter
    latents = blocks[t, :j].mean(0)  # (B, D) the mean of the first j*K latent tokens
    if pooling == "one mean":  # each token weighs the same, as x[:, 1:].mean(1) in the official code
        return (N * image[t] + jK * latents) / (N + jK)
    return torch.cat([image[t], latents], dim=-1) if pooling == "two means" else latents


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float = 1e-3,
                     steps: int = 100):
    """Multinomial logistic regression on standardized features by full-batch L-BFGS from zero weights:
    a convex problem, so the answer depends on no seed. Returns predict(features) -> (B,) classes."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = ((features - mean) / std).double()
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(x @ weight + bias, labels) + weight_decay * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    weight, bias = weight.detach(), bias.detach()
    return lambda test: (((test - mean) / std).double() @ weight + bias).argmax(-1)


def probe_correct(train_x, train_y, test_x, test_y, classes: int) -> torch.Tensor:
    """(test images,) bool: whether a probe fit on the training features classifies each test image."""
    return fit_linear_probe(train_x, train_y, classes)(test_x) == test_y


def class_balanced(targets: list, n: int) -> list:
    """The indices of n items spread evenly over the classes of `targets`: the first item of every
    class, then the second, ... (a class short of items leaves its share to the others), in order.
    §A.4 probes ImageNet-100's classes; the first n files would hold only the first classes."""
    by_class = {}
    for i, target in enumerate(targets):
        by_class.setdefault(target, []).append(i)
    rounds = itertools.zip_longest(*by_class.values())
    return sorted([i for row in rounds for i in row if i is not None][:n])


# -----------------------------------------------------------------------------
# The probes' images and features

class ProbeImages(NamedTuple):
    """The linear probes' images: `indices` of the train split `data` to fit on, `test_indices` of the val
    split `test_data` to score on, labelled with one of `classes` classes, which `label` names."""
    data: object
    indices: list
    test_data: object
    test_indices: list
    classes: int
    label: str


def probe_images(args, image_size: int) -> tuple:
    """Where §A.4's probes train and are scored: (ProbeImages, None), or (None, why there is no probe). On
    shapes --probe-images train-split scenes and --probe-test-images val-split scenes, labelled by --label
    (they cost nothing to draw, so the test set is as large as the claims' power asks, not the analysed
    images). On photos with classes, as §A.4 on ImageNet-100: the class of as many train-split and val-split
    images spread evenly over the classes, read as the analysed images are (the evaluation transform, no
    augmentation: one fixed view of each image)."""
    if args.dataset == "shapes":
        data = ShapesDataset("train", image_size, args.probe_images, seed=args.seed)
        test = ShapesDataset("val", image_size, args.probe_test_images, seed=args.seed)
        return ProbeImages(data, list(range(len(data))), test, list(range(len(test))), num_classes(args.label),
                           LABELS[args.label]), None
    if args.dataset == "folder":
        return None, "no classes either, so no linear probe"
    try:
        classes = class_names(args.dataset, "train", args.data_dir)
        data, test = [build_dataset(args.dataset, split, image_size, args.data_dir, train=False,
                                    eval_protocol=args.protocol) for split in ("train", "val")]
    except (ValueError, FileNotFoundError) as error:
        return None, f"no linear probe, it trains on the train split and scores the val split ({error})"
    if classes != class_names(args.dataset, "val", args.data_dir):  # targets are folder indices
        return None, "no linear probe: the class folders of train/ and val/ differ"
    return ProbeImages(data, class_balanced(data.targets, args.probe_images), test,
                       class_balanced(test.targets, args.probe_test_images), len(classes), "the image's class"), None


def encoder_passes(model, images, tokens_2d) -> list:
    """The encoder's output at every iteration, T x (B, 1+N+t*K, D): model.forward's rollout without its
    decoder, which §A.4 does not read and which changes nothing the encoder sees when nothing halts (the
    analyses roll out without halting)."""
    x = model.first_sequence(images, tokens_2d)
    passes = []
    for t in range(model.config.rollout_iters):
        x = model.encoder(x)
        passes.append(x)
        if t + 1 < model.config.rollout_iters:
            x = model.next_sequence(x, t + 1)
    return passes


class ProbeFeatures:
    """The probes' features of a set of images: the pooled encoder outputs of the trained model and of the
    untrained control (pooled_blocks; the control's of the first images alone, when asked), the pooled grid
    of the 2D tokenizer (the VQGAN's codes, or the VAE's tokens), and the labels."""

    def __init__(self, model, control, label: str):
        self.model, self.control, self.label = model, control, label
        self.features = {name: [] for name in ("image", "blocks", "control_image", "control_blocks", "vqgan")}
        self.labels = []

    @torch.no_grad()
    def add(self, items: list, device, control_items: int):
        """The features of dataset items, both networks rolled out to their last iteration, the control over
        the first `control_items` of them (on the trained base, so both read the same 2D tokens)."""
        images = torch.stack([item[0] for item in items]).to(device)
        tokens_2d = self.model.base_tokens(images)
        N, K = self.model.config.num_image_tokens, self.model.config.tokens_per_iter
        for name, net, n in (("", self.model, len(items)), ("control_", self.control, control_items)):
            image, blocks = pooled_blocks(encoder_passes(net, images[:n], tokens_2d[:n]), N, K)
            self.features[name + "image"].append(image)
            self.features[name + "blocks"].append(blocks)
        self.features["vqgan"].append(self.model.base.code_grid(tokens_2d).float().mean((2, 3)).cpu())  # (B, C)
        self.labels.append(torch.tensor([label_of(item, self.label) for item in items]))

    def result(self) -> tuple:
        """({name: images along the axis before D}, (n,) labels)."""
        return {k: torch.cat(v, dim=-2) for k, v in self.features.items()}, torch.cat(self.labels)


def probe_features(model, control, data, indices: list, args, device, desc: str, control_images=None) -> tuple:
    """ProbeFeatures.result() of the images at `indices` of `data`, the control's of the first
    `control_images` (None: all)."""
    features = ProbeFeatures(model, control, args.label)
    control_images = len(indices) if control_images is None else control_images
    for start in tqdm(range(0, len(indices), args.batch_size), desc=desc, dynamic_ncols=True):
        items = items_of(data, indices[start:start + args.batch_size])
        features.add(items, device, min(len(items), max(0, control_images - start)))
    return features.result()


# -----------------------------------------------------------------------------
# The probes per iteration and prefix, and §A.4's claims

def compared(T: int) -> dict:
    """The claims' comparisons, fixed by the rollout's length T alone, before any score is seen (0-based
    iterations, prefixes in blocks of K tokens): (a) "recurrence": iterations 2 and 3 (those there are)
    against iteration 1, §A.4's "2-3 times"; (b) "prefix": at the last iteration, the first quarter and
    the first half of the tokens against all T blocks, §A.4's 64 and 128 of 256."""
    return {"recurrence": {"iterations": [t for t in (1, 2) if t < T], "against": 0},
            "prefix": {"blocks": sorted({max(1, T // 4), max(1, T // 2)}), "against": T}}


def probed_cells(T: int, everywhere: bool = True) -> list:
    """The (iteration t, first j blocks) probed, 0-based t. everywhere: at every iteration the first K tokens
    and all so far (both readings of claim (a)), and at the last iteration every prefix (claim (b)); else
    only the cells the claims compare (`compared`)."""
    fixed = compared(T)
    iterations, prefixes = [0, *fixed["recurrence"]["iterations"]], fixed["prefix"]["blocks"] + [T]
    if everywhere:
        iterations, prefixes = range(T), range(1, T + 1)
    return sorted({(t, 1) for t in iterations} | {(t, t + 1) for t in iterations} | {(T - 1, j) for j in prefixes})


# What is probed: (source, pooling, at every cell or at the claims' cells alone). The official pooling
# everywhere, for the trained encoder and the untrained control; the other poolings where the claims read
# them (each probe is a convex fit of a fraction of a second).
PROBED = [("trained", "one mean", True), ("trained", "two means", False), ("trained", "latents", False),
          ("untrained", "one mean", True)]


def linear_probes(train: dict, train_labels, test: dict, test_labels, classes: int, N: int, K: int) -> dict:
    """Probe accuracy on the test images per source and pooling (PROBED) and probed cell: {source: {pooling:
    {t + 1: {j*K: accuracy}}}} for the trained encoder and the untrained control; the pooled VQGAN grid beside
    them. Keeps each probe's per-image correctness (key "correct", by (source, pooling, t, j)) for the claims."""
    T = train["blocks"].shape[0]
    tables, correct = {}, {}
    for source, pooling, everywhere in PROBED:
        prefix, table = "control_" if source == "untrained" else "", {}
        scored = test_labels[:test[prefix + "image"].shape[1]]  # the control may score the first test images
        for t, j in probed_cells(T, everywhere):
            features = [pooled_features(x[prefix + "image"], x[prefix + "blocks"], t, j, pooling, N, K)
                        for x in (train, test)]
            hit = probe_correct(features[0], train_labels, features[1], scored, classes)
            correct[source, pooling, t, j] = hit
            table.setdefault(t + 1, {})[j * K] = hit.float().mean().item()
        tables.setdefault(source, {})[pooling] = table
    correct["vqgan"] = probe_correct(train["vqgan"], train_labels, test["vqgan"], test_labels, classes)
    tables["vqgan grid"] = correct["vqgan"].float().mean().item()
    tables["chance"] = max(torch.bincount(test_labels, minlength=classes).tolist()) / len(test_labels)
    tables["correct"] = correct
    return tables


def probe_claims(correct: dict, T: int, K: int) -> dict:
    """§A.4's claims per pooling, on the trained encoder, as paired differences in probe accuracy over the
    test images (per image: the mean correctness of the compared probes minus the other's) with their
    standard errors and verdicts, at the fixed comparisons (`compared`): (a) in both readings, against the
    paper's +3.9 points; (b), for which the paper gives no single number."""
    fixed, claims = compared(T), {}
    for pooling in POOLINGS:
        hit = lambda t, j: correct["trained", pooling, t, j].float()  # noqa: E731
        rows = {}
        later = fixed["recurrence"]["iterations"]
        for reading, pooled in (("first K", lambda t: 1), ("all so far", lambda t: t + 1)):  # blocks pooled at t
            if later:
                d = mean_difference(torch.stack([hit(t, pooled(t)) for t in later]).mean(0), hit(0, 1))
                rows[f"recurrence, {reading}"] = {
                    "iterations": [t + 1 for t in later], "against": 1, "tokens": [pooled(t) * K for t in later],
                    **d, "paper": PAPER_RECURRENCE, **verdict(d["difference"], d["se"], paper=PAPER_RECURRENCE)}
        prefixes = fixed["prefix"]["blocks"]
        d = mean_difference(torch.stack([hit(T - 1, j) for j in prefixes]).mean(0), hit(T - 1, T))
        rows["prefix"] = {"iteration": T, "tokens": [j * K for j in prefixes], "against": T * K, **d,
                          "paper": None, **verdict(d["difference"], d["se"])}
        claims[pooling] = rows
    return claims


def analyse(model, control, probe_set: ProbeImages, args, device, out) -> dict:
    """The probes fit on the training images' features and scored on the test images', their claims with
    the standard error each reaches against SE_TARGET, and probe.png."""
    mc = model.config
    N, K, T = mc.num_image_tokens, mc.tokens_per_iter, mc.rollout_iters
    train, train_labels = probe_features(model, control, probe_set.data, probe_set.indices, args, device,
                                         "probe train features")
    control_images = -(-len(probe_set.test_indices) // CONTROL_SHARE)
    test, test_labels = probe_features(model, control, probe_set.test_data, probe_set.test_indices, args, device,
                                       "probe test features", control_images)
    probes = linear_probes(train, train_labels, test, test_labels, probe_set.classes, N, K)
    claims = probe_claims(probes.pop("correct"), T, K)
    largest = max(row["se"] for row in claims["one mean"].values())
    result = {"label": probe_set.label, "classes": probe_set.classes, "train_images": len(probe_set.indices),
              "test_images": len(test_labels), "test_classes": len(test_labels.unique()),
              "control_test_images": control_images, "poolings": POOLINGS,
              "compared": "(a) iterations 2 and 3 averaged against iteration 1; (b) at the last iteration, the "
                          "first quarter and the first half of the tokens averaged against all: fixed before "
                          "the test scores (probes.compared)", **probes, "claims": claims,
              "se_target": SE_TARGET, "largest_se": largest, "se_target_met": largest <= SE_TARGET}
    plot_probe(out / "probe.png", result, mc.token_counts)
    return {"linear_probe": result}
