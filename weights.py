"""Pretrained weight files: read them without executing code.

The official ALIT, VQGAN and VAE checkpoints (the weights §2 builds on), torchvision's VGG16 and the
LPIPS head (the perceptual loss of §A.5) and pytorch-fid's Inception (rFID, Table 1) are pickles
written by other people's code. `torch.load(weights_only=True)` unpickles tensors and plain
containers only, so opening one cannot run code. Each loader (`ALIT.from_official`,
`VQGAN.from_official`, `VAE.from_official`, `LPIPS.from_pretrained`, `InceptionV3.from_pytorch_fid`)
reads its file here, renames keys with its own written table, and loads them with `load_exact`.
Our own checkpoints are read here too (`load_checkpoint`): by `ALIT.from_checkpoint`,
`VQGAN.from_checkpoint`, `VAE.from_checkpoint` and `checkpoint.resume`, so that the models need
nothing of the training machinery.

Where the files are: a flag names one (a path, or a bare file name looked up as below); without
the flag, each file is looked up by its canonical name in $ALIT_WEIGHTS, then in the torch hub
cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), where torchvision
and pytorch-fid keep their downloads. Nothing is downloaded.

The models a run starts from, by the flag that names them: `load_model` (a missing file, or one of
another kind, is one `error:` line naming the flag), an ALIT (`load_alit`: evaluate.py, analyze.py, stage 2)
and stage 1's frozen base (`find_base`, `load_base`), which its checkpoints record by file (`file_record`)
and ALIT.from_checkpoint reads back (`load_recorded_base`).
"""
import argparse
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def read_weights(path_or_state_dict) -> dict:
    """The dict stored in a weight file (a dict passes through unchanged).

    The only non-tensor object the official training checkpoints carry is the argparse Namespace
    of their run arguments; it is allowed here, nothing else.
    """
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {path_or_state_dict}") from None
        except Exception as error:  # torch's message spans many lines: its gist
            unsafe = re.search(r"GLOBAL (\S+)", str(error))
            reason = f"it holds a pickled {unsafe[1]}, which could run code" if unsafe else "truncated or corrupt"
            raise RuntimeError(f"{path_or_state_dict}: cannot be read as a checkpoint ({reason})") from None


# Checkpoints written before RNG states were stored as tensors hold numpy's as an array: exactly the
# globals that rebuild a plain array are allowed for them, nothing that could run code.
NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]


def load_checkpoint(path) -> dict:
    """One of our checkpoints, read with weights_only=True: tensors and plain values only, so that a
    checkpoint someone passes around cannot run code. An unreadable or refused file raises a one-line
    ValueError naming it (a missing one FileNotFoundError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): a save or a copy that never finished")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        unsafe = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(error))
        if unsafe:
            raise ValueError(f"{path} refused: it holds a pickled {unsafe[1] or unsafe[2]}, which could run code when "
                             "loaded (our checkpoints hold only tensors and plain values)") from None
        raise ValueError(f"{path} is not a readable checkpoint: truncated or corrupt") from None


def source_name(path_or_state_dict) -> str:
    """How error messages name a weight file: its path, or 'state dict'."""
    return "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)


def load_exact(model: torch.nn.Module, state: dict, where: str = "state dict") -> None:
    """Load `state` into `model`: equal key sets and shapes, or a one-line error naming `where`.

    load_state_dict reports the keys that do not match; its size-mismatch error spans many lines
    and comes only after the copying, so shapes are checked first.
    """
    ours = model.state_dict()
    for key in sorted(ours.keys() & state.keys()):
        if ours[key].shape != state[key].shape:
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(ours[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)
        raise KeyError(f"{where}: keys do not match the model; missing keys {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                       f"{' ...' if len(unexpected) > 10 else ''}")


# -----------------------------------------------------------------------------
# Finding the files


@dataclass(frozen=True)
class Pretrained:
    names: tuple  # canonical file names, searched for in that order (the publisher's first)
    what: str  # what the file is, for messages
    source: str  # where it comes from


PRETRAINED = {
    "inception": Pretrained(("pt_inception-2015-12-05-6726825d.pth",), "pytorch-fid's FID Inception",
                            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                            "pt_inception-2015-12-05-6726825d.pth"),
    "vgg16": Pretrained(("vgg16-397923af.pth",), "torchvision's VGG16 (the LPIPS trunk)",
                        "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "lpips": Pretrained(("vgg.pth",), "the LPIPS v0.1 VGG head",
                        "github.com/richzhang/PerceptualSimilarity, lpips/weights/v0.1/vgg.pth "
                        "(also inside `pip install lpips`)"),
    # The official ALIT code saves it as base_tokenizers/pretrained_models/vqgan.ckpt; MAGE names it
    # vqgan_jax_strongaug.ckpt.
    "vqgan": Pretrained(("vqgan.ckpt", "vqgan_jax_strongaug.ckpt"), "MAGE's ImageNet VQGAN (the official ALIT code's)",
                        "MAGE (github.com/LTH14/mage): Google Drive file 13S_unB87n6KKuuMdyMnyExW0G1kplTbP"),
    # MAR's KL-16 VAE: the official ALIT code saves it as base_tokenizers/pretrained_models/vae.ckpt,
    # MAR as pretrained_models/vae/kl16.ckpt.
    "vae": Pretrained(("vae.ckpt", "kl16.ckpt"), "MAR's KL-16 VAE (the official ALIT code's VAE base)",
                      "MAR (github.com/LTH14/mar, util/download.py): www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/"
                      "kl16.ckpt, which the official ALIT code downloads as vae.ckpt"),
    "alit": Pretrained((), "an official ALIT checkpoint",
                       "the official README's table (github.com/ShivamDuggal4/adaptive-length-tokenizer), "
                       "e.g. alit_small_vqgan_quantized_latents.pth, alit_small_vae_quantized_latents.pth"),
}


def weight_dirs() -> list:
    """Where files are looked for by name: $ALIT_WEIGHTS, then the torch hub cache."""
    dirs = [Path(os.environ["ALIT_WEIGHTS"]).expanduser()] if os.environ.get("ALIT_WEIGHTS") else []
    return dirs + [Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights(kind: str, flag: str, given: str | None = None) -> Path | None:
    """The file behind `flag`: `given` if it is a file, else a bare name `given` found in weight_dirs();
    without `given`, the first canonical name of PRETRAINED[kind] found there, or None. A given file
    that is nowhere raises FileNotFoundError with a one-line message: where it was looked for and
    where it comes from."""
    info, dirs = PRETRAINED[kind], weight_dirs()
    if given:
        path = Path(given).expanduser()
        if path.is_file():
            return path
        bare = path.name == given
        for folder in dirs if bare else []:
            if (folder / given).is_file():
                return folder / given
        where = f" here nor in {', '.join(map(str, dirs))}" if bare else ""
        raise FileNotFoundError(f"{flag} {given}: not found{where}; {info.what} comes from {info.source}")
    for folder in dirs:
        for name in info.names:
            if (folder / name).is_file():
                return folder / name
    return None


def not_found(kind: str, flag: str) -> str:
    """What to say when a file looked up by name is in none of the folders."""
    info, dirs = PRETRAINED[kind], ", ".join(map(str, weight_dirs()))
    folders = dirs if os.environ.get("ALIT_WEIGHTS") else f"{dirs} (or a folder named by $ALIT_WEIGHTS)"
    return (f"{' / '.join(info.names)}, {info.what}, is not in {dirs}: pass {flag} PATH or put it in "
            f"{folders}; it comes from {info.source}")


def find_perceptual(vgg16: str | None, lpips: str | None) -> tuple:
    """The two files of the LPIPS loss, (VGG16, LPIPS head): each flag's, else found by name. When a
    file is not there the pair is (None, None) and training runs without the loss (a --vgg16-weights
    given alone is read as one combined LPIPS state dict, LPIPS.from_pretrained)."""
    trunk = find_weights("vgg16", "--vgg16-weights", vgg16)
    if lpips and trunk is None:
        raise FileNotFoundError(f"--lpips-weights needs --vgg16-weights: {not_found('vgg16', '--vgg16-weights')}")
    head = find_weights("lpips", "--lpips-weights", lpips)
    if trunk is None or (head is None and not vgg16):
        return None, None
    return trunk, head


def perceptual_missing() -> str:
    """Which files of the LPIPS loss are in none of the weight folders, and where they come from."""
    return "; ".join(not_found(kind, flag) for kind, flag in (("vgg16", "--vgg16-weights"),
                                                              ("lpips", "--lpips-weights"))
                     if find_weights(kind, flag) is None)


# -----------------------------------------------------------------------------
# The models a run starts from, by the flag that names them


def load_model(flag: str, path, load, missing: str = ""):
    """load(path), with a missing file or one of another kind ending the run in one `error:` line that
    names the flag (and, for a missing file, says `missing`: what to do)."""
    if not Path(path).is_file():
        sys.exit(f"error: {flag} {path} not found{'; ' + missing if missing else ''}")
    try:
        return load(path)
    except (KeyError, ValueError, RuntimeError) as error:  # not a checkpoint of that kind: its one-line reason
        sys.exit(f"error: {flag}: {error.args[0]}")


def load_alit(official: str | None, heads, ckpt, ckpt_flag: str, ema: bool, missing: str):
    """The ALIT a script starts from: an official checkpoint (--official, with --heads for sizes no preset
    has) or one of ours (`ckpt`, its EMA or raw weights), one error line if the file will not do."""
    from model import ALIT  # (model.py imports this module)
    if official:
        heads = None if heads is None else tuple(int(h) for h in heads.split(","))
        heads = heads[0] if heads and len(heads) == 1 else heads
        return load_model("--official", official, lambda path: ALIT.from_official(path, heads=heads))
    return load_model(ckpt_flag, ckpt, lambda path: ALIT.from_checkpoint(path, ema=ema), missing)


# Stage 1's frozen base tokenizer, per ALITConfig.base: train_vqgan.py's out-dir, and the flag of the
# official code's file (PRETRAINED: MAGE's VQGAN, MAR's KL-16).
BASE_FILES = {"vqgan": ("out/vqgan/ckpt.pt", "--vqgan-official"), "vae": ("out/vae/ckpt.pt", "--vae-official")}


def find_base(args, base: str, official_fits: bool):
    """Which file stage 1 distils (load_base loads it): the official one its flag names, else a --base-ckpt
    given, else the official one found by name where it fits the preset (`official_fits`: the 256x256
    presets), else train_vqgan.py's out/<base>/ckpt.pt. Sets args.base_ckpt and args.official_base."""
    own_checkpoint, own_flag = BASE_FILES[base]
    for other, (_, flag) in BASE_FILES.items():
        if other != base and getattr(args, flag[2:].replace("-", "_")):
            sys.exit(f"error: {flag} is the official {other.upper()}; with --base {base} pass {own_flag}")
    given = getattr(args, own_flag[2:].replace("-", "_"))
    try:
        found = find_weights(base, own_flag, given) if given or (official_fits and args.base_ckpt is None) else None
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    args.official_base = found and str(found)
    args.base_ckpt = args.base_ckpt or own_checkpoint
    return args


def load_base(args, base: str, cls, expected, log=print):
    """The base tokenizer find_base named, of class `cls` (VQGAN or VAE); its grid and tokens must be those
    the preset's base config `expected` describes."""
    own_checkpoint, own_flag = BASE_FILES[base]
    paper = expected.image_size >= 256
    command = f"python train_vqgan.py --base {base}" + (
        f" --dataset {args.dataset} --data-dir {args.data_dir or 'DIR'}" if paper else "")
    train = f"train one with {command} and pass it as --base-ckpt" + (
        f"; or {not_found(base, own_flag)}" if paper else "")
    if args.official_base:
        flag, path = own_flag, args.official_base
        model = load_model(flag, path, lambda p: cls.from_official(p, image_size=expected.image_size))
    else:
        flag, path = "--base-ckpt", args.base_ckpt
        model = load_model(flag, path, cls.from_checkpoint, train)
    if model.config.describe() != expected.describe():
        sys.exit(f"error: the {base.upper()} in {path} ({model.config.describe()}) does not fit preset "
                 f"{args.preset!r} ({expected.describe()}): {train}")
    log(f"base {base.upper()}: {flag} {path}")
    return model


def file_record(path, official: bool) -> dict:
    """A weight file as a checkpoint records it in place of its weights (stage 1's frozen base, ~1 GB at
    the paper's size): where it is, how it is read (the official code's format or ours), and its sha256,
    which load_recorded_base and a resume check."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"path": str(path), "official": official, "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def load_recorded_base(record: dict, cls, image_size: int, where):
    """The base tokenizer (VQGAN or VAE class `cls`) a checkpoint (`where`) recorded by file (file_record):
    a ValueError of one line if the file is gone or is no longer the one trained over."""
    path = Path(record["path"])
    if not path.is_file():
        raise ValueError(f"{where} keeps its frozen base as the file {path}, which is gone: put it back there")
    if file_record(path, record["official"])["sha256"] != record["sha256"]:
        raise ValueError(f"{where} was trained over another {path} (its sha256 differs): put back the file it "
                         "recorded")
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: not from the caller's stream
        return cls.from_official(str(path), image_size=image_size) if record["official"] else cls.from_checkpoint(path)
