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
from extras.cli import number
from losses import TERMS, VGG_LAYERS, lambdas

# The CPU's yardsticks (fp32): a 2048² sgemm, and a 3x3 convolution of batch N, C -> C channels, S x S
# pixels; shapes at which MKL and oneDNN run at their best on a 2-core AVX-512 CPU (docs/speed.md).
MATMUL_N, CONV_SHAPE = 2048, (32, 256, 32)
STICK_SECONDS = 0.5  # per yardstick per round: about one step's time, so both sides see the same load
BUSY_SPREAD = 1.3  # rounds further apart than this (max/min): the host is busy, the ratio uncertain


def compile_models(modules, mode):
    """torch.compile each module with static shapes: a run's batch never changes, and dynamic=False
    keeps a new call pattern (a log step's extra, measured-only passes) from making every graph
    symbolic; each (module, call pattern) compiles once. mode "reduce-overhead" also replays each
    graph as a CUDA graph, for small batches where launching ~1,000 kernels a step is the bottleneck."""
    return [torch.compile(m, mode=mode, dynamic=False) for m in modules]


def yardsticks(device):
    """The device's best dense rates, as workloads: name -> (run, FLOPs of one run). A large matmul
    (fp32 on the CPU, bf16 on CUDA) and a large 3x3 convolution, forward and backward, in the same
    dtype. Both count: MKL's sgemm runs well below the oneDNN convolutions on some x86 CPUs (AMD EPYC:
    ~205 vs ~300 GFLOP/s on 2 cores), so the matmul alone is no peak there, and the convolution alone
    none where the BLAS is the faster. FLOPs are counted as FlopCounterMode counts the step's:
    2 per multiply-add; a convolution's backward is two more of its forward (input and weight grads)."""
    cpu = device.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    n = MATMUL_N if cpu else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    N, C, S = CONV_SHAPE if cpu else (64, 512, 64)
    # channels_last: the convolution libraries' native layout (oneDNN's on the CPU; NCHW costs reorders)
    conv = torch.nn.Conv2d(C, C, 3, 1, 1, bias=False).to(device, dtype, memory_format=torch.channels_last)
    x, dy = (torch.randn(N, C, S, S, device=device, dtype=dtype).to(memory_format=torch.channels_last)
             for _ in range(2))
    x.requires_grad_()

    def conv_fwd_bwd():
        conv(x).backward(dy)
        x.grad = conv.weight.grad = None  # no accumulation: the same work every run

    sticks = {"matmul": (lambda: a @ b, 2 * n ** 3), "conv": (conv_fwd_bwd, 3 * 2 * N * C * C * 9 * S * S)}
    for run, _ in sticks.values():
        run()  # the first call picks and builds the kernels: not part of any timing
    return sticks


def rate(run, flops, seconds, sync):
    """GFLOP/s of `run` repeated for about `seconds` (at least once)."""
    reps, t0 = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < seconds:
        run()
        reps += 1
        sync()
    return flops * reps / (time.perf_counter() - t0) / 1e9


def best_peak(peak_gflops):
    """Rounds of yardstick rates ({name: GFLOP/s} each) -> (the fastest yardstick, its best rate)."""
    return max(((k, max(p[k] for p in peak_gflops)) for k in peak_gflops[0]), key=lambda kv: kv[1])


def verdict(step_gflops, peak_gflops):
    """Interleaved rounds -> the numbers bench reports. step_gflops: the step's achieved GFLOP/s in
    each round; peak_gflops: per round, each yardstick's GFLOP/s. The best of each side is the host's
    quiet moment (a busy host only ever slows a round down), and the peak is the best of all
    yardsticks. A step faster than every yardstick proves the machine can do more: the step is its
    own yardstick then, so utilization stays <= 1, and peak_kind "step" says the yardsticks fell short.
    spread: the larger max/min over rounds of the step's and the yardstick's rate; a busy host
    moves it, and best-of-each may then pair moments unlike each other."""
    kind, peak = best_peak(peak_gflops)
    step = max(step_gflops)
    if step > peak:
        kind, peak = "step", step
    spread = max(max(s) / min(s) for s in (step_gflops, [max(p.values()) for p in peak_gflops]))
    return {"achieved_gflops": step, "peak_gflops": peak, "peak_kind": kind, "utilization": step / peak,
            "spread": spread, "busy": spread > BUSY_SPREAD}


def interleaved(one, sticks, steps, rounds, seconds, sync, log=print):
    """`steps` training steps (`one`) in `rounds` blocks, each block followed by a run of every
    yardstick: on a shared host the load changes within seconds, and a step timed minutes away from
    its yardstick measures another machine. Returns each block's seconds per step and each round's
    yardstick rates."""
    step_s, peaks, t0 = [], [], time.time()
    for r in range(rounds):
        n = steps // rounds + (r < steps % rounds)
        t = time.perf_counter()
        for _ in range(n):
            one()
        sync()
        step_s.append((time.perf_counter() - t) / n)
        peaks.append({k: rate(run, f, seconds, sync) for k, (run, f) in sticks.items()})
        sticks_now = ", ".join(f"{k} {v:.0f}" for k, v in peaks[-1].items())
        log(f"  round {r + 1}/{rounds}: {n} steps, {step_s[-1]:.2f} s each; yardsticks {sticks_now} GFLOP/s "
            f"({time.time() - t0:.0f} s)")
    return step_s, peaks


def fast_vs_plain(step, models, args, device, b, lam, hm, amp):
    """The fast path (fused passes, VGG in bf16 when amp, TF32 convolutions on CUDA) against the plain
    one (four separate passes, all IEEE fp32), from the same weights on the same batch. Returns the
    largest relative loss difference and, for G's gradient of each weighted term lambda_k L_k alone and
    of their sum L_G ("G"), the relative norm of the difference, ||g_fast - g_plain|| / ||g_plain||.
    step: the training step; models(args, device): fresh G, D, VGG and optimisers from one seed."""
    def grad(fast, only):
        G, D, vgg, _ = models(args, device)
        # learning rates of 0: the step computes and keeps every gradient, and moves no weight
        opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=0.0) for m in (G, D))
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=fast):
            terms = step(G, D, vgg, opt_G, opt_D, b, {t: lam[t] if t in only else 0.0 for t in lam}, hm,
                         fused=fast, amp=fast and amp)
        grad = torch.cat([p.grad.flatten().float() for p in G.parameters()])
        return {k: v.item() for k, v in terms.items()}, grad

    weighted = [t for t in TERMS if lam[t]]
    loss_diff, grad_diff = 0.0, {}
    for name, only in [(t, {t}) for t in weighted] + [("G", set(weighted))]:
        (t_fast, g_fast), (t_plain, g_plain) = grad(True, only), grad(False, only)
        loss_diff = max(loss_diff, *(abs(t_fast[k] - t_plain[k]) / max(abs(t_plain[k]), 1e-8)
                                     for k in t_plain))
        grad_diff[name] = ((g_fast - g_plain).norm() / g_plain.norm()).item()
    return loss_diff, grad_diff


def bench_models(args, device, lr_g, lr_d, betas, seed=0):
    """Fresh G, D, a VGG of random features and both Adam optimisers from one seed: bench times the maths."""
    torch.manual_seed(seed)
    G = networks.build_generator(args).to(device)
    D = networks.Discriminator(ndf=args["ndf"]).to(device)
    vgg = networks.VGG19(VGG_LAYERS, args["vgg_widths"] or networks.VGG_WIDTHS).to(device)
    networks.to_layout(vgg, device)  # as train's
    opts = (torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas),
            torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas))
    return G, D, vgg, opts


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
    print(f"note: no dataset ({root} not built, no --data): random tensors, which exaggerate bf16's "
          "differences")
    S, g = args["size"], torch.Generator().manual_seed(0)
    b = {k: torch.rand(B, 3, S, S, generator=g) * 2 - 1 for k in ("I_s", "I_t")}
    b.update({k: torch.rand(B, 68, 2, generator=g) * (S - 1) for k in ("lm_s", "lm_m", "lm_t")})
    return {k: v.to(device) for k, v in b.items()}, "random"


def warm_up(one, steps, device, sync):
    """`steps` untimed steps (at least one); returns the last one's peak memory in MiB (on the CPU the
    process's peak RSS), taken before bench allocates its yardsticks."""
    for i in range(max(steps, 1)):
        if i == max(steps, 1) - 1 and device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()  # not the compiling steps' transient buffers
        one()
    sync()
    return (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20


def report(res, busy, schedule):
    """bench's result as aligned lines, its caveats, then the whole as one JSON line (the last)."""
    for k, v in res.items():
        if k != "fast_vs_plain_grad_rel_by_term":
            print(f"  {k:24s} {v}")
    print("  G's gradient of each lambda_k L_k, fast vs plain (relative):  " +
          "  ".join(f"{k} {v:.2g}" for k, v in res["fast_vs_plain_grad_rel_by_term"].items()))
    paper, B = schedule / res["triplets_per_s"], res["batch_size"]
    print(f"  {f'paper schedule ({schedule / 1e3:.1f}k)':24s} {data.clock(paper)} of steps")
    print(f"  {f'--steps 200 (batch {B})':24s} {data.clock(200 * B / res['triplets_per_s'])} of steps "
          "(a first run; a busy host takes longer)")
    if res["peak_kind"] == "step":
        print("note: the step outran every yardstick, so it is the peak itself (utilization 1): "
              "extras/speed.py's yardstick shapes do not suit this device")
    if busy:
        print(f"warning: the rounds differ by {res['spread']:.2f}x (> {BUSY_SPREAD}): the host is busy and "
              "the utilization uncertain; rerun when it is quieter, or with more --steps")
    print(json.dumps(res))


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
    one = lambda: step(G_run, D_run, vgg_run, opt_G, opt_D, b, lam, hm, amp=amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"bench: {device}, batch {B} ({batch_kind}), {S} px, "
          f"G {networks.count_params(G) / 1e6:.1f}M params, "
          f"{args['steps']} timed steps" + (f", torch.compile {args['compile']}" if args["compile"] else ""))
    with FlopCounterMode(display=False) as counter:  # the eager step: the maths, not what a compiler fused
        step(G, D, vgg, opt_G, opt_D, b, lam, hm, amp=amp)
    gflop = counter.get_total_flops() / 1e9 / B
    mem = warm_up(one, args["warmup"], device, sync)
    sticks = yardsticks(device)
    rounds = min(args.get("rounds") or args["steps"], args["steps"])  # default: a round per step
    step_s, peaks = interleaved(one, sticks, args["steps"], rounds, STICK_SECONDS, sync)
    del sticks
    ratio = verdict([gflop * B / s for s in step_s], peaks)
    loss_diff, grad_diff = fast_vs_plain(step, models, args, device, b, lam, hm, amp)
    step_s = min(step_s)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    res = {"device": name, "batch": batch_kind, "compile": args["compile"], "batch_size": B,
           "triplets_per_s": round(B / step_s, 2),
           "gflop_per_triplet": round(gflop, 2), "achieved_gflops": round(ratio["achieved_gflops"], 1),
           "peak_gflops": round(ratio["peak_gflops"], 1), "peak_kind": ratio["peak_kind"],
           "utilization": round(ratio["utilization"], 3), "spread": round(ratio["spread"], 2),
           "rounds": rounds,
           "step_ms": round(step_s * 1e3, 1), "peak_mem_mb": round(mem, 1),
           "fast_vs_plain_loss_rel": float(f"{loss_diff:.2g}"),
           "fast_vs_plain_grad_rel": float(f"{grad_diff['G']:.2g}"),
           "fast_vs_plain_grad_rel_by_term": {k: float(f"{v:.2g}") for k, v in grad_diff.items() if k != "G"}}
    report(res, ratio["busy"], schedule)
    return res


def add_options(p):
    """`facesynth.py bench`'s own options, after the model options it shares with train."""
    p.add_argument("--steps", type=number(), default=10, help="timed steps")
    p.add_argument("--warmup", type=number(int, 0), default=2, help="untimed steps first (allocation)")
    p.add_argument("--rounds", type=number(), help="blocks of timed steps, each followed by the yardsticks "
                   "(default: one per step; at most --steps)")
    p.add_argument("--size", type=number(int, 16), default=64,
                   help="image size of random batches (a dataset has its own)")
