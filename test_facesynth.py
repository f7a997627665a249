"""facesynth's tests: run with `python -m pytest -q test_facesynth.py` (small images, tiny models)."""
import argparse
import base64
import concurrent.futures
import contextlib
import copy
import csv
import functools
import importlib.util
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

from PIL import Image
import imageio
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# 300VW .pts files, the crop, prepare
import data
import evaluate
import extras.ablation
import extras.augment
import extras.cli
import extras.landmarks
import extras.play
import extras.reenact
import extras.speed
import extras.runs
import extras.synthetic
import extras.yardsticks
import facesynth
import losses
import networks

torch.set_num_threads(1)  # tiny tensors: one thread is faster, and 2 cores are shared with DDP's 2 ranks
# The paper's weights, written out once: L_G = L_adv + 10 L_pix + 100 L_self + 100 L_triple + 10 L_pp + 1 L_id
PAPER_LAMBDAS = {"adv": 1, "pix": 10, "self": 100, "triple": 100, "pp": 10, "id": 1}


# ================================================================================================
# data: .pts files, the crop, prepare (300VW layout)
# ================================================================================================
H, W, T = 96, 128, 8


SPOT = (61, 40)  # 0-based pixel (x, y) of a white 3x3 blob; landmark 30 (nose tip) sits on it


def face_points():
    """68 points spread over a 40 x 36 px face centred near the blob (the exact shape is irrelevant)."""
    a = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    pts = np.stack([SPOT[0] + 20 * np.cos(a), SPOT[1] + 18 * np.sin(a)], 1).astype(np.float32)
    pts[30] = SPOT
    return pts


def make_video(root, name, n_frames=T, n_pts=T, vid=True, annot=True):
    """A 300VW-layout video: a gradient background, the blob at SPOT; .pts are 1-based."""
    d = root / name
    os.makedirs(d / "annot" if annot else d)
    if vid:
        frame = np.zeros((H, W, 3), np.uint8)
        frame[..., 2] = np.linspace(0, 120, W, dtype=np.uint8)
        frame[SPOT[1] - 1:SPOT[1] + 2, SPOT[0] - 1:SPOT[0] + 2] = 255
        imageio.mimwrite(d / "vid.avi", [frame] * n_frames, fps=10, codec="mpeg4", macro_block_size=16)
    for i in range(n_pts if annot else 0):
        extras.synthetic.write_pts(d / "annot" / f"{i + 1:06d}.pts", face_points())
    return d


def test_pts_roundtrip_and_quirks(tmp_path):
    pts = face_points()
    extras.synthetic.write_pts(tmp_path / "a.pts", pts)
    np.testing.assert_allclose(data.read_pts(tmp_path / "a.pts"), pts, atol=1e-3)
    text = (tmp_path / "a.pts").read_text()
    assert f"{SPOT[0] + 1:.3f} {SPOT[1] + 1:.3f}" in text  # the file itself is 1-based
    (tmp_path / "b.pts").write_bytes(text.replace("\n", "  \r\n\r\n").encode())  # CRLF, blanks, spaces
    np.testing.assert_allclose(data.read_pts(tmp_path / "b.pts"), pts, atol=1e-3)


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("n_points:  68", "n_points:  66"), "n_points 66"),
    (lambda t: t.replace("{\n", ""), "missing"),
    (lambda t: t.replace("62.000 41.000", "62.000 abc"), "bad point line"),
    (lambda t: t.replace("62.000 41.000", "62.000 nan"), "NaN"),
    (lambda t: "\n".join(t.split("\n")[:-4] + ["}", ""]), "point lines"),
    (lambda t: " \r\n", "empty file"),
])
def test_pts_malformed(tmp_path, edit, problem):
    extras.synthetic.write_pts(tmp_path / "a.pts", face_points())
    (tmp_path / "a.pts").write_text(edit((tmp_path / "a.pts").read_text()))
    with pytest.raises(data.DataError, match=problem) as e:
        data.read_pts(tmp_path / "a.pts")
    assert str(tmp_path / "a.pts") in str(e.value)


def test_crop_box_and_exact_pixel_mapping():
    pts = np.array([[10, 20], [41, 30]] * 34, np.float32)  # bbox 31 x 10 px, centre (25.5, 25)
    x0, y0, side = data.crop_box(pts, 2.0)
    assert side == 62 and (x0, y0) == (26 - 31, 25.5 - 31)  # centred in pixel-edge coordinates
    # side == size and an integer x0 -> the crop is an exact shift: check pixel and landmark agree.
    pts = np.array([[10, 10], [41, 41]] * 34, np.float32)
    pts[5] = (13, 37)
    frame = np.zeros((60, 70, 3), np.uint8)
    frame[37, 13] = 255
    x0, y0, side = data.crop_box(pts, 2.0)
    assert side == 62 and (x0, y0) == (-5, -5)
    crop, uv = data.crop_face(frame, pts, size=62, crop_scale=2.0)
    assert crop.dtype == np.uint8 and crop.shape == (62, 62, 3) and uv.dtype == np.float32
    np.testing.assert_allclose(uv[5], (18, 42))  # 0-based + 0.5 - x0, then - 0.5
    assert crop[42, 18, 0] == 255 and crop[..., 0].sum() == 255
    # Downscale by 2: the 2x2 block with centre (13.5, 37.5) fills exactly output pixel (9, 21).
    frame[:] = 0
    frame[37:39, 13:15] = 255
    pts[6] = (13.5, 37.5)
    crop, uv = data.crop_face(frame, pts, size=31, crop_scale=2.0)
    np.testing.assert_allclose(uv[6], (9, 21))
    assert np.unravel_index(crop[..., 0].argmax(), crop.shape[:2]) == (21, 9) and crop[21, 9, 0] > 128


def test_crop_pads_by_replicating_edges():
    frame = np.full((40, 40, 3), 200, np.uint8)
    pts = np.array([[0, 0], [20, 20]] * 34, np.float32)  # box reaches 20 px outside the frame
    crop, _ = data.crop_face(frame, pts, size=16, crop_scale=3.0)
    assert (crop == 200).all()  # edge replicate: no black border


def test_prepare_good_faulty_and_rerun(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    make_video(src, "001")                     # official train
    make_video(src, "114", n_frames=T + 4)     # official test1, more frames than .pts
    make_video(src, "777", n_pts=T + 3)        # not in the official split; fewer frames than .pts
    make_video(src, "002", vid=False)
    (src / "002" / "vid.avi").write_bytes(b"not a video" * 50)
    make_video(src, "003", annot=False)
    for name, old, new in [("004", "n_points:  68", "n_points:  67"), ("007", "62.000 41.000", "x y"),
                           ("009", "62.000 41.000", "nan 41.000")]:
        p = make_video(src, name) / "annot" / "000003.pts"
        p.write_text(p.read_text().replace(old, new))
    logs = []
    s = data.prepare(src, out, size=64, workers=2, log=logs.append)
    assert s["prepared"] == 3 and s["existing"] == 0 and s["frames"] == 3 * T
    assert sorted(s["skipped_names"]) == ["002", "003", "004", "007", "009"]
    text = "\n".join(logs)
    for expect in ["skip 002: " + str(src / "002" / "vid.avi") + ": cannot decode",
                   "skip 003: " + str(src / "003" / "annot") + ": missing",
                   "skip 004: " + str(src / "004" / "annot" / "000003.pts") + ": n_points 67",
                   "skip 007: " + str(src / "007" / "annot" / "000003.pts") + ": bad point line",
                   "skip 009: " + str(src / "009" / "annot" / "000003.pts") + ": NaN",
                   "more frames than the 8", "has 8 frames for 11 .pts"]:
        assert expect in text
    assert sum(l.startswith("skip") for l in logs) == 5
    assert sorted(os.listdir(out)) == ["001", "114", "777", "prepare.json", "split.json"]
    split = json.loads((out / "split.json").read_text())
    assert split == {"train": ["001", "777"], "test1": ["114"], "test2": [], "test3": []}
    assert json.loads((out / "prepare.json").read_text())["synthetic"] is False
    frames, marks = np.load(out / "001" / "frames.npy"), np.load(out / "001" / "landmarks.npy")
    assert frames.dtype == np.uint8 and frames.shape == (T, 64, 64, 3)
    assert marks.dtype == np.float32 and marks.shape == (T, 68, 2)
    # The landmark on the blob (1-based in the file) lands on the blob in the crop: face_points' box is
    # 40 x 36 px around SPOT, so the 1.8 x 40 = 72-px square is centred on it: SPOT -> (63 / 2, 63 / 2).
    u = v = 31.5
    np.testing.assert_allclose(marks[:, 30], np.tile([u, v], (T, 1)), atol=1e-4)
    for f in frames:
        y, x = np.unravel_index(f.astype(int).sum(-1).argmax(), (64, 64))
        assert abs(x - u) <= 1 and abs(y - v) <= 1

    # Re-run: finished videos are skipped, a half-written or interrupted one is redone.
    os.remove(out / "114" / "landmarks.npy")
    os.rename(out / "777", out / ".777.tmp")  # as if killed before the final rename
    (out / ".777.tmp" / "frames.npy").write_bytes(b"half")
    mtime = os.path.getmtime(out / "001" / "frames.npy")
    s = data.prepare(src, out, size=64, workers=1, log=logs.append)
    assert (s["prepared"], s["existing"], s["skipped"], s["frames"]) == (2, 1, 5, 3 * T)
    assert os.path.getmtime(out / "001" / "frames.npy") == mtime
    assert np.load(out / "114" / "landmarks.npy").shape == (T, 68, 2)
    assert np.load(out / "777" / "frames.npy").shape == (T, 64, 64, 3) and not (out / ".777.tmp").exists()
    with pytest.raises(data.DataError, match="prepare.json"):
        data.prepare(src, out, size=32, workers=1, log=logs.append)


def test_prepare_split_file_and_params(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    make_video(src, "001", n_frames=4, n_pts=4)
    make_video(src, "002", n_frames=5, n_pts=5)
    (src / "001" / "params.json").write_text('{"identity": {}, "frames": []}')
    (src / "split.json").write_text(json.dumps({"train": ["001"], "test2": ["002"]}))
    os.remove(src / "002" / "annot" / "000004.pts")  # a gap: later files must not shift onto earlier frames
    logs = []
    s = data.prepare(src, out, workers=1, log=logs.append)
    assert s["prepared"] == 2 and s["frames"] == 4 + 3 and (out / "001" / "params.json").exists()
    assert any("expected 000004.pts, found 000005.pts; using the first 3" in m for m in logs)
    assert json.loads((out / "split.json").read_text())["test2"] == ["002"]
    assert json.loads((out / "prepare.json").read_text())["synthetic"] is True
    (tmp_path / "my.json").write_text(json.dumps({"test3": ["001", "002"]}))
    data.prepare(src, out, workers=1, split_file=tmp_path / "my.json", log=lambda m: None)
    assert json.loads((out / "split.json").read_text())["test3"] == ["001", "002"]
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(data.DataError, match="bad.json"):
        data.prepare(src, out, workers=1, split_file=tmp_path / "bad.json", log=lambda m: None)


def numbered_face(vid):
    """A plain video's landmark reader for prepare, as extras/landmarks.py's: a face box in the middle of
    every frame, none in frame 3."""
    T = data.frame_count(vid)
    lms = np.tile(np.stack(np.meshgrid(np.linspace(40, 88, 17), np.linspace(30, 66, 4)), -1).reshape(68, 2), (T, 1, 1))
    found = np.arange(T) != 3
    return lms.astype(np.float32), found, []


def test_a_single_plain_video_holds_out_its_last_fifth_of_frames(tmp_path):
    """Frame t of the GIF is flat grey 10 t + 5, so every prepared crop says which frame it came from. 15
    frames: the last round(0.2 x 15) = 3 (12, 13, 14) are clip-tail in test1, frames 0-11 but 3 (no face)
    are clip in train; no frame is in both."""
    src, out, logs = tmp_path / "one", tmp_path / "prep", []
    os.makedirs(src)
    frames = [np.full((96, 128, 3), 10 * t + 5, np.uint8) for t in range(15)]
    imageio.v3.imwrite(src / "clip.gif", frames, duration=40, loop=0)
    data.prepare(str(src), str(out), size=32, workers=1, log=logs.append, videos={"clip": "clip.gif"},
                 landmarks=numbered_face)
    which = lambda name: sorted({(int(f.mean()) - 5) // 10 for f in np.load(out / name / "frames.npy")})
    assert which("clip") == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11] and which("clip-tail") == [12, 13, 14]
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == ["clip"] and split["test1"] == ["clip-tail"]
    assert "split: no --split-file; the last 20% of each plain video's frames held out as test1 (clip-tail), " \
           "the rest is train" in logs
    # asked for by name instead: the one video is all train; a folder prepared one way refuses the other
    with pytest.raises(data.DataError, match="hold-out tail, not 64, 1.8, name; use another output folder"):
        data.prepare(str(src), str(out), size=64, workers=1, videos={"clip": "clip.gif"}, landmarks=numbered_face,
                     hold_out="name", log=logs.append)
    with pytest.raises(data.DataError, match="--hold-out tail --split-file s.json: the split file says"):
        data.prepare(str(src), str(out), split_file="s.json", hold_out="tail")


def test_prepare_skips_wild_short_and_unnumbered_videos_and_keeps_the_rest(tmp_path):
    """Each one is one skip line naming its file; the good video is prepared and split.json written."""
    src, out = tmp_path / "raw", tmp_path / "out"
    make_video(src, "001")
    wild = make_video(src, "002") / "annot" / "000003.pts"  # crop_face would allocate a 1e7 px window
    wild.write_text(wild.read_text().replace("62.000 41.000", "10000000.000 41.000"))
    make_video(src, "003", n_frames=2, n_pts=2)
    make_video(src, "004", n_frames=1, n_pts=5)
    os.remove(make_video(src, "005") / "annot" / "000001.pts")
    logs = []
    s = data.prepare(src, out, workers=1, log=logs.append)
    vid = lambda name: src / name / "vid.avi"
    assert sorted(l for l in logs if l.startswith("skip")) == [
        f"skip 002: {wild}: a landmark lies more than a frame size outside the 128x96 frames of {vid('002')}",
        f"skip 003: {vid('003')}: only 2 usable frame(s); a training triplet needs 3",
        f"skip 004: {vid('004')}: only 1 usable frame(s); a training triplet needs 3",
        f"skip 005: {src / '005' / 'annot' / '000001.pts'}: missing (the annotation of frame 1; the first .pts "
        f"is 000002.pts)"]
    assert (s["prepared"], s["skipped"], s["frames"]) == (1, 4, T)
    assert json.loads((out / "split.json").read_text())["train"] == ["001"]
    assert np.load(out / "001" / "frames.npy").shape == (T, 64, 64, 3)




@contextlib.contextmanager
def file_size_limit(n):
    """A real `ulimit -f`: writes past n bytes fail with EFBIG (Python ignores SIGXFSZ), as a full disk
    fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_while_preparing_is_one_line_and_leaves_no_half_video(tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "out"
    make_video(src, "001")
    make_video(src, "002")
    with file_size_limit(20_000), pytest.raises(SystemExit) as e:  # 8 crops of 64 x 64 x 3: 98 kB
        facesynth.main(["prepare", str(src), str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: {out / '001'}: cannot write (98304 requested and 19872 "
                                         "written: is the disk full?)\n")
    assert sorted(os.listdir(out)) == ["prepare.json"]  # no .001.tmp, no 001, no split.json
    facesynth.main(["prepare", str(src), str(out), "--workers", "1"])  # with room again: the whole set
    assert json.load(open(out / "split.json"))["train"] == ["001", "002"]


def test_a_prepare_rerun_redoes_a_damaged_video(tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "out"
    make_video(src, "001")
    facesynth.main(["prepare", str(src), str(out), "--workers", "1"])
    good = np.load(out / "001" / "frames.npy")
    with open(out / "001" / "frames.npy", "r+b") as f:
        f.truncate(1000)
    facesynth.main(["prepare", str(src), str(out), "--workers", "1"])
    assert "1 videos prepared, 0 already there" in capsys.readouterr().out
    assert np.array_equal(np.load(out / "001" / "frames.npy"), good)


# ================================================================================================
# data: the synthetic talking heads, as videos and straight into prepared arrays
# ================================================================================================
TINY_SYNTH = dict(n_videos=(2, 1, 1, 1), n_frames=6, size=128)


FRONT = dict(yaw=0.0, pitch=0.0, roll=0.0, tx=0.0, ty=0.0, scale=0.2)


NEUTRAL = dict(open=0.0, smile=0.0, brow=0.0, blink=0.0)


def _video(root, name):
    """Everything synth wrote for one video: params, raw .pts text, decoded frames."""
    pts = [open(os.path.join(root, name, "annot", f)).read() for f in sorted(os.listdir(os.path.join(root, name, "annot")))]
    frames = np.stack([f for f in imageio.get_reader(os.path.join(root, name, "vid.avi"), "ffmpeg")])
    return json.load(open(os.path.join(root, name, "params.json"))), pts, frames


def test_synth_is_deterministic_for_a_seed(tmp_path):
    a, b, c = (str(tmp_path / k) for k in "abc")
    extras.synthetic.synth(a, seed=0, workers=1, log=lambda *_: None, **TINY_SYNTH)
    extras.synthetic.synth(b, seed=0, workers=2, log=lambda *_: None, **TINY_SYNTH)  # parallel must not change anything
    extras.synthetic.synth(c, seed=1, workers=1, log=lambda *_: None, **TINY_SYNTH)
    for name in ("001", "005"):
        (pa, ta, fa), (pb, tb, fb), (pc, tc, _) = (_video(r, name) for r in (a, b, c))
        assert pa == pb and ta == tb and np.array_equal(fa, fb)
        assert pa != pc and ta != tc
        assert len(fa) == len(ta) == 6 and fa.shape[1:] == (128, 128, 3)
    assert not [d for d in os.listdir(a) if d.endswith(".tmp")]


def test_synth_layout_split_and_one_based_pts(tmp_path, monkeypatch):
    # Every frame frontal and centred (its expression changing): the face is mirror-symmetric about the
    # frame's middle, the column (64 - 1) / 2 = 31.5 in 0-based pixel centres, 32.5 in the 1-based .pts.
    frontal = lambda rng, n: [(dict(FRONT), dict(NEUTRAL, open=t / n, smile=0.5)) for t in range(n)]
    monkeypatch.setattr(extras.synthetic, "talking_motion", frontal)
    out = str(tmp_path / "raw")
    split = extras.synthetic.synth(out, n_videos=(3, 2, 1, 1), n_frames=3, size=64, workers=1, log=lambda *_: None)
    assert split == json.load(open(os.path.join(out, "split.json")))
    assert [len(split[k]) for k in ("train", "test1", "test2", "test3")] == [3, 2, 1, 1]
    names = sum(split.values(), [])
    assert names == [f"{i:03d}" for i in range(1, 8)]
    identities = [json.dumps(json.load(open(os.path.join(out, n, "params.json")))["identity"]) for n in names]
    assert len(set(identities)) == len(names)  # every test identity is unseen in training
    m = ibug_mirror()
    for name in ("002", "006"):
        for t in range(3):
            text = open(os.path.join(out, name, "annot", f"{t + 1:06d}.pts")).read()
            x, y = np.array(text.split("{")[1].split("}")[0].split(), float).reshape(68, 2).T
            np.testing.assert_allclose(x + x[m], 2 * 32.5, atol=2e-3)  # pairs: equally far either side
            np.testing.assert_allclose(x[27:31], 32.5, atol=1e-3)    # the nose bridge on the middle column
            np.testing.assert_allclose(y, y[m], atol=1e-3)
            assert x.min() > 1 and y.min() > 1 and x.max() < 64 and y.max() < 64  # 1-based, in the frame
    # a re-run keeps finished videos and renders only the missing one
    os.remove(os.path.join(out, "003", "params.json"))
    shutil.rmtree(os.path.join(out, "004"))
    extras.synthetic.synth(out, n_videos=(3, 2, 1, 1), n_frames=3, size=64, workers=1, log=lambda *_: None)
    assert os.path.isfile(os.path.join(out, "004", "params.json"))
    assert not os.path.isfile(os.path.join(out, "003", "params.json"))


def test_render_face_draws_at_its_landmarks():
    identity = extras.synthetic.random_identity(np.random.default_rng(0))
    identity.update(iris=[0, 255, 0], glasses=None, beard=None)
    for pose in (FRONT, dict(FRONT, yaw=25.0, pitch=-10.0, roll=12.0, tx=0.1, ty=-0.05)):
        img, lm = extras.synthetic.render_face(identity, pose, NEUTRAL, 256)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and lm.shape == (68, 2)
        at = lambda p: img[int(round(p[1])), int(round(p[0]))].astype(int)
        for o, i in ((36, 39), (45, 42)):  # outer corner, inner corner of each eye
            assert np.abs(at(lm[o] + 0.25 * (lm[i] - lm[o])) - (238, 236, 230)).max() < 40  # eye white
            c, r = (lm[o] + lm[i]) / 2, 0.075 * (1 + identity["shape"]["eye_size"]) * pose["scale"] * 256
            side = (lm[i] - lm[o]) / np.linalg.norm(lm[i] - lm[o])
            assert np.abs(at(c + 0.7 * r * side) - (0, 255, 0)).max() < 60  # iris around the eye centre
        assert np.abs(at(lm[[48, 54]].mean(0) + (lm[57] - lm[51]) * 0.4) - identity["lips"]).max() < 40
    # blinking closes the eye: skin where the white was; an open mouth shows its dark inside
    img, lm = extras.synthetic.render_face(identity, FRONT, dict(NEUTRAL, blink=1.0, open=1.0), 256)
    p = lm[36] + 0.25 * (lm[39] - lm[36])
    assert np.abs(img[int(round(p[1])), int(round(p[0]))].astype(int) - identity["skin"]).max() < 40
    p = lm[62] + 0.8 * (lm[66] - lm[62])
    assert np.abs(img[int(round(p[1])), int(round(p[0]))].astype(int) - (70, 25, 30)).max() < 40


def test_identity_attributes_toggle():
    rng = np.random.default_rng(3)
    identity = dict(extras.synthetic.random_identity(rng), glasses={"colour": [0, 0, 0], "roundness": 1.0, "width": 0.04})
    pose, expression = extras.synthetic.talking_motion(rng, 1)[0]
    with_glasses, lm = extras.synthetic.render_face(identity, pose, expression, 128)
    without, lm2 = extras.synthetic.render_face(dict(identity, glasses=None), pose, expression, 128)
    assert np.array_equal(lm, lm2) and not np.array_equal(with_glasses, without)


def test_talking_motion_ranges_and_smoothness():
    rng = np.random.default_rng(7)
    motion = extras.synthetic.talking_motion(rng, 2000)
    json.dumps(motion)
    pose = {k: np.array([p[k] for p, _ in motion]) for k in motion[0][0]}
    expr = {k: np.array([e[k] for _, e in motion]) for k in motion[0][1]}
    for k, m in {"yaw": 30.0, "pitch": 15.0, "roll": 15.0}.items():  # degrees: the talking-head range
        assert np.abs(pose[k]).max() <= m and np.abs(pose[k]).max() > 0.3 * m
        assert np.abs(np.diff(pose[k])).max() < 3  # degrees per frame: smooth
    assert pose["scale"].min() > 0
    for k, v in expr.items():
        assert v.min() >= 0 and v.max() <= 1 and v.max() > 0.2, k
    assert (expr["blink"] == 1).sum() >= 10  # ~ a blink every few seconds
    assert np.mean(expr["open"] > 0.1) > 0.2  # the mouth moves with speech


def test_ensure_synthetic_builds_once_then_reuses(tmp_path, monkeypatch):
    tiny = dict(n_frames=3, n_videos=(2, 1, 1, 1), raw_size=96, size=32, workers=1, log=lambda *_: None)
    root = extras.synthetic.ensure_synthetic(str(tmp_path / "cache"), **tiny)
    split = json.load(open(os.path.join(root, "split.json")))
    assert [len(split[k]) for k in ("train", "test1", "test2", "test3")] == [2, 1, 1, 1]
    assert os.path.isfile(os.path.join(root, "001", "params.json"))
    monkeypatch.setattr(extras.synthetic, "_synth_prepared", lambda *a, **k: pytest.fail("regenerated a cached set"))
    assert extras.synthetic.ensure_synthetic(str(tmp_path / "cache"), **tiny) == root
    # an interrupted build (no split.json yet) is resumed: only the missing video is rendered
    os.remove(os.path.join(root, "split.json"))
    shutil.rmtree(os.path.join(root, "004"))
    rendered = []
    monkeypatch.setattr(extras.synthetic, "_synth_prepared", lambda job: rendered.append(job[1]) or 0)
    extras.synthetic.ensure_synthetic(str(tmp_path / "cache"), **tiny)
    assert rendered == [3] and json.load(open(os.path.join(root, "split.json"))) == split


def test_a_full_disk_while_building_the_synthetic_set_is_one_line(tmp_path):
    tiny = dict(n_frames=3, n_videos=(2, 1, 1, 1), raw_size=96, size=32, workers=1, log=lambda *_: None)
    with file_size_limit(4096), pytest.raises(data.WriteError) as e:  # 3 crops of 32 x 32 x 3: 9 kB
        extras.synthetic.ensure_synthetic(str(tmp_path / "cache"), **tiny)
    prepared = tmp_path / "cache" / "prepared"
    assert str(e.value).startswith(f"{prepared / '001'}: cannot write (")
    assert sorted(os.listdir(prepared)) == ["prepare.json"]  # no .001.tmp, no split.json


def test_ensure_synthetic_needs_no_ffmpeg_and_matches_synth_then_prepare(tmp_path, monkeypatch):
    """The GPU machines have no imageio-ffmpeg: the default set is rendered straight into the prepared
    layout. It must be the set that synth (300VW-layout videos) + prepare make, less the video coding."""
    with monkeypatch.context() as m:  # importing either would fail now
        m.setitem(sys.modules, "imageio_ffmpeg", None)
        m.setitem(sys.modules, "imageio", None)
        direct = extras.synthetic.ensure_synthetic(str(tmp_path / "cache"), seed=2, n_frames=4, n_videos=(2, 1, 1, 1), raw_size=96,
                                       size=32, workers=2, log=lambda *_: None)
    extras.synthetic.synth(str(tmp_path / "raw"), seed=2, n_frames=4, n_videos=(2, 1, 1, 1), size=96, workers=1, log=lambda *_: None)
    data.prepare(str(tmp_path / "raw"), str(tmp_path / "prep"), size=32, workers=1, log=lambda *_: None)
    via = str(tmp_path / "prep")
    assert json.load(open(os.path.join(direct, "prepare.json"))) == {
        "size": 32, "crop_scale": data.CROP_SCALE, "source": "synthetic, seed 2", "synthetic": True, "raw_size": 96}
    assert json.load(open(os.path.join(direct, "split.json"))) == json.load(open(os.path.join(via, "split.json")))
    for name in ("001", "005"):
        load = lambda root, f: np.load(os.path.join(root, name, f))
        assert json.load(open(os.path.join(direct, name, "params.json"))) == json.load(open(os.path.join(via, name, "params.json")))
        assert np.abs(load(direct, "landmarks.npy") - load(via, "landmarks.npy")).max() < 2e-3  # .pts keep 3 decimals
        frames = load(direct, "frames.npy").astype(int)
        assert frames.shape == (4, 32, 32, 3) and np.abs(frames - load(via, "frames.npy")).mean() < 4  # x264's loss
    # and frame by frame: the landmarks of the frame re-rendered from params.json, mapped into the crop by
    # hand (a square of 1.8 x the landmarks' larger extent around their box's centre, resized to 32 px)
    params = json.load(open(os.path.join(direct, "002", "params.json")))
    frames, lms = np.load(os.path.join(direct, "002", "frames.npy")), np.load(os.path.join(direct, "002", "landmarks.npy"))
    for t, f in enumerate(params["frames"]):
        img, lm = extras.synthetic.render_face(params["identity"], f["pose"], f["expression"], 96)
        side = 1.8 * (lm.max(0) - lm.min(0)).max()
        corner = (lm.max(0) + lm.min(0)) / 2 - side / 2  # the square's top-left, where pixel i's centre is at i
        assert np.allclose(lms[t], (lm - corner) * 32 / side - 0.5, atol=1e-3)  # crop pixel u's centre: u + 0.5 in
        assert np.abs(frames[t].astype(int) - data.crop_face(img, lm, 32)[0]).max() <= 1




# ================================================================================================
# data: heatmaps, the iBUG-68 mirror, triplets flipped as one (expected values: the iBUG-68 definition, by hand)
# ================================================================================================
@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """A prepared dataset of 32-px frames with a bright dot on each landmark."""
    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    for v in range(3):
        lm = (rng.random((8, 68, 2)) * 24 + 4).astype(np.float32)
        frames = np.full((8, 32, 32, 3), 40, np.uint8)
        for t in range(8):
            frames[t, lm[t, :, 1].round().astype(int), lm[t, :, 0].round().astype(int)] = (250, 200, 120)
        os.makedirs(root / f"{v:03d}")
        np.save(root / f"{v:03d}" / "frames.npy", frames)
        np.save(root / f"{v:03d}" / "landmarks.npy", lm)
    (root / "split.json").write_text(json.dumps({"train": ["000", "001"], "test1": ["002"]}))
    (root / "prepare.json").write_text(json.dumps({"size": 32, "crop_scale": 1.8, "synthetic": False}))
    return str(root)


def ibug_mirror():
    """iBUG-68's left/right pairs written from the point definitions (1-based, as iBUG numbers them),
    returned 0-based as a list: after a horizontal flip, point i takes the role of point mirror[i]."""
    pairs = [(i, 18 - i) for i in range(1, 9)]                       # jaw: 1<->17 ... 8<->10 (9 = chin)
    pairs += [(18 + i, 27 - i) for i in range(5)]                    # brows: 18..22 <-> 27..23
    pairs += [(32, 36), (33, 35)]                                    # nostrils (34 = centre)
    pairs += [(37, 46), (38, 45), (39, 44), (40, 43), (41, 48), (42, 47)]  # eyes: outer 37<->46, inner 40<->43
    pairs += [(49, 55), (50, 54), (51, 53), (56, 60), (57, 59)]      # outer lips: corners 49<->55 (52, 58 centre)
    pairs += [(61, 65), (62, 64), (66, 68)]                          # inner lips: corners 61<->65 (63, 67 centre)
    mirror = list(range(68))                                         # unpaired points (chin, nose bridge 28-31, ...) stay
    for a, b in pairs:
        mirror[a - 1], mirror[b - 1] = b - 1, a - 1
    return mirror


def test_ibug_mirror_pairs():
    m = ibug_mirror()
    assert sorted(m) == list(range(68)) and all(m[m[i]] == i for i in range(68))  # a permutation, an involution
    assert list(data.MIRROR) == m
    # the issue's named examples, 1-based: jaw 1<->17, eye corners 37<->46, mouth corners 49<->55
    for a, b in ((1, 17), (37, 46), (49, 55)):
        assert data.MIRROR[a - 1] == b - 1 and data.MIRROR[b - 1] == a - 1
    assert [data.MIRROR[i] for i in range(27, 31)] == [27, 28, 29, 30]  # nose bridge (28-31) on the midline


def test_mirror_landmarks_geometry_and_order():
    g = torch.Generator().manual_seed(0)
    lm = torch.rand(2, 68, 2, generator=g) * 30
    got = data.mirror_landmarks(lm.clone(), S)
    m = ibug_mirror()
    for k in range(68):  # pixel centres: x' = S - 1 - x (column 0 <-> column S-1), y unchanged
        torch.testing.assert_close(got[:, k, 0], S - 1 - lm[:, m[k], 0])
        torch.testing.assert_close(got[:, k, 1], lm[:, m[k], 1])
    one = torch.zeros(1, 68, 2)
    one[0, 36] = torch.tensor([5.0, 9.0])  # right eye's outer corner at column 5 of a 32-px image
    assert data.mirror_landmarks(one, 32)[0, 45].tolist() == [26.0, 9.0]  # becomes the left eye's, at 31 - 5


def test_heatmap_values_at_known_points():
    # defaults: the paper's "applied over 7 pixels"; sigma = 1 px is the reading the code documents
    assert data.WINDOW == 7 and data.SIGMA == 1.0
    lm = torch.full((2, 68, 2), 100.0)  # far outside: must draw nothing
    lm[0, 0] = torch.tensor([5.0, 2.0])    # x = 5 (column), y = 2 (row)
    lm[0, 1] = torch.tensor([9.25, 6.75])  # off the pixel grid; nearest pixel (9, 7)
    lm[1, 0] = torch.tensor([3.0, 8.0])
    h = data.heatmaps(lm, 12)
    assert h.shape == (2, 68, 12, 12)
    e = math.exp
    # h[b, k, row = y, column = x]; peak exactly 1 at the landmark, exp(-d^2 / 2) around it (sigma 1)
    assert h[0, 0, 2, 5] == pytest.approx(1.0)
    assert h[0, 0, 5, 2] == pytest.approx(e(-9.0))  # (y, x) = (5, 2) is 3 px off in both: not the peak
    assert h[0, 0, 2, 6] == pytest.approx(e(-0.5)) and h[0, 0, 3, 5] == pytest.approx(e(-0.5))
    assert h[0, 0, 3, 6] == pytest.approx(e(-1.0))
    assert h[0, 0, 2, 8] == pytest.approx(e(-4.5)) and h[0, 0, 5, 5] == pytest.approx(e(-4.5))  # 3 px: inside the 7-px window
    assert h[0, 0, 2, 9] == 0 and h[0, 0, 2, 1] == 0 and h[0, 0, 6, 5] == 0                     # 4 px: outside it
    assert h[1, 0, 8, 3] == pytest.approx(1.0) and h[1, 0, 3, 8] == 0  # (x, y) = (3, 8) is row 8, column 3
    assert h[1, 0].argmax() == 8 * 12 + 3
    assert h[0, 1, 7, 9] == pytest.approx(e(-(0.25 ** 2 + 0.25 ** 2) / 2))
    assert h[0, 1, 7, 12 - 1] == pytest.approx(e(-(1.75 ** 2 + 0.25 ** 2) / 2))
    assert h[0, 1, 7, 6] == pytest.approx(e(-(3.25 ** 2 + 0.25 ** 2) / 2))  # window: columns 9 +- 3
    assert h[0, 1, 7, 5] == 0 and h[0, 1, 3, 9] == 0 and h[0, 1, 10, 9] > 0
    assert h[:, 2:].abs().sum() == 0 and h[1, 1].abs().sum() == 0
    # sigma and window as given: sigma 2 -> exp(-d^2 / 8); window 3 -> only +-1 px
    h2 = data.heatmaps(lm, 12, sigma=2.0, window=3)
    assert h2[0, 0, 2, 5] == pytest.approx(1.0) and h2[0, 0, 2, 6] == pytest.approx(e(-1 / 8))
    assert h2[0, 0, 2, 7] == 0 and h2[0, 0, 4, 5] == 0


def _frame_index(videos):
    """Every frame as a to_tensor image, plain and mirrored with numpy -> (video, frame, flipped)."""
    index = {}
    for v, vid in enumerate(videos):
        for t, frame in enumerate(np.asarray(vid["frames"])):
            for flipped, f in ((False, frame), (True, frame[:, ::-1])):
                index[data.to_tensor(np.ascontiguousarray(f)[None])[0].numpy().tobytes()] = (v, t, flipped)
    return index


def test_flip_moves_both_images_and_all_three_landmark_sets(blobs):
    videos = data.load_videos(blobs, "train")
    index, m = _frame_index(videos), ibug_mirror()
    args = {"batch_size": 8, "triplets_per_epoch": 16, "seed": 3, "max_gap": None}
    seen = set()
    for _, b in data.batches(videos, args, 0, 2):
        for i in range(8):
            v, s, f = index[b["I_s"][i].numpy().tobytes()]
            v2, t, f2 = index[b["I_t"][i].numpy().tobytes()]
            assert (v2, f2) == (v, f), "source and target must come from one video, flipped together"
            lms = videos[v]["landmarks"]
            want = lambda k: torch.from_numpy(np.stack([31 - lms[k][m, 0], lms[k][m, 1]], 1) if f else lms[k])
            torch.testing.assert_close(b["lm_s"][i], want(s))
            torch.testing.assert_close(b["lm_t"][i], want(t))
            mids = [k for k in range(len(lms)) if torch.allclose(b["lm_m"][i], want(k))]
            assert len(mids) == 1 and min(s, t) < mids[0] < max(s, t), "e_m: an in-between frame, flipped alike"
            # and the landmarks still sit on their dots in the (flipped) images
            for img, lm in ((b["I_s"][i], b["lm_s"][i]), (b["I_t"][i], b["lm_t"][i])):
                x, y = lm.round().long().T
                assert (img[0, y, x] > 0.9).all()
            seen.add(bool(f))
    assert seen == {False, True}


def test_triplets_swap_ends_half_the_time_and_respect_max_gap():
    """The docstring's promises, counted over many draws: every frame equally likely (a 9-frame video
    drawn 3x as often as a 3-frame one), source after target as often as before, the middle strictly
    between them, and with max_gap the source and target at most max_gap frames apart."""
    lengths = (3, 9)
    videos = [{"name": str(T), "landmarks": np.zeros((T, 68, 2), np.float32)} for T in lengths]
    n = 4000  # a share's standard deviation is 0.008: +-0.04 is 5 of them
    tri = data.sample_triplets(videos, n, seed=0, epoch=0)
    v, s, m, t, flip = tri.T
    assert np.mean(v == 1) == pytest.approx(9 / 12, abs=0.04)
    assert np.mean(s < t) == pytest.approx(0.5, abs=0.04) and np.mean(s > t) == pytest.approx(0.5, abs=0.04)
    assert ((np.minimum(s, t) < m) & (m < np.maximum(s, t))).all()
    assert np.mean(flip == 1) == pytest.approx(0.5, abs=0.04)
    long = [{"name": "long", "landmarks": np.zeros((20, 68, 2), np.float32)}]
    gaps = lambda max_gap: np.abs(np.subtract(*data.sample_triplets(long, n, 1, 0, max_gap)[:, [1, 3]].T))
    assert (gaps(2) == 2).all()  # three distinct frames within 2 of each other: the ends are 2 apart
    g = gaps(5)
    assert g.max() == 5 and g.min() == 2 and np.mean(g < 5) > 0.2
    assert gaps(None).max() == 19  # unlimited: the whole video
    s = data.sample_triplets(long, n, 1, 0)[:, 1]
    assert np.mean(s < 10) == pytest.approx(0.5, abs=0.04)  # a swapped pair, not only early sources




# ================================================================================================
# losses: each term and the weights against the paper and hand computations on tiny tensors
# ================================================================================================
def test_lambdas_are_the_papers_and_groups_its_three_ablations():
    assert losses.LAMBDAS == PAPER_LAMBDAS
    # ablations: -pix; -consistency (self + triple); -perceptual & identity (pp + id)
    assert {k: set(v) for k, v in losses.GROUPS.items()} == {
        "pix": {"pix"}, "consistency": {"self", "triple"}, "feature": {"pp", "id"}}
    assert losses.lambdas() == PAPER_LAMBDAS
    assert losses.lambdas(ablate=["consistency"]) == {**PAPER_LAMBDAS, "self": 0, "triple": 0}
    assert losses.lambdas(ablate=["feature"]) == {**PAPER_LAMBDAS, "pp": 0, "id": 0}
    assert losses.lambdas(ablate=["pix"]) == {**PAPER_LAMBDAS, "pix": 0}
    assert losses.lambdas({"self": 5, "pix": None}) == {**PAPER_LAMBDAS, "self": 5}
    with pytest.raises(ValueError, match="style"):
        losses.lambdas(ablate=["style"])
    with pytest.raises(ValueError, match="l1"):
        losses.lambdas({"l1": 1})


def test_generator_loss_weighs_each_term_by_hand():
    terms = {k: torch.tensor(float(v)) for k, v in dict(adv=1, pix=2, self=3, triple=4, pp=5, id=6).items()}
    # 1*1 + 10*2 + 100*3 + 100*4 + 10*5 + 1*6
    assert losses.generator_loss(terms, losses.lambdas()).item() == pytest.approx(777.0)
    terms["pp"] = torch.tensor(float("nan"))  # an ablated term is left out, not multiplied by 0
    assert losses.generator_loss(terms, losses.lambdas(ablate=["feature"])).item() == pytest.approx(721.0)


def test_squared_image_losses_by_hand():
    a = torch.tensor([[[[0.0, 1.0], [2.0, -3.0]]]])  # 1x1x2x2
    b = torch.zeros_like(a)
    # ||.||^2 as a per-element mean: (0 + 1 + 4 + 9) / 4 = 3.5 (an L1 would give 6 / 4 = 1.5)
    for L in (losses.L_pix, losses.L_self, losses.L_triple):
        assert L(a, b).item() == pytest.approx(3.5)
        assert L(b, a).item() == pytest.approx(3.5)
    # batch of 2: still a mean, (3.5 * 4 + 0 * 4) / 8
    assert losses.L_pix(torch.cat([a, b]), torch.cat([b, b])).item() == pytest.approx(1.75)
    # both branches of L_triple (and L_self, L_pix) carry gradient: d/dx mean((x - y)^2) = 2 (x - y) / N
    x, y = a.clone().requires_grad_(), torch.ones_like(a).requires_grad_()
    losses.L_triple(x, y).backward()
    torch.testing.assert_close(x.grad, 2 * (a - 1) / 4)
    torch.testing.assert_close(y.grad, -2 * (a - 1) / 4)


def test_gan_losses_by_hand():
    ln3, ln7 = math.log(3), math.log(7)
    # L_adv = -log D(I_hat): label 1 on the generated image; sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4
    assert losses.L_adv(torch.tensor([0.0, ln3])).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    # L_D: real -> label 1 (-log 3/4), generated -> label 0 (-log(1 - sigmoid(-ln 7)) = -log 7/8); the BCE
    # averaged over the real and the generated samples
    assert losses.L_D(torch.tensor([ln3]), torch.tensor([-ln7])).item() == pytest.approx(
        (math.log(4 / 3) + math.log(8 / 7)) / 2)
    assert losses.L_D(torch.tensor([ln3, 0.0]), torch.tensor([-ln7, -ln7])).item() == pytest.approx(
        ((math.log(4 / 3) + math.log(2)) / 2 + math.log(8 / 7)) / 2)
    # on logits: a confident verdict gives its exact loss, never log(0); -log sigmoid(-1e4) = 1e4
    assert losses.L_adv(torch.tensor([-1e4])).item() == pytest.approx(1e4)
    assert losses.L_adv(torch.tensor([30.0])).item() < 1e-12 and losses.L_D(torch.tensor([30.0]), torch.tensor([-30.0])).item() < 1e-12


# a 2x2 example, C = 2 channels: c0 = [[1, 2], [0, 1]], c1 = [[1, 0], [2, 1]]
# c0.c0 = 6, c1.c1 = 6, c0.c1 = 2; normalised by C*H*W = 8
F2 = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 1.0]]]])


GRAM2 = torch.tensor([[0.75, 0.25], [0.25, 0.75]])


def test_gram_by_hand_per_sample():
    torch.testing.assert_close(losses.gram(F2), GRAM2[None])
    g = losses.gram(torch.cat([F2, 2 * F2]))  # per sample: the second is 4x, no mixing of the batch
    torch.testing.assert_close(g, torch.stack([GRAM2, 4 * GRAM2]))


def feats(relu1_2, relu2_2, relu3_3, relu4_3, relu3_2):
    return {"relu1_2": relu1_2, "relu2_2": relu2_2, "relu3_3": relu3_3, "relu4_3": relu4_3, "relu3_2": relu3_2}


def test_perceptual_and_identity_losses_by_hand():
    # the paper's layers: content at relu1_2, relu2_2, relu3_3, relu4_3, style (Gram) at relu3_3
    assert tuple(losses.PP_LAYERS) == ("relu1_2", "relu2_2", "relu3_3", "relu4_3") and losses.GRAM_LAYER == "relu3_3"
    assert losses.ID_LAYER == "relu3_2"  # the paper's relu2_3 does not exist; the authors' code used relu3_2
    assert set(losses.VGG_LAYERS) == {"relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu3_2"}
    fake = feats(torch.full((1, 1, 2, 2), 0.5),                   # L1 0.5 (squared: 0.25)
                 torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]]),     # L1 1.0 (squared: 1.5)
                 F2,                                              # L1 1.0 (squared: 1.5), Gram GRAM2
                 torch.full((1, 1, 1, 1), 2.0),                   # L1 2.0 (squared: 4)
                 torch.full((1, 2, 2, 2), -3.0))                  # identity: L1 3.0
    real = {k: torch.zeros_like(v) for k, v in fake.items()}
    # content 0.5 + 1 + 1 + 2 = 4.5; style ||GRAM2 - 0||_F = sqrt(2 * 0.75^2 + 2 * 0.25^2) = sqrt(1.25)
    want = 4.5 + math.sqrt(1.25)
    assert losses.L_pp(fake, real).item() == pytest.approx(want)
    assert losses.L_pp(real, fake).item() == pytest.approx(want)
    assert losses.L_id(fake, real).item() == pytest.approx(3.0)
    # batch of 2, the second sample identical in both: every term is a mean over the batch, not a sum
    two = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in fake.items()}
    zero2 = {k: torch.zeros_like(v) for k, v in two.items()}
    assert losses.L_pp(two, zero2).item() == pytest.approx(want / 2)
    assert losses.L_id(two, zero2).item() == pytest.approx(1.5)




def test_feature_losses_have_finite_gradients_at_zero():
    f = {k: torch.rand(2, 4, 4, 4, requires_grad=True) for k in losses.VGG_LAYERS}
    (losses.L_pp(f, {k: v.detach() for k, v in f.items()}) + losses.L_id(f, f)).backward()
    assert all(torch.isfinite(v.grad).all() for v in f.values())




# ================================================================================================
# networks: G, D, the norm, VGG-19 against torchvision's layout
# ================================================================================================
WIDTHS = (4, 6, 8, 8, 8)  # a tiny VGG-19: torchvision's keys and layout, small channel counts


S = 32


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, S, S, generator=g) * 2 - 1, torch.rand(b, 68, S, S, generator=g)


# torchvision's vgg19 state dict, written out: features.N for the 16 convs, per block (the max-pools at 4,
# 9, 18, 27, 36 have no weights), then classifier.*
TV_CONVS = ((0, 2), (5, 7), (10, 12, 14, 16), (19, 21, 23, 25), (28, 30, 32, 34))


TV_WIDTHS = (4, 4, 8, 8, 8)


def tv_state(widths=WIDTHS, seed=0):
    """A synthetic torchvision-format VGG-19 state dict: features.N.* at torchvision's N (TV_CONVS), with
    `widths` channels per block, plus a classifier."""
    g, state, c = torch.Generator().manual_seed(seed), {}, 3
    for block, convs in enumerate(TV_CONVS):
        for n in convs:
            state[f"features.{n}.weight"] = torch.randn(widths[block], c, 3, 3, generator=g) * 0.3
            state[f"features.{n}.bias"] = torch.randn(widths[block], generator=g) * 0.1
            c = widths[block]
    state["classifier.0.weight"] = torch.randn(7, 5, generator=g)
    return state


def test_norm_is_instance_norm_by_hand():
    """Per image and channel: (x - mean) / sqrt(var + 1e-5), biased variance over the pixels, then that
    channel's scale and shift; nothing carried between calls or across the batch."""
    norm = networks._norm(2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])
    # channel 0: mean 2.5, variance 1.25; channel 1: mean 2, deviations -2 -2 -2 6, variance 12
    want = torch.tensor([[[[-1.5, -0.5], [0.5, 1.5]], [[-2.0, -2.0], [-2.0, 6.0]]]])
    want = want / torch.tensor([1.25 + 1e-5, 12 + 1e-5]).sqrt().view(1, 2, 1, 1)
    want = want * torch.tensor([2.0, 1.0]).view(1, 2, 1, 1) + torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    for batch in (x, torch.cat([x, 10 * x - 3])):  # a batch-mate changes nothing
        assert torch.allclose(norm(batch)[:1], want, atol=1e-5)
    # an InstanceNorm2d(affine=True) checkpoint loads: the same parameter names and shapes
    old = nn.InstanceNorm2d(2, affine=True).state_dict()
    assert {k: v.shape for k, v in norm.state_dict().items()} == {k: v.shape for k, v in old.items()}


def test_generator_shape_range_and_per_sample():
    G = networks.Generator(ngf=4, n_down=4)
    img, hm = inputs(3)
    y = G(img, hm)
    assert y.shape == (3, 3, S, S)
    assert y.abs().max() <= 1 and y.std() > 0
    # the training loop batches several G passes together: a sample's result must not depend on its batch
    assert torch.allclose(G(img[1:2], hm[1:2]), y[1:2], atol=1e-5)
    assert networks.Generator(ngf=4, n_down=2)(img, hm).shape == (3, 3, S, S)
    with pytest.raises(ValueError, match="n_down"):
        networks.Generator(ngf=4, n_down=5)(img, hm)  # 32 px cannot go down to 1x1


def test_generator_width_doubles_then_caps():
    G = networks.Generator(ngf=4, n_down=5)
    assert [b[0].out_channels for b in G.down] == [4, 8, 16, 32, 32]


def test_discriminator_shape_and_per_sample():
    D = networks.Discriminator(ndf=8)
    img, hm = inputs(3)
    logits = D(img, hm)
    assert logits.shape == (3,)
    assert torch.allclose(D(img[2:], hm[2:]), logits[2:], atol=1e-5)
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in D.modules()) == 3


# The architecture as the paper and pix2pix describe it (Isola et al. 2017: 4x4 convolutions of stride 2,
# down and up; the PatchGAN ends in a stride-1 conv to one logit per patch) with the paper's
# "4 down blocks, 1 residual block (two 3x3 convs, He et al. 2016), 4 up blocks", written out by hand:
# (kind, in channels, out channels, kernel, stride, padding) at ngf = ndf = 8 and 68 heatmaps.
G_LAYERS = [("conv", 71, 8, 4, 2, 1), ("conv", 8, 16, 4, 2, 1),          # down: 3 + 68 channels in
            ("conv", 16, 32, 4, 2, 1), ("conv", 32, 64, 4, 2, 1),
            ("conv", 64, 64, 3, 1, 1), ("conv", 64, 64, 3, 1, 1),         # the residual block's branch
            ("up", 64, 64, 4, 2, 1), ("up", 64 + 32, 32, 4, 2, 1),       # each up block reads the one below
            ("up", 32 + 16, 16, 4, 2, 1), ("up", 16 + 8, 8, 4, 2, 1),    # ⊕ the matching down block's
            ("conv", 8, 3, 3, 1, 1)]                                      # to RGB at full resolution
D_LAYERS = [("conv", 71, 8, 4, 2, 1), ("conv", 8, 8, 4, 2, 1), ("conv", 8, 8, 4, 2, 1),
            ("conv", 8, 1, 3, 1, 1)]


def convs(model):
    kind = lambda m: "up" if isinstance(m, nn.ConvTranspose2d) else "conv"
    return [(kind(m), m.in_channels, m.out_channels, *m.kernel_size[:1], *m.stride[:1], *m.padding[:1])
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def test_every_conv_has_the_papers_kernel_and_stride():
    assert convs(networks.Generator(ngf=8, n_down=4)) == G_LAYERS
    assert convs(networks.Discriminator(ndf=8)) == D_LAYERS
    assert all(m.kernel_size[0] == m.kernel_size[1] and m.stride[0] == m.stride[1]
               for M in (networks.Generator(ngf=8), networks.Discriminator(ndf=8)) for m in M.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def test_discriminators_receptive_field_by_hand_and_by_gradient():
    """Each output pixel of D judges a patch. Back from one output pixel through (kernel k, stride s):
    r -> (r - 1) s + k: 1 -> 3 (3x3/1) -> 8 -> 18 -> 38 (three 4x4/2): a 38-px patch. The probe: the
    input pixels an output pixel's gradient reaches. Instance norm's mean and variance span the whole
    image (every pixel feeds them), so the probe swaps the norms for identities to see the convs' patch."""
    rf = 1
    for _, _, _, k, s, _ in reversed(D_LAYERS):
        rf = (rf - 1) * s + k
    assert rf == 38
    torch.manual_seed(0)
    D = networks.Discriminator(ndf=8)
    D.net = nn.Sequential(*[nn.Identity() if isinstance(m, nn.GroupNorm) else m for m in D.net])
    x = torch.randn(1, 71, 64, 64, requires_grad=True)
    out = D.net(x)
    assert out.shape == (1, 1, 8, 8)
    out[0, 0, 4, 4].backward()
    rows, cols = (torch.nonzero(x.grad.abs().sum((0, 1)).amax(d)).flatten() for d in (1, 0))
    # output pixel 4 <- 3..5 <- 5..12 <- 9..26 <- input 17..54 (padding 1 at every stride-2 conv)
    assert (rows.min().item(), rows.max().item()) == (17, 54) and len(rows) == 38
    assert (cols.min().item(), cols.max().item()) == (17, 54) and len(cols) == 38


def test_residual_block_adds_its_input():
    """x + F(x): with the branch's output zeroed (its last norm's scale and shift 0) the block is the
    identity, so the innermost up block reads exactly the bottleneck; otherwise bottleneck + branch."""
    torch.manual_seed(0)
    G = networks.Generator(ngf=4, n_down=3)
    seen = {}
    G.down[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("bottleneck", o))
    G.res.register_forward_hook(lambda m, i, o: seen.__setitem__("branch", o))
    G.up[0].register_forward_hook(lambda m, i, o: seen.__setitem__("up_in", i[0]))
    img, hm = inputs(2)
    with torch.no_grad():
        G(img, hm)
        assert seen["branch"].abs().max() > 0.1
        torch.testing.assert_close(seen["up_in"], seen["bottleneck"] + seen["branch"])
        G.res[-1].weight.zero_()
        G.res[-1].bias.zero_()
        G(img, hm)
    assert seen["branch"].abs().max() == 0 and seen["bottleneck"].abs().max() > 0.1
    assert torch.equal(seen["up_in"], seen["bottleneck"])


def test_generator_output_stays_in_the_image_range_for_any_weights():
    """Images live in [-1, 1] (to_tensor's range): G's output must be bounded whatever its weights,
    not only at a lucky initialisation. Weights 1000x the init drive it to the bounds, not past them."""
    torch.manual_seed(0)
    G = networks.Generator(ngf=4, n_down=3)
    with torch.no_grad():
        for p in G.parameters():
            p.mul_(1000)
        y = G(*inputs(2))
    assert y.abs().max() <= 1 and (y.abs() > 0.99).float().mean() > 0.5


def test_residual_flow_and_warp_outputs_start_as_the_floor_and_move_its_pixels():
    """Beyond the paper, G may draw what changes: residual, Î_t = I_s + Δ; flow, I_s resampled along a
    flow F, + Δ; warp, along the landmarks' thin-plate spline and F, + Δ. Their last convolution starts at
    zero, so an untrained G gives back I_s exactly (the copy floor), or the warp floor. Set by hand: a bias of 0.5 on Δ adds 0.5 to every pixel (clipped to [-1, 1]); a flow
    bias of 2/S (one pixel, in grid_sample's units) on x makes pixel (x, y) read I_s at (x + 1, y), the
    last column repeating the edge."""
    img, hm = inputs(2)
    for output, channels in (("residual", 3), ("flow", 5)):
        G = networks.Generator(ngf=4, n_down=3, output=output)
        assert G.out.out_channels == channels
        with torch.no_grad():
            assert torch.equal(G(img, hm), img)
            G.out.bias[:3] = 0.5
            torch.testing.assert_close(G(img, hm), (img + 0.5).clamp(-1, 1))
            G.out.bias[:3] = 0
            if output == "flow":
                G.out.bias[3] = 2 / S
                torch.testing.assert_close(G(img, hm), torch.cat([img[..., 1:], img[..., -1:]], -1))
    # warp: an untrained G is the warp floor, I_s moved along the landmarks' thin-plate spline; for a pure
    # translation of the landmarks by (2, 1) px that is I_s moved by (2, 1), its first rows and columns
    # repeating its edge
    G = networks.Generator(ngf=4, n_down=3, output="warp")
    lm_s = torch.rand(2, 68, 2, generator=torch.Generator().manual_seed(3)) * 20 + 6
    with torch.no_grad():
        moved = G(img, hm, networks.tps_grid(lm_s, lm_s + torch.tensor([2.0, 1.0]), S))
    torch.testing.assert_close(moved[..., 1:, 2:], img[..., :-1, :-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[..., :1, 2:], img[..., :1, :-2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs the landmarks' base grid"):
        G(img, hm)
    # the paper's setting is the default, and a run's output comes back with its G
    assert networks.Generator(ngf=4).output == "image"
    assert networks.build_generator({"ngf": 4, "n_down": 3, "output": "flow"}).output == "flow"
    assert networks.build_generator({"ngf": 4, "n_down": 3}).output == "image"  # a run from before --output


def peaks(h, sigma):
    """Sub-pixel centres (B,K,2) of Gaussian heatmaps (B,K,S,S): ln h is a parabola in x and in y,
    so the samples either side of the brightest pixel p give its vertex exactly,
    p + sigma^2 (ln h(p + 1) - ln h(p - 1)) / 2."""
    B, K, S, _ = h.shape
    i = h.reshape(B, K, -1).argmax(-1)
    py, px = i // S, i % S
    L, b, k = h.double().clamp_min(1e-300).log(), torch.arange(B)[:, None], torch.arange(K)[None]
    x = px + sigma ** 2 * (L[b, k, py, px + 1] - L[b, k, py, px - 1]) / 2
    y = py + sigma ** 2 * (L[b, k, py + 1, px] - L[b, k, py - 1, px]) / 2
    return torch.stack([x, y], -1).numpy()


@pytest.fixture
def given(monkeypatch):
    """Every G call's inputs: the images and heatmaps G is given, whoever calls it."""
    calls, forward = [], networks.Generator.forward

    def record(self, image, heatmaps):
        calls.append((image.detach().clone(), heatmaps.detach().clone()))
        return forward(self, image, heatmaps)

    monkeypatch.setattr(networks.Generator, "forward", record)
    return calls


def test_batched_generation_draws_the_runs_sigma_and_window(given):
    """A run trained with --sigma 2 --window 3 is given such heatmaps when generating: a landmark on
    pixel (x, y) = (6, 9) lights (9, 6) with 1, its 4 neighbours with exp(-1/8), its diagonals with
    exp(-1/4), and nothing 2 px away (the defaults, sigma 1 and window 7, would give exp(-1/2) and 0.14)."""
    torch.manual_seed(0)
    G = networks.Generator(ngf=4, n_down=3)
    cfg = {"args": {"size": 16, "sigma": 2.0, "window": 3}}
    lm = np.full((3, 68, 2), 8, np.float32)
    lm[:, 0] = (6, 9)
    src = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = networks.generate(G, cfg, src, lm, batch=2)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8 and len(given) == 2  # batches of 2, then 1
    h = torch.cat([hm for _, hm in given])[:, 0]
    e = math.exp
    want = torch.zeros(16, 16)
    want[8:11, 5:8] = torch.tensor([[e(-1 / 4), e(-1 / 8), e(-1 / 4)], [e(-1 / 8), 1, e(-1 / 8)],
                                    [e(-1 / 4), e(-1 / 8), e(-1 / 4)]])
    for i in range(3):
        torch.testing.assert_close(h[i], want)
    images = torch.cat([img for img, _ in given])
    torch.testing.assert_close(images, torch.tensor(src).permute(0, 3, 1, 2) / 127.5 - 1)


def test_count_params():
    assert networks.count_params(nn.Linear(3, 2)) == 8


def test_vgg_bad_files_name_the_key(tmp_path):
    state = tv_state()
    path = tmp_path / "vgg.pth"
    del state["features.5.weight"]
    torch.save(state, path)
    with pytest.raises(data.DataError, match=r"vgg.pth: missing key features\.5\.weight"):
        networks.load_vgg(["relu2_2"], path=str(path), widths=WIDTHS)
    state = tv_state()
    state["features.0.weight"] = state["features.0.weight"][:2]
    torch.save(state, path)
    with pytest.raises(data.DataError, match=r"features\.0\.weight has shape \(2, 3, 3, 3\) expected \(4, 3, 3, 3\)"):
        networks.load_vgg(["relu1_1"], path=str(path), widths=WIDTHS)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(data.DataError, match="vgg.pth: cannot read"):
        networks.load_vgg(["relu1_1"], path=str(path), widths=WIDTHS)


def test_vgg_random_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(extras.runs, "VGG_URL", "http://127.0.0.1:9/vgg19.pth")  # refused at once
    logged = []
    lookup = lambda: networks.load_vgg(["relu1_2"], extras.runs.vgg_weights(log=logged.append), widths=WIDTHS)
    vgg, source = lookup()
    assert source == "random" and "random VGG features" in logged[-1] and logged[-1].count("\n") == 1
    again, _ = lookup()
    torch.testing.assert_close(vgg.features[0].weight, again.features[0].weight)  # same random features each run
    # and a file in the hub cache is picked up without --vgg
    cached = tmp_path / "hub" / "checkpoints" / extras.runs.VGG_FILE
    assert not cached.parent.exists() or not list(cached.parent.iterdir())  # no partial download left
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv_state(), cached)
    assert lookup()[1] == str(cached)


def test_vgg_relu_indices_follow_torchvisions_keys():
    # torchvision's layout, and for every reluB_K: the ReLU right after the K-th conv of block B
    listed = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
              "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24}
    from_keys = {f"relu{b + 1}_{k + 1}": n + 1 for b, convs in enumerate(TV_CONVS) for k, n in enumerate(convs)}
    assert {k: networks.RELU[k] for k in listed} == listed
    assert dict(networks.RELU) == from_keys
    assert tuple(networks.VGG_CFG) == (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                       512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
    vgg = networks.VGG19(list(networks.RELU), widths=TV_WIDTHS)
    want_keys = {f"features.{n}.{w}" for convs in TV_CONVS for n in convs for w in ("weight", "bias")}
    assert {k for k in vgg.state_dict() if k.startswith("features.")} == want_keys
    for b, convs in enumerate(TV_CONVS):
        for k, n in enumerate(convs):
            i = networks.RELU[f"relu{b + 1}_{k + 1}"]
            assert isinstance(vgg.features[i], nn.ReLU) and isinstance(vgg.features[i - 1], nn.Conv2d)
            assert vgg.features[i - 1].out_channels == TV_WIDTHS[b]
            assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.features[:i]) == b
    # built only as deep as the deepest layer asked for
    assert len(networks.VGG19(losses.VGG_LAYERS, widths=TV_WIDTHS).features) == 24 + 1


def test_vgg_applies_imagenet_normalisation():
    assert tuple(networks.IMAGENET_MEAN) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(networks.IMAGENET_STD) == pytest.approx((0.229, 0.224, 0.225))
    vgg = networks.VGG19(["relu1_1"], widths=(3, 4, 8, 8, 8))
    with torch.no_grad():  # conv1_1 = identity (a centred delta kernel per channel), so relu1_1 = relu(input seen)
        vgg.features[0].weight.zero_()
        vgg.features[0].bias.zero_()
        for c in range(3):
            vgg.features[0].weight[c, c, 1, 1] = 1.0
    mean, std, z = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (1.0, -0.5, 2.0)
    # an RGB image in [-1, 1] whose [0, 1] value is mean + z * std: normalised, channel c reads z[c]
    x = torch.tensor([2 * (m + zz * s) - 1 for m, s, zz in zip(mean, std, z)]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    out = vgg(x)["relu1_1"]
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4))


def test_vgg_features_match_a_stack_built_from_torchvisions_keys(tmp_path):
    state, g = tv_state(TV_WIDTHS), torch.Generator().manual_seed(1)
    torch.save(state, tmp_path / "vgg.pth")
    vgg, source = networks.load_vgg(losses.VGG_LAYERS, path=str(tmp_path / "vgg.pth"), widths=TV_WIDTHS)
    assert source == str(tmp_path / "vgg.pth")
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    # reference: ImageNet-normalised RGB, then per block conv+ReLU for each key, then a 2x2 max-pool
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    y, want = ((x + 1) / 2 - mean) / std, {}
    for b, convs in enumerate(TV_CONVS[:4]):
        for k, n in enumerate(convs):
            y = F.relu(F.conv2d(y, state[f"features.{n}.weight"], state[f"features.{n}.bias"], padding=1))
            want[f"relu{b + 1}_{k + 1}"] = y
        y = F.max_pool2d(y, 2)
    xg = x.clone().requires_grad_()
    got = vgg(xg)
    assert set(got) == set(losses.VGG_LAYERS)
    for name in losses.VGG_LAYERS:
        torch.testing.assert_close(got[name], want[name])
    got["relu3_2"].sum().backward()  # frozen, but gradient reaches the image (that is how L_pp trains G)
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in vgg.parameters())




# ================================================================================================
# training: the real step's gradient flow, the loop, checkpoints, faults, resume, DDP
# ================================================================================================
class RecordingG(nn.Module):
    """The real generator, recording each call's inputs and output (whose gradient is kept)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, image, heatmaps):
        out = self.inner(image, heatmaps)
        if out.requires_grad:
            out.retain_grad()
        self.calls.append((image.detach().clone(), heatmaps.detach().clone(), out))
        return out


class RecordingD(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, image, heatmaps):
        out = self.inner(image, heatmaps)
        trains = any(p.requires_grad for p in self.inner.parameters())
        self.calls.append((image, heatmaps.detach().clone(), out.detach().clone(), trains))
        return out


class RecordingVGG(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((x.detach().clone(), torch.is_grad_enabled() and x.requires_grad))
        return self.inner(x)


def tiny_step_setup(seed=0, B=2, size=16):
    torch.manual_seed(seed)
    G, D = networks.Generator(ngf=4, n_down=2), networks.Discriminator(ndf=4)
    vgg = networks.VGG19(losses.VGG_LAYERS, widths=TV_WIDTHS)
    g = torch.Generator().manual_seed(seed + 1)
    b = {"I_s": torch.rand(B, 3, size, size, generator=g) * 2 - 1, "I_t": torch.rand(B, 3, size, size, generator=g) * 2 - 1}
    b.update({k: torch.rand(B, 68, 2, generator=g) * (size - 1) for k in ("lm_s", "lm_m", "lm_t")})
    cfg = {"size": size, "sigma": 1.0, "window": 7}
    return G, D, vgg, b, cfg


def adam(G, D):
    return torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999)), torch.optim.Adam(D.parameters(), lr=5e-5, betas=(0.5, 0.999))


def only(term):
    lam = {k: 0.0 for k in ("adv", "pix", "self", "triple", "pp", "id")}
    lam[term] = float(PAPER_LAMBDAS[term])
    return lam


def traced_step(lam, fused=True, measure=False):
    """Run the real train_step with recording G, D and VGG. Returns (passes, D calls, VGG calls, batch,
    heatmaps, terms): passes maps an expression like 'G(G(I_s,e_t),e_s)' to (value, gradient) per sample."""
    G0, D0, vgg0, b, cfg = tiny_step_setup()
    G, D, vgg = RecordingG(G0), RecordingD(D0), RecordingVGG(vgg0)
    opt_G, opt_D = adam(G, D)
    terms = facesynth.train_step(G, D, vgg, opt_G, opt_D, b, lam, cfg, fused=fused)
    if measure:  # as a log row does: every term, measured after the step without gradient
        terms = {**facesynth.measure(G, D, vgg, b, cfg), **terms}
    e = {k: data.heatmaps(b[f"lm_{k[-1]}"], cfg["size"], cfg["sigma"], cfg["window"]) for k in ("e_s", "e_m", "e_t")}
    B = len(b["I_s"])
    known = [("I_s", j, b["I_s"][j]) for j in range(B)]  # (expression, sample, value)
    passes = {}
    for image, hm, out in G.calls:
        grad = out.grad if out.grad is not None else torch.zeros_like(out)
        for r in range(len(image)):
            src = [(name, j) for name, j, v in known if torch.equal(image[r], v)]
            cond = [(name, j) for name, t in e.items() for j in range(B) if torch.equal(hm[r], t[j])]
            assert len(src) == 1 and len(cond) == 1, "every G input row is a known image with a known e_*"
            (sname, j), (cname, j2) = src[0], cond[0]
            assert j == j2, "image and landmarks of one G pass must come from the same triplet"
            expr = f"G({sname},{cname})"
            known.append((expr, j, out[r].detach()))
            passes.setdefault(expr, {}).setdefault(j, (out[r].detach(), grad[r]))  # the step's, not measure's
    return passes, D.calls, vgg.calls, b, e, terms


def stacked(passes, expr):
    B = len(passes[expr])
    return (torch.stack([passes[expr][j][0] for j in range(B)]), torch.stack([passes[expr][j][1] for j in range(B)]))


FAKE, MID, CYC, TRI = "G(I_s,e_t)", "G(I_s,e_m)", "G(G(I_s,e_t),e_s)", "G(G(I_s,e_m),e_t)"


@pytest.mark.parametrize("fused", [True, False])
def test_step_conditions_every_pass_on_the_papers_landmarks(fused):
    passes, d_calls, v_calls, b, e, terms = traced_step(losses.lambdas(), fused=fused)
    # I_hat_t = G(I_s; e_t); L_self cycles back with e_s; L_triple goes through e_m, then e_t
    assert set(passes) == {FAKE, MID, CYC, TRI} and all(len(p) == 2 for p in passes.values())
    fake, cyc, tri = stacked(passes, FAKE)[0], stacked(passes, CYC)[0], stacked(passes, TRI)[0]
    # D: real = (I_t, e_t) and generated = (I_hat_t, e_t) while D trains, the generated one cut from G;
    # then L_adv's pass (I_hat_t, e_t) with D frozen
    assert len(d_calls) == 3
    (r_img, r_hm, r_out, r_tr), (f_img, f_hm, f_out, f_tr), (a_img, a_hm, a_out, a_tr) = d_calls
    assert torch.equal(r_img, b["I_t"]) and torch.equal(f_img.detach(), fake) and torch.equal(a_img.detach(), fake)
    assert all(torch.equal(h, e["e_t"]) for h in (r_hm, f_hm, a_hm))
    assert r_tr and f_tr and not a_tr
    assert not f_img.requires_grad, "L_D must not send gradient into G"
    assert a_img.requires_grad, "L_adv must reach G"
    # VGG: the target without gradient, the generated image with it
    assert sorted((torch.equal(x, b["I_t"]), torch.equal(x, fake), g) for x, g in v_calls) == [
        (False, True, True), (True, False, False)]
    # the returned raw terms, by the paper's formulas on the recorded tensors
    assert terms["pix"].item() == pytest.approx(((fake - b["I_t"]) ** 2).mean().item(), rel=1e-5)
    assert terms["self"].item() == pytest.approx(((cyc - b["I_s"]) ** 2).mean().item(), rel=1e-5)
    assert terms["triple"].item() == pytest.approx(((tri - fake) ** 2).mean().item(), rel=1e-5)
    softplus = lambda t: torch.log1p(torch.exp(t))  # -log sigmoid(x) = softplus(-x)
    assert terms["adv"].item() == pytest.approx(softplus(-a_out).mean().item(), rel=1e-5)
    assert terms["D"].item() == pytest.approx(((softplus(-r_out).mean() + softplus(f_out).mean()) / 2).item(), rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_consistency_terms_send_gradient_into_G_through_both_branches(fused):
    zero = lambda t: torch.count_nonzero(t) == 0
    # L_self alone (weight 100): d/dcyc 100 mean((cyc - I_s)^2) = 200 (cyc - I_s) / N, and on into the inner pass
    passes, *_, b, e, _ = traced_step(only("self"), fused=fused)
    (cyc, g_cyc), (fake, g_fake) = stacked(passes, CYC), stacked(passes, FAKE)
    torch.testing.assert_close(g_cyc, 200 * (cyc - b["I_s"]) / cyc.numel())
    assert not zero(g_fake), "L_self must reach G's first pass G(I_s; e_t) too"
    assert zero(stacked(passes, MID)[1]) and zero(stacked(passes, TRI)[1])
    # L_triple alone: the via-middle branch gets +200 (tri - fake) / N, the direct branch exactly minus that
    passes, *_ = traced_step(only("triple"), fused=fused)
    (tri, g_tri), (fake, g_fake) = stacked(passes, TRI), stacked(passes, FAKE)
    torch.testing.assert_close(g_tri, 200 * (tri - fake) / tri.numel())
    torch.testing.assert_close(g_fake, -g_tri, msg="L_triple's direct branch G(I_s; e_t) must get gradient")
    assert not zero(stacked(passes, MID)[1]), "L_triple must reach G's pass G(I_s; e_m)"
    assert zero(stacked(passes, CYC)[1])
    # L_pix alone (weight 10): squared, against the target
    passes, *_, b, e, _ = traced_step(only("pix"), fused=fused, measure=True)
    fake, g_fake = stacked(passes, FAKE)
    torch.testing.assert_close(g_fake, 20 * (fake - b["I_t"]) / fake.numel())


def test_ablated_consistency_runs_no_cycle_and_gets_no_gradient():
    lam = losses.lambdas(ablate=["consistency"])
    passes, *_ = traced_step(lam)
    assert set(passes) == {FAKE}  # not measured: the cycle passes are not even run
    passes, *_, terms = traced_step(lam, measure=True)  # measured: run, reported, but no gradient
    assert set(passes) == {FAKE, MID, CYC, TRI} and {"self", "triple"} <= set(terms)
    assert all(torch.count_nonzero(stacked(passes, k)[1]) == 0 for k in (MID, CYC, TRI))


def _snap(m):
    return [p.detach().clone() for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_D_update_moves_only_D_and_G_update_moves_only_G():
    G, D, vgg, b, cfg = tiny_step_setup()
    opt_G, opt_D = adam(G, D)
    G0, D0, events = _snap(G), _snap(D), []
    for name, opt in (("D", opt_D), ("G", opt_G)):
        def spy(*a, _real=opt.step, _name=name, **k):
            before = (_snap(G), _snap(D))
            out = _real(*a, **k)
            events.append((_name, before, (_snap(G), _snap(D))))
            return out
        opt.step = spy
    facesynth.train_step(G, D, vgg, opt_G, opt_D, b, losses.lambdas(), cfg)
    assert [n for n, *_ in events] == ["D", "G"]  # D first (on the generated image), then G
    (_, (g_b, d_b), (g_a, d_a)), (_, (g_b2, d_b2), (g_a2, d_a2)) = events[0], events[1]
    assert _same(g_b, G0) and _same(g_a, G0), "D's update must not move G"
    assert not _same(d_a, D0)
    assert _same(d_b2, d_a) and _same(d_a2, d_a), "G's update must not move D"
    assert not _same(g_a2, G0)


def test_step_ignores_stale_gradients():
    """Each update uses only this step's gradients: leftovers in .grad (from anything) change nothing."""
    G, D, vgg, b, cfg = tiny_step_setup()
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    for p in list(G2.parameters()) + list(D2.parameters()):
        p.grad = torch.full_like(p, 1e3)
    facesynth.train_step(G, D, vgg, *adam(G, D), b, losses.lambdas(), cfg)
    facesynth.train_step(G2, D2, vgg, *adam(G2, D2), b, losses.lambdas(), cfg)
    for m, m2 in ((G, G2), (D, D2)):
        for (k, p), p2 in zip(m.named_parameters(), m2.parameters()):
            torch.testing.assert_close(p, p2, rtol=0, atol=1e-7, msg=k)


def test_a_warp_G_starts_each_pass_from_the_spline_of_its_own_landmarks(monkeypatch):
    """--output warp: each of the step's four passes reads its image along the thin-plate spline from that
    image's landmarks to the ones it is asked for: I_s (s) -> e_t and e_m; Î_t (drawn with t's) -> e_s;
    G(I_s; e_m) (m's) -> e_t."""
    G, D, vgg, b, cfg = tiny_step_setup()
    G = networks.Generator(ngf=4, n_down=2, output="warp")
    asked, real = [], networks.tps_grid
    monkeypatch.setattr(networks, "tps_grid", lambda src, tgt, size: asked.append((src, tgt)) or real(src, tgt, size))
    facesynth.train_step(G, D, vgg, *adam(G, D), b, losses.lambdas(), cfg, warp=True)
    name = lambda lm: next(k for k in ("lm_s", "lm_m", "lm_t") if torch.equal(lm, b[k]))[-1]
    assert sorted(name(s) + name(t) for s, t in asked) == ["mt", "sm", "st", "ts"]


def test_without_lambda_adv_D_is_neither_run_nor_trained():
    """With λ_adv = 0 nothing of G's loss passes through D: the step must not spend D's forward, backward
    and update (the CPU recipe trained a D that G never saw), and must leave D as it was."""
    lam = losses.lambdas({"adv": 0})
    passes, d_calls, *_, terms = traced_step(lam)
    assert d_calls == [] and "D" not in terms and "adv" not in terms and set(passes) == {FAKE, MID, CYC, TRI}
    G, D, vgg, b, cfg = tiny_step_setup()
    D0 = _snap(D)
    facesynth.train_step(G, D, vgg, *adam(G, D), b, lam, cfg)
    assert _same(_snap(D), D0)


def test_learning_rates_decay_in_a_straight_line_over_the_second_half():
    """--lr-decay (pix2pix's schedule): the paper's rates for the first half of the run, then a straight
    line to 0 at its end; without it, the paper's rates throughout."""
    args = {"lr_g": 2e-4, "lr_d": 5e-5, "lr_decay": True}
    for done, f in ((0, 1), (400, 1), (500, 1), (600, 0.8), (750, 0.5), (999, 0.002)):
        assert facesynth.learning_rates(args, done, 1000) == pytest.approx((2e-4 * f, 5e-5 * f))
    assert facesynth.learning_rates({**args, "lr_decay": False}, 999, 1000) == (2e-4, 5e-5)


def test_augmentation_moves_a_triplets_pixels_and_landmarks_as_one():
    """--augment: a white dot drawn at a triplet's landmarks in 32-px frames; each move (scale s, turn a,
    shift d in crop sides) is read back from the moved images, where the dot's centre of brightness must
    be the landmark's new place, p -> s R(a) (p - c) + c + S d with c = 15.5, worked by hand per move."""
    S, c = 32, 15.5
    at = {"I_s": (20, 10), "I_t": (12, 18), "lm_s": (20, 10), "lm_m": (9, 9), "lm_t": (12, 18)}
    b = {k: torch.full((1, 3, S, S), -1.0) for k in ("I_s", "I_t")}
    for k, (x, y) in at.items():
        if k.startswith("I"):
            b[k][..., y - 1:y + 2, x - 1:x + 2] = 1  # a 3 x 3 dot centred on (x, y)
        else:
            b[k] = torch.tensor([[(x, y)] * 68], dtype=torch.float32)
    cases = [((1.0, 90, 0.0, 0.0), lambda x, y: (c - (y - c), c + (x - c))),               # a quarter turn
             ((1.25, 0, 0.0, 0.0), lambda x, y: (c + 1.25 * (x - c), c + 1.25 * (y - c))),  # zoom about c
             ((1.0, 0, 0.125, -0.0625), lambda x, y: (x + 4, y - 2))]                       # 4 px right, 2 up
    for (s, deg, dx, dy), where in cases:
        moved = extras.augment.move_triplets(b, torch.tensor([[s, math.radians(deg), dx, dy]]))
        for k, (x, y) in at.items():
            want = np.array(where(x, y))
            if k.startswith("lm"):
                np.testing.assert_allclose(moved[k][0].numpy(), np.tile(want, (68, 1)), atol=1e-4)
                continue
            w = (moved[k][0].mean(0) + 1).double().numpy()
            got = (w * np.arange(S)).sum() / w.sum(), (w * np.arange(S)[:, None]).sum() / w.sum()
            assert np.abs(np.array(got) - want).max() < 0.1, (k, s, deg, dx, dy, got, want)
        assert moved["I_s"].abs().max() <= 1 and torch.equal(b["lm_s"], torch.tensor([[(20.0, 10.0)] * 68]))
    # the moves are a pure function of (seed, step), within the bounds, over their whole range
    m = extras.augment.moves(0, 3, 1000)
    assert torch.equal(m, extras.augment.moves(0, 3, 1000)) and not torch.equal(m, extras.augment.moves(0, 4, 1000))
    assert m[:, 0].log().abs().max() <= math.log(1.1) + 1e-6 and m[:, 1].abs().max() <= math.radians(15) + 1e-6
    assert m[:, 2:].abs().max() <= 0.05 and m[:, 1].abs().max() > math.radians(14.9)


TINY_TRAIN = ["--ngf", "8", "--vgg", "random", "--vgg-widths", "4", "4", "8", "8", "8", "--batch-size", "4", "--device", "cpu"]


def read_log(run):
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


def run_train(*argv):
    facesynth.main(["train", *argv, *TINY_TRAIN])


def test_training_writes_outputs_and_lowers_pixel_loss(blobs, tmp_path):
    out = str(tmp_path / "run")
    run_train("--data", blobs, "--out", out, "--steps", "40", "--log-every", "10", "--sample-every", "20",
              "--lr-g", "2e-3")
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [1, 10, 20, 30, 40]  # step 1 too: a run of any length has a row
    assert all(r[f"L_{t}"] for r in rows for t in losses.TERMS)
    assert float(rows[-1]["L_pix"]) < 0.5 * float(rows[0]["L_pix"])
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000001.png", "step_000020.png", "step_000040.png"]
    # Every grid shows the same held-out pairs: sources and targets are frames of the one test video (002),
    # scaled 4x to 128-px cells under an 18-px row of labels; only the generated column changes, not the
    # warp floor's beside it.
    grids = [os.path.join(out, "samples", f"step_0000{s}.png") for s in ("01", "40")]
    first, last = (np.asarray(Image.open(g)) for g in grids)
    assert first.shape == (18 + 4 * 128, 5 * 128, 3)
    assert (first[:18, :, 0] < 100).any(axis=0).reshape(5, 128).any(1).all()  # a label over every column
    test_frames = np.load(os.path.join(blobs, "002", "frames.npy"))
    for col in (0, 4):  # source, target
        tiles = first[18:, col * 128:(col + 1) * 128].reshape(4, 128, 128, 3)[:, ::4, ::4]
        assert all(any(np.array_equal(t, f) for f in test_frames) for t in tiles)
    for col in (0, 3, 4):  # source, warp, target
        assert np.array_equal(first[:, col * 128:(col + 1) * 128], last[:, col * 128:(col + 1) * 128])
    assert not np.array_equal(first[18:, 256:384], last[18:, 256:384])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vgg"] == "random"
    assert cfg["lambdas"] == PAPER_LAMBDAS
    G, cfg2 = networks.load_generator(out)
    assert cfg2["step"] == 40 and not G.training


def test_training_and_its_sample_grid_use_the_runs_sigma_and_window(tmp_path, given, monkeypatch):
    """--sigma 2 --window 3 on landmarks at whole pixels (flipped, still whole): every heatmap G is
    given, the sample grid's included, and the landmark picture the grid draws hold only 1 at a
    landmark, exp(-1/8) beside it, exp(-1/4) diagonally and 0 beyond (sigma 1 would give exp(-1/2))."""
    rng, root = np.random.default_rng(0), tmp_path / "whole"
    for name in ("000", "001"):
        os.makedirs(root / name)
        np.save(root / name / "frames.npy", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
        np.save(root / name / "landmarks.npy", rng.integers(3, 29, (4, 68, 2)).astype(np.float32))
    (root / "split.json").write_text(json.dumps({"train": ["000", "001"], "test1": []}))
    (root / "prepare.json").write_text(json.dumps({"size": 32, "crop_scale": 1.8, "synthetic": False}))
    drawn, picture = [], data.heatmap_picture
    monkeypatch.setattr(data, "heatmap_picture", lambda *a, **k: drawn.append(picture(*a, **k)) or drawn[-1])
    run_train("--data", str(root), "--out", str(tmp_path / "run"), "--steps", "1", "--sigma", "2",
              "--window", "3")
    assert os.listdir(tmp_path / "run" / "samples") == ["step_000001.png"]
    e = math.exp
    allowed = torch.tensor([0, e(-1 / 4), e(-1 / 8), 1.0])
    only = lambda h: ((h[..., None] - allowed).abs().amin(-1).max() < 1e-6
                      and (h - e(-1 / 8)).abs().min() < 1e-6)
    assert len(given) >= 2 and all(only(hm) for _, hm in given)  # the step's passes and the sample's
    assert all((hm > 0).sum((-2, -1)).max() <= 9 for _, hm in given)  # a 3 x 3 window
    assert len(drawn) == 1 and only((drawn[0] + 1) / 2)


def test_resume_refuses_changed_model(blobs, tmp_path, capsys):
    out = str(tmp_path / "r")
    run_train("--data", blobs, "--out", out, "--steps", "2")
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", out, "--ngf", "16"])
    assert e.value.code == 2 and "cannot change --ngf when resuming" in capsys.readouterr().err


def test_init_starts_a_new_run_from_another_runs_weights(blobs, tmp_path, monkeypatch, capsys):
    """--init RUN: the new run's first step starts from RUN's G and D exactly, with fresh optimisers (no
    Adam state), RUN's architecture (--output too) and its own schedule, folder, --lr-decay and --augment;
    config.json records where it started. A typed architecture option that differs from RUN's is one line."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_train("--data", blobs, "--out", a, "--steps", "3", "--output", "warp")
    saved, seen, real = torch.load(os.path.join(a, "ckpt.pt")), [], facesynth.train_step

    def first_step(G, D, vgg, opt_G, opt_D, *rest, **k):
        if not seen:
            seen.append(({n: v.clone() for n, v in G.state_dict().items()}, {n: v.clone() for n, v in D.state_dict().items()},
                         opt_G.state_dict()["state"], opt_D.state_dict()["state"]))
        return real(G, D, vgg, opt_G, opt_D, *rest, **k)

    moved, move = [], extras.augment.move_triplets
    monkeypatch.setattr(facesynth, "train_step", first_step)
    monkeypatch.setattr(extras.augment, "move_triplets", lambda b, m: moved.append(m) or move(b, m))
    run_train("--data", blobs, "--out", b, "--steps", "4", "--init", a, "--lr-decay", "--augment", "--log-every", "1")
    assert len(moved) == 4 and all(m.shape == (4, 4) for m in moved)  # --augment: every step's batch moved
    (G0, D0, state_G, state_D), ckpt = seen[0], torch.load(os.path.join(b, "ckpt.pt"))
    for net, start in (("G", G0), ("D", D0)):
        assert start.keys() == saved[net].keys() and all(torch.equal(start[n], saved[net][n]) for n in start)
    assert state_G == state_D == {} and ckpt["step"] == 4 and ckpt["args"]["output"] == "warp"
    assert json.load(open(os.path.join(b, "config.json")))["init"] == {"run": a, "step": 3}
    # --lr-decay over 4 steps: the step after 3 of them runs at 2 (4 - 3) / 4 = half the rate
    assert [float(r["lr_G"]) for r in read_log(b)] == pytest.approx([2e-4, 2e-4, 2e-4, 1e-4])
    for typed, theirs in ((["--ngf", "16"], "--ngf 8, not 16"), (["--output", "flow"], "--output warp, not flow")):
        with pytest.raises(SystemExit) as e:
            facesynth.main(["train", "--data", blobs, "--out", str(tmp_path / "c"), "--init", a, *TINY_TRAIN, *typed])
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"error: --init {a}: its run has {theirs}; leave the option out to take the run's\n")


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ckpt.pt: not a readable checkpoint" in err and "Traceback" not in err
    with pytest.raises(data.DataError, match="no checkpoint there"):
        networks.load_checkpoint(str(tmp_path / "missing"))


def test_nan_stops_the_run_and_keeps_last_good_checkpoint(blobs, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "nan")
    run_train("--data", blobs, "--out", out, "--steps", "4", "--ckpt-every", "4")
    good = torch.load(os.path.join(out, "ckpt.pt"))
    calls = []
    real = losses.L_pix

    def poisoned(fake, target):
        calls.append(1)
        return real(fake, target) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(losses, "L_pix", poisoned)
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", out, "--steps", "12", "--ckpt-every", "4"])
    assert e.value.code == 2 and "NaN" in capsys.readouterr().err
    kept = torch.load(os.path.join(out, "ckpt.pt"))
    assert kept["step"] == 4 and all(torch.equal(kept["G"][k], good["G"][k]) for k in good["G"])


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A real fault: a file-size limit makes the write fail half-way (Python ignores SIGXFSZ, so the
    write raises EFBIG, as a full disk raises ENOSPC)."""
    import resource
    path = str(tmp_path / "ckpt.pt")
    networks.save_checkpoint(path, {"G": {"w": torch.zeros(4)}, "step": 1})
    before = open(path, "rb").read()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(data.DataError) as e:
            networks.save_checkpoint(path, {"G": {"w": torch.zeros(100_000)}, "step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(e.value) == f"{path}: cannot write the checkpoint (File too large); the previous one is kept as it was"
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_disk_full_during_training_is_one_line_and_keeps_the_checkpoint(blobs, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "full")
    run_train("--data", blobs, "--out", out, "--steps", "2", "--ckpt-every", "2")
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()

    real_open = open

    def full_disk(path, mode="r", *a, **k):  # the temporary checkpoint's writes fail half-way
        f = real_open(path, mode, *a, **k)
        if re.search(r"ckpt\.\d+\.tmp\.pt$", str(path)):  # data.writing's temporary name
            f.write(b"partial")
            f.write = lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", out, "--steps", "4", "--ckpt-every", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: {os.path.join(out, 'ckpt.pt')}: cannot write the checkpoint (No space "
                                         "left on device); the previous one is kept as it was\n")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp")) and not any(".tmp" in f for f in os.listdir(out))


def interrupt_at(monkeypatch, *calls, sig=signal.SIGINT):
    """Ctrl-C (a real SIGINT to this process, or `sig`) during the given calls of L_pix: inside a step.
    A step calls it once, and a log row's measurement (facesynth.measure) once more: from step 1 on,
    call 4 is step 3's."""
    n, real = [0], losses.L_pix

    def pix(fake, target):
        n[0] += 1
        for _ in range(calls.count(n[0])):
            os.kill(os.getpid(), sig)
        return real(fake, target)

    monkeypatch.setattr(losses, "L_pix", pix)


def test_ctrl_c_once_saves_after_the_step(blobs, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "int")
    interrupt_at(monkeypatch, 4)  # in step 3
    with pytest.raises(SystemExit) as e:
        run_train("--data", blobs, "--out", out, "--steps", "10")
    assert e.value.code == 130 and torch.load(os.path.join(out, "ckpt.pt"))["step"] == 3
    said = capsys.readouterr().out
    assert f"interrupted: checkpoint at step 3 in {os.path.join(out, 'ckpt.pt')}" in said
    assert [int(r["step"]) for r in read_log(out)] == [1, 3]  # a row where it stopped, before any --log-every
    assert "step_000003.png" in os.listdir(os.path.join(out, "samples"))
    assert said.count("random VGG features") == 1  # the notice once per run: not again on resume
    facesynth.main(["train", "--resume", out, "--steps", "4"])
    assert "random VGG features" not in capsys.readouterr().out


def test_ctrl_c_twice_quits_without_touching_the_checkpoint(blobs, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "int2")
    run_train("--data", blobs, "--out", out, "--steps", "2")
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    interrupt_at(monkeypatch, 2, 2)
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", out, "--steps", "10"])
    captured = capsys.readouterr()
    assert e.value.code == 130 and "Traceback" not in captured.err
    assert f"interrupted twice: stopped at once without saving; {os.path.join(out, 'ckpt.pt')} keeps step 2" in captured.out
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before and sorted(os.listdir(out)) == [
        "ckpt.pt", "config.json", "log.csv", "samples"]


def test_resume_session_options_do_not_stick_and_time_goes_on(blobs, tmp_path):
    out = str(tmp_path / "s")
    run_train("--data", blobs, "--out", out, "--steps", "2", "--log-every", "1")
    facesynth.main(["train", "--resume", out, "--steps", "4", "--log-every", "1"])  # this session only
    facesynth.main(["train", "--resume", out, "--steps", "8"])                      # back to the run's own 1
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    times = [float(r["time"]) for r in rows]
    assert times == sorted(times) and times[-1] > 0
    facesynth.main(["train", "--resume", out, "--steps", "10", "--log-every", "5"])
    assert [int(r["step"]) for r in read_log(out)][-2:] == [8, 10]
    assert torch.load(os.path.join(out, "ckpt.pt"))["args"]["log_every"] == 1


HERE = os.path.dirname(os.path.abspath(facesynth.__file__))
RUN_FILES = ["ckpt.pt", "config.json", "log.csv", "samples"]  # a run folder at rest: no lock, no temp file
LONG = ["--steps", "100000", "--log-every", "1000", "--sample-every", "100000"]


def first_step(p):
    """What training process p printed up to its first step line, read as it comes."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step "):
            return "".join(lines)
    p.wait()
    raise AssertionError("".join(lines) + (p.stderr.read() if p.stderr else ""))


def start_training(*argv):
    """A real second process training a tiny model, returned once it has finished its first step."""
    p = subprocess.Popen([sys.executable, "facesynth.py", "train", *argv, *TINY_TRAIN], cwd=HERE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return p, first_step(p)


def test_a_second_writer_refuses_and_a_killed_writers_folder_is_taken_over(blobs, tmp_path, capsys):
    out = str(tmp_path / "run")
    lock = os.path.join(out, ".lock")
    p, _ = start_training("--data", blobs, "--out", out, *LONG, "--ckpt-every", "1")  # a checkpoint a step
    try:
        assert open(lock).read() == f"{p.pid}\n"
        for argv in (["--data", blobs, "--out", out], ["--resume", out]):  # a fresh run, and a resume
            with pytest.raises(SystemExit) as e:
                run_train(*argv, "--steps", "3")
            assert e.value.code == 2 and capsys.readouterr().err == (
                f"error: {out}: in use by process {p.pid} (it holds {lock}); wait for it to finish or stop "
                "it, or use another --out\n")
        while not os.path.exists(os.path.join(out, "ckpt.pt")) and p.poll() is None:
            time.sleep(0.05)  # its first checkpoint, then (at any later moment) kill -9
    finally:
        p.kill()  # kill -9, at whatever moment of a step or a checkpoint write it is in
        p.wait()
    assert open(lock).read() == f"{p.pid}\n"  # left behind by the dead writer
    for stale in (f"ckpt.pt.{p.pid}.tmp", f"samples/step_000009.{p.pid}.tmp.png"):  # a kill mid-write
        os.makedirs(os.path.dirname(os.path.join(out, stale)), exist_ok=True)
        with open(os.path.join(out, stale), "wb") as f:
            f.write(b"half a file")
    step = torch.load(os.path.join(out, "ckpt.pt"))["step"]
    run_train("--resume", out, "--steps", str(step + 2))
    assert torch.load(os.path.join(out, "ckpt.pt"))["step"] == step + 2
    assert sorted(os.listdir(out)) == RUN_FILES and not any(".tmp" in f for f in os.listdir(f"{out}/samples"))


def test_sigterm_saves_after_the_step_like_ctrl_c(blobs, tmp_path):
    out = str(tmp_path / "run")
    p, _ = start_training("--data", blobs, "--out", out, *LONG, "--ckpt-every", "100000")
    p.send_signal(signal.SIGTERM)  # timeout, docker stop, a cluster's pre-emption
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signal.SIGTERM and "SIGTERM: saving after this step" in rest, rest
    m = re.search(r"interrupted: checkpoint at step (\d+) in (.+); continue with --resume (.+)\n", rest)
    assert m[2] == os.path.join(out, "ckpt.pt") and m[3] == out
    assert torch.load(m[2])["step"] == int(m[1]) == int(read_log(out)[-1]["step"])
    assert sorted(os.listdir(out)) == RUN_FILES


def test_sighup_saves_too(blobs, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "hup")
    interrupt_at(monkeypatch, 4, sig=signal.SIGHUP)  # the terminal closed, in step 3
    with pytest.raises(SystemExit) as e:
        run_train("--data", blobs, "--out", out, "--steps", "10")
    assert e.value.code == 128 + signal.SIGHUP and "SIGHUP: saving after this step" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "ckpt.pt"))["step"] == 3 == int(read_log(out)[-1]["step"])


def test_a_run_is_never_written_over(blobs, tmp_path, capsys):
    a, b, c = (str(tmp_path / n) for n in "abc")
    run_train("--data", blobs, "--out", a, "--steps", "2")
    run_train("--data", blobs, "--out", b, "--steps", "4", "--seed", "1")
    files = [os.path.join(r, f) for r in (a, b) for f in ("ckpt.pt", "log.csv", "config.json")]
    before = [open(f, "rb").read() for f in files]
    for argv, message in (
            (["--data", blobs, "--out", a, "--steps", "2"],
             f"{a}: already holds a run ({a}/ckpt.pt); continue it with --resume {a}, or choose another "
             "--out"),
            (["--resume", a, "--out", b, "--steps", "6"],
             f"{b}: holds another run ({b}/ckpt.pt) that --resume {a} would write over; choose another "
             "--out")):
        with pytest.raises(SystemExit) as e:
            run_train(*argv)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert [open(f, "rb").read() for f in files] == before
    run_train("--resume", a, "--out", c, "--steps", "3")  # a new folder: the run goes on there
    assert torch.load(os.path.join(c, "ckpt.pt"))["step"] == 3 and sorted(os.listdir(c)) == RUN_FILES


def test_running_out_of_memory_is_one_line(blobs, tmp_path, capsys):
    """A real allocator failure: this process may map 1 GiB more than it has; a batch of 16384 needs more."""
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
    try:
        with pytest.raises(SystemExit) as e:
            facesynth.main(["train", "--data", blobs, "--out", str(tmp_path / "run"), "--steps", "1",
                            "--batch-size", "16384", *TINY_NET])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.fullmatch(r"error: out of memory \(allocating \d+ bytes\); use a smaller "
                                              r"--batch-size, --ngf or --ndf\n", err), err


def test_damaged_checkpoints_are_one_line_and_never_resumed_or_saved_over(blobs, tmp_path, capsys):
    good_run = str(tmp_path / "good")
    run_train("--data", blobs, "--out", good_run, "--steps", "2")
    good = torch.load(os.path.join(good_run, "ckpt.pt"))
    nan = copy.deepcopy(good)
    nan["G"]["down.1.0.weight"].view(-1)[5] = float("nan")
    whole = open(os.path.join(good_run, "ckpt.pt"), "rb").read()
    cases = {"nan": (nan, "G.down.1.0.weight holds NaN/inf values; the file is damaged"),
             "empty": (b"", "not a readable checkpoint"),
             "cut": (whole[:5000], "not a readable checkpoint"),
             "no_opt": ({k: v for k, v in good.items() if k != "opt_G"}, "not a whole facesynth checkpoint "
                        "(missing opt_G)"),
             "size": ({**good, "args": {**good["args"], "ngf": 16}}, "G's weights do not fit its options "
                      "(ngf 16,")}
    for name, (content, message) in cases.items():
        path = tmp_path / name / "ckpt.pt"
        path.parent.mkdir()
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        before = path.read_bytes()
        with pytest.raises(SystemExit) as e:
            facesynth.main(["train", "--resume", str(path.parent), "--steps", "4"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {path}: ") and message in err, err
        assert err.count("\n") == 1
        assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["ckpt.pt"]
    with pytest.raises(data.DataError, match="holds NaN/inf"):  # reenact and evaluate load G this way
        networks.load_generator(str(tmp_path / "nan"))


def damage(path, how):
    if how == "short":  # landmarks for one frame fewer than the frames
        np.save(path, np.load(path)[:-1])
    elif how == "nan":
        lm = np.load(path)
        lm[3, 10, 0] = np.nan
        np.save(path, lm)
    elif how == "cut":
        data_ = open(path, "rb").read()
        open(path, "wb").write(data_[:len(data_) // 2])
    else:
        open(path, "w").write(how)


@pytest.mark.parametrize("where, how, message", [
    ("001/landmarks.npy", "short", "float32 of shape (7, 68, 2), expected float (8, 68, 2) for its 8 frames"),
    ("001/landmarks.npy", "nan", "NaN/inf in 1 of 8 frames (the first: 3)"),
    ("001/frames.npy", "cut", "cannot read"),
    ("split.json", '{"train": ["000", ', "cannot read"),
    ("001/params.json", "{", "cannot read")])
def test_bad_prepared_data_is_one_line_naming_the_file(blobs, tmp_path, capsys, where, how, message):
    root = str(tmp_path / "data")
    shutil.copytree(blobs, root)
    damage(os.path.join(root, where), how)
    with pytest.raises(SystemExit) as e:
        run_train("--data", root, "--out", str(tmp_path / "run"), "--steps", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {os.path.join(root, where)}: "), err
    assert message in err
    assert err.count("\n") == 1 and not os.path.exists(os.path.join(tmp_path, "run", "ckpt.pt"))


def test_fused_passes_match_plain_passes():
    torch.manual_seed(0)
    G = networks.Generator(ngf=8)
    I_s = torch.rand(3, 3, 32, 32) * 2 - 1
    e = [data.heatmaps(torch.rand(3, 68, 2) * 31, 32) for _ in range(3)]
    outs, grads = [], []
    for fused in (True, False):
        G.zero_grad()
        fake, mid, cyc, tri = facesynth.generator_passes(G, I_s, *e, fused=fused)
        loss = losses.L_pix(fake, I_s) + losses.L_self(cyc, I_s) + losses.L_triple(tri, fake)
        loss.backward()
        outs.append(torch.stack([fake, mid, cyc, tri]))
        grads.append(torch.cat([p.grad.flatten() for p in G.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-4 * grads[1].abs().max().item())


def test_bench_compares_fast_and_plain_per_term_on_a_real_batch(blobs, capsys):
    argv = ["--device", "cpu", "--data", blobs, "--ngf", "8", "--ndf", "8", "--batch-size", "2", "--vgg-widths", "4", "4", "8", "8", "8"]
    facesynth.main(["bench", *argv, "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["batch"] == f"real ({blobs})" and res["batch_size"] == 2 and res["triplets_per_s"] > 0
    # one timed step: one round, no spread; the yardstick is never below what the step reached
    assert res["rounds"] == 1 and res["spread"] == 1.0 and 0 < res["utilization"] <= 1
    assert res["peak_kind"] in ("matmul", "conv", "step") and res["peak_gflops"] >= res["achieved_gflops"]
    by_term = res["fast_vs_plain_grad_rel_by_term"]
    assert set(by_term) == set(losses.TERMS) and all(f"{t} {v:.2g}" in out for t, v in by_term.items())
    # on the CPU the fast path is fp32 as well: only the fused passes' summation order differs
    assert max(by_term.values()) < 1e-4 and res["fast_vs_plain_grad_rel"] < 1e-4
    # CUDA's precision policy, bf16 emulated on the CPU: only VGG's terms move, G's own stay fp32-exact
    args = {"ngf": 8, "n_down": 4, "ndf": 8, "vgg_widths": [4, 4, 8, 8, 8], "batch_size": 2, "data": blobs}
    b, _ = extras.speed.bench_batch(args, torch.device("cpu"), facesynth.CACHE)
    lam = losses.lambdas({"adv": 0, "self": 0, "triple": 0, "id": 0})
    _, bf16 = extras.speed.fast_vs_plain(facesynth.train_step, functools.partial(extras.speed.bench_models, lr_g=facesynth.LR_G, lr_d=facesynth.LR_D, betas=facesynth.BETAS), args, torch.device("cpu"), b, lam, {"size": 32, "sigma": 1.0, "window": 7}, amp=True)
    assert set(bf16) == {"pix", "pp", "G"} and bf16["pix"] < 1e-4 and 1e-3 < bf16["pp"] < 0.5


def test_compiled_step_makes_its_graphs_once_and_matches_eager(blobs, monkeypatch):
    """--compile: each module's graphs are made in the first plain and the first log step, then never
    again. An ablated run's log steps add the measured-only passes, a new call pattern. TorchDynamo's
    capture is tested with its "eager" backend: inductor's code generation takes minutes on 2 cores
    (measured once by hand: the losses matched eager to 7e-7, G's gradient to 9e-6)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    args = {"ngf": 8, "n_down": 4, "ndf": 8, "vgg_widths": [4, 4, 8, 8, 8], "batch_size": 2, "data": blobs}
    b, _ = extras.speed.bench_batch(args, torch.device("cpu"), facesynth.CACHE)
    lam, cfg = losses.lambdas(ablate=["consistency"]), {"size": 32, "sigma": 1.0, "window": 7}
    runs = {}
    for compiled in (False, True):
        G, D, vgg, (opt_G, opt_D) = extras.speed.bench_models(args, torch.device("cpu"), facesynth.LR_G, facesynth.LR_D, facesynth.BETAS)
        models = extras.speed.compile_models((G, D, vgg), "default") if compiled else (G, D, vgg)
        torch._dynamo.reset()
        counters.clear()
        runs[compiled], graphs = [], []
        for i in range(5):  # log steps 1 and 3, which also measure the ablated terms, as train's log rows
            terms = facesynth.train_step(*models, opt_G, opt_D, b, lam, cfg)
            if i % 2 == 1:
                terms = {**facesynth.measure(*models, b, cfg), **terms}
            runs[compiled].append(terms)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] > 0 and graphs[2:] == [graphs[1]] * 3
    for eager, comp in zip(runs[False], runs[True]):
        assert eager.keys() == comp.keys() and all(torch.allclose(eager[k], comp[k], rtol=1e-4) for k in eager)


def test_vgg_in_channels_last_on_the_cpu_keeps_the_steps_maths(blobs):
    """networks.to_layout puts train's and bench's VGG in channels_last on the CPU (oneDNN's own layout),
    G and D stay NCHW. One step from the same weights on the same batch, against the same step in
    float64: the layout only reorders a convolution's sums, so G's gradient stays as close to float64's
    as all-NCHW's (measured 3.59e-5 both; the gradient runs through four G passes, D and VGG)."""
    args = {"ngf": 8, "n_down": 4, "ndf": 8, "vgg_widths": [4, 4, 8, 8, 8], "batch_size": 2, "data": blobs}
    b, _ = extras.speed.bench_batch(args, torch.device("cpu"), facesynth.CACHE)
    cfg, grads = {"size": 32, "sigma": 1.0, "window": 7}, {}
    is_cl = lambda m: [p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() > 3]
    for layout, dtype in (("vgg channels_last", torch.float32), ("nchw", torch.float32),
                          ("float64", torch.float64)):
        G, D, vgg, (opt_G, opt_D) = extras.speed.bench_models(args, torch.device("cpu"), facesynth.LR_G, facesynth.LR_D, facesynth.BETAS)
        assert all(is_cl(vgg)) and not any(is_cl(G) + is_cl(D))
        if layout != "vgg channels_last":
            vgg.to(dtype, memory_format=torch.contiguous_format)
            G.to(dtype), D.to(dtype)
        # no updates: D's comes before G's gradient (through L_adv), and Adam's first is ~lr * sign(g)
        opt_G.step = opt_D.step = lambda: None
        batch = {k: v.to(dtype) for k, v in b.items()}
        facesynth.train_step(G, D, vgg, opt_G, opt_D, batch, losses.lambdas(), cfg)
        grads[layout] = torch.cat([p.grad.double().flatten() for p in G.parameters()])
    err = {k: ((grads[k] - grads["float64"]).norm() / grads["float64"].norm()).item() for k in grads}
    assert err["vgg channels_last"] < 1.2 * err["nchw"] and err["nchw"] < 1e-4


class FakeClock:
    """extras.speed's clock, advanced only by the work the test says each call costs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    time = perf_counter


def test_yardstick_rate_counts_whole_runs_over_the_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(extras.speed, "time", clock)

    def run():  # each run takes 0.1 s: 4 runs to pass 0.35 s, 1e9 FLOPs each -> 4e9 / 0.4 s = 10 GFLOP/s
        clock.now += 0.1
    assert extras.speed.rate(run, 1e9, 0.35, lambda: None) == pytest.approx(10.0)
    assert extras.speed.rate(run, 1e9, 0.0, lambda: None) == pytest.approx(10.0)  # always at least one run


def test_yardsticks_count_flops_by_hand_and_the_faster_one_is_the_peak(monkeypatch):
    monkeypatch.setattr(extras.speed, "MATMUL_N", 16)
    monkeypatch.setattr(extras.speed, "CONV_SHAPE", (2, 8, 8))
    # 2 FLOPs a multiply-add; the conv's backward (input and weight grads) is twice its forward
    mm_flops, conv_flops = 2 * 16 ** 3, 3 * 2 * (2 * 8 * 8 * 8 * 8) * 9
    sticks = extras.speed.yardsticks(torch.device("cpu"))
    for name, flops in (("matmul", mm_flops), ("conv", conv_flops)):
        with FlopCounterMode(display=False) as counter:
            sticks[name][0]()
        assert sticks[name][1] == flops == counter.get_total_flops()  # counted as bench counts the step
    for rates, best in (({"matmul": 205.0, "conv": 300.0}, (300.0, "conv")),
                        ({"matmul": 400.0, "conv": 300.0}, (400.0, "matmul"))):
        v = extras.speed.verdict([100.0], [rates])
        assert (v["peak_gflops"], v["peak_kind"]) == best


def test_bench_interleaves_step_blocks_with_the_yardsticks():
    calls = []
    sticks = {"matmul": (lambda: calls.append("matmul"), 1), "conv": (lambda: calls.append("conv"), 1)}
    step_s, peaks = extras.speed.interleaved(lambda: calls.append("step"), sticks, 5, 2, 0.0, lambda: None,
                                             log=lambda *a: None)
    assert calls == ["step"] * 3 + ["matmul", "conv"] + ["step"] * 2 + ["matmul", "conv"]
    assert len(step_s) == len(peaks) == 2 and all(set(p) == {"matmul", "conv"} for p in peaks)


def test_verdict_takes_the_best_of_each_side_and_never_exceeds_the_peak():
    v = extras.speed.verdict([100.0, 150.0, 120.0], [{"matmul": 200.0, "conv": 290.0},
                                                     {"matmul": 205.0, "conv": 300.0},
                                                     {"matmul": 150.0, "conv": 250.0}])
    # best step 150 over the best yardstick, conv's 300; spread: the step's 150/100 beats the peak's 300/250
    assert v == {"achieved_gflops": 150.0, "peak_gflops": 300.0, "peak_kind": "conv", "utilization": 0.5,
                 "spread": 1.5, "busy": True}
    v = extras.speed.verdict([280.0, 295.0], [{"matmul": 205.0, "conv": 250.0},
                                              {"matmul": 200.0, "conv": 260.0}])
    # a step above every yardstick is the peak itself: utilization 1, never 295/260
    assert (v["peak_kind"], v["peak_gflops"], v["utilization"]) == ("step", 295.0, 1.0)
    assert v["spread"] == pytest.approx(295 / 280) and not v["busy"]


def test_bench_warns_when_the_rounds_spread(blobs, monkeypatch, capsys):
    # two rounds, the second twice as slow (a busy host) and yardsticks far below the step's rate
    monkeypatch.setattr(extras.speed, "CONV_SHAPE", (2, 8, 8))
    monkeypatch.setattr(extras.speed, "interleaved", lambda one, sticks, steps, rounds, *a:
                        ([1.0, 2.0], [{"matmul": 1e-6, "conv": 2e-6}, {"matmul": 1e-6, "conv": 1e-6}]))
    facesynth.main(["bench", "--device", "cpu", "--data", blobs, "--batch-size", "2", "--steps", "2",
                    "--warmup", "0", "--ngf", "8", "--ndf", "8", "--vgg-widths", "4", "4", "8", "8", "8"])
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["rounds"] == 2 and res["step_ms"] == 1000.0 and res["triplets_per_s"] == 2.0
    assert res["spread"] == 2.0 and "warning: the rounds differ by 2.00x" in out
    assert res["peak_kind"] == "step" and res["utilization"] == 1.0
    assert "the step outran every yardstick" in out


TINY_NET = ["--ngf", "8", "--vgg", "random", "--vgg-widths", "4", "4", "8", "8", "8", "--device", "cpu"]


def assert_same_state(a, b, path="", **tol):
    """Every tensor (and every other value) of two nested state dicts equal."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, msg=path, **tol)
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}", **tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]", **tol)
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def uninterrupted(blobs, tmp_path_factory):
    """7 steps of batch 4 at 12 triplets per epoch: 3 steps per epoch, so steps 3 and 6 start epochs."""
    out = str(tmp_path_factory.mktemp("full"))
    facesynth.main(["train", "--data", blobs, "--out", out, "--steps", "7", "--batch-size", "4",
                    "--triplets-per-epoch", "12", "--log-every", "1", "--sample-every", "100", *TINY_NET])
    return out


def test_resume_restores_every_tensor_across_an_epoch_boundary(blobs, uninterrupted, tmp_path):
    out = str(tmp_path / "resumed")
    facesynth.main(["train", "--data", blobs, "--out", out, "--steps", "4", "--batch-size", "4",
                    "--triplets-per-epoch", "12", "--log-every", "1", "--sample-every", "100", *TINY_NET])
    assert torch.load(os.path.join(out, "ckpt.pt"))["step"] == 4  # stopped inside epoch 1
    facesynth.main(["train", "--resume", out, "--steps", "7"])  # goes on through epoch 2's start
    a, b = torch.load(os.path.join(uninterrupted, "ckpt.pt")), torch.load(os.path.join(out, "ckpt.pt"))
    assert a["step"] == b["step"] == 7
    for k in ("G", "D", "opt_G", "opt_D"):
        assert_same_state(a[k], b[k], k, rtol=1e-6, atol=1e-7)
    # the log: one row per step, the resumed rows as the uninterrupted run's
    rows = []
    for d in (uninterrupted, out):
        with open(os.path.join(d, "log.csv"), newline="") as f:
            rows.append(list(csv.DictReader(f)))
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [str(i) for i in range(1, 8)]
    for x, y in zip(*rows):
        for t in ("adv", "pix", "self", "triple", "pp", "id", "G", "D"):
            assert float(x[f"L_{t}"]) == pytest.approx(float(y[f"L_{t}"]), rel=1e-5, abs=1e-7)


def test_training_uses_the_papers_settings(uninterrupted):
    ck = torch.load(os.path.join(uninterrupted, "ckpt.pt"))
    assert ck["lambdas"] == PAPER_LAMBDAS
    assert ck["args"]["sigma"] == 1.0 and ck["args"]["window"] == 7
    (gG,), (gD,) = ck["opt_G"]["param_groups"], ck["opt_D"]["param_groups"]
    assert gG["lr"] == pytest.approx(2e-4) and gD["lr"] == pytest.approx(5e-5)  # Adam, G 2e-4, D 5e-5
    assert tuple(gG["betas"]) == tuple(gD["betas"]) == pytest.approx((0.5, 0.999))  # pix2pix's
    # each optimiser holds exactly its own network's parameters
    for opt, group, model in (("opt_G", gG, networks.Generator(ngf=8)), ("opt_D", gD, networks.Discriminator())):
        shapes = [tuple(p.shape) for p in model.parameters()]
        assert [tuple(ck[opt]["state"][i]["exp_avg"].shape) for i in group["params"]] == shapes, opt


def _batch_keys(b):
    return [tuple(b[k][i].numpy().tobytes() for k in ("I_s", "I_t", "lm_s", "lm_m", "lm_t")) for i in range(len(b["I_s"]))]


def test_ranks_read_disjoint_halves_of_the_one_process_batch(blobs):
    videos = data.load_videos(blobs, "train")
    one = {"batch_size": 4, "triplets_per_epoch": 16, "seed": 5, "max_gap": None}  # 4 steps per epoch
    two = dict(one, batch_size=2)  # per rank: 2 ranks x 2 = the same 4 triplets per step
    steps = 10  # crosses two epoch boundaries
    whole = list(data.batches(videos, one, 0, steps))
    r0, r1 = (list(data.batches(videos, two, 0, steps, rank=r, world=2)) for r in (0, 1))
    assert [s for s, _ in whole] == [s for s, _ in r0] == [s for s, _ in r1] == list(range(steps))
    for (_, w), (_, a), (_, c) in zip(whole, r0, r1):
        ka, kc = _batch_keys(a), _batch_keys(c)
        assert len(ka) == len(kc) == 2 and not set(ka) & set(kc), "the two ranks must see different triplets"
        assert sorted(ka + kc) == sorted(_batch_keys(w)), "together they are the one-process batch"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cancelled_biases(model):
    """Conv biases directly followed by a per-channel norm (GroupNorm(C, C)), which subtracts them out
    again: their true gradient is 0, and Adam turns the rounding noise in it into steps of up to ~lr."""
    names = set()
    for prefix, m in model.named_modules():
        kids = list(m.named_children()) if isinstance(m, nn.Sequential) else []
        for (name, a), (_, nxt) in zip(kids, kids[1:]):
            if isinstance(a, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(nxt, (nn.InstanceNorm2d, nn.GroupNorm)):
                names.add(f"{prefix}.{name}.bias".lstrip("."))
    return names


def test_two_process_gloo_equals_one_process_with_the_double_batch(blobs, tmp_path):
    """2 ranks x batch 2 against 1 process x batch 4, from the same seed. DDP averages the ranks'
    gradients, every loss is a per-sample mean and G and D normalise per sample, so the two runs
    compute the same gradient up to float rounding, if and only if the ranks' triplets are disjoint
    halves of the one-process batch. The weights are then equal except where Adam magnifies rounding
    noise: its step is ~lr * sign(gradient) for any gradient far above eps, so an element whose true
    gradient is ~0 moves by up to ~lr either way. That is all of a conv bias that an InstanceNorm
    subtracts out again, and (measured) at most 0.1% of any other tensor's elements, while a wrong
    shard moves 50-90% of the elements of most tensors by about lr. The test allows 1%. More steps
    are chaotic (3 steps: up to 1.5% of a tensor with other loss weights), so it runs 2, which
    cover a shard at i = 0 and i = 1; test_ranks_read_disjoint_halves_... crosses epochs."""
    common = ["--data", blobs, "--steps", "2", "--triplets-per-epoch", "8", "--log-every", "2",
              "--sample-every", "100", *TINY_NET]  # 8 // (2 x 2) = 8 // 4 = 2 steps per epoch in both runs
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "facesynth.py", "train", *common, "--out", ddp, "--batch-size", "2"]
    r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(facesynth.__file__)), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 ranks identical: True" in r.stdout
    facesynth.main(["train", *common, "--out", single, "--batch-size", "4"])
    a, b = torch.load(os.path.join(ddp, "ckpt.pt")), torch.load(os.path.join(single, "ckpt.pt"))
    assert a["step"] == b["step"] == 2
    for key, model, lr in (("G", networks.Generator(ngf=8), 2e-4), ("D", networks.Discriminator(), 5e-5)):
        noisy = cancelled_biases(model)
        assert set(a[key]) == set(b[key]) == set(model.state_dict())
        for name in a[key]:
            diff = (a[key][name] - b[key][name]).abs()
            assert diff.max() <= 1.5 * 2 * 2 * lr, f"{key}.{name}: more than Adam can move it in 2 steps"
            if name not in noisy:
                off = int((diff > lr / 4).sum())
                assert off <= max(1, diff.numel() // 100), \
                    f"{key}.{name}: {off} of {diff.numel()} elements differ by more than lr/4 (max {diff.max():.2g})"



def two_ranks(*argv):
    """Two real training processes as torchrun would start them, rank 0 and rank 1, stdout and stderr apart."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2")
    cmd = [sys.executable, "facesynth.py", "train", *argv, "--triplets-per-epoch", "8", *TINY_NET,
           "--batch-size", "2"]
    return [subprocess.Popen(cmd, cwd=HERE, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]


def finish(ranks):
    """Each rank's (stdout, stderr) once it has exited; both killed if that takes two minutes."""
    try:
        return [p.communicate(timeout=120) for p in ranks]
    finally:
        for p in ranks:
            p.kill()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(blobs, tmp_path):
    """A scheduler may signal one rank before another, or only one. Every rank must stop after the
    same step and rank 0 save it: the worst case is the signal reaching rank 1 alone, whose leaving
    would otherwise strand rank 0 in the next step's all-reduce with no checkpoint written."""
    out = str(tmp_path / "run")
    # the ranks agree at steps they all log or save: here every 20th, so within 20 steps of the signal
    ranks = two_ranks("--data", blobs, "--out", out, *LONG, "--log-every", "20", "--ckpt-every", "100000")
    try:
        head = first_step(ranks[0])  # rank 0 logs; once it has finished a step, signal rank 1 alone
        ranks[1].send_signal(signal.SIGTERM)
    finally:
        said = finish(ranks)
    rest = head + said[0][0]
    assert [p.returncode for p in ranks] == [128 + signal.SIGTERM] * 2, (rest, said)
    m = re.search(r"interrupted: checkpoint at step (\d+) in (.+); continue with --resume", rest)
    assert m and m[2] == os.path.join(out, "ckpt.pt"), rest
    assert torch.load(m[2])["step"] == int(m[1]) == int(read_log(out)[-1]["step"]) >= 1
    assert sorted(os.listdir(out)) == RUN_FILES


def test_a_nan_loss_stops_every_rank_with_one_line(blobs, tmp_path):
    """Adam at lr 1e30 makes the losses overflow at once. Rank 0 prints its lines and rank 1 none, so
    the NaN check must run at steps every rank knows, or rank 0 stops and rank 1, still training,
    dies in the next all-reduce with a traceback."""
    ranks = two_ranks("--data", blobs, "--out", str(tmp_path / "run"), "--steps", "40", "--log-every", "10",
                      "--lr-g", "1e30", "--lr-d", "1e30")
    said = finish(ranks)
    assert [p.returncode for p in ranks] == [2, 2], said
    for _, err in said:
        assert err.endswith("; stopped (no checkpoint was written)\n") and "Traceback" not in err, said
        assert "error: loss became NaN/inf by step 1;" in err, said

# ================================================================================================
# evaluation: PNG, viridis, metrics, figures, tables
# ================================================================================================
TERMS = losses.TERMS


def make_dataset(root, n_videos=3, n_frames=6, seed=0):
    """A tiny prepared dataset: smooth random frames and landmarks inside the crop."""
    rng = np.random.default_rng(seed)
    names = [f"{i:03d}" for i in range(n_videos)]
    for name in names:
        os.makedirs(root / name)
        base = rng.integers(0, 256, (n_frames, 4, 4, 3)).astype(np.uint8)
        frames = np.stack([np.asarray(Image.fromarray(f).resize((S, S), Image.BILINEAR)) for f in base])
        np.save(root / name / "frames.npy", frames)
        np.save(root / name / "landmarks.npy", rng.uniform(4, S - 5, (n_frames, 68, 2)).astype(np.float32))
    (root / "split.json").write_text(json.dumps({"train": [], "test1": [], "test2": names, "test3": []}))
    (root / "prepare.json").write_text(json.dumps({"size": S, "crop_scale": 1.8, "synthetic": False}))
    return root


def make_run(run, root, seed=0, ablate=(), n_log=30):
    """A run folder as facesynth.train leaves it, with an untrained tiny G (ngf 4): its checkpoint, and its
    config.json and log.csv written by train's own writers (start_outputs, log_row)."""
    torch.manual_seed(seed)
    args = {"data": str(root), "size": S, "ngf": 4, "n_down": 3, "sigma": 1.0, "window": 7, "seed": seed}
    lam = {t: (0.0 if t in ablate else w) for t, w in PAPER_LAMBDAS.items()}
    G = networks.Generator(ngf=4, n_down=3)
    networks.save_checkpoint(str(run / "ckpt.pt"), {"G": G.state_dict(), "args": args, "step": n_log * 10,
                                                    "lambdas": lam, "vgg": "random"})
    extras.runs.start_outputs(str(run), {"args": args, "lambdas": lam, "vgg": "random"}, 0)
    rng = np.random.default_rng(seed)
    for i in range(n_log):
        vals = {t: rng.uniform(0.5, 1.5) / (i + 1) ** 0.3 for t in TERMS if t not in ablate}
        extras.runs.log_row(str(run / "log.csv"), 10 * (i + 1), 100, i, 5.0, {**vals, "G": 50 / (i + 1) ** 0.3,
                                                                           "D": 0.69}, (2e-4, 5e-5))
    return run


@pytest.fixture
def setup(tmp_path):
    root = make_dataset(tmp_path / "prep")
    runs = [make_run(tmp_path / "runs" / name, root, seed) for name, seed in (("full", 0), ("nopix", 1))]
    return root, runs


def test_png_is_read_back_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for shape in ((7, 5, 3), (1, 1, 3), (13, 9), (40, 33, 3)):
        img = rng.integers(0, 256, shape).astype(np.uint8)
        path = evaluate.write_png(str(tmp_path / f"x{len(shape)}_{shape[0]}.png"), img)
        with Image.open(path) as im:
            assert im.mode == ("RGB" if len(shape) == 3 else "L")
            assert np.array_equal(np.asarray(im), img)


def test_viridis_matches_published_colormap():
    published = {0.0: (0.267004, 0.004874, 0.329415), 0.5: (0.127568, 0.566949, 0.550556),
                 1.0: (0.993248, 0.906157, 0.143936)}
    for t, rgb in published.items():
        assert np.abs(evaluate.viridis(t).astype(int) - np.round(np.array(rgb) * 255)).max() <= 1
    assert tuple(evaluate.viridis(0.0)) == (68, 1, 84) and tuple(evaluate.viridis(1.0)) == (253, 231, 37)


def test_error_heatmap_bounds():
    a = np.random.default_rng(0).integers(0, 100, (8, 8, 3)).astype(np.uint8)
    assert (evaluate.error_heatmap(a, a) == (68, 1, 84)).all()          # identical: all dark blue
    assert (evaluate.error_heatmap(a + 96, a) == (253, 231, 37)).all()  # 96 levels: yellow
    assert (evaluate.error_heatmap(a + 150, a) == (253, 231, 37)).all()  # beyond: still yellow
    assert (evaluate.error_heatmap(a + 50, a, vmax=50) == (253, 231, 37)).all()


def test_ssim_matches_scikit_image_and_a_hand_value():
    """Wang et al.'s SSIM as scikit-image computes it with the standard settings (Gaussian window sigma
    1.5, data range 255, population covariance), on photo crops and degraded copies of them."""
    zero, ten = np.zeros((1, S, S, 3), np.uint8), np.full((1, S, S, 3), 10, np.uint8)
    # two flat images: no variance, so SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = (0.01 * 255)^2
    assert evaluate.ssim(zero, ten)[0] == pytest.approx(6.5025 / (100 + 6.5025), rel=1e-6)
    assert evaluate.ssim(ten, ten)[0] == pytest.approx(1.0)
    try:
        from skimage.data import astronaut, chelsea
        from skimage.metrics import structural_similarity
    except ImportError:
        pytest.skip("scikit-image is not installed (pip install scikit-image): the reference SSIM")
    rng = np.random.default_rng(0)
    shrink = lambda im, box: np.asarray(Image.fromarray(im).resize((48, 48), Image.BICUBIC, box=box))
    face, cat = shrink(astronaut(), (140, 30, 330, 220)), shrink(chelsea(), (50, 0, 350, 300))
    blurred = np.asarray(Image.fromarray(face).resize((16, 16), Image.BILINEAR).resize((48, 48)))
    noisy = np.clip(face + rng.normal(0, 12, face.shape), 0, 255).astype(np.uint8)
    darker = (face * 0.6 + 20).astype(np.uint8)
    a, b = np.stack([face, face, face, face]), np.stack([blurred, noisy, darker, cat])
    want = [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=255, channel_axis=-1) for x, y in zip(a, b)]
    assert max(want) < 0.9 and min(want) < 0.01  # from similar to unrelated
    np.testing.assert_allclose(evaluate.ssim(a, b), want, rtol=1e-6)


def test_l1_and_psnr_per_pair_by_hand():
    """A batch of two pairs with different errors: each pair is scored on its own,
    PSNR = 10 log10(255^2 / MSE)."""
    gen, tgt = np.zeros((2, S, S, 3), np.uint8), np.zeros((2, S, S, 3), np.uint8)
    gen[0] = 10                # every pixel off by 10: L1 10, MSE 100
    gen[1, :S // 2] = 30       # half the pixels off by 30: L1 15, MSE 450
    s = evaluate.scores(gen, tgt)
    np.testing.assert_allclose(s["L1"], [10, 15])
    np.testing.assert_allclose(s["PSNR"], [10 * np.log10(65025 / 100), 10 * np.log10(65025 / 450)])
    assert evaluate.scores(tgt, tgt)["PSNR"] == pytest.approx([10 * np.log10(65025 / 1e-10)] * 2)  # floored
    assert s["SSIM"].shape == (2,)


def test_flicker_by_hand():
    """Mean |frame t+1 - frame t| over time, pixels and channels."""
    texture = np.random.default_rng(0).integers(0, 240, (16, 16, 3), dtype=np.uint8)
    assert evaluate.flicker(np.repeat(texture[None], 6, 0)) == 0.0  # a still, textured video
    brightening = np.stack([np.full((16, 16, 3), 100 + 5 * t, np.uint8) for t in range(6)])
    assert evaluate.flicker(brightening) == pytest.approx(5.0)  # flat frames, 5 levels brighter each frame
    half = np.repeat(texture[None], 3, 0)
    half[1, :8] += 10  # the top half 10 levels brighter in the middle frame only: 5 on average, twice
    assert evaluate.flicker(half) == pytest.approx(5.0)
    assert evaluate.flicker(texture[None]) == 0.0


def test_confidence_interval_and_sign_flip_test():
    m, lo, hi = evaluate.mean_ci([1.0, 2.0, 3.0])
    assert m == 2 and hi - m == pytest.approx(4.303 / np.sqrt(3), abs=1e-3)
    for n, t in ((2, 12.706), (5, 2.776), (6, 2.5706), (11, 2.2281), (31, 2.0423)):  # published t quantiles
        m, lo, hi = evaluate.mean_ci(np.arange(n, dtype=float))
        assert hi - m == pytest.approx(t * np.std(np.arange(n), ddof=1) / np.sqrt(n), rel=2e-3)
    assert extras.ablation.sign_flip_p(np.full(30, 0.5) + np.random.default_rng(0).normal(0, 0.1, 30)) < 0.001
    assert extras.ablation.sign_flip_p(np.tile([1.0, -1.0], 15)) > 0.5


def test_pairs_are_deterministic(setup):
    root, _ = setup
    _, videos = evaluate.videos_of(str(root))
    assert evaluate.eval_pairs(videos, 10) == evaluate.eval_pairs(videos, 10)
    assert evaluate.eval_pairs(videos, 4) == evaluate.eval_pairs(videos, 10)[:4]  # figures: metrics' first pairs
    assert all(s != t for _, s, t in evaluate.eval_pairs(videos, 50))
    # a pair is two distinct frames of one video, every ordered pair of the 3 x 6 x 5 equally likely
    pairs = evaluate.eval_pairs(videos, 3000, seed=1)
    assert len(set(pairs)) == 3 * 6 * 5 and pairs[:10] != evaluate.eval_pairs(videos, 10)  # seed matters
    counts = np.unique(np.array(pairs), axis=0, return_counts=True)[1]
    assert counts.min() > 10 and counts.max() < 60  # 33 each expected, a standard deviation of 6


def test_one_frame_videos_are_left_out_of_pairs_and_flicker(setup, monkeypatch):
    """As an older prepare could leave them in a test split: metrics must not crash on them."""
    monkeypatch.setitem(sys.modules, "dlib", None)  # the judge is not what this tests (and slow)
    root, runs = setup
    for f in ("frames.npy", "landmarks.npy"):
        np.save(root / "000" / f, np.load(root / "000" / f)[:1])
    _, videos = evaluate.videos_of(str(root))
    assert [len(v["landmarks"]) for v in videos] == [1, 6, 6]
    assert {v for v, _, _ in evaluate.eval_pairs(videos, 50)} == {1, 2}
    m = evaluate.metrics([str(runs[0])], n_pairs=12)
    assert len(m["runs"][str(runs[0])]["pairs"]["L1"]) == 12
    assert len(m["runs"][str(runs[0])]["pairs"]["flicker"]) == 2  # the 1-frame video has no flicker


def test_metrics_table_with_cis_and_judge_skipped(setup, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if dlib were not installed
    root, runs = setup
    assert evaluate.metrics([str(runs[0])], n_pairs=2)["judge"] == "off (--judge N)"  # unless asked for
    m = evaluate.metrics([str(r) for r in runs], n_pairs=12, judge=12)
    assert m["split"] == "test2" and m["judge"].startswith("skipped")
    by_third = {f"{k}_{t}" for k in ("L1", "PSNR", "SSIM") for t in ("small", "medium", "large")}
    for r in runs:
        summ = m["runs"][str(r)]["summary"]
        assert set(summ) == {"L1", "PSNR", "SSIM", "flicker"} | by_third and len(m["runs"][str(r)]["pairs"]["L1"]) == 12
        mean, lo, hi = summ["L1"]
        assert lo < mean < hi
        flick = m["runs"][str(r)]["pairs"]["flicker"]  # one ratio per test video, generated vs real
        assert len(flick) == len(data.load_videos(root, "test2")) and all(x > 0 for x in flick)
    # the floor, on the same 12 pairs: copy never moves (no flicker), warp does
    assert set(m["baselines"]) == {"copy", "warp"}
    assert set(m["baselines"]["copy"]["summary"]) == {"L1", "PSNR", "SSIM"} | by_third
    assert set(m["baselines"]["warp"]["summary"]) == {"L1", "PSNR", "SSIM", "flicker"} | by_third
    table = evaluate.save_metrics(m, str(tmp_path / "out"))
    assert table.count("\n") == 5 and "full" in table and "nopix" in table and "[" in table
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| copy", "| warp", "| full", "| nopix"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert len(rows) == 2 * 13 + 12 + 13 and {r["metric"] for r in rows} == {"L1", "PSNR", "SSIM", "flicker"} | by_third
    # a third's row counts its own pairs, and the three thirds count all 12
    assert sum(int(r["n"]) for r in rows if r["run"] == "full" and r["metric"].startswith("L1_")) == 12


def test_figures(setup, tmp_path):
    root, runs = setup
    out = str(tmp_path / "fig")
    path = evaluate.heatmap_figure([str(r) for r in runs], out, n=3)
    with Image.open(path) as im:  # source, landmarks, 2 generated, warp, target, 3 errors (the warp's too)
        assert im.width == 9 * 128 and im.height > 3 * 128
    assert len(os.listdir(os.path.join(out, "heatmaps"))) == 9
    test2 = json.load(open(root / "split.json"))["test2"]
    frames = np.concatenate([np.load(root / v / "frames.npy") for v in test2])
    for p in evaluate.grid_figures([str(runs[0])], out, n=2):
        grid = np.asarray(Image.open(p))
        assert grid.shape == (18 + 2 * 128, 5 * 128, 3)  # source, target landmarks, generated, warp, target
        tile = lambda r, c: grid[18 + r * 128:18 + (r + 1) * 128:4, c * 128:(c + 1) * 128:4]  # back to 32 px
        assert all(any(np.array_equal(tile(r, c), f) for f in frames) for r in (0, 1) for c in (0, 4))
        grey = lambda t: (t == t[..., :1]).all()
        assert grey(tile(0, 1)) and not grey(tile(0, 2))  # the landmark picture is grey, G's drawing is not
    for p in evaluate.loss_figures([str(r) for r in runs], out):
        with Image.open(p) as im:
            assert im.size == (2 * 380, 280) and len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 5


def test_cli(setup, tmp_path, capsys):
    root, runs = setup
    r = subprocess.run([sys.executable, "evaluate.py", "metrics", "--runs", *map(str, runs), "--n", "6", "--out",
                        str(tmp_path / "m")], capture_output=True, text=True, cwd=os.path.dirname(evaluate.__file__))
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and any(l.startswith("run ") for l in lines) and "wrote" in r.stdout, r.stderr
    assert max(len(l) for l in lines[lines.index(next(l for l in lines if l.startswith("run "))):-2]) <= 100
    assert "| run |" in open(tmp_path / "m" / "metrics.md").read()
    m = json.load(open(tmp_path / "m" / "metrics.json"))
    m["runs"] = {f"runs/a-long-run-name-{i}": {**r, "summary": {**r["summary"], **{f"x{k}": r["summary"]["L1"]
                 for k in range(20)}}} for i, r in enumerate(list(m["runs"].values()) * 3)}
    text, rest = extras.cli.short_table(evaluate.rows(m), evaluate.FIRST, evaluate.WIDTH)
    assert max(map(len, text.splitlines())) <= 100 and len(rest) > 10 and text.count("\n") == 9  # copy, warp, 6 runs
    for cmd in ("heatmaps", "grid", "losses"):
        evaluate.main([cmd, "--runs", str(runs[0]), "--out", str(tmp_path / cmd)])
        assert "wrote" in capsys.readouterr().out


def test_cli_errors(setup, tmp_path, capsys, monkeypatch):
    root, runs = setup
    os.makedirs(tmp_path / "fresh")
    monkeypatch.chdir(tmp_path / "fresh")  # no runs/ here
    for cmd in ("grid", "metrics", "losses"):
        with pytest.raises(SystemExit):
            evaluate.main([cmd])
        assert "no trained run under runs/ yet: train one first (python facesynth.py train" in \
            capsys.readouterr().err
    # without --runs, the run whose checkpoint was written last, ablation runs included
    fresh = tmp_path / "fresh" / "runs"
    make_run(fresh / "a" / "s0", root), os.utime(make_run(fresh / "old", root) / "ckpt.pt", (1e9, 1e9))
    assert extras.cli.latest_run() == [os.path.join("runs", "a", "s0")]
    shutil.rmtree(tmp_path / "fresh" / "runs")
    # every run is checked before any is scored: a typo in the last one costs nothing
    with pytest.raises(SystemExit):
        evaluate.main(["metrics", "--runs", str(runs[0]), str(tmp_path / "typo")])
    out = capsys.readouterr()
    assert "typo: no checkpoint there" in out.err and "metrics 1/2" not in out.out
    os.makedirs(tmp_path / "empty_run")
    (root / "split.json").write_text(json.dumps({"train": ["000"], "test1": []}))
    for run in (tmp_path / "nope", tmp_path / "empty_run", runs[0]):  # no folder, no ckpt.pt, empty split
        with pytest.raises(SystemExit) as e:
            evaluate.main(["metrics", "--runs", str(run), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("cmd", ["metrics", "heatmaps"])
def test_nan_landmarks_stop_evaluation_with_one_line(setup, tmp_path, capsys, cmd):
    root, runs = setup
    lm = np.load(root / "001" / "landmarks.npy")
    lm[2, 5] = np.nan
    np.save(root / "001" / "landmarks.npy", lm)
    with pytest.raises(SystemExit) as e:
        evaluate.main([cmd, "--runs", str(runs[0]), "--out", str(tmp_path / "o"), "--n", "4"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: {root / '001' / 'landmarks.npy'}: NaN/inf in 1 of 6 frames (the first: 2); prepare the video "
        "again\n")
    assert not os.path.exists(tmp_path / "o" / "heatmaps.png")


def ramp_dataset(root):
    """One video of two 16-px frames: a ramp, 10 x its column, and the same ramp moved 2 px right (its
    first two columns repeating its edge, 0), with the 68 landmarks moved alike."""
    ramp = np.repeat(np.repeat((10 * np.arange(16)).astype(np.uint8)[None, :, None], 16, 0), 3, 2)
    moved = ramp.copy()
    moved[:, 2:], moved[:, :2] = ramp[:, :-2], 0
    lm = np.stack(np.meshgrid(np.linspace(3, 11, 17), np.linspace(4, 10, 4)), -1).reshape(68, 2).astype(np.float32)
    os.makedirs(root / "v")
    np.save(root / "v" / "frames.npy", np.stack([ramp, moved]))
    np.save(root / "v" / "landmarks.npy", np.stack([lm, lm + (2, 0)]))
    (root / "split.json").write_text(json.dumps({"train": ["v"], "test1": ["v"]}))
    (root / "prepare.json").write_text(json.dumps({"size": 16, "crop_scale": 1.8}))
    return ramp, moved, lm


def test_the_floor_by_hand_on_a_pure_translation(tmp_path):
    """copy and warp on a 2-px shift. |ramp - moved| is 0, 10, then 20 in its 14 other columns: copy's
    L1 is (0 + 10 + 14 x 20) / 16 = 18.125 either way. warp moves the source's pixels with its landmarks
    (a thin-plate spline through a pure translation is that translation): ramp -> moved is exact (its
    repeated edge is the border rule's), moved -> ramp is exact inside and off only where it reads past
    the last column, 140 and 150 drawn as 130: L1 (10 + 20) / 16 = 1.875."""
    ramp, moved, lm = ramp_dataset(tmp_path / "ramp")
    copy, warp = extras.yardsticks.draw("copy"), extras.yardsticks.draw("warp")
    src, src_lm, tgt_lm = np.stack([ramp, moved]), np.stack([lm, lm + (2, 0)]), np.stack([lm + (2, 0), lm])
    tgt = np.stack([moved, ramp])
    assert np.array_equal(copy(src, src_lm, tgt_lm), src)
    drawn = warp(src, src_lm, tgt_lm)
    assert np.array_equal(drawn[0], moved) and np.array_equal(drawn[1][:, :14], ramp[:, :14])
    assert evaluate.scores(copy(src, src_lm, tgt_lm), tgt)["L1"] == pytest.approx([18.125, 18.125])
    assert evaluate.scores(drawn, tgt)["L1"] == pytest.approx([0, 1.875])
    # through metrics: rows named copy and warp, scored on the run's own pairs
    run = make_run(tmp_path / "run", tmp_path / "ramp")
    ckpt = torch.load(run / "ckpt.pt")
    ckpt["args"]["size"] = 16
    torch.save(ckpt, run / "ckpt.pt")
    m = evaluate.metrics([str(run)], n_pairs=8)
    assert m["baselines"]["copy"]["pairs"]["L1"] == pytest.approx([18.125] * 8)
    assert set(np.round(m["baselines"]["warp"]["pairs"]["L1"], 6)) <= {0, 1.875}
    assert m["baselines"]["warp"]["summary"]["L1"][0] < 1.875


def test_motion_thirds_by_hand():
    """Six pairs on a 10 x 10 face moved 1 .. 6 px right: motion (mean displacement / face size) 0.1 ..
    0.6. numpy's quantiles interpolate linearly between order statistics: 1/3 -> 0.1 + (5/3) 0.1,
    2/3 -> 0.1 + (10/3) 0.1. So the thirds are {0.1, 0.2}, {0.3, 0.4}, {0.5, 0.6}, and a score equal to
    the motion (x10) averages 1.5, 3.5 and 5.5 over them."""
    face = np.stack(np.meshgrid(np.linspace(0, 10, 17), np.linspace(0, 10, 4)), -1).reshape(68, 2)
    src = np.repeat(face[None], 6, 0)
    tgt = src + np.arange(1, 7)[:, None, None] * np.array([1.0, 0.0])
    m = extras.yardsticks.motion(src, tgt)
    np.testing.assert_allclose(m, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    edges, masks = extras.yardsticks.thirds(m)
    assert edges == pytest.approx([0.1 + 5 / 30, 0.1 + 10 / 30])
    assert [list(np.flatnonzero(masks[k])) for k in ("small", "medium", "large")] == [[0, 1], [2, 3], [4, 5]]
    summary, count = extras.yardsticks.summarise({"L1": 10 * m, "flicker": m}, {"": m}, evaluate.mean_ci)
    assert [summary[f"L1_{k}"][0] for k in ("small", "medium", "large")] == pytest.approx([1.5, 3.5, 5.5])
    assert count["L1_large"] == 2 and "flicker_large" not in summary  # thirds for L1/PSNR/SSIM only


def test_a_short_runs_terminal_table_fits_in_100_columns(blobs, tmp_path, capsys):
    """A real 3-step run's table: long numbers such as 0.0389±0.00086 once pushed it to 143 characters.
    Every line fits in 100, and it shows the floor's rows and the large third."""
    run = str(tmp_path / "run")
    run_train("--data", blobs, "--out", run, "--steps", "3", "--output", "warp")  # G gets the landmarks of both
    capsys.readouterr()
    evaluate.main(["metrics", "--runs", run, "--out", str(tmp_path / "eval"), "--n", "20"])
    lines = capsys.readouterr().out.replace("\r", "\n").splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("run "))):-1]  # the last: "wrote PATHS"
    assert max(map(len, table)) <= 100, "\n".join(l for l in table if len(l) > 100)
    assert table[0].split()[:8] == ["run", "L1", "L1_large", "SSIM", "SSIM_large", "PSNR", "PSNR_large", "flicker"]
    assert [l.split()[0] for l in table[2:5]] == ["copy", "warp", "run"]


def test_a_failed_write_leaves_no_partial_file(setup, tmp_path):
    path, noise = tmp_path / "figs" / "a.png", np.random.default_rng(0).integers(0, 256, (100, 100, 3))
    evaluate.write_png(path, np.zeros((4, 4), np.uint8))
    before = path.read_bytes()
    with file_size_limit(4096), pytest.raises(data.WriteError) as e:
        evaluate.write_png(path, noise)  # 30 kB of noise: PNG cannot compress it
    assert str(e.value) == f"{path}: cannot write (File too large)"
    assert path.read_bytes() == before and os.listdir(path.parent) == ["a.png"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic set (4 videos of 4 frames, rendered at 64 px, prepared at 32) and a run on it."""
    import data
    tmp = tmp_path_factory.mktemp("syn")
    extras.synthetic.synth(str(tmp / "raw"), n_videos=(1, 3, 0, 0), n_frames=4, size=64, workers=1, log=lambda *a: None)
    data.prepare(str(tmp / "raw"), str(tmp / "prep"), size=S, workers=1, log=lambda *a: None)
    return tmp / "prep", make_run(tmp / "run", tmp / "prep")


def test_cross_identity_ground_truth(synthetic, monkeypatch):
    """The truth nobody can film, checked against what was filmed: given the driver's own identity, the
    recipe must give back the driver's prepared frame (synth's video, decoded and cropped by prepare)."""
    root, _ = synthetic
    split, videos = evaluate.videos_of(str(root))
    d = lambda x, y: np.abs(x.astype(float) - y).mean()
    t = extras.synthetic.cross_targets(str(root), split, videos, 6)
    for i, (a, s, b, j) in enumerate(t["pairs"]):
        assert a != b and np.array_equal(t["src"][i], videos[a]["frames"][s])
        assert np.array_equal(t["drv_lm"][i], videos[b]["landmarks"][j])
        assert np.abs(t["lm"][i] - videos[b]["landmarks"][j]).max() > 0.5  # A's face shape, not B's
        assert d(t["img"][i], videos[a]["frames"][s]) < d(t["img"][i], videos[b]["frames"][j])  # A's colours
    # a "source" that is the driver's video again: the truth is the driver's own frame j, not frame s
    for b in range(len(videos)):
        monkeypatch.setattr(extras.synthetic, "_TARGETS", {})  # its cache knows the dataset by its folder
        t = extras.synthetic.cross_targets(str(root), split, [videos[b], videos[b]], 4)
        for i, (_, s, _, j) in enumerate(t["pairs"]):
            assert np.abs(t["lm"][i] - videos[b]["landmarks"][j]).max() < 0.01
            assert d(t["img"][i], videos[b]["frames"][j]) < 8  # video coding only
        assert any(s != j and np.abs(videos[b]["landmarks"][s] - videos[b]["landmarks"][j]).max() > 0.1
                   for _, s, _, j in t["pairs"])  # so frame s would not do


def test_leak_score():
    bare = np.zeros((8, 8, 3), np.uint8)
    worn = bare.copy()
    worn[2:4] = 200  # the "glasses"
    assert extras.synthetic.leak_score(worn, bare, worn) == 1 and extras.synthetic.leak_score(bare, bare, worn) == 0
    half = bare.copy()
    half[2] = 180
    assert extras.synthetic.leak_score(half, bare, worn) == 0.5 and np.isnan(extras.synthetic.leak_score(bare, bare, bare))


def test_metrics_on_synthetic_set(synthetic, monkeypatch):
    """A perfect generator, one that draws exactly the truth for the landmarks it is given (every
    test frame for its own landmarks, A in B's pose for the cross-identity ones), must score a
    perfect L1 0, SSIM 1 and PSNR at its cap (MSE floored at 1e-10) on the same-video and
    cross-identity pairs, flicker 1 (as steady as the real video) and leak 0; conditioned on the
    driver's own landmarks (xabs_) it draws nothing right."""
    monkeypatch.setitem(sys.modules, "dlib", None)
    root, run = synthetic
    split, videos = evaluate.videos_of(str(root))
    rng = np.random.default_rng(0)
    worn = next(i for i in iter(lambda: extras.synthetic.random_identity(rng), None) if i["glasses"])
    for k, v in enumerate(videos):  # the first identity bare, the others with glasses: leak pairs exist
        v["params"]["identity"].update(glasses=worn["glasses"] if k else None)
    t = extras.synthetic.cross_targets(str(root), split, videos, 8)  # the pairs metrics will score
    truth = {lm.tobytes(): img for v in videos for lm, img in zip(v["landmarks"], v["frames"])}
    truth.update({lm.tobytes(): img for lm, img in zip(t["lm"], t["img"])})
    blank = np.zeros_like(videos[0]["frames"][0])
    perfect = lambda G, cfg, src, lms, src_lm=None, **k: np.stack([truth.get(np.asarray(l).tobytes(), blank) for l in lms])
    monkeypatch.setattr(networks, "generate", perfect)
    m = evaluate.metrics([str(run)], n_pairs=8)
    pairs, cap = m["runs"][str(run)]["pairs"], 10 * np.log10(255 ** 2 / 1e-10)
    for prefix in ("", "x_"):
        assert pairs[prefix + "L1"] == [0] * 8 and pairs[prefix + "SSIM"] == pytest.approx([1] * 8)
        assert pairs[prefix + "PSNR"] == pytest.approx([cap] * 8)
    assert pairs["flicker"] == pytest.approx([1] * len(videos))
    assert min(pairs["xabs_L1"]) > 20  # blank images: the driver's landmarks are not the truth's
    assert pairs["leak_glasses"] == [0] * len(t["leak"]["glasses"]) and len(t["leak"]["glasses"]) > 0


def test_judge_when_dlib_is_installed(synthetic):
    pytest.importorskip("dlib")
    root, _ = synthetic
    videos = evaluate.videos_of(str(root))[1]
    src, src_lm, tgt, tgt_lm = evaluate.gather(videos, 4)
    j = extras.landmarks.judge_scores(tgt, src, src_lm, tgt_lm)  # a perfect generator
    assert max(j["lm_err"]) < 0.5 and np.mean(j["id_dist"]) < 0.6  # dlib: < 0.6 = the same person
    # one that draws someone else (another video's identity): dlib calls them other people
    pairs = evaluate.eval_pairs(videos, 4)
    other = np.stack([videos[(v + 1) % len(videos)]["frames"][0] for v, _, _ in pairs])
    assert np.mean(extras.landmarks.judge_scores(other, src, src_lm, tgt_lm)["id_dist"]) > 0.6




# ================================================================================================
# reenact: retargeting, the video, flicker, bad inputs; the ablation study: its report and verb
# ================================================================================================
SIZE = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained tiny generator at 32 px: reenact's plumbing does not care what G has learnt."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("run") / "ckpt.pt")
    networks.save_checkpoint(path, {"G": networks.Generator(ngf=4).state_dict(), "step": 0, "vgg": "random",
                                     "args": {"ngf": 4, "n_down": 4, "size": SIZE, "sigma": 1.0, "window": 7, "data": None},
                                     "lambdas": PAPER_LAMBDAS})
    return path


def face(seed=0, size=64):
    rng = np.random.default_rng(seed)
    identity, motion = extras.synthetic.random_identity(rng), extras.synthetic.talking_motion(rng, 8)
    return identity, motion, [extras.synthetic.render_face(identity, p, e, size) for p, e in motion]


def run(ckpt, *argv):
    p = argparse.ArgumentParser()
    extras.reenact.add_options(p)
    return extras.reenact.make_video(vars(p.parse_args(["--ckpt", ckpt, "--device", "cpu", *argv])))


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        facesynth.main(["reenact", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_retarget_static_driver_keeps_the_source():
    src = face(0)[2][0][1]
    drv = np.repeat(face(1)[2][0][1][None], 5, 0)
    np.testing.assert_allclose(extras.reenact.retarget(src, drv), np.repeat(src[None], 5, 0), atol=1e-5)


def test_retarget_translation_is_scaled_by_face_size():
    src = face(0)[2][0][1]
    base = src * 0.5 + 7  # the driver's face: half the source's size, elsewhere in its frame
    shift = np.arange(4, dtype=np.float32)[:, None, None] * np.float32([3, -2])
    out = extras.reenact.retarget(src, base + shift, neutral=0)
    np.testing.assert_allclose(out, src + 2 * shift, atol=1e-4)
    # another neutral frame: the motion is measured from there
    np.testing.assert_allclose(extras.reenact.retarget(src, base + shift, neutral=2)[2], src, atol=1e-4)


def hand_face(cx, cy, half_w, half_h):
    """68 points on an ellipse at angles 2 pi k / 68 (k = 0, 17, 34, 51 on its axes): the points' box is
    exactly cx +- half_w by cy +- half_h, so their face size is 2 max(half_w, half_h)."""
    a = np.arange(68) * 2 * np.pi / 68
    return np.stack([cx + half_w * np.cos(a), cy + half_h * np.sin(a)], 1).astype(np.float32)


def in_crop(pts, cx, cy, face, size=SIZE, scale=1.8):
    """THE crop's map by hand: a square scale x face wide around the box centre (cx, cy) becomes size
    px; pixel centres, so the centre lands on (size - 1) / 2."""
    return (pts - np.float32([cx, cy])) * size / (scale * face) + (size - 1) / 2


def test_to_crop_by_hand():
    pts = hand_face(40, 30, 15, 12)  # box 30 x 24 around (40, 30)
    to_crop = extras.reenact.to_crop
    np.testing.assert_allclose(to_crop(pts, pts, SIZE, 1.8), in_crop(pts, 40, 30, 30), atol=1e-4)
    moved = pts * 1.2 + np.float32([5, -3])  # other points, framed by pts' box
    np.testing.assert_allclose(to_crop(moved, pts, 48, 2.5), in_crop(moved, 40, 30, 30, 48, 2.5), atol=1e-4)


def test_relative_recovers_the_source_doing_the_drivers_motion():
    """Synthetic truth: identity A rendered with B's motion. With A's source frame in B's neutral pose,
    retargeting B's landmarks lands on A's own (fixed crop), far closer than B's absolute ones do."""
    _, A, _ = extras.synthetic.identity_spec("s", "60", 1)
    _, B, motion = extras.synthetic.identity_spec("s", "61", 30)
    drv = np.stack([extras.synthetic.render_face(B, p, e)[1] for p, e in motion])
    truth = np.stack([extras.synthetic.render_face(A, p, e)[1] for p, e in motion])
    src_uv = extras.reenact.to_crop(truth[0], truth[0], 64, 1.8)
    err = lambda x, y: np.linalg.norm(x - y, axis=-1).mean()
    rel = err(extras.reenact.condition(src_uv, drv, 64, 1.8), [extras.reenact.to_crop(t, truth[0], 64, 1.8) for t in truth])
    ab = err(extras.reenact.condition(src_uv, drv, 64, 1.8, relative=False), [extras.reenact.to_crop(t, t, 64, 1.8) for t in truth])
    assert rel < 0.3 and rel < ab / 3


def reenact_cli(ckpt, tmp_path, *argv):
    facesynth.main(["reenact", "--ckpt", ckpt, "--out", str(tmp_path / "o.gif"), "--device", "cpu", *argv])


def test_reenact_gives_G_the_retargeted_or_the_drivers_own_landmarks(ckpt, tmp_path, given, capsys):
    """What G receives through the command line, against the hand formulas. The source: hand-placed
    points (box 40 x 36 around (48, 50)) beside an image. The driver: a face whose size changes from
    frame to frame, moving, its mouth opening; --neutral 2."""
    img = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "me.png")
    extras.synthetic.write_pts(tmp_path / "me.pts", hand_face(48, 50, 20, 18))
    scale, centre = [1.0, 1.1, 1.3, 1.2, 0.9], [(100, 80), (102, 80), (103, 78), (101, 83), (99, 81)]
    drv = np.stack([hand_face(cx, cy, 10 * k, 9 * k) for k, (cx, cy) in zip(scale, centre)])  # face size 20 k
    drv[:, 57, 1] += np.float32([0, 1, 0, 2, 3])  # a lower-lip point moves inside the box
    np.save(tmp_path / "drv.npy", drv)
    src_uv = in_crop(hand_face(48, 50, 20, 18), 48, 50, 40)  # face size 40 -> 32 / 1.8 px in the crop
    argv = ["--source", str(tmp_path / "me.png"), "--driver", str(tmp_path / "drv.npy"), "--neutral", "2"]
    # relative (the default for two people): the source's own crop landmarks, moved by the driver's motion
    # since frame 2, scaled by the face sizes there: the source's in its crop over the driver's, 20 x 1.3
    reenact_cli(ckpt, tmp_path, *argv)
    assert "relative retargeting" in capsys.readouterr().out
    (img, hm), = given
    want = src_uv + (drv - drv[2]) * (SIZE / 1.8) / (20 * 1.3)
    np.testing.assert_allclose(peaks(hm, sigma=1.0), want, atol=2e-3)
    assert all(torch.equal(i, img[0]) for i in img)  # the same source crop every frame
    # absolute: each driver frame's landmarks in its own crop
    given.clear()
    reenact_cli(ckpt, tmp_path, *argv, "--absolute")
    assert "absolute retargeting" in capsys.readouterr().out
    want = np.stack([in_crop(d, cx, cy, 20 * k) for d, k, (cx, cy) in zip(drv, scale, centre)])
    np.testing.assert_allclose(peaks(given[0][1], sigma=1.0), want, atol=2e-3)


def test_a_warp_G_reenacts_from_the_spline_between_the_source_and_each_frames_landmarks():
    """A fine-tuned run is reenacted as any run: with --output warp, G starts each frame from the thin-plate
    spline between the source crop's landmarks and the ones it is given. An untrained warp G is exactly
    the warp floor, so each generated frame must be the source crop warped from its landmarks (box 40 x 36
    around (48, 50)) to the retargeted ones, worked out by hand as in the test above (neutral frame 0)."""
    torch.manual_seed(0)
    G = networks.Generator(ngf=4, output="warp")
    cfg = {"args": {"ngf": 4, "n_down": 4, "size": SIZE, "sigma": 1.0, "window": 7, "output": "warp"}}
    img = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    src = {"image": img, "lm": hand_face(48, 50, 20, 18), "identity": None}
    drv = np.stack([hand_face(100 + 3 * t, 80 - t, 10 + t, 9) for t in range(4)])  # face size 20 + 2 t
    out = extras.reenact.drive(G, cfg, src, {"lms": drv, "frames": None, "motion": None}, relative=True)
    src_uv = in_crop(hand_face(48, 50, 20, 18), 48, 50, 40)
    want = src_uv + (drv - drv[0]) * (SIZE / 1.8) / 20
    floor = extras.yardsticks.warp(out["source"], np.repeat(src_uv[None], 4, 0), want)
    assert np.abs(out["generated"].astype(int) - floor).max() <= 1 and np.abs(floor - out["source"]).max() > 30


def test_reenact_crops_the_source_as_the_run_was_prepared(ckpt, tmp_path, given):
    """A run prepared with crop_scale 2 (prepare.json) crops with it. Source points with a 16 x 14 box
    around (28.5, 30.5): the square is 2 x 16 = 32 px = the run's size, from pixel edge (13, 15), so
    the crop is the image's pixels [15:47, 13:45] exactly and the landmarks move by (-13, -15)."""
    prep = tmp_path / "prep"
    os.makedirs(prep)
    (prep / "prepare.json").write_text(json.dumps({"size": SIZE, "crop_scale": 2.0, "synthetic": False}))
    ck = networks.load_checkpoint(ckpt)
    ck["args"] = dict(ck["args"], data=str(prep))
    networks.save_checkpoint(str(tmp_path / "ckpt.pt"), ck)
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "me.png")
    pts = hand_face(28.5, 30.5, 8, 7)
    extras.synthetic.write_pts(tmp_path / "me.pts", pts)
    np.save(tmp_path / "still.npy", np.repeat(hand_face(50, 50, 10, 9)[None], 3, 0))  # no motion
    reenact_cli(str(tmp_path / "ckpt.pt"), tmp_path, "--source", str(tmp_path / "me.png"),
                "--driver", str(tmp_path / "still.npy"))
    (images, hm), = given
    np.testing.assert_allclose(peaks(hm, sigma=1.0), np.repeat((pts - (13, 15))[None], 3, 0), atol=2e-3)
    crop = torch.tensor(img[15:47, 13:45]).permute(2, 0, 1) / 127.5 - 1
    for i in images:
        torch.testing.assert_close(i, crop, atol=1 / 127.5, rtol=0)  # within one 8-bit level


@pytest.mark.parametrize("ext", ["mp4", "gif"])
def test_synthetic_video_reads_back(ckpt, tmp_path, ext):
    out, pngs = str(tmp_path / f"r.{ext}"), str(tmp_path / "png")
    res = run(ckpt, "--source", "synthetic:60:0", "--driver", "synthetic:61", "--frames", "6",
              "--out", out, "--frames-dir", pngs)
    assert res["mode"] == "relative" and res["frames"] == 6  # different identities
    assert res["flicker"] > 0 and res["flicker_ref"] > 0  # against the rendered ground truth
    if ext == "gif":
        frames = imageio.v3.imread(out, index=None)
    else:
        with imageio.v2.get_reader(out, "ffmpeg") as r:
            frames = np.stack([f for f in r])  # not list(r): it asks len(), which ffmpeg gives as inf
    # a 16-px strip of labels over source | driver landmarks | generated | driver, zoomed to 256 px
    assert frames.shape[:3] == (6, 16 + 256, 4 * 256)
    assert sorted(os.listdir(pngs)) == [f"{t:05d}.png" for t in range(6)]
    first, last = (np.asarray(Image.open(os.path.join(pngs, f"{t:05d}.png"))) for t in (0, 5))
    assert (first[:16] < 128).any() and (first[:16, :, 0] >= 128).mean() > 0.8  # dark text on white
    assert np.array_equal(first[16:, :256], last[16:, :256]) and first[16:, :256].std() > 10  # the source
    assert not np.array_equal(first[16:, 768:], last[16:, 768:])  # the driver moves


def test_image_source_and_landmarks_only_driver(ckpt, tmp_path):
    (img, lm), drv = face(0, 96)[2][0], np.stack([l for _, l in face(1)[2]])
    Image.fromarray(img).save(tmp_path / "me.png")
    extras.synthetic.write_pts(tmp_path / "me.pts", lm)
    np.save(tmp_path / "drv.npy", drv)
    res = run(ckpt, "--source", str(tmp_path / "me.png"), "--driver", str(tmp_path / "drv.npy"),
              "--out", str(tmp_path / "o.gif"), "--zoom", "2")
    assert res["mode"] == "relative" and "flicker_ref" not in res
    # labels over 3 panels (no driver frames)
    assert imageio.v3.imread(tmp_path / "o.gif", index=None).shape[:3] == (8, 16 + 2 * SIZE, 2 * 3 * SIZE)


def test_prepared_and_300vw_drivers(ckpt, tmp_path):
    frames = face(4)[2]
    raw = tmp_path / "raw" / "001"
    os.makedirs(raw / "annot")
    with imageio.v2.get_writer(raw / "vid.avi", fps=25, codec="libx264", macro_block_size=1) as w:
        for t, (img, lm) in enumerate(frames):
            w.append_data(img)
            extras.synthetic.write_pts(raw / "annot" / f"{t + 1:06d}.pts", lm)
    prep = tmp_path / "prep"
    os.makedirs(prep)
    np.save(prep / "frames.npy", np.stack([data.crop_face(i, l, 48)[0] for i, l in frames]))
    np.save(prep / "landmarks.npy", np.stack([data.crop_face(i, l, 48)[1] for i, l in frames]))
    for drv in (raw, prep):  # the source is a frame of the same video: the same person, absolute
        res = run(ckpt, "--source", f"{drv}:3", "--driver", str(drv), "--out", str(tmp_path / "o.mp4"))
        assert res["mode"] == "absolute" and res["frames"] == 8 and res["flicker_ref"] > 0
    assert run(ckpt, "--source", f"{raw}:3", "--driver", str(prep), "--out", str(tmp_path / "o.mp4"),
               "--frames", "5")["mode"] == "relative"


def test_bad_drivers_name_the_file(ckpt, tmp_path, capsys):
    lms = [l for _, l in face(5)[2]]
    base = ["--ckpt", ckpt, "--source", "synthetic:60", "--out", str(tmp_path / "o.gif")]
    gap = tmp_path / "gap"
    os.makedirs(gap)
    for t in (1, 2, 4):
        extras.synthetic.write_pts(gap / f"{t:06d}.pts", lms[t])
    assert f"{gap / '000003.pts'}: missing" in cli_error(capsys, *base, "--driver", str(gap))
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for t in (1, 2):
        extras.synthetic.write_pts(bad / f"{t:06d}.pts", lms[t])
    (bad / "000002.pts").write_text("version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "x y\n}\n")
    assert f"{bad / '000002.pts'}: bad point line" in cli_error(capsys, *base, "--driver", str(bad))
    np.save(tmp_path / "flat.npy", np.zeros((5, 136), np.float32))
    assert f"{tmp_path / 'flat.npy'}: landmarks of shape (5, 136)" in cli_error(capsys, *base, "--driver",
                                                                               str(tmp_path / "flat.npy"))
    os.makedirs(tmp_path / "vw" / "annot")
    assert f"{tmp_path / 'vw' / 'vid.avi'}: missing" in cli_error(capsys, *base, "--driver", str(tmp_path / "vw"))


@pytest.fixture
def no_dlib(monkeypatch):
    """As if the optional extra were not installed (`import dlib` fails), with no detector cached."""
    monkeypatch.setitem(sys.modules, "dlib", None)
    extras.landmarks.landmark_detector.cache_clear()
    yield
    extras.landmarks.landmark_detector.cache_clear()


def test_bad_sources_name_the_file(ckpt, tmp_path, capsys, no_dlib):
    base = ["--ckpt", ckpt, "--driver", "synthetic:1", "--out", str(tmp_path / "o.gif"), "--source"]
    me, pts = tmp_path / "me.png", tmp_path / "me.pts"
    assert cli_error(capsys, *base, str(me)) == f"error: {me}: no such file\n"
    me.write_bytes(b"not an image")
    assert cli_error(capsys, *base, str(me)) == f"error: {me}: not a readable image\n"
    img, lm = face(0)[2][0]
    Image.fromarray(img).save(me)  # without its landmarks, and no detector to find them
    assert cli_error(capsys, *base, str(me)) == (
        f"error: {me}: no {pts} beside it to give its landmarks, and automatic landmarks need dlib and its "
        f"models: pip install dlib-bin face-recognition-models\n")
    lm[30] = (1e7, 40)
    extras.synthetic.write_pts(pts, lm)
    assert cli_error(capsys, *base, str(me)) == (
        f"error: {pts}: a landmark lies more than a frame size outside the 64x64 image {me}\n")


def png_header_only(path, w, h):
    """A PNG that claims w x h pixels: all that Pillow reads before refusing a huge image."""
    be = lambda n: n.to_bytes(4, "big")
    chunk = lambda kind, body: be(len(body)) + kind + body + be(zlib.crc32(kind + body))
    ihdr = be(w) + be(h) + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_images_of_any_depth_and_too_large_ones(ckpt, tmp_path, capsys):
    img = face(0)[2][0][0]
    grey = np.asarray(Image.fromarray(img).convert("L"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 16-bit: v * 257 / 65535 * 255 = v exactly
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(extras.reenact.read_image(str(path)), np.repeat(grey[..., None], 3, -1))
    huge = tmp_path / "huge.png"
    png_header_only(huge, 20000, 10000)
    err = cli_error(capsys, "--ckpt", ckpt, "--driver", "synthetic:1", "--out", str(tmp_path / "o.gif"),
                    "--source", str(huge))
    assert err == (f"error: {huge}: too large an image (Image size (200000000 pixels) exceeds limit of "
                   "178956970 pixels); scale it down\n")


def test_a_prepared_driver_is_checked_and_given_landmarks_win_for_its_frame(ckpt, blobs, tmp_path, capsys):
    drv = tmp_path / "001"
    shutil.copytree(os.path.join(blobs, "001"), drv)
    pts = tmp_path / "own.pts"
    own = np.load(drv / "landmarks.npy")[2] + 1.5
    extras.synthetic.write_pts(pts, own)
    src = extras.reenact.load_face(f"{drv}:2", str(pts))
    np.testing.assert_allclose(src["lm"], own, atol=1e-3)  # .pts keeps 3 decimals
    damage(drv / "frames.npy", "cut")
    err = cli_error(capsys, "--ckpt", ckpt, "--source", "synthetic:1", "--driver", str(drv),
                    "--out", str(tmp_path / "o.gif"))
    assert err.startswith(f"error: {drv / 'frames.npy'}: cannot read (") and err.count("\n") == 1, err


def test_report(tmp_path, monkeypatch):
    """REPORT.md: the group table with the floor's rows, the differences from full with their p-values,
    the figures. `same` holds copies of full's runs: every pair's difference is 0, so every sign flip's
    sum is 0 too and the sign-flip test's p is (1 + N) / (N + 1) = 1 exactly, in every cell."""
    monkeypatch.setitem(sys.modules, "dlib", None)  # the face judge (~0.3 s a pair) is tested on its own
    root = make_dataset(tmp_path / "prep")
    groups = {"full": [make_run(tmp_path / "r" / "full" / f"s{s}", root, s) for s in (0, 1)],
              "no_pix": [make_run(tmp_path / "r" / "no_pix" / f"s{s}", root, s + 2, ("pix",)) for s in (0, 1)]}
    groups["same"] = [shutil.copytree(r, tmp_path / "r" / "same" / r.name) for r in groups["full"]]
    groups = {g: [str(r) for r in rs] for g, rs in groups.items()}
    path = extras.ablation.write_report(groups, str(tmp_path / "rep"), n_pairs=10)
    text = open(path).read()
    assert "| full | 2 |" in text and "| no_pix |" in text and "| copy | - |" in text and "| warp | - |" in text
    same = next(line for line in text.splitlines() if line.startswith("| same |") and "p=" in line)
    cells = same.strip("| ").split(" | ")[1:]
    assert len(cells) >= 7 and all(c == "+0 (p=1)" for c in cells), same  # L1 ... flicker, and the _large ones
    for link in ("loss_bars.png", "loss_curves.png", "heatmaps.png"):
        assert f"]({link})" in text and os.path.isfile(tmp_path / "rep" / link)


def test_ablation_trains_every_group_then_reports_and_skips_finished_runs(blobs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # the face judge would score 4 x 200 pairs at ~0.3 s each
    out = str(tmp_path / "abl")
    argv = ["ablation", "--data", blobs, "--out", out, "--seeds", "1", "--steps", "2", *TINY_TRAIN]
    facesynth.main(argv)
    report = open(os.path.join(out, "REPORT.md")).read()
    for name in extras.ablation.GROUP_RUNS:
        assert torch.load(os.path.join(out, name, "seed0", "ckpt.pt"))["step"] == 2
        assert f"| {name} |" in report
    cfg = json.load(open(os.path.join(out, "no_consistency", "seed0", "config.json")))
    assert cfg["lambdas"]["self"] == cfg["lambdas"]["triple"] == 0 and cfg["lambdas"]["pix"] > 0
    capsys.readouterr()
    facesynth.main(argv)  # a second call trains nothing
    assert capsys.readouterr().out.count("finished, skipped") == len(extras.ablation.GROUP_RUNS)
    with pytest.raises(SystemExit) as e:  # other options: refused, not mixed into one report
        facesynth.main(argv + ["--ngf", "16", "--steps", "3"])
    full = os.path.join(out, "full", "seed0")
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: {full}: cannot change --ngf when resuming; start a new run with another --out instead\n")
    assert torch.load(os.path.join(full, "ckpt.pt"))["step"] == 2




# ================================================================================================
# own footage: automatic landmarks (optional dlib) for prepare and reenact
# ================================================================================================
needs_dlib = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("dlib", "face_recognition_models", "skimage")),
    reason="optional extra not installed: pip install dlib-bin face-recognition-models scikit-image")


# A real face: scikit-image's astronaut (Eileen Collins, NASA, public domain), cropped to her head
# (192 px, the face ~92 px), moved across a grey 320 x 240 canvas along a known path.
CLIP_H, CLIP_W, CLIP_T = 240, 320, 12


PATH = np.stack([16 + 8 * np.arange(CLIP_T), 8 + np.round(32 * np.sin(np.pi * np.arange(CLIP_T) / (CLIP_T - 1)))],
                1).astype(int)


@pytest.fixture(scope="module")
def astronaut():
    from skimage.data import astronaut
    return astronaut()[36:228, 129:321]


def clip(path, head, path_xy=PATH, blank=(), noise=0):
    """Write the head moved along path_xy as a video (.mp4 or .gif); frames in `blank` have no face."""
    rng, frames = np.random.default_rng(0), []
    for t, (x, y) in enumerate(path_xy):
        f = np.full((CLIP_H, CLIP_W, 3), 128, np.uint8)
        if t not in blank:
            f[y:y + head.shape[0], x:x + head.shape[1]] = head
        frames.append(np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8) if noise else f)
    if str(path).endswith(".gif"):
        imageio.v3.imwrite(path, frames, duration=40, loop=0)
    else:
        imageio.mimwrite(path, frames, fps=25, codec="libx264", quality=8, macro_block_size=16)
    return str(path)


def test_one_euro_recurrence_by_hand():
    """Casiez, Roussel & Vogel (CHI 2012), one frame per step: alpha(f) = 1 / (1 + 1 / (2 pi f)); the
    speed dx = (x_t - y_{t-1}) / scale is itself smoothed,
    edx_t = edx_{t-1} + alpha(d_cutoff) (dx - edx_{t-1}), and sets the cutoff f = min_cutoff + beta |edx_t|;
    y_t = y_{t-1} + alpha(f) (x_t - y_{t-1}).
    With min_cutoff = beta = 1 / (2 pi) and d_cutoff = 3 / (2 pi): alpha(d_cutoff) = 3/4 and
    alpha(f) = (1 + |edx|) / (2 + |edx|). A step from 0 to 2 (scale 1):
      t=1: dx = 2, edx = 3/2, alpha = 5/7, y = 10/7
      t=2: dx = 4/7, edx = 3/2 + 3/4 (4/7 - 3/2) = 45/56, alpha = 101/157, y = 10/7 + 101/157 4/7 = 282/157
      t=3: dx = 32/157, edx = 12441/35168, alpha = 47609/82777, y = 158386/82777"""
    want = [0, 10 / 7, 282 / 157, 158386 / 82777]
    c = 1 / (2 * np.pi)
    x = np.array([[0, 5], [2, 5], [2, 5], [2, 5]], np.float32)  # two coordinates: the step, and a still one
    one_euro = functools.partial(extras.landmarks.one_euro, min_cutoff=c, beta=c, d_cutoff=3 * c)
    y = one_euro(x, 1.0)
    np.testing.assert_allclose(y[:, 0], want, rtol=1e-6)
    assert (y[:, 1] == 5).all()
    # speed in face sizes: the same step on a face twice as large is the same motion, twice as long
    np.testing.assert_allclose(one_euro(2 * x, 2.0)[:, 0], 2 * np.array(want), rtol=1e-6)


def test_smoothing_removes_jitter_keeps_motion_and_blinks_and_fills_gaps():
    face = face_points() * 2  # ~80 px
    jitter = lambda l: np.linalg.norm(np.diff(l, axis=0), axis=-1).mean()
    still = (face + np.random.default_rng(0).normal(0, 0.5, (40, 68, 2))).astype(np.float32)
    smooth, found = extras.landmarks.smooth_track(still)
    assert found.all() and jitter(smooth) < jitter(still) / 4
    pan = (face + np.arange(40)[:, None, None] * np.float32([2, -1])).astype(np.float32)
    np.testing.assert_allclose(extras.landmarks.smooth_track(pan)[0], pan, atol=0.01)  # no lag, at the ends neither
    blink = np.repeat(face[None], 40, 0)
    blink[18:21, 37:42, 1] += np.float32([2, 4, 2])[:, None]  # the upper lid, down 4 px and up in 3 frames
    assert (extras.landmarks.smooth_track(blink)[0][18:21, 37:42, 1] - face[37:42, 1]).max(0).min() > 0.6 * 4
    gaps = pan.copy()
    gaps[[0, 1, 10, 11]] = np.nan  # no face there
    smooth, found = extras.landmarks.smooth_track(gaps)
    assert found.tolist() == [t not in (0, 1, 10, 11) for t in range(40)]
    for t, last in ((0, 2), (1, 2), (10, 9), (11, 9)):  # the last landmarks (the first before any)
        np.testing.assert_array_equal(smooth[t], smooth[last])
    np.testing.assert_allclose(smooth[12:], pan[12:], atol=0.01)  # a run after a gap is smoothed on its own


def test_without_dlib_every_detector_feature_says_what_to_install(tmp_path, capsys, no_dlib):
    hint = "automatic landmarks need dlib and its models: pip install dlib-bin face-recognition-models"
    os.makedirs(tmp_path / "videos")
    vid = clip(tmp_path / "videos" / "a.mp4", np.zeros((8, 8, 3), np.uint8), PATH[:3])
    with pytest.raises(data.DataError) as e:
        extras.reenact.load_driver(vid)
    assert str(e.value) == f"{vid}: a plain video has no landmarks to read, and {hint}"
    with pytest.raises(SystemExit) as e:
        facesynth.main(["prepare", str(tmp_path / "videos"), str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: {tmp_path / 'videos'}: its 1 plain video(s) have no landmarks to read, and {hint}\n")
    assert not (tmp_path / "out").exists()  # stopped before any work
    assert extras.landmarks.judge_scores(None, None, None, None) is None  # the judge skips, as before


@needs_dlib
@pytest.mark.parametrize("ext", ["mp4", "gif"])
def test_detected_landmarks_follow_a_known_motion(astronaut, tmp_path, ext):
    vid = clip(tmp_path / f"clip.{ext}", astronaut)
    raw = extras.landmarks.track(data.decode(vid))
    lms, found = extras.landmarks.detect_video(vid)
    assert found.all() and lms.shape == (CLIP_T, 68, 2) and lms.dtype == np.float32
    for l in (raw, lms):
        moved = l.mean(1) - l[0].mean(0)  # the face's motion since frame 0, from its 68 points
        assert np.abs(moved - (PATH - PATH[0])).max() < 1.0
        rigid = l - PATH[:, None]  # every point moves with the head: one shape in the head's frame
        assert np.abs(rigid - rigid.mean(0)).max() < 3.0
    # iBUG-68 order: the subject's right eye's outer corner (36) is at the image left of the left eye's
    # (45), 60 px apart in this head; the eyes above the nose tip (30) above the mouth (48-67).
    assert 50 < lms[0, 45, 0] - lms[0, 36, 0] < 70
    assert lms[0, 36:48, 1].mean() < lms[0, 30, 1] < lms[0, 48:68, 1].mean()


@needs_dlib
def test_smoothing_removes_detection_jitter_on_a_still_noisy_face(astronaut, tmp_path):
    vid = clip(tmp_path / "still.mp4", astronaut, [PATH[0]] * CLIP_T, noise=4)
    raw = extras.landmarks.track(data.decode(vid))
    jitter = lambda l: np.linalg.norm(np.diff(l, axis=0), axis=-1).mean()
    assert jitter(raw) > 0.2 and jitter(extras.landmarks.smooth_track(raw)[0]) < jitter(raw) / 3


@needs_dlib
def test_a_frame_without_a_face_keeps_the_last_landmarks_and_is_counted(astronaut, tmp_path):
    drv = extras.reenact.load_driver(clip(tmp_path / "gaps.mp4", astronaut, blank=(0, 5)))
    assert drv["no_face"] == 2 and len(drv["lms"]) == CLIP_T
    np.testing.assert_array_equal(drv["lms"][0], drv["lms"][1])  # before the first face: the first
    np.testing.assert_array_equal(drv["lms"][5], drv["lms"][4])
    assert sum(1 for _ in drv["frames"]) == CLIP_T  # the panel's frames, decoded again


@needs_dlib
def test_prepare_plain_videos_then_train(astronaut, tmp_path):
    src, out, run_dir = tmp_path / "videos", tmp_path / "prep", str(tmp_path / "run")
    os.makedirs(src)
    clip(src / "a.mp4", astronaut)
    clip(src / "b.mp4", astronaut, PATH[::-1])
    clip(src / "c.gif", astronaut, blank=(4,))
    clip(src / "d.mp4", astronaut, PATH[:4], blank=range(4))  # nobody in it
    shutil.copy(src / "a.mp4", src / "a.mpg")  # the name a is a.mp4's, the first by file name
    (src / "notes.txt").write_text("not a video")
    logs = []
    videos, skipped = extras.landmarks.plain_videos(src)
    s = data.prepare(src, out, size=32, workers=2, log=logs.append, videos=videos,
                     landmarks=extras.landmarks.usable_landmarks, skipped=skipped)
    assert sorted(logs[:-1]) == sorted([
        "skip a.mpg: the name a is already a.mp4's (rename one)",
        f"c: {src / 'c.gif'}: no face found in 1 of 12 frames; those are left out",
        f"skip d.mp4: {src / 'd.mp4'}: no face found in its 4 frames",
        "split: no --split-file; 1 of the 3 plain videos held out as test1 (the last by name: c)"])
    assert (s["prepared"], s["skipped"], s["frames"]) == (3, 2, 2 * CLIP_T + CLIP_T - 1)
    assert json.loads((out / "split.json").read_text()) == {"train": ["a", "b"], "test1": ["c"], "test2": [],
                                                              "test3": []}
    for name, n in (("a", CLIP_T), ("b", CLIP_T), ("c", CLIP_T - 1)):
        frames, lms = np.load(out / name / "frames.npy"), np.load(out / name / "landmarks.npy")
        assert frames.shape == (n, 32, 32, 3) and frames.dtype == np.uint8
        assert lms.shape == (n, 68, 2) and lms.dtype == np.float32
        # The crop follows the head: it moves 8 px a frame on the canvas, but hardly in the crops.
        assert np.abs(frames.astype(int) - frames[:1]).mean() < 4 and np.ptp(lms, 0).max() < 1.5
    run_train("--data", str(out), "--out", run_dir, "--steps", "2", "--log-every", "1")
    assert torch.load(os.path.join(run_dir, "ckpt.pt"))["step"] == 2


@needs_dlib
def test_reenact_own_image_and_video_without_landmark_files(ckpt, astronaut, tmp_path, capsys):
    Image.fromarray(astronaut).save(tmp_path / "me.png")
    vid = clip(tmp_path / "clip.mp4", astronaut, blank=(7,))
    res = run(ckpt, "--source", str(tmp_path / "me.png"), "--driver", vid, "--out", str(tmp_path / "o.mp4"))
    assert res["frames"] == CLIP_T and res["mode"] == "relative" and res["no_face"] == 1
    assert f"{vid}: no face found in 1 of {CLIP_T} frames (they keep the last landmarks)" in capsys.readouterr().out
    with imageio.v2.get_reader(tmp_path / "o.mp4", "ffmpeg") as r:
        assert np.stack([f for f in r]).shape[:3] == (CLIP_T, 16 + 256, 4 * 256)  # labels over the 4 panels
    # The source's landmarks, detected on the head alone, are the driver's first ones less the offset.
    src = extras.reenact.load_face(str(tmp_path / "me.png"))["lm"]
    assert np.abs(src - (extras.reenact.load_driver(vid)["lms"][0] - PATH[0])).max() < 3.0


# ================================================================================================
# play: the page's server over HTTP (always), and the page in a real browser (where one is installed)
# ================================================================================================
@pytest.fixture(scope="module")
def play(synthetic):
    """The play server on a free port, serving the tiny synthetic run: its test videos have ground truth."""
    player = extras.play.Player(str(synthetic[1]), "cpu")
    server = extras.play.listen(player, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", player, server
    server.shutdown()
    server.server_close()
    player.latest.stop()


def http(url, path, body=None, ctype="application/json"):
    """(status, JSON or bytes) of one request; a 4xx/5xx is an answer too."""
    raw = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(url + path, data=raw, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, out, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, out, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(out) if kind == "application/json" else out


def picture(data_url):
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def g_by_hand(player, image, lm):
    """G's face drawn here, straight from the network (not through networks.generate)."""
    a = player.run["args"]
    with torch.no_grad():
        e = data.heatmaps(torch.as_tensor(lm[None], dtype=torch.float32), a["size"], a["sigma"], a["window"])
        return data.to_uint8(player.G(data.to_tensor(image[None]), e))[0]


def test_play_serves_the_page_and_the_run(play, synthetic):
    url, _, _ = play
    status, page = http(url, "/")
    assert status == 200 and b"<canvas" in page and b"/api/draw" in page
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page)  # nothing from elsewhere: offline
    status, info = http(url, "/api/info")
    test1 = json.load(open(synthetic[0] / "split.json"))["test1"]
    hint = f"uploads: automatic landmarks need dlib and its models: {extras.landmarks.DLIB_HINT}"
    assert status == 200 and info["size"] == S and info["upload"] in (None, hint)
    specs = [f"synthetic:{i}" for i in range(50, 60)] + [f"video:{n}" for n in test1]
    assert [s["spec"] for s in info["sources"]] == specs
    assert set(info["sliders"]) == {"open", "smile", "brow", "blink", "yaw", "pitch", "roll"}
    assert info["sliders"]["yaw"]["trained"] == 30 and info["sliders"]["yaw"]["hi"] > 30  # and beyond it


def test_play_draws_what_g_draws_with_the_truth_beside_it(play, synthetic):
    url, player, _ = play
    root = synthetic[0]
    name = json.load(open(root / "split.json"))["test1"][0]
    frames, marks = np.load(root / name / "frames.npy"), np.load(root / name / "landmarks.npy")
    frame = json.load(open(root / name / "params.json"))["frames"][2]
    status, src = http(url, "/api/source", {"source": f"video:{name}:2"})
    assert status == 200 and src["synthetic"] and np.array_equal(picture(src["image"]), frames[2])
    np.testing.assert_allclose(src["lm"], marks[2], atol=0.01)
    part = lambda k: "pose" if k in ("yaw", "pitch", "roll") else "expression"
    assert src["sliders"] == pytest.approx({k: frame[part(k)][k] for k in src["sliders"]})
    status, out = http(url, "/api/draw", {"source": src["source"], "sliders": src["sliders"]})
    assert status == 200 and not out.get("superseded")
    gen, truth = picture(out["image"]), picture(out["truth"])
    assert np.abs(gen.astype(int) - g_by_hand(player, frames[2], np.float32(out["lm"]))).max() <= 1
    prep = json.load(open(root / "prepare.json"))
    identity = json.load(open(root / name / "params.json"))["identity"]
    assert np.array_equal(truth, extras.synthetic.render_crop(identity, frame, prep)[0])  # the frame, unmoved
    assert np.array_equal(picture(out["error"]), evaluate.error_heatmap(gen, truth))
    assert out["l1"] == pytest.approx(np.abs(gen.astype(float) - truth).mean())
    # a drag: G gets the moved point, the sliders' landmarks stay, and a dragged face has no truth to compare
    off = np.zeros((68, 2))
    off[57] = (3, 2)
    status, moved = http(url, "/api/draw", {"source": src["source"], "sliders": src["sliders"],
                                            "offsets": off.tolist(), "heatmaps": True})
    assert status == 200 and moved["lm"] == out["lm"] and "truth" in moved and "error" not in moved
    lm = np.float32(out["lm"]) + off
    assert np.abs(picture(moved["image"]).astype(int) - g_by_hand(player, frames[2], lm)).max() <= 1
    x, y = np.round(lm[57]).astype(int)
    assert picture(moved["heatmaps"])[y, x, 0] >= 255 * math.exp(-0.25) - 1  # within half a pixel of a peak
    # a head turn: the identity rendered turned, cut by the SOURCE's crop box (x0, y0, side), so the
    # landmarks move within a still frame: u = (x + 0.5 - x0) * S / side - 0.5
    turned = {**frame["pose"], "yaw": frame["pose"]["yaw"] + 10}
    status, out = http(url, "/api/draw", {"source": src["source"],
                                          "sliders": {**src["sliders"], "yaw": turned["yaw"]}})
    size = extras.synthetic.SYNTH_SIZE
    render = lambda p: extras.synthetic.render_face(identity, p, frame["expression"], size)
    (img, full), box = render(turned), render(frame["pose"])[1]
    x0, y0, side = data.crop_box(box)
    np.testing.assert_allclose(out["lm"], (full + 0.5 - (x0, y0)) * S / side - 0.5, atol=1e-3)
    assert np.array_equal(picture(out["truth"]), data.crop_face(img, box, S)[0])


def test_play_sliders_move_the_landmarks_as_the_talking_heads_move(play):
    url, _, _ = play
    status, src = http(url, "/api/source", {"source": "synthetic:50"})
    lm0 = np.float32(src["lm"])
    draw = lambda **s: np.float32(http(url, "/api/draw", {"source": "synthetic:50", "sliders": s})[1]["lm"])
    angle = lambda lm: math.degrees(math.atan2(*(lm[45] - lm[36])[::-1]))  # the line through the eye corners
    assert src["sliders"] == {k: 0 for k in src["sliders"]}  # synthetic:ID starts upright and neutral
    assert angle(draw(roll=15)) - angle(lm0) == pytest.approx(15, abs=0.01)  # a roll turns the image plane
    blink = draw(blink=1)
    np.testing.assert_allclose(blink[[37, 38, 43, 44]], blink[[41, 40, 47, 46]], atol=1e-3)  # the lids meet
    gap = lambda lm: lm[57, 1] - lm[51, 1]
    assert gap(draw(open=1)) > gap(lm0) + 1  # the jaw drops
    assert draw(yaw=20)[30, 0] > lm0[30, 0] + 1  # positive yaw turns the nose to image right


@pytest.mark.parametrize("method, path, body, code, reason", [
    ("GET", "/../../etc/passwd", None, 404, "no such page"),
    ("GET", "/extras/play.py", None, 404, "no such page"),
    ("POST", "/api/nope", {}, 404, "no such address"),
    ("POST", "/api/draw", b"{not json", 400, "not JSON"),
    ("POST", "/api/draw", [1, 2], 400, "expected a JSON object"),
    ("POST", "/api/draw", {"sliders": {}}, 400, "source: expected a string"),
    ("POST", "/api/draw", {"source": "video:../../etc/passwd:0"}, 404, "no such frame"),
    ("POST", "/api/draw", {"source": "/etc/passwd"}, 400, "expected synthetic:ID, video:NAME:FRAME or"),
    ("POST", "/api/draw", {"source": "upload:7"}, 404, "no such upload"),
    ("POST", "/api/draw", {"source": "synthetic:50", "offsets": [[0, 0]] * 67}, 400, "offsets: expected 68"),
    ("POST", "/api/draw", {"source": "synthetic:50", "offsets": [[float("nan"), 0]] * 68}, 400, "offsets"),
    ("POST", "/api/draw", {"source": "synthetic:50", "sliders": {"yaw": 400}}, 400, "sliders.yaw: 400 is"),
    ("POST", "/api/draw", {"source": "synthetic:50", "sliders": {"open": True}}, 400, "sliders.open"),
    ("POST", "/api/draw", {"source": "synthetic:50", "sliders": {"age": 1}}, 400, "sliders: expected"),
    ("POST", "/api/draw", {"source": "synthetic:50", "client": 5}, 400, "client: expected a string"),
    ("POST", "/api/upload", b"not an image", 400, "not an image"),
])
def test_play_bad_requests_get_a_4xx_with_a_reason(play, method, path, body, code, reason):
    url, _, _ = play
    status, out = http(url, path, body if method == "POST" else None)
    assert status == code and reason in out["error"] and "\n" not in out["error"], out
    assert http(url, "/api/draw", {"source": "synthetic:51"})[0] == 200


def raw_request(url, head):
    """Send raw request head bytes, read the status line."""
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        return s.makefile("rb").readline().split()[1]


def test_play_bounds_size_rate_and_connections_and_survives_a_bug(play, monkeypatch):
    url, player, server = play
    assert raw_request(url, b"POST /api/draw HTTP/1.1\r\nHost: x\r\n\r\n") == b"411"  # no length
    huge = b"POST /api/draw HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"  # never sent
    assert raw_request(url, huge) == b"413"
    big = f"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {extras.play.MAX_UPLOAD + 1}\r\n\r\n"
    assert raw_request(url, big.encode()) == b"413"
    monkeypatch.setattr(extras.play, "RATE", 0)  # no refill: the burst is all a client gets
    monkeypatch.setattr(extras.play, "BURST", 3)
    server.buckets.clear()
    assert [http(url, "/api/info")[0] for _ in range(4)] == [200, 200, 200, 429]
    monkeypatch.undo()
    server.buckets.clear()
    # the earlier requests' handler threads may still be finishing on a busy host: wait for their slots
    taken = [server.slots.acquire(timeout=10) for _ in range(extras.play.MAX_CONNECTIONS)]
    try:
        assert all(taken) and raw_request(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"503"
    finally:
        for _ in filter(None, taken):
            server.slots.release()
    monkeypatch.setattr(player.latest, "draw", lambda job: 1 / 0)  # a bug in drawing
    status, out = http(url, "/api/draw", {"source": "synthetic:50"})
    assert status == 500 and out["error"] == "internal error: ZeroDivisionError: division by zero"
    monkeypatch.undo()
    assert http(url, "/api/draw", {"source": "synthetic:50"})[0] == 200


def test_latest_request_wins():
    gate, busy, drawn = threading.Event(), threading.Event(), []
    def draw(job):
        if job == "first":
            busy.set()
            gate.wait()
        drawn.append(job)
        return job
    latest, results = extras.play.Latest(draw), {}
    def send(key, job):
        t = threading.Thread(target=lambda: results.update({job: latest.submit(key, job)}), daemon=True)
        t.start()
        return t
    threads = [send("a", "first")]
    busy.wait()  # the worker is drawing "first"; what comes now waits
    for key, job in (("a", "second"), ("b", "other"), ("a", "third")):
        threads.append(send(key, job))
        while not any(s["job"] == job for s in list(latest.waiting.values())):
            threading.Event().wait(0.001)
    assert [s["job"] for s in latest.waiting.values()] == ["other", "third"]  # "second" replaced, at the back
    gate.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)  # every sender heard back, the replaced one too
    latest.stop()
    assert drawn == ["first", "other", "third"] and results == {"first": "first", "second": None,
                                                                "other": "other", "third": "third"}


def test_play_concurrent_drags_are_coalesced(play):
    url, player, _ = play
    calls, draw = [], player.latest.draw
    player.latest.draw = lambda job: calls.append(1) or draw(job)
    try:
        def drag(i):
            off = np.zeros((68, 2))
            off[57, 1] = i / 4
            return http(url, "/api/draw", {"source": "synthetic:52", "client": "me", "offsets": off.tolist()})
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            info = pool.submit(http, url, "/api/info")
            outs = list(pool.map(drag, range(12))) + [info.result()]
    finally:
        player.latest.draw = draw
    assert all(status == 200 for status, _ in outs)
    images = [o for _, o in outs[:12] if "image" in o]
    assert images and len(images) + sum(bool(o.get("superseded")) for _, o in outs[:12]) == 12
    assert len(calls) == len(images)  # what was superseded was never drawn


def test_play_command_serves_until_ctrl_c(synthetic):
    p = subprocess.Popen([sys.executable, "facesynth.py", "play", "--ckpt", str(synthetic[1]), "--port", "0",
                          "--host", "0.0.0.0", "--device", "cpu"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    try:
        line = p.stdout.readline()
        port = re.search(r"http://0\.0\.0\.0:(\d+)/", line).group(1)
        assert http(f"http://127.0.0.1:{port}", "/api/draw", {"source": "synthetic:50"})[0] == 200
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and out.strip().endswith("play: stopped"), (line, out, err)
    assert err.startswith("warning: --host 0.0.0.0: every machine that reaches this one can use the page")


def test_play_bad_options_are_one_line(synthetic, tmp_path, capsys):
    for argv, message in ((["--ckpt", str(tmp_path)], f"{tmp_path / 'ckpt.pt'}: no checkpoint there"),
                          (["--ckpt", str(synthetic[1]), "--port", "99999"], "--port 99999: cannot listen")):
        with pytest.raises(SystemExit) as e:
            facesynth.main(["play", *argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_play_without_dlib_says_what_to_install(play, astronaut, no_dlib):
    status, out = http(play[0], "/api/upload", b"\x89PNG", "image/png")  # the photo is read first
    assert status == 400
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "PNG")
    status, out = http(play[0], "/api/upload", buf.getvalue(), "image/png")
    hint = f"uploads: automatic landmarks need dlib and its models: {extras.landmarks.DLIB_HINT}"
    assert status == 501 and out["error"] == hint


@needs_dlib
def test_play_uploaded_photo_moves_as_the_reference_head(play, astronaut):
    url = play[0]
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "JPEG")
    status, src = http(url, "/api/upload", buf.getvalue(), "image/jpeg")
    assert status == 200 and not src["synthetic"] and src["source"].startswith("upload:")
    lm0 = np.float32(src["lm"])
    status, out = http(url, "/api/draw", {"source": src["source"], "sliders": {"open": 1}})
    lm = np.float32(out["lm"])
    assert status == 200 and "truth" not in out and lm[57, 1] - lm[51, 1] > lm0[57, 1] - lm0[51, 1] + 0.5
    np.testing.assert_allclose(lm[17:48], lm0[17:48], atol=1e-3)  # brows, nose and eyes stay; the jaw drops


def browser():
    """Debian's chromium and chromium-driver, or None."""
    found = [shutil.which(n) for n in ("chromium", "chromedriver")]
    return found if all(found) else None


@pytest.mark.skipif(browser() is None, reason="no headless browser: apt-get install chromium chromium-driver")
def test_play_page_in_a_real_browser_redraws_on_a_drag(play):
    webdriver = pytest.importorskip("selenium.webdriver")  # test-only: pip install selenium
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)  # root in a container: no sandbox; its /dev/shm is small
    opts.binary_location = browser()[0]
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(browser()[1]))
    try:
        d.get(play[0] + "/")
        shown = lambda: int(d.find_element("id", "gen").get_attribute("data-shown") or 0)
        WebDriverWait(d, 60).until(lambda _: shown() >= 1)
        before, n = d.find_element("id", "gen").get_attribute("src"), shown()
        canvas = d.find_element("id", "face")
        size, x, y = canvas.size["width"], *d.execute_script("return base[57]")  # the lower lip's middle
        at = lambda v: int((v + 0.5) / S * size - size / 2)  # pixel centre -> offset from the canvas's centre
        ActionChains(d).move_to_element_with_offset(canvas, at(x), at(y)).click_and_hold() \
            .move_by_offset(0, 12).move_by_offset(0, 12).release().perform()
        WebDriverWait(d, 60).until(lambda _: shown() > n and d.execute_script("return !inflight"))
        assert d.execute_script("return off[57][1]") > 2 and d.execute_script("return off[50]") == [0, 0]
        assert d.find_element("id", "gen").get_attribute("src") != before
        print("\n" + d.find_element("id", "timing").text)
    finally:
        d.quit()


# the command line: a bad option or file is one line `error: ...` naming it, never a traceback


# ================================================================================================
# ================================================================================================
@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "argument --steps: 0 is out of range: it must be at least 1"),
    (["train", "--batch-size", "0"], "argument --batch-size: 0 is out of range: it must be at least 1"),
    (["train", "--batch-size", "-3"], "argument --batch-size: -3 is out of range: it must be at least 1"),
    (["train", "--steps", "ten"], "argument --steps: 'ten' is not a whole number"),
    (["train", "--sigma", "0"], "argument --sigma: 0 is out of range: it must be above 0"),
    (["train", "--lambda-pix", "-1"], "argument --lambda-pix: -1 is out of range: it must be at least 0"),
    (["train", "--device", "gpu"], "--device gpu: not a device; use cpu or cuda (cuda:N for the N-th GPU)"),
    (["bench", "--warmup", "-1"], "argument --warmup: -1 is out of range: it must be at least 0"),
    (["synth", "out", "--frames", "2"], "argument --frames: 2 is out of range: it must be at least 3"),
    (["ablation", "--ablate", "pix"], "--resume/--ablate: ablation chooses --ablate itself and resumes unfinished "
                                      "runs on its own"),
])
def test_bad_options_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        facesynth.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_an_output_under_a_file_is_one_line_before_any_computing(blobs, tmp_path, capsys):
    """Every verb that writes, with its output below a regular file. The inputs do not exist: the output
    is checked first, before anything is read or computed."""
    f = tmp_path / "file"
    f.write_text("not a folder")
    for main, argv, message in (
            (facesynth.main, ["train", "--data", blobs, "--out", f"{f}/run", *TINY_TRAIN],
             f"{f}/run: cannot use as a run folder (Not a directory)"),
            (facesynth.main, ["prepare", blobs, f"{f}/out"],
             f"{f}/out: cannot make the output folder (Not a directory)"),
            (facesynth.main, ["reenact", "--ckpt", "none", "--source", "none", "--driver", "none",
                              "--out", f"{f}/a.mp4"],
             f"{f}/a.mp4: cannot write there ({f} is a file, not a folder)"),
            (evaluate.main, ["metrics", "--runs", "none", "--out", f"{f}/eval"],
             f"{f}/eval: cannot write there ({f} is a file, not a folder)")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_bad_data_folders_say_what_to_run(tmp_path, capsys):
    missing, raw = tmp_path / "nope", tmp_path / "300VW"
    os.makedirs(raw / "001" / "annot")
    for folder, message in [
            (missing, f"{missing}: no such folder (--data takes a prepared dataset: facesynth.py prepare SRC {missing})"),
            (raw, f"{raw / 'prepare.json'}: missing, so {raw} is not a prepared dataset; prepare it first: "
                  f"python facesynth.py prepare {raw} OUT, then --data OUT")]:
        with pytest.raises(SystemExit) as e:
            facesynth.main(["train", "--data", str(folder), "--device", "cpu"])
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not os.path.exists(os.path.join("runs", "default", "ckpt.pt.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_blames_the_device_not_the_checkpoint(ckpt, tmp_path, capsys):
    want = f"error: --device cuda: this machine has no usable CUDA GPU (torch {torch.__version__}); use --device cpu\n"
    for argv in (["train", "--device", "cuda"], ["bench", "--device", "cuda"]):
        with pytest.raises(SystemExit):
            facesynth.main(argv)
        assert capsys.readouterr().err == want
    with pytest.raises(SystemExit):
        facesynth.main(["reenact", "--ckpt", ckpt, "--source", "synthetic:60", "--driver", "synthetic:61",
                        "--out", str(tmp_path / "o.gif"), "--device", "cuda"])
    assert capsys.readouterr().err == want
    with pytest.raises(SystemExit):
        evaluate.main(["grid", "--runs", os.path.dirname(ckpt), "--device", "cuda", "--out", str(tmp_path)])
    assert capsys.readouterr().err == want


def test_the_quick_start_runs_as_written(blobs, tmp_path, monkeypatch, capsys):
    """The README's quick start in its order, in a fresh folder: each train and evaluate line as written,
    with a tiny model and dataset added at the end and 2 steps (the paper's whole run is left out), and
    every file its comments promise."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(evaluate.__file__)), "README.md")).read()
    quick = readme.split("## Quick start")[1].split("\n## ")[0]
    lines = [l.strip() for l in quick.replace("\\\n", " ").splitlines() if l.startswith("    python ")]
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in lines:
        command, _, comment = line.partition("#")
        script, *argv = command.split()[1:]
        if script == "facesynth.py" and argv[0] == "train" and "--steps" in argv:
            tiny = [w if argv[i - 1] != "--steps" else "2" for i, w in enumerate(argv)]
            facesynth.main(tiny + ["--data", blobs, *TINY_TRAIN])
            run = argv[argv.index("--out") + 1]
        elif script == "evaluate.py":
            evaluate.main(argv + ([] if argv[0] == "losses" else ["--n", "2"]))
            assert f"--runs not given: the most recent run, {run}" in capsys.readouterr().out
        else:
            continue
        ran.append(argv[0])
        for promised in re.findall(r"eval/\S+\.png", comment):
            assert os.path.isfile(promised), (line, promised)
    assert ran == ["train", "grid", "losses", "metrics"] and os.path.isfile("eval/metrics.md")
    assert [int(r["step"]) for r in read_log(run)] == [1, 2]


@pytest.mark.parametrize("main, argv, hint", [
    ("facesynth", ["train", "--batchsize", "8"], "arguments: --batchsize 8 (did you mean --batch-size?)"),
    ("facesynth", ["trian"], "(did you mean train?)"),
    ("facesynth", ["bench", "--stepz", "3"], "(did you mean --steps?)"),
    ("facesynth", ["reenact", "--drvier", "x"], "(did you mean --driver?)"),
    ("evaluate", ["metric"], "(did you mean metrics?)"),
    ("evaluate", ["grid", "--sed", "1"], "(did you mean --seed?)"),
])
def test_mistyped_options_and_verbs_get_a_suggestion(main, argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        {"facesynth": facesynth, "evaluate": evaluate}[main].main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.rstrip().endswith(hint), err


def test_every_verb_and_option_has_help(capsys):
    """--help is for a person: every verb has a description, every option and argument a help text."""
    for main, verbs in ((facesynth, ["train", "prepare", "synth", "ablation", "bench", "reenact", "play"]),
                        (evaluate, ["heatmaps", "grid", "losses", "metrics"])):
        with pytest.raises(SystemExit) as e:  # the top level lists every verb with its help
            main.main(["--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and all(re.search(rf"^    {v} ", text, re.M) for v in verbs), text
        for verb in verbs:
            with pytest.raises(SystemExit):
                main.main([verb, "--help"])
            text = capsys.readouterr().out
            about = text.split("\n\n")[1]
            assert len(about) > 30 and not re.search(r"\bargs\b|\bdict\b", about), (verb, about)
            entries = re.split(r"\n  (?=-|[a-z])", "\n" + text.split("\n\n", 2)[2])[1:]
            helps = {e.split()[0]: e.partition("  ")[2].strip() for e in entries}
            bare = [o for o, h in helps.items() if not h or h.startswith("(default")]
            assert not bare, (verb, bare)


def test_help_shows_defaults(capsys):
    for argv, shown in ((["train", "--help"], "(default: 16)"), (["ablation", "--help"], "(default: runs/ablation)")):
        with pytest.raises(SystemExit):
            facesynth.main(argv)
        assert shown in " ".join(capsys.readouterr().out.split())


def test_evaluate_bad_options_are_one_line(capsys):
    for argv, message in ((["heatmaps", "--vmin", "96", "--vmax", "9"], "--vmin 96 --vmax 9: the colour scale needs "
                                                                         "vmin < vmax"),
                          (["metrics", "--n", "0"], "argument --n: 0 is out of range: it must be at least 1")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
