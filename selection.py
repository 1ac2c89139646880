"""Token selection: which token count each image gets, and what a selection gives.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393, §A.2 "Representational capacity
depends on downstream task" and Fig. 6-9.

A token-selection criterion says, per image, whether a reconstruction is good enough; the
adaptive encoding gives each image the fewest tokens that pass: model.encode_adaptive with
early exit, or first_passing over a table of every token count. Users can plug in their own:
the paper also selects by classification and depth error; analyze.py adds a classifier and a
depth regressor trained on `shapes`. evaluate.py and analyze.py both select with these.
"""
import torch


def l1_below(threshold: float):
    """Pixel criterion, the paper's self-supervised one: mean |x - x̂| < threshold (0.07 in the
    official code's encode)."""
    def criterion(images, reconstructions):  # (B, 3, H, W) each -> (B,) bool
        return (reconstructions.float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)) < threshold
    criterion.__name__ = f"l1<{threshold:g}"
    return criterion


def token_accuracy_above(threshold: float):
    """Token-space criterion (needs no pixel decoding): the fraction of 2D tokens whose VQGAN
    index the decoder predicts correctly is at least `threshold`."""
    def criterion(gt_indices, logits):  # (B, N), (B, N, codes) -> (B,) bool
        return (logits.argmax(-1) == gt_indices).float().mean(1) >= threshold
    criterion.__name__ = f"token_acc>={threshold:g}"
    return criterion


def code_error(targets, prediction, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean squared distance between the decoder's predicted 2D token vectors and the true ones.
    Over a VQGAN, with its codebook (codes, C), e.g. model.vqgan.quantize.codebook(): the expected
    code softmax(logits) @ codebook (what the VQGAN decoder would receive) against codebook[targets]
    (targets (B, N) indices). Over a VAE, without one: the regressed vectors against the VAE's tokens
    (targets (B, N, C))."""
    if codebook is None:
        predicted, true = prediction.float(), targets.float()
    else:
        predicted, true = prediction.float().softmax(-1) @ codebook, codebook[targets]
    return (predicted - true).square().mean(dim=(1, 2))


def code_error_below(threshold: float, codebook: torch.Tensor | None = None):
    """Token-space criterion on a continuous scale (no pixels decoded): code_error < threshold."""
    def criterion(targets, prediction):  # (B, N) indices or (B, N, C) vectors; (B, N, codes or C) -> (B,) bool
        return code_error(targets, prediction, codebook) < threshold
    criterion.__name__ = f"code_mse<{threshold:g}"
    return criterion


def token_score_passes(base, threshold: float):
    """The base tokenizer's own token-space criterion (no pixels decoded): its token_score at or above
    `threshold` where higher is better (a VQGAN's token accuracy), below it where lower is (a VAE's code
    MSE). For model.encode_adaptive(..., token_space=True)."""
    def criterion(targets, prediction):  # (B, N) indices or (B, N, C) vectors; (B, N, codes or C) -> (B,) bool
        score = base.token_score(prediction, targets)
        return score >= threshold if base.higher_score_is_better else score < threshold
    criterion.__name__ = f"{base.token_score_name}{'>=' if base.higher_score_is_better else '<'}{threshold:g}"
    return criterion


def depth_error(depth_net, images, reconstructions) -> torch.Tensor:
    """(B,) mean |depth_net(x̂) - depth_net(x)| over the pixels: the depth estimated on the
    reconstruction against the estimate on the original, the paper's pseudo-ground truth (Fig. 6, 9:
    DepthAnythingV2 on the original images)."""
    with torch.no_grad():
        truth = depth_net(images)
        return (depth_net(reconstructions.float().clamp(0, 1)) - truth).abs().flatten(1).mean(1)


def depth_error_below(threshold: float, depth_net):
    """Depth criterion (Fig. 6 right, Fig. 9): depth_error < threshold, for model.encode_adaptive."""
    def criterion(images, reconstructions):  # (B, 3, H, W) each -> (B,) bool
        return depth_error(depth_net, images, reconstructions) < threshold
    criterion.__name__ = f"depth<{threshold:g}"
    return criterion


def first_passing(passes: torch.Tensor) -> torch.Tensor:
    """(T, B) bool -> (B,) index of the first iteration that passes, T - 1 if none does."""
    T = passes.shape[0]
    order = torch.where(passes, torch.arange(T, device=passes.device)[:, None], T - 1)
    return order.min(0).values


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


# The default pixel criterion per model size (evaluate.py, analyze.py): the official encode's L1 threshold
# at 256x256; below that, on `shapes`, 0.04 or within 3% of the longest code's L1 (docs/faithfulness.md).
DEFAULT_CRITERION_OFFICIAL = dict(thresholds="0.03,0.05,0.07,0.1,0.15", default_threshold=0.07, saturation=0.0)
DEFAULT_CRITERION_CPU = dict(thresholds="0.03,0.04,0.05,0.07", default_threshold=0.04, saturation=0.03)


def l1_passes(l1: torch.Tensor, threshold: float, saturation: float = 0.0) -> torch.Tensor:
    """(T, B) L1 of every token count -> (T, B) pass table of the pixel criterion: L1 < threshold
    (the paper), or, with saturation > 0, L1 within that fraction of the image's L1 at the longest
    code: more tokens would not help this image, so it stops even short of the threshold."""
    passes = l1 < threshold
    return passes | (l1 <= (1 + saturation) * l1[-1:]) if saturation > 0 else passes
