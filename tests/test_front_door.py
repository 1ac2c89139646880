"""The front door: --dataset imagenet100 means the paper's run, pretrained files are found where users
keep them, every user mistake ends in one `error:` line, and no run replaces another's unasked."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_stage1
import train_stage2
import train_vqgan
import weights
from conftest import SMALL_ALIT
from data import IMAGENET100_CLASSES
from seeded import load_vectors
from weights import load_checkpoint
from vqgan import PRESETS as VQGAN_PRESETS
from vqgan import VQGAN, VQGANConfig

ROOT = Path(__file__).resolve().parent.parent
# `small` at 256x256 (16x16 grid, 8 x 32 tokens) with narrow transformers: its real width takes
# 4 minutes a step and 11 GB on 2 CPU cores.
NARROW = ["--encoder-width", "320", "--encoder-layers", "1", "--encoder-heads", "2", "--decoder-width", "64",
          "--decoder-layers", "1", "--decoder-heads", "2", "--no-bf16"]


def write_images(folder: Path, count: int, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        pixels = np.random.default_rng([seed, k]).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.JPEG")


@pytest.fixture(scope="module")
def imagenet100(tmp_path_factory):
    """A fake ImageNet-100: every class folder, two small JPEGs each, in train/ and val/."""
    root = tmp_path_factory.mktemp("imagenet100")
    for split in ("train", "val"):
        for i, wnid in enumerate(IMAGENET100_CLASSES):
            write_images(root / split / wnid, 2, i)
    return root


@pytest.fixture(scope="module")
def official_vqgan(tmp_path_factory):
    """Seeded stand-in weights in the official VQGAN's key layout, its grid and codebook (256x256 ->
    16x16, 1024 codes x 256), at the narrowest width official_config reads back."""
    torch.manual_seed(0)
    config = VQGANConfig(**{**VQGAN_PRESETS["imagenet"], "channels": 32, "num_res_blocks": 1})
    path = tmp_path_factory.mktemp("weights") / "vqgan.ckpt"
    torch.save({"state_dict": VQGAN(config).state_dict()}, path)
    return path


def run_script(script, *flags, cwd, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, flags)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def one_line_error(call, *args) -> str:
    """The message a script stops with: one line, `error: ...`, no traceback."""
    with pytest.raises(SystemExit) as stopped:
        call(*args)
    text = str(stopped.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- the paper's run

def test_imagenet100_trains_the_paper_preset_and_refuses_a_vqgan_that_does_not_fit(tmp_path, imagenet100,
                                                                                   official_vqgan):
    command = ["--dataset", "imagenet100", "--data-dir", imagenet100, "--steps", "1", "--batch-size", "2",
               "--grad-accum", "1"]
    done = run_script("train_stage1.py", *command, "--vqgan-official", official_vqgan, *NARROW, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "out" / "stage1" / "ckpt.pt")
    model, train = ckpt["model_config"], ckpt["train_config"]
    assert (model["image_size"], model["patch_size"], model["tokens_per_iter"], model["rollout_iters"]) == \
           (256, 16, 32, 8)
    assert model["vqgan"]["codebook_size"] == 1024 and model["vqgan"]["latent_channels"] == 256
    assert train["preset"] == "small" and train["base_lr"] == 1.5e-4 and ckpt["step"] == 1
    # --steps given wins; the paper's warmup of 20 epochs stays: 20 x 200 images / (2 a step)
    assert train["steps"] == 1 and train["warmup_steps"] == 2000 and train["epochs"] is None

    refused = run_script("train_stage1.py", *command, *NARROW, cwd=tmp_path / "out")  # no out/vqgan/ here
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: --base-ckpt out/vqgan/ckpt.pt not found")
    assert "--vqgan-official PATH" in line and "train_vqgan.py --base vqgan --dataset imagenet100" in line


def test_the_dataset_implies_the_paper_run(imagenet100, monkeypatch):
    data = ["--dataset", "imagenet100", "--data-dir", str(imagenet100)]
    train, model = train_stage1.parse_args(data)
    assert (train.preset, model.image_size, model.grid_size, model.tokens_per_iter, model.rollout_iters) == \
           ("small", 256, 16, 32, 8)
    # 200 epochs, 20 of warm-up, at a global batch of 256 on one process: 200 x 200 images / 256 steps ...
    assert (train.batch_size, train.grad_accum, train.steps, train.warmup_steps, train.base_lr) == \
           (32, 8, 156, 16, 1.5e-4)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train_stage1.parse_args(data)[0].grad_accum == 1  # ... and on 8
    assert train_stage1.parse_args(data + ["--grad-accum", "2"])[0].grad_accum == 2  # a flag given wins
    train, model = train_stage1.parse_args(data + ["--preset", "tiny"])  # asked for: tiny on ImageNet
    assert train.preset == "tiny" and model.image_size == 32 and train.base_lr == 3.2e-2
    assert train_stage1.parse_args([])[0].preset == "tiny"  # shapes: the CPU run, as before
    stage2 = train_stage2.parse_args(data)
    assert (stage2.batch_size, stage2.grad_accum, stage2.steps, stage2.warmup_steps, stage2.disc_layers) == \
           (12, 1, 417, 42, 3)  # 96 images a step on 8 ranks
    train, vqgan = train_vqgan.parse_args(data)
    assert train.preset == "imagenet" and vqgan.image_size == 256 and train.disc_layers == 3
    assert train_vqgan.parse_args([])[0].preset == "tiny"


# ----------------------------------------------------------------------------- pretrained files

def test_weights_are_found_by_name_in_torch_home_and_alit_weights(tmp_path, monkeypatch, imagenet100):
    hub, mine = tmp_path / "torch" / "hub" / "checkpoints", tmp_path / "mine"
    for folder, names in [(hub, ["vgg16-397923af.pth", "pt_inception-2015-12-05-6726825d.pth", "vgg.pth"]),
                          (mine, ["vgg.pth", "vqgan.ckpt", "alit_small_vqgan_quantized_latents.pth"])]:
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"stand-in")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert weights.find_weights("inception", "--inception-weights") == hub / "pt_inception-2015-12-05-6726825d.pth"
    assert weights.find_weights("lpips", "--lpips-weights") == hub / "vgg.pth"
    assert weights.find_weights("vqgan", "--vqgan-official") is None
    message = weights.not_found("vqgan", "--vqgan-official")
    assert str(hub) in message and "$ALIT_WEIGHTS" in message and "13S_unB87n6KKuuMdyMnyExW0G1kplTbP" in message

    monkeypatch.setenv("ALIT_WEIGHTS", str(mine))  # searched first
    assert weights.find_weights("lpips", "--lpips-weights") == mine / "vgg.pth"
    assert weights.find_weights("vqgan", "--vqgan-official") == mine / "vqgan.ckpt"
    assert weights.find_weights("alit", "--official", "alit_small_vqgan_quantized_latents.pth") == \
           mine / "alit_small_vqgan_quantized_latents.pth"  # a bare name, looked up
    given = tmp_path / "elsewhere.pth"
    given.write_bytes(b"stand-in")
    assert weights.find_weights("vgg16", "--vgg16-weights", str(given)) == given  # a flag wins
    with pytest.raises(FileNotFoundError, match=f"--official alit_base.pth: not found here nor in {mine}, {hub}; "
                                                "an official ALIT checkpoint comes from the official README"):
        weights.find_weights("alit", "--official", "alit_base.pth")
    assert weights.find_perceptual(None, None) == (hub / "vgg16-397923af.pth", mine / "vgg.pth")

    # ... and the scripts take them: stage 1 distils the official VQGAN, evaluation computes FID
    assert train_stage1.parse_args(["--dataset", "imagenet100", "--data-dir", str(imagenet100)])[0].official_base \
        == str(mine / "vqgan.ckpt")
    assert train_stage1.parse_args([])[0].official_base is None  # tiny: the official VQGAN does not fit
    cfg = evaluate.parse_args(["--official", "alit_small_vqgan_quantized_latents.pth"])
    assert (cfg.official, cfg.inception_weights) == (str(mine / "alit_small_vqgan_quantized_latents.pth"),
                                                     str(hub / "pt_inception-2015-12-05-6726825d.pth"))
    train = train_stage2.parse_args(["--official", "alit_small_vqgan_quantized_latents.pth"])
    assert (train.vgg16_weights, train.lpips_weights) == (str(hub / "vgg16-397923af.pth"), str(mine / "vgg.pth"))


# ----------------------------------------------------------------------------- official checkpoints

@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """The official code's tiny model (tests/data), saved as its checkpoints are: weights under 'ema'."""
    path = tmp_path_factory.mktemp("official") / "alit_tiny.pth"
    torch.save({"ema": load_vectors("alit_official", "tiny")["state_dict"]}, path)
    return path


def test_official_checkpoint_on_a_folder_of_images(tmp_path, official_tiny, capsys):
    write_images(tmp_path / "my_images", 6, 0)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # an earlier run's
    results = evaluate.main(["--official", str(official_tiny), "--heads", "4", "--dataset", "folder", "--data-dir",
                             str(tmp_path / "my_images"), "--speed-images", "4", "--out-dir", str(out)])
    assert results["images"] == 6 and results["checkpoint"] == str(official_tiny)
    assert f"replacing metrics.json in {out}" in capsys.readouterr().out
    assert (out / "reconstructions.png").is_file()


def test_stage2_fine_tunes_an_official_checkpoint(tmp_path, official_tiny):
    model = train_stage2.main(["--official", str(official_tiny), "--heads", "4", "--steps", "1", "--batch-size", "2",
                               "--disc-channels", "8", "--no-bf16", "--out-dir", str(tmp_path / "ft")])
    ckpt = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ckpt["step"] == 1 and ckpt["model_config"] == model.config.to_dict()
    assert model.config.encoder_width == 64 and model.config.rollout_iters == 4  # the official tiny model


# ----------------------------------------------------------------------------- nothing overwritten

def test_a_run_never_replaces_another_unasked(tmp_path, vqgan_ckpt):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt.pt", "ckpt.prev.pt", "rollout_000300.png", "notes.txt"):
        (out / name).write_bytes(b"the previous run's")
    flags = SMALL_ALIT + ["--vqgan-ckpt", str(vqgan_ckpt), "--steps", "1", "--batch-size", "2", "--out-dir", str(out)]
    line = one_line_error(train_stage1.main, flags)
    assert f"--out-dir {out} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert "pass one of them" in one_line_error(train_stage1.main, flags + ["--resume", "--overwrite"])
    train_stage1.main(flags + ["--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "notes.txt", "rollout_000001.png"]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 1


# ----------------------------------------------------------------------------- user mistakes

def fake_tree(root: Path, classes=()) -> Path:
    """train/ and val/ with an image in each class folder; without classes, images right in them."""
    for split in ("train", "val"):
        for i, wnid in enumerate(classes or [""]):
            write_images(root / split / wnid, 1, i)
    return root


def mistakes(tmp_path, vqgan_ckpt, stage1_ckpt, official_vqgan):
    """(script, its flags, what the one line must say[, working directory]), in the order a new user meets them."""
    data = ["--dataset", "imagenet100", "--data-dir"]
    two_classes = str(fake_tree(tmp_path / "two", IMAGENET100_CLASSES[:2]))
    flat = str(fake_tree(tmp_path / "flat"))
    fake_tree(tmp_path / "in100", IMAGENET100_CLASSES)
    (tmp_path / "old" / "out" / "stage2").mkdir(parents=True)
    (tmp_path / "old" / "out" / "stage2" / "ckpt.pt").write_bytes(stage1_ckpt.read_bytes())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"another run's")
    in100 = str(tmp_path / "in100")
    return [
        (train_stage1.main, ["--dataset", "imagenet100"], ["--dataset imagenet100 reads images from disk: pass "
                                                           "--data-dir (<data-dir>/train/<wnid>/"]),
        (train_stage1.main, data + [str(tmp_path / "nowhere")], [f"--data-dir: {tmp_path / 'nowhere'} does not exist"]),
        (train_stage1.main, data + [two_classes], ["98 of the 100 ImageNet-100 class folder(s) missing",
                                                   "--dataset imagenet takes any set of class folders"]),
        (train_stage1.main, data + [str(tmp_path / "in100" / "train")],
         [f"split folder {tmp_path / 'in100' / 'train' / 'train'} does not exist", "--dataset folder"]),
        (train_stage1.main, ["--dataset", "imagenet", "--data-dir", flat], ["no class folders", "--dataset folder"]),
        (evaluate.main, ["--dataset", "folder"], ["--dataset folder reads images from disk: pass --data-dir"]),
        (train_stage1.main, data + [in100, "--vqgan-ckpt", str(vqgan_ckpt)],
         ["(32px -> 8x8, 256 codes x 32) does not fit preset 'small' (256px -> 16x16, 1024 codes x 256)",
          "pass --vqgan-official PATH", "python train_vqgan.py --base vqgan --dataset imagenet100"]),
        (train_stage1.main, data + [in100, "--vqgan-official", "vqgan.ckpt"],
         ["--vqgan-official vqgan.ckpt: not found here nor in", "hub/checkpoints", "github.com/LTH14/mage"]),
        (train_stage1.main, data + [in100, "--vqgan-official", str(vqgan_ckpt)],
         [f"--vqgan-official: {vqgan_ckpt}: not an official VQGAN checkpoint"]),
        (train_stage1.main, data + [in100, "--vqgan-official", str(official_vqgan), "--out-dir",
                                    str(tmp_path / "run")],
         ["already holds a run", "pass --resume to continue it, --overwrite to start over"]),
        (train_vqgan.main, ["--vgg16-weights", "vgg16.pth"],
         ["--vgg16-weights vgg16.pth: not found here nor in", "download.pytorch.org/models/vgg16-397923af.pth"]),
        (train_vqgan.main, ["--lpips-weights", str(official_vqgan)], ["--lpips-weights needs --vgg16-weights"]),
        (train_stage2.main, data + [in100, "--stage1-ckpt", str(stage1_ckpt)],
         ["holds a 32x32 model, not the paper's 256x256 one", "--preset tiny"]),
        (train_stage2.main, ["--official", str(stage1_ckpt)], ["--official: ", "not an official ALIT checkpoint"]),
        (evaluate.main, ["--official", "alit_small_vqgan_quantized_latents.pth"],
         ["not found here nor in", "github.com/ShivamDuggal4/adaptive-length-tokenizer"]),
        (evaluate.main, ["--inception-weights", str(stage1_ckpt), "--ckpt", str(stage1_ckpt), "--out-dir",
                         str(tmp_path / "eval")], ["--inception-weights: "]),
        (evaluate.main, data + [in100], ["--ckpt out/stage2/ckpt.pt holds a 32x32 model", "--official CKPT"],
         tmp_path / "old"),  # the shapes pipeline's checkpoint where evaluate.py looks by default
    ]


def test_every_mistake_ends_with_one_line_naming_what_to_do(tmp_path, vqgan_ckpt, stage1_ckpt, official_vqgan,
                                                            monkeypatch):
    for call, flags, expected, *cwd in mistakes(tmp_path, vqgan_ckpt, stage1_ckpt, official_vqgan):
        monkeypatch.chdir(cwd[0] if cwd else tmp_path)
        line = one_line_error(call, flags)
        print(line)  # pytest -s shows them all
        assert all(text in line for text in expected), (flags, line)
