"""Yardsticks the paper never had, beside which every score of G is read:

    the floor     two references that need no training: `copy` (Î_t = I_s) and `warp` (I_s warped by a
                  thin-plate spline through the 68 landmarks so that they land on the target's)
    motion        how far a pair's landmarks move, over the face size, and its thirds
    beyond        the scores a model gets beyond L1/PSNR/SSIM: cross-identity truth on the synthetic
                  set (synthetic.cross_scores) and dlib's face judge (landmarks.judge)

A G that loses to `copy` has learned less than doing nothing; one that loses to `warp` less than moving
the source's pixels along its own landmarks. evaluate.py scores both on exactly a run's pairs.
"""
import numpy as np
import torch
import torch.nn.functional as F

from data import face_size
from extras import landmarks, synthetic
import networks

BASELINES = ("copy", "warp")
THIRDS = ("small", "medium", "large")


def warp(sources, src_lm, tgt_lm):
    """The `warp` floor: uint8 sources (N,S,S,3) warped so that their landmarks (N,68,2) land on the
    targets' (N,68,2). Each output pixel takes the source's colour, bilinear, where the thin-plate spline
    through the 68 landmark pairs sends it (networks.tps_grid, which G's "warp" output starts from);
    where that leaves the source crop, its nearest edge pixel (THE crop's rule: edges repeat)."""
    if not len(sources):
        return np.asarray(sources).copy()
    images = torch.as_tensor(np.asarray(sources)).permute(0, 3, 1, 2).float()
    grid = networks.tps_grid(np.asarray(src_lm), np.asarray(tgt_lm), images.shape[-1])
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def draw(name):
    """A baseline as a generator: f(sources, source landmarks, target landmarks, label) -> images."""
    return {"copy": lambda src, src_lm, tgt_lm, label=None: np.asarray(src).copy(),
            "warp": lambda src, src_lm, tgt_lm, label=None: warp(np.asarray(src), src_lm, tgt_lm)}[name]


def generate_fn(G, cfg):
    """A run's G drawn as a baseline is: f(sources, their landmarks, target landmarks, label) -> images
    (networks.generate: the paper's G is given only the targets', a "warp" G both)."""
    return lambda src, src_lm, lm, label=None: networks.generate(G, cfg, src, lm, src_lm, label=label)


def motion(src_lm, tgt_lm):
    """Per pair: the mean distance the 68 landmarks move from source to target over the source's face
    size (THE crop's scale), so the number is the same at any resolution."""
    d = np.linalg.norm(np.asarray(tgt_lm, np.float64) - np.asarray(src_lm, np.float64), axis=-1).mean(-1)
    return d / np.array([face_size(lm) for lm in src_lm])


def thirds(m):
    """The pairs' motion thirds: (edges (2,), {"small": mask, "medium": mask, "large": mask}). The edges
    are the 1/3 and 2/3 quantiles of the pairs' own motions; a pair on an edge goes to the lower third."""
    lo, hi = np.quantile(m, [1 / 3, 2 / 3])
    return [float(lo), float(hi)], {"small": m <= lo, "medium": (m > lo) & (m <= hi), "large": m > hi}


def summarise(pairs, moved, stat):
    """A row of evaluate's tables: ({metric: stat(its pairs)}, {metric: how many}) for every metric, and
    for L1/PSNR/SSIM (and their cross-identity kin, by prefix) over each motion third of their pairs
    (metric_small, _medium, _large). `moved`: {prefix: each pair's motion}; NaN pairs are left out."""
    summary, count = {}, {}
    for k, v in pairs.items():
        v = np.asarray(v, np.float64)
        summary[k], count[k] = stat(v[np.isfinite(v)]), int(np.isfinite(v).sum())
        prefix, metric = k[:-len(k.split("_")[-1])], k.split("_")[-1]
        if metric in ("L1", "PSNR", "SSIM") and prefix in moved:
            for third, mask in thirds(moved[prefix])[1].items():
                summary[f"{k}_{third}"], count[f"{k}_{third}"] = stat(v[mask]), int(mask.sum())
    return summary, count


def beyond(draw_fn, root, split, videos, pairs, n, seed, judge, tag, scores):
    """What a model (or a baseline) scores beyond L1/PSNR/SSIM on its pairs (src, src_lm, gen, tgt_lm):
    with `judge` > 0, dlib's judge on the first `judge` pairs; on the synthetic set, cross-identity truth
    and identity leak. Returns (per-pair scores, the judge's note, the motion of the pairs each score
    prefix was taken on: {"x_": ..., "xabs_": ...})."""
    src, src_lm, gen, tgt_lm = pairs
    out, note = landmarks.judge(gen, src, src_lm, tgt_lm, judge, f"{tag} judge:")
    moved = {}
    if len(videos) > 1 and all(v["params"] for v in videos):  # the synthetic set
        out.update(synthetic.cross_scores(root, split, videos, n, seed, draw_fn, scores, tag))
        t = synthetic.cross_targets(root, split, videos, n, seed)  # cached: the pairs just scored
        moved = dict.fromkeys(("x_", "xabs_"), motion(t["src_lm"], t["lm"]))
    return out, note, moved
