"""The trained models a run starts from, found by name and checked against the preset before any step.

Stage 1 distils a frozen base tokenizer (§3): a VQGAN (train_vqgan.py's, or the official one) or a
VAE (train_vqgan.py --base vae's, or MAR's KL-16). Stage 2 fine-tunes a stage-1 ALIT (or an
official one). A file that is missing, of another kind or of another size ends the run with one
line naming the flag and what to do.
"""
import dataclasses
import sys
from pathlib import Path

import torch

from model import ALIT, ALITConfig, make_config
from quantize import exact_float32
from training import PAPER_DATASETS, check_flags, official_heads, paper_scale
from vae import VAE
from vqgan import PRESETS as VQGAN_PRESETS
from vqgan import VQGAN, VQGANConfig
from weights import find_weights, not_found

VQGAN_CKPT = "out/vqgan/ckpt.pt"  # where train_vqgan.py writes: stage 1's --vqgan-ckpt by default
VAE_CKPT = "out/vae/ckpt.pt"  # where train_vqgan.py --base vae writes: --vqgan-ckpt's default with --base vae


def vqgan_fits(theirs: VQGANConfig, ours: VQGANConfig) -> bool:
    """Whether a VQGAN's grid and codebook are those the model's config expects."""
    return (theirs.image_size, theirs.grid_size, theirs.codebook_size, theirs.latent_channels) == (
        ours.image_size, ours.grid_size, ours.codebook_size, ours.latent_channels)


def official_sized(model_cfg: ALITConfig) -> bool:
    """Whether the preset is built for the official VQGAN (the 256x256 ones)."""
    return vqgan_fits(model_cfg.vqgan, VQGANConfig(**{**VQGAN_PRESETS["imagenet"], "image_size": model_cfg.image_size}))


def find_base(train, model_cfg: ALITConfig):
    """Which base tokenizer stage 1 distils, found by name (load_base loads it): --vqgan-official, else a
    --vqgan-ckpt given, else for the 256x256 presets the official one if it is in the weight folders
    (weights.find_weights), else out/vqgan/ckpt.pt. A VAE alike, with --vae-official."""
    if model_cfg.base == "vae":
        check_flags([(not train.vqgan_official, "--vqgan-official is a VQGAN; with --base vae pass --vae-official")])
        default = train.vqgan_ckpt == VQGAN_CKPT
        if default:
            train = dataclasses.replace(train, vqgan_ckpt=VAE_CKPT)
        try:
            found = find_weights("vae", "--vae-official", train.vae_official) if train.vae_official or (
                paper_scale(model_cfg.image_size) and default) else None
        except FileNotFoundError as error:
            sys.exit(f"error: {error}")
        return dataclasses.replace(train, vae_official=found and str(found))
    check_flags([(not train.vae_official, "--vae-official needs --base vae")])
    if train.vqgan_official:
        try:
            return dataclasses.replace(train, vqgan_official=str(find_weights("vqgan", "--vqgan-official",
                                                                              train.vqgan_official)))
        except FileNotFoundError as error:
            sys.exit(f"error: {error}")
    found = find_weights("vqgan", "--vqgan-official") if official_sized(model_cfg) else None
    if found and train.vqgan_ckpt == VQGAN_CKPT:
        return dataclasses.replace(train, vqgan_official=str(found))
    return train


def vqgan_ways_out(train, model_cfg: ALITConfig) -> str:
    if not official_sized(model_cfg):
        return "train one with python train_vqgan.py (its tiny preset fits) and pass it as --vqgan-ckpt"
    return (f"{not_found('vqgan', '--vqgan-official')}; or train one with python train_vqgan.py --preset imagenet "
            f"--dataset {train.dataset} --data-dir {train.data_dir or 'DIR'} and pass it as --vqgan-ckpt")


def load_base_vae(train, model_cfg: ALITConfig, log=print) -> VAE:
    """The frozen VAE base (--base vae); its grid and token size must fit the preset."""
    flag, path = ("--vae-official", train.vae_official) if train.vae_official else ("--vqgan-ckpt", train.vqgan_ckpt)
    if not Path(path).is_file():
        official = f"; or {not_found('vae', '--vae-official')}" if paper_scale(model_cfg.image_size) else ""
        sys.exit(f"error: {flag} {path} not found; train one with python train_vqgan.py --base vae and pass it "
                 f"as --vqgan-ckpt{official}")
    try:
        vae = VAE.from_official(path, image_size=model_cfg.image_size) if train.vae_official else VAE.from_checkpoint(path)
    except (KeyError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {flag}: {error.args[0]}")
    ours, theirs = model_cfg.vae, vae.config
    if (theirs.image_size, theirs.grid_size, theirs.latent_channels) != (ours.image_size, ours.grid_size,
                                                                         ours.latent_channels):
        sys.exit(f"error: the VAE in {path} ({theirs.image_size}px -> {theirs.grid_size}x{theirs.grid_size} x "
                 f"{theirs.latent_channels}) does not fit preset {train.preset!r} ({ours.image_size}px -> "
                 f"{ours.grid_size}x{ours.grid_size} x {ours.latent_channels})")
    log(f"base VAE: {flag} {path}")
    return vae


def load_base(train, model_cfg: ALITConfig, log=print) -> VQGAN | VAE:
    """The base tokenizer find_base named; its grid and codebook must fit the preset (a VAE: load_base_vae)."""
    if model_cfg.base == "vae":
        return load_base_vae(train, model_cfg, log)
    if train.vqgan_official:
        flag, path = "--vqgan-official", train.vqgan_official
    else:
        flag, path = "--vqgan-ckpt", train.vqgan_ckpt
        if not Path(path).is_file():
            sys.exit(f"error: {flag} {path} not found; {vqgan_ways_out(train, model_cfg)}")
    try:
        if train.vqgan_official:
            vqgan = VQGAN.from_official(path, image_size=model_cfg.image_size)
        else:
            vqgan = VQGAN.from_checkpoint(path)
    except (KeyError, ValueError, RuntimeError) as error:  # not a VQGAN of that kind: one line naming the file
        sys.exit(f"error: {flag}: {error.args[0]}")
    ours, theirs = model_cfg.vqgan, vqgan.config
    if not vqgan_fits(theirs, ours):
        sys.exit(f"error: the VQGAN in {path} ({theirs.image_size}px -> {theirs.grid_size}x{theirs.grid_size}, "
                 f"{theirs.codebook_size} codes x {theirs.latent_channels}) does not fit preset "
                 f"{train.preset!r} ({ours.image_size}px -> {ours.grid_size}x{ours.grid_size}, "
                 f"{ours.codebook_size} codes x {ours.latent_channels}): {vqgan_ways_out(train, model_cfg)}")
    log(f"base VQGAN: {flag} {path}")
    return vqgan


def frozen_base(model: ALIT) -> ALIT:
    """Stage 1 trains the latent-distillation modules only: the VQGAN (or VAE) gets no gradient, no
    optimizer state, and stays outside the EMA."""
    model.base.requires_grad_(False).eval()
    return model


def base_targets(base: VQGAN | VAE, images):
    """The frozen VQGAN's encoding of images, which stage 1 distils: latents (B, C, g, g) and the
    nearest code of every grid cell (B, g*g); a VAE's: its tokens, a fresh posterior sample (the
    official get_img_tokens), (B, C, g, g) and as targets (B, g*g, C). In float32 whatever the autocast,
    the nearest code in exact float32 (quantize.exact_float32), so that bf16 and float32 runs distil
    the same targets. (On Ampere+ GPUs the convolutions stay TF32, as cuDNN runs them by default: exact
    float32 would make the encoder, 3% of a step's FLOPs, a fifth of its time on an H100.)"""
    with torch.no_grad(), exact_float32(images.device.type):
        return base.encode(images.float())


def load_stage1(train) -> ALIT:
    """The model stage 2 starts from, with its raw weights (training continues from them, not from
    the EMA): the stage-1 checkpoint or an official one. With --preset, it must hold a model of that
    preset; with --dataset imagenet100/imagenet and no --preset, a 256x256 one (the paper's)."""
    flag, path = ("--official", train.official) if train.official else ("--stage1-ckpt", train.stage1_ckpt)
    if not Path(path).is_file():
        sys.exit(f"error: --stage1-ckpt {path} not found; run train_stage1.py first, or pass --official CKPT")
    try:
        if train.official:
            model = ALIT.from_official(path, heads=official_heads(train.heads)).train()
        else:
            model = ALIT.from_checkpoint(path, ema=False).train()
    except (KeyError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {flag}: {error.args[0]}")
    cfg = model.config
    if train.preset is not None:
        try:  # the VQGAN may be the official one or our own: compare everything else
            expected = make_config(train.preset, base=cfg.base, vqgan=cfg.vqgan, vae=cfg.vae,
                                   official_vae_function=cfg.official_vae_function).to_dict()
        except ValueError:
            expected = None
        if expected != cfg.to_dict():
            sys.exit(f"error: {path} holds a model of another preset than --preset {train.preset!r}: {cfg}")
    elif train.dataset in PAPER_DATASETS and cfg.image_size != make_config("small").image_size:
        sys.exit(f"error: {flag} {path} holds a {cfg.image_size}x{cfg.image_size} model, not the paper's "
                 f"256x256 one that --dataset {train.dataset} trains: pass {flag} of a --dataset {train.dataset} "
                 "stage-1 run or --official CKPT (or --preset tiny to fine-tune a tiny model on these images)")
    return model
