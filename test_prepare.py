"""Section P: .pts files, the crop, 300VW preparation (tiny real mpeg4 videos)."""
import json
import os

import imageio
import numpy as np
import pytest

import data

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
        data.write_pts(d / "annot" / f"{i + 1:06d}.pts", face_points())
    return d


def test_pts_roundtrip_and_quirks(tmp_path):
    pts = face_points()
    data.write_pts(tmp_path / "a.pts", pts)
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
    data.write_pts(tmp_path / "a.pts", face_points())
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
    # The landmark on the blob (1-based in the file) lands on the blob in the crop: scale and offset.
    x0, y0, side = data.crop_box(face_points(), data.CROP_SCALE)
    u, v = (np.array(SPOT) + 0.5 - (x0, y0)) * 64 / side - 0.5
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
    make_video(src, "002", n_frames=4, n_pts=4)
    (src / "001" / "params.json").write_text('{"identity": {}, "frames": []}')
    (src / "split.json").write_text(json.dumps({"train": ["001"], "test2": ["002"]}))
    os.remove(src / "002" / "annot" / "000003.pts")  # a gap: later files must not shift onto earlier frames
    logs = []
    s = data.prepare(src, out, workers=1, log=logs.append)
    assert s["prepared"] == 2 and s["frames"] == 4 + 2 and (out / "001" / "params.json").exists()
    assert any("expected 000003.pts, found 000004.pts; using the first 2" in m for m in logs)
    assert json.loads((out / "split.json").read_text())["test2"] == ["002"]
    assert json.loads((out / "prepare.json").read_text())["synthetic"] is True
    (tmp_path / "my.json").write_text(json.dumps({"test3": ["001", "002"]}))
    data.prepare(src, out, workers=1, split_file=tmp_path / "my.json", log=lambda m: None)
    assert json.loads((out / "split.json").read_text())["test3"] == ["001", "002"]
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(data.DataError, match="bad.json"):
        data.prepare(src, out, workers=1, split_file=tmp_path / "bad.json", log=lambda m: None)
