"""The paper's data, from files on disk to the tensors of a training step:

    the iBUG-68 layout and the 300VW split; .pts files; THE crop; video decoding
    `prepare`: 300VW folders (and plain videos, given their landmarks) -> a prepared dataset
    a prepared split: triplets, the batch feed, horizontal flips (the iBUG mirror), heatmaps
    and what every module shares: one-line errors, writes that land whole or not at all, progress lines

A prepared dataset is a folder of videos, each `NNN/frames.npy` (uint8, T x S x S x 3) and
`NNN/landmarks.npy` (float32, T x 68 x 2, x then y, 0-based crop pixels), plus `split.json` and
`prepare.json`. Raw 300VW, plain videos and the synthetic set all end up in that one layout.
"""
import contextlib
import functools
import json
import math
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import imageio
import numpy as np
import torch
from PIL import Image

N_LANDMARKS = 68
# iBUG-68 horizontal mirror: after flipping the pixels, point i must take the role of MIRROR[i]
# (the paper's original code flipped pixels only, so the left eye became the right one).
MIRROR = [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 26, 25, 24, 23, 22, 21, 20, 19,
          18, 17, 27, 28, 29, 30, 35, 34, 33, 32, 31, 45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41,
          40, 54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
# The official 300VW split (Shen et al. 2015); videos outside it go to train.
SPLITS_300VW = {
    "train": "001 002 003 004 007 009 010 011 013 015 016 017 018 019 020 022 025 027 028 029 031 033 "
             "034 035 037 039 041 043 044 046 047 048 049 053 057 059 112 113 115 119 120 123 138 "
             "143 144 160 204 205 223 225".split(),
    "test1": "114 124 125 126 150 158 401 402 505 506 507 508 509 510 511 514 515 518 519 520 521 522 "
             "524 525 537 538 540 541 546 547 548".split(),
    "test2": "203 208 211 212 213 214 218 224 403 404 405 406 407 408 409 412 550 551 553".split(),
    "test3": "410 411 516 517 526 528 529 530 531 533 557 558 559 562".split(),
}
# Crop side = CROP_SCALE x the larger side of the landmarks' box. The 68 points stop at the brows,
# and the forehead above them is about half the brow-to-chin height; 1.8 centred on the box leaves
# ~0.4-0.5 of that height above the brows, so the forehead, hairline and some hair fit.
CROP_SCALE = 1.8
# Heatmaps. The paper: a Gaussian "applied over 7 pixels with a mean of 0 and a variance of 1/3".
# Read literally (sigma^2 = 1/3 px^2) that is a one-pixel spike whose neighbours are 0.22: it gives
# the generator almost no spatial gradient to follow. The original code drew sigma = 1 px at 128 px
# and resized to 64 px, which flattened the peak to 0.65. We read it as: a 7-pixel window, sigma =
# 1 px at the working size, peak exactly 1 at the landmark; both are options.
SIGMA, WINDOW = 1.0, 7
MIN_FRAMES = 3  # a training triplet is three distinct frames of one video
# Plain videos without a --split-file are held out as test1: HELD_OUT of them, the last by name (at least
# 1 of 2+), or (hold-out "tail", the default for a single video) each video's last HELD_OUT of frames,
# prepared as a video of its own, NAME-tail, so that no triplet or pair mixes the two parts.
HELD_OUT, TAIL = 0.2, "-tail"
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")


# ----------------------------------------------------------------------------- .pts, THE crop, videos

def read_pts(path):
    """A 300VW/iBUG .pts file -> float32 (68, 2), 0-based (the files are 1-based)."""
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]  # extra blank lines and CRLF endings occur in 300VW
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if "{" not in lines or "}" not in lines:
        raise DataError(f"{path}: " + ("missing '{' or '}'" if lines else "empty file"))
    a, b = lines.index("{"), lines.index("}")
    n = next((l.split(":", 1)[1].strip() for l in lines[:a] if l.startswith("n_points")), None)
    if n != str(N_LANDMARKS) or b - a - 1 != N_LANDMARKS:
        raise DataError(f"{path}: n_points {n} with {b - a - 1} point lines, expected {N_LANDMARKS}")
    pts = []
    for l in lines[a + 1:b]:
        try:
            x, y = map(float, l.split())
        except ValueError:
            raise DataError(f"{path}: bad point line {l!r}, expected 'x y'") from None
        pts.append((x - 1, y - 1))
    pts = np.array(pts, np.float32)
    if not np.isfinite(pts).all():
        raise DataError(f"{path}: NaN or infinite coordinate")
    if np.ptp(pts, 0).max() < 1:
        raise DataError(f"{path}: all points coincide")  # no face size, so no crop
    return pts


def face_size(lm):
    """The larger side of the landmarks' box: what THE crop scales with, so a motion divided by it is
    the same in raw-frame pixels, prepared-crop pixels or any resolution."""
    return float(np.ptp(lm, 0).max())


def crop_box(landmarks, crop_scale=CROP_SCALE):
    """(x0, y0, side) in pixel-edge coordinates (pixel i spans [i, i+1), so its centre is i+0.5)."""
    lo, hi = landmarks.min(0), landmarks.max(0)
    side = crop_scale * face_size(landmarks)
    cx, cy = (lo + hi) / 2 + 0.5
    return float(cx - side / 2), float(cy - side / 2), side


def crop_face(frame, landmarks, size=64, crop_scale=CROP_SCALE):
    """THE crop: a square around the landmarks' box, resized to size x size. Outside the frame the
    edge pixels are replicated: black borders would be sharp fake edges that move with the face
    (the discriminator and VGG features latch onto those), mirroring would duplicate face parts."""
    x0, y0, side = crop_box(landmarks, crop_scale)
    # Cut only a window around the box (frames can be 1280 px wide); the margin keeps the anti-aliasing
    # filter's support (bicubic: 2 px x the scale) on real pixels. Clipped indices = edge replicate.
    m = 2 * math.ceil(side / size) + 2
    ix, iy = math.floor(x0) - m, math.floor(y0) - m
    n = math.ceil(side) + 2 * m + 1
    H, W = frame.shape[:2]
    win = frame[np.clip(np.arange(iy, iy + n), 0, H - 1)][:, np.clip(np.arange(ix, ix + n), 0, W - 1)]
    box = (x0 - ix, y0 - iy, x0 - ix + side, y0 - iy + side)
    crop = Image.fromarray(np.ascontiguousarray(win[..., :3])).resize((size, size), Image.BICUBIC, box=box)
    # Output pixel centre u + 0.5 samples input edge coordinate x0 + (u + 0.5) * side / size.
    uv = (landmarks + 0.5 - np.array([x0, y0])) * (size / side) - 0.5
    return np.asarray(crop, np.uint8), uv.astype(np.float32)


def decode(vid):
    """A video's frames one at a time, RGB uint8 (H,W,3): 300VW's 1280 px frames of a whole video may not
    fit in memory. GIFs go through Pillow (imageio's ffmpeg plugin refuses them), the rest through ffmpeg."""
    try:
        if str(vid).lower().endswith(".gif"):  # palette or RGBA frames: made RGB
            yield from imageio.v3.imiter(vid, plugin="pillow", mode="RGB")
        else:
            with imageio.get_reader(vid, "ffmpeg") as reader:
                yield from reader
    except Exception as e:  # decoders raise many kinds; ffmpeg's message is many lines, its first says why
        raise DataError(f"{vid}: cannot decode "
                        f"({(str(e).strip() or type(e).__name__).splitlines()[0]})") from None


def frame_count(vid):
    """A video's frame count as its header tells it (for progress lines only), 0 when unknown."""
    try:
        if str(vid).lower().endswith(".gif"):
            return imageio.v3.improps(vid, plugin="pillow").n_images
        with imageio.get_reader(vid, "ffmpeg") as reader:
            meta = reader.get_meta_data()
        return round(meta["fps"] * meta["duration"])
    except Exception:  # decode() reports an unreadable video properly
        return 0


# ----------------------------------------------------------------------------- prepare
def outside(lms, shape):
    """Per landmark set (...,68,2): whether a point lies more than a frame size outside an (H,W,...)
    frame. Such a .pts is broken, and crop_face would allocate a window as large as its box."""
    size = np.array(shape[1::-1])
    return ((lms < -size) | (lms > 2 * size)).any((-1, -2))


def save_prepared(out, name, frames, marks, params=None):
    """One prepared video -> OUT/NAME (frames.npy, landmarks.npy, a synthetic video's params.json), written
    whole (writing): no half video looks finished, so a re-run can keep every folder it finds."""
    with writing(os.path.join(out, name), folder=True) as tmp:
        np.save(os.path.join(tmp, "frames.npy"), np.stack(frames))
        np.save(os.path.join(tmp, "landmarks.npy"), np.stack(marks))
        if params is not None:
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(params, f)


def _prepare_video(vdir, out, size, crop_scale, landmarks=None, tail=False):
    """One raw video -> OUT/NAME; returns (frames, warning lines) or raises DataError. A 300VW folder
    brings its landmarks (annot/*.pts); a video file NAME.mp4 (...) gets them from `landmarks`. With
    `tail`, its last HELD_OUT of frames go to OUT/NAME-tail instead."""
    warn = []
    if landmarks:
        name, vid = os.path.splitext(os.path.basename(vdir))[0], vdir
        lms, found, warn = landmarks(vid)
        files = [vid] * len(lms)  # what a bad landmark set names
    else:
        name, annot, vid = os.path.basename(vdir), os.path.join(vdir, "annot"), os.path.join(vdir, "vid.avi")
        if not os.path.isdir(annot):
            raise DataError(f"{annot}: missing annotation folder")
        files = sorted(f for f in os.listdir(annot) if f.endswith(".pts"))
        n = next((i for i, f in enumerate(files) if f != f"{i + 1:06d}.pts"), len(files))
        if n == 0:
            raise DataError(f"{os.path.join(annot, '000001.pts')}: missing (the annotation of frame 1; "
                            + (f"the first .pts is {files[0]})" if files else "annot/ has no .pts files)"))
        if n < len(files):  # a gap would shift every later annotation onto the wrong frame
            warn.append(f"{name}: {annot}: expected {n + 1:06d}.pts, found {files[n]}; using the first {n}")
        files = [os.path.join(annot, f) for f in files[:n]]
        lms, found = np.stack([read_pts(f) for f in files]), np.ones(n, bool)  # before decoding: fail fast
        if not os.path.isfile(vid):
            raise DataError(f"{vid}: missing")
    crops, t = [], 0
    for frame in decode(vid):
        if t == len(lms):
            warn.append(f"{name}: {vid} has more frames than the {len(lms)} .pts files; "
                        f"using the first {len(lms)}")
            break
        if t == 0 and outside(lms, frame.shape).any():  # checked before crop_face allocates anything
            raise DataError(f"{files[int(np.argmax(outside(lms, frame.shape)))]}: a landmark lies more than "
                            f"a frame size outside the {frame.shape[1]}x{frame.shape[0]} frames of {vid}")
        if found[t]:
            crops.append((t, *crop_face(frame, lms[t], size, crop_scale)))
        t += 1
    if 0 < t < len(lms):
        warn.append(f"{name}: {vid} has {t} frames for {len(lms)} .pts files; using the first {t}")
    cut = t - round(HELD_OUT * t) if tail else t  # the first frame of the tail, by the decoded frames
    parts = {name + TAIL: [c[1:] for c in crops if c[0] >= cut]} if tail else {}
    parts[name] = [c[1:] for c in crops if c[0] < cut]
    for part, cs in parts.items():  # sample_triplets could not use a shorter one; evaluation pairs need two
        if len(cs) < MIN_FRAMES:
            raise DataError(f"{vid}: only {len(cs)} usable frame(s)" + (f" in {part}" if tail else "")
                            + f"; a training triplet needs {MIN_FRAMES}")
    own = os.path.join(vdir, "params.json")  # a synthetic video's identity and motion
    params = read_json(own, "make the synthetic video again") if os.path.isfile(own) else None
    for part, cs in parts.items():  # the tail first: a re-run that finds NAME finds both
        save_prepared(out, part, *zip(*cs), params)
    return len(crops), warn


def _prepare_one(job):
    """Worker entry: a bad video becomes (0 frames, its one skip line), never an exception."""
    try:
        return _prepare_video(*job)
    except WriteError:
        raise  # a full disk fails every video alike: it stops prepare
    except DataError as e:
        return 0, [f"skip {os.path.basename(job[0])}: {e}"]


def _kept(d, size):
    """The frames of a prepared video a re-run keeps (whole and readable), 0 for one to prepare (again)."""
    try:
        return len(read_video(d, size)[1]) if os.path.isdir(d) else 0
    except DataError:
        return 0


def _read_split(src, split_file):
    """The split: --split-file, else SRC/split.json (the synthetic generator writes one), else the
    official one. Read before the long run, so a bad mapping fails first. Returns (its file, mapping)."""
    own = os.path.join(src, "split.json")
    split_src = split_file or (own if os.path.isfile(own) else None)
    if not split_src:
        return None, SPLITS_300VW
    mapping = read_json(split_src, "it must be a JSON mapping of split name -> list of video names")
    if not isinstance(mapping, dict) or not all(isinstance(v, list) for v in mapping.values()):
        raise DataError(f"{split_src}: not a JSON mapping of split name -> list of video names")
    return split_src, mapping


def prepare(src, out, size=64, crop_scale=CROP_SCALE, workers=2, split_file=None, log=print,
            videos=None, landmarks=None, skipped=None, hold_out=None):
    """Raw folder SRC of 300VW-layout videos (NNN/vid.avi + NNN/annot/*.pts) -> prepared dataset OUT (see
    the module docstring). Re-runnable: finished videos are kept, bad videos are skipped with one warning
    line each. Footage without .pts files comes from the caller (facesynth.py passes SRC's plain videos,
    extras/landmarks.py: plain_videos, usable_landmarks): `videos` {name: its file in SRC}, `landmarks` a
    picklable f(video) -> (landmarks (T,68,2), usable (T,) bool, warnings), `skipped` {SRC entry: why}.
    hold_out: how plain videos are held out without a split file, "name" or "tail" (None: "tail" for a
    SRC of one video, else "name"; see HELD_OUT)."""
    if split_file and hold_out:
        raise DataError(f"--hold-out {hold_out} --split-file {split_file}: the split file says what is held "
                        "out; give one of them")
    if not os.path.isdir(src):
        raise DataError(f"{src}: no such folder")
    videos, skipped = videos or {}, dict(skipped or {})
    entry = {d: d for d in os.listdir(src) if d[0] != "." and os.path.isdir(os.path.join(src, d))}
    entry.update(videos)
    if not entry:
        raise DataError(f"{src}: no video folders (NNN/vid.avi and NNN/annot/*.pts) and no video files "
                        f"({' '.join(VIDEO_EXTS)})")
    names = sorted(entry)
    hold_out = hold_out or ("tail" if len(names) == 1 else "name")
    tail = bool(videos) and not split_file and hold_out == "tail"  # only plain videos have a tail to hold
    meta = {"size": size, "crop_scale": crop_scale, "source": os.path.abspath(src),
            "synthetic": any(os.path.isfile(os.path.join(src, d, "params.json")) for d in names),
            "hold_out": "tail" if tail else "name"}
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{out}: cannot make the output folder ({e.strerror})") from None
    if os.path.isfile(os.path.join(out, "prepare.json")):
        old = read_json(os.path.join(out, "prepare.json"), "remove it, or use another output folder")
        old = old if isinstance(old, dict) else {}
        was = (old.get("size"), old.get("crop_scale"), old.get("hold_out", "name"))  # name: before --hold-out
        if was != (size, crop_scale, meta["hold_out"]):
            raise DataError(f"{out}/prepare.json: prepared with size {was[0]}, crop_scale {was[1]}, hold-out "
                            f"{was[2]}, not {size}, {crop_scale}, {meta['hold_out']}; use another output folder")
    split_src, mapping = _read_split(src, split_file)
    write_json(os.path.join(out, "prepare.json"), meta)
    kept = {d: _kept(os.path.join(out, d), size) for d in names}
    existing, todo = [d for d in names if kept[d]], [d for d in names if not kept[d]]
    frames = sum(kept.values())
    # Progress counts frames; the total starts at the .pts (or header) count, corrected as videos finish.
    annot = lambda d: os.path.join(src, d, "annot")
    plan = {d: frame_count(os.path.join(src, entry[d])) if d in videos else
            len(os.listdir(annot(d))) if os.path.isdir(annot(d)) else 0 for d in todo}
    total, n_done, prepared, failed, warnings, t0 = sum(plan.values()), 0, [], [], [], time.time()
    jobs = [(os.path.join(src, entry[d]), out, size, crop_scale, landmarks if d in videos else None,
             tail and d in videos) for d in todo]
    for d, (n, warn) in zip(todo, pool_map(_prepare_one, jobs, workers)):
        (prepared if n else failed).append(d)
        warnings += warn
        total += n - plan[d]
        n_done += n
        frames += n
        progress("prepare", n_done, total, t0, extra=f"video {len(prepared) + len(failed)}/{len(todo)}")
    for w in [*skipped.values(), *warnings]:  # after the progress line, which overwrites itself
        log(w)
    skipped = [*failed, *skipped]
    split = _write_split(out, sorted(existing + prepared), videos, split_src, mapping, log, tail)
    log(f"prepare: {len(prepared)} videos prepared, {len(existing)} already there, {len(skipped)} skipped, "
        f"{frames} frames in {out} ({', '.join(f'{k} {len(v)}' for k, v in split.items())})")
    return {"prepared": len(prepared), "existing": len(existing), "skipped": len(skipped), "frames": frames,
            "skipped_names": skipped}


def _write_split(out, names, plain, split_src, mapping, log, tail=False):
    """OUT/split.json for the prepared videos `names`; videos outside the mapping go to train. `plain`
    videos have no official split: without a split file the last HELD_OUT of them by name are test1, or
    with `tail` the NAME-tail part of each."""
    where = {v: k for k, vs in mapping.items() for v in vs}
    mine = [d for d in names if d in plain]
    if tail:
        names = sorted(names + [d + TAIL for d in mine])
        where.update({d + TAIL: "test1" for d in mine})
        log(f"split: no --split-file; the last {HELD_OUT:.0%} of each plain video's frames held out as test1 "
            f"({', '.join(d + TAIL for d in mine)}), the rest is train")
    elif not split_src:
        held = mine[len(mine) - (max(1, round(HELD_OUT * len(mine))) if len(mine) > 1 else 0):]
        where.update({d: "test1" for d in held})
        if held:
            log(f"split: no --split-file; {len(held)} of the {len(mine)} plain videos held out as test1 "
                f"(the last by name: {', '.join(held)})")
    split = {k: [] for k in [*SPLITS_300VW, *mapping]}
    for d in names:
        split[where.get(d, "train")].append(d)
    write_json(os.path.join(out, "split.json"), split)
    return split


# ----------------------------------------------------------------------------- a prepared dataset
def read_video(d, size=None):
    """A prepared video folder -> (frames memory-mapped, landmarks), checked where they enter: frames
    (T,S,S,3) uint8 (S = `size` when given), landmarks (T,68,2), finite. A bad one is one DataError
    naming its file, not a traceback from the loader thread or a NaN loss hours later."""
    again, arrays = "prepare the video again", []
    for name, mmap in (("frames.npy", "r"), ("landmarks.npy", None)):  # frames stay on disk until used
        try:
            arrays.append(np.load(os.path.join(d, name), mmap_mode=mmap))
        except (OSError, ValueError, EOFError) as e:
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise DataError(f"{os.path.join(d, name)}: cannot read ({why}); {again}") from None
    frames, landmarks = arrays
    S = size or (frames.shape[1] if frames.ndim == 4 else -1)
    if frames.dtype != np.uint8 or frames.shape[1:] != (S, S, 3) or len(frames) < 1:
        raise DataError(f"{d}/frames.npy: {frames.dtype} of shape {frames.shape}, expected uint8 "
                        f"(T, {S}, {S}, 3); {again}")
    if landmarks.shape != (len(frames), N_LANDMARKS, 2) or not np.issubdtype(landmarks.dtype, np.floating):
        raise DataError(f"{d}/landmarks.npy: {landmarks.dtype} of shape {landmarks.shape}, expected float "
                        f"({len(frames)}, {N_LANDMARKS}, 2) for its {len(frames)} frames; {again}")
    bad = ~np.isfinite(landmarks).all((1, 2))
    if bad.any():
        raise DataError(f"{d}/landmarks.npy: NaN/inf in {bad.sum()} of {len(bad)} frames (the first: "
                        f"{bad.argmax()}); {again}")
    return frames, landmarks.astype(np.float32, copy=False)


def read_prepared(root):
    """prepare.json of a prepared dataset; a raw or missing folder is an error that says what to run."""
    meta = os.path.join(root, "prepare.json")
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder "
                        f"(--data takes a prepared dataset: facesynth.py prepare SRC {root})")
    if not os.path.isfile(meta):
        raise DataError(f"{meta}: missing, so {root} is not a prepared dataset; prepare it first: "
                        f"python facesynth.py prepare {root} OUT, then --data OUT")
    meta = read_json(meta, "prepare the dataset again")
    if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or meta["size"] < 1:
        raise DataError(f"{os.path.join(root, 'prepare.json')}: no image size; prepare the dataset again")
    return meta


def load_videos(root, split):
    """Open a prepared split: frames stay memory-mapped, so all of 300VW never has to fit in RAM."""
    split_file = os.path.join(root, "split.json")
    if not os.path.isfile(split_file):
        raise DataError(f"{split_file}: not found (prepare a dataset first: facesynth.py prepare / synth)")
    mapping, size = read_json(split_file, "prepare the dataset again"), read_prepared(root)["size"]
    names = mapping.get(split) if isinstance(mapping, dict) else None
    if not names or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{split_file}: split '{split}' has no videos (a JSON mapping of split -> names)")
    videos = []
    for name in names:
        d = os.path.join(root, name)
        frames, landmarks = read_video(d, size)
        own = os.path.join(d, "params.json")  # a synthetic video's identity and motion
        params = read_json(own, "prepare the video again") if os.path.isfile(own) else None
        videos.append({"name": name, "frames": frames, "landmarks": landmarks, "params": params})
    return videos


# ----------------------------------------------------------------- triplets, the feed, flips, heatmaps
def sample_triplets(videos, n, seed, epoch, max_gap=None):
    """n triplets (video, source, middle, target, flip) as an int64 array, a pure function of
    (seed, epoch) so that a resumed run sees exactly the data an uninterrupted one would.

    Three distinct frames are drawn from anywhere in the video (max_gap=None): reenactment must
    bridge large pose and expression changes, and neighbouring frames would teach a near-copy.
    The middle one lies between the other two (e_m of L_triple is an "in-between" frame); which
    end is the source is a coin toss, so there is no preferred direction in time."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.array([len(v["landmarks"]) for v in videos])
    if lengths.max() < 3:
        raise DataError(f"every video has fewer than 3 frames ({[v['name'] for v in videos]})")
    weights = np.where(lengths >= 3, lengths, 0) / lengths[lengths >= 3].sum()  # every frame equally likely
    out = np.empty((n, 5), dtype=np.int64)
    out[:, 0] = rng.choice(len(videos), size=n, p=weights)
    for i in range(n):
        T = lengths[out[i, 0]]
        span = T if max_gap is None else min(T, max_gap + 1)
        start = rng.integers(0, T - span + 1)
        a, m, b = np.sort(start + rng.choice(span, size=3, replace=False))
        out[i, 1:4] = (a, m, b) if rng.random() < 0.5 else (b, m, a)
    out[:, 4] = rng.random(n) < 0.5
    return out


def load_batch(videos, triplets):
    """A batch gathered from the memory maps: uint8 images (B,S,S,3) of source and target, the landmarks
    (B,68,2) of source, middle and target (the middle image itself is never needed). A triplet marked
    for a horizontal flip has all three frames flipped alike, its landmarks mirrored."""
    get = lambda key, k: np.stack([videos[v][key][t] for v, t in zip(triplets[:, 0], triplets[:, k])])
    images = {"I_s": get("frames", 1), "I_t": get("frames", 3)}
    marks = {"lm_s": get("landmarks", 1), "lm_m": get("landmarks", 2), "lm_t": get("landmarks", 3)}
    flip = triplets[:, 4].astype(bool)
    for x in images.values():
        x[flip] = x[flip, :, ::-1]
    for x in marks.values():
        x[flip] = mirror_landmarks(x[flip], images["I_s"].shape[2])
    return {k: torch.from_numpy(x) for k, x in {**images, **marks}.items()}


def batches(videos, args, start, total, rank=0, world=1, device=torch.device("cpu")):
    """Yield (step, batch) from step `start` on. A background thread gathers batches from the
    memory maps while the device computes; on CUDA they go through pinned memory."""
    B, per_epoch = args["batch_size"], steps_per_epoch(args, world)

    def work(q):
        try:
            cache = {}
            for step in range(start, total):
                epoch, i = divmod(step, per_epoch)
                if epoch not in cache:  # one epoch's triplets: a pure function of (seed, epoch)
                    cache = {epoch: sample_triplets(videos, per_epoch * B * world, args["seed"], epoch,
                                                    args["max_gap"])}
                b = load_batch(videos, cache[epoch][(i * world + rank) * B:(i * world + rank + 1) * B])
                if device.type == "cuda":
                    b = {k: v.pin_memory() for k, v in b.items()}
                q.put((step, b))
            q.put(None)
        except Exception as e:  # hand it to the training loop, which would otherwise wait forever
            q.put(e)

    q = queue.Queue(maxsize=4)
    threading.Thread(target=work, args=(q,), daemon=True).start()
    while (item := q.get()) is not None:
        if isinstance(item, Exception):
            raise item
        step, b = item
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        yield step, {**b, "I_s": to_tensor(b["I_s"]), "I_t": to_tensor(b["I_t"])}


def steps_per_epoch(args, world=1):
    return max(1, args["triplets_per_epoch"] // (args["batch_size"] * world))


def to_tensor(frames):
    """uint8 (B,S,S,3) -> float (B,3,S,S) in [-1, 1], on whatever device the frames are."""
    frames = torch.as_tensor(np.array(frames) if isinstance(frames, np.ndarray) else frames)  # memmap: copied
    return frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images):
    """float (B,3,S,S) in [-1, 1] -> uint8 numpy (B,S,S,3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def mirror_landmarks(landmarks, size):
    """Landmarks (B,68,2) of a horizontally flipped image: x -> size-1-x for pixel centres, and
    the point order permuted so that the new left eye is the old right eye mirrored."""
    mirrored = landmarks[:, MIRROR]  # a copy (numpy or torch)
    mirrored[..., 0] = size - 1 - mirrored[..., 0]
    return mirrored


def heatmap_picture(landmarks, size, sigma=SIGMA, window=WINDOW):
    """What G is given, as a grey picture (B,3,S,S) in [-1, 1]: the max over the 68 heatmaps."""
    return heatmaps(landmarks, size, sigma, window).amax(1, keepdim=True).mul(2).sub(1).expand(-1, 3, -1, -1)


def heatmaps(landmarks, size, sigma=SIGMA, window=WINDOW):
    """(B,68,2) pixel coordinates -> (B,68,size,size) Gaussians with peak 1 at each landmark,
    cut to a window x window square around it. Separable: two (B,68,size) profiles and one
    outer product, built on the landmarks' device with no Python loop over points."""
    grid = torch.arange(size, device=landmarks.device, dtype=torch.float32)
    d = grid - landmarks.float().unsqueeze(-1)                     # (B,68,2,size)
    profile = torch.exp(-d.square() / (2 * sigma ** 2))
    profile = profile * ((grid - landmarks.float().round().unsqueeze(-1)).abs() <= window // 2)
    return profile[:, :, 1, :, None] * profile[:, :, 0, None, :]   # y down the rows, x along them


# ----------------------------------------------------------------------------- what every module shares
class DataError(ValueError):
    """Bad input: the message is one line that names the file or option and the problem."""


class WriteError(DataError):
    """A file that cannot be written (a full disk, no permission): it stops a run, never skips a video.
    `why`: the reason alone, for a caller that words the line its own way."""

    def __init__(self, message, why=""):
        super().__init__(message)
        self.why = why


@contextlib.contextmanager
def writing(path, folder=False):
    """`with writing(path) as tmp:` write `tmp`, which then replaces `path` whole: a full disk, a crash or
    an interrupt leaves the old file (or folder) as it was, and no half of the new one. The one place
    where the project writes to a temporary name and renames. A file's `tmp` is this process's own,
    NAME.PID.tmp.EXT (a writer picks its format by the extension), fsynced before the rename; a folder's
    is .NAME.tmp, made empty for the caller (readers of a folder of folders skip dot-names). A failure
    is one WriteError naming `path`."""
    stem, ext = os.path.splitext(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp") if folder else f"{stem}.{os.getpid()}.tmp{ext}"
    remove = functools.partial(shutil.rmtree, ignore_errors=True) if folder else os.remove
    try:
        os.makedirs(head or ".", exist_ok=True)
        if folder:
            remove(tmp)  # a killed writer's
            os.makedirs(tmp)
        yield tmp
        if folder:
            remove(path)
        else:
            with open(tmp, "rb") as f:  # on disk before the rename: a crash then leaves the old or the new
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            remove(tmp)
        if isinstance(e, OSError):  # numpy's short writes carry no errno
            why = e.strerror or f"{e}: is the disk full?"
            raise WriteError(f"{path}: cannot write ({why})", why) from None
        raise


def write_json(path, value):
    with writing(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=1)


def read_json(path, fix):
    """A JSON file -> its value; an unreadable or malformed one is a DataError naming it and saying `fix`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e}); {fix}") from None


def progress(label, done, total, t0, unit="frames", extra=""):
    """One self-overwriting progress line with rate and ETA; a newline once done == total."""
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    line = f"\r{label} {done}/{total} {rate:.1f} {unit}/s ETA {clock(eta)} {extra}".rstrip()
    print(line, end="\n" if done >= total else "", flush=True)


def clock(seconds):
    """Seconds as 7m05s, or 2h03m from an hour on; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def pool_map(fn, jobs, workers):
    """fn over jobs on `workers` processes (in this one for a single worker or job), results in order."""
    with ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else contextlib.nullcontext() as pool:
        yield from (pool.map if pool else map)(fn, jobs)
