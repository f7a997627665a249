"""Speed, which the paper never measured: how fast one training step runs against what the device can
do at best, and whether the fast path (fused passes, bf16 VGG on CUDA, compiled modules) computes what
the plain one does. `python facesynth.py bench` runs it with facesynth's step.
"""
import json
import os
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import networks
from losses import TERMS, lambdas


def compile_models(modules, mode):
    """torch.compile each module with static shapes: a run's batch never changes, and dynamic=False
    keeps a new call pattern (a log step's extra, measured-only passes) from making every graph
    symbolic; each (module, call pattern) compiles once. mode "reduce-overhead" also replays each
    graph as a CUDA graph, for small batches where launching ~1,000 kernels a step is the bottleneck."""
    return [torch.compile(m, mode=mode, dynamic=False) for m in modules]


def matmul_peak(device, seconds=1.0):
    """The device's own dense-matmul rate in GFLOP/s (fp32 on the CPU, bf16 on CUDA): the yardstick
    a training step's achieved rate is measured against, taken in the same process."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.time()
        while reps == 0 or time.time() - t0 < seconds / 3:
            a @ b
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.time() - t0) / 1e9)
    return best


def fast_vs_plain(step, models, args, device, b, lam, hm, amp):
    """The fast path (fused passes, VGG in bf16 when amp, TF32 convolutions on CUDA) against the plain
    one (four separate passes, all IEEE fp32), from the same weights on the same batch. Returns the
    largest relative loss difference and, for G's gradient of each weighted term lambda_k L_k alone and
    of their sum L_G ("G"), the relative norm of the difference, ||g_fast - g_plain|| / ||g_plain||.
    step: the training step; models(args, device): fresh G, D, VGG and optimisers from one seed."""
    def grad(fast, only):
        G, D, vgg, (opt_G, opt_D) = models(args, device)
        opt_G.step = lambda *a, **k: None  # keep the weights: we compare gradients, not updates
        # measure=True runs every pass and term whichever weights are on: the full step's graph, of
        # which only the terms in `only` reach G's gradient
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=fast):
            terms = step(G, D, vgg, opt_G, opt_D, b, {t: lam[t] if t in only else 0.0 for t in lam}, True,
                               hm, fused=fast, amp=fast and amp)
        return {k: v.item() for k, v in terms.items()}, torch.cat([p.grad.flatten().float() for p in G.parameters()])

    weighted = [t for t in TERMS if lam[t]]
    loss_diff, grad_diff = 0.0, {}
    for name, only in [(t, {t}) for t in weighted] + [("G", set(weighted))]:
        (t_fast, g_fast), (t_plain, g_plain) = grad(True, only), grad(False, only)
        loss_diff = max(loss_diff, *(abs(t_fast[k] - t_plain[k]) / max(abs(t_plain[k]), 1e-8) for k in t_plain))
        grad_diff[name] = ((g_fast - g_plain).norm() / g_plain.norm()).item()
    return loss_diff, grad_diff


def bench_batch(args, device, cache):
    """A real training batch: from --data, else from the built-in synthetic set if it has been built.
    Without one, random tensors: noise images, whose losses and gradients are unlike training's (bf16's
    differences come out several times larger on them)."""
    root = args["data"] or os.path.join(cache, "prepared")
    B = args["batch_size"]
    if args["data"] or os.path.isfile(os.path.join(root, "split.json")):
        videos = data.load_videos(root, "train")
        feed = {"batch_size": B, "triplets_per_epoch": B, "seed": 0, "max_gap": None}
        return next(data.batches(videos, feed, 0, 1, device=device))[1], f"real ({root})"
    print(f"note: no dataset ({root} not built, no --data): random tensors, which exaggerate bf16's differences")
    S, g = args["size"], torch.Generator().manual_seed(0)
    b = {"I_s": torch.rand(B, 3, S, S, generator=g) * 2 - 1, "I_t": torch.rand(B, 3, S, S, generator=g) * 2 - 1}
    b.update({k: torch.rand(B, 68, 2, generator=g) * (S - 1) for k in ("lm_s", "lm_m", "lm_t")})
    return {k: v.to(device) for k, v in b.items()}, "random"


def bench(args, step, models, cache, schedule):
    """Time full training steps (G, D, all six terms, both optimiser steps) on one batch, against the
    device's own peak; `schedule` triplets (the paper's) give the time a whole run takes."""
    device = networks.pick_device(args["device"])
    amp = device.type == "cuda"  # as train: VGG in bf16 on CUDA, all fp32 on the CPU
    b, batch_kind = bench_batch(args, device, cache)
    B, S = args["batch_size"], b["I_s"].shape[-1]
    G, D, vgg, (opt_G, opt_D) = models(args, device)
    G_run, D_run, vgg_run = compile_models((G, D, vgg), args["compile"]) if args["compile"] else (G, D, vgg)
    lam = lambdas()
    hm = {"size": S, "sigma": data.SIGMA, "window": data.WINDOW}
    one = lambda: step(G_run, D_run, vgg_run, opt_G, opt_D, b, lam, False, hm, amp=amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"bench: {device}, batch {B} ({batch_kind}), {S} px, G {networks.count_params(G) / 1e6:.1f}M params, "
          f"{args['steps']} timed steps" + (f", torch.compile {args['compile']}" if args["compile"] else ""))
    with FlopCounterMode(display=False) as counter:  # the eager step: the maths, not what a compiler fused
        step(G, D, vgg, opt_G, opt_D, b, lam, False, hm, amp=amp)
    gflop = counter.get_total_flops() / 1e9 / B
    for _ in range(args["warmup"]):
        one()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(args["steps"]):
        one()
        if device.type == "cpu":
            data.progress("bench", i + 1, args["steps"], t0, unit="steps")
    sync()
    step_s = (time.time() - t0) / args["steps"]
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    peak = matmul_peak(device)
    loss_diff, grad_diff = fast_vs_plain(step, models, args, device, b, lam, hm, amp)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "batch": batch_kind, "compile": args["compile"], "batch_size": B, "triplets_per_s": round(B / step_s, 2),
           "gflop_per_triplet": round(gflop, 2),
           "achieved_gflops": round(gflop * B / step_s, 1), "peak_gflops": round(peak, 1),
           "utilization": round(gflop * B / step_s / peak, 3), "step_ms": round(step_s * 1e3, 1),
           "peak_mem_mb": round(mem, 1), "fast_vs_plain_loss_rel": float(f"{loss_diff:.2g}"),
           "fast_vs_plain_grad_rel": float(f"{grad_diff['G']:.2g}"),
           "fast_vs_plain_grad_rel_by_term": {k: float(f"{v:.2g}") for k, v in grad_diff.items() if k != "G"}}
    paper = schedule / res["triplets_per_s"]
    for k, v in res.items():
        if k != "fast_vs_plain_grad_rel_by_term":
            print(f"  {k:24s} {v}")
    print("  G's gradient of each lambda_k L_k, fast vs plain (relative):  " +
          "  ".join(f"{k} {v:.2g}" for k, v in res["fast_vs_plain_grad_rel_by_term"].items()))
    print(f"  {f'paper schedule ({schedule / 1e3:.1f}k)':24s} {data.clock(paper)} of steps")
    print(f"  {f'--steps 200 (batch {B})':24s} {data.clock(200 * B / res['triplets_per_s'])} of steps "
          "(a first run; a busy host takes longer)")
    print(json.dumps(res))
    return res
