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

from data import face_size
from extras import landmarks, synthetic

BASELINES = ("copy", "warp")
THIRDS = ("small", "medium", "large")
TPS_SMOOTH = 1e-6  # the spline's regulariser, relative to its kernel's scale: coinciding landmarks
                   # (a closed eye, a shut mouth) would leave its system singular without one


def _tps_kernel(r2):
    """The thin-plate spline's radial function U = r² log r², with U(0) = 0."""
    return np.where(r2 > 0, r2 * np.log(np.maximum(r2, 1e-300)), 0.0)


def tps_map(to, frm):
    """The thin-plate spline f with f(to_i) = frm_i for the 68 points (float64 (68,2) each), as a function
    of (..., 2) points. f = affine + sum_i w_i U(|x - to_i|): of all maps through the points, the one
    that bends least (Bookstein 1989); a motion the points make affine (a shift, a turn, a zoom), it
    makes exactly."""
    n = len(to)
    K = _tps_kernel(((to[:, None] - to[None]) ** 2).sum(-1))
    P = np.hstack([np.ones((n, 1)), to])
    A = np.zeros((n + 3, n + 3))
    A[:n, :n] = K + TPS_SMOOTH * max(np.abs(K).mean(), 1.0) * np.eye(n)
    A[:n, n:], A[n:, :n] = P, P.T
    coef = np.linalg.lstsq(A, np.vstack([frm, np.zeros((3, 2))]), rcond=None)[0]
    w, a = coef[:n], coef[n:]

    def f(x):
        U = _tps_kernel(((x[..., None, :] - to) ** 2).sum(-1))
        return a[0] + x @ a[1:] + U @ w
    return f


def sample(image, xy):
    """Bilinear samples of a uint8 (S,S,3) image at pixel-centre coordinates xy (...,2); a point outside
    takes the nearest edge pixel (THE crop's rule: edges are repeated, nothing is black)."""
    S = image.shape[0]
    x, y = (np.clip(xy[..., k], 0, S - 1) for k in (0, 1))
    x0, y0 = (np.minimum(np.floor(v).astype(int), S - 2) for v in (x, y))
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    im = image.astype(np.float64)
    top = im[y0, x0] * (1 - fx) + im[y0, x0 + 1] * fx
    bottom = im[y0 + 1, x0] * (1 - fx) + im[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def warp(sources, src_lm, tgt_lm):
    """The `warp` floor: uint8 sources (N,S,S,3) warped so that their landmarks (N,68,2) land on the
    targets' (N,68,2). Every output pixel x takes the source's colour at f(x), f the thin-plate spline
    through the 68 (target -> source) pairs; where f(x) leaves the source crop, its nearest edge pixel."""
    S = sources.shape[1]
    grid = np.stack(np.meshgrid(np.arange(S), np.arange(S), indexing="xy"), -1).astype(np.float64)
    out = [sample(im, tps_map(np.asarray(t, np.float64), np.asarray(s, np.float64))(grid))
           for im, s, t in zip(sources, src_lm, tgt_lm)]
    return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8) if out else sources.copy()


def draw(name):
    """A baseline as a generator: f(sources, source landmarks, target landmarks, label) -> images."""
    return {"copy": lambda src, src_lm, tgt_lm, label=None: np.asarray(src).copy(),
            "warp": lambda src, src_lm, tgt_lm, label=None: warp(np.asarray(src), src_lm, tgt_lm)}[name]


def generate_fn(G, cfg, generate):
    """A run's G drawn as a baseline is: f(sources, their landmarks, target landmarks, label) -> images
    (networks.generate: G is given only the targets', as the paper's G is)."""
    return lambda src, src_lm, lm, label=None: generate(G, cfg, src, lm, label=label)


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
