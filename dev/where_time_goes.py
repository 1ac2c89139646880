"""Where a script's time goes: runs one of the first command's scripts with timers on its parts.

Each part is a function or method the script calls (the encoder and decoder passes, the losses,
backward, the optimizer, the EMA, the data, logging, image grids, checkpoints; in evaluate.py each
pass and table). Time is given to the innermost part running (a part inside the discriminator step
is the discriminator's), so the rows add up to the run's wall time, the rest in "other". Nothing in
the script changes: the timers wrap its functions from outside.

    python dev/where_time_goes.py train_vqgan.py --no-bf16 --out-dir /tmp/w/vqgan
    python dev/where_time_goes.py train_stage1.py --no-bf16 --vqgan-ckpt /tmp/w/vqgan/ckpt.pt --out-dir /tmp/w/s1
    python dev/where_time_goes.py train_stage2.py --no-bf16 --stage1-ckpt /tmp/w/s1/ckpt.pt --out-dir /tmp/w/s2
    python dev/where_time_goes.py evaluate.py --ckpt /tmp/w/s2/ckpt.pt --compare /tmp/w/s1/ckpt.pt --out-dir /tmp/w/ev

Flags after the script's name are the script's own (`--steps`, `--stop-after` for a shorter run).
On the CPU every call returns when its work is done, so wall-clock timers measure the work; on
CUDA the numbers would be queueing times (this tool is for the CPU pipeline).
"""
import functools
import importlib
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import checkpoint  # noqa: E402
import convnet  # noqa: E402
import losses  # noqa: E402
import model as model_module  # noqa: E402
import optim  # noqa: E402
import quantize  # noqa: E402

seconds, calls = defaultdict(float), defaultdict(int)
stack = []  # [part, when its own time last resumed, opaque] of the parts running, innermost last


def timed(part, function, opaque=False):
    """function, its exclusive time going to `part`; inside an opaque part nothing else is split off."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if stack and stack[-1][2]:  # inside an opaque part
            return function(*args, **kwargs)
        now = time.perf_counter()
        if stack:
            seconds[stack[-1][0]] += now - stack[-1][1]
        stack.append([part, now, opaque])
        calls[part] += 1
        try:
            return function(*args, **kwargs)
        finally:
            now = time.perf_counter()
            seconds[part] += now - stack.pop()[1]
            if stack:
                stack[-1][1] = now
    return wrapper


def wrap(owner, name, part, opaque=False):
    setattr(owner, name, timed(part, getattr(owner, name), opaque))


def install(script):
    """Timers on the parts every script shares, then on the script's own."""
    inside_decoder = []
    transformer = model_module.Transformer.forward
    encoder_pass = timed("encoder passes", transformer)
    model_module.Transformer.forward = lambda self, x: (transformer if inside_decoder else encoder_pass)(self, x)
    decode = model_module.ALIT.predict_image_tokens

    def predict_image_tokens(self, latents):
        inside_decoder.append(True)
        try:
            return decode(self, latents)
        finally:
            inside_decoder.pop()
    model_module.ALIT.predict_image_tokens = timed("decoder passes (+ head)", predict_image_tokens)
    wrap(model_module.ALIT, "rollout_images", "image grids", opaque=True)
    wrap(model_module.ALIT, "factorize_and_quantize", "latent quantizer")
    wrap(model_module.ALIT, "halt", "halting")
    wrap(model_module.ALIT, "image_tokens", "image tokens (patch embedding)")
    wrap(model_module.ALIT, "images_from_prediction", "base decoder (from the prediction)")
    wrap(convnet.Encoder, "forward", "base encoder")
    wrap(convnet.Decoder, "forward", "base decoder")
    if script == "train_vqgan":  # in ALIT the latent quantizer runs inside factorize_and_quantize
        wrap(quantize.VectorQuantizer, "forward", "VQGAN quantizer")
    wrap(quantize.VectorQuantizer, "restart_dead_codes", "dead-code restarts")
    wrap(torch.Tensor, "backward", "backward")
    wrap(torch.optim.AdamW, "step", "optimizer")
    wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    wrap(optim.EMA, "update", "EMA")
    wrap(checkpoint, "save", "checkpoints", opaque=True)
    wrap(losses, "base_targets", "base targets", opaque=True)  # stage 1's, inside losses.stage1_loss
    module = importlib.import_module(script)
    for name, part, opaque in [("train_batches", None, False), ("reconstruction_loss", "loss", False),
                               ("stage1_loss", "loss", False), ("generator_gan_loss", "GAN generator loss", True),
                               ("discriminator_step", "discriminator step", True),
                               ("save_image_columns", "image grids", True), ("save_rollout", "image grids", True),
                               ("save_reconstructions", "image grids", True),
                               ("val_metrics", "end-of-run evaluation", True), ("load_base", "loading", True),
                               ("start_model", "loading", True), ("load_alit", "loading", True),
                               ("time_early_exit", "early-exit timing", True), ("plot_sweep", "figures", True),
                               ("save_fig2_grid", "figures", True), ("save_halting_figure", "figures", True)]:
        if not hasattr(module, name):
            continue
        if name == "train_batches":
            module.train_batches = timed_batches(module.train_batches)
        else:
            wrap(module, name, part, opaque)
    if script == "evaluate":  # the first pass is the checkpoint's, the second the --compare one's
        evaluate, passes = module.evaluate, []

        def evaluate_pass(*args, **kwargs):
            passes.append(None)
            part = "evaluation pass" if len(passes) == 1 else "evaluation pass (--compare)"
            return timed(part, evaluate, opaque=True)(*args, **kwargs)
        module.evaluate = evaluate_pass
    return module


def timed_batches(train_batches):
    """The batch stream, each next() timed as data (rendering, augmentation, collation)."""
    def wrapper(*args, **kwargs):
        stream = train_batches(*args, **kwargs)
        fetch = timed("data", lambda: next(stream))
        while True:
            yield fetch()
    return wrapper


def main():
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: python dev/where_time_goes.py SCRIPT.py [its flags]")
    script = Path(sys.argv[1]).stem
    module = install(script)
    start = time.perf_counter()
    module.main(sys.argv[2:])
    wall = time.perf_counter() - start
    rows = sorted(seconds.items(), key=lambda item: -item[1])
    rows.append(("other (setup, the loop, small ops)", wall - sum(seconds.values())))
    print(f"\n{script}: {wall:.1f} s, threads {torch.get_num_threads()}")
    print("| part | seconds | share | calls |\n| --- | ---: | ---: | ---: |")
    for part, value in rows:
        print(f"| {part} | {value:.1f} | {100 * value / wall:.1f}% | {calls.get(part, '')} |")


if __name__ == "__main__":
    main()
