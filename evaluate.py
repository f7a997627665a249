"""Evaluation of trained facesynth runs: the paper's figures and the numbers it never reported.

    python evaluate.py grid                            # Fig. 1: source, target landmarks, generated, target
    python evaluate.py losses   --runs runs/A runs/B   # Fig. 3 loss-term bars, Fig. 4 loss curves
    python evaluate.py heatmaps --runs runs/A runs/B   # Appendix B: error heatmaps of generated images
    python evaluate.py metrics  --runs runs/A runs/B   # L1 / PSNR / SSIM ... with 95 % CIs, beside the floor

Without --runs, a command takes the run under runs/ that was trained last. Outputs go to eval/ (--out).
The faces are held-out pairs that depend only on the dataset, split, --n and --seed, so every run, and
the floor that needs no training (copy, warp: extras/yardsticks.py), is scored on the same pairs.
"""
import csv
import json
import math
import os
import struct
import time
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import networks
from data import DataError, progress
from extras import cli, yardsticks
from losses import TERMS

# ----------------------------------------------------------------------------- defaults
N_FIGURE, N_EVAL, SEED = 6, 200, 0   # pairs in a figure, pairs scored by metrics, pair-sampling seed
VMIN, VMAX = 0, 96                   # the paper: error 0 -> dark blue, >= 96 of 255 -> yellow
FLICKER_VIDEOS, FLICKER_FRAMES = 8, 24  # flicker: the first 8 videos of the split, 24 frames each
TAIL = 0.1                           # "end of training" = mean of the last 10 % of the log's rows
T975 = (12.706, 4.303, 3.182, 2.776)  # Student t 97.5 % quantiles, df 1..4
WIDTH = 100                          # the terminal's table: at most 100 columns, FIRST's metrics first
FIRST = ("L1", "L1_large", "SSIM", "SSIM_large", "PSNR", "PSNR_large", "x_L1", "x_L1_large", "x_SSIM",
         "x_SSIM_large", "flicker", "lm_err", "id_dist")
# Every figure with faces, the sample grids and reenact's video: these columns, in this order.
COLUMNS = ("source", "target landmarks", "generated", "target")
_VIDEOS = {}  # videos_of's cache: (root, split) -> videos


# ----------------------------------------------------------------------------- the drawing kit
# By hand, so that no matplotlib is needed: a PNG writer, viridis, labelled tiles of faces, plot axes.
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
# Viridis (van der Walt & Smith; matplotlib's _viridis_data, CC0): 22 of its 256 entries as
# (index, r, g, b), picked greedily so that linear interpolation between them stays within 0.82 of
# one 8-bit level of every published entry (8-bit colours off by at most 1).
VIRIDIS = np.array([
    (0, .267004, .004874, .329415), (14, .281446, .084320, .407414), (26, .282290, .145912, .461510),
    (38, .273006, .204520, .501721), (50, .255645, .260703, .528312), (65, .227802, .326594, .546532),
    (83, .194100, .399323, .555565), (108, .154815, .493313, .557840), (128, .127568, .566949, .550556),
    (142, .119699, .618490, .536347), (153, .134692, .658636, .517649), (164, .175707, .697900, .491033),
    (176, .246070, .738910, .452024), (188, .335885, .777018, .402049), (202, .458674, .816363, .329727),
    (214, .575563, .844566, .256415), (231, .751884, .874951, .143228), (238, .824940, .884720, .106217),
    (242, .866013, .889868, .095953), (246, .906311, .894855, .098125), (250, .945636, .899815, .112838),
    (255, .993248, .906157, .143936)])
FONT = {s: ImageFont.load_default(size=s) for s in (10, 11, 13)}  # Pillow >= 10: scalable


def png_bytes(img):
    """8-bit grey (H,W) or RGB (H,W,3) -> PNG: signature, then IHDR, one zlib IDAT and IEND chunks,
    each length + type + data + CRC-32(type + data). Every row starts with filter byte 0 (none)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, -1)], axis=1)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if img.ndim == 2 else 2, 0, 0, 0)  # depth 8, grey / RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def write_png(path, img):
    with data.writing(path) as tmp, open(tmp, "wb") as f:  # whole or not at all
        f.write(png_bytes(img))
    return path


def viridis(t):
    """Values in [0, 1] (clipped) -> uint8 (..., 3) viridis colours."""
    x = np.clip(np.asarray(t, dtype=np.float64), 0, 1) * 255
    rgb = np.stack([np.interp(x, VIRIDIS[:, 0], VIRIDIS[:, c]) for c in (1, 2, 3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def label_strip(labels, cell, height=16):
    """White, a black label centred over each of len(labels) panels cell pixels wide: uint8 (height,W,3)."""
    im = Image.new("RGB", (cell * len(labels), height), "white")
    d = ImageDraw.Draw(im)
    for c, label in enumerate(labels):
        d.text((c * cell + cell / 2, 2), label[:cell // 6], fill="black", anchor="ma", font=FONT[11])
    return np.asarray(im)


def tile_figure(columns, labels, colorbar=None):
    """Columns of (N,S,S,3) tiles scaled up to >= 128 px (so the labels fit), labels on top, and for
    heatmaps a viridis colour bar (vmin, vmax) underneath. Returns uint8 (H,W,3)."""
    n, size = columns[0].shape[:2]
    cell = size * max(1, 128 // size)
    im = Image.new("RGB", (cell * len(labels), 18 + cell * n + (34 if colorbar else 0)), "white")
    d = ImageDraw.Draw(im)
    im.paste(Image.fromarray(label_strip(labels, cell, 18)), (0, 0))
    for c, column in enumerate(columns):
        for r, tile in enumerate(column):
            im.paste(Image.fromarray(tile).resize((cell, cell), Image.NEAREST), (c * cell, 18 + r * cell))
    if colorbar:
        y, w = 22 + cell * n, min(im.width - 40, 256)
        im.paste(Image.fromarray(np.repeat(viridis(np.linspace(0, 1, w))[None], 10, 0)), (20, y))
        for f, v in zip((0, .5, 1), (colorbar[0], sum(colorbar) / 2, colorbar[1])):
            d.text((20 + f * (w - 1), y + 12), f"{v:g}" + "+" * (f == 1), fill="black", anchor="ma",
                   font=FONT[11])
        d.text((w + 28, y), "|generated - target|, 0-255", fill="black", font=FONT[11])
    return np.asarray(im)


def ticks(lo, hi, log=False):
    """Powers of ten on a log axis, else about five at 1, 2 or 5 x 10^k."""
    if log:
        return [10.0 ** k for k in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    raw = (hi - lo) / 5 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return list(np.arange(math.ceil(lo / step) * step, hi + step * 1e-6, step))


def axes(d, box, xr, yr, log=False, title="", xlabel="", ylabel="", xticks=True):
    """Frame, ticks and labels around box (x0, y0, x1, y1); returns the data -> pixel maps."""
    x0, y0, x1, y1 = box
    tf = math.log10 if log else float
    fx = lambda v: x0 + (v - xr[0]) / ((xr[1] - xr[0]) or 1) * (x1 - x0)
    fy = lambda v: y1 - (tf(v) - tf(yr[0])) / ((tf(yr[1]) - tf(yr[0])) or 1) * (y1 - y0)
    d.rectangle(box, outline="black")
    for v in ticks(*yr, log):
        d.line([(x0 - 4, fy(v)), (x0, fy(v))], fill="black")
        d.text((x0 - 6, fy(v)), f"{v:.3g}", fill="black", anchor="rm", font=FONT[11])
    for v in ticks(*xr, False) if xticks else []:
        d.line([(fx(v), y1), (fx(v), y1 + 4)], fill="black")
        d.text((fx(v), y1 + 6), f"{v:.6g}", fill="black", anchor="ma", font=FONT[11])
    d.text(((x0 + x1) / 2, y0 - 40), title, fill="black", anchor="ma", font=FONT[13])
    d.text((x0 - 50, y0 - 8), ylabel, fill="black", anchor="ls", font=FONT[11])
    d.text(((x0 + x1) / 2, y1 + 22), xlabel, fill="black", anchor="ma", font=FONT[11])
    return fx, fy


def panels(n, w=380, h=280):
    """A white canvas for n plot panels, 4 to a row, its ImageDraw, and each panel's plotting box."""
    im = Image.new("RGB", (w * min(n, 4), h * math.ceil(n / 4)), "white")
    cells = (divmod(i, 4) for i in range(n))
    boxes = [(c * w + 70, r * h + 48, c * w + w - 15, r * h + h - 45) for r, c in cells]
    return im, ImageDraw.Draw(im), boxes


# ----------------------------------------------------------------------------- what figures show
def error_heatmap(generated, target, vmin=VMIN, vmax=VMAX):
    """Appendix B: |generated - target| averaged over colour channels on the 0-255 scale, viridis."""
    err = np.abs(generated.astype(np.float64) - target.astype(np.float64)).mean(-1)
    return viridis((err - vmin) / (vmax - vmin))


def landmark_picture(lm, cfg):
    """The landmark columns: uint8 (N,S,S,3) pictures of what G is given for (N,68,2) landmarks, with
    the run's heatmap size, sigma and window."""
    hm = cfg["args"]["size"], cfg["args"]["sigma"], cfg["args"]["window"]
    return data.to_uint8(data.heatmap_picture(torch.as_tensor(np.asarray(lm)), *hm))


# ----------------------------------------------------------------------------- runs, pairs, generation
def videos_of(root, split=None):
    """(split, videos) of a prepared root, cached as several runs share a dataset. The default split
    is the first test split that has videos (a small synthetic set may leave some empty)."""
    if split is None and os.path.isfile(os.path.join(root, "split.json")):  # else load_videos says so
        mapping = data.read_json(os.path.join(root, "split.json"), "prepare the dataset again")
        mapping = mapping if isinstance(mapping, dict) else {}  # load_videos says what is wrong with it
        split = next((k for k, v in sorted(mapping.items()) if k.startswith("test") and v), "test1")
    if (root, split) not in _VIDEOS:
        _VIDEOS[root, split] = data.load_videos(root, split)
    return split, _VIDEOS[root, split]


def eval_pairs(videos, n, seed=SEED):
    """n (video, source frame, target frame): the paper's setting, two distinct frames of one video.
    Drawn one after another, so the first k of n pairs are the k pairs: figures show metrics' pairs."""
    rng, out = np.random.default_rng(seed), []
    usable = [i for i, v in enumerate(videos) if len(v["landmarks"]) >= 2]  # a 1-frame video has no pair
    if not usable:
        raise DataError(f"no video with 2 frames or more among {[v['name'] for v in videos]}")
    for _ in range(n):
        v = usable[int(rng.integers(len(usable)))]
        out.append((v, *(int(i) for i in rng.choice(len(videos[v]["landmarks"]), size=2, replace=False))))
    return out


def gather(videos, n, seed=SEED):
    """Source images, source landmarks, target images, target landmarks of eval_pairs(videos, n, seed)."""
    pairs = eval_pairs(videos, n, seed)
    get = lambda key, i: np.stack([videos[p[0]][key][p[i]] for p in pairs])
    return get("frames", 1), get("landmarks", 1), get("frames", 2), get("landmarks", 2)


# ----------------------------------------------------------------------------- metrics
def flicker(frames):
    """Temporal change of a uint8 video (T,H,W,3): mean |frame t+1 - frame t| on the 0-255 scale, 0 when
    static. The motion itself changes pixels too, so reenact reports flicker(generated) / flicker(a
    reference doing the same motion): 1 = as steady as the real thing, above 1 = added flicker."""
    f = np.asarray(frames, np.float32)
    return float(np.abs(np.diff(f, axis=0)).mean()) if len(f) > 1 else 0.0


def flicker_ratio(draw, video, n=FLICKER_FRAMES):
    """Temporal consistency (the paper's ethics section: frame-by-frame generation flickers): a test
    video's first frame driven by its own next n landmarks (draw: a model's generate_fn); the drawn
    video's mean frame-to-frame change over the real video's. 1 = as steady as the footage, above 1 =
    flicker."""
    T = min(len(video["landmarks"]), n)
    if T < 2:  # no frame-to-frame change to compare; metrics drops the nan
        return math.nan
    first = lambda x: np.repeat(np.asarray(x[:1]), T, 0)
    gen = draw(first(video["frames"]), first(video["landmarks"]), video["landmarks"][:T])
    return flicker(gen) / max(flicker(np.asarray(video["frames"][:T])), 1e-6)


def ssim(a, b):
    """SSIM of Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255,
    'valid' borders, per colour channel, averaged. uint8 (N,S,S,3) pairs -> (N,) float. The window is
    separable, so filtering is K @ X @ K^T with K the banded (S-10, S) matrix of the 1-D Gaussian:
    float64 matrix products, 15x faster on a CPU than a float64 2-D convolution."""
    x, y = (torch.as_tensor(np.asarray(im), dtype=torch.float64).permute(0, 3, 1, 2) for im in (a, b))
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    n = x.shape[-1] - 10
    K = torch.stack([torch.nn.functional.pad(g / g.sum(), (i, n - 1 - i)) for i in range(n)])
    f = lambda z: K @ z @ K.T
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * mx * my + C1) * (2 * cxy + C2)
            / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))).mean((1, 2, 3)).numpy()


def scores(gen, tgt, prefix=""):
    """Per pair: L1 = mean |difference| in 0-255 levels, PSNR in dB (peak 255; MSE floored at 1e-10
    so identical images score a finite 148 dB, not inf), SSIM."""
    diff = gen.astype(np.float64) - tgt.astype(np.float64)
    mse = (diff ** 2).mean((1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return {prefix + "L1": np.abs(diff).mean((1, 2, 3)), prefix + "PSNR": psnr,
            prefix + "SSIM": ssim(gen, tgt)}


def mean_ci(x):
    """[mean, low, high]: the 95 % t-interval mean +- t * s / sqrt(n), t from a table to df 4, then
    the Cornish-Fisher expansion around z = 1.96 (error < 0.003); nan bounds below 2 values."""
    x, df = np.asarray(x, dtype=np.float64), len(x) - 1
    if df < 1:
        return [float(x.mean()) if len(x) else math.nan, math.nan, math.nan]
    t = (T975[df - 1] if df <= len(T975)
         else 1.959964 + 2.372271 / df + 2.822499 / df ** 2 + 2.555850 / df ** 3)
    h = t * x.std(ddof=1) / math.sqrt(len(x))
    return [float(x.mean()), float(x.mean() - h), float(x.mean() + h)]


def metrics(run_dirs, split=None, data_root=None, n_pairs=N_EVAL, seed=SEED, device="cpu", judge=0):
    """Score each run, and the floor (copy, warp) on each run's dataset, on that dataset's deterministic
    pairs (its config's, unless `data_root`). Returns {"split", "n_pairs", "seed", "judge", "runs": {run:
    row}, "baselines": {name: row}, "motion": {dataset: {"edges", "pairs"}}}, a row {"data", "split",
    "pairs": {metric: [per pair]}, "summary": {metric: [mean, low, high]}, "n": {metric: pairs}}, the
    interval a 95 % t-interval over pairs. judge: how many pairs dlib's face judge scores (~0.5 s each)."""
    roots = {r: data_root or networks.load_checkpoint(r)["args"]["data"] for r in run_dirs}
    for root in roots.values():  # every checkpoint and dataset read first: a mistyped last run fails at once
        videos_of(root, split)
    datasets = list(dict.fromkeys(roots.values()))
    names = dict(zip(datasets, cli.labels(datasets))) if len(datasets) > 1 else {datasets[0]: ""}
    jobs = [(f"{b} ({names[root]})" if names[root] else b, b, root) for root in datasets
            for b in yardsticks.BASELINES] + [(r, None, roots[r]) for r in run_dirs]
    out, t0 = {"n_pairs": n_pairs, "seed": seed, "runs": {}, "baselines": {}, "motion": {}}, time.time()
    for i, (name, baseline, root) in enumerate(jobs):
        tag = f"metrics {i + 1}/{len(jobs)}"
        draw = yardsticks.draw(baseline) if baseline else yardsticks.generate_fn(
            *networks.load_generator(name, device))
        out["split"], videos = videos_of(root, split)
        src, src_lm, tgt, tgt_lm = gather(videos, n_pairs, seed)
        gen = draw(src, src_lm, tgt_lm, f"{tag} same-video pairs:")
        # beyond the paper (extras/yardsticks.py): the judge, and the synthetic set's cross-identity truth
        drawn = (src, src_lm, gen, tgt_lm)
        more, out["judge"], moved = yardsticks.beyond(draw, root, out["split"], videos, drawn, n_pairs, seed,
                                                      judge, tag, scores)
        pairs = {**scores(gen, tgt), **more}
        if baseline != "copy":  # a copy never moves: no flicker to measure
            pairs["flicker"], t1 = [], time.time()
            for k, v in enumerate(videos[:FLICKER_VIDEOS]):
                pairs["flicker"].append(flicker_ratio(draw, v))
                progress(f"{tag} flicker:", k + 1, len(videos[:FLICKER_VIDEOS]), t1, unit="videos")
        moved[""] = yardsticks.motion(src_lm, tgt_lm)
        out["motion"][root] = {"edges": yardsticks.thirds(moved[""])[0], "pairs": moved[""].tolist()}
        summary, count = yardsticks.summarise(pairs, moved, mean_ci)
        out["baselines" if baseline else "runs"][name] = {
            "data": root, "split": out["split"], "summary": summary, "n": count,
            "pairs": {k: [float(x) for x in v if np.isfinite(x)] for k, v in pairs.items()}}
        left = (time.time() - t0) / (i + 1) * (len(jobs) - i - 1)
        print(f"{tag} {name} scored, {data.clock(time.time() - t0)} so far"
              + (f"; ETA {data.clock(left)} for the other {len(jobs) - i - 1}" if left else ""), flush=True)
    return out


# ----------------------------------------------------------------------------- figures
def generated_pairs(run_dirs, split, data_root, n, seed, device):
    """The first n evaluation pairs of the runs' (one) dataset as image columns: source, the target
    landmarks as the first run's G is given them, target, the list of each run's generated images, and
    the `warp` floor's (extras/yardsticks.py)."""
    runs = [networks.load_generator(r, device) for r in run_dirs]
    roots = {data_root or cfg["args"]["data"] for _, cfg in runs}
    if len(roots) > 1:  # a figure's rows are shared, so the runs must be
        raise DataError(f"runs use different datasets ({', '.join(sorted(roots))}); pick one with --data")
    src, src_lm, tgt, tgt_lm = gather(videos_of(roots.pop(), split)[1], n, seed)
    gens = [networks.generate(G, cfg, src, tgt_lm, src_lm) for G, cfg in runs]
    return src, landmark_picture(tgt_lm, runs[0][1]), tgt, gens, yardsticks.warp(src, src_lm, tgt_lm)


def heatmap_figure(run_dirs, out, split=None, data_root=None, n=N_FIGURE, seed=SEED, device="cpu",
                   vmin=VMIN, vmax=VMAX):
    """Appendix B, a row per pair: COLUMNS with each run's generated image and the warp floor's, then
    each one's error heatmap; also each heatmap alone in out/heatmaps/."""
    src, lm, tgt, gens, floor = generated_pairs(run_dirs, split, data_root, n, seed, device)
    names = [*cli.labels(run_dirs), "warp"]
    heats = [error_heatmap(g, tgt, vmin, vmax) for g in [*gens, floor]]
    for name, h in zip(names, heats):
        for i, img in enumerate(h):
            write_png(os.path.join(out, "heatmaps", f"{name}_pair{i}.png"), img)
    head = [*COLUMNS[:2], *(f"{r}: generated" for r in names[:-1]), "warp", COLUMNS[3],
            *(f"{r}: error" for r in names)]
    figure = tile_figure([src, lm, *gens, floor, tgt, *heats], head, (vmin, vmax))
    return write_png(os.path.join(out, "heatmaps.png"), figure)


def grid_figures(run_dirs, out, split=None, data_root=None, n=N_FIGURE, seed=SEED, device="cpu"):
    """Fig. 1, a PNG per run: COLUMNS, with the warp floor beside the generated column."""
    paths = []
    for run_dir, name in zip(run_dirs, cli.labels(run_dirs)):
        src, lm, tgt, (gen,), floor = generated_pairs([run_dir], split, data_root, n, seed, device)
        figure = tile_figure([src, lm, gen, floor, tgt], [*COLUMNS[:3], "warp", COLUMNS[3]])
        paths.append(write_png(os.path.join(out, f"grid_{name}.png"), figure))
    return paths


def read_log(run_dir):
    """Steps, and each weighted term lambda * L_term over training (ablated ones, lambda = 0, left
    out) plus the total L_G, from log.csv (raw terms) and config.json (the effective lambdas)."""
    try:
        with open(os.path.join(run_dir, "log.csv")) as f:
            rows = [r for r in csv.DictReader(f) if None not in r.values()]  # not a row cut short by a kill
        with open(os.path.join(run_dir, "config.json")) as f:
            lam = json.load(f)["lambdas"]
        col = lambda k: np.array([float(r[k] or "nan") for r in rows])
        curves = {"L_G": col("L_G"), **{t: lam[t] * col("L_" + t) for t in TERMS if lam.get(t)}}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{run_dir}: cannot read log.csv / config.json ({type(e).__name__}: {e})") from None
    if not rows:
        raise DataError(f"{run_dir}/log.csv: no rows yet (the run stopped before its first step ended); "
                        "train it again")
    return col("step"), curves


def loss_figures(run_dirs, out):
    """Fig. 3: each term's weighted magnitude at the end of training (mean of the log's last TAIL), a
    panel per run on one scale. Fig. 4: L_G and the weighted terms over training, moving-average
    smoothed, log scale, one scale. Returns the two PNG paths."""
    logs, names = [read_log(r) for r in run_dirs], cli.labels(run_dirs)
    ends = [[float(np.nanmean(c[t][-max(1, int(len(s) * TAIL)):])) if t in c else 0.0 for t in TERMS]
            for s, c in logs]
    im, d, boxes = panels(len(logs))
    top = max(max(map(max, ends)), 1e-12) * 1.15
    for name, e, box in zip(names, ends, boxes):
        fx, fy = axes(d, box, (0, len(TERMS)), (0, top), title=name, ylabel="lambda * L, end of training",
                      xticks=False)
        for i, (t, v) in enumerate(zip(TERMS, e)):
            d.rectangle([fx(i + 0.2), fy(v), fx(i + 0.8), fy(0)], fill=COLORS[i])
            d.text((fx(i + 0.5), fy(v) - 2), f"{v:.3g}" if v else "off", fill="black", anchor="md",
                   font=FONT[10])
            d.text((fx(i + 0.5), box[3] + 6), t, fill="black", anchor="ma", font=FONT[11])
    bars = write_png(os.path.join(out, "loss_bars.png"), np.asarray(im))
    k = lambda y: max(1, len(y) // 20)  # smoothing window: a twentieth of the log
    smooth = lambda y: np.convolve(np.nan_to_num(y), np.ones(k(y)) / k(y), "valid")
    colour = lambda t: COLORS[TERMS.index(t)] if t in TERMS else "black"
    positive = [np.ones(1)]  # the log axis spans every curve's positive values (1 for an empty log)
    for _, curves in logs:
        positive += [smooth(y)[smooth(y) > 0] for y in curves.values()]
    pos = np.concatenate(positive)
    im, d, boxes = panels(len(logs))
    for name, (steps, c), box in zip(names, logs, boxes):
        x = steps[k(steps) - 1:]
        fx, fy = axes(d, box, (x[0], max(x[-1], x[0] + 1)), (pos.min(), pos.max() * 1.5), log=True,
                      title=name, xlabel="step", ylabel="lambda * L (smoothed)")
        for t, y in c.items():
            pts = [(fx(a), fy(b)) for a, b in zip(x, smooth(y)) if b > 0]
            d.line(pts, fill=colour(t), width=1 + (t == "L_G"))
            for px, py in pts if len(pts) < 3 else []:  # a line needs two points: a short log shows dots
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour(t))
        d.rectangle([box[2] - 64, box[1] + 2, box[2] - 2, box[1] + 6 + 12 * len(c)], fill="white",
                    outline="grey")
        for j, t in enumerate(c):  # the legend, on top of the curves
            d.line([(box[2] - 60, box[1] + 10 + 12 * j), (box[2] - 45, box[1] + 10 + 12 * j)],
                   fill=colour(t), width=2)
            d.text((box[2] - 42, box[1] + 10 + 12 * j), t, fill="black", anchor="lm", font=FONT[10])
    return bars, write_png(os.path.join(out, "loss_curves.png"), np.asarray(im))


# ----------------------------------------------------------------------------- tables
def fmt(s):
    return f"{s[0]:.4g} [{s[1]:.4g}, {s[2]:.4g}]" if math.isfinite(s[1]) else f"{s[0]:.4g}"


def table(head, rows):
    row = lambda cells: "| " + " | ".join(cells) + " |"
    return "\n".join([row(head), "|---" * len(head) + "|"] + [row(r) for r in rows])


def rows(m):
    """The tables' rows, (name, row): the floor first (`copy`, `warp`), then the runs by label."""
    return [*m["baselines"].items(), *zip(cli.labels(list(m["runs"])), m["runs"].values())]


def save_metrics(m, out):
    """metrics.json (everything, per-pair scores included), metrics.csv (a row per model and metric) and
    metrics.md: a row per model, "mean [95 % CI over pairs]" per metric. Returns that Markdown table."""
    models = rows(m)
    keys = list(dict.fromkeys(k for _, r in models for k in r["summary"]))
    with data.writing(os.path.join(out, "metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump(m, f)
    with data.writing(os.path.join(out, "metrics.csv")) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([["run", "metric", "mean", "ci_low", "ci_high", "n"]] + [
            [name, k, *v, r["n"][k]] for name, r in models for k, v in r["summary"].items()])
    md = table(["run"] + keys, [[name] + [fmt(r["summary"][k]) if k in r["summary"] else "-" for k in keys]
                                for name, r in models])
    edges = "; ".join(f"{e['edges'][0]:.3g} and {e['edges'][1]:.3g}" for e in m["motion"].values())
    with data.writing(os.path.join(out, "metrics.md")) as tmp, open(tmp, "w") as f:
        f.write(f"Split `{m['split']}`, {m['n_pairs']} pairs (seed {m['seed']}); judge: {m['judge']}. "
                f"Mean [95 % t-interval over pairs]. `copy` and `warp` are the floor (no training). "
                f"_small/_medium/_large: the thirds of the pairs by motion (mean landmark displacement / "
                f"face size), edges {edges}.\n\n{md}\n")
    return md


def main(argv=None):
    p = cli.ArgParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, about in (
            ("heatmaps", "Appendix B: each run's |generated - target| on held-out pairs, and the warp's"),
            ("grid", "Fig. 1 per run: source, target landmarks (as G gets them), generated, warp, target"),
            ("losses", "Fig. 3 (each weighted loss term at the end), Fig. 4 (over training), from log.csv"),
            ("metrics", "L1 / PSNR / SSIM on held-out pairs with 95 % intervals, on all pairs and by "
                        "motion third, beside the floor (copy, warp); on the synthetic set, cross-identity "
                        "scores and identity leak; flicker. A short table, the full one in OUT/metrics.md")):
        s = sub.add_parser(cmd, help=about.replace("%", "%%"), description=about)  # help is %-formatted
        s.add_argument("--runs", nargs="+", help="run folders (default: the run under runs/ trained last)")
        s.add_argument("--out", default="eval", help="output folder")
        if cmd != "losses":
            s.add_argument("--data", help="prepared dataset (default: each run's own, from its config)")
            s.add_argument("--split", help="the pairs' split (default: the first test split with videos)")
            s.add_argument("--n", type=cli.number(), default=N_EVAL if cmd == "metrics" else N_FIGURE,
                           help="held-out source/target pairs")
            s.add_argument("--seed", type=cli.number(int, 0), default=SEED, help="pair-sampling seed")
            s.add_argument("--device", default="cpu", help="cpu or cuda")
        if cmd == "metrics":
            s.add_argument("--judge", type=cli.number(int, 0), nargs="?", const=N_EVAL, default=0,
                           metavar="N", help="also score the first N pairs (all without N) with dlib's face "
                           "judge: landmark error and identity distance, ~0.5 s a pair (the optional extra)")
        if cmd == "heatmaps":
            s.add_argument("--vmin", type=float, default=VMIN, help="error drawn dark blue (0-255)")
            s.add_argument("--vmax", type=float, default=VMAX, help="error drawn yellow, and above")
    a = p.parse_args(argv)
    try:
        device = networks.pick_device(getattr(a, "device", "cpu"))
        cli.writable(a.out, folder=True)  # before any computing
        if a.cmd == "heatmaps" and not a.vmin < a.vmax:
            raise DataError(f"--vmin {a.vmin:g} --vmax {a.vmax:g}: the colour scale needs vmin < vmax")
        a.runs = a.runs or cli.latest_run()
        pairs = (a.split, a.data, a.n, a.seed, device) if a.cmd != "losses" else ()
        if a.cmd == "losses":
            paths = loss_figures(a.runs, a.out)
        elif a.cmd == "heatmaps":
            paths = [heatmap_figure(a.runs, a.out, *pairs, a.vmin, a.vmax)]
        elif a.cmd == "grid":
            paths = grid_figures(a.runs, a.out, *pairs)
        else:
            m = metrics(a.runs, *pairs, a.judge)
            save_metrics(m, a.out)
            text, rest = cli.short_table(rows(m), FIRST, WIDTH)
            edges = "; ".join(f"{e['edges'][0]:.3g} and {e['edges'][1]:.3g}" for e in m["motion"].values())
            more = f" {len(rest)} more in metrics.md." if rest else ""
            print(f"\n{text}\n\ncopy, warp: the floor, no training. Mean ± half the 95 % t-interval over "
                  f"{a.n} pairs.\n_large: the third of the pairs that move most (motion = mean landmark "
                  f"displacement / face\nsize; edges {edges}). Judge: {m['judge']}.{more}")
            paths = [os.path.join(a.out, f) for f in ("metrics.md", "metrics.csv", "metrics.json")]
    except DataError as e:
        cli.fail(str(e))
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
