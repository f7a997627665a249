"""Automatic 68-point landmarks for own photos and videos, which have no .pts files: dlib's HOG face
detector finds the face, and its 68-point shape predictor (trained on iBUG 300-W: the same 68 points in
the same order as 300VW) places the points. A video's points are tracked from frame to frame and
smoothed with a One-Euro filter, forward then backward.

dlib is optional: only this file imports it, and without it the features that need it stop with one
line that says what to install.
"""
import functools
import importlib.util
import itertools
import math
import os
import time

import numpy as np
from PIL import Image

from data import N_LANDMARKS, VIDEO_EXTS, DataError, decode, face_size, frame_count, progress

DLIB_HINT = "pip install dlib-bin face-recognition-models"
SEARCH_SIDE = 1280  # a whole frame is searched at most this wide (HOG costs ~ its area)
TRACK_FACE = 100    # near the last face, the search window is scaled so the face is ~100 px wide...
TRACK_WINDOW = 3    # ...and the window is 3 face sizes wide: ~15-20 ms a frame at any resolution
# The One-Euro filter's settings, per frame rather than per second: detection noise is new in every
# frame, whatever the frame rate. Cutoffs in cycles per frame (0.04 = 1 Hz at 25 fps), speed in face
# sizes per frame. Chosen on the synthetic talking heads' exact landmarks plus dlib-sized noise, for
# the least error against the truth; see smooth_track and docs/reenact.md for the measurements.
MIN_CUTOFF, BETA, D_CUTOFF = 0.04, 15.0, 0.3
PAD = 20  # frames of reflection at each end: 4 time constants of the heaviest smoothing (weight 0.2)


def dlib_models():
    """(the dlib module, the folder of face_recognition_models' model files), or a DataError saying
    what to install. The folder is found without importing the package: its __init__ needs
    pkg_resources, which recent setuptools no longer ship."""
    try:
        import dlib  # optional: imported only when landmarks are detected
        spec = importlib.util.find_spec("face_recognition_models")
    except ImportError:
        spec = None
    if spec is None:
        raise DataError(f"automatic landmarks need dlib and its models: {DLIB_HINT}")
    return dlib, os.path.join(spec.submodule_search_locations[0], "models")


@functools.lru_cache(maxsize=1)  # the 100 MB predictor takes ~0.5 s to load: once per process
def landmark_detector():
    """find(image, last=None): the 68 landmarks (68,2) float32, 0-based pixels, of the face in an RGB
    uint8 image, or None. With `last` (the previous frame's landmarks) the face near it is searched
    first: tracking is fast, and it follows one person when there are several."""
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
            box = tuple(int(round(v)) for v in np.r_[c - TRACK_WINDOW * side / 2,
                                                     c + TRACK_WINDOW * side / 2])
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


def is_video(path):
    """A file that data.decode reads, going by its extension: footage without .pts files."""
    return os.path.isfile(path) and str(path).lower().endswith(VIDEO_EXTS)


def detect_video(vid, n=None, show=False):
    """A video file's landmarks, detected and smoothed: (landmarks (T,68,2), found (T,) bool)."""
    expected = min(frame_count(vid), n or math.inf) if show else 0
    lms, found = smooth_track(track(decode(vid), n, os.path.basename(vid) if show else None, expected))
    if not len(lms):
        raise DataError(f"{vid}: no frames")
    return lms, found


def plain_videos(src):
    """SRC's video files (NAME.mp4, ...), which `prepare` takes beside its 300VW folders with their
    landmarks from usable_landmarks. Returns ({NAME: its file}, {file: skip line} for a file whose name a
    folder or an earlier file has). Video files without dlib: the DataError that says what to install."""
    entries = sorted(d for d in os.listdir(src) if d[0] != ".") if os.path.isdir(src) else []
    taken = {d: d for d in entries if os.path.isdir(os.path.join(src, d))}
    videos, skipped = {}, {}
    for f in (f for f in entries if is_video(os.path.join(src, f))):
        stem = os.path.splitext(f)[0]
        if stem in taken:
            skipped[f] = f"skip {f}: the name {stem} is already {taken[stem]}'s (rename one)"
        else:
            taken[stem] = videos[stem] = f
    if videos:  # stop now, not with one skip line per video
        try:
            dlib_models()
        except DataError as e:
            raise DataError(f"{src}: its {len(videos)} plain video(s) have no landmarks to read, "
                            f"and {e}") from None
    return videos, skipped


def usable_landmarks(vid):
    """A plain video's detected landmarks for `prepare`: (landmarks, found, warning lines). Its frames
    without a face are left out: the last landmarks on them would teach G a wrong face."""
    lms, found = detect_video(vid)
    if not found.any():
        raise DataError(f"{vid}: no face found in its {len(found)} frames")
    name = os.path.splitext(os.path.basename(vid))[0]
    return lms, found, [] if found.all() else [f"{name}: {vid}: no face found in {(~found).sum()} of "
                                               f"{len(found)} frames; those are left out"]


def judge_scores(gen, src, src_lm, tgt_lm, k=4, label=None):
    """The optional real-data judge, dlib (pip install dlib-bin face-recognition-models), or None when
    it is not installed. lm_err: mean distance of dlib's 68 points on the generated face to the target
    landmarks over the outer eye corners' distance (36-45); id_dist: descriptor distance generated vs
    source (dlib: < 0.6 = same person). Crops are upsampled k times (dlib wants faces > 80 px) and the
    face box comes from the known landmarks, as dlib's detector misses faces this small."""
    try:
        dlib, models = dlib_models()
    except DataError:
        return None
    predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))
    descriptor = dlib.face_recognition_model_v1(os.path.join(models,
                                                             "dlib_face_recognition_resnet_model_v1.dat"))
    up = lambda im: np.ascontiguousarray(Image.fromarray(im).resize((im.shape[1] * k,) * 2, Image.BICUBIC))
    box = lambda lm: dlib.rectangle(*(int(v) for v in np.r_[lm.min(0), lm.max(0) + 1] * k))
    desc = lambda im, lm: np.array(descriptor.compute_face_descriptor(im, predictor(im, box(lm))))
    out, t0 = {"lm_err": [], "id_dist": []}, time.time()
    for g, s, ls, lt in zip(map(up, gen), map(up, src), src_lm, tgt_lm):
        pts = (np.array([(p.x, p.y) for p in predictor(g, box(lt)).parts()]) + 0.5) / k - 0.5
        out["lm_err"].append(np.linalg.norm(pts - lt, axis=1).mean() / np.linalg.norm(lt[36] - lt[45]))
        out["id_dist"].append(np.linalg.norm(desc(g, lt) - desc(s, ls)))
        if label:
            progress(label, len(out["id_dist"]), len(gen), t0, unit="pairs")
    return out


def judge(gen, src, src_lm, tgt_lm, n, label=None):
    """metrics' --judge N: judge_scores on the first n pairs ({} when n is 0 or dlib is missing), and a
    note of what was judged, for the tables."""
    scores = n and judge_scores(*(x[:n] for x in (gen, src, src_lm, tgt_lm)), label=label)
    note = (f"dlib, on the first {min(n, len(gen))} pairs" if scores else "off (--judge N)" if not n
            else "skipped (dlib / face_recognition_models not installed)")
    return scores or {}, note
