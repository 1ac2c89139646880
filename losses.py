"""The losses the method trains with: stage 1's, on the base tokenizer's tokens, and the perceptual and
adversarial losses train_vqgan.py and train_stage2.py share.

Paper: ALIT, arXiv:2411.02393, §A.5 "Training Details": stage 1 uses "image token
reconstruction loss ... cross-entropy loss comparing predicted logits with the
ground-truth VQGAN-codebook index at each 2D token position" (over a VAE, "mean-square
reconstruction loss"). The full fine-tuning stage trains with "pixel-level reconstruction and
adversarial losses (gan generator and discriminator losses) inspired from VQGAN (Esser et al.,
2020)", reconstruction only for the first epochs, then both. Those VQGAN losses are
- LPIPS (Zhang et al. 2018), the perceptual part of VQGAN's L_rec;
- a PatchGAN discriminator (pix2pix, Isola et al. 2017) with the hinge loss;
- the adaptive GAN weight λ of VQGAN (Esser et al. 2021, Eq. 7).
This file holds the pieces, each stage script composes them; the discriminator's update
(discriminator_step) runs outside DDP.

Every image in and out of this file is float (N, 3, H, W) in [0, 1]. Each network
converts to the range it was trained on inside its forward, in one place.
"""
import contextlib
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from quantize import exact_float32
from weights import perceptual_missing, read_weights, source_name

# -----------------------------------------------------------------------------
# Stage 1: the base tokenizer's 2D tokens, predicted at every iteration


# Per-iteration weights λ_t of the token loss (official code, not in the paper): the first, shortest codes
# carry the most information per token, so they are weighted up.
OFFICIAL_ITERATION_WEIGHTS = "2.5,2.0,1.5,1.25,1.0,1.0,1.0,1.0"


def iteration_weights(text: str, iters: int) -> list:
    """λ_1..λ_T from the comma-separated text of --iteration-weights, padded with 1."""
    weights = [float(w) for w in text.split(",")]
    return (weights + [1.0] * iters)[:iters]


def base_targets(base, images) -> tuple:
    """What stage 1 distils, from the frozen base: its 2D tokens and targets of `images` (a VAE's: a fresh
    posterior sample), in float32 whatever the autocast and the nearest code in exact float32, so that bf16
    and float32 runs distil the same targets. (On Ampere+ GPUs the convolutions stay TF32, as cuDNN runs
    them by default: exact float32 would make the encoder, 3% of a step's FLOPs, a fifth of its time.)"""
    with torch.no_grad(), exact_float32(images.device.type):
        return base.encode(images.float(), sample=True)


def stage1_loss(model, images, *, iteration_weights, forward=None, halting=True, iters=None,
                label_smoothing=0.0, code_weight=1.0, quantizer_weight=1.0, generator=None):
    """Stage 1's forward and loss (§A.5), the base frozen: the rollout over `images` with halting, and
    Σ_t [λ_t token loss_t + its unweighted part + quantizer loss_t] over the decoded iterations (`iters`,
    default all). Over a VQGAN the token loss is the cross-entropy against the base's indices (§A.5) and
    the unweighted part the MSE of the expected code (official code); over a VAE the MSE of the predicted
    tokens (base.token_loss). λ_t = iteration_weights[t]; the quantizer's codebook and commitment terms
    count at every iteration, unweighted. `forward` is the module to call (the DDP wrapper in training;
    default `model`).

    Returns the loss, a (iterations, 3) tensor of [token loss, token accuracy (VAE: mean absolute error),
    1] rows for the decoded iterations (zeros elsewhere, so that sums over steps and ranks average
    right), and the rollout's records."""
    tokens, targets = base_targets(model.base, images)
    records = (forward or model)(images, tokens, targets, halting=halting, iters=iters, generator=generator)
    loss, stats = stage1_terms(model, records, targets, iteration_weights=iteration_weights,
                               label_smoothing=label_smoothing, code_weight=code_weight,
                               quantizer_weight=quantizer_weight)
    return loss, stats, records


def stage1_terms(model, records, targets, *, iteration_weights, label_smoothing=0.0, code_weight=1.0,
                 quantizer_weight=1.0):
    """stage1_loss's sum over the decoded iterations `records`, against the base's `targets`: (the loss,
    the (iterations, 3) statistics)."""
    total = 0.0
    stats = torch.zeros(model.config.rollout_iters, 3, device=targets.device)
    for r in records:
        weighted, unweighted, logged = model.base.token_loss(r.prediction, targets, label_smoothing=label_smoothing,
                                                            code_weight=code_weight)
        total = total + iteration_weights[r.index] * weighted
        if unweighted is not None:
            total = total + unweighted
        if r.quantized is not None:
            total = total + quantizer_weight * r.quantized.loss
        stats[r.index] = torch.cat([logged, torch.ones_like(logged[:1])])
    return total, stats


# -----------------------------------------------------------------------------
# LPIPS

# torchvision `vgg16().features` index of each 3x3 conv, grouped in the five VGG16
# blocks. LPIPS reads the last ReLU of each block (relu1_2, relu2_2, relu3_3,
# relu4_3, relu5_3); a 2x2 max pool opens blocks 2-5.
VGG16_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_BLOCK_WIDTHS = (64, 128, 256, 512, 512)

# Keys the files hold that LPIPS does not use, dropped by name whatever their shape.
DROPPED_PREFIXES = (
    "classifier.",  # torchvision vgg16: the ImageNet classifier
    "scaling_layer.",  # combined layout: the fixed shift/scale below, not learned
    "lins.",  # lpips package state_dict(): an nn.ModuleList aliasing lin0..lin4
)


def lpips_key_table():
    """Our key -> (key in the two-file layout, key in the combined layout).

    Two-file layout: torchvision's vgg16-397923af.pth (features.<i>.weight/bias)
    and the lpips package's weights/v0.1/vgg.pth (lin<b>.model.1.weight, (1,C,1,1);
    taming's vgg_lpips download "vgg.pth" has the same keys).
    Combined layout: the state dict of taming's or the lpips package's LPIPS module
    (net.slice<b+1>.<i>.weight/bias, lin<b>.model.1.weight), as stored in the official
    ALIT checkpoint under gan_losses.<t>.perceptual_loss. (strip that prefix first).
    The heads were saved behind an nn.Dropout at model.0, hence model.1.
    """
    table = {}
    for block, conv_indices in enumerate(VGG16_CONV_INDICES):
        for position, index in enumerate(conv_indices):
            for param in ("weight", "bias"):
                table[f"vgg.{block}.{position}.{param}"] = (
                    f"features.{index}.{param}", f"net.slice{block + 1}.{index}.{param}")
        table[f"heads.{block}.weight"] = (f"lin{block}.model.1.weight",) * 2
    return table


class LPIPS(nn.Module):
    """LPIPS perceptual distance with VGG16 features (Zhang et al. 2018), frozen."""

    def __init__(self):
        super().__init__()
        self.vgg = nn.ModuleList()  # vgg[block][position]: the 3x3 convs, each followed by a ReLU
        in_width = 3
        for width, conv_indices in zip(VGG16_BLOCK_WIDTHS, VGG16_CONV_INDICES):
            convs = nn.ModuleList()
            for _ in conv_indices:
                convs.append(nn.Conv2d(in_width, width, 3, padding=1))
                in_width = width
            self.vgg.append(convs)
        # The learned per-channel weights of the distance ("lin" layers in LPIPS). The
        # original puts an nn.Dropout before each; it is the identity in eval mode,
        # which is the only mode LPIPS runs in as a loss, so it is left out.
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in VGG16_BLOCK_WIDTHS)
        # LPIPS's ScalingLayer: ImageNet mean/std re-expressed for [-1, 1] inputs
        # (-0.030 = 2*0.485-1, 0.458 = 2*0.229, ...). Constants, so not saved.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def to_vgg_input(self, images):
        # LPIPS was calibrated on [-1, 1] images. (The official ALIT code hands its [0, 1]
        # images to taming's LPIPS unconverted, adaptive_vqgan.py forward_gan_losses;
        # we follow LPIPS.)
        return (images * 2 - 1 - self.shift) / self.scale

    def vgg_features(self, x):
        features = []
        for block, convs in enumerate(self.vgg):
            if block > 0:
                x = F.max_pool2d(x, 2)
            for conv in convs:
                x = F.relu(conv(x))
            features.append(x)  # (N, C_block, H / 2^block, W / 2^block)
        return features

    def forward(self, x, y):
        """x, y: (N, 3, H, W) in [0, 1] -> (N,) distance, 0 for identical images."""
        n = x.shape[0]
        features = self.vgg_features(self.to_vgg_input(torch.cat([x, y])))  # one pass for both
        distance = x.new_zeros(n)
        for feature, head in zip(features, self.heads):
            # Unit length along channels makes every layer's contribution scale-free.
            feature = feature / (feature.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            squared_difference = (feature[:n] - feature[n:]).square()  # (N, C, h, w)
            distance = distance + head(squared_difference).mean(dim=(1, 2, 3))
        return distance

    @classmethod
    def from_pretrained(cls, vgg16_path_or_state_dict, lpips_head_path_or_state_dict=None):
        """Two sources (torchvision vgg16 + lpips head), or one combined LPIPS-module
        state dict when the second argument is None. See lpips_key_table."""
        model = cls()
        table = lpips_key_table()
        params = dict(model.named_parameters())
        assert table.keys() == params.keys(), "lpips_key_table is out of date with LPIPS"
        if lpips_head_path_or_state_dict is None:
            sources = [(vgg16_path_or_state_dict, {ours: combined for ours, (_, combined) in table.items()})]
        else:
            sources = [
                (vgg16_path_or_state_dict, {ours: two[0] for ours, two in table.items() if ours.startswith("vgg.")}),
                (lpips_head_path_or_state_dict,
                 {ours: two[0] for ours, two in table.items() if ours.startswith("heads.")}),
            ]
        for source, key_map in sources:
            name, state = source_name(source), read_weights(source)
            state = {key: value for key, value in state.items() if not key.startswith(DROPPED_PREFIXES)}
            expected = set(key_map.values())
            missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
            if missing or unexpected:
                raise ValueError(f"{name}: missing keys {missing}, unexpected keys {unexpected}")
            for ours, theirs in key_map.items():
                if state[theirs].shape != params[ours].shape:
                    raise ValueError(f"{name}: {theirs} has shape {tuple(state[theirs].shape)}, "
                                     f"expected {tuple(params[ours].shape)}")
                with torch.no_grad():
                    params[ours].copy_(state[theirs])
        return model


def load_perceptual(vgg16_weights, lpips_weights, device, log):
    """LPIPS from the files --vgg16-weights/--lpips-weights name, or None when none are given: training
    then runs without it. Files of another kind end the run with one line naming the flags."""
    if not vgg16_weights:
        log(f"no --vgg16-weights/--lpips-weights given: training without the perceptual (LPIPS) loss; "
            f"{perceptual_missing()}")
        return None
    try:
        return LPIPS.from_pretrained(vgg16_weights, lpips_weights).to(device)
    except (KeyError, ValueError, RuntimeError) as error:
        sys.exit(f"error: --vgg16-weights/--lpips-weights: {error.args[0]}")


def reconstruction_loss(recon, images, perceptual, l1_weight, perceptual_weight):
    """VQGAN's L_rec, the pixel-level reconstruction loss of §A.5: L1, plus LPIPS when loaded."""
    loss = l1_weight * (recon - images).abs().mean()
    if perceptual is not None:
        loss = loss + perceptual_weight * perceptual(recon, images).mean()
    return loss

# -----------------------------------------------------------------------------
# PatchGAN discriminator and the VQGAN adversarial losses


def init_like_taming(module):
    # taming's weights_init (DCGAN practice): conv weights N(0, 0.02), BatchNorm gains
    # N(1, 0.02) and zero shifts. Conv biases keep PyTorch's default, as in taming.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix NLayerDiscriminator) as used by taming VQGAN.

    Each output logit judges one overlapping patch (70x70 pixels for num_layers=3),
    so the loss pushes local texture towards realism and leaves global structure to
    the reconstruction losses (Isola et al. 2017; Esser et al. 2021 §3.1).
    Images enter in [0, 1] and are mapped to [-1, 1], the range taming trains it on.
    BatchNorm normalises each call's batch: real and fake go through separate calls,
    as in taming. Under DDP each rank uses its local batch unless the training
    script converts to SyncBatchNorm.
    """

    def __init__(self, in_channels=3, base_channels=64, num_layers=3):
        super().__init__()
        widths = [base_channels * min(2 ** n, 8) for n in range(num_layers + 1)]
        layers = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(widths[n]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        # Named `main` with taming's layer order, so taming / official ALIT discriminator
        # state dicts (gan_losses.<t>.discriminator.main.*) load without a key map.
        self.main = nn.Sequential(*layers)
        self.apply(init_like_taming)

    def forward(self, images):
        return self.main(images * 2 - 1)  # (N, 1, h, w) logits; 256x256 -> 30x30


def hinge_d_loss(logits_real, logits_fake):
    # Zero once real logits >= 1 and fake logits <= -1: confident patches stop pushing.
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_adversarial_loss(logits_fake):
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss, g_loss, last_layer_weight, max_weight=1e4):
    """VQGAN Eq. 7: λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + δ), with G_L the
    decoder's last layer. It balances the two losses where they meet the image.

    Call with the generator graph alive; the graph is kept for the backward pass.
    δ = 1e-4 and the clamp follow taming's code (the paper writes δ = 1e-6).
    """
    nll_grad, = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def discriminator_step(discriminator, optimizer, images, recon, precision=contextlib.nullcontext()):
    """One hinge-loss update (losses.hinge_d_loss) on real images vs the (detached) reconstructions,
    under `precision` (the training script's autocast). With gradient accumulation `images` and `recon`
    are lists of micro-batches: each goes through on its own, their mean loss makes the one update.

    The gradients are averaged across ranks by hand: two forward passes per step (real, fake)
    keep the BatchNorm statistics of real and fake batches apart, as in taming, which DDP's
    one-backward-per-forward bookkeeping does not allow.
    """
    if torch.is_tensor(images):
        images, recon = [images], [recon]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for real, fake in zip(images, recon):
        with precision:
            loss = hinge_d_loss(discriminator(real), discriminator(fake.detach())) / len(images)
        loss.backward()
        total = total + loss.detach()
    average_gradients(discriminator.parameters())
    optimizer.step()
    return total


def average_gradients(parameters):
    """The parameters' gradients averaged over the DDP ranks (the sum over ranks, divided by their number),
    for a module trained outside DDP, in one all-reduce of them all flattened (across nodes a message
    each costs its latency); nothing to do in one process."""
    if dist.is_available() and dist.is_initialized():
        grads = [p.grad for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(averaged.view_as(grad))


def gan_weight_at(step: int, schedule) -> float:
    """The adversarial term's weight at `step`: 0 before the schedule's first (first_step, weight) pair,
    then the weight of the last pair reached. The discriminator joins after the reconstruction-only
    warm-up of §A.5 (taming's adopt_weight is one pair; stage 2 raises the weight in steps)."""
    weight = 0.0
    for first_step, value in schedule:
        if step >= first_step:
            weight = value
    return weight


def generator_gan_loss(discriminator, recon, rec_loss, last_layer, disc_weight):
    """The generator's adversarial term, weighted adaptively (VQGAN eq. 7): the ratio of the
    reconstruction and GAN gradient norms at the decoder's last layer, times disc_weight."""
    discriminator.requires_grad_(False)  # trained in its own step; no grads from the generator's loss
    g_loss = generator_adversarial_loss(discriminator(recon))
    discriminator.requires_grad_(True)
    return disc_weight * adaptive_gan_weight(rec_loss, g_loss, last_layer) * g_loss
