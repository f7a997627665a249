"""facesynth: landmark-conditioned face reenactment after Kassapis, Verdenius & Ondrag,
"Face Image Synthesis conditioned on Target Landmark Appearance".

    python facesynth.py train                  # the paper's run on the built-in synthetic set
    python facesynth.py prepare SRC OUT        # your own 300VW copy (or videos) -> a prepared dataset
    python facesynth.py synth OUT              # the synthetic talking heads in 300VW layout
    python facesynth.py bench                  # speed of one training step vs the hardware
    python facesynth.py ablation               # the paper's loss ablations, with numbers
    python facesynth.py reenact --ckpt runs/X --source FACE --driver DRIVER --out a.mp4
    python facesynth.py play --ckpt runs/X     # a page: drag a face's landmarks, watch G redraw it

A generator G draws the source face I_s with the target landmarks e_t (as heatmaps):
Î_t = G(I_s; e_t). A PatchGAN D judges (image, landmarks) pairs. One training step:
G's four passes, D's update on real vs generated, then G's update on the six-term loss.
"""
import contextlib
import csv
import functools
import os
import signal
import sys
import time

import torch

import data
import evaluate
import losses
import networks
from data import DataError
import extras.ablation
import extras.augment
import extras.cli as cli
import extras.landmarks
import extras.play
import extras.reenact
import extras.runs as runs
import extras.speed
import extras.synthetic
import extras.yardsticks
from losses import TERMS

# ----------------------------------------------------------------------------- defaults
# The paper's: Adam, G 2e-4 / D 5e-5, 6 epochs of 9.5k triplets at 64 px. The paper is silent on
# Adam's betas and the batch size: betas from pix2pix, batch 16 (its code used 8; 16 keeps a
# 2-core CPU's matrix units busier and gives the same number of triplets per epoch).
LR_G, LR_D, BETAS = 2e-4, 5e-5, (0.5, 0.999)
EPOCHS, TRIPLETS_PER_EPOCH, BATCH_SIZE = 6, 9500, 16
NGF, N_DOWN, NDF = 64, 4, 32
BATCH_MAX, WIDTH_MAX = 16384, 1024  # memory runs out long before: a one-line error, not an allocator's
LOG_EVERY, SAMPLE_EVERY, CKPT_EVERY = 50, 500, 500
LINE_EVERY = 30  # seconds: a progress line at least this often, so a slow run is never silent
TRAIN_ABOUT = """Train G and D on triplets of frames with the paper's six-term loss, on the built-in
synthetic set unless --data. A first run: the README's CPU recipe. OUT gets log.csv (a row at
step 1, every --log-every steps and where the run stops), samples/step_N.png (the same held-out
faces each time), config.json and ckpt.pt. Ctrl-C saves and stops; --resume OUT goes on from there."""
CACHE = extras.synthetic.SYNTH_CACHE
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile's modes


# ----------------------------------------------------------------------------- the step
def generator_passes(G, I_s, e_s, e_m, e_t, cycle=True, fused=True, grids=None):
    """Î_t = G(I_s; e_t) and, for the consistency terms, G(Î_t; e_s), G(I_s; e_m), G(G(I_s; e_m); e_t).
    fused: passes that share no dependency run as one batched call (G normalises per sample,
    so this changes the speed, not the maths). grids: for G's "warp" output, each pass's base (warp_grids)."""
    g = lambda x, e, *k: G(x, e) if grids is None else G(x, e, torch.cat([grids[i] for i in k]))
    if not cycle:
        return g(I_s, e_t, "st"), None, None, None
    if fused:
        fake, mid = g(torch.cat([I_s, I_s]), torch.cat([e_t, e_m]), "st", "sm").chunk(2)
        cyc, tri = g(torch.cat([fake, mid]), torch.cat([e_s, e_t]), "ts", "mt").chunk(2)
    else:
        fake, mid = g(I_s, e_t, "st"), g(I_s, e_m, "sm")
        cyc, tri = g(fake, e_s, "ts"), g(mid, e_t, "mt")
    return fake, mid, cyc, tri


def warp_grids(b, size, cycle=True):
    """G's "warp" bases for its passes: the thin-plate spline from the landmarks of each pass's image to
    those it is asked for: s -> t; for the cycles s -> m, t -> s (Î_t has t's), m -> t (G(I_s; e_m) m's)."""
    lm = {"s": b["lm_s"], "m": b["lm_m"], "t": b["lm_t"]}
    passes = ("st", "sm", "ts", "mt") if cycle else ("st",)
    return {k: networks.tps_grid(lm[k[0]], lm[k[1]], size) for k in passes}


def generator_terms(D, vgg, b, want, fake, cyc, tri, e_t, amp):
    """The raw (unweighted) terms of L_G named in `want`, from G's passes. D and VGG are frozen here:
    their gradients reach G's image only."""
    terms = {"pix": losses.L_pix(fake, b["I_t"])}  # L_pix = ||Î_t - I_t||²
    if "adv" in want:
        terms["adv"] = losses.L_adv(D(fake, e_t))  # L_adv = BCE(D(Î_t, e_t), 1)
    if cyc is not None:
        terms["self"] = losses.L_self(cyc, b["I_s"])  # ||G(G(I_s; e_t); e_s) - I_s||²
        terms["triple"] = losses.L_triple(tri, fake)  # ||G(G(I_s; e_m); e_t) - G(I_s; e_t)||²
    if {"pp", "id"} & set(want):
        with torch.autocast(fake.device.type, dtype=torch.bfloat16, enabled=bool(amp)):
            with torch.no_grad():
                real_f = vgg(b["I_t"])
            fake_f = vgg(fake)
        real_f, fake_f = ({k: v.float() for k, v in f.items()} for f in (real_f, fake_f))  # losses in fp32
        terms["pp"] = losses.L_pp(fake_f, real_f)  # sum_l ||Φ_l(I_t) - Φ_l(Î_t)||₁ + ||Gram - Gram||_F
        terms["id"] = losses.L_id(fake_f, real_f)  # ||Φ(I_t) - Φ(Î_t)||₁ at losses.ID_LAYER
    return terms


def conditions(b, hm):
    """e_s, e_m, e_t: the batch's landmarks as heatmaps (hm: their size, sigma and window)."""
    return (data.heatmaps(b[k], hm["size"], hm["sigma"], hm["window"]) for k in ("lm_s", "lm_m", "lm_t"))


def train_step(G, D, vgg, opt_G, opt_D, b, lam, hm, fused=True, amp=False, warp=False):
    """One step on a batch b of device tensors: G's passes, D's update (when G learns from D), G's update.
    Only what a term with a weight needs is computed. Returns the raw terms with a weight, and L_G (and
    L_D), as tensors: nothing here waits for the device.

    amp: VGG runs in bf16 autocast; G and D stay fp32 (TF32 tensor cores on CUDA). L_self and L_triple
    weigh (x100) small differences between generated images, and bf16 noise through G's four passes
    swamps them, while VGG's features only feed L_pp and L_id (docs/speed.md has the measurements).
    warp: G's output is "warp", whose passes start from the landmarks' thin-plate splines."""
    torch.compiler.cudagraph_mark_step_begin()  # --compile reduce-overhead: last step's graph buffers free
    e_s, e_m, e_t = conditions(b, hm)
    want = [t for t in TERMS if lam[t] > 0]
    cycle = "self" in want or "triple" in want  # the consistency passes only for a run that trains on them
    grids = warp_grids(b, hm["size"], cycle) if warp else None
    fake, _, cyc, tri = generator_passes(G, b["I_s"], e_s, e_m, e_t, cycle, fused, grids)
    out = {}
    if lam["adv"] > 0:  # with λ_adv = 0 G never sees D: D is neither run nor trained
        # L_D = BCE(D(I_t, e_t), 1) + BCE(D(Î_t, e_t), 0); Î_t detached: this update is D's alone
        out["D"] = L_D = losses.L_D(D(b["I_t"], e_t), D(fake.detach(), e_t))
        opt_D.zero_grad(set_to_none=True)
        L_D.backward()
        opt_D.step()
    D_plain = getattr(D, "module", D)  # G's pass through D needs no gradient sync for D
    D_plain.requires_grad_(False)
    terms = generator_terms(D_plain, vgg, b, want, fake, cyc, tri, e_t, amp)
    # L_G = L_adv + λ_pix L_pix + λ_self L_self + λ_triple L_triple + λ_pp L_pp + λ_id L_id
    L_G = losses.generator_loss(terms, lam)
    D_plain.requires_grad_(True)
    opt_G.zero_grad(set_to_none=True)
    L_G.backward()
    opt_G.step()
    return {k: v.detach() for k, v in {**terms, "G": L_G, **out}.items()}


@torch.no_grad()
def measure(G, D, vgg, b, hm, amp=False, warp=False):
    """Every raw term of L_G and L_D on a batch, without gradient and without any update: what a log row
    reports of the terms a run does not train on, so that ablated runs compare term by term."""
    e_s, e_m, e_t = conditions(b, hm)
    grids = warp_grids(b, hm["size"]) if warp else None
    fake, _, cyc, tri = generator_passes(G, b["I_s"], e_s, e_m, e_t, grids=grids)
    return {**generator_terms(D, vgg, b, TERMS, fake, cyc, tri, e_t, amp),
            "D": losses.L_D(D(b["I_t"], e_t), D(fake, e_t))}


# ----------------------------------------------------------------------------- training
def build_models(args, device, ckpt, init, log):
    """G, D, the frozen VGG (and where its weights came from), both Adam optimisers, and the step and
    training seconds to start from: a resumed checkpoint's, or 0. --init's run gives G and D their
    weights, nothing else. G and D in NCHW; VGG in its device's fastest layout (networks.to_layout)."""
    G = networks.build_generator(args).to(device)
    D = networks.Discriminator(ndf=args["ndf"]).to(device)
    again = ckpt and ckpt.get("vgg") == "random"  # the run's loss keeps its features, and its notice is said
    weights = "random" if again else runs.vgg_weights(args["vgg"], log)
    vgg, vgg_source = networks.load_vgg(losses.VGG_LAYERS, weights, args["vgg_widths"] or networks.VGG_WIDTHS)
    vgg = networks.to_layout(vgg.to(device), device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args["lr_g"], betas=BETAS)
    opt_D = torch.optim.Adam(D.parameters(), lr=args["lr_d"], betas=BETAS)
    start, elapsed = 0, 0.0
    if ckpt or init:
        G.load_state_dict((ckpt or init)["G"]), D.load_state_dict((ckpt or init)["D"])
    if ckpt:
        opt_G.load_state_dict(ckpt["opt_G"]), opt_D.load_state_dict(ckpt["opt_D"])
        start, elapsed = ckpt["step"], ckpt.get("time", 0.0)
    return G, D, vgg, vgg_source, opt_G, opt_D, start, elapsed


def runnable(G, D, vgg, args, world, device, log):
    """The modules the step calls: G and D under DDP when there are several processes, compiled on
    --compile. The plain G and D stay what is saved."""
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        G, D = (torch.nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (G, D))
    if args["compile"]:
        log(f"torch.compile ({args['compile']}): the first steps compile every module's graphs and are slow")
        return extras.speed.compile_models((G, D, vgg), args["compile"])
    return G, D, vgg


def schedule(args, world):
    """(steps per epoch, the run's total steps): --steps, else --epochs of --triplets-per-epoch."""
    per_epoch = data.steps_per_epoch(args, world)
    return per_epoch, args["steps"] or args["epochs"] * per_epoch


def learning_rates(args, done, total, opts=()):
    """(G's, D's) learning rate for the step after `done`, set in `opts` (opt_G, opt_D): the paper's,
    constant; with --lr-decay, constant for the first half of the run, then down in a straight line to 0
    at its end (pix2pix's schedule)."""
    f = min(1.0, 2 * (total - done) / total) if args["lr_decay"] else 1.0
    lrs = args["lr_g"] * f, args["lr_d"] * f
    for opt, lr in zip(opts, lrs):
        opt.param_groups[0]["lr"] = lr
    return lrs


def sample_pairs(args, n=4):
    """The sample grids' pairs, fixed for a run: the first n of metrics' pairs on the run's first test
    split (train when it has none), so that every step's grid shows the same held-out faces, beside
    the warp floor's drawing of them (extras/yardsticks.py)."""
    try:
        split, videos = evaluate.videos_of(args["data"])
    except DataError:
        split, videos = "train", data.load_videos(args["data"], "train")
    src, src_lm, tgt, lm = evaluate.gather(videos, n)
    return {"split": split, "src": src, "lm_s": src_lm, "tgt": tgt, "lm_t": lm,
            "warp": extras.yardsticks.warp(src, src_lm, lm)}


def sample_grid(G, pairs, args, path, step):
    """samples/step_NNNNNN.png: train's fixed pairs (sample_pairs) as evaluate.COLUMNS, G's drawing at this
    step beside the warp floor's."""
    fake = networks.generate(G, {"args": args}, pairs["src"], pairs["lm_t"], pairs["lm_s"])
    head = [f"source ({pairs['split']})", "target landmarks", f"generated, step {step}", "warp", "target"]
    columns = [pairs["src"], evaluate.landmark_picture(pairs["lm_t"], {"args": args}), fake, pairs["warp"],
               pairs["tgt"]]
    return evaluate.write_png(path, evaluate.tile_figure(columns, head))


def banner(config, n_videos, total, B, per_epoch, start):
    """What a run is about to do, in one line: its models, data, schedule, device and starting point."""
    a, init, world = config["args"], config["init"], config["world_size"]
    return (f"G {config['params_G'] / 1e6:.2f}M params ({a['output']} output), "
            f"D {config['params_D'] / 1e6:.3f}M params, VGG: {config['vgg']}; {n_videos} train videos, "
            f"{total} steps of {B} triplets ({per_epoch} steps/epoch) on {config['device']}"
            f"{f' x{world}' if world > 1 else ''}, from step {start}"
            + (f" (weights from {init['run']}, step {init['step']})" if init else ""))


def progress_line(done, total, per_epoch, B, rate, vals, first):
    """Step, epoch, speed and ETA (the first line's step includes the start-up: none there), the terms."""
    eta = data.clock((total - done) * B / max(rate, 1e-9))
    speed = "(speed, ETA: next line)" if first else f"{rate:.1f} triplets/s ETA {eta}"
    terms = " ".join(f"{t} {vals[t]:.4f}" for t in TERMS if t in vals)
    print(f"step {done}/{total} epoch {done / per_epoch:.2f} {speed} | {terms}"
          + (f" | D {vals['D']:.4f}" if "D" in vals else ""), flush=True)


def train(args, given):
    """Train G and D as the paper does, from the options in `args` (a dict) of which the user typed
    `given`. --resume continues a run, --init starts a new one from another run's weights. The run
    folder is this process's alone while it trains (extras/runs.py: own_run)."""
    if args.get("resume") and "out" not in given:  # the run goes on in its own folder
        args = {**args, "out": runs.run_folder(args["resume"])}
    owner = int(os.environ.get("RANK", 0)) == 0  # rank 0 holds the folder for all ranks
    with runs.own_run(args["out"], args.get("resume")) if owner else contextlib.nullcontext():
        ckpt = init = None
        if args.get("resume"):
            args, run, ckpt = runs.resumed(args, given)
            total = schedule(args, runs.world_size())[1]
            if ckpt["step"] >= total:
                print(f"{runs.checkpoint_file(args['resume'])} is at step {ckpt['step']} of {total}: "
                      "nothing to do (a larger --steps or --epochs trains on)")
                return args["out"]
        else:
            if args.get("init"):
                args, init = runs.initialised(args, given)
            run = args
        return train_run(args, run, ckpt, init)


def train_run(args, run, ckpt, init):
    """train's work, in the run folder it owns: `args` this session's options, `run` the run's to save;
    `ckpt` the checkpoint it resumes, `init` the one whose G and D it starts from (or None)."""
    rank, world, device, group = runs.setup_distributed(networks.pick_device(args["device"]))
    main_rank, log = rank == 0, print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args["seed"] + rank)
    fixed, videos = runs.training_data(args["data"], main_rank, world, init)  # the set, its size, its train
    args, run = {**args, **fixed}, {**run, **fixed}
    lam = losses.lambdas({t: args[f"lambda_{t}"] for t in TERMS}, args["ablate"])  # None: the paper's
    G, D, vgg, vgg_source, opt_G, opt_D, start, elapsed = build_models(args, device, ckpt, init, log)
    per_epoch, total = schedule(args, world)
    out, B, amp = args["out"], args["batch_size"] * world, device.type == "cuda"
    warp = args["output"] == "warp"  # G's passes start from the landmarks' thin-plate splines
    hm = {"size": args["size"], "sigma": args["sigma"], "window": args["window"]}  # the heatmaps' shape
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.csv")
    G_run, D_run, vgg_run = runnable(G, D, vgg, args, world, device, log)
    config = {"args": args, "lambdas": lam, "vgg": vgg_source, "params_G": networks.count_params(G),
              "params_D": networks.count_params(D), "world_size": world, "device": str(device),
              "init": init and {"run": args["init"], "step": init["step"]}}
    if main_rank:
        runs.start_outputs(out, config, start)
        pairs = sample_pairs(args)
    log(banner(config, len(videos), total, B, per_epoch, start))
    saved = start  # the step that ckpt.pt holds
    kept = lambda: f"{ckpt_path} keeps step {saved}" if saved else "no checkpoint was written"
    bad = torch.zeros((), dtype=torch.bool, device=device)  # NaN/inf seen, checked without a sync per step
    t0 = t_line = time.time()  # t_line, step_line: when the last progress line was printed, and its step
    done = step_line = start
    stop, previous = runs.on_stop_signals(log)
    try:
        for step, b in data.batches(videos, args, start, total, rank, world, device):
            if args["augment"]:  # beyond the paper: each triplet moved as one (extras/augment.py)
                moves = extras.augment.moves(args["seed"], step, B).chunk(world)[rank]  # this rank's share
                b = extras.augment.move_triplets(b, moves)
            lrs = learning_rates(args, step, total, (opt_G, opt_D))
            terms = train_step(G_run, D_run, vgg_run, opt_G, opt_D, b, lam, hm, amp=amp, warp=warp)
            bad |= ~torch.isfinite(terms["G"] + terms.get("D", 0))
            done = step + 1
            # Two decisions a step, alike on every rank: log now, save now. There the ranks agree on a
            # stop signal and a NaN (the loop's one host sync). A signal asks for both: one process
            # answers it after this step, several ranks at the next step they all log or save.
            asked = bool(stop) and world == 1
            log_now = done == 1 or done % args["log_every"] == 0 or done == total or asked
            save_now = done % args["ckpt_every"] == 0 or done == total or asked
            signum, nan = runs.agree(stop, bad.item(), group) if log_now or save_now else (0, False)
            if nan:
                raise FloatingPointError(f"loss became NaN/inf by step {done}; stopped ({kept()})")
            log_now, save_now = log_now or signum > 0, save_now or signum > 0
            if log_now:  # the terms a run does not train on, measured apart: no gradient, no update
                terms = {**measure(G_run, D_run, vgg_run, b, hm, amp, warp), **terms}
            if main_rank and (done in (start + 1, total) or done % args["sample_every"] == 0 or signum):
                # the same held-out faces each time, the first early: a glance that G draws faces at all
                grid = os.path.join(out, "samples", f"step_{done:06d}.png")
                sample_grid(G, pairs, args, grid, done)
            if main_rank and (log_now or done == start + 1 or time.time() - t_line > LINE_EVERY):
                now, vals = time.time(), {k: v.item() for k, v in terms.items()}
                rate, t_line, step_line = (done - step_line) * B / (now - t_line), now, done
                if log_now:  # a row at step 1, every --log-every steps, at the end and where a run stops
                    runs.log_row(log_path, done, per_epoch, elapsed + now - t0, rate, vals, lrs)
                progress_line(done, total, per_epoch, B, rate, vals, first=done == start + 1)
            if save_now:
                if main_rank:  # a checkpoint is a plain dict
                    networks.save_checkpoint(ckpt_path, {"G": G.state_dict(), "D": D.state_dict(),
                        "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "step": done, "args": run,
                        "time": elapsed + time.time() - t0, "lambdas": lam, "vgg": vgg_source})
                saved = done
            if signum:
                log(f"interrupted: checkpoint at step {done} in {ckpt_path}; continue with --resume {out}")
                raise SystemExit(128 + signum)
        runs.ranks_agree(G, D, world, device, log)
    except KeyboardInterrupt:
        log(f"\ninterrupted twice: stopped at once without saving; {kept()}")
        raise SystemExit(128 + (stop or [signal.SIGINT])[0]) from None
    finally:
        runs.restore_signals(previous)
        G_run = D_run = vgg_run = None  # DDP's wrappers, freed before the ranks part (runs.part)
        runs.part(world)
    log(f"done: {done} steps in {time.time() - t0:.0f}s; outputs in {out}/ "
        "(ckpt.pt, log.csv, config.json, samples/)")
    return out


# ----------------------------------------------------------------------------- speed
def bench(args):
    """Time full training steps against the device's peak (extras/speed.py measures): train's step, on
    fresh models with train's Adam settings."""
    models = functools.partial(extras.speed.bench_models, lr_g=LR_G, lr_d=LR_D, betas=BETAS)
    return extras.speed.bench(args, train_step, models, CACHE, EPOCHS * TRIPLETS_PER_EPOCH)


# ----------------------------------------------------------------------------- the ablation study
def ablation(args):
    """The paper's loss ablations over seeds, then OUT/REPORT.md: extras/ablation.py plans the runs,
    trains them with train, checks finished ones as --resume does, and reports."""
    return extras.ablation.study(args, train)


# ----------------------------------------------------------------------------- command line
def add_model_options(p):
    """The options train and bench share: the data, the batch, the models' sizes, the device."""
    batch, width = cli.number(high=BATCH_MAX), cli.number(high=WIDTH_MAX)
    p.add_argument("--data", help="prepared dataset (default: the built-in synthetic set, made once in "
                   "data/synthetic/; bench without it: random tensors)")
    p.add_argument("--batch-size", type=batch, default=BATCH_SIZE, help="triplets per step (per process)")
    p.add_argument("--ngf", type=width, default=NGF, help="G width (pix2pix: 64)")
    p.add_argument("--n-down", type=cli.number(high=8), default=N_DOWN,
                   help="G down-sampling blocks (paper: 4)")
    p.add_argument("--ndf", type=width, default=NDF, help="D width (paper: 32)")
    p.add_argument("--output", choices=networks.OUTPUTS, default="image", help="what G draws: image (the "
                   "paper: every pixel), or beyond it residual (Î_t = I_s + Δ), flow (I_s moved along a flow,"
                   " + Δ), warp (I_s moved along the landmarks' thin-plate spline and a flow, + Δ)")
    p.add_argument("--vgg-widths", type=cli.number(), nargs=5, metavar="C",
                   help="narrower VGG block widths for smoke tests (random features only, no --vgg)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                   help="torch.compile G, D and VGG (default mode; reduce-overhead adds CUDA graphs)")


def add_train_options(p):
    pos, nonneg, above0 = cli.number(), cli.number(int, 0), cli.number(float, 0, above=True)
    add_model_options(p)
    p.add_argument("--out", default=os.path.join("runs", "default"), help="run folder")
    p.add_argument("--resume", help="run folder or checkpoint to continue from")
    p.add_argument("--init", metavar="RUN", help="start from RUN's G and D (and its --ngf, --n-down, --ndf, "
                   "--output): fresh optimisers, this run's data and schedule; e.g. fine-tune on your video")
    p.add_argument("--epochs", type=pos, default=EPOCHS, help="passes of --triplets-per-epoch (paper: 6)")
    p.add_argument("--triplets-per-epoch", type=pos, default=TRIPLETS_PER_EPOCH, help="(paper: 9.5k)")
    p.add_argument("--steps", type=pos, help="total steps, instead of --epochs (a short run: --steps 200)")
    p.add_argument("--lr-g", type=above0, default=LR_G, help="G's Adam learning rate (paper: 2e-4)")
    p.add_argument("--lr-d", type=above0, default=LR_D, help="D's Adam learning rate (paper: 5e-5)")
    p.add_argument("--sigma", type=above0, default=data.SIGMA, help="heatmap Gaussian sigma in pixels")
    p.add_argument("--window", type=pos, default=data.WINDOW, help="heatmap window in pixels")
    p.add_argument("--max-gap", type=cli.number(int, 2),
                   help="max frames between a triplet's ends (default: whole video)")
    for t in TERMS:
        p.add_argument(f"--lambda-{t}", type=cli.number(float, 0),
                       help=f"weight of L_{t} (paper: {losses.LAMBDAS[t]:g})")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(losses.GROUPS),
                   help="switch off a group of terms (repeatable): pix, consistency (self+triple), "
                   "feature (pp+id)")
    p.add_argument("--vgg", help="torchvision VGG-19 state dict (vgg19-dcbb9e9d.pth), "
                   "or 'random' to skip the lookup")
    p.add_argument("--seed", type=nonneg, default=0, help="seeds the weights, the triplets and the flips")
    p.add_argument("--log-every", type=pos, default=LOG_EVERY, help="steps between log.csv rows")
    p.add_argument("--sample-every", type=pos, default=SAMPLE_EVERY, help="steps between sample grids")
    p.add_argument("--ckpt-every", type=pos, default=CKPT_EVERY, help="steps between checkpoints")
    # beyond the paper: what lets G beat the floor (docs/training.md)
    p.add_argument("--augment", action="store_true", help="scale, turn and shift each triplet's three "
                   "frames and landmarks alike, at random (beyond the paper)")
    p.add_argument("--lr-decay", action="store_true", help="learning rates constant for half the run, then "
                   "down to 0 in a straight line (beyond the paper; pix2pix's schedule)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pos = cli.number()
    parser = cli.ArgParser(description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    p_train = sub.add_parser("train", help="train G and D (the paper's run)", description=TRAIN_ABOUT)
    add_train_options(p_train)
    about = "a 300VW-layout folder or a folder of videos -> a prepared dataset (train on it with --data OUT)"
    p = sub.add_parser("prepare", help=about, description=about)
    p.add_argument("src", help="300VW layout (NNN/vid.avi, NNN/annot/*.pts), or videos (landmarks detected)")
    p.add_argument("out", help="the prepared dataset to write (an interrupted run picks up where it stopped)")
    p.add_argument("--size", type=cli.number(int, 16), default=64, help="crop side in pixels")
    p.add_argument("--crop-scale", type=cli.number(float, 0, above=True), default=data.CROP_SCALE,
                   help="crop side / landmark box side")
    p.add_argument("--split-file", help="JSON {split: [video names]} instead of the official 300VW split "
                   "(plain videos: instead of --hold-out)")
    p.add_argument("--hold-out", choices=("name", "tail"), help="plain videos without --split-file: test1 "
                   "gets the last 20 %% of them by name, or the last 20 %% of each one's frames as NAME-tail "
                   "(default: tail for a single video, else name)")
    p.add_argument("--workers", type=pos, default=2, help="processes")
    about = "write the synthetic talking-head videos in 300VW layout (train's default set needs no synth)"
    extras.synthetic.add_options(sub.add_parser("synth", help=about, description=about))
    about = ("the paper's loss ablations (full, no_pix, no_consistency, no_feature) over --seeds seeds into "
             "OUT/NAME/seedK, then OUT/REPORT.md; a re-run skips finished runs and resumes cut ones")
    p = sub.add_parser("ablation", help="the paper's loss ablations over seeds, then REPORT.md",
                       description=about)
    add_train_options(p)
    extras.ablation.add_options(p)
    about = ("time full training steps against the device's dense peak (the best of a matmul and a "
             "convolution, timed between the steps), and predict the whole run's time")
    p = sub.add_parser("bench", help=about, description=about)
    add_model_options(p)
    extras.speed.add_options(p)
    about = "drive a face with another video's landmarks: source | driver landmarks | generated | driver"
    extras.reenact.add_options(sub.add_parser("reenact", help="drive a face with another video's landmarks",
                                              description=about))
    about = ("a local web page: drag a face's landmarks or move the sliders and watch G redraw it (for a "
             "synthetic identity beside the true face and the error); prints the URL, Ctrl-C stops it")
    extras.play.add_options(sub.add_parser("play", help="a page: drag a face's landmarks, watch G redraw it",
                                           description=about))
    args = parser.parse_args(argv)
    a = vars(args)
    verb = a.pop("verb")
    with cli.one_line_errors():
        if verb == "train":
            train(a, cli.given_options(p_train, argv[1:]))
        elif verb == "prepare":
            videos, skipped = extras.landmarks.plain_videos(args.src)  # files to detect landmarks on
            summary = data.prepare(args.src, args.out, size=args.size, crop_scale=args.crop_scale,
                                   workers=args.workers, split_file=args.split_file, hold_out=args.hold_out,
                                   videos=videos, skipped=skipped,
                                   landmarks=extras.landmarks.usable_landmarks)
            if summary["prepared"] + summary["existing"] == 0:
                cli.fail(f"{args.src}: no video could be prepared")
            print(f"prepared dataset in {args.out}/")
        elif verb == "synth":
            extras.synthetic.synth(args.out, tuple(args.videos), args.frames, args.size, args.seed,
                                   args.workers)
            print(f"synthetic videos in {args.out}/ (prepare them with: facesynth.py prepare {args.out} OUT)")
        elif verb == "ablation":
            if a.pop("resume") or a["ablate"]:
                cli.fail("--resume/--ablate: ablation chooses --ablate itself and resumes unfinished runs "
                         "on its own")
            ablation(a)
        elif verb == "bench":
            bench(a)
        elif verb == "reenact":
            extras.reenact.make_video(a)
        elif verb == "play":
            extras.play.serve(a)


if __name__ == "__main__":
    main()
