"""A run's life, which the paper's code never managed: its folder's one owner at a time (a lock), what a
resume may change, a new run that starts from another's weights (--init), a stop on a signal that
saves first, its processes under torchrun (their group, their agreements, their weights compared at
the end), and the VGG-19 weights fetched once into torch's cache. `facesynth.py train` calls these
around its loop; the networks themselves know nothing of files, locks, signals or the internet.
"""
import contextlib
import csv
import fcntl
import gc
import http.client
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
import urllib.request

import torch
import torch.distributed as dist

from data import DataError, load_videos, progress, read_prepared, write_json, writing
from extras import synthetic
from losses import TERMS
from networks import TRAIN_KEYS, checkpoint_file, load_checkpoint

# What --resume may change: the schedule (it sticks from then on), and this session's own settings.
SCHEDULE = {"steps", "epochs", "out"}
SESSION = {"device", "log_every", "sample_every", "ckpt_every", "compile"}
# What rebuilds the models: a run started with --init takes these from the run it starts from.
ARCHITECTURE = ("ngf", "n_down", "ndf", "output")
LOCK = ".lock"  # in a run folder: the PID of the one process that writes it
STALE = re.compile(r"\.\d+\.tmp(\.\w+)?$|^ckpt\.pt\.tmp$")  # NAME.PID.tmp[.EXT] (data.writing)
VGG_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG_FILE = "vgg19-dcbb9e9d.pth"
VGG_TIMEOUT = 5  # seconds; these machines are offline and must give up at once, not hang
# Ctrl-C, and what ends runs elsewhere: SIGTERM (timeout, docker stop, a cluster's pre-emption), SIGHUP
# (the terminal closed)
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
# Two lines, once per run (a resumed run keeps its features quietly): the run trains either way.
RANDOM_WARNING = ("note: no VGG-19 weights ({why}): L_pp and L_id use random VGG features.\n"
                  "      Training works; results differ from the paper's. Put " + VGG_FILE
                  + " in {where}/ or pass --vgg PATH.")


# ----------------------------------------------------------------------------- owning a run folder
def holds_run(out):
    """A run folder with a checkpoint: what `train --out` must not start afresh over."""
    return os.path.isfile(os.path.join(out, "ckpt.pt"))


def run_folder(path):
    """The run folder of a run folder or checkpoint file."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def _lock_holder(path):
    try:
        with open(path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def own_run(out, resume=None):
    """One writer per run folder, for as long as the `with` lasts: OUT/.lock holds the owner's PID under an
    flock, so a second process refuses at once, and a lock whose process died (even by kill -9) is free
    again: the kernel drops the flock with the process. Then: OUT must hold no run, or the one `resume`
    continues (never written over silently), and temporary files in OUT are stale and removed."""
    path = os.path.join(out, LOCK)
    try:
        os.makedirs(out, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DataError(f"{out}: in use by process {_lock_holder(path)} (it holds {path}); wait for "
                                "it to finish or stop it, or use another --out") from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # else the last owner removed the file between our open and flock: take the new one
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        raise DataError(f"{e.filename or out}: cannot use as a run folder ({e.strerror or e})") from None
    try:
        mine = os.path.join(out, "ckpt.pt")
        if holds_run(out) and not resume:
            raise DataError(f"{out}: already holds a run ({mine}); continue it with --resume {out}, or "
                            "choose another --out")
        if holds_run(out) and resume and not (os.path.exists(checkpoint_file(resume))
                                              and os.path.samefile(checkpoint_file(resume), mine)):
            raise DataError(f"{out}: holds another run ({mine}) that --resume {resume} would write over; "
                            "choose another --out")
        for d in (out, os.path.join(out, "samples")):  # no other writer: a killed one's leftovers
            for f in filter(STALE.search, os.listdir(d) if os.path.isdir(d) else []):
                os.remove(os.path.join(d, f))
        yield out
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # before the flock goes: a process waiting on this file then makes a fresh one
        os.close(fd)


# ----------------------------------------------------------------------------- its files
LOG_FIELDS = (["step", "epoch", "time", "triplets_per_s"] + [f"L_{t}" for t in TERMS]
              + ["L_G", "L_D", "lr_G", "lr_D"])


def start_outputs(out, config, start):
    """The run folder: samples/, config.json, and a fresh log.csv, or on resume its rows up to the
    checkpoint's step (later ones are redone)."""
    write_json(os.path.join(out, "config.json"), config)
    path, rows = os.path.join(out, "log.csv"), []
    if start and os.path.isfile(path):  # a row cut short (a kill mid-write) is dropped
        with open(path, newline="") as f:
            head, *rows = list(csv.reader(f)) or [[]]
            rows = [r for r in rows if len(r) == len(head) and r[0].isdigit() and int(r[0]) <= start]
    with writing(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([LOG_FIELDS] + rows)


def log_row(path, step, per_epoch, seconds, rate, vals, lrs):
    """A row of log.csv: the step, its epoch, training seconds so far, triplets/s, every raw term (blank
    where not measured), L_G, L_D and the learning rates."""
    row = [step, f"{step / per_epoch:.3f}", f"{seconds:.1f}", f"{rate:.2f}"]
    row += [f"{vals[t]:.5g}" if t in vals else "" for t in TERMS]
    row += [f"{vals[k]:.5g}" if k in vals else "" for k in ("G", "D")] + [f"{lr:.6g}" for lr in lrs]
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(row)


# ----------------------------------------------------------------------------- where a run starts
def resumed(args, given):
    """--resume -> (this session's options, the run's options to save, the checkpoint). `given`: the
    options typed now. The run keeps its saved options; a schedule option typed now (--steps, --epochs,
    --out) changes the run, a session option typed now (--device, --log-every, ...) only this session.
    A changed model or data option is an error: the weights would no longer mean what the options say."""
    ckpt = load_checkpoint(args["resume"], TRAIN_KEYS)
    saved = {**{k: v for k, v in args.items() if k not in given}, **ckpt["args"]}  # old runs: new defaults
    changed = sorted(k for k in given - SESSION - SCHEDULE - {"resume"} if args[k] != saved.get(k))
    if changed:
        names = ', '.join('--' + k.replace('_', '-') for k in changed)
        raise DataError(f"{args['resume']}: cannot change {names} "
                        "when resuming; start a new run with another --out instead")
    run = {**saved, **{k: args[k] for k in given & SCHEDULE}, "resume": args["resume"], "out": args["out"]}
    return {**run, **{k: args[k] for k in given & SESSION}}, run, ckpt


def initialised(args, given):
    """--init RUN -> (the options with RUN's architecture, RUN's checkpoint). A new run that starts from
    RUN's G and D: fresh optimisers, this run's data, schedule and folder. An architecture option typed
    now that differs from RUN's is an error: RUN's weights would not fit it."""
    ckpt = load_checkpoint(args["init"], ("G", "D", "step", "args"))
    theirs = {k: ckpt["args"].get(k, "image" if k == "output" else None) for k in ARCHITECTURE}
    clash = [k for k in ARCHITECTURE if k in given and args[k] != theirs[k]]
    if clash:
        raise DataError(f"--init {args['init']}: its run has " + ", ".join(
            f"--{k.replace('_', '-')} {theirs[k]}" for k in clash) + ", not " + ", ".join(
            f"{args[k]}" for k in clash) + "; leave the option out to take the run's")
    return {**args, **theirs}, ckpt


# ----------------------------------------------------------------------------- its processes
def world_size():
    """How many processes train together: torchrun's WORLD_SIZE, 1 for a plain `python facesynth.py`."""
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python facesynth.py` is one process. Returns
    (rank, world, device, group): group is a gloo group for the ranks' CPU tensors (beside NCCL's)."""
    if world_size() == 1:
        return 0, 1, device, None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, dist.new_group(backend="gloo")


def training_data(root, main_rank, world, init=None):
    """({"data": the prepared dataset to train on, "size": its image size}, its train split's videos):
    `root` (--data), or the built-in synthetic set, built once by rank 0 while the other ranks wait. A
    run that starts from `init`'s weights must train at the size that run trained at."""
    if root is None:
        box = [synthetic.ensure_synthetic(synthetic.SYNTH_CACHE) if main_rank else None]
        if world > 1:
            dist.broadcast_object_list(box)
        root = box[0]
    size = read_prepared(root)["size"]
    if init and init["args"]["size"] != size:
        raise DataError(f"--init: its run was trained at {init['args']['size']} px, {root} is {size} px; "
                        "prepare the data at that size (prepare --size)")
    return {"data": root, "size": size}, load_videos(root, "train")


def ranks_agree(G, D, world, device, log):
    """DDP's promise, checked at the end: every rank holds the same weights (one process: none to check)."""
    if world == 1:
        return
    sums = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in (G, D)]).to(device)
    every = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(every, sums)
    same = all(torch.equal(every[0], s) for s in every)
    log(f"{world} ranks identical: {same}")
    if not same:
        raise FloatingPointError("ranks drifted apart: their weights differ")


def part(world):
    """The ranks' end, once the caller has dropped its DDP wrappers: collected now, then the process group
    destroyed. Left to the interpreter's exit, the wrappers' cycles kept gloo's worker threads busy late,
    and they aborted a finished run now and then (docs/training.md)."""
    if world > 1:
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- stopping on a signal
def on_stop_signals(log):
    """Ctrl-C, SIGTERM or SIGHUP once: the run saves at its next chance and exits with 128 + the signal's
    number. Twice: it exits at once, ckpt.pt untouched. Returns the list that holds the first signal
    once asked to stop, and the old handlers (restore them with restore_signals)."""
    stop = []

    def handler(signum, _):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if signum == signal.SIGHUP and os.isatty(1):  # the terminal is gone: a print would fail the save
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2), os.close(null)
        name = STOP_SIGNALS[signum]
        log(f"\n{name}: saving after this step ({name} again to quit without saving)", flush=True)

    return stop, {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def restore_signals(previous):
    for s, handler in previous.items():
        signal.signal(s, handler)


def agree(stop, bad, group):
    """The ranks' one agreement, at a step every rank knows alike: (the signal that stops the run, 0 for
    none; whether a loss went NaN/inf). Over several ranks (`group`: their CPU gloo group) the largest
    signal any got and whether any saw a NaN, so all stop after the same step (one leaving alone strands
    the rest, unsaved)."""
    both = torch.tensor([stop[0] if stop else 0, int(bad)])
    if group is not None:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return int(both[0]), bool(both[1])


# ----------------------------------------------------------------------------- VGG-19's weights
def _online(host, timeout):
    """True when `host` resolves within `timeout` s. getaddrinfo ignores socket timeouts, and a dead
    resolver can block it for minutes, so it runs in a thread we are free to abandon."""
    ok = []

    def resolve():
        try:
            ok.append(socket.getaddrinfo(host, 443))
        except OSError:
            pass

    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _download(url, dest, log):
    """Fetch `url` into `dest`, whole or not at all: a partial file must never look like a cached one."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if not _online(host, VGG_TIMEOUT):
        raise OSError(f"cannot resolve {host}")
    log(f"downloading {url} -> {dest}")
    with urllib.request.urlopen(url, timeout=VGG_TIMEOUT) as r, writing(dest) as tmp, open(tmp, "wb") as f:
        total, done, t0 = int(r.headers.get("Content-Length", 0)), 0, time.time()
        while chunk := r.read(1 << 23):
            f.write(chunk)
            done += len(chunk)
            progress("vgg19", done >> 20, max(total, done) >> 20, t0, unit="MiB")


def vgg_weights(path=None, log=print):
    """Where VGG-19's weights come from, in order: `path`, torch's hub cache, a download into it; else
    "random" (fixed random features), said in a two-line note. networks.load_vgg takes the answer."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    if path == "random":  # asked for: no lookup, no download attempt, but the same notice
        log(RANDOM_WARNING.format(why="--vgg random", where=cache))
        return "random"
    if path is None:
        path = os.path.join(cache, VGG_FILE)
        if not os.path.isfile(path):
            try:
                _download(VGG_URL, path, log)
            except (OSError, DataError, http.client.HTTPException) as e:  # offline, refused, cut off
                log(RANDOM_WARNING.format(why=f"download failed: {e}", where=cache))
                return "random"
    return path
