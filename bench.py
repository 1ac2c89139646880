"""Speed and memory of this project, as ratios measured in one run (in the style of nanoGPT's bench.py).

Every figure is compared with a ceiling or an alternative measured in the same process, on
whatever device is present (timed with CUDA events on a GPU):
1. ceilings: FLOP/s of a large float32 and bf16 matrix product;
2. the stage-1 training step (forward + backward + AdamW, all 8 iterations, halting on) of the
   paper's `small` model and a `mid` model: images/s, model FLOPs per step (counted analytically
   from the config, `stage1_flops`), fraction of the float32 ceiling (the run's fastest product,
   and the products timed right before and after each step), float32 vs bf16 autocast, and
   whether bf16 follows the float32 loss curve over 50 steps of the tiny preset;
3. the frozen VQGAN's share of a stage-1 step: encoder run live vs its output precomputed;
4. adaptive encoding: early exit (pixel and token criteria) vs running every iteration and
   decoding every reconstruction for every image (the official encode);
5. FID Inception features: images/s in float32 and bf16, and how much bf16 moves features and FID;
6. memory: peak live tensor bytes of one stage-1 step with and without activation checkpointing,
   and from it the GPU memory at batch 32;
and each optimisation against its "before": channels-last VQGAN, fused AdamW, --compile, and
keeping freed memory on the CPU (a VQGAN encode with the C library's default allocator first).

    python bench.py            # 9-12 minutes on 2 CPU cores, with the host's speed
    python bench.py --quick    # about a minute: tiny sizes
    python bench.py --out bench.json
"""
import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import ALIT, ALITConfig, make_config
from train_stage1 import OFFICIAL_ITERATION_WEIGHTS, iteration_weights, stage1_loss
from training import FUSED_ADAMW_DEVICES, adamw, autocast, keep_freed_memory, native_bf16


def mid_config() -> ALITConfig:
    """256x256 over the imagenet VQGAN, encoder width 384, decoder 256, 4 layers and 4 heads each."""
    return make_config("small", encoder_width=384, encoder_layers=4, encoder_heads=4,
                       decoder_width=256, decoder_layers=4, decoder_heads=4)


# -----------------------------------------------------------------------------
# Timing

def timed(fn, reps: int, warmup: int, device, alongside=None) -> dict:
    """Median, min and max seconds of `fn()` over `reps` runs after `warmup` runs. alongside():
    a figure sampled right before and after each run (the ceiling); "alongside" lists the mean of
    each run's two samples."""
    for _ in range(warmup):
        fn()
    times, samples = [], []
    for _ in range(reps):
        before = alongside() if alongside else None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if alongside:
            samples.append((before + alongside()) / 2)
    result = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    return {**result, "alongside": samples, "times": times} if alongside else result


def matmul_flops(dtype, n: int, reps: int, device, fastest=True) -> float:
    """FLOP/s of single n^3 products. The ceiling of the run is the fastest of `reps` products;
    the ceiling alongside a timed step is the median of a few, taken right before and after it:
    this machine's speed drifts from one minute to the next (2048^3 products at 230-370
    GFLOP/s; the fastest of 10 at the start of a run was 354 in one run, 230 in another), so a
    step is compared with the speed the machine had while it ran, not only with the best
    moment of the run."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, reps, 2 if fastest else 1, device)["min" if fastest else "median"]
    return 2 * n ** 3 / seconds


# -----------------------------------------------------------------------------
# Model FLOPs, counted from the config

def transformer_flops(width: int, layers: int, tokens: int, mlp_ratio: float, attention=True) -> float:
    """Forward FLOPs of `layers` pre-norm blocks over `tokens` tokens: the q, k, v and output
    projections (4 w^2) and the MLP (2 mlp_ratio w^2) per token, 2 FLOPs per multiply-add, plus
    attention's two L x L x w products (QK^T and AV)."""
    per_token = 2 * (4 + 2 * mlp_ratio) * width ** 2
    return layers * (tokens * per_token + (2 * 2 * tokens ** 2 * width if attention else 0))


def vqgan_encoder_flops(model: ALIT) -> float:
    """Forward FLOPs of the VQGAN encoder for one image, from its convolutions' shapes."""
    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * module.in_channels * module.out_channels * k * output.shape[-2] * output.shape[-1]

    hooks = [m.register_forward_hook(count) for m in model.vqgan.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    size = model.config.image_size
    with torch.no_grad():
        model.vqgan.encoder(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


def alit_forward_flops(cfg: ALITConfig, attention=True) -> float:
    """Forward FLOPs of one image through all T iterations with the stage-1 loss. At iteration t
    (1-based) both transformers see 1 + N + t*K tokens; t*K latents are factorized, looked up in the
    codebook and embedded for the decoder; the head predicts N x VQGAN-codes logits, and the loss
    takes their expected code (softmax @ codebook). The patch embedding runs once."""
    N, K, D, E = cfg.num_image_tokens, cfg.tokens_per_iter, cfg.encoder_width, cfg.decoder_width
    codes, C = cfg.vqgan.codebook_size, cfg.vqgan.latent_channels
    flops = 2 * N * 3 * cfg.patch_size ** 2 * (D - C)  # patch embedding
    for t in range(1, cfg.rollout_iters + 1):
        tokens, latents = 1 + N + t * K, t * K
        flops += transformer_flops(D, cfg.encoder_layers, tokens, cfg.mlp_ratio, attention)
        flops += transformer_flops(E, cfg.decoder_layers, tokens, cfg.mlp_ratio, attention)
        flops += 2 * latents * (D * cfg.latent_dim + cfg.latent_dim * E)  # factorize + decoder_embed
        flops += 2 * latents * cfg.latent_codebook_size * cfg.latent_dim  # codebook distances
        flops += 2 * N * (E * 2 * E + 2 * E * codes)  # the head
        flops += 2 * N * codes * C  # expected code
    return flops


def stage1_flops(cfg: ALITConfig, batch: int, vqgan_flops: float) -> float:
    """One stage-1 step: backward = 2 x forward for the trained ALIT; the frozen VQGAN encoder
    (vqgan_flops per image) runs forward only."""
    return batch * (3 * alit_forward_flops(cfg) + vqgan_flops)


# -----------------------------------------------------------------------------
# The stage-1 step

def stage1_setup(cfg: ALITConfig, batch: int, device, grad_checkpoint=False, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(cfg, grad_checkpoint=grad_checkpoint)
    model = ALIT(cfg).to(device)
    model.vqgan.requires_grad_(False)
    optimizer = adamw(model.alit_parameters(), 1e-4, (0.9, 0.95), 0.05, device)  # as train_stage1.py
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    return model, optimizer, images


def stage1_step(model, optimizer, images, bf16, weights, precomputed=None, generator=None, before_update=None):
    """One training step; returns the loss tensor (no host sync). before_update() runs between
    the backward pass and AdamW's update (the memory section tells the two apart)."""
    device = images.device
    if precomputed is None:
        with torch.no_grad(), autocast(device, bf16):
            latents, gt = model.vqgan.encode(images)
    else:
        latents, gt = precomputed
    with autocast(device, bf16):
        records = model(images, latents, gt, halting=True, generator=generator)
        loss, _ = stage1_loss(model, records, gt, weights, 0.0, 1.0, 1.0)
    del records  # what backward needs, autograd keeps
    loss.backward()
    if before_update is not None:
        before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def bench_stage1(name, cfg, batch, device, reps, ceiling_fp32, bf16_available, precomputed_too=True,
                 matrix_size=2048) -> dict:
    """Seconds per step; its FLOP/s as a fraction of the run's float32 ceiling and of the ceiling
    measured alongside each timed step (the median of those per-step fractions)."""
    model, optimizer, images = stage1_setup(cfg, batch, device)
    weights = iteration_weights(OFFICIAL_ITERATION_WEIGHTS, cfg.rollout_iters)
    flops = stage1_flops(cfg, batch, vqgan_encoder_flops(model))
    result = {"config": name, "batch": batch, "flops_per_step": flops}
    ceiling_now = lambda: matmul_flops(torch.float32, matrix_size, 5, device, fastest=False)
    for precision in ["float32", "bf16"] if bf16_available else ["float32"]:
        # Two warm-up steps: the CPU allocator's heap settles only after the second (the first
        # timed step would otherwise fault hundreds of thousands of fresh pages in).
        t = timed(lambda: stage1_step(model, optimizer, images, precision == "bf16", weights), reps, 2, device,
                  alongside=ceiling_now)
        alongside = [flops / seconds / ceiling for seconds, ceiling in zip(t.pop("times"), t["alongside"])]
        result[precision] = {"seconds": t, "images_per_s": batch / t["median"],
                             "fraction_of_fp32_ceiling": flops / t["median"] / ceiling_fp32,
                             "fraction_of_fp32_ceiling_alongside": statistics.median(alongside)}
    if "bf16" in result:
        result["bf16_speedup"] = result["float32"]["seconds"]["median"] / result["bf16"]["seconds"]["median"]
    if not precomputed_too:
        return result
    # 3. the frozen VQGAN's share: the same step with its encoder output precomputed
    with torch.no_grad():
        precomputed = model.vqgan.encode(images)
    t = timed(lambda: stage1_step(model, optimizer, images, False, weights, precomputed), reps, 0, device)
    result["precomputed_vqgan"] = {"seconds": t,
                                   "speedup": result["float32"]["seconds"]["median"] / t["median"]}
    return result


def page_faults() -> int:
    """Minor page faults of this process so far: memory the kernel had to map in (and zero)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bf16_loss_curves(device, steps: int) -> dict:
    """The tiny preset trained `steps` steps in float32 and in bf16 autocast from the same start on
    the same batches. Tolerance: the mean relative gap of the two curves stays under 2%, the size
    of the step-to-step noise of the float32 curve itself at this batch size."""
    curves = {}
    for bf16 in (False, True):
        model, optimizer, _ = stage1_setup(make_config("tiny"), 4, device, seed=0)
        weights = iteration_weights(OFFICIAL_ITERATION_WEIGHTS, 8)
        data = torch.Generator().manual_seed(1)
        halting = torch.Generator(device).manual_seed(2)
        losses = []
        for _ in range(steps):
            images = torch.rand(4, 3, 32, 32, generator=data).to(device)
            losses.append(stage1_step(model, optimizer, images, bf16, weights, generator=halting))
        curves["bf16" if bf16 else "float32"] = torch.stack(losses).float().cpu()
    gap = ((curves["bf16"] - curves["float32"]).abs() / curves["float32"]).mean().item()
    noise = (curves["float32"].diff().abs() / curves["float32"][1:]).mean().item()
    return {"steps": steps, "mean_relative_gap": gap, "float32_step_to_step_noise": noise,
            "same_curve": gap < 0.02, "final": {k: v[-1].item() for k, v in curves.items()}}


# -----------------------------------------------------------------------------
# Optimisations, each against its own "before" in the same process

def vqgan_and_images(device, quick, batch):
    """The `imagenet` VQGAN and `batch` random 256x256 images; with --quick the tiny one and 32
    images of 32x32."""
    from vqgan import PRESETS, VQGAN, VQGANConfig
    size, batch = (32, 32) if quick else (256, batch)
    vqgan = VQGAN(VQGANConfig(**PRESETS["tiny" if quick else "imagenet"])).to(device).eval()
    return vqgan, torch.rand(batch, 3, size, size, device=device)


def bench_keep_freed_memory(device, reps, quick) -> dict:
    """A VQGAN encode (the part of a `mid` stage-1 step that faults its memory in every step)
    with the C library's default allocator, then after training.keep_freed_memory()."""
    vqgan, images = vqgan_and_images(device, quick, batch=4)
    result = {"image_size": images.shape[-1], "batch": len(images)}
    for name in ("before", "after"):
        if name == "after":
            result["applied"] = keep_freed_memory()
        with torch.no_grad():
            for _ in range(1 if name == "before" else 2):  # warm-ups; after: the heap settles in the second
                vqgan.encode(images)
            faults = page_faults()
            result[name] = timed(lambda: vqgan.encode(images), reps, 0, device)
        result[name]["page_faults_per_run"] = (page_faults() - faults) / reps
    result["speedup"] = result["before"]["median"] / result["after"]["median"]
    return result


def bench_optimisations(device, reps, quick) -> dict:
    """channels-last VQGAN weights (vqgan.py) vs the default layout, on a VQGAN encode; the fused
    AdamW kernel vs the for-each one; torch.compile of the transformer blocks (--compile) vs
    eager, on a stage-1 step of the tiny preset."""
    result = {}
    vqgan, images = vqgan_and_images(device, quick, batch=2)
    with torch.no_grad():
        channels_last = timed(lambda: vqgan.encode(images), reps, 1, device)
        vqgan.to(memory_format=torch.contiguous_format)
        contiguous = timed(lambda: vqgan.encode(images), reps, 1, device)
    result["channels_last_vqgan_encode"] = {"image_size": images.shape[-1], "batch": len(images), "before": contiguous,
                                            "after": channels_last,
                                            "speedup": contiguous["median"] / channels_last["median"]}
    # AdamW's update over as many weights as `small` trains (207M): for-each vs the fused kernel
    params = [torch.nn.Parameter(torch.randn(1024, 1024 if not quick else 64, device=device))
              for _ in range(198)]
    for p in params:
        p.grad = torch.randn_like(p)
    times = {}
    for name, kind in [("before", dict(foreach=True)), ("after", dict(fused=device.type in FUSED_ADAMW_DEVICES))]:
        optimizer = torch.optim.AdamW(params, lr=1e-4, **kind)
        times[name] = timed(optimizer.step, reps, 1, device)
    result["fused_adamw_small_update"] = {**times, "speedup": times["before"]["median"] / times["after"]["median"]}
    del params, optimizer
    if not quick:
        cfg, weights = make_config("tiny"), iteration_weights(OFFICIAL_ITERATION_WEIGHTS, 8)
        model, optimizer, images = stage1_setup(cfg, 16, device)
        eager = timed(lambda: stage1_step(model, optimizer, images, False, weights), reps, 1, device)
        model.compile_transformers()
        compiled = timed(lambda: stage1_step(model, optimizer, images, False, weights), reps, 2, device)
        result["compile_tiny_step"] = {"before": eager, "after": compiled, "speedup": eager["median"] / compiled["median"]}
    return result


# -----------------------------------------------------------------------------
# 4. Adaptive encoding

def bench_adaptive(cfg, batch, device, reps) -> dict:
    """Thresholds are set from the exhaustive per-image L1 table so that images stop at about 1/4,
    1/2 and 3/4 of the maximum tokens on average (an untrained model's L1 does not fall with
    tokens, so each image's stopping point is set by its own L1 curve). The timed exhaustive
    rollout also gives that table: at `mid` it is the section's largest cost (~7 s an image)."""
    from evaluate import code_error_below, first_passing, l1_below
    torch.manual_seed(0)
    model = ALIT(cfg).to(device).eval()
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    T = cfg.rollout_iters
    records = []

    def exhaustive():  # what the official encode does: every iteration, every reconstruction
        with torch.no_grad():
            records[:] = model.rollout(images)

    with torch.no_grad():
        _, gt = model.vqgan.encode(images)
    everything = timed(exhaustive, reps, 0, device)
    l1 = torch.stack([(r.recon.float().clamp(0, 1) - images).abs().mean(dim=(1, 2, 3)) for r in records]).cpu()
    codebook = model.vqgan.quantize.codebook().detach()
    code_error = torch.stack([(r.logits.float().softmax(-1) @ codebook - codebook[gt]).square().mean(dim=(1, 2))
                              for r in records]).cpu()
    results = {"batch": batch, "every_iteration_seconds": everything}
    for fraction in (0.25, 0.5, 0.75):
        thr = threshold_for(l1, fraction)
        token_thr = threshold_for(code_error, fraction)
        mean_pixel = ((first_passing(l1 < thr) + 1).float().mean() / T).item()
        mean_token = ((first_passing(code_error < token_thr) + 1).float().mean() / T).item()
        with torch.no_grad():
            pixel = timed(lambda: model.encode_adaptive(images, l1_below(thr)), reps, 0, device)
            token = timed(lambda: model.encode_adaptive(images, code_error_below(token_thr, codebook), token_space=True),
                          reps, 0, device)
        results[f"{fraction:g}"] = {
            "pixel": {"threshold": thr, "fraction_of_max_tokens": mean_pixel, "seconds": pixel,
                      "speedup": everything["median"] / pixel["median"]},
            "token": {"threshold": token_thr, "fraction_of_max_tokens": mean_token, "seconds": token,
                      "speedup": everything["median"] / token["median"]}}
    return results


def threshold_for(table, fraction):
    """The threshold on table (T, B) (pass = value < threshold) whose first-passing iterations
    average closest to `fraction` of T."""
    from evaluate import first_passing
    T = table.shape[0]
    values = table.flatten().sort().values
    candidates = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    # the mean stop falls as the threshold rises: bisect on the sorted candidates
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ((first_passing(table < candidates[mid]) + 1).float().mean() / T) > fraction:
            lo = mid + 1
        else:
            hi = mid
    return candidates[lo].item()


# -----------------------------------------------------------------------------
# 5. FID features

def bench_fid(device, batch, fid_images) -> dict:
    """Seeded weights with the real layout (the real file cannot be downloaded here): the speed is
    the same, and the bf16 feature error is of the same order as for the real weights. The timed
    forwards are the FID's own: `fid_images` shapes val images and their mirror images, in batches
    (the first one, the warm-up, untimed)."""
    from data import build_dataset
    from fid import FeatureStats, InceptionV3, fid_from_stats
    torch.manual_seed(0)
    net = InceptionV3().to(device).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    val = build_dataset("shapes", "val", 64, num_images=fid_images)
    real = [torch.stack([val[i][0] for i in range(start, min(start + batch, fid_images))]).to(device)
            for start in range(0, fid_images, batch)]
    batches = real + [chunk.flip(-1) for chunk in real]  # FID of the val set against its mirror image
    result = {"batch": batch, "images": fid_images}
    features = {}
    with torch.no_grad():
        for name, dtype in [("float32", None), ("bf16", torch.bfloat16)]:
            outputs = [net(batches[0], autocast_dtype=dtype).float()]  # the warm-up's features count too
            pending = iter(batches[1:])
            t = timed(lambda: outputs.append(net(next(pending), autocast_dtype=dtype).float()), len(batches) - 1, 0,
                      device)
            result[name] = {"seconds": t, "images_per_s": batch / t["median"]}
            features[name] = outputs
    a, b = torch.cat(features["float32"]), torch.cat(features["bf16"])
    result["bf16_feature_max_abs_diff"] = (a - b).abs().max().item()
    result["bf16_feature_relative_diff"] = ((a - b).norm() / a.norm()).item()
    fids = {}
    for name, outputs in features.items():
        stats = FeatureStats(), FeatureStats()
        for i, f in enumerate(outputs):
            stats[i >= len(real)].update(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-sample warning is expected here
            fids[name] = fid_from_stats(*stats)
    result["fid_shapes_val_vs_flipped"] = fids
    result["fid_bf16_shift"] = abs(fids["bf16"] - fids["float32"])
    result["fid_stays_float32"] = result["fid_bf16_shift"] > 0.1
    return result


# -----------------------------------------------------------------------------
# 6. Memory

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, op by op, split into what scales with the batch and what
    does not. This is what a GPU caching allocator must hold (before its rounding), measured on
    the CPU during a real step; the process's resident size would add the CPU allocator's slack
    (glibc keeps freed activations and hands them back in other sizes: 0.7 GB more than the
    tensors at `small`, batch 1, and over 2 GB with checkpointing).

    Every storage an op creates is tagged with the phase it was made in ("step": forward and
    backward, "optimizer": AdamW's update) and freed through a finalizer. After the step, `peak`
    re-tags the storages that ended up as gradients and optimizer state (parameter-sized, not
    per image).
    """

    def __init__(self):
        super().__init__()
        self.phase = "step"
        self.events = []  # (+bytes or -bytes, allocation id), in order
        self.alive = {}  # data_ptr -> (allocation id, bytes)
        self.kinds = []  # allocation id -> phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.track(t.untyped_storage())  # views and in-place results share an input's storage
        return out

    def track(self, storage):
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.alive:
            return
        alloc = len(self.kinds)
        self.kinds.append(self.phase)
        self.alive[ptr] = (alloc, nbytes)
        self.events.append((nbytes, alloc))
        weakref.finalize(storage, self.free, ptr, alloc)

    def free(self, ptr, alloc):
        if self.alive.get(ptr, (None,))[0] == alloc:
            nbytes = self.alive.pop(ptr)[1]
            self.events.append((-nbytes, alloc))

    def peak(self, gradient_ptrs, state_ptrs, batch_scale=1.0):
        """Peak over the step of (gradients + optimizer temporaries + batch_scale x the rest): the
        rest (activations, temporaries, inputs) is what grows with the batch. The optimizer state
        this first step creates is left out: in training it is there all along (add it once)."""
        tags = {self.alive[p][0]: "grad" for p in gradient_ptrs if p in self.alive}
        tags.update({self.alive[p][0]: "state" for p in state_ptrs if p in self.alive})
        live = {"grad": 0, "optimizer": 0, "step": 0, "state": 0}
        best = 0
        for nbytes, alloc in self.events:
            live[tags.get(alloc, self.kinds[alloc])] += nbytes
            best = max(best, live["grad"] + live["optimizer"] + batch_scale * live["step"])
        return best


def bench_memory(presets, batch: int, device) -> dict:
    """Peak memory of one stage-1 step (activations, gradients, AdamW's update, above the model
    and its optimizer state) at `batch`, with and without activation checkpointing, counted as
    live tensor bytes; then the GPU memory at batch 32 per GPU: weights + AdamW moments (alive
    for the whole step once training runs) + the step's peak with the per-image part scaled."""
    results = {}
    for preset in presets:
        row = {}
        for ckpt in (False, True):
            model, optimizer, images = stage1_setup(make_config(preset), batch, device, grad_checkpoint=ckpt)
            weights = iteration_weights(OFFICIAL_ITERATION_WEIGHTS, model.config.rollout_iters)
            tracker, grads = LiveTensorBytes(), []

            def before_update():  # keep the gradients (the step frees them) and tag AdamW's work
                grads.extend(p.grad for p in model.alit_parameters())
                tracker.phase = "optimizer"

            with tracker:
                stage1_step(model, optimizer, images, False, weights, before_update=before_update)
            grads = [g.untyped_storage().data_ptr() for g in grads]
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            state_bytes = sum(t.untyped_storage().nbytes() for t in state)
            state = [t.untyped_storage().data_ptr() for t in state]
            model_bytes = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
            row["grad_checkpoint" if ckpt else "plain"] = {
                "peak_bytes": state_bytes + tracker.peak(grads, state),
                "estimated_gb_at_batch_32": (model_bytes + state_bytes + tracker.peak(grads, state, 32 / batch)) / 1e9,
                "trainable_params": sum(p.numel() for p in model.alit_parameters())}
            del model, optimizer, tracker
        row["fits_80gb"] = {k: row[k]["estimated_gb_at_batch_32"] < 80 for k in ("plain", "grad_checkpoint")}
        results[preset] = row
    return results


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer repetitions, about a minute")
    parser.add_argument("--out", help="also write the numbers as JSON here")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 2)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or 2
    # bf16 steps only where bf16 is native: emulated bf16 (e.g. AVX512 without BF16) is several
    # times slower than float32, which the ceiling line shows without spending minutes on it.
    bf16 = native_bf16(device)
    report = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "native_bf16": native_bf16(device), "quick": args.quick}
    n = 1024 if args.quick else 2048
    report["ceiling"] = {"float32_flops": matmul_flops(torch.float32, n, 10, device),
                         "bf16_flops": matmul_flops(torch.bfloat16, n, 4, device), "matrix_size": n}
    ceiling = report["ceiling"]["float32_flops"]
    # (name, config, batch, timed repetitions, also time the step with the VQGAN precomputed):
    # a `small` step takes ~33 s on 2 CPU cores, so it times one step after its two warm-ups
    # (unless --reps says otherwise), and the VQGAN's share (the 40% case) is measured on
    # `mid` only.
    configs = ([("tiny", make_config("tiny"), 16, reps, True)] if args.quick else
               [("small", make_config("small"), 2, args.reps or 1, False), ("mid", mid_config(), 4, reps, True)])
    def section(name, fn):  # progress on stderr: the full run takes minutes
        start = time.perf_counter()
        report[name] = fn()
        print(f"bench: {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    if device.type == "cpu":
        # keep_freed_memory() (which the training scripts call on the CPU) cannot be undone in a
        # process, so its before/after runs first; it joins the optimisations below.
        section("keep_freed_memory", lambda: bench_keep_freed_memory(device, reps, args.quick))
    section("stage1", lambda: [bench_stage1(name, cfg, batch, device, n_reps, ceiling, bf16, precomputed, n)
                               for name, cfg, batch, n_reps, precomputed in configs])
    section("optimisations", lambda: bench_optimisations(device, reps, args.quick))
    if "keep_freed_memory" in report:
        report["optimisations"]["keep_freed_memory"] = report.pop("keep_freed_memory")
    section("bf16_loss_curve", lambda: bf16_loss_curves(device, 10 if args.quick else 50))
    # Every exhaustive `mid` rollout decodes 8 reconstructions per image at 256x256 (~7 s an image
    # on 2 CPU cores), so each encode is timed once. Batch 8: with fewer images, the mean stop
    # moves in steps of 1/(batch x 8) and a few late images keep the batch running.
    section("adaptive", lambda: bench_adaptive(make_config("tiny") if args.quick else mid_config(),
                                               32 if args.quick else 8, device, reps if args.quick else 1))
    section("fid", lambda: bench_fid(device, 10 if args.quick else 50, 20 if args.quick else 50))
    section("memory", lambda: bench_memory(["tiny"] if args.quick else ["small", "semilarge"],
                                           4 if args.quick else 1, device))
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(r: dict) -> str:
    c = r["ceiling"]
    lines = [f"device {r['device']}, {r['threads']} threads, torch {r['torch']}, native bf16: {r['native_bf16']}",
             f"ceiling: float32 matmul {c['float32_flops'] / 1e9:.0f} GFLOP/s, bf16 {c['bf16_flops'] / 1e9:.0f} "
             f"GFLOP/s ({c['matrix_size']}^3)", "",
             "| stage-1 step | batch | GFLOP/step | fp32 s/step | img/s | of fp32 ceiling (run / alongside) "
             "| bf16 s/step | bf16 x | VQGAN precomputed x |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in r["stage1"]:
        fp, bf = s["float32"], s.get("bf16")
        bf16_cells = f"{bf['seconds']['median']:.2f} | {s['bf16_speedup']:.2f}" if bf else "not native | -"
        lines.append(f"| {s['config']} | {s['batch']} | {s['flops_per_step'] / 1e9:.0f} | {fp['seconds']['median']:.2f} "
                     f"({fp['seconds']['min']:.2f}-{fp['seconds']['max']:.2f}) | {fp['images_per_s']:.2f} | "
                     f"{100 * fp['fraction_of_fp32_ceiling']:.0f}% / {100 * fp['fraction_of_fp32_ceiling_alongside']:.0f}% | "
                     f"{bf16_cells} | " + (f"{s['precomputed_vqgan']['speedup']:.2f} |" if "precomputed_vqgan" in s else "- |"))
    lines.append("(run: the fastest product of the run; alongside: the median product right before and after each step)")
    b = r["bf16_loss_curve"]
    for name, o in r["optimisations"].items():
        lines.append(f"optimisation {name}: {o['before']['median']:.3f} s -> {o['after']['median']:.3f} s, "
                     f"{o['speedup']:.2f}x")
    if "keep_freed_memory" in r["optimisations"]:
        k = r["optimisations"]["keep_freed_memory"]
        lines.append(f"  (keep_freed_memory: VQGAN encode, batch {k['batch']} at {k['image_size']}x{k['image_size']}; "
                     f"page faults per encode {k['before']['page_faults_per_run']:.0f} -> "
                     f"{k['after']['page_faults_per_run']:.0f})")
    lines += ["VQGAN precomputed: `train_stage1.py --token-cache DIR` stores each image's fixed crop and its mirror "
              "image with their VQGAN tokens (memory-mapped); it keeps flips and gives up random resized crops."]
    lines += ["", f"bf16 vs float32 loss curve over {b['steps']} tiny steps: mean relative gap "
              f"{100 * b['mean_relative_gap']:.2f}% (float32 step-to-step noise {100 * b['float32_step_to_step_noise']:.1f}%)"
              f" -> {'same curve' if b['same_curve'] else 'DIFFERENT'}", "",
              "| adaptive encode | tokens (pixel) | speed-up pixel | tokens (token) | speed-up token |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key in ("0.25", "0.5", "0.75"):
        a = r["adaptive"][key]
        lines.append(f"| stop at ~{key} | {a['pixel']['fraction_of_max_tokens']:.2f} | {a['pixel']['speedup']:.2f}x | "
                     f"{a['token']['fraction_of_max_tokens']:.2f} | {a['token']['speedup']:.2f}x |")
    f = r["fid"]
    lines += ["", f"FID Inception, batch {f['batch']}: float32 {f['float32']['images_per_s']:.1f} img/s, bf16 "
              f"{f['bf16']['images_per_s']:.1f} img/s; bf16 moves features by {100 * f['bf16_feature_relative_diff']:.2f}% "
              f"and FID by {f['fid_bf16_shift']:.3f} (more than 0.1: {f['fid_stays_float32']}); "
              "evaluation stays float32", "",
              "| memory, one step (live tensors) | peak above the weights | with grad checkpointing | est. GB at batch 32 (plain / ckpt) | fits 80 GB |",
              "| --- | ---: | ---: | ---: | --- |"]
    for preset, m in r["memory"].items():
        lines.append(f"| {preset} | {m['plain']['peak_bytes'] / 1e9:.2f} GB | {m['grad_checkpoint']['peak_bytes'] / 1e9:.2f} GB | "
                     f"{m['plain']['estimated_gb_at_batch_32']:.0f} / {m['grad_checkpoint']['estimated_gb_at_batch_32']:.0f} | "
                     f"{m['fits_80gb']['plain']} / {m['fits_80gb']['grad_checkpoint']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
