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
import queue
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import losses
import networks

# ----------------------------------------------------------------------------- defaults
# The paper's: Adam, G 2e-4 / D 5e-5, 6 epochs of 9.5k triplets at 64 px. The paper is silent on
# Adam's betas and the batch size: betas from pix2pix, batch 16 (its code used 8; 16 keeps a
# 2-core CPU's matrix units busier and gives the same number of triplets per epoch).
LR_G, LR_D, BETAS = 2e-4, 5e-5, (0.5, 0.999)
EPOCHS, TRIPLETS_PER_EPOCH, BATCH_SIZE = 6, 9500, 16
NGF, N_DOWN, NDF = 64, 4, 32
LOG_EVERY, SAMPLE_EVERY, CKPT_EVERY = 50, 500, 500
CACHE = os.path.join("data", "synthetic")
RESUMABLE = {"steps", "epochs", "device", "log_every", "sample_every", "ckpt_every", "compile", "out"}
TERMS = ("adv", "pix", "self", "triple", "pp", "id")


def fail(msg):
    """A user-facing error: one line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, ckpt):
    """Atomic: a crash (or Ctrl-C) while writing never leaves a half checkpoint behind."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """A checkpoint is a plain dict of tensors and Python values, so weights_only=True loads it
    without running any pickled code."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise data.DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ckpt, dict) or not {"G", "args", "step"} <= set(ckpt):
        raise data.DataError(f"{path}: not a facesynth checkpoint (missing G/args/step)")
    return ckpt


def build_generator(args):
    return networks.Generator(ngf=args["ngf"], n_down=args["n_down"])


def load_generator(path, device="cpu"):
    """G from a run folder or checkpoint file, in eval mode, and the run's config."""
    ckpt = load_checkpoint(path, device)
    G = build_generator(ckpt["args"]).to(device)
    G.load_state_dict(ckpt["G"])
    cfg = {"args": ckpt["args"], "lambdas": ckpt["lambdas"], "vgg": ckpt["vgg"],
           "params_G": networks.count_params(G), "step": ckpt["step"]}
    return G.eval(), cfg


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


def train_step(G, D, vgg, opt_G, opt_D, b, lam, measure, cfg, fused=True, amp=None):
    """One step on a batch b of device tensors. Returns the raw (unweighted) terms as tensors:
    every term with a weight, plus, when measure is set, the ablated ones (computed without grad),
    so that ablated runs can be compared term by term."""
    I_s, I_t = b["I_s"], b["I_t"]
    e_s, e_m, e_t = (data.heatmaps(b[k], cfg["size"], cfg["sigma"], cfg["window"]) for k in ("lm_s", "lm_m", "lm_t"))
    need = lambda *ts: any(lam[t] > 0 for t in ts)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with autocast:
        fake, mid, cyc, tri = generator_passes(G, I_s, e_s, e_m, e_t, need("self", "triple") or measure, fused)
        # L_D = BCE(D(I_t, e_t), 1) + BCE(D(Î_t, e_t), 0); Î_t detached: this update is D's alone
        L_D = losses.L_D(D(I_t, e_t), D(fake.detach(), e_t))
    opt_D.zero_grad(set_to_none=True)
    L_D.backward()
    opt_D.step()

    D_plain = getattr(D, "module", D)  # G's pass through D needs no gradient sync for D
    D_plain.requires_grad_(False)
    terms = {}
    with autocast:
        terms["adv"] = losses.L_adv(D_plain(fake, e_t))
        terms["pix"] = losses.L_pix(fake, I_t)
        if cyc is not None:
            terms["self"] = losses.L_self(cyc, I_s)
            terms["triple"] = losses.L_triple(tri, fake)
        if need("pp", "id") or measure:
            with torch.no_grad():
                real_f = vgg(I_t)
            with torch.set_grad_enabled(need("pp", "id")):
                fake_f = vgg(fake)
            terms["pp"] = losses.L_pp(fake_f, real_f)
            terms["id"] = losses.L_id(fake_f, real_f)
        L_G = losses.generator_loss(terms, lam)
    D_plain.requires_grad_(True)
    opt_G.zero_grad(set_to_none=True)
    L_G.backward()
    opt_G.step()
    terms = {k: v.detach().float() for k, v in terms.items()}
    terms["G"], terms["D"] = L_G.detach().float(), L_D.detach().float()
    return terms


# ----------------------------------------------------------------------------- data feed
def batches(videos, args, start, total, rank=0, world=1, device="cpu"):
    """Yield (step, batch) from step `start` on. A background thread gathers batches from the
    memory maps while the device computes; on CUDA they go through pinned memory."""
    B = args["batch_size"]
    per_epoch = steps_per_epoch(args, world)

    def work(q):
        cache = {}
        for step in range(start, total):
            epoch, i = divmod(step, per_epoch)
            if epoch not in cache:  # one epoch's triplets: a pure function of (seed, epoch)
                cache = {epoch: data.sample_triplets(videos, per_epoch * B * world, args["seed"], epoch, args["max_gap"])}
            rows = cache[epoch][(i * world + rank) * B:(i * world + rank + 1) * B]
            b = data.load_batch(videos, rows)
            if device.type == "cuda":
                b = {k: v.pin_memory() for k, v in b.items()}
            q.put((step, b))
        q.put(None)

    q = queue.Queue(maxsize=4)
    threading.Thread(target=work, args=(q,), daemon=True).start()
    while (item := q.get()) is not None:
        step, b = item
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        I_s, I_t = data.to_tensor(b.pop("I_s")), data.to_tensor(b.pop("I_t"))
        # horizontal flip, the same for all three frames of a triplet, landmark order mirrored
        f = b.pop("flip")
        pick = lambda a, c: torch.where(f.view(-1, *[1] * (a.dim() - 1)), c, a)
        out = {"I_s": pick(I_s, I_s.flip(-1)), "I_t": pick(I_t, I_t.flip(-1))}
        for k in ("lm_s", "lm_m", "lm_t"):
            out[k] = pick(b[k], data.mirror_landmarks(b[k], I_s.shape[-1]))
        yield step, out


def steps_per_epoch(args, world=1):
    return max(1, args["triplets_per_epoch"] // (args["batch_size"] * world))


# ----------------------------------------------------------------------------- training
def sample_grid(path, b, fake, size, n=4):
    """Rows of (source, target landmarks, generated, target): what G saw and what it drew."""
    from PIL import Image
    n = min(n, len(fake))
    lm = data.heatmaps(b["lm_t"][:n], size).amax(1, keepdim=True).mul(2).sub(1).expand(-1, 3, -1, -1)
    cols = [b["I_s"][:n], lm, fake[:n].float(), b["I_t"][:n]]
    rows = [np.concatenate(list(data.to_uint8(c[i:i + 1])[0] for c in cols), axis=1) for i in range(n)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def setup_distributed(device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python facesynth.py` is one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def pick_device(name):
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    print("note: no CUDA device, training on the CPU")
    return torch.device("cpu")


def train(args):
    """The paper's training run. args: a dict of the command-line options (see main())."""
    resume = args.get("resume")
    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        saved, given = ckpt["args"], args.pop("_given")
        changed = sorted(k for k in given - RESUMABLE - {"resume"} if args[k] != saved.get(k))
        if changed:
            raise data.DataError(f"{resume}: cannot change {', '.join(changed)} when resuming")
        args = {**saved, **{k: args[k] for k in given & RESUMABLE}, "resume": resume}
        if "out" not in given:
            args["out"] = resume if os.path.isdir(resume) else os.path.dirname(resume)
    args.pop("_given", None)
    device = pick_device(args["device"])
    rank, world, device = setup_distributed(device)
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(args["seed"] + rank)

    if args["data"] is None:
        args["data"] = data.ensure_synthetic(CACHE) if main_rank else None
        if world > 1:  # the other ranks wait for rank 0 to have built the cache
            box = [args["data"]]
            dist.broadcast_object_list(box)
            args["data"] = box[0]
    with open(os.path.join(args["data"], "prepare.json")) as f:
        args["size"] = json.load(f)["size"]
    videos = data.load_videos(args["data"], "train")
    lam = losses.lambdas({t: args[f"lambda_{t}"] for t in TERMS if args[f"lambda_{t}"] is not None}, args["ablate"])

    G = build_generator(args).to(device)
    D = networks.Discriminator(ndf=args["ndf"]).to(device)
    widths = args["vgg_widths"] or networks.VGG_WIDTHS
    vgg, vgg_source = networks.load_vgg(losses.VGG_LAYERS, path=args["vgg"], log=log, widths=widths)
    vgg = vgg.to(device)
    if device.type == "cuda":  # tensor cores want NHWC; on the CPU oneDNN picks its own layout
        G, D, vgg = (m.to(memory_format=torch.channels_last) for m in (G, D, vgg))
    opt_G = torch.optim.Adam(G.parameters(), lr=args["lr_g"], betas=BETAS)
    opt_D = torch.optim.Adam(D.parameters(), lr=args["lr_d"], betas=BETAS)
    start = 0
    if ckpt:
        G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
        opt_G.load_state_dict(ckpt["opt_G"]), opt_D.load_state_dict(ckpt["opt_D"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start = ckpt["step"]
    G_run, D_run = G, D
    if world > 1:
        G_run = torch.nn.parallel.DistributedDataParallel(G, device_ids=[device] if device.type == "cuda" else None)
        D_run = torch.nn.parallel.DistributedDataParallel(D, device_ids=[device] if device.type == "cuda" else None)
    if args["compile"]:
        G_run = torch.compile(G_run)

    per_epoch = steps_per_epoch(args, world)
    total = args["steps"] or args["epochs"] * per_epoch
    out = args["out"]
    cfg = {"args": args, "lambdas": lam, "vgg": vgg_source, "params_G": networks.count_params(G),
           "params_D": networks.count_params(D), "world_size": world, "device": str(device)}
    if main_rank:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    log(f"G {cfg['params_G'] / 1e6:.2f}M params, D {cfg['params_D'] / 1e6:.3f}M params, VGG: {vgg_source}; "
        f"{len(videos)} train videos, {total} steps of {args['batch_size'] * world} triplets "
        f"({per_epoch} steps/epoch) on {device}" + (f" x{world}" if world > 1 else "") + f", from step {start}")

    def checkpoint(step):
        if main_rank:
            save_checkpoint(os.path.join(out, "ckpt.pt"), {
                "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "step": step, "epoch": step / per_epoch, "args": args, "lambdas": lam, "vgg": vgg_source,
                "rng": {"torch": torch.get_rng_state()}})

    log_path = os.path.join(out, "log.csv")
    fields = ["step", "epoch", "time", "triplets_per_s"] + [f"L_{t}" for t in TERMS] + ["L_G", "L_D", "lr_G", "lr_D"]
    if main_rank:  # a fresh log, or on resume the rows up to the checkpoint (later ones are redone)
        kept = []
        if start and os.path.isfile(log_path):
            with open(log_path, newline="") as f:
                kept = [r for r in csv.reader(f) if r and r[0] != "step" and int(r[0]) <= start]
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows([fields] + kept)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # NaN/inf seen: checked at log time, no sync per step
    t0, t_last, step_last, done = time.time(), time.time(), start, start
    cfg_step = {"size": args["size"], "sigma": args["sigma"], "window": args["window"]}
    stop = []  # Ctrl-C finishes the step in flight, then checkpoints: never a half-updated state
    signal.signal(signal.SIGINT, lambda *_: stop.append(1) if not stop else signal.default_int_handler())
    try:
        for step, b in batches(videos, args, start, total, rank, world, device):
            measure = (step + 1) % args["log_every"] == 0 or step + 1 == total
            terms = train_step(G_run, D_run, vgg, opt_G, opt_D, b, lam, measure, cfg_step, amp=device.type == "cuda")
            bad |= ~torch.isfinite(terms["G"] + terms["D"])
            done = step + 1
            if measure or done % args["ckpt_every"] == 0:
                if bad.item():
                    raise FloatingPointError(f"loss became NaN/inf by step {done}; stopped, "
                                             f"{os.path.join(out, 'ckpt.pt')} keeps the last good state")
            if measure and main_rank:
                now = time.time()
                rate = (done - step_last) * args["batch_size"] * world / (now - t_last)
                t_last, step_last = now, done
                vals = {k: v.item() for k, v in terms.items()}
                row = [done, f"{done / per_epoch:.3f}", f"{now - t0:.1f}", f"{rate:.2f}"]
                row += [f"{vals[t]:.5g}" if t in vals else "" for t in TERMS]
                row += [f"{vals['G']:.5g}", f"{vals['D']:.5g}", args["lr_g"], args["lr_d"]]
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow(row)
                eta = (total - done) * args["batch_size"] * world / max(rate, 1e-9)
                print(f"step {done}/{total} epoch {done / per_epoch:.2f} {rate:.1f} triplets/s "
                      f"ETA {eta // 60:.0f}m{eta % 60:02.0f}s | " +
                      " ".join(f"{t} {vals[t]:.4f}" for t in TERMS if t in vals) + f" | D {vals['D']:.4f}", flush=True)
            if main_rank and (done % args["sample_every"] == 0 or done == total):
                with torch.no_grad():
                    fake = G(b["I_s"][:4], data.heatmaps(b["lm_t"][:4], args["size"], args["sigma"], args["window"]))
                sample_grid(os.path.join(out, "samples", f"step_{done:06d}.png"), b, fake, args["size"])
            if done % args["ckpt_every"] == 0 or done == total:
                checkpoint(done)
            if stop:
                if not bad.item():
                    checkpoint(done)
                log(f"\ninterrupted: checkpoint at step {done} in {out}/ckpt.pt; continue with --resume {out}")
                raise SystemExit(130)
        if world > 1:  # DDP's promise, checked: every rank ends with the same weights
            sums = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in (G, D)]).to(device)
            every = [torch.zeros_like(sums) for _ in range(world)]
            dist.all_gather(every, sums)
            same = all(torch.equal(every[0], s) for s in every)
            log(f"{world} ranks identical: {same}")
            if not same:
                raise FloatingPointError("ranks drifted apart: their weights differ")
    finally:
        if world > 1:
            dist.destroy_process_group()
    log(f"done: {done} steps in {time.time() - t0:.0f}s; outputs in {out}/ (ckpt.pt, log.csv, config.json, samples/)")
    return out


# ----------------------------------------------------------------------------- command line
def add_train_options(p):
    p.add_argument("--data", help="prepared dataset (default: the built-in synthetic set, made once in data/synthetic/)")
    p.add_argument("--out", default=os.path.join("runs", "default"), help="run folder (default runs/default)")
    p.add_argument("--resume", help="run folder or checkpoint to continue from")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="triplets per step (per process)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--triplets-per-epoch", type=int, default=TRIPLETS_PER_EPOCH)
    p.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    p.add_argument("--lr-g", type=float, default=LR_G)
    p.add_argument("--lr-d", type=float, default=LR_D)
    p.add_argument("--ngf", type=int, default=NGF, help="G width (pix2pix: 64)")
    p.add_argument("--n-down", type=int, default=N_DOWN, help="G down-sampling blocks (paper: 4)")
    p.add_argument("--ndf", type=int, default=NDF, help="D width (paper: 32)")
    p.add_argument("--sigma", type=float, default=data.SIGMA, help="heatmap Gaussian sigma in pixels")
    p.add_argument("--window", type=int, default=data.WINDOW, help="heatmap window in pixels")
    p.add_argument("--max-gap", type=int, help="max frames between a triplet's ends (default: whole video)")
    for t in TERMS:
        p.add_argument(f"--lambda-{t}", type=float, help=f"weight of L_{t} (default {losses.LAMBDAS[t]:g})")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(losses.GROUPS),
                   help="switch off a group of terms (repeatable): pix, consistency (self+triple), feature (pp+id)")
    p.add_argument("--vgg", help="torchvision VGG-19 state dict (vgg19-dcbb9e9d.pth)")
    p.add_argument("--vgg-widths", type=int, nargs=5, metavar="C",
                   help="narrower VGG block widths for smoke tests (random features only, no --vgg)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=LOG_EVERY)
    p.add_argument("--sample-every", type=int, default=SAMPLE_EVERY)
    p.add_argument("--ckpt-every", type=int, default=CKPT_EVERY)


def given_options(parser, argv):
    """Which options the user typed (resume may only change some of them)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            shadow._add_action(copy.copy(a)).default = argparse.SUPPRESS
    return set(vars(shadow.parse_known_args(argv)[0]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p_train = sub.add_parser("train", help="train G and D (the paper's run)")
    add_train_options(p_train)
    p = sub.add_parser("prepare", help="a 300VW-layout folder -> a prepared dataset")
    p.add_argument("src"), p.add_argument("out")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--crop-scale", type=float, default=data.CROP_SCALE, help="crop side / landmark box side")
    p.add_argument("--split-file", help="JSON {split: [video names]} instead of the official 300VW split")
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("synth", help="write the synthetic talking-head videos in 300VW layout")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, nargs=4, default=[50, 31, 19, 14], metavar=("TRAIN", "T1", "T2", "T3"))
    p.add_argument("--frames", type=int, help="frames per video (default: data.synth's)")
    p.add_argument("--size", type=int, help="frame size in pixels (default: data.synth's)")
    p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        if args.verb == "train":
            a = vars(args)
            a.pop("verb")
            a["_given"] = given_options(p_train, argv[1:])
            train(a)
        elif args.verb == "prepare":
            summary = data.prepare(args.src, args.out, size=args.size, crop_scale=args.crop_scale,
                                   workers=args.workers, split_file=args.split_file)
            if summary["prepared"] + summary["existing"] == 0:
                fail(f"{args.src}: no video could be prepared")
            print(f"prepared dataset in {args.out}/")
        elif args.verb == "synth":
            sizes = {k: v for k, v in (("n_frames", args.frames), ("size", args.size)) if v is not None}
            data.synth(args.out, n_videos=tuple(args.videos), seed=args.seed, workers=args.workers, **sizes)
            print(f"synthetic videos in {args.out}/ (prepare them with: facesynth.py prepare {args.out} OUT)")
    except (data.DataError, FloatingPointError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
