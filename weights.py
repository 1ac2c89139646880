"""Pretrained weight files: read them without executing code.

The official ALIT and VQGAN checkpoints (the weights §2 builds on), torchvision's VGG16 and the
LPIPS head (the perceptual loss of §A.5) and pytorch-fid's Inception (rFID, Table 1) are pickles
written by other people's code. `torch.load(weights_only=True)` unpickles tensors and plain
containers only, so opening one cannot run code. Each loader (`ALIT.from_official`,
`VQGAN.from_official`, `LPIPS.from_pretrained`, `InceptionV3.from_pytorch_fid`) reads its file
here, renames keys with its own written table, and loads them with `load_exact`.
"""
import argparse

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
        except Exception as error:
            raise RuntimeError(f"{path_or_state_dict}: cannot be read as a checkpoint ({error})") from None


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
