"""Figures drawn with PIL, so that they need no plotting library: image grids (a training run's
reconstructions, Fig. 2's token counts, halting), and charts: line charts (Fig. 4/5, 7/8) and grouped
bar charts (histograms), one or more panels to a PNG, each with a title, labelled axes and a legend
under the axes, where it cannot cover a curve. Then evaluate.py's figures: the adaptive sweep (Fig. 7),
reconstructions per token count (Fig. 2) and halting.

    draw_panels("sweep.png", [Panel("L1 against tokens", "tokens", "L1",
                                    [Series("level 0", [(8, 0.09), (16, 0.08)], COLOURS[0])])])
"""
import colorsys
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data import majority_pool

# -----------------------------------------------------------------------------
# Image grids

def save_image_grid(images: torch.Tensor | list, path, nrow: int, column_labels=None, row_labels=None,
                    captions=None, min_cell: int = 64, padding: int = 2) -> None:
    """Write (N, 3, H, W) images in [0, 1] as one PNG, nrow images per row: each enlarged by the
    smallest whole factor that makes it at least `min_cell` pixels (nearest neighbour: pixels stay
    pixels, so what differs between token counts shows), labelled above its column and left of its
    row, and `captions[i]` under image i."""
    images = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
    images = images.detach().float().cpu().clamp(0, 1)
    scale = max(1, math.ceil(min_cell / min(images.shape[-2:])))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, _, h, w = images.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    font = ImageFont.load_default(size=11)
    caption = 13 * max(c.count("\n") + 1 for c in captions) + 2 if captions else 0  # the strip under each image
    top = 16 if column_labels else 0
    left = 8 + max((int(font.getlength(label)) for label in row_labels), default=0) if row_labels else 0
    canvas = Image.new("RGB", (left + cols * (w + padding) + padding, top + rows * (h + caption + padding) + padding),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        x = left + padding + (i % nrow) * (w + padding)
        y = top + padding + (i // nrow) * (h + caption + padding)
        canvas.paste(Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()), (x, y))
        if captions:
            draw.multiline_text((x + w / 2, y + h + 1), captions[i], fill="black", font=font, anchor="ma",
                                align="center", spacing=1)
    for c, label in enumerate(column_labels or []):
        draw.text((left + padding + c * (w + padding) + w / 2, 2), label, fill="black", font=font, anchor="ma")
    for r, label in enumerate(row_labels or []):
        draw.text((4, top + padding + r * (h + caption + padding) + h / 2), label, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a crash mid-write never leaves a half PNG
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_image_columns(columns: list, path, column_labels=None, row_labels=None, captions=None) -> None:
    """Write one row per image and one column per entry of `columns` (each (N, 3, H, W)), e.g. the
    reconstruction at every token count, then the original (Fig. 2's layout); captions row by row."""
    save_image_grid(torch.stack(columns, dim=1).flatten(0, 1), path, nrow=len(columns), column_labels=column_labels,
                    row_labels=row_labels, captions=captions)


def save_rollout(model, images, path, hard: bool = False):
    """The images ALIT reconstructs from each token count, a column each, beside the originals (a
    training run's grids: hard=True shows the VQGAN codes stage 1 predicts, ALIT.rollout_images)."""
    grid = model.rollout_images(images, hard=hard) + [images]
    save_image_columns(grid, path, [*map(str, model.config.token_counts), "original"],
                       [f"val {i}" for i in range(len(images))])


# -----------------------------------------------------------------------------
# Charts

# matplotlib's tab10, which stays apart for colour-blind readers
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

# x ticks of the dataset representation, the fraction of the maximum tokens (Fig. 7-9)
FRACTION_TICKS = [(v, f"{v:g}") for v in (0, 0.25, 0.5, 0.75, 1.0)]


@dataclass
class Series:
    name: str  # legend entry
    points: list  # (x, y) pairs; points whose y is None are left out
    colour: tuple
    labels: list | None = None  # text beside each point, e.g. the threshold that chose it
    dashed: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list
    # (x, text) tick marks; default five evenly spaced over the data. With bars: the categories.
    xticks: list = field(default_factory=list)
    bars: bool = False  # grouped bars, one per series at each x tick, instead of lines
    ylim: tuple | None = None  # default: the data's range, padded


def draw_panels(path, panels: list, size=(560, 400), columns: int | None = None):
    """Write `panels` side by side (`columns` per row, default all in one row) as one PNG."""
    font = ImageFont.load_default(size=13)
    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    legend_rows = max(len(p.series) for p in panels)
    width, height = size[0], size[1] + 17 * legend_rows  # the legend goes under the axes
    canvas = Image.new("RGB", (width * columns, height * rows), "white")
    for i, panel in enumerate(panels):
        _draw_panel(canvas, panel, (i % columns) * width, (i // columns) * height, size, font)
    canvas.save(path)


def _draw_panel(canvas, panel: Panel, x0: int, y0: int, size, font):
    draw = ImageDraw.Draw(canvas)
    width, height = size
    left, right, top, bottom = x0 + 78, x0 + width - 24, y0 + 36, y0 + height - 58  # the axes' box
    points = [(x, y) for s in panel.series for x, y in s.points if y is not None]
    ys = [y for _, y in points] + ([0] if panel.bars else [])
    yticks = _nice_ticks(*(panel.ylim or (min(ys, default=0), max(ys, default=1))))
    lo, hi = yticks[0], yticks[-1]
    ticks = panel.xticks or _even_ticks([x for x, _ in points])
    xlo, xhi = min(t for t, _ in ticks), max(t for t, _ in ticks)
    if panel.bars:
        xlo, xhi = xlo - 0.5, xhi + 0.5  # room for the outer groups
    elif xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def to_px(x, y):
        return left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for x, text in ticks:
        px, _ = to_px(x, lo)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px, bottom + 6), text, fill="black", font=font, anchor="mt")
    digits = max(0, -math.floor(math.log10(yticks[1] - yticks[0]) + 1e-9))  # decimals of the tick step
    digits += f"{(yticks[1] - yticks[0]) / 10 ** -digits:g}" == "2.5"
    for value in yticks:
        _, py = to_px(xlo, value)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((left - 6, py), f"{value:.{digits}f}", fill="black", font=font, anchor="rm")

    for k, s in enumerate(panel.series):
        shown = [(x, y, (s.labels or [None] * len(s.points))[j]) for j, (x, y) in enumerate(s.points) if y is not None]
        if panel.bars:
            slot = 0.8 / len(panel.series)  # each group spans 0.8 of the gap between ticks
            for x, y, _ in shown:
                bar_left, bar_top = to_px(x - 0.4 + k * slot, y)
                bar_right, base = to_px(x - 0.4 + (k + 1) * slot, lo)
                draw.rectangle([bar_left, bar_top, max(bar_left, bar_right - 1), base], fill=s.colour)
            continue
        line = [to_px(x, y) for x, y, _ in sorted(shown, key=lambda p: p[0])]
        if len(line) > 1 and s.dashed:
            _dashed(draw, line, s.colour)
        elif len(line) > 1:
            draw.line(line, fill=s.colour, width=2)
        radius = 3 if len(shown) > 1 else 5  # a lone point stands out
        for x, y, label in shown:
            px, py = to_px(x, y)
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=s.colour)
            if label:  # inside the box, on whichever sides have room; alternate series below their points
                side = ("r", -5) if px > right - 50 else ("l", 5)
                below = py < top + 20 or (k % 2 == 0 and py < bottom - 20)
                draw.text((px + side[1], py + (4 if below else -4)), label, fill=s.colour, font=font,
                          anchor=side[0] + ("t" if below else "b"))

    draw.text(((left + right) / 2, y0 + 10), panel.title, fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, bottom + 24), panel.xlabel, fill="black", font=font, anchor="mt")
    _vertical_text(canvas, (x0 + 14, (top + bottom) / 2), panel.ylabel, font)
    for k, s in enumerate(panel.series):
        ly = bottom + 48 + 17 * k
        if panel.bars:
            draw.rectangle([left + 10, ly - 5, left + 30, ly + 5], fill=s.colour)
        elif len([y for _, y in s.points if y is not None]) == 1:
            draw.ellipse([left + 15, ly - 5, left + 25, ly + 5], fill=s.colour)
        elif s.dashed:
            _dashed(draw, [(left + 10, ly), (left + 30, ly)], s.colour)
        else:
            draw.line([left + 10, ly, left + 30, ly], fill=s.colour, width=2)
        draw.text((left + 36, ly), s.name, fill="black", font=font, anchor="lm")


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list:
    """About `count` round values (steps of 1, 2, 2.5 or 5 x 10^k) from at or below lo to at or above hi."""
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) * 0.05, hi + (abs(hi) or 1) * 0.05
    raw = (hi - lo) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _even_ticks(xs):
    lo, hi = min(xs, default=0), max(xs, default=1)
    return [(v, f"{v:g}") for v in (lo + (hi - lo) * i / 4 for i in range(5))] if hi > lo else [(lo, f"{lo:g}")]


def _dashed(draw, line, colour, dash=6):
    """A polyline drawn in dashes of `dash` pixels (PIL draws only solid lines)."""
    for (ax, ay), (bx, by) in zip(line, line[1:]):
        length = math.hypot(bx - ax, by - ay)
        for start in range(0, int(length), 2 * dash):
            a, b = start / length, min(start + dash, length) / length
            draw.line([ax + a * (bx - ax), ay + a * (by - ay), ax + b * (bx - ax), ay + b * (by - ay)], fill=colour,
                      width=2)


def _vertical_text(canvas, centre, text, font):
    """Text read bottom to top, centred on `centre` (the y-axis label)."""
    box = ImageDraw.Draw(canvas).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
    ImageDraw.Draw(label).text((1, 1), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    canvas.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


# -----------------------------------------------------------------------------
# evaluate.py's figures

def plot_sweep(path, sweep, saturated_sweep, fixed, with_fid: bool):
    """Fig. 7: dataset representation (fraction of the maximum tokens, x) against L1 (and rFID) of
    the adaptive allocation at each threshold (with and without saturation), beside every image at
    the same count (fixed)."""
    panels = []
    for key, label in [("l1", "L1")] + ([("rfid", "rFID")] if with_fid else []):
        series = [Series("every image at one count", [(r["dataset_representation"], r[key]) for r in fixed],
                         COLOURS[0]),
                  Series("adaptive, L1 < threshold (label)", [(r["dataset_representation"], r[key]) for r in sweep],
                         COLOURS[3], labels=[f"{r['threshold']:g}" for r in sweep])]
        if saturated_sweep and key == "l1":
            series.append(Series("adaptive, below threshold or saturated",
                                 [(r["dataset_representation"], r[key]) for r in saturated_sweep], COLOURS[2],
                                 labels=[f"{r['threshold']:g}" for r in saturated_sweep]))
        panels.append(Panel(f"{label} against dataset representation (Fig. 7)", "fraction of the maximum tokens",
                            label, series, xticks=FRACTION_TICKS))
    draw_panels(path, panels)


def spread_rows(keep, per_image, rows: int, by_complexity: bool):
    """Indices into the first batch of `rows` images from simple to complex (by recorded complexity on
    `shapes`, else by the L1 at the fewest tokens), spread evenly over the range, and their row labels."""
    images, _, targets = keep
    difficulty = targets.float() if by_complexity else per_image["l1"][0, :len(images)]
    order = difficulty.argsort(stable=True)
    order = order[torch.linspace(0, len(order) - 1, min(rows, len(order))).round().long()]
    labels = [f"level {int(targets[i])}" if by_complexity else f"image {int(i)}" for i in order]
    return order, labels


def save_fig2_grid(keep, per_image, path, order, labels, counts: list):
    """Fig. 2: rows are the images `order` picks (spread_rows: simple to complex), columns are the token
    counts, then the original; each reconstruction's L1 under it."""
    images, recon, _ = keep
    l1 = per_image["l1"][:, order]  # (T, rows)
    captions = [text for i in range(len(order)) for text in [f"{v:.3f}" for v in l1[:, i].tolist()] + [""]]
    save_image_columns([recon[t, order] for t in range(recon.shape[0])] + [images[order]], path,
                       [str(c) for c in counts] + ["original"], labels, captions)


@torch.no_grad()
def save_halting_figure(model, images, row_labels, path, seed: int):
    """Dynamic halting at work in `model`, an ALIT (§2, T -> T+1): per iteration (columns) the
    reconstruction from its tokens, with the 2D tokens halted after it tinted red (the next iteration
    sees the mask token there, as in training: the same random draws, seeded), its L1 and how many
    tokens halted."""
    cfg = model.config
    records = model.rollout(images, halting=True, generator=torch.Generator(images.device).manual_seed(seed))
    red = torch.tensor([1.0, 0.0, 0.0], device=images.device).view(1, 3, 1, 1)
    columns, captions = [], [[] for _ in images]
    for r in records:
        recon = r.recon.float().clamp(0, 1)
        l1 = (recon - images).abs().mean(dim=(1, 2, 3))
        halted = torch.zeros(len(images), cfg.num_image_tokens, device=images.device) if r.halted is None \
            else r.halted.float()
        mask = halted.view(-1, 1, cfg.grid_size, cfg.grid_size).repeat_interleave(cfg.patch_size, 2) \
            .repeat_interleave(cfg.patch_size, 3)
        columns.append(recon * (1 - 0.45 * mask) + 0.45 * mask * red)
        for i in range(len(images)):
            captions[i].append(f"L1: {l1[i]:.3f}" + (f"\n{int(halted[i].sum())} halt" if r.halted is not None else ""))
    save_image_columns(columns + [images], path, [str(r.num_tokens) for r in records] + ["original"], row_labels,
                       [text for row in captions for text in row + [""]])


# -----------------------------------------------------------------------------
# analyze.py's figures

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


def draw_attention(path, image, maps, assign, masks, mc, level, source: str, cell: int = 64):
    """Fig. 3/11/13 for one image: a row per iteration; the image, its segments (shapes), each 2D token
    coloured by the latent token it attends most, then the attention maps over the image of the
    first K latent tokens as the rollout updates them, and of the K tokens added at that iteration;
    `source` names the attention (which layer, which heads) in the title."""
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
    title = (f"level {level}: " if level is not None else "") + f"{source} (each map scaled to its maximum)"
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 26), "binding: each 2D cell in the colour of the latent token its query attends most (one colour per "
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
        panels.append(Panel(f"tokens chosen by {criterion} (the most when none passes)", "tokens",
                            "fraction of the level's images", series,
                            xticks=[(t, str(k)) for t, k in enumerate(counts)], bars=True))
    draw_panels(histograms_path, panels)


def plot_selection(path, rows: dict, tasks: dict):
    """Fig. 7/8: each task of interest ({task: its name}) against the dataset representation its
    selection costs, one curve per token-selection criterion."""
    panels = []
    for task, name in tasks.items():
        series = [Series(criterion, [(r["dataset_representation"], r[task]) for r in criterion_rows], COLOURS[i],
                         labels=[f"top-{r['top_x']}" for r in criterion_rows] if "top_x" in criterion_rows[0] else None)
                  for i, (criterion, criterion_rows) in enumerate(rows.items())]
        panels.append(Panel(f"{name} against dataset representation", "fraction of the maximum tokens", name, series,
                            xticks=FRACTION_TICKS))
    draw_panels(path, panels, size=(460, 360), columns=2)


def plot_probe(path, probe: dict, counts: list):
    """§A.4: probe accuracy per iteration (the first K tokens solid, all so far dashed), and at the last
    iteration per pooled prefix, for each pooling probed of the trained encoder and the untrained control,
    beside the pooled VQGAN grid and chance."""
    K, last = counts[0], len(counts)
    flat = lambda name, value, colour, xs: Series(name, [(x, value) for x in xs], colour, dashed=True)  # noqa: E731
    per_iteration, per_prefix = [], []
    lines = [(source, pooling) for source in ("trained", "untrained") for pooling in probe[source]]
    for i, (source, pooling) in enumerate(lines):  # poolings probed at the claims' cells alone have gaps
        table, colour, name = probe[source][pooling], COLOURS[i], f"{source}, {pooling}"
        at = lambda t, k: table.get(t + 1, {}).get(k)  # noqa: E731
        per_iteration += [Series(f"{name}, first {K}", [(counts[t], at(t, K)) for t in range(last)], colour),
                          Series(f"{name}, all so far", [(counts[t], at(t, counts[t])) for t in range(last)],
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
    """§A.2: L1 against tokens per image set with its base's floor (dotted), and per complexity level the
    gap between Tab. 1's two lengths relative to the floor and the tokens the default rule picks."""
    sets = [(name, row) for name, row in familiarity.items() if isinstance(row, dict) and "l1" in row]
    colour = lambda i: (0, 0, 0) if i == 0 else COLOURS[i - 1]  # noqa: E731 (in distribution in black)
    curves = []
    for i, (name, row) in enumerate(sets):
        curves += [Series(name, list(row["l1"].items()), colour(i)),
                   Series(f"{name}, base alone", [(c, row["base_l1"]) for c in counts], colour(i), dashed=True)]
    panels = [Panel("L1 against tokens, unseen images (Sec. A.2)", "tokens", "L1", curves,
                    xticks=[(k, str(k)) for k in counts])]
    levelled = [(i, name, row) for i, (name, row) in enumerate(sets) if "per_level" in row]
    if levelled:
        levels = sorted(levelled[0][2]["per_level"])
        short, full = familiarity["lengths"]
        for key, title in (("relative_gap", f"(L1 at {short} - L1 at {full} tokens) / base alone's L1"),
                           ("tokens, default", f"tokens the default rule picks ({familiarity['criterion']})")):
            panels.append(Panel(title, "complexity level", "tokens" if key.startswith("tokens") else "relative gap",
                                [Series(name, [(c, row["per_level"][c][key]) for c in levels], colour(i))
                                 for i, name, row in levelled], xticks=[(c, str(c)) for c in levels], bars=True))
    draw_panels(path, panels)


def plot_segments(path, segments: dict, counts: list):
    """Tab. 2: the mIoU of the main reading's segments per iteration (the decoder's maps of the first K
    tokens, heads averaged), per X of both thresholdings and with X chosen per image, per matching; then
    at X best per image, beside the second reading, the per-head maps and the controls."""
    ticks = [(k, str(k)) for k in counts]
    tables, main = segments["tables"], segments["main reading"]
    panels = []
    for matching in ("best token", "hungarian"):
        series = []
        for thresholding, dashed in (("percentile", False), ("mass", True)):
            rows = tables[main][thresholding][matching]
            series += [Series(f"{thresholding}, top {x}" if x != "best X per image" else f"{thresholding}, {x}",
                              list(row.items()), COLOURS[i] if x != "best X per image" else (0, 0, 0), dashed=dashed)
                       for i, (x, row) in enumerate(rows.items())]
        panels.append(Panel(f"{main}: {matching}", "tokens at the iteration", "mIoU over the objects", series,
                            xticks=ticks))
    # a colour per source of maps, solid for the first K tokens and dashed for all of the iteration's (the
    # untrained ALIT's, a lone point at the last iteration, in a colour of its own)
    colour = {"decoder, heads": (0, 0, 0), "shuffled": COLOURS[7], "encoder": COLOURS[4],
              "untrained ALIT's decoder, tokens": COLOURS[3], "untrained": COLOURS[1]}
    for thresholding in ("percentile", "mass"):
        series = [Series(name, list(table[thresholding]["best token"]["best X per image"].items()),
                         next(c for prefix, c in colour.items() if name.startswith(prefix)),
                         dashed="tokens 1-" not in name) for name, table in tables.items()]
        series.append(Series(f"decoder, per head, tokens 1-{counts[0]}, mean over heads",
                             list(segments["per head"][f"{thresholding}, best token"]["mean over heads"].items()),
                             COLOURS[8]))
        panels.append(Panel(f"{thresholding}, best X per image, best token: readings and controls",
                            "tokens at the iteration", "mIoU over the objects", series, xticks=ticks))
    draw_panels(path, panels, size=(620, 420), columns=2)
