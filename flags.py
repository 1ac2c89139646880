"""Command-line flags as argparse a reader can see: every script declares each of its flags on one line,
its default, allowed values and help together (`Parser.add`), and a wrong value of any flag ends in one
`error:` line naming it. Here: the types that check a value, the flags every training loop shares
(`add_run_flags`), and the defaults that follow from other flags (the paper's run, the CPU recipe).
"""
import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from data import DATASETS, check_layout

# The paper's data: with these and no --preset, the scripts set up the paper's model and run.
PAPER_DATASETS = ("imagenet100", "imagenet")


class Number:
    """A flag's type: an int or a float from low to high, None for no bound; `ends` "[]" closed, "(" or
    ")" open."""

    def __init__(self, kind, low=None, high=None, ends="[]"):
        self.kind, self.low, self.high, self.ends = kind, low, high, ends

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}")
        low_ok = self.low is None or (value > self.low if self.ends[0] == "(" else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.ends[1] == ")" else value <= self.high)
        if value != value or not (low_ok and high_ok):  # NaN is in no range
            raise argparse.ArgumentTypeError(f"{text} is not {self}")
        return value

    def __str__(self):
        if self.high is None:
            return f"{'>' if self.ends[0] == '(' else '>='} {self.low}"
        return f"in {self.ends[0]}{self.low}, {self.high}{self.ends[1]}"


class Numbers:
    """Comma-separated values of a Number type, kept as the text given (as a tuple with as_tuple); `auto`:
    the word auto is allowed too."""

    def __init__(self, item: Number, empty_ok=False, as_tuple=False, auto=False):
        self.item, self.empty_ok, self.as_tuple, self.auto = item, empty_ok, as_tuple, auto

    def __call__(self, text):
        if self.auto and text == "auto":
            return text
        if not text.strip():
            if self.empty_ok:
                return () if self.as_tuple else text
            raise argparse.ArgumentTypeError("an empty list")
        values = []
        for position, item in enumerate(text.split(","), 1):
            try:
                values.append(self.item(item.strip()))
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentTypeError(f"item {position} of {text!r}: {error}") from None
        return tuple(values) if self.as_tuple else text

    def __str__(self):
        return ("auto or " if self.auto else "") + f"list of {self.item.kind.__name__} {self.item}" + (
            ", or empty" if self.empty_ok else "")


class PathKind:
    """A file (not a folder), a folder this run may create or write in, or an existing folder."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, text):
        path, wrong = Path(text), None
        existing = next(p for p in [path, *path.absolute().parents] if p.exists())  # what it is or would be in
        if not text:
            wrong = "an empty path"
        elif self.kind == "file":
            wrong = path.is_dir() and f"{text} is a folder, not a file"
        elif path.exists() and not path.is_dir():
            wrong = f"{text} is a file, not a folder"
        elif self.kind == "existing folder" and not path.is_dir():
            wrong = f"{text} does not exist or is not a folder"
        elif not existing.is_dir():
            wrong = f"{text} cannot be a folder: {existing} is a file"
        elif self.kind == "folder" and not os.access(existing, os.W_OK | os.X_OK):
            wrong = f"{text} cannot be written: {existing} is not writable"
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
        return text

    def __str__(self):
        return {"file": "a file, not a folder", "folder": "a folder to write in"}.get(self.kind, f"an {self.kind}")


FILE, FOLDER, EXISTING_FOLDER = PathKind("file"), PathKind("folder"), PathKind("existing folder")


class Custom:
    """A flag's type checked by a function of its text that raises ValueError saying what is wrong (the flag
    keeps its text); the function's docstring's first line says what the flag takes."""

    def __init__(self, check):
        self.check = check

    def __call__(self, text):
        try:
            self.check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    def __str__(self):
        return self.check.__doc__.strip().split("\n")[0]


def only_auto(text):
    """the flag alone, or auto"""
    if text != "auto":
        raise ValueError(f"{text!r}: give the flag alone, or auto")


FLAG_OR_AUTO = Custom(only_auto)  # --resume, --resume auto, --no-resume


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag. `add` declares a flag with its default and its
    allowed values in its help; every flag parses to None unless given, so that `parse` knows what the
    command line set, and fills in the defaults other flags imply, then the declared ones."""

    def __init__(self, doc: str):
        super().__init__(description=doc.split("\n\n")[0])
        self.declared = {}  # dest -> the declared default

    def error(self, message):
        sys.exit(f"error: {re.sub(r'^argument ', '', message)} (see --help)")

    def add(self, flag, default, kind, help, choices=None, default_text=None, aliases=()):
        """--flag of `kind` (bool, str, or a type above); `default_text`: how --help states a default that
        is decided later."""
        shown = default_text or ("none" if default is None else default)
        text = f"{help} (default: {shown}{'; ' + str(kind) if kind not in (bool, str) else ''})".replace("%", "%%")
        if kind is bool:
            action = self.add_argument(flag, *aliases, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is FLAG_OR_AUTO:
            action = self.add_argument(flag, *aliases, nargs="?", const=True, type=kind, metavar="auto", help=text)
            self.add_argument("--no-" + flag[2:], dest=action.dest, action="store_const", const=False,
                              help=argparse.SUPPRESS)
        else:
            metavar = "A,B,..." if isinstance(kind, Numbers) else None
            action = self.add_argument(flag, *aliases, type=kind, choices=choices, metavar=metavar, help=text)
        self.declared[action.dest] = default

    def parse(self, argv=None, implied=lambda args: {}) -> tuple:
        """(the flags, the names the command line set); unset flags take implied(args)'s value, else their
        declared default."""
        args = self.parse_args(argv)
        given = {name for name, value in vars(args).items() if value is not None}
        for name, value in {**self.declared, **implied(args)}.items():
            if name not in given:
                setattr(args, name, value)
        return args, given


def check(condition: bool, message: str):
    """A flag's value the types cannot judge alone (it depends on another flag): one error line."""
    if not condition:
        sys.exit(f"error: {message}")


def config_error(error: ValueError, *config_classes) -> str:
    """A config's own ValueError (its __post_init__ checks) as an error line naming the flags of its fields."""
    message = str(error)
    for cls in config_classes:
        for f in dataclasses.fields(cls):
            message = re.sub(rf"\b{f.name}\b", "--" + f.name.replace("_", "-"), message)
    return f"error: {message}"


def check_data(dataset: str, data_dir: str | None, splits=("train", "val")):
    """A wrong --data-dir stops before any work starts, with a one-line error (data.check_layout)."""
    for split in splits:
        try:
            check_layout(dataset, split, data_dir)
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"error: {error}")


def paper_scale(image_size: int) -> bool:
    """Whether a model has the paper's image size (256x256, §A.5): it trains and is evaluated with the
    official recipe and criterion; the CPU presets below it need their own (docs/faithfulness.md)."""
    return image_size >= 256


def with_recipe(args, image_size: int, official: dict, cpu: dict):
    """The recipe flags left unset (None): each script's OFFICIAL_RECIPE at the paper's 256x256, its
    CPU_RECIPE below (the values a few thousand CPU steps need; docs/faithfulness.md)."""
    for name, value in (official if paper_scale(image_size) else cpu).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def add_run_flags(p: Parser, out_dir: str, steps: int, batch_size: int, warmup_steps: int):
    """The flags every training loop has: data, length and batch, logging and checkpoints, devices."""
    p.add("--dataset", "shapes", str, "shapes is drawn on the fly; the others read --data-dir; imagenet100 and "
          "imagenet also mean the paper's model and run (the script's PAPER_RUN) unless given", choices=DATASETS)
    p.add("--data-dir", None, EXISTING_FOLDER, "root of the image folder (imagenet: <root>/train/<wnid>/*.JPEG)")
    p.add("--out-dir", out_dir, FOLDER, "checkpoint, image grids")
    p.add("--steps", steps, Number(int, 1), "optimizer steps; the lr schedule spans them")
    p.add("--epochs", None, Number(float, 0, ends="(]"), "the run's length in passes over the training set: "
          "sets --steps from the global batch (the paper's run: 200)")
    p.add("--warmup-epochs", None, Number(float, 0), "likewise for --warmup-steps (the paper's run: 20)")
    p.add("--global-batch", None, Number(int, 1), "the images a step sees over all ranks, whatever their number: "
          "--grad-accum fills what the ranks' batches lack, and the batch a rank shrinks where the ranks exceed "
          "it (the paper's run: its own); none: batch x grad-accum x ranks")
    p.add("--grad-accum", 1, Number(int, 1), "micro-batches per optimizer step (gradients synced on the last only)")
    p.add("--stop-after", 0, Number(int, 0), "stop this run after so many steps (0: never); --resume continues "
          "on the same schedule")
    p.add("--batch-size", batch_size, Number(int, 1), "per rank (and per micro-step)")
    p.add("--train-images", None, Number(int, 1), "use only the first so many training images (shapes: the "
          "split's size)")
    p.add("--warmup-steps", warmup_steps, Number(int, 0), "of linear lr warm-up, then cosine decay")
    p.add("--min-lr-ratio", 0.1, Number(float, 0, 1), "cosine decay ends at this x the peak lr")
    p.add("--grad-clip", 1.0, Number(float, 0, ends="(]"), "maximum gradient norm")
    p.add("--num-workers", None, Number(int, 0), "DataLoader processes per rank", default_text="on CUDA the CPUs "
          "of this machine shared by its ranks, less one each (distributed.data_workers); on the CPU none")
    p.add("--log-every", 25, Number(int, 1), "steps between the progress bar's loss figures (a sync point)")
    p.add("--sample-every", None, Number(int, 1), "write an image grid PNG every so many steps",
          default_text="250, or the steps / 100 where more: at most about 100 grids a run")
    p.add("--save-every", None, Number(int, 1), "steps between checkpoints (and at the end, and at a stop)",
          default_text="250 below 256x256; at 256 by time alone (--save-minutes)")
    p.add("--save-minutes", None, Number(float, 0, ends="(]"), "minutes between checkpoints, by rank 0's clock",
          default_text="30 at 256x256 (the paper's runs: a stop loses at most that); none below")
    p.add("--stop-check-every", None, Number(int, 1), "steps between the ranks' agreement on a stop signal and "
          "a checkpoint due by the clock (one small all-reduce; on CUDA a wait for the GPU)",
          default_text="1 on the CPU, 10 on CUDA")
    p.add("--seed", 0, Number(int, 0), "of the weights, the data order and the augmentation")
    p.add("--device", "auto", str, "auto: CUDA when available", choices=("auto", "cuda", "cpu"))
    p.add("--bf16", None, bool, "bf16 autocast", default_text="where bf16 is native (recent GPUs, AVX512-BF16/AMX)")
    p.add("--bf16-gradients", None, bool, "under DDP, all-reduce the gradients as bf16: half the bytes a step "
          "sends (bench.py)", default_text="with --bf16")
    p.add("--compile", False, bool, "torch.compile the transformer blocks (the first steps pay for compiling)")
    p.add("--resume", False, FLAG_OR_AUTO, "continue from <out-dir>/ckpt.pt (ckpt.prev.pt if it is unreadable); "
          "auto: continue if there is one, else start afresh (a requeued or torchrun --max-restarts job)")
    p.add("--overwrite", False, bool, "start over in an --out-dir that holds a checkpoint: it and the run's "
          "images are deleted")
    p.add("--accept-changes", False, bool, "--resume a checkpoint whose global batch, steps, learning rate or "
          "warm-up differ from this run's: go on with this run's from the images it has seen")
    p.add("--dry-run", False, bool, "print the resolved run plan as one JSON line and exit, without training")
    p.add("--keep-freed-memory", True, bool, "on the CPU, keep freed memory in the process "
          "(distributed.keep_freed_memory)")
    p.add("--dist-timeout", 300.0, Number(float, 0, ends="(]"), "seconds a collective waits for the other ranks: "
          "a lost rank ends the run with an error")
    p.add("--max-bad-images", 0.25, Number(float, 0, 1), "a training image that fails to decode is skipped with a "
          "warning; more than this fraction of a batch failing stops the run")


def parse_run_args(p: Parser, argv, paper_run: dict, small_run: dict) -> tuple:
    """A training script's flags: with --dataset imagenet100/imagenet the paper's run (`paper_run`), else
    `small_run`, for what the command line leaves unset. A length given in steps wins over one implied in
    epochs; one given both ways is refused. Returns (the flags, the names the command line set)."""
    def implied(args):
        run = dict(paper_run if args.dataset in PAPER_DATASETS else small_run)
        for steps, epochs in (("steps", "epochs"), ("warmup_steps", "warmup_epochs")):
            check(getattr(args, steps) is None or getattr(args, epochs) is None,
                  f"--{steps.replace('_', '-')} and --{epochs.replace('_', '-')} both set the run's length: "
                  "pass one of them")
            if getattr(args, steps) is not None:
                run.pop(epochs, None)
        return run

    return p.parse(argv, implied)
