"""Tests for the synthetic talking-head generator (data.py section S)."""
import functools
import json
import os
import shutil

import imageio
import numpy as np
import pytest

import data

TINY = dict(n_videos=(2, 1, 1, 1), n_frames=6, size=128)
FRONT = dict(yaw=0.0, pitch=0.0, roll=0.0, tx=0.0, ty=0.0, scale=0.2)
NEUTRAL = dict(open=0.0, smile=0.0, brow=0.0, blink=0.0)


def _video(root, name):
    """Everything synth wrote for one video: params, raw .pts text, decoded frames."""
    pts = [open(os.path.join(root, name, "annot", f)).read() for f in sorted(os.listdir(os.path.join(root, name, "annot")))]
    frames = np.stack([f for f in imageio.get_reader(os.path.join(root, name, "vid.avi"), "ffmpeg")])
    return json.load(open(os.path.join(root, name, "params.json"))), pts, frames


def test_synth_is_deterministic_for_a_seed(tmp_path):
    a, b, c = (str(tmp_path / k) for k in "abc")
    data.synth(a, seed=0, workers=1, log=lambda *_: None, **TINY)
    data.synth(b, seed=0, workers=2, log=lambda *_: None, **TINY)  # parallel must not change anything
    data.synth(c, seed=1, workers=1, log=lambda *_: None, **TINY)
    for name in ("001", "005"):
        (pa, ta, fa), (pb, tb, fb), (pc, tc, _) = (_video(r, name) for r in (a, b, c))
        assert pa == pb and ta == tb and np.array_equal(fa, fb)
        assert pa != pc and ta != tc
        assert len(fa) == len(ta) == 6 and fa.shape[1:] == (128, 128, 3)
    assert not [d for d in os.listdir(a) if d.endswith(".tmp")]


def test_synth_layout_split_and_one_based_pts(tmp_path):
    out = str(tmp_path / "raw")
    split = data.synth(out, n_videos=(3, 2, 1, 1), n_frames=3, size=64, workers=1, log=lambda *_: None)
    assert split == json.load(open(os.path.join(out, "split.json")))
    assert [len(split[k]) for k in ("train", "test1", "test2", "test3")] == [3, 2, 1, 1]
    names = sum(split.values(), [])
    assert names == [f"{i:03d}" for i in range(1, 8)]
    identities = [json.dumps(json.load(open(os.path.join(out, n, "params.json")))["identity"]) for n in names]
    assert len(set(identities)) == len(names)  # every test identity is unseen in training
    params = json.load(open(os.path.join(out, "002", "params.json")))
    for t, f in enumerate(params["frames"]):
        _, lm = data.render_face(params["identity"], f["pose"], f["expression"], 64)
        rows = open(os.path.join(out, "002", "annot", f"{t + 1:06d}.pts")).read().split("{")[1].split("}")[0].split()
        assert np.allclose(np.array(rows, float).reshape(68, 2), lm + 1, atol=1e-3)
    # a re-run keeps finished videos and renders only the missing one
    os.remove(os.path.join(out, "003", "params.json"))
    shutil.rmtree(os.path.join(out, "004"))
    data.synth(out, n_videos=(3, 2, 1, 1), n_frames=3, size=64, workers=1, log=lambda *_: None)
    assert os.path.isfile(os.path.join(out, "004", "params.json"))
    assert not os.path.isfile(os.path.join(out, "003", "params.json"))


def test_render_face_draws_at_its_landmarks():
    identity = data.random_identity(np.random.default_rng(0))
    identity.update(iris=[0, 255, 0], glasses=None, beard=None)
    for pose in (FRONT, dict(FRONT, yaw=25.0, pitch=-10.0, roll=12.0, tx=0.1, ty=-0.05)):
        img, lm = data.render_face(identity, pose, NEUTRAL, 256)
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and lm.shape == (68, 2)
        at = lambda p: img[int(round(p[1])), int(round(p[0]))].astype(int)
        for o, i in ((36, 39), (45, 42)):  # outer corner, inner corner of each eye
            assert np.abs(at(lm[o] + 0.25 * (lm[i] - lm[o])) - (238, 236, 230)).max() < 40  # eye white
            c, r = (lm[o] + lm[i]) / 2, 0.075 * (1 + identity["shape"]["eye_size"]) * pose["scale"] * 256
            side = (lm[i] - lm[o]) / np.linalg.norm(lm[i] - lm[o])
            assert np.abs(at(c + 0.7 * r * side) - (0, 255, 0)).max() < 60  # iris around the eye centre
        assert np.abs(at(lm[[48, 54]].mean(0) + (lm[57] - lm[51]) * 0.4) - identity["lips"]).max() < 40
    # blinking closes the eye: skin where the white was; an open mouth shows its dark inside
    img, lm = data.render_face(identity, FRONT, dict(NEUTRAL, blink=1.0, open=1.0), 256)
    p = lm[36] + 0.25 * (lm[39] - lm[36])
    assert np.abs(img[int(round(p[1])), int(round(p[0]))].astype(int) - identity["skin"]).max() < 40
    p = lm[62] + 0.8 * (lm[66] - lm[62])
    assert np.abs(img[int(round(p[1])), int(round(p[0]))].astype(int) - (70, 25, 30)).max() < 40


def test_identity_attributes_toggle():
    rng = np.random.default_rng(3)
    identity = dict(data.random_identity(rng), glasses={"colour": [0, 0, 0], "roundness": 1.0, "width": 0.04})
    pose, expression = data.talking_motion(rng, 1)[0]
    with_glasses, lm = data.render_face(identity, pose, expression, 128)
    without, lm2 = data.render_face(dict(identity, glasses=None), pose, expression, 128)
    assert np.array_equal(lm, lm2) and not np.array_equal(with_glasses, without)


def test_talking_motion_ranges_and_smoothness():
    rng = np.random.default_rng(7)
    motion = data.talking_motion(rng, 2000)
    json.dumps(motion)
    pose = {k: np.array([p[k] for p, _ in motion]) for k in motion[0][0]}
    expr = {k: np.array([e[k] for _, e in motion]) for k in motion[0][1]}
    for k, m in data.MAX_POSE.items():
        assert np.abs(pose[k]).max() <= m and np.abs(pose[k]).max() > 0.3 * m
        assert np.abs(np.diff(pose[k])).max() < 3  # degrees per frame: smooth
    assert pose["scale"].min() > 0
    for k, v in expr.items():
        assert v.min() >= 0 and v.max() <= 1 and v.max() > 0.2, k
    assert (expr["blink"] == 1).sum() >= 10  # ~ a blink every few seconds
    assert np.mean(expr["open"] > 0.1) > 0.2  # the mouth moves with speech


def test_ensure_synthetic_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "synth", functools.partial(data.synth, n_videos=(2, 1, 1, 1), size=128, workers=1))
    root = data.ensure_synthetic(str(tmp_path / "cache"), n_frames=3, log=lambda *_: None)
    split = json.load(open(os.path.join(root, "split.json")))
    assert [len(split[k]) for k in ("train", "test1", "test2", "test3")] == [2, 1, 1, 1]
    assert os.path.isfile(os.path.join(root, "001", "params.json"))
    monkeypatch.setattr(data, "synth", lambda *a, **k: pytest.fail("regenerated a cached set"))
    assert data.ensure_synthetic(str(tmp_path / "cache"), n_frames=3, log=lambda *_: None) == root
