"""The synthetic talking heads: faces drawn FROM the 68 iBUG points, so their annotations are exact,
and any identity can be drawn with any pose and expression. They are the built-in dataset (a fresh
offline machine can train without 300VW) and a ground truth nobody can film: identity A doing B's
expression, for cross-identity scores and reenact's reference.

    render_face       one frame of an identity at a pose and expression -> (image, landmarks)
    synth             the raw 300VW layout (NNN/vid.avi, NNN/annot/*.pts, params.json, split.json)
    ensure_synthetic  the built-in set, rendered and cropped straight into the prepared layout
    identity_spec     synthetic:ID of the built-in set, for reenact's sources and drivers
    cross_targets     identity A rendered with identity B's pose and expression, cut by THE crop
    cross_scores      evaluate's cross-identity and identity-leak scores of a G against that truth
"""
import json
import math
import os
import time

import imageio
import numpy as np
from PIL import Image, ImageDraw

from data import (CROP_SCALE, MIRROR, N_LANDMARKS, DataError, crop_face, pool_map, progress,
                  read_prepared, save_prepared, write_json, writing)
from extras.cli import number

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
            "beard": {"style": str(rng.choice(list(BEARDS))),
                      "colour": hair} if rng.uniform() < .25 else None,
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
    pose = {k: m * rng.uniform(.4, 1) * _smooth(rng, n, int(rng.integers(30, 80)))
            for k, m in MAX_POSE.items()}
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
            while len(h) > 1 and ((h[-1][0] - h[-2][0]) * (y - h[-2][1])
                                  <= (h[-1][1] - h[-2][1]) * (x - h[-2][0])):
                h.pop()
            h.append((x, y))
        return h[:-1]
    return np.array(half(p) + half(p[::-1]))


def render_face(identity, pose, expression, size=SYNTH_SIZE):
    """One frame -> (uint8 (size, size, 3), float32 (68, 2) 0-based pixel-centre landmarks). Every part
    is drawn from the projected points that are returned, so the landmarks are exact."""
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
    line = lambda X, c, w: d.line(np.ravel(X).tolist(), fill=colour(c), width=max(1, int(w * u)),
                                  joint="curve")
    disc = lambda x, r, c: d.ellipse([*(x - r), *(x + r)], fill=colour(c))
    d.rectangle(list(np.multiply(identity["background"]["box"], S)),
                fill=colour(identity["background"]["panel"]))
    if hair["style"] != "none":  # hair behind the head, down the back for long hair
        tail = proj(np.array([[-1.2, 1.5, -.6], [1.2, 1.5, -.6]]) * wx)[:2 * (hair["style"] == "long")]
        poly(_hull(np.vstack([skull(1.08, SPHERE[:, 1] < .3), tail])), hair["colour"])
    d.ellipse([*(centre + (-1.9 * u, 1.8 * u)), *(centre + (1.9 * u, 3.6 * u))],
              fill=colour(identity["clothes"]))
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
    return identity, motion, {"identity": identity,
                              "frames": [{"pose": p, "expression": e} for p, e in motion]}


def _synth_names(n_videos):
    """Video names 001, 002, ... and the split: the first n_videos[0] train, then test1, test2, test3."""
    if sum(n_videos) > 999:
        raise DataError(f"at most 999 synthetic videos (3-digit names), asked for {sum(n_videos)}")
    ends = np.cumsum(n_videos).tolist()
    names = [f"{i + 1:03d}" for i in range(ends[-1])]
    return names, {k: names[a:b]
                   for k, a, b in zip(("train", "test1", "test2", "test3"), [0] + ends[:-1], ends)}


def _render_all(worker, jobs, n_frames, workers):
    """Run a per-video worker over jobs on `workers` processes, with a progress line."""
    t0, done = time.time(), 0
    for k, n in enumerate(pool_map(worker, jobs, workers)):
        done += n
        progress("synth", done, len(jobs) * n_frames, t0, extra=f"video {k + 1}/{len(jobs)}")


def write_pts(path, pts0):
    """0-based (68,2) points -> a 300VW .pts file (1-based, as the dataset's own)."""
    rows = "".join(f"{x + 1:.3f} {y + 1:.3f}\n" for x, y in np.asarray(pts0, np.float64))
    with open(path, "w") as f:
        f.write(f"version: 1\nn_points:  {len(pts0)}\n{{\n{rows}}}\n")


def _synth_video(job):
    """Render one video in 300VW layout into OUT/NNN, whole or not at all (writing), so a re-run skips
    finished ones (and prepare, which ignores dot-folders, never sees a half-written one)."""
    out, index, n_frames, size, seed = job
    identity, motion, params = _synth_plan(seed, index, n_frames)
    with writing(os.path.join(out, f"{index + 1:03d}"), folder=True) as tmp:
        os.makedirs(os.path.join(tmp, "annot"))
        with imageio.get_writer(os.path.join(tmp, "vid.avi"), fps=SYNTH_FPS, codec="libx264", quality=9,
                                macro_block_size=1, ffmpeg_log_level="error") as video:
            for t, (pose, expression) in enumerate(motion):
                frame, landmarks = render_face(identity, pose, expression, size)
                video.append_data(frame)
                write_pts(os.path.join(tmp, "annot", f"{t + 1:06d}.pts"), landmarks)
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f)
    return n_frames


def _synth_prepared(job):
    """Render one video straight into the prepared layout: what prepare makes of _synth_video's output,
    minus the video coding, as every frame is cut by THE crop around its exact landmarks."""
    out, index, n_frames, raw_size, size, crop_scale, seed = job
    identity, motion, params = _synth_plan(seed, index, n_frames)
    crops = [crop_face(*render_face(identity, pose, expression, raw_size), size, crop_scale)
             for pose, expression in motion]
    save_prepared(out, f"{index + 1:03d}", *zip(*crops), params=params)
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
    write_json(os.path.join(out, "split.json"), split)
    return split


def ensure_synthetic(cache=SYNTH_CACHE, seed=0, n_frames=SYNTH_FRAMES, n_videos=SYNTH_VIDEOS,
                     raw_size=SYNTH_SIZE, size=64, crop_scale=CROP_SCALE, workers=None, log=print):
    """The default training data, built once into CACHE/prepared and reused afterwards. The frames are
    rendered and cropped straight into the prepared layout on every core (`workers`, default all): no
    video files, so no ffmpeg. synth + prepare make the same set through videos. Re-runnable: finished
    videos are kept, and split.json, written last, marks a finished set."""
    prepared = os.path.join(cache, "prepared")
    if os.path.exists(os.path.join(prepared, "split.json")):
        log(f"using the synthetic set in {prepared} (delete it to regenerate)")
        return prepared
    names, split = _synth_names(n_videos)
    write_json(os.path.join(prepared, "prepare.json"), {  # raw_size: evaluate re-renders ground truths
        "size": size, "crop_scale": crop_scale, "source": f"synthetic, seed {seed}", "synthetic": True,
        "raw_size": raw_size})
    todo = [(prepared, i, n_frames, raw_size, size, crop_scale, seed) for i, name in enumerate(names)
            if not os.path.isdir(os.path.join(prepared, name))]
    workers = workers or os.cpu_count()
    log(f"synthetic set: rendering {len(todo)} of {len(names)} videos ({n_frames} frames, {raw_size} px, "
        f"cropped to {size}) into {prepared} on {workers} processes")
    _render_all(_synth_prepared, todo, n_frames, workers)
    write_json(os.path.join(prepared, "split.json"), split)
    return prepared


def identity_spec(spec, ident, n):
    """Identity `ident` of the built-in set (seed 0; its video ident+1, so 50 and up are test identities,
    never trained on) and n frames of its talking motion, drawn for the set's video length so that
    they are that video's first frames. Returns (its name, identity, motion)."""
    if not ident.isdigit():
        raise DataError(f"{spec}: expected synthetic:ID with an integer ID")
    rng = np.random.default_rng([0, int(ident)])
    return f"synthetic:{int(ident)}", random_identity(rng), talking_motion(rng, max(n, SYNTH_FRAMES))[:n]


# ----------------------------------------------------------------------------- cross-identity ground truth
LEAK_ATTRS = ("glasses", "beard")  # attributes (None or a dict) an identity may lack
LEAK_LEVELS = 8  # an attribute's mask: where it changes the render by > 8 of 255


def render_crop(identity, frame, prep):
    """A synthetic frame rendered afresh and cut by THE crop, as the set was made. The built-in set
    records its render size (raw_size); a set made by synth + prepare does not, and the default is
    close: the landmarks do not depend on it, the pixels barely (and the video coding more)."""
    img, lm = render_face(identity, frame["pose"], frame["expression"], prep.get("raw_size", SYNTH_SIZE))
    return crop_face(img, lm, prep["size"], prep["crop_scale"])


_TARGETS = {}


def cross_targets(root, split, videos, n, seed=0, label=None):
    """Ground truth nobody can film: for n (A, s, B, j), A != B, identity A rendered with B's frame-j
    pose and expression. Its landmarks (B's pose/expression on A's face shape) are the condition, its
    image the target; where B wears a LEAK_ATTRS attribute that A lacks, A is also rendered with it.
    With a label, a progress line (renders are cached: only the first run of a dataset waits)."""
    if (root, split, n, seed) not in _TARGETS:
        t0 = time.time()
        prep = read_prepared(root)
        rng = np.random.default_rng([seed, 1])  # a stream of its own: the same-video pairs stay put
        t = {"pairs": [], "src": [], "src_lm": [], "img": [], "lm": [], "drv_lm": [],
             "leak": {k: [] for k in LEAK_ATTRS}}
        for i in range(n):
            a, b = (int(v) for v in rng.choice(len(videos), size=2, replace=False))
            s, j = (int(rng.integers(len(videos[v]["landmarks"]))) for v in (a, b))
            (A, B), fb = (videos[v]["params"]["identity"] for v in (a, b)), videos[b]["params"]["frames"][j]
            truth, truth_lm = render_crop(A, fb, prep)
            t["pairs"].append((a, s, b, j))
            t["src"].append(videos[a]["frames"][s])
            t["src_lm"].append(videos[a]["landmarks"][s])
            t["img"].append(truth)
            t["lm"].append(truth_lm)
            t["drv_lm"].append(videos[b]["landmarks"][j])
            for k in LEAK_ATTRS:
                if B.get(k) and not A.get(k):
                    t["leak"][k].append((i, render_crop({**A, k: B[k]}, fb, prep)[0]))
            if label and (i % 10 == 9 or i == n - 1):
                progress(label, i + 1, n, t0, unit="pairs")
        _TARGETS[root, split, n, seed] = {k: v if k in ("pairs", "leak") else np.stack(v)
                                          for k, v in t.items()}
    return _TARGETS[root, split, n, seed]


def leak_score(gen, bare, worn):
    """Identity leak on one pair: among the pixels where A without and with B's attribute differ by more
    than LEAK_LEVELS (the attribute's mask; thin glasses frames at 32 px change pixels by ~15 levels),
    the fraction where the generated image is closer (mean |.| over colour) to the render WITH it.
    0 = nothing of B's glasses/beard (a perfect G); 1 = all of it copied."""
    d = lambda x, y: np.abs(x.astype(np.float64) - y.astype(np.float64)).mean(-1)
    mask = d(bare, worn) > LEAK_LEVELS
    return float((d(gen, worn) < d(gen, bare))[mask].mean()) if mask.any() else math.nan


def cross_scores(root, split, videos, n, seed, draw, scores, tag):
    """metrics' cross-identity scores per pair, on cross_targets' n pairs: x_ = A drawn with the truth's
    landmarks (B's pose and expression on A's face shape), xabs_ = the paper's setting, B's own
    landmarks (B's face shape), both against the same rendered truth; leak_ATTR = leak_score of the x_
    images, for each attribute some B wears and A lacks. draw(sources, their landmarks, landmarks, label)
    -> the images (G's, or a baseline's); scores(images, truth, prefix) -> {prefix + metric: per pair}."""
    t = cross_targets(root, split, videos, n, seed, f"{tag} rendering truth:")
    x_gen = draw(t["src"], t["src_lm"], t["lm"], f"{tag} cross-identity pairs:")
    xabs = draw(t["src"], t["src_lm"], t["drv_lm"], f"{tag} cross, driver's landmarks:")
    leak = {"leak_" + k: [leak_score(x_gen[j], t["img"][j], worn) for j, worn in items]
            for k, items in t["leak"].items() if items}
    return {**scores(x_gen, t["img"], "x_"), **scores(xabs, t["img"], "xabs_"), **leak}


def add_options(p):
    """`facesynth.py synth`'s options."""
    p.add_argument("out", help="folder for the videos: NNN/vid.avi, NNN/annot/*.pts, NNN/params.json")
    p.add_argument("--seed", type=number(int, 0), default=0, help="the identities and motion follow from it")
    p.add_argument("--videos", type=number(int, 0), nargs=4, default=list(SYNTH_VIDEOS),
                   metavar=("TRAIN", "T1", "T2", "T3"), help="videos per split (300VW's sizes)")
    p.add_argument("--frames", type=number(int, 3), default=SYNTH_FRAMES, help="frames per video")
    p.add_argument("--size", type=number(int, 16), default=SYNTH_SIZE, help="frame size in pixels (even)")
    p.add_argument("--workers", type=number(), default=2, help="processes")
