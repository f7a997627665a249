"""Reenactment from landmarks alone. The paper needs the target *image* (its landmarks come from it);
real use has only a driver's landmarks. This file reads a source face and a driver's landmark sequence
from any of the formats `facesynth.py reenact` takes, retargets the driver's motion onto the source
(relative mode), and generates the whole video with G.

    load_face / load_driver   FACE and DRIVER specs -> images and landmarks, in their own pixels
    retarget / condition      the landmarks G is given, in the source crop's pixels
    drive                     every panel of the video: source, driver, landmarks, generated, reference
    make_video                `facesynth.py reenact`: the panels side by side in a video, and its flicker
"""
import itertools
import math
import os

import imageio
import numpy as np
import torch
from PIL import Image, ImageOps

from data import (CROP_SCALE, N_LANDMARKS, DataError, crop_box, crop_face, decode, face_size, heatmap_picture,
                  outside, read_pts, read_prepared, read_video, to_uint8, writing)
from evaluate import flicker, label_strip, write_png
from extras.cli import number, writable
from extras import landmarks, synthetic
from networks import generate, load_generator, pick_device

REENACT_FRAMES = 100  # a synthetic driver's length: 4 s at 25 fps
REENACT_FPS = 25
REENACT_HEIGHT = 256  # without --zoom, panels are enlarged to about this many pixels
REENACT_ZOOM_MAX = 16  # the video is built in memory: 100 frames of 4 x 64 px panels x 16 take 1.3 GB
# the video's panels in evaluate.COLUMNS' order, each labelled on every frame
PANELS = {"source": "source", "landmarks": "driver landmarks", "generated": "generated",
          "driver": "driver (target)"}


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


def load_driver(spec, n=None):
    """DRIVER -> {"lms": (T,68,2) in its frames' pixels, "frames": iterable or None, "who": its person
    (the source's too: absolute by default), "motion": a synthetic driver's (pose, expression)s,
    "no_face": a plain video's count of frames without a face (they keep the last landmarks)}."""
    if spec.startswith("synthetic:"):
        who, identity, motion = synthetic.identity_spec(spec, spec.split(":")[1], n or REENACT_FRAMES)
        frames, lms = zip(*(synthetic.render_face(identity, p, e) for p, e in motion))
        return {"lms": np.stack(lms), "frames": frames, "who": who, "motion": motion}
    if landmarks.is_video(spec):  # a plain video: landmarks detected and smoothed
        try:
            landmarks.landmark_detector()
        except DataError as e:
            raise DataError(f"{spec}: a plain video has no landmarks to read, and {e}") from None
        lms, found = landmarks.detect_video(spec, n, show=True)
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
        if os.path.isfile(join("frames.npy")):  # both checked as training checks them
            frames, lms = read_video(spec)
            lms = lms[:n]
        else:
            lms = load_landmarks(join("landmarks.npy"), n)
    elif any(os.path.exists(join(f)) for f in ("vid.avi", "annot")):  # the 300VW layout
        for f in ("annot", "vid.avi"):
            if not os.path.exists(join(f)):
                raise DataError(f"{join(f)}: missing (a 300VW-layout video is vid.avi + annot/*.pts)")
        lms, frames = read_pts_folder(join("annot"), n), decode(join("vid.avi"))
    else:
        lms = read_pts_folder(spec, n)
    return {"lms": lms, "frames": frames, "who": os.path.realpath(spec), "motion": None}


def read_image(path):
    """An image file -> RGB uint8 (H,W,3), upright as viewers show it (phone photos are often stored
    sideways with an EXIF rotation). Any bit depth: 16-bit and float grey are scaled to 8 bits, which
    Pillow's convert would clip to white."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":
                a = np.asarray(im, np.float64)
                top = 1.0 if im.mode == "F" and a.max() <= 1 else \
                    255.0 if im.mode in ("I", "F") and a.max() <= 255 else 65535.0
                im = Image.fromarray(np.clip(a * (255 / top), 0, 255).round().astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:  # Pillow's guard against huge images
        why = str(e).split(", could be")[0]
        raise DataError(f"{path}: too large an image ({why}); scale it down") from None
    except OSError:  # not an image Pillow knows
        raise DataError(f"{path}: not a readable image") from None


def load_face(spec, pts=None):
    """FACE -> {"image", "lm" (68,2) in its pixels, "who", "identity" (synthetic sources only)}. An
    image's landmarks: --source-pts, else the .pts beside it, else detected."""
    if spec.startswith("synthetic:"):
        ident, t = (spec.split(":") + ["0"])[1:3]
        if not t.isdigit():
            raise DataError(f"{spec}: expected synthetic:ID:FRAME with an integer FRAME")
        who, identity, motion = synthetic.identity_spec(spec, ident, int(t) + 1)
        return dict(zip(("image", "lm"), synthetic.render_face(identity, *motion[-1])),
                    who=who, identity=identity)
    if ":" in spec and not os.path.exists(spec):  # VIDEO:FRAME of a prepared, 300VW-layout or plain video
        folder, t = spec.rsplit(":", 1)
        drv = load_driver(folder, int(t) + 1) if t.isdigit() else {"lms": [], "frames": None}
        image = None if drv["frames"] is None else next(itertools.islice(drv["frames"], int(t), None), None)
        if image is None or len(drv["lms"]) <= int(t):
            raise DataError(f"{spec}: no frame {t} with landmarks in {folder}")
        lm = read_pts(pts) if pts else drv["lms"][int(t)]  # given landmarks win, as for an image
        return {"image": np.asarray(image), "lm": lm, "who": drv["who"], "identity": None}
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    image = read_image(spec)
    beside = os.path.splitext(spec)[0] + ".pts"
    if pts or os.path.isfile(beside):  # given landmarks win over detection
        lm = read_pts(pts or beside)
        if outside(lm, image.shape):
            raise DataError(f"{pts or beside}: a landmark lies more than a frame size outside the "
                            f"{image.shape[1]}x{image.shape[0]} image {spec}")
    else:
        try:
            lm = landmarks.landmark_detector()(image)
        except DataError as e:
            raise DataError(f"{spec}: no {beside} beside it to give its landmarks, and {e}") from None
        if lm is None:
            raise DataError(f"{spec}: no face found (give its 68 landmarks as {beside} or --source-pts)")
    return {"image": image, "lm": lm, "who": os.path.realpath(spec), "identity": None}


@torch.no_grad()
def drive(G, cfg, src, drv, relative, neutral=0, crop_scale=None):
    """Generation for a whole driver: the source face (load_face) given every frame's landmarks of
    the driver (load_driver). Returns the frames (T,S,S,3) of each panel, uint8: "source" (its
    crop), "driver" (its frames, when it has any), "landmarks" (what G is given, as a picture),
    "generated", and "reference" with its "reference_name": a video of the same motion to measure
    flicker against (the driver, or on the synthetic set the source identity rendered doing it)."""
    a = cfg["args"]
    size, crop_scale = a["size"], crop_scale or CROP_SCALE
    lms, T = drv["lms"], len(drv["lms"])
    # Relative mode frames the driver (and the truth) once, at the neutral frame, as the source is
    # framed once: the head moves in its crop as in the generated one. Absolute: each frame its own crop.
    box = lambda l, t: l[neutral] if relative else l[t]
    src_crop, src_uv = crop_face(src["image"], src["lm"], size, crop_scale)
    out = {}
    if drv["frames"] is not None:
        driver = [crop_face(np.asarray(f), box(lms, t), size, crop_scale)[0]
                  for t, f in zip(range(T), drv["frames"])]  # range first: zip stops before decoding more
        if len(driver) < T:
            print(f"note: {len(driver)} driver frames for {T} landmark sets; using the first {len(driver)}")
            T = len(driver)
        out["driver"] = out["reference"] = np.stack(driver)
        out["reference_name"] = "driver"
    cond = condition(src_uv, lms, size, crop_scale, relative, neutral)[:T]
    out["source"] = np.repeat(src_crop[None], T, 0)
    out["landmarks"] = np.concatenate([to_uint8(heatmap_picture(torch.as_tensor(cond[i:i + 64]), size,
                                                                         a["sigma"], a["window"]))
                                       for i in range(0, T, 64)])
    out["generated"] = generate(G, cfg, out["source"], cond, np.repeat(src_uv[None], T, 0), label="reenact")
    if src.get("identity") and drv["motion"]:  # synthetic: the source identity really doing the motion
        truth = [synthetic.render_face(src["identity"], p, e) for p, e in drv["motion"][:T]]
        gt_lms = np.stack([lm for _, lm in truth])
        out["reference"] = np.stack([crop_face(im, box(gt_lms, t), size, crop_scale)[0]
                                     for t, (im, _) in enumerate(truth)])
        out["reference_name"] = "ground truth"
    return out


def write_video(path, frames, fps):
    """An .mp4 (H.264) or .gif, written whole or not at all (writing)."""
    with writing(path) as tmp:
        if path.lower().endswith(".gif"):  # Pillow's GIF writer takes milliseconds per frame
            imageio.v3.imwrite(tmp, frames, duration=1000 / fps, loop=0)
            return
        with imageio.v2.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                   ffmpeg_log_level="error") as video:
            for f in frames:
                video.append_data(f)


def make_video(args):
    """`facesynth.py reenact`: the video of the source face driven by the driver's landmarks (`args`: the
    command's options as a dict), its panels side by side, and its flicker. Returns a summary dict."""
    if os.path.splitext(args["out"])[1].lower() not in (".mp4", ".gif"):
        raise DataError(f"{args['out']}: the output must be a .mp4 or .gif")
    writable(args["out"]), writable(args["frames_dir"] or ".", folder=True)  # before any computing
    G, run = load_generator(args["ckpt"], pick_device(args["device"]))
    root, crop_scale = run["args"].get("data"), CROP_SCALE
    if root and os.path.isfile(os.path.join(root, "prepare.json")):  # crop as the training set was cropped
        crop_scale = read_prepared(root).get("crop_scale", crop_scale)
    src, drv = load_face(args["source"], args["source_pts"]), load_driver(args["driver"], args["frames"])
    relative = not args["absolute"] and (args["relative"] or src["who"] != drv["who"])
    T = len(drv["lms"])
    if "no_face" in drv:  # a plain video, landmarks detected
        print(f"{args['driver']}: no face found in {drv['no_face']} of {T} frames "
              "(they keep the last landmarks)"
              if drv["no_face"] else f"{args['driver']}: a face found in all {T} frames")
    if not 0 <= args["neutral"] < T:
        raise DataError(f"{args['driver']}: --neutral {args['neutral']} is not one of its {T} frames")
    p = drive(G, run, src, drv, relative, args["neutral"], crop_scale)
    names = [k for k in PANELS if k in p]
    heads = [PANELS[k] for k in names]
    zoom = args["zoom"] or max(1, REENACT_HEIGHT // run["args"]["size"])  # 64-px panels are too small to see
    video = np.concatenate([p[k] for k in names], axis=2).repeat(zoom, 1).repeat(zoom, 2)
    strip = label_strip(heads, run["args"]["size"] * zoom)  # every frame says what its panels are
    video = np.concatenate([np.broadcast_to(strip, (len(video), *strip.shape)), video], axis=1)
    write_video(args["out"], video, args["fps"])
    if args["frames_dir"]:
        os.makedirs(args["frames_dir"], exist_ok=True)
        for t, f in enumerate(video):
            write_png(os.path.join(args["frames_dir"], f"{t:05d}.png"), f)
    mode, gen = "relative" if relative else "absolute", p["generated"]
    out = {"out": args["out"], "frames": len(gen), "mode": mode, "flicker": flicker(gen),
           "no_face": drv.get("no_face")}
    print(f"wrote {args['out']} ({len(gen)} frames, {mode} retargeting; panels: {' | '.join(heads)})"
          + (f", PNGs in {args['frames_dir']}/" if args["frames_dir"] else ""))
    vs = ""
    if "reference" in p:
        out["flicker_ref"] = flicker(p["reference"])
        out["flicker_ratio"] = out["flicker"] / out["flicker_ref"] if out["flicker_ref"] else math.nan
        vs = (f", {p['reference_name']} {out['flicker_ref']:.2f}, ratio {out['flicker_ratio']:.2f} "
              f"(1 = as steady as the {p['reference_name']})")
    print(f"flicker (mean |frame-to-frame change| of 255): generated {out['flicker']:.2f}{vs}")
    return out


def add_options(p):
    """`facesynth.py reenact`'s options: the formats a FACE and a DRIVER may come in."""
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
                      help="the driver's landmarks as they are (the paper's setting; "
                           "default for the same person)")
    mode.add_argument("--relative", action="store_true",
                      help="the source's landmarks moved by the driver's motion "
                           "(default for different people)")
    p.add_argument("--neutral", type=number(int, 0), default=0,
                   help="driver frame whose expression is the source's (relative)")
    p.add_argument("--frames", type=number(), help=f"use the first N driver frames (synthetic: default "
                   f"{REENACT_FRAMES})")
    p.add_argument("--fps", type=number(float, 0, above=True), default=REENACT_FPS, help="of the video")
    p.add_argument("--zoom", type=number(high=REENACT_ZOOM_MAX),
                   help=f"enlarge the panels K times, nearest neighbour (default: "
                   f"to about {REENACT_HEIGHT} px high)")
    p.add_argument("--frames-dir", help="also write every frame as a PNG into this folder")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
