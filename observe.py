"""What the analyses observe of a trained ALIT: the analysed images and their labels, one rollout per
batch with its attention and encoder outputs recorded, and the reconstruction errors every selection reads.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1): §2 (the rollout: T iterations, K new latent
tokens each), read by Fig. 3 and Tab. 2 (the decoder's attention at the paper's layer; the last encoder
layer's, which binding reads), §A.4 (the encoder's output), §3 and §A.2 (the reconstruction at every
token count). analyze.py makes one pass over the images (`batches`); each analysis keeps what it needs
of every `Batch`.

Attention weights have rows as queries: weights[b, i, j] is how much token i attends to token j, over
the encoder's sequence [class; N 2D image tokens; t*K latent tokens], or the decoder's [class; N mask
tokens (the 2D queries); t*K latent tokens].
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data import LEVELS, SceneItem, ShapesDataset, majority_pool
from model import ALIT

# -----------------------------------------------------------------------------
# The analysed images and their labels

LABELS = {  # what the classifier of the task of interest predicts, all known to the shapes generator
    "level": "the complexity level (data.LEVELS: how many shapes, how large, how often textured)",
    "shapes": "the number of shapes drawn",
}


def num_classes(label: str) -> int:
    return len(LEVELS) if label == "level" else LEVELS[-1].objects[1]


def class_of(label: str, level: int, num_shapes: int) -> int:
    return level if label == "level" else num_shapes - 1


def label_of(item, label: str) -> int:
    """A dataset item's class: on shapes (a SceneItem) --label of the scene; on photos the image's
    class, which §A.4 probes."""
    return class_of(label, item.level, item.num_shapes) if isinstance(item, SceneItem) else item[1]


def items_of(dataset, indices) -> list:
    """The items at `indices`: shapes scenes with their masks, levels and depth; photos as (image, class)."""
    return [dataset.with_masks(i) if isinstance(dataset, ShapesDataset) else dataset[i] for i in indices]


def token_labels(masks, patch_size: int) -> np.ndarray:
    """(B, S, S) pixel labels -> (B, N): each 2D token's segment, the one covering most of its patch."""
    return np.stack([majority_pool(m.numpy(), patch_size).reshape(-1) for m in masks])


# -----------------------------------------------------------------------------
# Recording a rollout

@contextlib.contextmanager
def encoder_outputs(model: ALIT):
    """Collects the output of every pass of model.encoder while the block runs: one (B, L, D)
    tensor per iteration of the rollout, the sequence §A.4 mean pools."""
    outputs = []
    handle = model.encoder.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    try:
        yield outputs
    finally:
        handle.remove()


@contextlib.contextmanager
def attention_weights(model: ALIT):
    """Collects the last encoder layer's attention weights (the paper's maps) while the block runs, one
    (B, heads, L, L) tensor per pass. Recording takes the math path instead of SDPA's fused kernels
    (model.Attention.record)."""
    attention = model.encoder[-1].attn
    attention.record = []
    try:
        yield attention.record
    finally:
        attention.record = None


def map_layer(layer: int | None, config) -> int:
    """--map-layer (1-based, None: the default) -> the 0-based index of the decoder block whose attention
    gives Tab. 2's and Fig. 3's maps: the second to last, as the paper's "7th layer of Ours-S
    distillation-decoder" (§4, Analyzing Learned Tokens for Object Discovery; 8 layers), and the last
    of a one-layer decoder (the tiny preset's)."""
    layers = config.decoder_layers
    layer = max(1, layers - 1) if layer is None else layer
    if not 1 <= layer <= layers:
        raise ValueError(f"--map-layer {layer}: the decoder has layers 1 to {layers}")
    return layer - 1


class QueryColumns(list):
    """What a decoder block's attention record keeps of each (B, h, L, L) call over the decoder's sequence
    [class; N mask tokens (the 2D queries); t*K latent tokens]: the rows of the 2D queries and the
    columns of the latent tokens, (B, h, N, t*K); column k is latent token k's map over the 2D cells.
    The official notebook (token_visualization.ipynb) indexes column 256 + idx, one column short of
    latent token idx's, 257 + idx (1 + N + idx): we take the latent tokens' own columns."""

    def __init__(self, num_image_tokens: int):
        super().__init__()
        self.N = num_image_tokens

    def append(self, weights):
        super().append(weights[:, :, 1:1 + self.N, 1 + self.N:].float())


@contextlib.contextmanager
def decoder_attention(model: ALIT, layer: int):
    """Collects the 2D queries' attention to the latent tokens at decoder block `layer` (0-based) while
    the block runs: one (B, heads, N, t*K) tensor per decoded iteration (QueryColumns), as
    attention_weights does for the encoder."""
    attention = model.decoder[layer].attn
    attention.record = QueryColumns(model.config.num_image_tokens)
    try:
        yield attention.record
    finally:
        attention.record = None


def one_pass(model: ALIT, images):
    """The fixed-length baseline: the encoder run once over [2D image tokens; all T*K latent tokens],
    the sequence the rollout reaches at its last iteration but without the recurrence. The weights
    were never trained on it: it asks what the same tokens bind to when they are not added in turn."""
    T = model.config.rollout_iters
    tokens = [model.image_tokens(images, model.base_tokens(images))]
    tokens += [model.new_latent_tokens(t, len(images)) for t in range(T)]
    return model.encoder(model.encoder_ln_pre(torch.cat(tokens, dim=1)))


def untrained_control(model: ALIT, seed: int) -> ALIT:
    """An ALIT of the same size that never trained (§A.4's and Tab. 2's control), on the trained base:
    it asks what the architecture gives before training. The official initialisation, residuals not
    zeroed, so that its passes do mix the tokens (zeroed, every pass would be the identity)."""
    torch.manual_seed(seed)
    config = dataclasses.replace(model.config, zero_init_encoder_residuals=False)
    control = ALIT(config).to(next(model.parameters()).device).eval()
    control.base.load_state_dict(model.base.state_dict())
    return control


def heads_averaged(record: list) -> list:
    """Recorded weights (B, heads, L, L) -> (B, L, L) each, the mean over heads (as the paper's maps)."""
    return [w.float().mean(1) for w in record]


# -----------------------------------------------------------------------------
# The pass over the images

@dataclass
class Batch:
    """A batch of the analysed images and what one recorded rollout made of them."""
    index: list  # the images' indices in the dataset
    items: list  # SceneItem on shapes (masks, level, depth), (image, class) on photos
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    tokens_2d: torch.Tensor  # (B, C, g, g) the base's 2D tokens
    targets: torch.Tensor  # what the decoder predicts of them: (B, N) VQGAN indices or (B, N, C) VAE vectors
    records: list  # T model.Iteration, one per token count
    recon: torch.Tensor  # (T, B, 3, H, W) the reconstruction at every token count, in [0, 1]
    weights: list  # T x (B, 1+N+tK, 1+N+tK) the last encoder layer's attention, mean over heads
    one_pass: torch.Tensor  # (B, 1+N+TK, 1+N+TK) the same in the fixed-length pass (one_pass)
    passes: list  # T x (B, 1+N+tK, D) the encoder's output at every iteration
    control_weights: list | None  # the untrained control's attention, as `weights` (None without a control)
    control_passes: list | None  # and its encoder outputs, as `passes`
    # T x (B, heads, N, t*K): the 2D queries' attention to each latent token at decoder block --map-layer
    # (decoder_attention), the maps of Tab. 2 and Fig. 3, 11; the control's at its last iteration only
    decoder_maps: list | None = None
    control_decoder_maps: list | None = None


@torch.no_grad()
def observe_batch(model: ALIT, control: ALIT | None, items: list, index: list, device,
                  layer: int | None = None) -> Batch:
    """The rollout of `model` over the images of `items`, recorded, its decoder's maps at block `layer`
    (0-based; None: map_layer's default); the untrained `control`'s too (it decodes its last iteration only)."""
    layer = map_layer(None, model.config) if layer is None else layer
    images = torch.stack([item[0] for item in items]).to(device)
    tokens_2d = model.base_tokens(images)
    with (attention_weights(model) as record, encoder_outputs(model) as passes,
          decoder_attention(model, layer) as decoder_maps):
        records = model(images, tokens_2d, reconstruct=True)
    weights = heads_averaged(record)  # T x (B, 1+N+tK, 1+N+tK)
    with attention_weights(model) as record:
        one_pass(model, images)
    fixed = heads_averaged(record)[0]
    control_weights = control_passes = control_decoder_maps = None
    if control is not None:
        with (attention_weights(control) as record, encoder_outputs(control) as control_passes,
              decoder_attention(control, layer) as control_decoder_maps):
            control(images, iters=[control.config.rollout_iters - 1])
        control_weights = heads_averaged(record)
    recon = torch.stack([r.recon.float().clamp(0, 1) for r in records])  # (T, B, 3, H, W)
    return Batch(index, items, images, tokens_2d, model.base_targets(tokens_2d), records, recon, weights, fixed,
                 passes, control_weights, control_passes, list(decoder_maps),
                 list(control_decoder_maps) if control is not None else None)


def batches(model: ALIT, control: ALIT | None, dataset, n: int, batch_size: int, device, layer: int | None = None):
    """The first n images of `dataset`, observed batch by batch; the decoder's maps at block `layer`."""
    for start in tqdm(range(0, n, batch_size), desc="analyze", dynamic_ncols=True):
        index = list(range(start, min(n, start + batch_size)))
        yield observe_batch(model, control, items_of(dataset, index), index, device, layer)


# -----------------------------------------------------------------------------
# The reconstruction errors (complexity, selection and familiarity read them)

def base_l1(model: ALIT, images, tokens_2d=None):
    """(B,) the L1 of the 2D tokenizer alone: the VQGAN's decoding of its own codes (or the VAE's of its
    tokens), the floor the adaptive tokens reconstruct from (an unseen colour has no code)."""
    tokens_2d = model.base_tokens(images) if tokens_2d is None else tokens_2d
    return (model.base.reconstruct(tokens_2d).float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3))


class Reconstructions:
    """Per image and token count: L1, MSE and token accuracy (over a VAE: the fraction of 2D tokens within
    halting's tolerance), the L1 of the base alone, the level on shapes, and with an Inception the
    features of the originals and of every reconstruction (FID)."""

    def __init__(self, model: ALIT, inception=None):
        self.model, self.inception = model, inception
        self.tables = {key: [] for key in ("l1", "mse", "token_acc", "vqgan_l1", "level", "features", "real_features")}

    def add(self, batch: Batch):
        images, recon, model, tables = batch.images, batch.recon, self.model, self.tables
        tables["l1"].append((recon - images).abs().mean(dim=(2, 3, 4)).cpu())  # (T, B)
        tables["mse"].append((recon - images).square().mean(dim=(2, 3, 4)).cpu())
        tables["token_acc"].append(torch.stack([model.base.correct_cells(r.prediction, batch.targets, model.config)
                                                .float().mean(1) for r in batch.records]).cpu())
        tables["vqgan_l1"].append(base_l1(model, images, batch.tokens_2d).cpu())
        if isinstance(batch.items[0], SceneItem):
            tables["level"].append(torch.tensor([item.level for item in batch.items]))
        if self.inception is not None:
            tables["real_features"].append(self.inception(images).cpu())
            tables["features"].append(self.inception(recon.flatten(0, 1)).view(len(recon), len(images), -1).cpu())

    def result(self) -> dict:
        """{name: (T, n) per token count, (n,) per image; features (T, n, F), real_features (n, F)}."""
        axis = {"features": 1, "real_features": 0}
        return {k: torch.cat(v, dim=axis.get(k, -1)) for k, v in self.tables.items() if v}
