"""data.py: shapes determinism and complexity, folder layouts, bad inputs, transforms."""
import io
import warnings

import numpy as np
import pytest
import scipy.spatial
import torch
from PIL import Image

import data
from data import COMPLEXITY_LEVELS, IMAGENET100_CLASSES, SeededAugmentation, ShapesDataset, build_dataset, train_batches
from plots import save_image_grid


def write(path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def noise(width, height, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels_of(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255


def png_bytes(image: torch.Tensor) -> int:
    buffer = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, format="PNG")
    return len(buffer.getvalue())


# ----------------------------------------------------------------------------- shapes

def test_imagenet100_list():
    assert len(IMAGENET100_CLASSES) == len(set(IMAGENET100_CLASSES)) == 100
    assert IMAGENET100_CLASSES[:3] == ("n02869837", "n01749939", "n02488291")
    assert IMAGENET100_CLASSES[-1] == "n02090622"


def test_shapes_deterministic_per_seed_split_index():
    a, b = ShapesDataset("train", 32, 10, seed=0), ShapesDataset("train", 32, 10, seed=0)
    for i in range(5):
        assert torch.equal(a[i][0], b[i][0])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], ShapesDataset("val", 32, 10, seed=0)[0][0])
    assert not torch.equal(a[0][0], ShapesDataset("train", 32, 10, seed=1)[0][0])
    # split seeds 2*seed and 2*seed+1: seed 0's val must not be seed 1's train
    assert not torch.equal(ShapesDataset("val", 32, 10, seed=0)[0][0], ShapesDataset("train", 32, 10, seed=1)[0][0])


@pytest.mark.parametrize("size", [16, 40, 64])
def test_shapes_shape_dtype_range(size):
    image, level = ShapesDataset("val", size, 4)[3]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert isinstance(level, int) and 0 <= level < COMPLEXITY_LEVELS


def test_shapes_complexity_recorded():
    dataset = ShapesDataset("train", 16, 300)
    for i in range(20):
        assert dataset[i][1] == dataset.complexity_of(i)
    levels = [dataset.complexity_of(i) for i in range(300)]
    assert set(levels) == set(range(COMPLEXITY_LEVELS))  # uniform draw reaches every level
    fixed = ShapesDataset("train", 16, 10, complexity=3)
    assert all(fixed[i][1] == 3 and fixed.complexity_of(i) == 3 for i in range(5))
    with pytest.raises(IndexError):
        dataset[300]


def test_shapes_higher_level_has_more_information():
    # §3: complexity ~ compressibility. Mean PNG size and gradient energy must grow at every level.
    sizes, energies = [], []
    for level in range(COMPLEXITY_LEVELS):
        dataset = ShapesDataset("val", 32, 20, seed=7, complexity=level)
        images = torch.stack([dataset[i][0] for i in range(20)])
        sizes.append(np.mean([png_bytes(x) for x in images]))
        energies.append(((images.diff(dim=-1) ** 2).mean() + (images.diff(dim=-2) ** 2).mean()).item())
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    assert all(a < b for a, b in zip(energies, energies[1:])), energies


def test_shapes_train_flip_only():
    plain, train = ShapesDataset("train", 32, 10), ShapesDataset("train", 32, 10, train_transform=True)
    torch.manual_seed(0)
    flipped = []
    for i in range(10):
        x, y = plain[i][0], train[i][0]
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
        flipped.append(not torch.equal(y, x))
    assert any(flipped) and not all(flipped)


def test_build_shapes_defaults():
    assert len(build_dataset("shapes", "train", 32)) == 20000
    val = build_dataset("shapes", "val", 32)
    assert len(val) == 1000 and not val.train_transform
    assert build_dataset("shapes", "val", 32, train=True).train_transform
    assert len(build_dataset("shapes", "train", 32, num_images=7)) == 7
    with pytest.raises(ValueError, match="unknown --dataset"):
        build_dataset("cifar", "train", 32)
    with pytest.raises(ValueError, match="split"):
        build_dataset("shapes", "test", 32)


# ----------------------------------------------------------------------------- folder layouts

def test_depth_of_two_overlapping_shapes_follows_the_drawing_order():
    side = 8
    outline = lambda y0, y1, x0, x1: np.pad(np.ones((y1 - y0, x1 - x0), bool), ((y0, side - y1), (x0, side - x1)))
    first, second, apart = outline(1, 5, 1, 5), outline(3, 7, 3, 7), outline(0, 2, 6, 8)  # second covers first's corner
    labels = np.zeros((side, side), np.uint8)
    labels[first], labels[second], labels[apart] = 2, 3, 4
    depth = data.depth_from_drawing_order(labels, [first, second, apart])
    back = data.BACKGROUND_DEPTH
    assert (depth[labels == 0] == back).all() and (depth[first & ~second] == back - 1).all()
    assert (depth[second] == back - 2).all()  # in front of first, also where first lies under it
    assert (depth[apart] == back - 1).all()  # overlaps nothing: on the background, whatever its turn
    # drawn the other way round, the order flips
    flipped = np.zeros((side, side), np.uint8)
    flipped[second], flipped[first] = 2, 3
    depth = data.depth_from_drawing_order(flipped, [second, first])
    assert (depth[first] == back - 2).all() and (depth[second & ~first] == back - 1).all()


def test_rendered_depth_is_one_value_per_visible_segment():
    dataset = ShapesDataset("val", 32, 30)
    for i in range(len(dataset)):
        scene = dataset.with_masks(i)
        assert scene.depth.shape == (32, 32) and scene.depth.dtype == torch.float32
        assert (scene.depth[scene.labels < 2] == data.BACKGROUND_DEPTH).all()
        shapes = scene.labels >= 2
        assert (scene.depth[shapes] < data.BACKGROUND_DEPTH).all()
        assert (scene.depth[shapes] >= data.BACKGROUND_DEPTH - scene.num_shapes).all()
        for segment in scene.labels.unique():
            assert len(scene.depth[scene.labels == segment].unique()) == 1


def solidity(mask: np.ndarray) -> float:
    """Pixels of a mask over the pixels of its convex hull (Pick: area + perimeter / 2 + 1)."""
    ys, xs = np.nonzero(mask)
    hull = scipy.spatial.ConvexHull(np.stack([xs, ys], 1))
    return len(ys) / (hull.volume + hull.area / 2 + 1)


def interior_colours(image: torch.Tensor, labels: torch.Tensor, reach: int = 3, least: int = 16) -> dict:
    """Segment -> the (n, 3) colours of its pixels with no other segment within `reach` pixels, for the
    segments with at least `least` such pixels (fewer can fall within one stripe of a texture)."""
    padded = torch.nn.functional.pad(labels[None, None].float(), (reach,) * 4, mode="replicate")
    windows = padded.unfold(2, 2 * reach + 1, 1).unfold(3, 2 * reach + 1, 1).flatten(-2)[0, 0]
    inside = (windows == labels[..., None]).all(-1)
    pixels = (image * 255).round().permute(1, 2, 0)
    return {int(s): pixels[inside & (labels == s)] for s in labels.unique() if (inside & (labels == s)).sum() >= least}


def off_colour(colours: torch.Tensor) -> float:
    """The fraction of a segment's pixels more than 8 from its median colour in a channel: a flat
    colour strays a few levels (Lanczos' ringing, polygon tips), a two-colour texture half the time."""
    return ((colours - colours.median(0).values).abs().max(1).values > 8).float().mean().item()


def test_out_of_distribution_variants_draw_what_they_say():
    seen, kinds = (ShapesDataset("val", 32, 20, complexity=0, variant=v) for v in ("seen", "kinds"))
    # New kinds: stars, crosses and arcs are far from convex; training's shapes are convex.
    assert min(solidity(seen.with_masks(i).labels.numpy() == 2) for i in range(20)) > 0.8
    assert max(solidity(kinds.with_masks(i).labels.numpy() == 2) for i in range(20)) < 0.8
    for level in (0, 1):  # the levels where training shapes are all flat
        flat, textured, palette = (ShapesDataset("val", 32, 10, complexity=level, variant=v)
                                   for v in ("seen", "textures", "palette"))
        for i in range(10):
            a, b, c = flat.with_masks(i), textured.with_masks(i), palette.with_masks(i)
            assert a.level == b.level == c.level
            # textures: every segment's interior, background halves too, is striped or chequered
            assert all(off_colour(colours) < 0.1 for colours in interior_colours(a.image, a.labels).values())
            assert all(off_colour(colours) > 0.2 for colours in interior_colours(b.image, b.labels).values())
            # the unseen palette: flat segments in its colours, none of training's
            for colours in interior_colours(c.image, c.labels).values():
                colour = colours.median(0).values
                assert off_colour(colours) < 0.1 and (torch.from_numpy(data.NEW_PALETTE).float() == colour).all(1).any()
                assert torch.cdist(colour[None], torch.from_numpy(data.PALETTE).float()).min() >= 98
    assert torch.equal(ShapesDataset("val", 32, 3)[2][0], ShapesDataset("val", 32, 3, variant="seen")[2][0])


def test_imagenet100_selects_listed_classes(tmp_path):
    for wnid in IMAGENET100_CLASSES + ("n99999999",):
        write(tmp_path / "train" / wnid / "a.JPEG", noise(8, 8))
    dataset = build_dataset("imagenet100", "train", 8, data_dir=str(tmp_path))
    assert len(dataset) == 100
    assert all("n99999999" not in str(f) for f in dataset.files)
    ordered = sorted(IMAGENET100_CLASSES)
    assert [f.parent.name for f in dataset.files] == ordered
    assert dataset.targets == list(range(100))
    assert dataset[5][1] == 5

    (tmp_path / "train" / "n02869837" / "a.JPEG").unlink()
    (tmp_path / "train" / "n02869837").rmdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train" / "n02869837")):
        build_dataset("imagenet100", "train", 8, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="split folder.*val"):
        build_dataset("imagenet100", "val", 8, data_dir=str(tmp_path))


def test_imagenet_layout_class_indices(tmp_path):
    for wnid, count in [("n03", 3), ("n01", 2), ("n02", 1)]:
        for k in range(count):
            write(tmp_path / "val" / wnid / f"{k}.JPEG", noise(10, 12, seed=k))
    dataset = build_dataset("imagenet", "val", 8, data_dir=str(tmp_path))
    assert dataset.targets == [0, 0, 1, 2, 2, 2]
    assert [dataset[i][1] for i in range(6)] == [0, 0, 1, 2, 2, 2]
    assert dataset[0][0].shape == (3, 8, 8) and not dataset.train
    assert len(build_dataset("imagenet", "val", 8, data_dir=str(tmp_path), num_images=4)) == 4
    (tmp_path / "val" / "n04").mkdir()
    with pytest.raises(FileNotFoundError, match="no images.*n04"):
        build_dataset("imagenet", "val", 8, data_dir=str(tmp_path))


def test_folder_recursive_mixed_extensions(tmp_path):
    for name in ["a.png", "sub/b.JPG", "sub/deep/c.jpeg", "d.webp", "sub/e.BMP"]:
        write(tmp_path / name, noise(9, 9))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = build_dataset("folder", "train", 8, data_dir=str(tmp_path), train=False)
    assert [f.relative_to(tmp_path).as_posix() for f in dataset.files] == \
        ["a.png", "d.webp", "sub/b.JPG", "sub/deep/c.jpeg", "sub/e.BMP"]
    assert all(dataset[i][1] == 0 and dataset[i][0].shape == (3, 8, 8) for i in range(5))


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        build_dataset("folder", "val", 8)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"--data-dir {missing}"):
        build_dataset("imagenet", "train", 8, data_dir=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no images.*{tmp_path / 'empty'}"):
        build_dataset("folder", "val", 8, data_dir=str(tmp_path / "empty"))
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        build_dataset("imagenet", "train", 8, data_dir=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- colour modes

def load_one(tmp_path, name, img, size=4):
    write(tmp_path / "imgs" / name, img)
    return build_dataset("folder", "val", size, data_dir=str(tmp_path / "imgs"))[0][0]


def test_grayscale_to_rgb(tmp_path):
    image = load_one(tmp_path, "g.png", Image.new("L", (4, 4), 100))
    assert image.shape == (3, 4, 4) and torch.allclose(image, torch.full((3, 4, 4), 100 / 255))


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (10, 20, 30, 255)   # opaque rows keep their colour
    rgba[2:] = (10, 20, 30, 0)     # transparent rows become white
    image = load_one(tmp_path, "a.png", Image.fromarray(rgba))
    assert torch.allclose(image[:, :2], torch.tensor([10, 20, 30]).view(3, 1, 1) / 255)
    assert torch.allclose(image[:, 2:], torch.ones(3, 2, 4))
    la = Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert torch.allclose(load_one(tmp_path / "la", "la.png", la), torch.ones(3, 4, 4))


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 40, 60] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 4, 2))                  # top half: index 1 = (200, 40, 60)
    palette.info["transparency"] = 0                # bottom half: index 0, transparent
    image = load_one(tmp_path, "p.png", palette)
    assert torch.allclose(image[:, :2], torch.tensor([200, 40, 60]).view(3, 1, 1) / 255)
    assert torch.allclose(image[:, 2:], torch.ones(3, 2, 4))


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 32896]] * 4, dtype=np.uint16)  # 32896/257 = 128
    image = load_one(tmp_path, "d.png", Image.fromarray(values))
    assert torch.allclose(image[:, 0], torch.tensor([0, 100, 255, 128]).expand(3, 4) / 255)
    for mode in data.SIXTEEN_BIT_MODES[:2]:  # also the 32-bit "I" mode 16-bit PNGs may open as
        assert np.array(data.to_rgb(Image.fromarray(values).convert(mode)))[0, :, 1].tolist() == [0, 100, 255, 128]


# ----------------------------------------------------------------------------- bad files

def truncated_jpeg(path):
    buffer = io.BytesIO()
    noise(64, 64).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_truncated_file_skipped_with_warning(tmp_path):
    write(tmp_path / "a.png", noise(8, 8, seed=1))
    truncated_jpeg(tmp_path / "b.jpg")
    write(tmp_path / "c.png", noise(8, 8, seed=3))
    dataset = build_dataset("folder", "val", 8, data_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=f"{tmp_path / 'b.jpg'}.*truncated"):
        image, _ = dataset[1]
    assert torch.equal(image, pixels_of(noise(8, 8, seed=3)))  # the next file stands in
    assert dataset.skipped == [str(tmp_path / "b.jpg")]
    with pytest.warns(UserWarning):  # every failure is counted (training stops on too many a batch)
        dataset[1]
    assert len(dataset.skipped) == 2


def test_no_readable_file_raises(tmp_path):
    truncated_jpeg(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"this is not a png")
    dataset = build_dataset("folder", "val", 8, data_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="none of the 2 images can be decoded"):
            dataset[1]


# ----------------------------------------------------------------------------- transforms

def test_small_image_upscaled(tmp_path):
    write(tmp_path / "s.png", noise(8, 6))
    for protocol in ("crop", "resize"):
        dataset = build_dataset("folder", "val", 16, data_dir=str(tmp_path), eval_protocol=protocol)
        assert dataset[0][0].shape == (3, 16, 16)
    assert build_dataset("folder", "train", 16, data_dir=str(tmp_path))[0][0].shape == (3, 16, 16)


def test_train_crop_and_flip_size(tmp_path):
    write(tmp_path / "wide.png", noise(50, 30))
    write(tmp_path / "very_wide.png", noise(200, 10))  # no in-ratio crop exists: the fallback path
    dataset = build_dataset("folder", "train", 16, data_dir=str(tmp_path))
    assert dataset.train
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(4)]
    assert all(x.shape == (3, 16, 16) for x in draws) and dataset[1][0].shape == (3, 16, 16)
    assert not all(torch.equal(draws[0], x) for x in draws[1:])
    torch.manual_seed(0)
    assert torch.equal(dataset[0][0], draws[0])  # augmentation follows torch's RNG


def test_random_resized_crop_is_torchvision_algorithm():
    torch.manual_seed(0)
    # scale=1, ratio=1 on a square image: the only crop is the whole image
    image = noise(16, 16)
    assert torch.equal(pixels_of(data.random_resized_crop(image, 16, scale=(1, 1), ratio=(1, 1))), pixels_of(image))
    # fallback on an image too wide for any 3/4..4/3 crop: centred, full height, width = 4/3 * height
    stripes = Image.fromarray(np.tile(np.arange(120, dtype=np.uint8), (30, 1)))
    out = np.array(data.random_resized_crop(stripes.convert("RGB"), 40, scale=(1, 1)))[..., 0]
    assert abs(int(out[:, 0].mean()) - 40) <= 2 and abs(int(out[:, -1].mean()) - 79) <= 2


def test_eval_protocols(tmp_path):
    # A smooth 16x16 image A; "big" is A with a 2x-larger frame around it.
    y, x = np.mgrid[0:16, 0:16]
    small = Image.fromarray(np.stack([x * 16, y * 16, (x + y) * 8], -1).astype(np.uint8))
    big = noise(32, 32)
    big.paste(small, (8, 8))
    write(tmp_path / "big.png", big)
    crop = build_dataset("folder", "val", 16, data_dir=str(tmp_path), eval_protocol="crop")[0][0]
    assert torch.equal(crop, pixels_of(small))  # no resize: pixel scale kept

    write(tmp_path / "up" / "up.png", small.resize((32, 32), Image.NEAREST))
    resized = build_dataset("folder", "val", 16, data_dir=str(tmp_path / "up"), eval_protocol="resize")[0][0]
    assert (resized - pixels_of(small)).abs().mean() < 0.02  # whole field of view, downscaled 2x

    write(tmp_path / "rect" / "r.png", noise(40, 20))
    rect = build_dataset("folder", "val", 16, data_dir=str(tmp_path / "rect"), eval_protocol="resize")[0][0]
    expected = noise(40, 20).resize((32, 16), Image.BICUBIC).crop((8, 0, 24, 16))
    assert torch.equal(rect, pixels_of(expected))


# ----------------------------------------------------------------------------- image grid

def test_save_image_grid(tmp_path):
    images = torch.rand(5, 3, 8, 10)
    images[0] = 2.0  # clamped to white
    path = tmp_path / "out" / "grid.png"
    save_image_grid(images, path, nrow=3, padding=2, min_cell=8)
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.size == (3 * 12 + 2, 2 * 10 + 2)
        grid = np.array(grid)
    assert (grid[2:10, 2:12] == 255).all() and (grid[:2] == 255).all()  # white padding
    assert np.array_equal(grid[12:20, 2:12], (images[3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind
    # enlarged to cells of at least 64 px by a whole factor (8 -> 64: x8), nearest neighbour; labels around
    save_image_grid(list(images[:2]), path, nrow=4, column_labels=["a", "b"], row_labels=["row"], captions=["x", "y"])
    with Image.open(path) as grid:
        grid = np.array(grid)
    left, top = grid.shape[1] - (2 * 82 + 2), 16
    assert left > 8 and grid.shape[0] == top + 64 + 15 + 2 + 2  # a caption strip of one line under the images
    cell = grid[top + 2:top + 2 + 64, left + 84:left + 84 + 80]  # the second image
    assert np.array_equal(cell, np.repeat(np.repeat(grid[top + 2:top + 66:8, left + 84:left + 164:8], 8, 0), 8, 1))
    assert np.array_equal(cell[::8, ::8], (images[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

def test_training_batches_cross_the_loader_as_uint8_and_become_the_same_floats():
    """A worker hands the training process uint8 (a quarter of float32's shared memory); to_unit on the
    device gives back exactly the floats the dataset made."""
    from data import to_unit
    dataset = build_dataset("shapes", "train", 32, num_images=16)
    for workers in (0, 1):
        _, (images, _) = next(train_batches(dataset, 4, 0, 1, seed=0, num_workers=workers))
        assert images.dtype == torch.uint8
        originals = torch.stack([SeededAugmentation(dataset, 0)[(0, i)][0][0] for i in first_batch_indices(16, 4)])
        assert torch.equal(to_unit(images), originals)


def first_batch_indices(n: int, batch_size: int) -> list:
    """The indices of the first batch train_batches draws (rank 0 of 1, seed 0, epoch 0)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=0,
                                                  drop_last=True)
    sampler.set_epoch(0)
    return list(sampler)[:batch_size]
