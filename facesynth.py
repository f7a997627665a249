"""facesynth: landmark-conditioned face reenactment after Kassapis, Verdenius & Ondrag,
"Face Image Synthesis conditioned on Target Landmark Appearance".

    python facesynth.py train                  # the paper's run on the built-in synthetic set
    python facesynth.py prepare SRC OUT        # your own 300VW copy -> a prepared dataset
    python facesynth.py synth OUT              # the synthetic talking heads in 300VW layout
    python facesynth.py bench                  # speed of one training step vs the hardware
    python facesynth.py ablation               # the paper's loss ablations, with numbers
    python facesynth.py reenact --ckpt runs/X --source FACE --driver DRIVER --out a.mp4

A generator G draws the source face I_s with the target landmarks e_t (as heatmaps):
Î_t = G(I_s; e_t). A PatchGAN D judges (image, landmarks) pairs. One training step:
G's four passes, D's update on real vs generated, then G's update on the six-term loss.
"""
import argparse
import copy
import csv
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import evaluate
import losses
import networks
from data import DataError, fail
from losses import TERMS

# ----------------------------------------------------------------------------- defaults
# The paper's: Adam, G 2e-4 / D 5e-5, 6 epochs of 9.5k triplets at 64 px. The paper is silent on
# Adam's betas and the batch size: betas from pix2pix, batch 16 (its code used 8; 16 keeps a
# 2-core CPU's matrix units busier and gives the same number of triplets per epoch).
LR_G, LR_D, BETAS = 2e-4, 5e-5, (0.5, 0.999)
EPOCHS, TRIPLETS_PER_EPOCH, BATCH_SIZE = 6, 9500, 16
NGF, N_DOWN, NDF = 64, 4, 32
LOG_EVERY, SAMPLE_EVERY, CKPT_EVERY = 50, 500, 500
CACHE = os.path.join("data", "synthetic")
# what --resume may change: the schedule (sticks from then on), and this session's own settings
SCHEDULE = {"steps", "epochs", "out"}
SESSION = {"device", "log_every", "sample_every", "ckpt_every", "compile"}


# ----------------------------------------------------------------------------- the step
def generator_passes(G, I_s, e_s, e_m, e_t, cycle=True, fused=True):
    """Î_t = G(I_s; e_t) and, for the consistency terms, G(Î_t; e_s), G(I_s; e_m), G(G(I_s; e_m); e_t).
    fused: passes that share no dependency run as one batched call (G normalises per sample,
    so this changes the speed, not the maths)."""
    if not cycle:
        return G(I_s, e_t), None, None, None
    if fused:
        fake, mid = G(torch.cat([I_s, I_s]), torch.cat([e_t, e_m])).chunk(2)
        cyc, tri = G(torch.cat([fake, mid]), torch.cat([e_s, e_t])).chunk(2)
    else:
        fake, mid = G(I_s, e_t), G(I_s, e_m)
        cyc, tri = G(fake, e_s), G(mid, e_t)
    return fake, mid, cyc, tri


def train_step(G, D, vgg, opt_G, opt_D, b, lam, measure, cfg, fused=True, amp=False):
    """One step on a batch b of device tensors. Returns the raw (unweighted) terms as tensors:
    every term with a weight, plus, when measure is set, the ablated ones (computed without grad),
    so that ablated runs can be compared term by term. Nothing here waits for the device.

    amp: VGG runs in bf16 autocast; G and D stay fp32 (TF32 tensor cores on CUDA). L_self and L_triple
    weigh (x100) small differences between generated images, and bf16 noise through G's four passes
    swamps them: with G, D and VGG in bf16, G's gradient moved 13 % from fp32 (L_self's part 12 %,
    L_triple's 19 %); with VGG alone in bf16, 0.16 % (bench's check, bf16 emulated on the CPU; README,
    Speed)."""
    torch.compiler.cudagraph_mark_step_begin()  # --compile reduce-overhead: last step's graph buffers are free
    I_s, I_t = b["I_s"], b["I_t"]
    e_s, e_m, e_t = (data.heatmaps(b[k], cfg["size"], cfg["sigma"], cfg["window"]) for k in ("lm_s", "lm_m", "lm_t"))
    need = lambda *ts: any(lam[t] > 0 for t in ts)
    fake, mid, cyc, tri = generator_passes(G, I_s, e_s, e_m, e_t, need("self", "triple") or measure, fused)
    # L_D = BCE(D(I_t, e_t), 1) + BCE(D(Î_t, e_t), 0); Î_t detached: this update is D's alone
    L_D = losses.L_D(D(I_t, e_t), D(fake.detach(), e_t))
    opt_D.zero_grad(set_to_none=True)
    L_D.backward()
    opt_D.step()

    D_plain = getattr(D, "module", D)  # G's pass through D needs no gradient sync for D
    D_plain.requires_grad_(False)
    terms = {"adv": losses.L_adv(D_plain(fake, e_t)), "pix": losses.L_pix(fake, I_t)}
    if cyc is not None:
        terms["self"] = losses.L_self(cyc, I_s)
        terms["triple"] = losses.L_triple(tri, fake)
    if need("pp", "id") or measure:
        with torch.autocast(I_s.device.type, dtype=torch.bfloat16, enabled=bool(amp)):
            with torch.no_grad():
                real_f = vgg(I_t)
            with torch.set_grad_enabled(need("pp", "id")):
                fake_f = vgg(fake)
        real_f, fake_f = ({k: v.float() for k, v in f.items()} for f in (real_f, fake_f))  # the losses in fp32
        terms["pp"] = losses.L_pp(fake_f, real_f)
        terms["id"] = losses.L_id(fake_f, real_f)
    L_G = losses.generator_loss(terms, lam)
    D_plain.requires_grad_(True)
    opt_G.zero_grad(set_to_none=True)
    L_G.backward()
    opt_G.step()
    terms = {k: v.detach() for k, v in terms.items()}
    terms["G"], terms["D"] = L_G.detach(), L_D.detach()
    return terms


# ----------------------------------------------------------------------------- training
def setup_distributed(device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python facesynth.py` is one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def resumed(args):
    """--resume -> (this session's options, the run's options to save, the checkpoint). The run keeps
    its saved options; a schedule option typed now (--steps, --epochs, --out) changes the run, a session
    option typed now (--device, --log-every, ...) only this session. A changed model or data option is
    an error: the weights would no longer mean what the options say."""
    ckpt, given = networks.load_checkpoint(args["resume"]), args["_given"]
    saved = ckpt["args"]
    changed = sorted(k for k in given - SESSION - SCHEDULE - {"resume"} if args[k] != saved.get(k))
    if changed:
        raise DataError(f"{args['resume']}: cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} "
                        "when resuming; start a new run with another --out instead")
    run = {**saved, **{k: args[k] for k in given & SCHEDULE}, "resume": args["resume"]}
    if "out" not in given:
        run["out"] = args["resume"] if os.path.isdir(args["resume"]) else os.path.dirname(args["resume"])
    return {**run, **{k: args[k] for k in given & SESSION}}, run, ckpt


def train(args):
    """The paper's training run. args: a dict of the command-line options (see main())."""
    ckpt, run = None, args
    if args.get("resume"):
        args, run, ckpt = resumed(args)
    run.pop("_given", None), args.pop("_given", None)
    rank, world, device = setup_distributed(networks.pick_device(args["device"]))
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(args["seed"] + rank)

    if args["data"] is None:
        args["data"] = data.ensure_synthetic(CACHE) if main_rank else None
        if world > 1:  # the other ranks wait for rank 0 to have built the cache
            box = [args["data"]]
            dist.broadcast_object_list(box)
            args["data"] = box[0]
    args["size"] = data.read_prepared(args["data"])["size"]
    videos = data.load_videos(args["data"], "train")
    lam = losses.lambdas({t: args[f"lambda_{t}"] for t in TERMS if args[f"lambda_{t}"] is not None}, args["ablate"])

    G = networks.build_generator(args).to(device)
    D = networks.Discriminator(ndf=args["ndf"]).to(device)
    widths = args["vgg_widths"] or networks.VGG_WIDTHS
    vgg, vgg_source = networks.load_vgg(losses.VGG_LAYERS, path=args["vgg"], log=log, widths=widths)
    # NCHW on CUDA too: channels_last measured slower on an H200 (b840851, batch 256: 2,651 triplets/s
    # with it, 2,988 without, 3,449 without it and with GroupNorm): the layout copies around the norms
    # cost more than NHWC saved in the convolutions.
    vgg = vgg.to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args["lr_g"], betas=BETAS)
    opt_D = torch.optim.Adam(D.parameters(), lr=args["lr_d"], betas=BETAS)
    start, elapsed = 0, 0.0
    if ckpt:
        G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
        opt_G.load_state_dict(ckpt["opt_G"]), opt_D.load_state_dict(ckpt["opt_D"])
        start, elapsed = ckpt["step"], ckpt.get("time", 0.0)
    G_run, D_run = G, D
    if world > 1:
        G_run = torch.nn.parallel.DistributedDataParallel(G, device_ids=[device] if device.type == "cuda" else None)
        D_run = torch.nn.parallel.DistributedDataParallel(D, device_ids=[device] if device.type == "cuda" else None)
    if args["compile"]:
        G_run, D_run, vgg = networks.compile_models((G_run, D_run, vgg), args["compile"])
        log(f"torch.compile ({args['compile']}): the first steps compile every module's graphs and are slow")

    per_epoch = data.steps_per_epoch(args, world)
    total = args["steps"] or args["epochs"] * per_epoch
    out, ckpt_path = args["out"], os.path.join(args["out"], "ckpt.pt")
    if start >= total:
        log(f"{ckpt_path} is at step {start} of {total}: nothing to do (a larger --steps or --epochs trains on)")
        return out
    cfg = {"args": args, "lambdas": lam, "vgg": vgg_source, "params_G": networks.count_params(G),
           "params_D": networks.count_params(D), "world_size": world, "device": str(device)}
    if main_rank:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    log(f"G {cfg['params_G'] / 1e6:.2f}M params, D {cfg['params_D'] / 1e6:.3f}M params, VGG: {vgg_source}; "
        f"{len(videos)} train videos, {total} steps of {args['batch_size'] * world} triplets "
        f"({per_epoch} steps/epoch) on {device}" + (f" x{world}" if world > 1 else "") + f", from step {start}")

    log_path = os.path.join(out, "log.csv")
    fields = ["step", "epoch", "time", "triplets_per_s"] + [f"L_{t}" for t in TERMS] + ["L_G", "L_D", "lr_G", "lr_D"]
    if main_rank:  # a fresh log, or on resume the rows up to the checkpoint (later ones are redone)
        kept = []
        if start and os.path.isfile(log_path):
            with open(log_path, newline="") as f:
                kept = [r for r in csv.reader(f) if r and r[0] != "step" and int(r[0]) <= start]
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows([fields] + kept)

    saved = start  # the step that ckpt.pt holds

    def checkpoint(step):
        nonlocal saved
        if main_rank:
            networks.save_checkpoint(ckpt_path, {
                "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "step": step, "time": elapsed + time.time() - t0, "args": run, "lambdas": lam, "vgg": vgg_source})
        saved = step

    kept = lambda: f"{ckpt_path} keeps step {saved}" if saved else "no checkpoint was written"

    def check_finite(step):  # one host sync, only when a log line or a checkpoint needs it
        if bad.item():
            raise FloatingPointError(f"loss became NaN/inf by step {step}; stopped ({kept()})")

    stop = []  # Ctrl-C once: finish the step in flight, save, exit. Twice: exit now, ckpt.pt untouched

    def on_ctrl_c(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(1)
        log("\nCtrl-C: saving after this step (Ctrl-C again to quit without saving)", flush=True)

    bad = torch.zeros((), dtype=torch.bool, device=device)  # NaN/inf seen, checked without a sync per step
    cfg_step = {"size": args["size"], "sigma": args["sigma"], "window": args["window"]}
    t0 = t_line = time.time()
    done = step_line = start
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        for step, b in data.batches(videos, args, start, total, rank, world, device):
            measure = (step + 1) % args["log_every"] == 0 or step + 1 == total
            terms = train_step(G_run, D_run, vgg, opt_G, opt_D, b, lam, measure, cfg_step, amp=device.type == "cuda")
            bad |= ~torch.isfinite(terms["G"] + terms["D"])
            done = step + 1
            now = time.time()
            # a line at every log step, and on the first step and every 30 s so a slow run is never silent
            if main_rank and (measure or done == start + 1 or now - t_line > 30):
                check_finite(done)
                rate = (done - step_line) * args["batch_size"] * world / (now - t_line)
                t_line, step_line = now, done
                vals = {k: v.item() for k, v in terms.items()}
                if measure:
                    row = [done, f"{done / per_epoch:.3f}", f"{elapsed + now - t0:.1f}", f"{rate:.2f}"]
                    row += [f"{vals[t]:.5g}" if t in vals else "" for t in TERMS]
                    row += [f"{vals['G']:.5g}", f"{vals['D']:.5g}", args["lr_g"], args["lr_d"]]
                    with open(log_path, "a", newline="") as f:
                        csv.writer(f).writerow(row)
                eta = (total - done) * args["batch_size"] * world / max(rate, 1e-9)
                print(f"step {done}/{total} epoch {done / per_epoch:.2f} {rate:.1f} triplets/s "
                      f"ETA {eta // 60:.0f}m{eta % 60:02.0f}s | " +
                      " ".join(f"{t} {vals[t]:.4f}" for t in TERMS if t in vals) + f" | D {vals['D']:.4f}", flush=True)
            if main_rank and (done == start + 1 or done % args["sample_every"] == 0 or done == total):
                with torch.no_grad():  # the first one early: a glance that the pipeline draws faces at all
                    fake = G(b["I_s"][:4], data.heatmaps(b["lm_t"][:4], args["size"], args["sigma"], args["window"]))
                evaluate.sample_grid(os.path.join(out, "samples", f"step_{done:06d}.png"), b, fake, args["size"])
            if stop or done % args["ckpt_every"] == 0 or done == total:
                check_finite(done)
                checkpoint(done)
            if stop:
                log(f"interrupted: checkpoint at step {done} in {ckpt_path}; continue with --resume {out}")
                raise SystemExit(130)
        if world > 1:  # DDP's promise, checked: every rank ends with the same weights
            sums = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in (G, D)]).to(device)
            every = [torch.zeros_like(sums) for _ in range(world)]
            dist.all_gather(every, sums)
            same = all(torch.equal(every[0], s) for s in every)
            log(f"{world} ranks identical: {same}")
            if not same:
                raise FloatingPointError("ranks drifted apart: their weights differ")
    except KeyboardInterrupt:
        log(f"\ninterrupted twice: stopped at once without saving; {kept()}")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        if world > 1:
            dist.destroy_process_group()
    log(f"done: {done} steps in {time.time() - t0:.0f}s; outputs in {out}/ (ckpt.pt, log.csv, config.json, samples/)")
    return out


# ----------------------------------------------------------------------------- speed
def bench_models(args, device, seed=0):
    torch.manual_seed(seed)
    G = networks.build_generator(args).to(device)
    D = networks.Discriminator(ndf=args["ndf"]).to(device)
    vgg = networks.VGG19(losses.VGG_LAYERS, args["vgg_widths"] or networks.VGG_WIDTHS).to(device)
    opts = torch.optim.Adam(G.parameters(), lr=LR_G, betas=BETAS), torch.optim.Adam(D.parameters(), lr=LR_D, betas=BETAS)
    return G, D, vgg, opts


def fast_vs_plain(args, device, b, lam, cfg, amp):
    """The fast path (fused passes, VGG in bf16 when amp, TF32 convolutions on CUDA) against the plain
    one (four separate passes, all IEEE fp32), from the same weights on the same batch. Returns the
    largest relative loss difference and, for G's gradient of each weighted term lambda_k L_k alone and
    of their sum L_G ("G"), the relative norm of the difference, ||g_fast - g_plain|| / ||g_plain||."""
    def grad(fast, only):
        G, D, vgg, (opt_G, opt_D) = bench_models(args, device)
        opt_G.step = lambda *a, **k: None  # keep the weights: we compare gradients, not updates
        # measure=True runs every pass and term whichever weights are on: the full step's graph, of
        # which only the terms in `only` reach G's gradient
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=fast):
            terms = train_step(G, D, vgg, opt_G, opt_D, b, {t: lam[t] if t in only else 0.0 for t in lam}, True,
                               cfg, fused=fast, amp=fast and amp)
        return {k: v.item() for k, v in terms.items()}, torch.cat([p.grad.flatten().float() for p in G.parameters()])

    weighted = [t for t in TERMS if lam[t]]
    loss_diff, grad_diff = 0.0, {}
    for name, only in [(t, {t}) for t in weighted] + [("G", set(weighted))]:
        (t_fast, g_fast), (t_plain, g_plain) = grad(True, only), grad(False, only)
        loss_diff = max(loss_diff, *(abs(t_fast[k] - t_plain[k]) / max(abs(t_plain[k]), 1e-8) for k in t_plain))
        grad_diff[name] = ((g_fast - g_plain).norm() / g_plain.norm()).item()
    return loss_diff, grad_diff


def bench_batch(args, device):
    """A real training batch: from --data, else from the built-in synthetic set if it has been built.
    Without one, random tensors: noise images, whose losses and gradients are unlike training's (bf16's
    differences come out several times larger on them)."""
    root = args["data"] or os.path.join(CACHE, "prepared")
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


def bench(args):
    """Time full training steps (G, D, all six terms, both optimiser steps) on one batch."""
    import resource
    from torch.utils.flop_counter import FlopCounterMode
    device = networks.pick_device(args["device"])
    amp = device.type == "cuda"  # as train: VGG in bf16 on CUDA, all fp32 on the CPU
    b, batch_kind = bench_batch(args, device)
    B, S = args["batch_size"], b["I_s"].shape[-1]
    G, D, vgg, (opt_G, opt_D) = bench_models(args, device)
    G_run, D_run, vgg_run = networks.compile_models((G, D, vgg), args["compile"]) if args["compile"] else (G, D, vgg)
    lam = losses.lambdas()
    cfg = {"size": S, "sigma": data.SIGMA, "window": data.WINDOW}
    step = lambda: train_step(G_run, D_run, vgg_run, opt_G, opt_D, b, lam, False, cfg, amp=amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"bench: {device}, batch {B} ({batch_kind}), {S} px, G {networks.count_params(G) / 1e6:.1f}M params, "
          f"{args['steps']} timed steps" + (f", torch.compile {args['compile']}" if args["compile"] else ""))
    with FlopCounterMode(display=False) as counter:  # the eager step: the maths, not what a compiler fused
        train_step(G, D, vgg, opt_G, opt_D, b, lam, False, cfg, amp=amp)
    gflop = counter.get_total_flops() / 1e9 / B
    for _ in range(args["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(args["steps"]):
        step()
        if device.type == "cpu":
            data.progress("bench", i + 1, args["steps"], t0, unit="steps")
    sync()
    step_s = (time.time() - t0) / args["steps"]
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    peak = networks.matmul_peak(device)
    loss_diff, grad_diff = fast_vs_plain(args, device, b, lam, cfg, amp)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "batch": batch_kind, "compile": args["compile"], "batch_size": B, "triplets_per_s": round(B / step_s, 2),
           "gflop_per_triplet": round(gflop, 2),
           "achieved_gflops": round(gflop * B / step_s, 1), "peak_gflops": round(peak, 1),
           "utilization": round(gflop * B / step_s / peak, 3), "step_ms": round(step_s * 1e3, 1),
           "peak_mem_mb": round(mem, 1), "fast_vs_plain_loss_rel": float(f"{loss_diff:.2g}"),
           "fast_vs_plain_grad_rel": float(f"{grad_diff['G']:.2g}"),
           "fast_vs_plain_grad_rel_by_term": {k: float(f"{v:.2g}") for k, v in grad_diff.items() if k != "G"}}
    paper = TRIPLETS_PER_EPOCH * EPOCHS / res["triplets_per_s"]
    for k, v in res.items():
        if k != "fast_vs_plain_grad_rel_by_term":
            print(f"  {k:24s} {v}")
    print("  G's gradient of each lambda_k L_k, fast vs plain (relative):  " +
          "  ".join(f"{k} {v:.2g}" for k, v in res["fast_vs_plain_grad_rel_by_term"].items()))
    print(f"  {'paper schedule (57k)':24s} {paper // 60:.0f}m{paper % 60:02.0f}s of steps")
    print(json.dumps(res))
    return res


# ----------------------------------------------------------------------------- the ablation study
# The paper's four runs (Fig. 2/3), and with --single one run per term switched off.
GROUP_RUNS = {"full": [], "no_pix": ["pix"], "no_consistency": ["consistency"], "no_feature": ["feature"]}


def ablation(args):
    """Train every ablation over --seeds seeds into OUT/NAME/seedK (finished runs are skipped, a
    cut one resumes), then evaluate them all and write OUT/REPORT.md."""
    root, n_seeds, single = args.pop("out"), args.pop("seeds"), args.pop("single")
    runs = {name: {"ablate": groups} for name, groups in GROUP_RUNS.items()}
    if single:
        runs.update({f"no_{t}": {f"lambda_{t}": 0.0} for t in TERMS})
    if args["data"] is None:
        args["data"] = data.ensure_synthetic(CACHE)
    total = args["steps"] or args["epochs"] * data.steps_per_epoch(args)
    dirs = {}
    for i, (name, change) in enumerate(runs.items()):
        for seed in range(n_seeds):
            out = os.path.join(root, name, f"seed{seed}")
            dirs.setdefault(name, []).append(out)
            ckpt = os.path.join(out, "ckpt.pt")
            done = networks.load_checkpoint(ckpt)["step"] if os.path.isfile(ckpt) else 0
            print(f"ablation {name} seed {seed} ({i * n_seeds + seed + 1}/{len(runs) * n_seeds}): "
                  + ("finished, skipped" if done >= total else f"training from step {done}"), flush=True)
            if done >= total:
                continue
            run = {**args, **change, "seed": seed, "out": out, "steps": total}
            if done:
                run = {**run, "resume": out, "_given": {"steps"}}
            train(run)
    report = evaluate.write_report(dirs, root, split=args.get("split"), data=args["data"])
    print(f"ablation: {len(runs)} runs x {n_seeds} seeds in {root}/; report {report}")
    return report


# ----------------------------------------------------------------------------- reenact
# The paper needs the target *image* (its landmarks come from it); real use has only a driver's
# landmarks. Here any landmark sequence drives a source face, frame by frame.
REENACT_FPS = 25
REENACT_HEIGHT = 256  # without --zoom, panels are enlarged to about this many pixels


def reenact(args):
    """The `reenact` command (args: its argparse Namespace). Returns a summary dict."""
    if os.path.splitext(args.out)[1].lower() not in (".mp4", ".gif"):
        raise DataError(f"{args.out}: the output must be a .mp4 or .gif")
    G, cfg = networks.load_generator(args.ckpt, networks.pick_device(args.device))
    root, crop_scale = cfg["args"].get("data"), data.CROP_SCALE
    if root and os.path.isfile(os.path.join(root, "prepare.json")):  # crop as the training set was cropped
        crop_scale = data.read_prepared(root).get("crop_scale", crop_scale)
    src, drv = data.load_face(args.source, args.source_pts), data.load_driver(args.driver, args.frames)
    relative = not args.absolute and (args.relative or src["who"] != drv["who"])
    T = len(drv["lms"])
    if "no_face" in drv:  # a plain video, landmarks detected
        print(f"{args.driver}: no face found in {drv['no_face']} of {T} frames (they keep the last landmarks)"
              if drv["no_face"] else f"{args.driver}: a face found in all {T} frames")
    if not 0 <= args.neutral < T:
        raise DataError(f"{args.driver}: --neutral {args.neutral} is not one of its {T} frames")
    p = networks.reenact(G, cfg, src, drv, relative, args.neutral, crop_scale)
    names = [k for k in ("source", "driver", "landmarks", "generated") if k in p]
    zoom = args.zoom or max(1, REENACT_HEIGHT // cfg["args"]["size"])  # 64-px panels are too small to see
    video = np.concatenate([p[k] for k in names], axis=2).repeat(zoom, 1).repeat(zoom, 2)
    data.write_video(args.out, video, args.fps)
    if args.frames_dir:
        from PIL import Image
        os.makedirs(args.frames_dir, exist_ok=True)
        for t, f in enumerate(video):
            Image.fromarray(f).save(os.path.join(args.frames_dir, f"{t:05d}.png"))
    mode, gen = "relative" if relative else "absolute", p["generated"]
    out = {"out": args.out, "frames": len(gen), "mode": mode, "flicker": evaluate.flicker(gen),
           "no_face": drv.get("no_face")}
    print(f"wrote {args.out} ({len(gen)} frames, {mode} retargeting; panels: {' | '.join(names)})"
          + (f", PNGs in {args.frames_dir}/" if args.frames_dir else ""))
    vs = ""
    if "reference" in p:
        out["flicker_ref"] = evaluate.flicker(p["reference"])
        out["flicker_ratio"] = out["flicker"] / out["flicker_ref"] if out["flicker_ref"] else math.nan
        vs = (f", {p['reference_name']} {out['flicker_ref']:.2f}, ratio {out['flicker_ratio']:.2f} (1 = as steady "
              f"as the {p['reference_name']})")
    print(f"flicker (mean |frame-to-frame change| of 255): generated {out['flicker']:.2f}{vs}")
    return out


def add_reenact_options(p):
    p.add_argument("--ckpt", required=True, help="run folder (runs/NAME) or checkpoint file")
    p.add_argument("--source", required=True, metavar="FACE", help="an image (landmarks: --source-pts, else "
                   "the .pts beside it, else detected), DIR:FRAME of a video, or synthetic:ID:FRAME")
    p.add_argument("--source-pts", help="the source image's 68 landmarks (.pts)")
    p.add_argument("--driver", required=True, help="a video file (landmarks detected), a 300VW-layout or "
                   "prepared video folder, a landmarks .npy (T x 68 x 2, 0-based pixels), a folder of .pts, "
                   "or synthetic:ID")
    p.add_argument("--out", required=True, help="the video: .mp4 or .gif")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--absolute", action="store_true",
                      help="the driver's landmarks as they are (the paper's setting; default for the same person)")
    mode.add_argument("--relative", action="store_true",
                      help="the source's landmarks moved by the driver's motion (default for different people)")
    p.add_argument("--neutral", type=data.number(int, 0), default=0,
                   help="driver frame whose expression is the source's (relative)")
    p.add_argument("--frames", type=data.number(), help=f"use the first N driver frames (synthetic: default "
                   f"{data.REENACT_FRAMES})")
    p.add_argument("--fps", type=data.number(float, 0, above=True), default=REENACT_FPS)
    p.add_argument("--zoom", type=data.number(), help=f"enlarge the panels K times, nearest neighbour (default: "
                   f"to about {REENACT_HEIGHT} px high)")
    p.add_argument("--frames-dir", help="also write every frame as a PNG into this folder")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")


# ----------------------------------------------------------------------------- command line
def add_train_options(p):
    pos, nonneg, above0 = data.number(), data.number(int, 0), data.number(float, 0, above=True)
    p.add_argument("--data", help="prepared dataset (default: the built-in synthetic set, made once in data/synthetic/)")
    p.add_argument("--out", default=os.path.join("runs", "default"), help="run folder")
    p.add_argument("--resume", help="run folder or checkpoint to continue from")
    p.add_argument("--batch-size", type=pos, default=BATCH_SIZE, help="triplets per step (per process)")
    p.add_argument("--epochs", type=pos, default=EPOCHS)
    p.add_argument("--triplets-per-epoch", type=pos, default=TRIPLETS_PER_EPOCH)
    p.add_argument("--steps", type=pos, help="total steps, instead of --epochs (a short run: --steps 200)")
    p.add_argument("--lr-g", type=above0, default=LR_G)
    p.add_argument("--lr-d", type=above0, default=LR_D)
    p.add_argument("--ngf", type=pos, default=NGF, help="G width (pix2pix: 64)")
    p.add_argument("--n-down", type=pos, default=N_DOWN, help="G down-sampling blocks (paper: 4)")
    p.add_argument("--ndf", type=pos, default=NDF, help="D width (paper: 32)")
    p.add_argument("--sigma", type=above0, default=data.SIGMA, help="heatmap Gaussian sigma in pixels")
    p.add_argument("--window", type=pos, default=data.WINDOW, help="heatmap window in pixels")
    p.add_argument("--max-gap", type=data.number(int, 2), help="max frames between a triplet's ends (default: whole video)")
    for t in TERMS:
        p.add_argument(f"--lambda-{t}", type=data.number(float, 0), help=f"weight of L_{t} (paper: {losses.LAMBDAS[t]:g})")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(losses.GROUPS),
                   help="switch off a group of terms (repeatable): pix, consistency (self+triple), feature (pp+id)")
    p.add_argument("--vgg", help="torchvision VGG-19 state dict (vgg19-dcbb9e9d.pth), or 'random' to skip the lookup")
    p.add_argument("--vgg-widths", type=pos, nargs=5, metavar="C",
                   help="narrower VGG block widths for smoke tests (random features only, no --vgg)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    add_compile_option(p)
    p.add_argument("--seed", type=nonneg, default=0)
    p.add_argument("--log-every", type=pos, default=LOG_EVERY, help="steps between log.csv rows")
    p.add_argument("--sample-every", type=pos, default=SAMPLE_EVERY, help="steps between sample grids")
    p.add_argument("--ckpt-every", type=pos, default=CKPT_EVERY, help="steps between checkpoints")


def add_compile_option(p):
    p.add_argument("--compile", nargs="?", const="default", choices=networks.COMPILE_MODES,
                   help="torch.compile G, D and VGG (default mode; reduce-overhead adds CUDA graphs)")


def given_options(parser, argv):
    """Which options the user typed (resume may only change some of them)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            shadow._add_action(copy.copy(a)).default = argparse.SUPPRESS
    return set(vars(shadow.parse_known_args(argv)[0]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pos = data.number()
    parser = data.ArgParser(description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    p_train = sub.add_parser("train", help="train G and D (the paper's run)", description=train.__doc__)
    add_train_options(p_train)
    p = sub.add_parser("prepare", help="a 300VW-layout folder or a folder of videos -> a prepared dataset")
    p.add_argument("src"), p.add_argument("out")
    p.add_argument("--size", type=data.number(int, 16), default=64, help="crop side in pixels")
    p.add_argument("--crop-scale", type=data.number(float, 0, above=True), default=data.CROP_SCALE, help="crop side / landmark box side")
    p.add_argument("--split-file", help="JSON {split: [video names]} instead of the official 300VW split "
                   "(plain videos: instead of holding out the last 20 %% by name as test1)")
    p.add_argument("--workers", type=pos, default=2)
    p = sub.add_parser("synth", help="write the synthetic talking-head videos in 300VW layout")
    p.add_argument("out")
    p.add_argument("--seed", type=data.number(int, 0), default=0)
    p.add_argument("--videos", type=data.number(int, 0), nargs=4, default=list(data.SYNTH_VIDEOS),
                   metavar=("TRAIN", "T1", "T2", "T3"))
    p.add_argument("--frames", type=data.number(int, 3), default=data.SYNTH_FRAMES, help="frames per video")
    p.add_argument("--size", type=data.number(int, 16), default=data.SYNTH_SIZE, help="frame size in pixels (even)")
    p.add_argument("--workers", type=pos, default=2)
    p = sub.add_parser("ablation", help="the paper's loss ablations over seeds, then REPORT.md")
    add_train_options(p)
    p.set_defaults(out=os.path.join("runs", "ablation"))
    p.add_argument("--seeds", type=pos, default=3)
    p.add_argument("--single", action="store_true", help="also the six single-term ablations")
    p.add_argument("--split", help="test split to evaluate (default: the first with videos)")
    p = sub.add_parser("bench", help="time full training steps against the device's matmul peak")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=pos, default=BATCH_SIZE)
    p.add_argument("--steps", type=pos, default=10, help="timed steps")
    p.add_argument("--warmup", type=data.number(int, 0), default=2)
    p.add_argument("--size", type=data.number(int, 16), default=64, help="image size of random batches (a dataset has its own)")
    p.add_argument("--ngf", type=pos, default=NGF)
    p.add_argument("--n-down", type=pos, default=N_DOWN)
    p.add_argument("--ndf", type=pos, default=NDF)
    p.add_argument("--vgg-widths", type=pos, nargs=5, metavar="C", help="narrower VGG block widths for smoke tests")
    add_compile_option(p)
    p.add_argument("--data", help="prepared dataset to draw the batch from (default: the built-in synthetic set "
                   "if built, else random tensors; a dataset sets the image size)")
    add_reenact_options(sub.add_parser("reenact", help="drive a face with another video's landmarks"))
    args = parser.parse_args(argv)
    a = vars(args)
    verb = a.pop("verb")
    try:
        if verb == "train":
            train({**a, "_given": given_options(p_train, argv[1:])})
        elif verb == "prepare":
            summary = data.prepare(args.src, args.out, size=args.size, crop_scale=args.crop_scale,
                                   workers=args.workers, split_file=args.split_file)
            if summary["prepared"] + summary["existing"] == 0:
                fail(f"{args.src}: no video could be prepared")
            print(f"prepared dataset in {args.out}/")
        elif verb == "synth":
            data.synth(args.out, tuple(args.videos), args.frames, args.size, args.seed, args.workers)
            print(f"synthetic videos in {args.out}/ (prepare them with: facesynth.py prepare {args.out} OUT)")
        elif verb == "ablation":
            if a.pop("resume") or a["ablate"]:
                fail("--resume/--ablate: ablation chooses --ablate itself and resumes unfinished runs on its own")
            ablation(a)
        elif verb == "bench":
            bench(a)
        elif verb == "reenact":
            reenact(args)
    except (DataError, FloatingPointError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
