"""Linear probing (§A.4): a linear classifier on the mean-pooled encoder output per iteration and per
prefix of latent tokens, against the pooled grid of the 2D tokenizer, an untrained ALIT and chance.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §A.4 (linear probing of the encoder's output,
mean pooled; the first tokens after a few iterations probe better than after one, and a prefix of the
tokens better than all of them). Of a shapes label (--label), or of the class on photos with classes
(imagenet100, imagenet), as §A.4 does on ImageNet-100; fit on train-split images, scored on the analysed ones.
"""
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import ShapesDataset, build_dataset, class_names
from observe import LABELS, encoder_outputs, items_of, label_of, num_classes
from plots import plot_probe
from verdicts import holds, mean_difference

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


def prefix_features(image: torch.Tensor, blocks: torch.Tensor, t: int, j: int, with_image: bool) -> torch.Tensor:
    """(B, D or 2D): the mean of the first j*K latent tokens at iteration t (0-based), beside the mean
    of the 2D image tokens when with_image (§A.4 pools both; concatenated so neither drowns the other)."""
    latents = blocks[t, :j].mean(0)
    return torch.cat([image[t], latents], dim=-1) if with_image else latents


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
    """The linear probes' training images: `indices` of the train split `data`, labelled with one of
    `classes` classes, which `label` names."""
    data: object
    indices: list
    classes: int
    label: str


def probe_images(args, image_size: int) -> tuple:
    """Where §A.4's probes train: (ProbeImages, None), or (None, why there is no probe). On shapes
    --probe-images train-split scenes, labelled by --label. On photos with classes, as §A.4 on
    ImageNet-100: the class of --probe-images train-split images spread evenly over the classes, read
    as the analysed images are (the evaluation transform, no augmentation: one fixed view of each
    image, like the test images)."""
    if args.dataset == "shapes":
        data = ShapesDataset("train", image_size, args.probe_images, seed=args.seed)
        return ProbeImages(data, list(range(len(data))), num_classes(args.label), LABELS[args.label]), None
    if args.dataset == "folder":
        return None, "no classes either, so no linear probe"
    try:
        classes = class_names(args.dataset, "train", args.data_dir)
        data = build_dataset(args.dataset, "train", image_size, args.data_dir, train=False, eval_protocol=args.protocol)
    except (ValueError, FileNotFoundError) as error:
        return None, f"no linear probe, it trains on the train split ({error})"
    if classes != class_names(args.dataset, args.split, args.data_dir):  # targets are folder indices
        return None, f"no linear probe: the class folders of train/ and {args.split}/ differ"
    return ProbeImages(data, class_balanced(data.targets, args.probe_images), len(classes),
                       "the image's class"), None


class ProbeFeatures:
    """The probes' features of a batch: the pooled encoder outputs of the trained model and of the untrained
    control (pooled_blocks), the pooled grid of the 2D tokenizer (the VQGAN's codes, or the VAE's tokens),
    and the labels. Gathered from the analysed images' pass (the test set), or by `add_images`."""

    def __init__(self, model, label: str):
        self.model, self.label = model, label
        self.features = {name: [] for name in ("image", "blocks", "control_image", "control_blocks", "vqgan")}
        self.labels = []

    def add_pooled(self, passes: list, control_passes: list, grid, items: list):
        """passes, control_passes: T x (B, L, D) encoder outputs; grid (B, C, g, g); items: the images' items."""
        N, K = self.model.config.num_image_tokens, self.model.config.tokens_per_iter
        for name, outputs in (("", passes), ("control_", control_passes)):
            image, blocks = pooled_blocks(outputs, N, K)
            self.features[name + "image"].append(image)
            self.features[name + "blocks"].append(blocks)
        self.features["vqgan"].append(grid.float().mean((2, 3)).cpu())  # (B, C)
        self.labels.append(torch.tensor([label_of(item, self.label) for item in items]))

    def add(self, batch):
        self.add_pooled(batch.passes, batch.control_passes, self.model.base.code_grid(batch.tokens_2d), batch.items)

    @torch.no_grad()
    def add_images(self, control, items: list, device):
        """The same features of dataset items, each network rolled out to its last iteration."""
        images = torch.stack([item[0] for item in items]).to(device)
        passes = {}
        for name, net in (("", self.model), ("control_", control)):
            with encoder_outputs(net) as passes[name]:
                net(images, iters=[net.config.rollout_iters - 1])
        self.add_pooled(passes[""], passes["control_"], self.model.base.code_grid(self.model.base_tokens(images)),
                        items)

    def result(self) -> tuple:
        """({name: images along the axis before D}, (n,) labels)."""
        return {k: torch.cat(v, dim=-2) for k, v in self.features.items()}, torch.cat(self.labels)


def probe_training_set(model, control, probe_set: ProbeImages, args, device) -> tuple:
    """ProbeFeatures of the probe's training images, with their labels."""
    features = ProbeFeatures(model, args.label)
    for start in tqdm(range(0, len(probe_set.indices), args.batch_size), desc="probe features", dynamic_ncols=True):
        features.add_images(control, items_of(probe_set.data, probe_set.indices[start:start + args.batch_size]), device)
    return features.result()


# -----------------------------------------------------------------------------
# The probes per iteration and prefix, and §A.4's claims

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
                    features = [prefix_features(x[prefix + "image"], x[prefix + "blocks"], t, j, with_image)
                                for x in (train, test)]
                    hit = probe_correct(features[0], train_labels, features[1], test_labels, classes)
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
                                         "holds": holds(recurrence["difference"], recurrence["se"])},
                          "prefix": {"tokens": best * K, "of": T * K, **prefix,
                                     "holds": holds(prefix["difference"], prefix["se"])}}
    return claims


def analyse(model, control, probe_set: ProbeImages, test: tuple, args, device, out) -> dict:
    """The probes fit on the training images' features and scored on the analysed images' (`test`:
    ProbeFeatures.result()), their claims, and probe.png."""
    K, T, counts = model.config.tokens_per_iter, model.config.rollout_iters, model.config.token_counts
    train, train_labels = probe_training_set(model, control, probe_set, args, device)
    test_features, test_labels = test
    probes = linear_probes(train, train_labels, test_features, test_labels, probe_set.classes, K)
    probes["claims"] = probe_claims(probes, T, K)
    probes.pop("correct")
    result = {"label": probe_set.label, "classes": probe_set.classes, "train_images": len(probe_set.indices),
              "test_images": len(test_labels), "test_classes": len(test_labels.unique()), **probes}
    plot_probe(out / "probe.png", result, counts)
    return {"linear_probe": result}
