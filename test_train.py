import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import facesynth
import losses
import networks

TINY = ["--ngf", "8", "--vgg-widths", "4", "4", "8", "8", "8", "--batch-size", "4", "--device", "cpu"]


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


def read_log(run):
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


def run_train(*argv):
    facesynth.main(["train", *argv, *TINY])


def test_training_writes_outputs_and_lowers_pixel_loss(blobs, tmp_path):
    out = str(tmp_path / "run")
    run_train("--data", blobs, "--out", out, "--steps", "40", "--log-every", "10", "--sample-every", "20",
              "--lr-g", "2e-3")
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert all(r[f"L_{t}"] for r in rows for t in facesynth.TERMS)
    assert float(rows[-1]["L_pix"]) < 0.5 * float(rows[0]["L_pix"])
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000020.png", "step_000040.png"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vgg"] == "random" and cfg["lambdas"] == losses.LAMBDAS
    G, cfg2 = facesynth.load_generator(out)
    assert cfg2["step"] == 40 and not G.training


def test_resume_reproduces_uninterrupted_run(blobs, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", blobs, "--log-every", "1", "--ckpt-every", "100"]
    run_train(*common, "--out", a, "--steps", "6")
    run_train(*common, "--out", b, "--steps", "3")
    facesynth.main(["train", "--resume", b, "--steps", "6"])
    ra, rb = read_log(a), read_log(b)
    assert [r["step"] for r in rb] == [str(s) for s in range(1, 7)]
    for x, y in zip(ra[3:], rb[3:]):
        for t in facesynth.TERMS:
            assert float(x[f"L_{t}"]) == pytest.approx(float(y[f"L_{t}"]), rel=1e-4, abs=1e-6)
    ga, gb = torch.load(os.path.join(a, "ckpt.pt"))["G"], torch.load(os.path.join(b, "ckpt.pt"))["G"]
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in ga)


def test_resume_refuses_changed_model(blobs, tmp_path, capsys):
    out = str(tmp_path / "r")
    run_train("--data", blobs, "--out", out, "--steps", "2")
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", out, "--ngf", "16"])
    assert e.value.code == 2 and "cannot change ngf" in capsys.readouterr().err


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as e:
        facesynth.main(["train", "--resume", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ckpt.pt: not a readable checkpoint" in err and "Traceback" not in err
    with pytest.raises(data.DataError, match="no checkpoint there"):
        facesynth.load_checkpoint(str(tmp_path / "missing"))


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


def test_flip_in_feed_mirrors_all_three_landmark_sets(blobs):
    videos = data.load_videos(blobs, "train")
    args = {"batch_size": 8, "triplets_per_epoch": 64, "seed": 3, "max_gap": None}
    _, b = next(facesynth.batches(videos, args, 0, 1))
    rows = data.sample_triplets(videos, 64, 3, 0)[:8]
    for i, (v, s, m, t, f) in enumerate(rows):
        want = torch.from_numpy(videos[v]["landmarks"][[s, m, t]])
        if f:
            want = data.mirror_landmarks(want, 32)
        got = torch.stack([b["lm_s"][i], b["lm_m"][i], b["lm_t"][i]])
        assert torch.allclose(got, want)
        img = data.to_tensor(videos[v]["frames"][s][None])[0]
        assert torch.equal(b["I_s"][i], img.flip(-1) if f else img)


def test_two_process_gloo_training_keeps_ranks_identical(blobs, tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "facesynth.py", "train", "--data", blobs, "--out", out, "--steps", "3", "--log-every", "3", *TINY]
    r = subprocess.run(cmd, cwd=os.path.dirname(facesynth.__file__), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ranks identical" in r.stdout
    assert torch.load(os.path.join(out, "ckpt.pt"))["step"] == 3
