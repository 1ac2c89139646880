"""Datasets: every image source the training and evaluation scripts accept.

Paper: "Adaptive Length Image Tokenization via Recurrent Allocation" (ALIT),
Duggal, Isola, Torralba, Freeman, arXiv:2411.02393 (v1).

- "shapes": procedurally drawn images whose complexity level is known, so the
  evaluation can test §3 ("Not all images are worth the same representation":
  more complex images need more tokens) without downloading anything.
- "imagenet100" / "imagenet": the paper trains on ImageNet-100 (§4 Image
  Reconstruction, Tab. 1) in the standard <root>/{train,val}/<wnid>/ layout.
- "folder": any tree of images, e.g. the out-of-distribution sets of §3.

Every item is (image, target) with image a float32 (3, S, S) tensor in [0, 1].
"""
import itertools
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, default_collate

DATASETS = ("shapes", "imagenet100", "imagenet", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The ImageNet-100 subset of Contrastive Multiview Coding (Tian et al. 2019,
# github.com/HobbitLong/CMC issue 21), the list the ALIT code also trains on.
IMAGENET100_CLASSES = tuple("""
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split())
assert len(IMAGENET100_CLASSES) == 100 and len(set(IMAGENET100_CLASSES)) == 100


# -----------------------------------------------------------------------------
# shapes: the embedded dataset with a known complexity per image

class Level(NamedTuple):
    objects: tuple[int, int]       # min, max number of shapes
    radius: tuple[float, float]    # shape radius as a fraction of the image side
    texture: float                 # probability that a shape is filled with stripes/checkers

# §3 ties the tokens an image needs to its information content, so every step up
# adds information: more, smaller objects (more edges and colours), then two-colour
# textures inside the shapes. Everything stays within what the tiny VQGAN's 8x8 grid
# of 4x4-pixel codes can draw: colours from a palette and textures at least a code wide.
LEVELS = (
    Level(objects=(1, 1), radius=(0.25, 0.40), texture=0.0),
    Level(objects=(2, 3), radius=(0.18, 0.30), texture=0.0),
    Level(objects=(4, 5), radius=(0.14, 0.24), texture=0.2),
    Level(objects=(6, 8), radius=(0.11, 0.19), texture=0.4),
    Level(objects=(9, 12), radius=(0.09, 0.15), texture=0.6),
)
COMPLEXITY_LEVELS = len(LEVELS)
SUPERSAMPLE = 4  # draw at 4x and downsample with Lanczos: PIL's ImageDraw does no anti-aliasing
# Twelve well-separated colours: with free RGB colours a 256-code tiny VQGAN blurs every scene.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (250, 250, 250), (30, 30, 30), (128, 128, 128), (170, 110, 40)],
                   dtype=np.uint8)


def _colour(rng, avoid: int | None = None) -> int:
    """A palette index, different from `avoid` (a shape never vanishes into what lies under it)."""
    while True:
        index = int(rng.integers(len(PALETTE)))
        if index != avoid:
            return index


def _rgb(index: int, palette: np.ndarray = PALETTE) -> tuple[int, int, int]:
    return tuple(palette[index].tolist())


def _texture(rng, width: int, height: int, side: int, colours, palette: np.ndarray = PALETTE) -> Image.Image:
    """Two-colour stripes at a random angle or a checkerboard, bands 3-5 px wide at 32x32."""
    period = rng.uniform(0.19, 0.31) * side
    y, x = np.arange(height)[:, None], np.arange(width)[None, :]  # broadcast, no full grids
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        pattern = ((x * np.cos(angle) + y * np.sin(angle)) / period) % 1.0 < 0.5
    else:
        pattern = ((x // (period / 2) + y // (period / 2)) % 2).astype(bool)
    return Image.fromarray(palette[np.array(colours)][pattern.astype(np.intp)])  # (height, width, 3)


def _shape_outline(rng, cx: float, cy: float, r: float) -> tuple[str, list]:
    """An ellipse or a polygon with 3 to 8 jittered vertices (triangles, quads, ...), as the
    ImageDraw method that draws it and its coordinates."""
    sides = int(rng.integers(2, 9))
    if sides == 2:  # 2 stands for the ellipse
        ry = r * rng.uniform(0.5, 1.0)
        return "ellipse", [cx - r, cy - ry, cx + r, cy + ry]
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(sides) / sides
    angles += rng.uniform(-0.3, 0.3, sides) * np.pi / sides
    radii = r * rng.uniform(0.7, 1.0, sides)
    return "polygon", list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _split_background(rng, side: int) -> tuple[str, list]:
    """The half-plane on one side of a random line through the middle half of the image."""
    px, py = rng.uniform(0.25, 0.75, 2) * side
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy, far = np.cos(angle), np.sin(angle), 4 * side  # the line's direction; far outside the image
    return "polygon", [(px - far * dx, py - far * dy), (px + far * dx, py + far * dy),
                       (px + far * (dx - dy), py + far * (dy + dx)), (px - far * (dx + dy), py + far * (dx - dy))]


# Out-of-distribution variants of shapes (§A.2, "representational capacity depends on familiarity
# with the training set"): each changes one thing training never showed and keeps LEVELS, so an
# image of a variant can be compared with training's at the same complexity level.
VARIANTS = {
    "seen": "the training distribution",
    "kinds": "shape kinds training never drew: stars, crosses and C-shaped arcs, all non-convex "
             "(training: ellipses and convex polygons)",
    "textures": "stripes or checkers instead of flat colours, on every shape and both background halves "
                "(training: flat backgrounds, and flat shapes at levels 0 and 1)",
    "palette": "twelve colours outside the training palette, each at least 98 (RGB distance) from all of "
               "its colours and from each other",
}
NEW_PALETTE = np.array([(16, 0, 240), (176, 240, 144), (160, 160, 240), (128, 240, 0), (144, 0, 0), (0, 240, 0),
                        (240, 144, 160), (0, 240, 144), (0, 0, 128), (0, 128, 0), (80, 80, 240), (0, 96, 96)],
                       dtype=np.uint8)
# Depth in layers from the front: the background lies behind the most shapes a level draws, and each
# shape one layer in front of the highest shape it covers, so every scene shares one scale (Fig. 6/9).
BACKGROUND_DEPTH = LEVELS[-1].objects[1]


def _new_outline(rng, cx: float, cy: float, r: float) -> tuple[str, list]:
    """A star (5-7 points), a cross or a C-shaped arc at a random angle, as a polygon."""
    kind, turn = int(rng.integers(3)), rng.uniform(0, 2 * np.pi)
    if kind == 0:
        points = int(rng.integers(5, 8))
        angles = turn + np.pi * np.arange(2 * points) / points
        radii = np.where(np.arange(2 * points) % 2 == 0, r, 0.45 * r)
    elif kind == 1:
        arm = 0.3 * r  # half the width of each arm
        x = np.array([arm, arm, r, r, arm, arm, -arm, -arm, -r, -r, -arm, -arm])
        y = np.array([r, arm, arm, -arm, -arm, -r, -r, -arm, -arm, arm, arm, r])
        angles, radii = np.arctan2(y, x) + turn, np.hypot(x, y)
    else:
        arc = turn + np.linspace(0.35 * np.pi, 1.65 * np.pi, 16)  # a gap of 0.7 pi
        angles, radii = np.concatenate([arc, arc[::-1]]), np.concatenate([np.full(16, r), np.full(16, 0.55 * r)])
    return "polygon", list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


class Scene(NamedTuple):
    image: Image.Image  # RGB, image_size x image_size
    # (image_size, image_size) uint8, what covers most of each pixel's supersampled block: 0 and 1 the
    # two halves of the background, 2 + i the visible part of the i-th shape drawn (render_scene only)
    labels: np.ndarray
    num_shapes: int  # shapes drawn, hidden ones included
    # (image_size, image_size) float32 (render_scene only): layers from the front, the background at
    # BACKGROUND_DEPTH (depth_from_drawing_order)
    depth: np.ndarray | None = None


def render_shapes(rng: np.random.Generator, level: int, image_size: int, variant: str = "seen") -> Image.Image:
    """One scene of the given complexity level, drawn from rng alone."""
    return _render(rng, level, image_size, with_labels=False, variant=variant).image


def render_scene(rng: np.random.Generator, level: int, image_size: int, variant: str = "seen") -> Scene:
    """The scene render_shapes draws from the same rng (the same pixels), with its object masks and
    depth: what the analyses score the latent tokens' attention (Fig. 3, object binding) and the
    depth task (Fig. 6, 9) against."""
    return _render(rng, level, image_size, with_labels=True, variant=variant)


def _render(rng, level: int, image_size: int, with_labels: bool, variant: str = "seen") -> Scene:
    assert variant in VARIANTS, variant
    spec, side = LEVELS[level], SUPERSAMPLE * image_size
    palette = NEW_PALETTE if variant == "palette" else PALETTE
    outline = _new_outline if variant == "kinds" else _shape_outline
    background = _colour(rng)
    canvas = Image.new("RGB", (side, side), _rgb(background, palette))
    draw = ImageDraw.Draw(canvas)
    # The label map gets every outline the canvas gets, with the same rasterisation.
    labels = Image.new("L", (side, side), 0) if with_labels else None
    label_draw = ImageDraw.Draw(labels) if with_labels else None
    outlines = []  # each shape's whole outline, hidden parts included (with_labels): what it covers
    # The background is split by a random straight line into two palette colours: a layout that
    # spans the whole image, so that from the first steps stage 1 must tell where things are (on
    # flat backgrounds it settles for hundreds of steps on one colour for the whole image).
    second_colour = _colour(rng, avoid=background)  # drawn before the line: the order of the draws is the scene
    method, xy = _split_background(rng, side)
    if variant == "textures":
        canvas.paste(_texture(rng, side, side, side, (background, _colour(rng, avoid=background)), palette))
        half = Image.new("L", (side, side), 0)
        ImageDraw.Draw(half).polygon(xy, fill=255)
        canvas.paste(_texture(rng, side, side, side, (second_colour, _colour(rng, avoid=second_colour)), palette),
                     (0, 0), half)
    else:
        getattr(draw, method)(xy, fill=_rgb(second_colour, palette))
    if with_labels:
        getattr(label_draw, method)(xy, fill=1)
    num_shapes = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    for i in range(num_shapes):
        cx, cy = rng.uniform(0.1, 0.9, 2) * side
        r = rng.uniform(*spec.radius) * side
        colour = _colour(rng, avoid=background)
        if rng.random() < spec.texture or variant == "textures":
            # Texture and mask only cover the shape's bounding box, which keeps this cheap.
            box = int(math.ceil(2 * r)) + 1
            mask = Image.new("L", (box, box), 0)
            method, xy = outline(rng, r, r, r)
            getattr(ImageDraw.Draw(mask), method)(xy, fill=255)
            texture = _texture(rng, box, box, side, (colour, _colour(rng, avoid=colour)), palette)
            canvas.paste(texture, (int(cx - r), int(cy - r)), mask)
            if with_labels:
                labels.paste(2 + i, (int(cx - r), int(cy - r)), mask)
                whole = Image.new("L", (side, side), 0)
                whole.paste(1, (int(cx - r), int(cy - r)), mask)
                outlines.append(np.asarray(whole) > 0)
        else:
            method, xy = outline(rng, cx, cy, r)
            getattr(draw, method)(xy, fill=_rgb(colour, palette))
            if with_labels:
                getattr(label_draw, method)(xy, fill=2 + i)
                whole = Image.new("L", (side, side), 0)
                getattr(ImageDraw.Draw(whole), method)(xy, fill=1)
                outlines.append(np.asarray(whole) > 0)
    image = canvas.resize((image_size, image_size), Image.LANCZOS)
    if not with_labels:
        return Scene(image, None, num_shapes)
    pooled = majority_pool(np.asarray(labels), SUPERSAMPLE)
    return Scene(image, pooled, num_shapes, depth_from_drawing_order(pooled, outlines))


def depth_from_drawing_order(labels: np.ndarray, outlines: list) -> np.ndarray:
    """Scene labels (S, S) and each shape's whole outline in drawing order -> depth (S, S) float32 in
    layers from the front. A shape lies one layer above the highest visible shape drawn before it
    that its outline overlaps (the background: layer 0); depth = BACKGROUND_DEPTH - layer. Shapes
    that do not overlap share a layer, since the image cannot tell which was drawn first."""
    visible = set(np.unique(labels).tolist())
    layer = np.zeros(2 + len(outlines), dtype=np.float32)  # per label; 0 and 1 the background halves
    for i, whole in enumerate(outlines):
        below = [layer[2 + j] for j in range(i) if 2 + j in visible and (whole & outlines[j]).any()]
        layer[2 + i] = 1 + max(below, default=0)
    return BACKGROUND_DEPTH - layer[labels.astype(np.intp)]


def majority_pool(labels: np.ndarray, factor: int) -> np.ndarray:
    """(S*factor, S*factor) integer labels -> (S, S): the most frequent label of each factor x factor
    block (ties: the smaller label)."""
    S = labels.shape[0] // factor
    blocks = labels.reshape(S, factor, S, factor).transpose(0, 2, 1, 3).reshape(S, S, factor * factor)
    counts = (blocks[..., None] == np.arange(int(labels.max()) + 1)).sum(2)  # (S, S, labels)
    return counts.argmax(-1).astype(labels.dtype)


class SceneItem(NamedTuple):
    """A shapes scene with everything the generator knows of it (ShapesDataset.with_masks)."""
    image: torch.Tensor  # (3, S, S) in [0, 1]
    level: int
    labels: torch.Tensor  # (S, S) int64: 0 and 1 the background halves, 2 + i the i-th shape drawn
    num_shapes: int
    depth: torch.Tensor  # (S, S) float32, layers from the front


class ShapesDataset(Dataset):
    """Procedural scenes, deterministic per (seed, split, index); target = complexity level.

    Image i of a split is drawn from np.random.default_rng([split_seed, i]) with
    split_seed = 2*seed for train and 2*seed + 1 for val, so the two splits never
    share a scene for any seed. The first draw is the level (uniform over
    COMPLEXITY_LEVELS), so complexity_of(i) needs no rendering. Scenes are
    defined in image-relative units: the same index at another image_size is the
    same scene at another resolution. variant: one of VARIANTS, "seen" the training
    distribution; the level of image i is the same in every variant.
    """

    def __init__(self, split: str, image_size: int, num_images: int, seed: int = 0,
                 complexity: int | None = None, train_transform: bool = False, variant: str = "seen"):
        assert split in ("train", "val"), split
        assert complexity is None or 0 <= complexity < COMPLEXITY_LEVELS, complexity
        assert variant in VARIANTS, variant
        self.split, self.image_size, self.num_images = split, image_size, num_images
        self.split_seed = 2 * seed + (split == "val")
        self.complexity, self.train_transform, self.variant = complexity, train_transform, variant

    def __len__(self) -> int:
        return self.num_images

    def _rng_and_level(self, index: int) -> tuple[np.random.Generator, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.split_seed, index])
        level = int(rng.integers(COMPLEXITY_LEVELS))  # always drawn, so a fixed level keeps the stream aligned
        return rng, level if self.complexity is None else self.complexity

    def complexity_of(self, index: int) -> int:
        return self._rng_and_level(index)[1]

    def with_masks(self, index: int) -> "SceneItem":
        """Scene `index` never flipped, the image as __getitem__ gives it without augmentation, with its
        object masks, labels (S, S) int64, and its depth (S, S) float32 (see Scene)."""
        rng, level = self._rng_and_level(index)
        scene = render_scene(rng, level, self.image_size, self.variant)
        return SceneItem(to_tensor(scene.image), level, torch.from_numpy(scene.labels.astype(np.int64)),
                         scene.num_shapes, torch.from_numpy(scene.depth))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng, level = self._rng_and_level(index)
        image = to_tensor(render_shapes(rng, level, self.image_size, self.variant))
        # Flip only: a random resized crop would cut objects away and change the
        # recorded complexity, and these scenes have no camera framing to vary.
        # torch's RNG so that DataLoader's per-worker seeding applies.
        if self.train_transform and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, level


# -----------------------------------------------------------------------------
# photos: decoding, colour modes and transforms

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    16-bit greyscale (PIL opens 16-bit PNGs as "I;16" or "I") is rescaled
    0..65535 -> 0..255; PIL's own convert would clip everything above 255.
    Transparent images (RGBA, LA, P with a transparent colour) are composited
    onto white, as an image viewer shows them: the colour under alpha = 0 is
    arbitrary, often black, and would otherwise become image content.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float32) / 257.0  # 65535 / 257 = 255
        img = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8))
    if img.has_transparency_data:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    # load() decodes fully, so a truncated file raises here (PIL's default; we
    # deliberately leave ImageFile.LOAD_TRUNCATED_IMAGES off to detect them).
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # (3, H, W)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return img if new_size == img.size else img.resize(new_size, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    if min(img.size) < size:  # too small for the crop: upscale rather than pad with black
        img = resize_shorter_side(img, size)
    width, height = img.size
    left, top = round((width - size) / 2), round((height - size) / 2)
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img: Image.Image, size: int, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop algorithm: up to 10 tries of a random area
    and log-uniform aspect ratio, else the largest centred crop within ratio."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(()).uniform_(*scale).item()
        aspect = math.exp(torch.empty(()).uniform_(*log_ratio).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            break
    else:
        if width / height < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif width / height > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


class ImageFiles(Dataset):
    """A fixed list of image files with integer targets: imagenet, imagenet100 and folder.

    Train: random resized crop (scale 0.8-1, bicubic) + horizontal flip, both on
    torch's RNG so DataLoader worker seeding applies. Eval, by eval_protocol:
    "crop" is the ALIT code's evaluate_rfid.py (center crop, no resize, so pixel
    scale is kept); "resize" is TiTok's (shorter side -> image_size, bicubic, then
    center crop).

    A file that fails to decode (also one replaced or truncated after the listing)
    is skipped with a warning naming it and the next index is served instead, so
    one corrupt JPEG cannot end a multi-hour run. Every failure is appended to
    `skipped` (each DataLoader worker has its own), which train_batches counts per
    batch (--max-bad-images); only a dataset without one readable file raises.
    """

    def __init__(self, files: list[Path], targets: list[int], image_size: int,
                 train: bool, eval_protocol: str = "crop"):
        assert len(files) == len(targets) > 0
        assert eval_protocol in ("crop", "resize"), eval_protocol
        self.files, self.targets = files, targets
        self.image_size, self.train, self.eval_protocol = image_size, train, eval_protocol
        self.skipped: list[str] = []  # the path of every failed decode, in order

    def __len__(self) -> int:
        return len(self.files)

    def transform(self, img: Image.Image) -> torch.Tensor:
        if self.train:
            img = random_resized_crop(img, self.image_size)
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            if self.eval_protocol == "resize":
                img = resize_shorter_side(img, self.image_size)
            img = center_crop(img, self.image_size)
        return to_tensor(img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                img = load_rgb(self.files[i])
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                self.skipped.append(str(self.files[i]))
                warnings.warn(f"skipping unreadable image {self.files[i]} ({type(error).__name__}: {error})",
                              stacklevel=2)
                continue
            return self.transform(img), self.targets[i]
        raise RuntimeError(f"none of the {len(self)} images can be decoded, e.g. {self.files[index]}")


# -----------------------------------------------------------------------------
# folder layouts

def list_images(folder: Path) -> list[Path]:
    """Every image file under folder, recursively (following symlinks), sorted."""
    found = []
    for parent, _, names in os.walk(folder, followlinks=True):
        found += [Path(parent, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _require_dir(path: Path, what: str, hint: str = "") -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a folder{hint}")
    return path


def _no_images(folder: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")


def _has_image(folder: Path) -> bool:
    """Whether folder holds an image file, anywhere below it (stops at the first)."""
    return any(n.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(folder, followlinks=True)
               for n in names)


# What each --dataset reads from --data-dir, for messages.
LAYOUTS = {"imagenet100": "<data-dir>/{split}/<wnid>/ for the 100 classes of data.IMAGENET100_CLASSES",
           "imagenet": "<data-dir>/{split}/<class>/, any set of class folders",
           "folder": "any tree of images under <data-dir>"}


def _image_folders(name: str, split: str, data_dir: str | None) -> list[Path]:
    """The folders --dataset `name` reads for `split`, one per class ("folder": the root). A mistake
    raises a one-line error that names --data-dir and what to do."""
    layout = LAYOUTS[name].format(split=split)
    if data_dir is None:
        raise ValueError(f"--dataset {name} reads images from disk: pass --data-dir ({layout})")
    root = _require_dir(Path(data_dir), "--data-dir")
    if name == "folder":
        return [root]
    split_dir = _require_dir(root / split, "split folder", f" (--dataset {name} expects {layout}; images "
                                                           "without split and class folders are --dataset folder)")
    if name == "imagenet":
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders <class>/ in {split_dir}; a folder of images without classes "
                                    "is --dataset folder")
        return [split_dir / c for c in classes]
    missing = [str(split_dir / c) for c in sorted(IMAGENET100_CLASSES) if not (split_dir / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the 100 ImageNet-100 class folder(s) missing: "
                                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; --dataset imagenet "
                                f"takes any set of class folders (<data-dir>/{split}/<class>/)")
    return [split_dir / c for c in sorted(IMAGENET100_CLASSES)]


def check_layout(name: str, split: str, data_dir: str | None) -> None:
    """What build_dataset checks, without listing every image: the scripts call it before they build
    a model, so that a wrong --data-dir ends the run at once."""
    if name == "shapes":
        return
    for folder in _image_folders(name, split, data_dir):
        if not _has_image(folder):
            raise _no_images(folder)


def class_names(name: str, split: str, data_dir: str | None) -> list[str]:
    """The class folder of each target of --dataset `name`'s `split`, in target order; [] for the
    datasets without classes (shapes, folder)."""
    return [] if name in ("shapes", "folder") else [f.name for f in _image_folders(name, split, data_dir)]


def build_dataset(name: str, split: str, image_size: int, data_dir: str | None = None,
                  train: bool | None = None, eval_protocol: str = "crop", num_images: int | None = None,
                  seed: int = 0) -> Dataset:
    """The dataset behind --dataset / --data-dir.

    train=None means train transforms iff split == "train". num_images is the
    length of a shapes split (default 20000 train, 1000 val) and an optional cap
    (first N files after sorting) for the others. seed only changes shapes; photo
    augmentation draws from torch's RNG. "folder" ignores split: the whole tree is
    one set, targets are all 0.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown --dataset {name!r}, expected one of {DATASETS}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if eval_protocol not in ("crop", "resize"):
        raise ValueError(f"eval_protocol must be 'crop' or 'resize', got {eval_protocol!r}")
    train = split == "train" if train is None else train
    if name == "shapes":
        length = num_images or (20000 if split == "train" else 1000)
        return ShapesDataset(split, image_size, length, seed=seed, train_transform=train)

    files, targets = [], []
    for index, folder in enumerate(_image_folders(name, split, data_dir)):
        found = list_images(folder)
        if not found:
            raise _no_images(folder)
        files += found
        targets += [index] * len(found)  # "folder": one folder, every target 0
    if num_images is not None:
        files, targets = files[:num_images], targets[:num_images]
    return ImageFiles(files, targets, image_size, train, eval_protocol)


def first_images(dataset: Dataset, n: int) -> torch.Tensor:
    """The first n images of `dataset` as one (n, 3, S, S) batch, e.g. the fixed images a training
    run draws its grids of."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


# -----------------------------------------------------------------------------
# Training batches that a resumed run can reproduce exactly

class SeededAugmentation(Dataset):
    """Draws each item's augmentation from its own seed (seed, epoch, index), given the item as an
    (epoch, index) pair.

    Random crops and flips then depend on neither the DataLoader's worker count nor
    where a run was interrupted, so `--resume` continues bit-exactly.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, epoch_and_index):
        """The item, and the files that failed to decode on the way to it (ImageFiles.skipped)."""
        epoch, index = epoch_and_index
        skipped = getattr(self.dataset, "skipped", [])
        before = len(skipped)
        # The CPU generator alone, which the transforms draw from: torch.manual_seed would reseed the
        # GPUs' generators too (and fork_rng restores only the CPU's), tying the halting draws of a
        # run on CUDA to its data order.
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) % 2 ** 63)
            return self.dataset[index], skipped[before:], epoch


def collate_with_skipped(items):
    """A batch of (item, skipped files, epoch) -> (the batch, every file skipped to fill it, the epoch). The
    images travel as uint8, a quarter of float32's bytes in the shared memory between a DataLoader worker and
    the training process (every image is k / 255: to_tensor); the training loop turns them back into the same
    floats on its device (`to_unit`)."""
    images, targets = default_collate([item for item, _, _ in items])
    if images.is_floating_point():
        images = (images * 255).round().to(torch.uint8)
    return (images, targets), [path for _, paths, _ in items for path in paths], items[0][2]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """A training batch's uint8 images -> float32 in [0, 1], the floats the datasets give (k / 255)."""
    return images.float() / 255


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C, SIGTERM and Slurm's SIGUSR1/SIGUSR2 to the main process, which ends
    the run after its step with a checkpoint (distributed.StopSignal); they end with it."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def train_batches(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                  start_step: int = 0, num_workers: int = 0, max_bad_images: float = 0.25, pin_memory: bool = False):
    """Endless (epoch, batch) stream for one rank, starting at optimizer step `start_step`.

    Each epoch is a DistributedSampler permutation (its epoch set, so every epoch is
    reshuffled); a resumed run skips the batches already seen without loading them. One
    DataLoader iterator serves every epoch: its workers start once and stay. More than `max_bad_images`
    of a batch's images failing to decode stops the run.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} images is smaller than one global batch "
                         f"({batch_size} x {world_size} ranks); lower --batch-size")
    first_epoch, skip = divmod(start_step, steps_per_epoch)

    def epochs_of_indices():  # (epoch, index) pairs of whole batches, from start_step on
        for epoch in itertools.count(first_epoch):
            sampler.set_epoch(epoch)
            indices = list(sampler)[(skip if epoch == first_epoch else 0) * batch_size:steps_per_epoch * batch_size]
            yield from ((epoch, index) for index in indices)

    # Its own generator: the base seed a DataLoader draws for its workers would otherwise come from the
    # global RNG, which the training step draws from (halting) and a checkpoint restores.
    loader = DataLoader(SeededAugmentation(dataset, seed), batch_size, sampler=epochs_of_indices(),
                        num_workers=num_workers, collate_fn=collate_with_skipped, worker_init_fn=ignore_stop_signals,
                        pin_memory=pin_memory, generator=torch.Generator())
    try:
        yield from checked_batches(loader, batch_size, max_bad_images)
    except RuntimeError as error:  # a worker killed: in a container, most often /dev/shm too small
        if "shared memory" in str(error) or "Bus error" in str(error) or "/dev/shm" in str(error):
            sys.exit(f"error: a DataLoader worker died of too little shared memory ({str(error).splitlines()[0]}): "
                     "give the container more (docker --ipc=host or --shm-size=16g; enroot/pyxis: a larger "
                     "/dev/shm), or lower --num-workers")
        raise


def checked_batches(loader, batch_size: int, max_bad_images: float):
    """The loader's (epoch, batch), stopping the run when too many of a batch's images fail to decode."""
    for batch, skipped, epoch in loader:
        if len(skipped) > max_bad_images * batch_size:
            sys.exit(f"error: {len(skipped)} images failed to decode for a batch of {batch_size} (more than "
                     f"--max-bad-images {max_bad_images}), e.g. {skipped[0]}: check the files under --data-dir")
        yield epoch, batch

