"""The drawing kit of every figure, written by hand so that no matplotlib is needed: a PNG writer,
the viridis colour map, labelled tiles of faces and plot axes. Imports only data.py (for writes that
land whole or not at all).
"""
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data import writing

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
    with writing(path) as tmp, open(tmp, "wb") as f:  # whole or not at all
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
    """A white canvas for n plot panels, 4 to a row, and each panel's plotting box."""
    im = Image.new("RGB", (w * min(n, 4), h * math.ceil(n / 4)), "white")
    cells = (divmod(i, 4) for i in range(n))
    return im, [(c * w + 70, r * h + 48, c * w + w - 15, r * h + h - 45) for r, c in cells]
