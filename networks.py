"""The three networks: the U-Net generator G, the PatchGAN discriminator D, and a hand-built VGG-19
whose activations feed the perceptual (L_pp) and identity (L_id) losses; and the model's life cycle:
checkpoints (plain dicts), G rebuilt from one, batched generation.

G(I_s, e_t) maps a source image and the target's 68 landmark heatmaps to the target image.
D(I, e_t) says how real an image looks *given* the landmarks it should show.
"""
import io
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import N_LANDMARKS, DataError, WriteError, heatmaps, progress, to_tensor, to_uint8, writing

# torchvision's VGG-19 `features`: a number is a 3x3 conv (+ ReLU) with that many channels, "M" a
# 2x2 max-pool. Building it in this order makes `features.N` the same N as in torchvision's keys.
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
           512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG_WIDTHS = (64, 128, 256, 512, 512)  # channels of the five blocks; tests pass small ones
# index in `features` of the ReLU after each conv, as torchvision numbers its layers
RELU = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
        "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
        "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35}
# What G's last conv draws. "image": every pixel of Î_t (the paper). Beyond the paper, what changes:
# "residual", Î_t = I_s + Δ; "flow", Î_t = I_s sampled along a flow F, + Δ; "warp", I_s sampled along the
# landmarks' thin-plate spline (tps_grid) + F, + Δ. They start as the floor: copy, copy, warp.
OUTPUTS = ("image", "residual", "flow", "warp")
TPS_SMOOTH = 1e-6  # the spline's regulariser, relative to its kernel's scale: coinciding landmarks (a
                   # closed eye, a shut mouth) would leave its system singular without one
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pick_device(name=None, log=print):
    """--device as a torch.device, checked here so that a missing GPU is one line, not a traceback
    from deep inside the first CUDA call. None: CUDA when there is one."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log("note: no CUDA device, running on the CPU")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device; use cpu or cuda (cuda:N for the N-th GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                        "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DataError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: there are only {torch.cuda.device_count()} GPUs")
    return device


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def to_layout(vgg, device):
    """The frozen VGG in the memory layout its convolutions run fastest in, in place. On the CPU that is
    channels_last (NHWC), oneDNN's own: NCHW tensors are reordered on the way into and out of every
    convolution, and VGG's forward and backward run ~15 % faster without (docs/speed.md). G and D stay
    NCHW: their GroupNorms and concatenations gave the convolutions' gain back, and GroupNorm's
    channels_last kernel rounds more. On CUDA, NCHW throughout. The maths is unchanged; only the order
    of a convolution's sums may differ."""
    if device.type == "cpu":
        vgg.to(memory_format=torch.channels_last)
    return vgg


def _norm(channels):
    # Per-sample normalisation, NOT BatchNorm: the training loop stacks several generator passes
    # (G(I_s;e_t), G(I_s;e_m), the cycles) into one call, and each image's result must not depend
    # on which other images share the batch. InstanceNorm normalises every image on its own.
    # GroupNorm with one group per channel is exactly affine InstanceNorm (per sample and channel:
    # (x - mean) / sqrt(var + 1e-5) * weight + bias, no running statistics) with the same state-dict
    # keys. It is the faster kernel on CUDA: InstanceNorm2d runs as batch
    # norm on a reshaped tensor (docs/speed.md has the profile).
    return nn.GroupNorm(channels, channels, eps=1e-5)


class Generator(nn.Module):
    """U-Net: n_down stride-2 down blocks, one residual block at the bottleneck, n_down stride-2 up
    blocks that each see the previous output concatenated with the matching down block's (the
    skips), then a 3x3 conv to RGB. `output` says what that last conv draws (OUTPUTS)."""

    def __init__(self, ngf=64, n_down=4, n_landmarks=N_LANDMARKS, output="image"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; known: {', '.join(OUTPUTS)}")
        self.n_down, self.output = n_down, output
        ch = [ngf * min(2 ** i, 8) for i in range(n_down)]  # ngf, 2ngf, 4ngf, 8ngf, 8ngf, ... (pix2pix)
        c_in = [3 + n_landmarks] + ch[:-1]
        # Conv4x4/2 -> norm -> LeakyReLU(0.2); no norm on the first block (pix2pix: it would wash out
        # the raw input statistics, and the image colours are what G has to carry over)
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in[i], ch[i], 4, 2, 1), _norm(ch[i]) if i else nn.Identity(),
                          nn.LeakyReLU(0.2)) for i in range(n_down))
        b = ch[-1]
        self.res = nn.Sequential(nn.Conv2d(b, b, 3, 1, 1), _norm(b), nn.ReLU(),
                                 nn.Conv2d(b, b, 3, 1, 1), _norm(b))
        # Symmetric up path: up block i doubles the resolution and returns down block i's width; it
        # reads the block below's output ⊕ down block i's (the skip), the innermost the bottleneck
        # alone. (pix2pix instead narrows to the next shallower width and makes its 4th up block the
        # RGB output; that is 0.85 GFLOP/image at ngf 64 and 64 px, this is 1.9, the cost the
        # paper's size implies.)
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(ch[i] + (ch[i + 1] if i < n_down - 1 else 0), ch[i], 4, 2, 1),
                          _norm(ch[i]), nn.ReLU()) for i in range(n_down - 1, -1, -1))
        self.out = nn.Conv2d(ch[0], 3 + 2 * (output in ("flow", "warp")), 3, 1, 1)  # to RGB (and a flow)
        if output != "image":  # Δ = 0 and no flow: an untrained G copies its source, the copy floor
            nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, image, heatmaps, base=None):
        """Î_t from I_s (B,3,S,S) and e_t (B,68,S,S); base: for output "warp", where each pixel of the
        target reads I_s (tps_grid of the source's and target's landmarks)."""
        s = image.shape[-1]
        if s % 2 ** self.n_down or s >> self.n_down < 2:
            raise ValueError(f"image size {s} must be a multiple of 2^n_down = {2 ** self.n_down}, "
                             "at least twice it")
        x, skips = torch.cat([image, heatmaps], 1), []  # input = I_s ⊕ e_t (3 + 68 channels)
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        x = x + self.res(x)  # the residual block: x + F(x)
        for block in self.up:
            x = block(x)
            if skips:
                x = torch.cat([x, skips.pop()], 1)
        y = self.out(x)
        if self.output == "image":
            return torch.tanh(y)  # the paper's: G draws every pixel; images live in [-1, 1]
        if self.output in ("flow", "warp"):  # I_s resampled where the flow points (in image half-widths)
            if self.output == "warp" and base is None:
                raise ValueError("output 'warp' needs the landmarks' base grid (networks.tps_grid)")
            start = base if self.output == "warp" else identity_grid(s, image.device)
            grid = start + y[:, 3:].permute(0, 2, 3, 1)
            image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (image + y[:, :3]).clamp(-1, 1)  # Î_t = I_s + Δ (I_s moved first, for flow and warp)


def identity_grid(size, device):
    """grid_sample's coordinates of every pixel centre of a size x size image (x, then y, in [-1, 1]):
    sampling there gives the image back."""
    c = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1
    return torch.stack(torch.meshgrid(c, c, indexing="xy"), -1)[None]


def tps_grid(src_lm, tgt_lm, size):
    """Where each pixel of a size x size target reads its source, as grid_sample's (B,S,S,2) coordinates:
    the thin-plate spline f with f(tgt_i) = src_i through the 68 landmarks (B,68,2, 0-based pixel
    centres), f(x) = a + A x + sum_i w_i U(|x - tgt_i|), U(r) = r² log r². Of all maps through the points
    it bends least (Bookstein 1989); a shift, turn or zoom of the points it makes exactly. The small
    71 x 71 systems are solved in float64; the map at every pixel is a matrix product in float32."""
    p, q = (torch.as_tensor(lm).to(torch.float64) for lm in (tgt_lm, src_lm))
    U = lambda d2: d2 * torch.log(d2.clamp_min(1e-12))  # r² log r², 0 at r = 0
    B, n = p.shape[:2]
    K = U(((p[:, :, None] - p[:, None]) ** 2).sum(-1))
    K = K + TPS_SMOOTH * K.abs().mean((1, 2), keepdim=True).clamp_min(1) * torch.eye(n).to(K)
    P = torch.cat([torch.ones_like(p[..., :1]), p], -1)
    A = torch.cat([torch.cat([K, P], 2), torch.cat([P.transpose(1, 2), P.new_zeros(B, 3, 3)], 2)], 1)
    w, a = torch.linalg.solve(A, torch.cat([q, q.new_zeros(B, 3, 2)], 1)).float().split((n, 3), 1)
    p, c = p.float(), torch.arange(size, dtype=torch.float32, device=p.device)
    x = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)  # every pixel centre
    d2 = (x * x).sum(-1)[:, None] + (p * p).sum(-1)[:, None] - 2 * x @ p.transpose(1, 2)  # |x - p_i|²
    f = U(d2.clamp_min(0)) @ w + a[:, :1] + x @ a[:, 1:]
    return ((2 * f + 1) / size - 1).reshape(B, size, size, 2)


class Discriminator(nn.Module):
    """PatchGAN: every output pixel judges one patch of (image ⊕ heatmaps); D's verdict is the mean.
    The paper's "32 hidden channels" is read literally: all three stride-2 convs have ndf channels
    (pix2pix would double them per layer); D is a few % of the step either way."""

    def __init__(self, ndf=32, n_layers=3, n_landmarks=N_LANDMARKS):
        super().__init__()
        layers, c = [], 3 + n_landmarks
        for i in range(n_layers):
            layers += [nn.Conv2d(c, ndf, 4, 2, 1), _norm(ndf) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            c = ndf
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))  # one real/fake logit per patch
        self.net = nn.Sequential(*layers)

    def forward(self, image, heatmaps):
        return self.net(torch.cat([image, heatmaps], 1)).mean((1, 2, 3))  # (B,) logits, "then the mean"


class VGG19(nn.Module):
    """torchvision's VGG-19 `features`, rebuilt by hand up to the deepest layer asked for, so a
    torchvision state dict loads by key. Frozen and in eval mode: it is a fixed feature extractor
    (the original code left it trainable, so G could 'win' by changing the yardstick)."""

    def __init__(self, layers, widths=VGG_WIDTHS):
        super().__init__()
        unknown = set(layers) - set(RELU)
        if unknown:
            raise ValueError(f"unknown VGG layers {sorted(unknown)}; known: {list(RELU)}")
        self.layers = {name: RELU[name] for name in layers}
        last = max(self.layers.values())
        mods, c, block = [], 3, 0
        for v in VGG_CFG:
            if len(mods) > last:
                break  # nothing deeper is ever needed
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
                block += 1
            else:
                mods += [nn.Conv2d(c, widths[block], 3, 1, 1), nn.ReLU()]
                c = widths[block]
        self.features = nn.Sequential(*mods[:last + 1])
        # torchvision's own init, from a fixed seed: with no weights available the random features
        # are at least the same ones in every run, so such runs stay comparable
        g = torch.Generator().manual_seed(0)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                nn.init.zeros_(m.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()  # no dropout/BatchNorm in `features`, so a later .train() would change nothing

    def forward(self, x):
        """x: RGB in [-1, 1] -> {layer name: activation}."""
        x = ((x + 1) / 2 - self.mean) / self.std  # ImageNet's input convention (the original fed BGR
                                                  # in [-1, 1])
        out, want = {}, {i: name for name, i in self.layers.items()}
        for i, m in enumerate(self.features):
            x = m(x)
            if i in want:
                out[want[i]] = x
        return out

    def load(self, state, path):
        """Copy a torchvision-format state dict in by key; `classifier.*` and deeper layers are ignored."""
        own = self.state_dict()
        for k, v in own.items():
            if not k.startswith("features."):
                continue
            if k not in state:
                raise DataError(f"{path}: missing key {k}")
            shape = tuple(getattr(state[k], "shape", ()))
            if shape != tuple(v.shape):
                raise DataError(f"{path}: {k} has shape {shape} expected {tuple(v.shape)}")
            own[k] = state[k]
        self.load_state_dict(own)


def load_vgg(layers, path="random", widths=VGG_WIDTHS):
    """VGG-19 up to `layers`, its weights from the torchvision state dict at `path` (extras/runs.py:
    vgg_weights finds it), or its fixed random features for "random". Returns (vgg, source)."""
    vgg = VGG19(layers, widths)
    if path == "random":
        return vgg, "random"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or non-tensor file: say which one and why
        raise DataError(f"{path}: cannot read VGG-19 weights ({type(e).__name__}: {e})"
                        .splitlines()[0]) from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a state dict (got {type(state).__name__})")
    vgg.load(state, path)
    return vgg, path


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, ckpt):
    """A checkpoint, a plain dict, written whole or not at all (data.writing): a full disk, a crash or a
    Ctrl-C while writing leaves the previous checkpoint as it was."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)  # serialised in memory first: a failing disk then fails a plain write
    kept = "the previous one is kept as it was" if os.path.isfile(path) else "none was written"
    try:
        with writing(path) as tmp, open(tmp, "wb") as f:
            f.write(buf.getbuffer())
    except WriteError as e:
        raise WriteError(f"{path}: cannot write the checkpoint ({e.why}); {kept}") from None


GENERATE_KEYS = ("G", "step", "args")  # what generation needs
TRAIN_KEYS = GENERATE_KEYS + ("D", "opt_G", "opt_D")  # what a resume needs


def _tensors(obj):
    """Every tensor in a nested dict/list (a state dict, an optimiser's state)."""
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from ((f".{k}{name}", t) for name, t in _tensors(v))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from ((f".{i}{name}", t) for name, t in _tensors(v))


def check_checkpoint(ckpt, path, keys):
    """Whether a loaded checkpoint is whole: the keys, weights shaped as its own options say, all finite.
    A NaN weight (a flipped bit) would otherwise draw blank faces, or be resumed and saved over."""
    missing, args = [k for k in keys if k not in ckpt], ckpt.get("args")
    options = ("ngf", "n_down", "size") + ("ndf",) * ("D" in keys)  # what rebuilds the models
    if not missing and not (isinstance(args, dict) and set(options) <= set(args)):
        missing = [f"args ({', '.join(options)})"]
    if missing:
        raise DataError(f"{path}: not a whole facesynth checkpoint (missing {', '.join(missing)})")
    for name in [m for m in ("G", "D") if m in keys]:
        try:
            with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
                model = build_generator(args) if name == "G" else Discriminator(ndf=args["ndf"])
            have = {k: tuple(getattr(v, "shape", ())) for k, v in dict(ckpt[name]).items()}
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{path}: its options do not build a model ({e})".splitlines()[0]) from None
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if want != have:
            bad = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
            raise DataError(f"{path}: {name}'s weights do not fit its options (ngf {args['ngf']}, n_down "
                            f"{args['n_down']}, ndf {args['ndf']}): {bad[0]} differs")
    for key in [k for k in ("G", "D", "opt_G", "opt_D") if k in keys]:
        for name, t in _tensors(ckpt[key]):
            # one sum per tensor: NaN and inf propagate through it, and float64 cannot overflow on weights
            if t.is_floating_point() and not torch.sum(t, dtype=torch.float64).isfinite():
                raise DataError(f"{path}: {key}{name} holds NaN/inf values; the file is damaged (resume from "
                                "a copy, or train again)")


def checkpoint_file(path):
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path, keys=GENERATE_KEYS):
    """A checkpoint is a plain dict of tensors and Python values, so weights_only=True loads it
    without running any pickled code. Always onto the CPU: where it goes next is the caller's
    choice, and a device problem must never read as a bad file. Checked whole (check_checkpoint)
    for `keys`: a resume needs TRAIN_KEYS."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no checkpoint there (a run folder holding ckpt.pt, or the .pt file itself)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).strip() or "empty or cut short").splitlines()[0]
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or not {"G", "args", "step"} <= set(ckpt):
        raise DataError(f"{path}: not a facesynth checkpoint (missing G/args/step)")
    check_checkpoint(ckpt, path, keys)
    return ckpt


def build_generator(args):
    return Generator(ngf=args["ngf"], n_down=args["n_down"], output=args.get("output", "image"))


def load_generator(path, device="cpu"):
    """G from a run folder or checkpoint file, in eval mode on `device`, and the run's config."""
    ckpt = load_checkpoint(path)
    G = build_generator(ckpt["args"])
    G.load_state_dict(ckpt["G"])
    cfg = {"args": ckpt["args"], "lambdas": ckpt["lambdas"], "vgg": ckpt["vgg"],
           "params_G": count_params(G), "step": ckpt["step"]}
    return G.to(device).eval(), cfg


@torch.no_grad()
def generate(G, cfg, src, lm, src_lm=None, batch=32, label=None):
    """Î = G(I_s; e) in batches: uint8 sources (N,S,S,3) and target landmarks (N,68,2) -> uint8 (N,S,S,3).
    src_lm: the sources' landmarks (N,68,2), which a G of output "warp" needs. A label: a progress line."""
    a, dev, out, t0 = cfg["args"], next(G.parameters()).device, [], time.time()
    if src.shape[1] != a["size"]:
        raise DataError(f"the images are {src.shape[1]} px, the run was trained at {a['size']} px")
    warp = a.get("output") == "warp"
    if warp and src_lm is None:
        raise ValueError("a G of output 'warp' needs the sources' landmarks")
    for i in range(0, len(src), batch):
        e = heatmaps(torch.as_tensor(np.asarray(lm[i:i + batch]), device=dev), a["size"], a["sigma"],
                     a["window"])
        I_s = to_tensor(np.asarray(src[i:i + batch])).to(dev)
        if warp:  # from the landmarks' thin-plate spline, source to target
            base = tps_grid(np.asarray(src_lm[i:i + batch]), np.asarray(lm[i:i + batch]), a["size"])
            fake = G(I_s, e, base.to(dev))
        else:
            fake = G(I_s, e)
        out.append(to_uint8(fake))
        if label:
            progress(label, i + len(e), len(src), t0)
    return np.concatenate(out)
