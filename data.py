"""Datasets on disk, and every other input that arrives as files. Its sections, in order:

    (top)  the one-line `error:` (DataError, fail, the argparse checks), progress lines
    P      .pts files, THE crop, video decoding, `prepare` (300VW folders and plain videos)
    S      the synthetic talking heads: drawn from their 68 landmarks, as videos or prepared arrays
    L      a prepared split: triplets, the batch feed, flips (the iBUG mirror), heatmaps
    R      reenact's inputs (drivers, source faces) and retargeting
    D      automatic 68-point landmarks (the optional dlib extra), tracked and smoothed

A prepared dataset is a folder of videos, each `NNN/frames.npy` (uint8, T x S x S x 3) and
`NNN/landmarks.npy` (float32, T x 68 x 2, x then y, 0-based crop pixels), plus `split.json` and
`prepare.json`. Raw 300VW, plain videos and the synthetic set all end up in that one layout.
"""
import argparse
import functools
import json
import math
import os
import queue
import sys
import threading

import numpy as np
import torch

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


class DataError(ValueError):
    """Bad input: the message is one line that names the file or option and the problem."""


def fail(msg):
    """A user-facing error: one line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class ArgParser(argparse.ArgumentParser):
    """argparse with every option's default in --help, and its usage errors as the same one line
    `error: ...` as every other error."""

    def __init__(self, *a, **k):
        super().__init__(*a, formatter_class=argparse.RawDescriptionHelpFormatter, **k)

    def add_argument(self, *a, **k):
        if a[0].startswith("-") and k.get("default") not in (None, False, argparse.SUPPRESS) and "default" not in k.get("help", ""):
            k["help"] = (k.get("help", "") + " (default: %(default)s)").strip()  # read when --help prints
        return super().add_argument(*a, **k)

    def error(self, message):
        fail(message)


def number(kind=int, low=1, above=False):
    """An argparse type: a finite `kind` (int or float) of at least `low`, or above it."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' * (kind is int)}number") from None
        if not math.isfinite(v) or v < low or (above and v == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {'above' if above else 'at least'} {low}")
        return v
    return parse


def progress(label, done, total, t0, unit="frames", extra=""):
    """One self-overwriting progress line with rate and ETA; a newline once done == total."""
    import time
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_s = f"{eta // 60:.0f}m{eta % 60:02.0f}s" if math.isfinite(eta) else "?"
    end = "\n" if done >= total else ""
    print(f"\r{label} {done}/{total} {rate:.1f} {unit}/s ETA {eta_s} {extra}".rstrip(), end=end, flush=True)


# ===== SECTION P: .pts files, the crop, 300VW preparation =====
# Crop side = CROP_SCALE x the larger side of the landmarks' box. The 68 points stop at the brows,
# and the forehead above them is about half the brow-to-chin height; 1.8 centred on the box leaves
# ~0.4-0.5 of that height above the brows, so the forehead, hairline and some hair fit.
CROP_SCALE = 1.8


def read_pts(path):
    """A 300VW/iBUG .pts file -> float32 (68, 2), 0-based (the files are 1-based)."""
    try:
        lines = [l.strip() for l in open(path, errors="replace").read().splitlines()]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    lines = [l for l in lines if l]  # extra blank lines and CRLF endings occur in 300VW
    if not lines:
        raise DataError(f"{path}: empty file")
    if "{" not in lines or "}" not in lines:
        raise DataError(f"{path}: missing '{{' or '}}'")
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


def write_pts(path, pts0):
    rows = "".join(f"{x + 1:.3f} {y + 1:.3f}\n" for x, y in np.asarray(pts0, np.float64))
    with open(path, "w") as f:
        f.write(f"version: 1\nn_points:  {len(pts0)}\n{{\n{rows}}}\n")


def crop_box(landmarks, crop_scale=CROP_SCALE):
    """(x0, y0, side) in pixel-edge coordinates (pixel i spans [i, i+1), so its centre is i+0.5)."""
    lo, hi = landmarks.min(0), landmarks.max(0)
    side = crop_scale * float((hi - lo).max())
    cx, cy = (lo + hi) / 2 + 0.5
    return float(cx - side / 2), float(cy - side / 2), side


def crop_face(frame, landmarks, size=64, crop_scale=CROP_SCALE):
    """THE crop: a square around the landmarks' box, resized to size x size. Outside the frame the
    edge pixels are replicated: black borders would be sharp fake edges that move with the face
    (the discriminator and VGG features latch onto those), mirroring would duplicate face parts."""
    from PIL import Image
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
    """A video's frames, one at a time, as RGB uint8 (H,W,3) (300VW frames are up to 1280 px: a whole
    video may not fit in memory). GIFs go through Pillow (imageio's ffmpeg plugin refuses them), the
    rest through ffmpeg. Decoders raise many kinds (OSError, RuntimeError, ...): any means undecodable."""
    import imageio
    try:
        if str(vid).lower().endswith(".gif"):  # palette or RGBA frames: made RGB
            yield from imageio.v3.imiter(vid, plugin="pillow", mode="RGB")
        else:
            with imageio.get_reader(vid, "ffmpeg") as reader:
                yield from reader
    except Exception as e:  # ffmpeg's message is many lines; its first names the problem
        raise DataError(f"{vid}: cannot decode ({(str(e).strip() or type(e).__name__).splitlines()[0]})") from None


def frame_count(vid):
    """A video's frame count as its header tells it (for progress lines only), 0 when unknown."""
    import imageio
    try:
        if str(vid).lower().endswith(".gif"):
            return imageio.v3.improps(vid, plugin="pillow").n_images
        with imageio.get_reader(vid, "ffmpeg") as reader:
            meta = reader.get_meta_data()
        return round(meta["fps"] * meta["duration"])
    except Exception:  # decode() reports an unreadable video properly
        return 0


def write_video(path, frames, fps):
    import imageio
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.lower().endswith(".gif"):  # Pillow's GIF writer takes milliseconds per frame
        imageio.v3.imwrite(path, frames, duration=1000 / fps, loop=0)
        return
    with imageio.v2.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                               ffmpeg_log_level="error") as video:
        for f in frames:
            video.append_data(f)


MIN_FRAMES = 3  # a training triplet is three distinct frames of one video


def outside(lms, shape):
    """Per landmark set (...,68,2): whether a point lies more than a frame size outside an (H,W,...)
    frame. Such a .pts is broken, and crop_face would allocate a window as large as its box."""
    size = np.array(shape[1::-1])
    return ((lms < -size) | (lms > 2 * size)).any((-1, -2))


def _save_prepared(out, name, frames, marks, params=None):
    """One prepared video -> OUT/NAME (frames.npy, landmarks.npy and, for synthetic videos,
    params.json). Written to a temp folder and renamed: an interrupted run leaves no half video that
    looks finished, and a re-run can keep every folder it finds."""
    import shutil
    tmp, final = os.path.join(out, f".{name}.tmp"), os.path.join(out, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "frames.npy"), np.stack(frames))
    np.save(os.path.join(tmp, "landmarks.npy"), np.stack(marks))
    if params is not None:
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _prepare_video(vdir, out, size, crop_scale):
    """One raw video -> OUT/NAME; returns (frames, warning lines) or raises DataError. A 300VW folder
    brings its landmarks (annot/*.pts); a plain video file NAME.mp4 (...) gets them from the detector."""
    warn = []
    if os.path.isfile(vdir):
        name, vid = os.path.splitext(os.path.basename(vdir))[0], vdir
        lms, found = detect_video(vid)
        if not found.any():
            raise DataError(f"{vid}: no face found in its {len(found)} frames")
        if not found.all():  # the last landmarks on a frame without a face would teach G a wrong face
            warn.append(f"{name}: {vid}: no face found in {(~found).sum()} of {len(found)} frames; those are left out")
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
        lms, found = np.stack([read_pts(f) for f in files]), np.ones(n, bool)  # all before decoding: fail fast
        if not os.path.isfile(vid):
            raise DataError(f"{vid}: missing")
    frames, marks, t = [], [], 0
    for frame in decode(vid):
        if t == len(lms):
            warn.append(f"{name}: {vid} has more frames than the {len(lms)} .pts files; using the first {len(lms)}")
            break
        if t == 0 and outside(lms, frame.shape).any():  # checked before crop_face allocates anything
            raise DataError(f"{files[int(np.argmax(outside(lms, frame.shape)))]}: a landmark lies more than "
                            f"a frame size outside the {frame.shape[1]}x{frame.shape[0]} frames of {vid}")
        if found[t]:
            crop, uv = crop_face(frame, lms[t], size, crop_scale)
            frames.append(crop)
            marks.append(uv)
        t += 1
    if 0 < t < len(lms):
        warn.append(f"{name}: {vid} has {t} frames for {len(lms)} .pts files; using the first {t}")
    if len(frames) < MIN_FRAMES:  # sample_triplets could not use it, and evaluation pairs need two
        raise DataError(f"{vid}: only {len(frames)} usable frame(s); a training triplet needs {MIN_FRAMES}")
    params = None
    if os.path.isfile(os.path.join(vdir, "params.json")):  # a synthetic video's identity and motion
        try:
            params = json.load(open(os.path.join(vdir, "params.json")))
        except ValueError:
            raise DataError(f"{os.path.join(vdir, 'params.json')}: not JSON") from None
    _save_prepared(out, name, frames, marks, params)
    return len(frames), warn


def _prepare_one(job):
    """Worker entry: a bad video becomes (0 frames, its one skip line), never an exception."""
    try:
        return _prepare_video(*job)
    except DataError as e:
        return 0, [f"skip {os.path.basename(job[0])}: {e}"]


HELD_OUT = 0.2  # plain videos without a --split-file: the last 20 % by name (at least 1 of 2+) are test1


def prepare(src, out, size=64, crop_scale=CROP_SCALE, workers=2, split_file=None, log=print):
    """Raw folder SRC -> prepared dataset OUT (see the module docstring). SRC holds 300VW-layout video
    folders (NNN/vid.avi + NNN/annot/*.pts), plain video files (NAME.mp4, ...: landmarks detected), or
    both. Re-runnable: finished videos are kept, bad videos are skipped with one warning line each."""
    import contextlib
    import time
    from concurrent.futures import ProcessPoolExecutor
    if not os.path.isdir(src):
        raise DataError(f"{src}: no such folder")
    entries = sorted(d for d in os.listdir(src) if d[0] != ".")
    entry = {d: d for d in entries if os.path.isdir(os.path.join(src, d))}  # prepared name -> its source
    clashes = {}  # a video file whose name is taken -> its skip line
    for f in (f for f in entries if is_video(os.path.join(src, f))):  # a plain video is named by its stem
        stem = os.path.splitext(f)[0]
        if stem in entry:
            clashes[f] = f"skip {f}: the name {stem} is already {entry[stem]}'s (rename one)"
        else:
            entry[stem] = f
    if not entry:
        raise DataError(f"{src}: no video folders (NNN/vid.avi and NNN/annot/*.pts) and no video files "
                        f"({' '.join(VIDEO_EXTS)})")
    names, plain = sorted(entry), sorted(d for d, e in entry.items() if e != d)
    if plain:  # stop now, not with one skip line per video
        try:
            dlib_models()
        except DataError as e:
            raise DataError(f"{src}: its {len(plain)} plain video(s) have no landmarks to read, and {e}") from None
    meta = {"size": size, "crop_scale": crop_scale, "source": os.path.abspath(src),
            "synthetic": any(os.path.isfile(os.path.join(src, d, "params.json")) for d in names)}
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(os.path.join(out, "prepare.json")):
        old = json.load(open(os.path.join(out, "prepare.json")))
        if (old.get("size"), old.get("crop_scale")) != (size, crop_scale):
            raise DataError(f"{out}/prepare.json: prepared with size {old.get('size')}, crop_scale "
                            f"{old.get('crop_scale')}, not {size}, {crop_scale}; use another output folder")
    # The split: --split-file, else SRC/split.json (the synthetic generator writes one), else the
    # official one. Read now, so a bad mapping fails before the long run, not after it.
    own = os.path.join(src, "split.json")
    split_src, mapping = split_file or (own if os.path.isfile(own) else None), SPLITS_300VW
    if split_src:
        try:
            mapping = json.load(open(split_src))
        except (OSError, ValueError) as e:
            raise DataError(f"{split_src}: cannot read ({e})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, list) for v in mapping.values()):
            raise DataError(f"{split_src}: not a JSON mapping of split name -> list of video names")
    json.dump(meta, open(os.path.join(out, "prepare.json"), "w"), indent=1)
    done = lambda d: all(os.path.isfile(os.path.join(out, d, f)) for f in ("frames.npy", "landmarks.npy"))
    existing = [d for d in names if done(d)]
    todo = [d for d in names if not done(d)]
    frames = sum(len(np.load(os.path.join(out, d, "landmarks.npy"), mmap_mode="r")) for d in existing)
    # Progress counts frames; the total starts at the .pts (or header) count, corrected as videos finish.
    annot = lambda d: os.path.join(src, d, "annot")
    plan = {d: frame_count(os.path.join(src, entry[d])) if d in plain else
            len(os.listdir(annot(d))) if os.path.isdir(annot(d)) else 0 for d in todo}
    total, n_done, prepared, skipped, warnings, t0 = sum(plan.values()), 0, [], [], [], time.time()
    jobs = [(os.path.join(src, entry[d]), out, size, crop_scale) for d in todo]
    with ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else contextlib.nullcontext() as pool:
        for d, (n, warn) in zip(todo, (pool.map if pool else map)(_prepare_one, jobs)):
            (prepared if n else skipped).append(d)
            warnings += warn
            total += n - plan[d]
            n_done += n
            frames += n
            progress("prepare", n_done, total, t0, extra=f"video {len(prepared) + len(skipped)}/{len(todo)}")
    for w in [*clashes.values(), *warnings]:  # after the progress line, which overwrites itself
        log(w)
    skipped += clashes
    where = {v: k for k, vs in mapping.items() for v in vs}
    if not split_src:  # plain videos have no official split: hold out the last ones by name
        mine = [d for d in sorted(existing + prepared) if d in plain]
        held = mine[len(mine) - (max(1, round(HELD_OUT * len(mine))) if len(mine) > 1 else 0):]
        where.update({d: "test1" for d in held})
        if held:
            log(f"split: no --split-file; {len(held)} of the {len(mine)} plain videos held out as test1 "
                f"(the last by name: {', '.join(held)})")
    split = {k: [] for k in [*SPLITS_300VW, *mapping]}
    for d in sorted(existing + prepared):
        split[where.get(d, "train")].append(d)
    json.dump(split, open(os.path.join(out, "split.json"), "w"), indent=1)
    log(f"prepare: {len(prepared)} videos prepared, {len(existing)} already there, {len(skipped)} skipped, "
        f"{frames} frames in {out} ({', '.join(f'{k} {len(v)}' for k, v in split.items())})")
    return {"prepared": len(prepared), "existing": len(existing), "skipped": len(skipped), "frames": frames,
            "skipped_names": skipped}


# ===== SECTION S: the synthetic talking-head generator =====
# Talking heads drawn FROM the 68 iBUG points, so the annotations are exact, and any identity can be
# drawn with any pose/expression: a ground truth for cross-identity reenactment.
SYNTH_VIDEOS = (50, 31, 19, 14)  # train/test1/test2/test3, the sizes of 300VW's split
SYNTH_FRAMES = 200               # 8 s at 25 fps a video; 114 videos = 22.8k frames
SYNTH_SIZE = 256
SYNTH_FPS = 25
SYNTH_CACHE = "data/synthetic"
SUPERSAMPLE = 3                  # draw at 3x and box-filter down: anti-aliased edges at polygon speed
MAX_POSE = {"yaw": 30.0, "pitch": 15.0, "roll": 15.0}  # degrees; the talking-head range of the issue
# Face template, subject's right half plus the midline (x right, y down, z toward the camera; the
# jaw is ~2 units wide); the other half is its mirror image through MIRROR.  index, x, y, z:
_HALF = [(0, -1.00, -.30, -.35), (1, -.99, -.05, -.30), (2, -.95, .20, -.25), (3, -.89, .44, -.18),
         (4, -.79, .66, -.08), (5, -.64, .84, .02), (6, -.46, .98, .12), (7, -.24, 1.07, .20),
         (8, 0, 1.10, .23), (17, -.82, -.52, .10), (18, -.68, -.63, .22), (19, -.50, -.67, .30),
         (20, -.33, -.64, .35), (21, -.17, -.57, .38), (27, 0, -.42, .42), (28, 0, -.26, .50),
         (29, 0, -.10, .58), (30, 0, .06, .68), (31, -.20, .20, .42), (32, -.10, .23, .48),
         (33, 0, .25, .52), (36, -.64, -.33, .18), (37, -.53, -.40, .26), (38, -.38, -.40, .28),
         (39, -.25, -.32, .28), (40, -.38, -.27, .28), (41, -.53, -.27, .26), (48, -.36, .57, .30),
         (49, -.24, .50, .40), (50, -.10, .46, .46), (51, 0, .48, .47), (57, 0, .71, .43),
         (58, -.12, .70, .42), (59, -.25, .66, .37), (60, -.30, .57, .33), (61, -.11, .56, .43),
         (62, 0, .56, .45), (66, 0, .57, .45), (67, -.11, .57, .43)]
TEMPLATE = np.zeros((N_LANDMARKS, 3))
for _i, *_xyz in _HALF:
    TEMPLATE[_i] = _xyz
    TEMPLATE[MIRROR[_i]] = np.multiply(_xyz, (-1, 1, 1))
# The skull is an ellipsoid (its projection is always a plausible head outline), sampled on a grid.
_th, _ph = np.meshgrid(np.linspace(0, np.pi, 9), np.linspace(0, 2 * np.pi, 16, endpoint=False))
SPHERE = np.stack([np.sin(_th) * np.cos(_ph), -np.cos(_th), np.sin(_th) * np.sin(_ph)], -1).reshape(-1, 3)
SKULL_C, SKULL_R = np.array([0, -.35, -.45]), np.array([1.02, 1.2, 1.05])
_a = np.linspace(0, 2 * np.pi, 10, endpoint=False)
EAR = np.stack([1.04 + .09 * np.cos(_a), -.22 + .22 * np.sin(_a), -.45 + 0 * _a], 1)  # right ear: x *= -1
SHAPE_RANGE = {"width": .1, "jaw": .15, "chin": .12, "eye_spacing": .05, "eye_size": .15, "nose": .1,
               "nose_width": .2, "mouth_width": .15}  # identity offsets are uniform in +-these
SKIN_RANGE = ((255, 224, 196), (80, 50, 35))
HAIR_COLOURS = [(25, 20, 18), (70, 45, 30), (120, 80, 45), (200, 165, 100), (150, 60, 30), (165, 165, 160)]
IRIS_COLOURS = [(80, 50, 30), (60, 110, 170), (70, 120, 70), (110, 110, 120), (130, 100, 50)]
BEARDS = {"full": list(range(2, 15)) + [35, 33, 31], "goatee": list(range(5, 12)) + [54, 33, 48]}


def _colour(rng, base, jitter=12):
    return [int(v) for v in np.clip(np.add(base, rng.normal(0, jitter, 3)), 0, 255)]


def random_identity(rng):
    """A JSON-able identity; glasses/beard are None or a dict, so dict(identity, glasses=None) works."""
    t = rng.uniform()
    skin = _colour(rng, (1 - t) * np.array(SKIN_RANGE[0]) + t * np.array(SKIN_RANGE[1]), 5)
    hair = _colour(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))])
    uniform = lambda lo, hi: round(float(rng.uniform(lo, hi)), 4)
    grey = (128, 128, 128)
    return {"shape": {k: uniform(-r, r) for k, r in SHAPE_RANGE.items()},
            "skin": skin, "lips": _colour(rng, np.multiply(skin, (.85, .6, .6))),
            "iris": _colour(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]),
            "hair": {"style": str(rng.choice(["none", "short", "short", "long"])), "colour": hair,
                     "hairline": uniform(-.95, -.72)},
            "brows": {"colour": _colour(rng, np.multiply(hair, .8)), "width": uniform(.04, .09)},
            "glasses": {"colour": _colour(rng, (40, 40, 40), 40), "roundness": uniform(.3, 1),
                        "width": uniform(.02, .04)} if rng.uniform() < .25 else None,  # one in four
            "beard": {"style": str(rng.choice(list(BEARDS))), "colour": hair} if rng.uniform() < .25 else None,
            "clothes": _colour(rng, grey, 70),
            "background": {"colour": _colour(rng, grey, 60), "panel": _colour(rng, grey, 60),
                           "box": np.round(np.sort(rng.uniform(0, 1, (2, 2)), 0).ravel(), 4).tolist()}}


def _smooth(rng, n, period):
    """Low-pass noise in [-1, 1] (white noise through a Hann window ~period frames wide), peak exactly 1."""
    x = np.convolve(rng.standard_normal(n + period), np.hanning(period + 2)[1:-1], "valid")[:n]
    return x / np.abs(x).max()


def talking_motion(rng, n_frames):
    """Smooth head motion and expression: a list of (pose, expression) JSON-able dicts, one per frame."""
    n = n_frames
    pose = {k: m * rng.uniform(.4, 1) * _smooth(rng, n, int(rng.integers(30, 80))) for k, m in MAX_POSE.items()}
    pose["tx"] = rng.uniform(-.1, .1) + .03 * _smooth(rng, n, 60)  # the face is not always centred
    pose["ty"] = rng.uniform(-.06, .06) + .02 * _smooth(rng, n, 60)
    pose["scale"] = rng.uniform(.16, .21) * (1 + .06 * _smooth(rng, n, 60))  # image fraction per unit
    talk = np.clip(1.5 * _smooth(rng, n, 60) + .5, 0, 1)  # speech envelope: phrases and pauses
    syllable = np.cumsum(2 * np.pi * rng.uniform(3, 5) / SYNTH_FPS * (1 + .3 * _smooth(rng, n, 20)))
    blink, bump = np.zeros(n + 7), 1 - abs(np.arange(7) - 3) / 4  # a blink closes and opens in 7 frames
    for t in np.cumsum(rng.exponential(70, n // 20 + 2)).astype(int):  # one every ~3 s
        if t < n:
            blink[t:t + 7] = np.maximum(blink[t:t + 7], bump)
    expr = {"open": rng.uniform(.5, 1) * talk * .5 * (1 - np.cos(syllable + rng.uniform(0, 6.3))),
            "smile": rng.uniform(.3, 1) * np.clip(1.4 * _smooth(rng, n, 80) - .2, 0, 1),
            "brow": rng.uniform(.3, 1) * np.clip(_smooth(rng, n, 30), 0, 1), "blink": blink[:n]}
    # values are rounded once here, so re-rendering from params.json reproduces the frames exactly
    return [tuple({k: round(float(v[t]), 4) for k, v in d.items()} for d in (pose, expr)) for t in range(n)]


def _face3d(identity, expression):
    """The 3-D landmarks of this identity with this expression (template units)."""
    s, e, P = identity["shape"], expression, TEMPLATE.copy()
    chin = np.clip((P[:17, 1] + .2) / 1.3, 0, 1)  # 0 at the ears, 1 at the chin
    P[:17, 0] *= 1 + s["jaw"] * chin
    P[:17, 1] += (s["chin"] + .18 * e["open"]) * chin ** 2  # the jaw drops as the mouth opens
    for eye, side in ((slice(36, 42), -1), (slice(42, 48), 1)):
        c = P[eye].mean(0)
        P[eye] = c + (P[eye] - c) * (1 + s["eye_size"]) + (side * s["eye_spacing"], 0, 0)
    P[30:36, 1] += s["nose"]
    P[31:36, 0] *= 1 + s["nose_width"]
    P[48:68, 0] *= 1 + s["mouth_width"]
    P[[55, 56, 57, 58, 59, 65, 66, 67], 1] += .26 * e["open"]
    P[[48, 54, 60, 64], 1] += .1 * e["open"] - .07 * e["smile"]
    P[[48, 54, 60, 64], 0] *= 1 + .12 * e["smile"]
    P[[49, 53, 55, 59], 1] -= .03 * e["smile"]
    P[17:27, 1] -= .1 * e["brow"]
    up, lo = [37, 38, 43, 44], [41, 40, 47, 46]
    P[up] += e["blink"] * (P[lo] - P[up])  # the upper lid meets the lower one
    return P * (1 + s["width"], 1, 1)


def _rotation(pose):
    """Roll @ pitch @ yaw; positive yaw turns the nose to image right, positive pitch lifts it."""
    y, p, r = (math.radians(pose[k]) for k in ("yaw", "pitch", "roll"))
    Ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    Rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return Rz @ Rx @ Ry


def _hull(p):
    """Convex hull (monotone chain): the skin is the hull of skull and landmarks, so at any yaw no
    eye or brow pokes out of the face."""
    p = sorted(map(tuple, p))
    def half(pts):
        h = []
        for x, y in pts:
            while len(h) > 1 and (h[-1][0] - h[-2][0]) * (y - h[-2][1]) <= (h[-1][1] - h[-2][1]) * (x - h[-2][0]):
                h.pop()
            h.append((x, y))
        return h[:-1]
    return np.array(half(p) + half(p[::-1]))


def render_face(identity, pose, expression, size=SYNTH_SIZE):
    """One frame -> (uint8 (size, size, 3), float32 (68, 2) 0-based pixel-centre landmarks). Every part
    is drawn from the projected points that are returned, so the landmarks are exact."""
    from PIL import Image, ImageDraw
    S, P, R = size * SUPERSAMPLE, _face3d(identity, expression), _rotation(pose)
    u = pose["scale"] * S  # supersampled pixels per template unit (weak perspective)
    centre = (np.array([pose["tx"], pose["ty"]]) + .5) * S
    proj = lambda X: (X @ R.T)[:, :2] * u + centre - .5  # PIL draws in pixel-centre coordinates
    p, wx = proj(P), (1 + identity["shape"]["width"], 1, 1)
    hair, skin = identity["hair"], np.array(identity["skin"])
    skull = lambda scale, keep: proj(SKULL_C * wx + SKULL_R * wx * scale * SPHERE[keep])
    img = Image.new("RGB", (S, S), tuple(identity["background"]["colour"]))
    d = ImageDraw.Draw(img)
    colour = lambda c: tuple(int(v) for v in c)
    poly = lambda X, c: d.polygon(np.ravel(X).tolist(), fill=colour(c))
    line = lambda X, c, w: d.line(np.ravel(X).tolist(), fill=colour(c), width=max(1, int(w * u)), joint="curve")
    disc = lambda x, r, c: d.ellipse([*(x - r), *(x + r)], fill=colour(c))
    d.rectangle(list(np.multiply(identity["background"]["box"], S)), fill=colour(identity["background"]["panel"]))
    if hair["style"] != "none":  # hair behind the head, down the back for long hair
        tail = proj(np.array([[-1.2, 1.5, -.6], [1.2, 1.5, -.6]]) * wx)[:2 * (hair["style"] == "long")]
        poly(_hull(np.vstack([skull(1.08, SPHERE[:, 1] < .3), tail])), hair["colour"])
    d.ellipse([*(centre + (-1.9 * u, 1.8 * u)), *(centre + (1.9 * u, 3.6 * u))], fill=colour(identity["clothes"]))
    neck = proj(np.array([[-.5, .4, -.45], [.5, .4, -.45]]) * wx)  # the body does not turn with the head
    poly(np.vstack([neck, centre + (.5 * u, 2 * u), centre + (-.5 * u, 2 * u)]), .85 * skin)
    ears = [proj(EAR * (side, 1, 1) * wx) for side in (-1, 1)]
    for ear in ears:
        poly(ear, .9 * skin)
    poly(_hull(np.vstack([skull(1, SPHERE[:, 2] > -.1), p])), skin)
    for ear, side in zip(ears, (-1, 1)):
        if side * R[2, 0] > .3:  # the head turned away from this ear: it is in front of the skull now
            poly(ear, .9 * skin)
    if hair["style"] != "none":  # the cap above the hairline; its back half is behind the face
        poly(_hull(skull(1.04, (SKULL_C[1] + 1.04 * SKULL_R[1] * SPHERE[:, 1] < hair["hairline"])
                         & (SPHERE[:, 2] > -.1))), hair["colour"])
    if identity["beard"]:
        poly(p[BEARDS[identity["beard"]["style"]]], identity["beard"]["colour"])
    line(p[27:31], .75 * skin, .02)
    line(p[31:36], .75 * skin, .025)
    for nostril in ((p[31] + p[32]) / 2, (p[34] + p[35]) / 2):
        disc(nostril, .03 * u, .4 * skin)
    lid = (R @ (0, -.14, 0))[:2] * u  # lid height along the face's "up" in the image
    for e in (p[36:42], p[42:48]):
        poly(e, (238, 236, 230))
        c, r = (e[0] + e[3]) / 2, .075 * (1 + identity["shape"]["eye_size"]) * u
        disc(c, r, identity["iris"])
        disc(c, .4 * r, (15, 12, 12))
        # skin-coloured lids above and below clip the iris to the eye opening, and close it in a blink
        poly(np.vstack([e[:4], e[3::-1] + lid]), skin)
        poly(np.vstack([e[[3, 4, 5, 0]], e[[0, 5, 4, 3]] - lid]), skin)
        line(e[:4], (30, 22, 20), .025)
    for brow in (p[17:22], p[22:27]):
        line(brow, identity["brows"]["colour"], identity["brows"]["width"])
    poly(p[48:60], identity["lips"])
    poly(p[60:68], (70, 25, 30))
    upper, lower = p[64:59:-1], p[[64, 65, 66, 67, 60]]
    poly(np.vstack([upper[::-1], upper + .35 * (lower - upper)]), (235, 230, 220))  # upper teeth
    if identity["glasses"]:
        g, a = identity["glasses"], np.linspace(0, 2 * np.pi, 10, endpoint=False)
        sp = lambda v: np.sign(v) * abs(v) ** g["roundness"]  # superellipse: 1 round, lower squarer
        rim = np.stack([.24 * sp(np.cos(a)), .17 * sp(np.sin(a)), 0 * a], 1)
        r, l = [proj((P[i] + P[j]) / 2 + (0, 0, .12) + rim) for i, j in ((36, 39), (42, 45))]
        arms = proj(np.array([[-1.0, -.3, -.3], [1.0, -.3, -.3]]) * wx)  # to the ears
        # one polyline: arm, right rim (5 = outer, 0 = inner), bridge, left rim (5 = inner), arm
        line(np.vstack([arms[:1], r[5:], r, r[:1], l[5:], l, l[:1], arms[1:]]), g["colour"], g["width"])
    image = np.asarray(img.reduce(SUPERSAMPLE))
    return image, ((p + .5) / SUPERSAMPLE - .5).astype(np.float32)


def _synth_plan(seed, index, n_frames):
    """Video `index`'s identity, motion and params.json: a pure function of (seed, index), so the videos
    can render in any order, in any process."""
    rng = np.random.default_rng([seed, index])
    identity, motion = random_identity(rng), talking_motion(rng, n_frames)
    return identity, motion, {"identity": identity, "frames": [{"pose": p, "expression": e} for p, e in motion]}


def _synth_names(n_videos):
    """Video names 001, 002, ... and the split: the first n_videos[0] train, then test1, test2, test3."""
    if sum(n_videos) > 999:
        raise DataError(f"at most 999 synthetic videos (3-digit names), asked for {sum(n_videos)}")
    ends = np.cumsum(n_videos).tolist()
    names = [f"{i + 1:03d}" for i in range(ends[-1])]
    return names, {k: names[a:b] for k, a, b in zip(("train", "test1", "test2", "test3"), [0] + ends[:-1], ends)}


def _render_all(worker, jobs, n_frames, workers):
    """Run a per-video worker over jobs on `workers` processes, with a progress line."""
    import contextlib
    import time
    from concurrent.futures import ProcessPoolExecutor
    t0, done = time.time(), 0
    with ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else contextlib.nullcontext() as pool:
        for k, n in enumerate((pool.map if pool else map)(worker, jobs)):
            done += n
            progress("synth", done, len(jobs) * n_frames, t0, extra=f"video {k + 1}/{len(jobs)}")


def _synth_video(job):
    """Render one video in 300VW layout into .NNN.tmp and rename it when complete, so a re-run skips
    finished ones (and prepare, which ignores dot-folders, never sees a half-written one)."""
    import imageio
    import shutil
    out, index, n_frames, size, seed = job
    name = f"{index + 1:03d}"
    identity, motion, params = _synth_plan(seed, index, n_frames)
    tmp = os.path.join(out, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "annot"))
    with imageio.get_writer(os.path.join(tmp, "vid.avi"), fps=SYNTH_FPS, codec="libx264", quality=9,
                            macro_block_size=1, ffmpeg_log_level="error") as video:
        for t, (pose, expression) in enumerate(motion):
            frame, landmarks = render_face(identity, pose, expression, size)
            video.append_data(frame)
            write_pts(os.path.join(tmp, "annot", f"{t + 1:06d}.pts"), landmarks)
    with open(os.path.join(tmp, "params.json"), "w") as f:
        json.dump(params, f)
    os.rename(tmp, os.path.join(out, name))
    return n_frames


def _synth_prepared(job):
    """Render one video straight into the prepared layout: what prepare makes of _synth_video's output,
    minus the video coding, as every frame is cut by THE crop around its exact landmarks."""
    out, index, n_frames, raw_size, size, crop_scale, seed = job
    identity, motion, params = _synth_plan(seed, index, n_frames)
    crops = [crop_face(*render_face(identity, pose, expression, raw_size), size, crop_scale)
             for pose, expression in motion]
    _save_prepared(out, f"{index + 1:03d}", *zip(*crops), params=params)
    return n_frames


def synth(out, n_videos=SYNTH_VIDEOS, n_frames=SYNTH_FRAMES, size=SYNTH_SIZE, seed=0, workers=2, log=print):
    """The synthetic set in the raw 300VW layout (NNN/vid.avi, NNN/annot/*.pts) plus NNN/params.json and
    split.json. One new identity per video, so no test identity is seen in training."""
    if size % 2:
        raise DataError(f"{out}: synth size must be even for yuv420p video, got {size}")
    names, split = _synth_names(n_videos)
    os.makedirs(out, exist_ok=True)
    todo = [(out, i, n_frames, size, seed) for i, name in enumerate(names)
            if not os.path.isdir(os.path.join(out, name))]  # finished videos are kept
    log(f"synth: {len(todo)} of {len(names)} videos to render into {out} ({n_frames} frames, {size} px)")
    _render_all(_synth_video, todo, n_frames, workers)
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(split, f, indent=1)
    return split


def ensure_synthetic(cache=SYNTH_CACHE, seed=0, n_frames=SYNTH_FRAMES, n_videos=SYNTH_VIDEOS, raw_size=SYNTH_SIZE,
                     size=64, crop_scale=CROP_SCALE, workers=None, log=print):
    """The default training data, built once into CACHE/prepared and reused afterwards. The frames are
    rendered and cropped straight into the prepared layout on every core (`workers`, default all): no
    video files, so no ffmpeg. synth + prepare make the same set through videos. Re-runnable: finished
    videos are kept, and split.json, written last, marks a finished set."""
    prepared = os.path.join(cache, "prepared")
    if os.path.exists(os.path.join(prepared, "split.json")):
        log(f"using the synthetic set in {prepared} (delete it to regenerate)")
        return prepared
    names, split = _synth_names(n_videos)
    os.makedirs(prepared, exist_ok=True)
    with open(os.path.join(prepared, "prepare.json"), "w") as f:  # raw_size: evaluate re-renders ground truths
        json.dump({"size": size, "crop_scale": crop_scale, "source": f"synthetic, seed {seed}", "synthetic": True,
                   "raw_size": raw_size}, f, indent=1)
    todo = [(prepared, i, n_frames, raw_size, size, crop_scale, seed) for i, name in enumerate(names)
            if not os.path.isdir(os.path.join(prepared, name))]
    workers = workers or os.cpu_count()
    log(f"synthetic set: rendering {len(todo)} of {len(names)} videos ({n_frames} frames, {raw_size} px, cropped "
        f"to {size}) into {prepared} on {workers} processes")
    _render_all(_synth_prepared, todo, n_frames, workers)
    with open(os.path.join(prepared, "split.json"), "w") as f:
        json.dump(split, f, indent=1)
    return prepared


# ===== SECTION L: triplets, heatmaps, augmentation =====
# Heatmaps. The paper: a Gaussian "applied over 7 pixels with a mean of 0 and a variance of 1/3".
# Read literally (sigma^2 = 1/3 px^2) that is a one-pixel spike whose neighbours are 0.22: it gives
# the generator almost no spatial gradient to follow. The original code drew sigma = 1 px at 128 px
# and resized to 64 px, which flattened the peak to 0.65. We read it as: a 7-pixel window, sigma =
# 1 px at the working size, peak exactly 1 at the landmark; both are options.
SIGMA = 1.0
WINDOW = 7


def read_prepared(root):
    """prepare.json of a prepared dataset; a raw or missing folder is an error that says what to run."""
    meta = os.path.join(root, "prepare.json")
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder (--data takes a prepared dataset: facesynth.py prepare SRC {root})")
    if not os.path.isfile(meta):
        raise DataError(f"{meta}: missing, so {root} is not a prepared dataset; prepare it first: "
                        f"python facesynth.py prepare {root} OUT, then --data OUT")
    try:
        with open(meta) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta}: cannot read ({e}); prepare the dataset again") from None


def load_videos(root, split):
    """Open a prepared split: frames stay memory-mapped, so all of 300VW never has to fit in RAM."""
    split_file = os.path.join(root, "split.json")
    if not os.path.isfile(split_file):
        raise DataError(f"{split_file}: not found (prepare a dataset first: facesynth.py prepare / synth)")
    with open(split_file) as f:
        names = json.load(f).get(split)
    if not names:
        raise DataError(f"{split_file}: split '{split}' has no videos")
    videos = []
    for name in names:
        d = os.path.join(root, name)
        try:
            frames = np.load(os.path.join(d, "frames.npy"), mmap_mode="r")
            landmarks = np.load(os.path.join(d, "landmarks.npy"))
        except (OSError, ValueError) as e:
            raise DataError(f"{d}: cannot read prepared video ({e})") from None
        params = None
        if os.path.isfile(os.path.join(d, "params.json")):
            with open(os.path.join(d, "params.json")) as f:
                params = json.load(f)
        videos.append({"name": name, "frames": frames, "landmarks": landmarks, "params": params})
    return videos


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
    """Gather a batch from the memory maps: uint8 images (B,S,S,3) of source and target, and the
    landmarks (B,68,2) of source, middle and target (the middle image itself is never needed)."""
    get = lambda k: np.stack([videos[v]["frames"][t[k]] for v, t in zip(triplets[:, 0], triplets)])
    lms = lambda k: np.stack([videos[v]["landmarks"][t[k]] for v, t in zip(triplets[:, 0], triplets)])
    return {"I_s": torch.from_numpy(get(1)), "I_t": torch.from_numpy(get(3)),
            "lm_s": torch.from_numpy(lms(1)), "lm_m": torch.from_numpy(lms(2)),
            "lm_t": torch.from_numpy(lms(3)), "flip": torch.from_numpy(triplets[:, 4].astype(bool))}


def batches(videos, args, start, total, rank=0, world=1, device=torch.device("cpu")):
    """Yield (step, batch) from step `start` on. A background thread gathers batches from the
    memory maps while the device computes; on CUDA they go through pinned memory."""
    B = args["batch_size"]
    per_epoch = steps_per_epoch(args, world)

    def work(q):
        try:
            cache = {}
            for step in range(start, total):
                epoch, i = divmod(step, per_epoch)
                if epoch not in cache:  # one epoch's triplets: a pure function of (seed, epoch)
                    cache = {epoch: sample_triplets(videos, per_epoch * B * world, args["seed"], epoch, args["max_gap"])}
                rows = cache[epoch][(i * world + rank) * B:(i * world + rank + 1) * B]
                b = load_batch(videos, rows)
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
        I_s, I_t = to_tensor(b.pop("I_s")), to_tensor(b.pop("I_t"))
        # horizontal flip, the same for all three frames of a triplet, landmark order mirrored
        f = b.pop("flip")
        pick = lambda a, c: torch.where(f.view(-1, *[1] * (a.dim() - 1)), c, a)
        out = {"I_s": pick(I_s, I_s.flip(-1)), "I_t": pick(I_t, I_t.flip(-1))}
        for k in ("lm_s", "lm_m", "lm_t"):
            out[k] = pick(b[k], mirror_landmarks(b[k], I_s.shape[-1]))
        yield step, out


def steps_per_epoch(args, world=1):
    return max(1, args["triplets_per_epoch"] // (args["batch_size"] * world))


def to_tensor(frames):
    """uint8 (B,S,S,3) -> float (B,3,S,S) in [-1, 1], on whatever device the frames are."""
    frames = torch.as_tensor(np.array(frames) if isinstance(frames, np.ndarray) else frames)  # memmaps are read-only
    return frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images):
    """float (B,3,S,S) in [-1, 1] -> uint8 numpy (B,S,S,3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def mirror_landmarks(landmarks, size):
    """Landmarks (B,68,2) of a horizontally flipped image: x -> size-1-x for pixel centres, and
    the point order permuted so that the new left eye is the old right eye mirrored."""
    mirrored = landmarks[:, MIRROR].clone()
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


# ===== SECTION R: reenact's inputs (landmark sequences, faces) and retargeting =====
# The paper needs the target *image* (its landmarks come from it); real use has only a driver's
# landmarks. These read a driver's landmarks and a source face from any of the formats reenact takes.
REENACT_FRAMES = 100  # a synthetic driver's length: 4 s at 25 fps


def face_size(lm):
    """The larger side of the landmarks' box: what THE crop scales with (crop_box), so a motion
    divided by it is the same in raw-frame pixels, prepared-crop pixels or any resolution."""
    return float(np.ptp(lm, 0).max())


def retarget(src_lm, drv_lms, neutral=0):
    """Relative retargeting, (68,2) + (T,68,2) -> (T,68,2), each in its own pixels: the source's own
    landmarks moved by the driver's motion since its neutral frame, scaled by the ratio of face sizes.
    The source keeps its face shape; absolute landmarks would squeeze a wide face into the driver's."""
    motion = drv_lms - drv_lms[neutral]
    return (src_lm + motion * (face_size(src_lm) / face_size(drv_lms[neutral]))).astype(np.float32)


def to_crop(lm, box_lm, size, crop_scale):
    """Points -> pixels of the crop that crop_face cuts around box_lm (the same affine)."""
    x0, y0, side = crop_box(box_lm, crop_scale)
    return ((lm + 0.5 - np.array([x0, y0])) * (size / side) - 0.5).astype(np.float32)


def condition(src_uv, drv_lms, size, crop_scale, relative=True, neutral=0):
    """The landmarks G gets, in the source crop's pixels. Relative: retarget (the crop is a similarity,
    which commutes with it, so it runs on the source's crop landmarks). Absolute (the paper's setting):
    every driver frame's landmarks in its own crop, as training presented every target."""
    if relative:
        return retarget(src_uv, drv_lms, neutral)
    return np.stack([to_crop(lm, lm, size, crop_scale) for lm in drv_lms])


def load_landmarks(path, n=None):
    """A landmarks .npy: (T,68,2), x then y, 0-based pixels; the first n frames."""
    try:
        lms = np.load(path).astype(np.float32)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if lms.ndim != 3 or lms.shape[1:] != (N_LANDMARKS, 2) or not len(lms) or not np.isfinite(lms).all():
        raise DataError(f"{path}: landmarks of shape {lms.shape}, expected finite (T, {N_LANDMARKS}, 2)")
    return lms[:n]


def read_pts_folder(folder, n=None):
    """Sorted .pts files. Numbered ones must not skip a number: every later frame would get the
    landmarks of the frame after it."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pts"))[:n]
    if not files:
        raise DataError(f"{folder}: no .pts files")
    stems = [f[:-4] for f in files]
    if all(s.isdigit() for s in stems):
        gap = next((i for i, s in enumerate(stems) if int(s) != int(stems[0]) + i), None)
        if gap is not None:
            want = f"{int(stems[0]) + gap:0{len(stems[0])}d}.pts"
            raise DataError(f"{os.path.join(folder, want)}: missing ({files[gap - 1]} is followed by "
                                 f"{files[gap]})")
    return np.stack([read_pts(os.path.join(folder, f)) for f in files])


def synthetic(spec, ident, n):
    """Identity `ident` of the built-in set (seed 0; its video ident+1, so 50 and up are test identities,
    never trained on) and n frames of its talking motion, drawn for the set's video length so that
    they are that video's first frames."""
    if not ident.isdigit():
        raise DataError(f"{spec}: expected synthetic:ID with an integer ID")
    rng = np.random.default_rng([0, int(ident)])
    return f"synthetic:{int(ident)}", random_identity(rng), talking_motion(rng, max(n, SYNTH_FRAMES))[:n]


def load_driver(spec, n=None):
    """DRIVER -> {"lms": (T,68,2) in its frames' pixels, "frames": iterable or None, "who": its person
    (the source's too: absolute by default), "motion": a synthetic driver's (pose, expression)s,
    "no_face": a plain video's count of frames without a face (they keep the last landmarks)}."""
    if spec.startswith("synthetic:"):
        who, identity, motion = synthetic(spec, spec.split(":")[1], n or REENACT_FRAMES)
        frames, lms = zip(*(render_face(identity, p, e) for p, e in motion))
        return {"lms": np.stack(lms), "frames": frames, "who": who, "motion": motion}
    if is_video(spec):  # a plain video: landmarks detected and smoothed
        try:
            landmark_detector()
        except DataError as e:
            raise DataError(f"{spec}: a plain video has no landmarks to read, and {e}") from None
        lms, found = detect_video(spec, n, show=True)
        if not found.any():
            raise DataError(f"{spec}: no face found in its first {len(found)} frames")
        # The frames are decoded again, lazily, for the driver panel: decoding a 720p frame costs ~6 ms
        # next to detection's ~17, while holding the clip in memory would take 2.7 MB a frame.
        return {"lms": lms, "frames": decode(spec), "who": os.path.realpath(spec), "motion": None,
                "no_face": int((~found).sum())}
    join, frames = lambda f: os.path.join(spec, f), None
    if os.path.isfile(spec) and spec.endswith(".npy"):
        lms = load_landmarks(spec, n)
    elif not os.path.isdir(spec):
        raise DataError(f"{spec}: no such driver (a video file, video folder, landmarks .npy, folder of .pts "
                        f"or synthetic:ID)")
    elif any(os.path.isfile(join(f)) for f in ("frames.npy", "landmarks.npy")):  # a prepared video
        lms = load_landmarks(join("landmarks.npy"), n)
        frames = np.load(join("frames.npy"), mmap_mode="r") if os.path.isfile(join("frames.npy")) else None
    elif any(os.path.exists(join(f)) for f in ("vid.avi", "annot")):  # the 300VW layout
        for f in ("annot", "vid.avi"):
            if not os.path.exists(join(f)):
                raise DataError(f"{join(f)}: missing (a 300VW-layout video is vid.avi + annot/*.pts)")
        lms, frames = read_pts_folder(join("annot"), n), decode(join("vid.avi"))
    else:
        lms = read_pts_folder(spec, n)
    return {"lms": lms, "frames": frames, "who": os.path.realpath(spec), "motion": None}


def load_face(spec, pts=None):
    """FACE -> {"image", "lm" (68,2) in its pixels, "who", "identity" (synthetic sources only)}. An
    image's landmarks: --source-pts, else the .pts beside it, else detected."""
    from PIL import Image, ImageOps
    if spec.startswith("synthetic:"):
        ident, t = (spec.split(":") + ["0"])[1:3]
        if not t.isdigit():
            raise DataError(f"{spec}: expected synthetic:ID:FRAME with an integer FRAME")
        who, identity, motion = synthetic(spec, ident, int(t) + 1)
        return dict(zip(("image", "lm"), render_face(identity, *motion[-1])), who=who, identity=identity)
    if ":" in spec and not os.path.exists(spec):  # VIDEO:FRAME of a prepared, 300VW-layout or plain video
        import itertools
        folder, t = spec.rsplit(":", 1)
        drv = load_driver(folder, int(t) + 1) if t.isdigit() else {"lms": [], "frames": None}
        image = None if drv["frames"] is None else next(itertools.islice(drv["frames"], int(t), None), None)
        if image is None or len(drv["lms"]) <= int(t):
            raise DataError(f"{spec}: no frame {t} with landmarks in {folder}")
        return {"image": np.asarray(image), "lm": drv["lms"][int(t)], "who": drv["who"], "identity": None}
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    try:  # upright as viewers show it: phone photos are often stored sideways with an EXIF rotation
        image = np.asarray(ImageOps.exif_transpose(Image.open(spec)).convert("RGB"))
    except OSError:  # not an image Pillow knows
        raise DataError(f"{spec}: not a readable image") from None
    beside = os.path.splitext(spec)[0] + ".pts"
    if pts or os.path.isfile(beside):  # given landmarks win over detection
        lm = read_pts(pts or beside)
        if outside(lm, image.shape):
            raise DataError(f"{pts or beside}: a landmark lies more than a frame size outside the "
                            f"{image.shape[1]}x{image.shape[0]} image {spec}")
    else:
        try:
            lm = landmark_detector()(image)
        except DataError as e:
            raise DataError(f"{spec}: no {beside} beside it to give its landmarks, and {e}") from None
        if lm is None:
            raise DataError(f"{spec}: no face found (give its 68 landmarks as {beside} or --source-pts)")
    return {"image": image, "lm": lm, "who": os.path.realpath(spec), "identity": None}


# ===== SECTION D: automatic 68-point landmarks (the optional dlib extra) =====
# Real footage has no .pts files. dlib's HOG face detector finds the face, and its 68-point shape
# predictor (trained on iBUG 300-W: the same 68 points in the same order as 300VW) places the points.
# dlib is optional: only this section imports it, and without it the features that need it stop with
# one line that says what to install.
DLIB_HINT = "pip install dlib-bin face-recognition-models"
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
SEARCH_SIDE = 1280  # a whole frame is searched at most this wide (HOG costs ~ its area)
TRACK_FACE = 100    # near the last face, the search window is scaled so the face is ~100 px wide...
TRACK_WINDOW = 3    # ...and the window is 3 face sizes wide: ~15-20 ms a frame at any resolution
# The One-Euro filter's settings, per frame rather than per second: detection noise is new in every
# frame, whatever the frame rate. Cutoffs in cycles per frame (0.04 = 1 Hz at 25 fps), speed in face
# sizes per frame. Chosen on the synthetic talking heads' exact landmarks plus dlib-sized noise, for
# the least error against the truth; see smooth_track and the README for the measurements.
MIN_CUTOFF, BETA, D_CUTOFF = 0.04, 15.0, 0.3
PAD = 20  # frames of reflection at each end: 4 time constants of the heaviest smoothing (weight 0.2)


def dlib_models():
    """(the dlib module, the folder of face_recognition_models' model files), or a DataError saying
    what to install. The folder is found without importing the package: its __init__ needs
    pkg_resources, which recent setuptools no longer ship."""
    import importlib.util
    try:
        import dlib
        spec = importlib.util.find_spec("face_recognition_models")
    except ImportError:
        spec = None
    if spec is None:
        raise DataError(f"automatic landmarks need dlib and its models: {DLIB_HINT}")
    return dlib, os.path.join(spec.submodule_search_locations[0], "models")


def is_video(path):
    """A file that decode() reads, going by its extension."""
    return os.path.isfile(path) and str(path).lower().endswith(VIDEO_EXTS)


@functools.lru_cache(maxsize=1)  # the 100 MB predictor takes ~0.5 s to load: once per process
def landmark_detector():
    """find(image, last=None): the 68 landmarks (68,2) float32, 0-based pixels, of the face in an RGB
    uint8 image, or None. With `last` (the previous frame's landmarks) the face near it is searched
    first: tracking is fast, and it follows one person when there are several."""
    from PIL import Image
    dlib, models = dlib_models()
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))

    def faces(image, box, scale, upsample):
        """HOG detections in `box` (x0, y0, x1, y1; outside the image is black) resized by `scale`,
        as ((x0, y0, x1, y1) in image pixels, score)."""
        x0, y0, x1, y1 = box
        window = Image.fromarray(image).crop(box)
        if scale != 1:
            window = window.resize((max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))),
                                   Image.BILINEAR)
        rects, scores, _ = hog.run(np.asarray(window), upsample, 0)
        return [((x0 + r.left() / scale, y0 + r.top() / scale, x0 + (r.right() + 1) / scale,
                  y0 + (r.bottom() + 1) / scale), s) for r, s in zip(rects, scores)]

    def find(image, last=None):
        image = np.ascontiguousarray(np.asarray(image, np.uint8)[..., :3])
        H, W = image.shape[:2]
        found, centre = [], lambda b: np.array([b[0] + b[2], b[1] + b[3]]) / 2
        if last is not None:
            c, side = (last.min(0) + last.max(0)) / 2, face_size(last)
            box = tuple(int(round(v)) for v in np.r_[c - TRACK_WINDOW * side / 2, c + TRACK_WINDOW * side / 2])
            found = faces(image, box, TRACK_FACE / side, 0)
            found.sort(key=lambda f: np.linalg.norm(centre(f[0]) - c))  # the same person: the nearest
        if not found:  # the whole frame: HOG finds faces from 80 px, or 40 px when upsampled once
            scale = min(1.0, SEARCH_SIDE / max(H, W))
            found = faces(image, (0, 0, W, H), scale, int(max(H, W) * scale <= 640))
            # the subject is the largest face; weak false positives (score ~0, real faces > 0.5) last
            found.sort(key=lambda f: (f[1] < 0.5, -(f[0][2] - f[0][0])))
        if not found:
            return None
        x0, y0, x1, y1 = (int(round(v)) for v in found[0][0])
        parts = predictor(image, dlib.rectangle(x0, y0, x1 - 1, y1 - 1)).parts()
        # dlib's points are integer pixel indices: 0-based pixel centres, as ours
        return np.array([(p.x, p.y) for p in parts], np.float32)

    return find


def track(frames, n=None, label=None, expected=0):
    """Detected landmarks of the first n frames: (T,68,2) float32, NaN where no face was found. Each
    frame is searched near the last face first. `label`: show a progress line (`expected` frames)."""
    import itertools
    import time
    find, raw, last, t0 = landmark_detector(), [], None, time.time()
    for frame in frames if n is None else itertools.islice(frames, n):
        lm = find(frame, last)
        last = lm if lm is not None else last
        raw.append(lm if lm is not None else np.full((N_LANDMARKS, 2), np.nan, np.float32))
        if label and len(raw) % 10 == 0:
            progress(f"detect {label}", len(raw), max(expected, len(raw) + 1), t0)
    if label:
        progress(f"detect {label}", len(raw), len(raw), t0)
    return np.stack(raw) if raw else np.zeros((0, N_LANDMARKS, 2), np.float32)


def one_euro(x, scale, min_cutoff=MIN_CUTOFF, beta=BETA, d_cutoff=D_CUTOFF):
    """The One-Euro filter (Casiez, Roussel & Vogel, CHI 2012) along axis 0, per coordinate: an
    exponential smoother whose cutoff rises with the speed. A still point is smoothed hard (jitter
    gone), a moving one lightly (no lag, blinks and lip motion kept). Speed is measured in face sizes
    (`scale` px) per frame, so one beta fits every resolution."""
    alpha = lambda cutoff: 1 / (1 + 1 / (2 * np.pi * cutoff))  # an exponential smoother's weight
    y, dy, out = x[0], np.zeros_like(x[0]), [x[0]]
    for xt in x[1:]:
        dy = dy + alpha(d_cutoff) * ((xt - y) / scale - dy)
        y = y + alpha(min_cutoff + beta * np.abs(dy)) * (xt - y)
        out.append(y)
    return np.stack(out).astype(np.float32)


def smooth_track(raw):
    """Raw detections (T,68,2) with NaN rows -> (smoothed landmarks (T,68,2), found (T,) bool).

    Detection jitters (~0.6 % of the face size from frame to frame), and a video made from it flickers.
    The One-Euro filter smooths it where the face is still and follows it where it moves (a fixed
    low-pass would have to choose between jitter and lost blinks). The video is known in advance, so
    it runs forward, then backward over the result: the backward pass undoes the forward pass's lag.
    Each run of frames with a face is smoothed on its own (after a gap the face may be elsewhere); a
    frame without a face keeps the last landmarks (those before the first face take the first)."""
    found = ~np.isnan(raw).any((1, 2))
    if not found.any():
        return raw, found
    out = raw.copy()
    edges = np.flatnonzero(np.diff(np.r_[0, found.astype(np.int8), 0]))
    for a, b in zip(edges[::2], edges[1::2]):
        x, scale = raw[a:b], float(np.median([face_size(lm) for lm in raw[a:b]]))
        # Both ends extended by point reflection (as scipy's filtfilt does): a filter starting at an
        # end would lag there, and the motion continued through the end leaves no such bias.
        p = min(len(x) - 1, PAD)
        x = np.concatenate([2 * x[0] - x[p:0:-1], x, 2 * x[-1] - x[-2:-p - 2:-1]])
        out[a:b] = one_euro(one_euro(x, scale)[::-1], scale)[::-1][p:p + b - a]
    last = np.maximum.accumulate(np.where(found, np.arange(len(raw)), -1))
    return out[np.where(last < 0, np.argmax(found), last)], found


def detect_video(vid, n=None, show=False):
    """A video file's landmarks, detected and smoothed: (landmarks (T,68,2), found (T,) bool)."""
    expected = min(frame_count(vid), n or math.inf) if show else 0
    lms, found = smooth_track(track(decode(vid), n, os.path.basename(vid) if show else None, expected))
    if not len(lms):
        raise DataError(f"{vid}: no frames")
    return lms, found
