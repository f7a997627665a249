"""--augment, beyond the paper: each triplet scaled, turned and shifted at random, its three frames and
their landmarks alike, so that a person's poses that a short video never shows (a tilt, a lean, a step
closer) are not new to G. The flip of the paper's triplets stays in data.py: this comes on top of it.

The moves of a step are a pure function of (seed, step), drawn for the whole step's batch over all
ranks, so a resumed run and a run on several ranks move the same triplets alike.
"""
import numpy as np
import torch
import torch.nn.functional as F

# scale by up to +-10 % (uniform in log), turn by up to +-15 degrees, shift by up to +-5 % of the crop
SCALE, TURN, SHIFT = 0.1, 15.0, 0.05


def moves(seed, step, n):
    """Step `step`'s n moves: float32 (n,4) of (scale, turn in radians, shift x and y in crop sides)."""
    rng, top = np.random.default_rng([seed, step, 1]), np.log1p(SCALE)
    m = np.stack([np.exp(rng.uniform(-top, top, n)), np.radians(rng.uniform(-TURN, TURN, n)),
                  *rng.uniform(-SHIFT, SHIFT, (2, n))], 1)
    return torch.as_tensor(m, dtype=torch.float32)


def move_triplets(b, m):
    """A batch (data.batches': images (B,3,S,S) in [-1, 1], landmarks (B,68,2) in pixels) with each
    triplet moved by its row of m, (s, a, d): a point p goes to s R(a) (p - c) + c + S d about the crop's
    centre c; each pixel p' of an image reads its source at R(a)^T (p' - c - S d) / s + c, bicubic, and
    outside the crop the edge repeats (THE crop's rule). A new dict; b is left as it was."""
    S = b["I_s"].shape[-1]
    m = m.to(b["I_s"].device)
    s, a, d = m[:, 0], m[:, 1], m[:, 2:] * S
    R = torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)
    c = (S - 1) / 2
    out = {k: s[:, None, None] * (b[k] - c) @ R.transpose(1, 2) + c + d[:, None]
           for k in ("lm_s", "lm_m", "lm_t")}
    inv = R.transpose(1, 2) / s[:, None, None]  # in grid_sample's units: 0 at the centre, 2/S a pixel
    grid = F.affine_grid(torch.cat([inv, -inv @ (d * 2 / S)[..., None]], 2), list(b["I_s"].shape), False)
    for k in ("I_s", "I_t"):
        out[k] = F.grid_sample(b[k], grid, "bicubic", "border", False).clamp(-1, 1)
    return out
