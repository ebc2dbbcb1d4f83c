"""Painting the sample's fruits: one class-specific painter per fruit, shaded and rendered.

Drawing code for :mod:`imagepca.sample`, with numpy and Pillow only. :func:`render` is
deterministic in (class, image, size, seed); shapes, colours and textures are deliberately
class-specific (the signal PCA should find), everything else is jitter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Painting happens at this multiple of the output size and is then downsampled, which
# anti-aliases ImageDraw's hard polygon edges.
_SS = 2

_Rgb = tuple[float, float, float]


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Fruit:
    """One painted fruit before shading: coverage, albedo, relief and shading style."""

    mask: np.ndarray  # (L, L) float in [0, 1]
    rgb: np.ndarray  # (L, L, 3) float albedo in [0, 255]
    height: np.ndarray  # (L, L) float relief used for the normals
    shininess: float
    specular: float
    decor: Image.Image | None = None  # RGBA, composited after shading (stems, leaves)


def _jitter(rng: np.random.Generator, rgb: _Rgb, amount: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, float) + rng.normal(0.0, amount, 3), 0, 255)


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [0, 1]; `cells` = (rows, cols) controls the grain."""
    grid = (rng.random(cells) * 255).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, float) / 255.0


def _polygon_mask(size: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=255)
    return np.asarray(img, float) / 255.0


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    img = Image.fromarray(np.clip(a * 255.0, 0, 255).astype(np.uint8), "L")
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), float) / 255.0


def _dome(mask: np.ndarray, r: float) -> np.ndarray:
    """A rounded relief for an arbitrary silhouette (multi-scale blur of the mask)."""
    h = (_blur(mask, 0.12 * r) + _blur(mask, 0.3 * r) + _blur(mask, 0.6 * r)) / 3.0
    return h * mask


def _dots(
    size: int,
    rng: np.random.Generator,
    mask: np.ndarray,
    n: int,
    radius: float,
) -> np.ndarray:
    """A coverage map of `n` small dots placed inside `mask` (for pits, seeds, specks)."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    ys, xs = np.nonzero(mask > 0.5)
    if len(xs) == 0:
        return np.zeros((size, size))
    idx = rng.integers(0, len(xs), n)
    rad = radius * rng.uniform(0.6, 1.3, n)
    for x, y, q in zip(xs[idx], ys[idx], rad, strict=True):
        d.ellipse([x - q, y - q, x + q, y + q], fill=255)
    return np.asarray(img, float) / 255.0


def _mix(rgb: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    w = np.clip(weight, 0, 1)[..., None]
    return rgb * (1 - w) + colour * w


def _stem(d: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, w: float) -> None:
    d.line(
        [(x0, y0), ((x0 + x1) / 2 + w, (y0 + y1) / 2), (x1, y1)],
        fill=(92, 62, 30, 255),
        width=max(1, round(w)),
        joint="curve",
    )


# ----------------------------------------------------------------------------- classes
# Each painter gets the layer size L and an rng and returns a _Fruit centred in the layer
# with a nominal radius of 0.4 * L. Shapes, colours and textures are deliberately
# class-specific (that is the signal PCA should find); everything else is jitter.


def _apple(L: int, rng: np.random.Generator) -> _Fruit:
    c, r = L / 2, 0.4 * L
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    top = np.exp(-((((t + np.pi / 2 + np.pi) % (2 * np.pi) - np.pi) / 0.35) ** 2))
    bottom = np.exp(-((((t - np.pi / 2 + np.pi) % (2 * np.pi) - np.pi) / 0.5) ** 2))
    rr = r * (1 - 0.12 * top - 0.04 * bottom)
    xs = c + rr * np.cos(t) * (1 - 0.08 * np.sin(t)) * rng.uniform(0.97, 1.05)
    ys = c + 0.05 * r + rr * np.sin(t) * rng.uniform(0.88, 0.95)
    mask = _polygon_mask(L, xs, ys)
    red = _jitter(rng, (172, 22, 30), 14)
    rgb = np.broadcast_to(red, (L, L, 3)).copy()
    blush = _smooth_noise(rng, L, (3, 3)) ** 2 * rng.uniform(0.3, 0.8)
    rgb = _mix(rgb, _jitter(rng, (196, 170, 60), 10), blush)
    streaks = _smooth_noise(rng, L, (3, 28))
    rgb *= (0.85 + 0.25 * streaks)[..., None]
    specks = _dots(L, rng, mask, 45, 0.009 * L)
    rgb = _mix(rgb, np.array([225.0, 200.0, 140.0]), 0.35 * specks)
    height = _dome(mask, r)
    # The stem cavity reads as a shadowed dimple.
    yy, xx = np.mgrid[0:L, 0:L]
    dimple = np.exp(-((xx - c) ** 2 + (yy - (c - 0.72 * r)) ** 2) / (2 * (0.1 * r) ** 2))
    height -= 0.25 * dimple
    rgb *= (1 - 0.35 * dimple)[..., None]
    decor = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    _stem(
        ImageDraw.Draw(decor),
        c,
        c - 0.72 * r,
        c + rng.uniform(-0.15, 0.15) * r,
        c - 1.08 * r,
        0.06 * r,
    )
    return _Fruit(mask, rgb, height, shininess=40, specular=0.45, decor=decor)


def _banana(L: int, rng: np.random.Generator) -> _Fruit:
    c, r = L / 2, 0.4 * L
    span = rng.uniform(0.7, 0.85)
    rs = 1.45 * r
    s = np.linspace(0, 1, 120)
    phi = np.pi / 2 + span * (2 * s - 1)
    cy = c - 1.15 * r
    w = 0.38 * r * rng.uniform(0.85, 1.1) * np.sin(np.pi * s) ** 0.55 + 0.015 * r
    outer, inner = rs + w, rs - w
    xs = np.concatenate([c + outer * np.cos(phi), (c + inner * np.cos(phi))[::-1]])
    ys = np.concatenate([cy + outer * np.sin(phi), (cy + inner * np.sin(phi))[::-1]])
    mask = _polygon_mask(L, xs, ys)
    yellow = _jitter(rng, (236, 206, 52), 10)
    rgb = np.broadcast_to(yellow, (L, L, 3)).copy()
    # Greener towards the stem end, dark brown at the flower tip.
    yy, xx = np.mgrid[0:L, 0:L]
    ang = np.arctan2(yy - cy, xx - c)
    frac = np.clip((ang - (np.pi / 2 - span)) / (2 * span), 0, 1)
    greening = rng.uniform(0.2, 0.6) * np.clip(1 - 3 * frac, 0, 1)
    rgb = _mix(rgb, _jitter(rng, (150, 170, 50), 8), greening)
    spots = _dots(L, rng, mask, rng.integers(5, 25), 0.015 * L)
    rgb = _mix(rgb, np.array([110.0, 75.0, 30.0]), 0.8 * _blur(spots, 1.5))
    # A longitudinal ridge makes the faceted banana cross-section visible.
    rad = np.hypot(xx - c, yy - cy)
    ridge = np.exp(-(((rad - (rs + 0.35 * 0.38 * r)) / (0.02 * r)) ** 2))
    rgb *= (1 - 0.18 * ridge)[..., None]
    height = _dome(mask, 0.5 * r) - 0.05 * ridge
    decor = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    d = ImageDraw.Draw(decor)
    a0, a1 = phi[0], phi[-1]
    # stem stub beyond the left end, blackened tip at the right end
    d.line(
        [
            (c + rs * np.cos(a0), cy + rs * np.sin(a0)),
            (c + rs * np.cos(a0 - 0.12), cy + rs * np.sin(a0 - 0.12)),
        ],
        fill=(110, 120, 45, 255),
        width=max(1, round(0.09 * r)),
    )
    q = 0.04 * r
    tx, ty = c + rs * np.cos(a1), cy + rs * np.sin(a1)
    d.ellipse([tx - q, ty - q, tx + q, ty + q], fill=(60, 40, 20, 255))
    return _Fruit(mask, rgb, height, shininess=12, specular=0.12, decor=decor)


def _citrus(
    L: int,
    rng: np.random.Generator,
    colour: _Rgb,
    aspect: float,
    nib: float,
    pits: int,
) -> _Fruit:
    c, r = L / 2, 0.4 * L
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    wob = 1 + 0.02 * np.sin(3 * t + rng.uniform(0, 2 * np.pi))
    d0 = np.minimum(np.abs(t), np.abs(t - np.pi))
    d0 = np.minimum(d0, np.abs(t - 2 * np.pi))
    pointed = 1 + nib * np.exp(-((d0 / 0.13) ** 2))
    xs = c + r * np.cos(t) * wob * pointed * (0.92 if nib else 1.0)
    ys = c + r * aspect * np.sin(t) * wob
    mask = _polygon_mask(L, xs, ys)
    base = _jitter(rng, colour, 9)
    rgb = np.broadcast_to(base, (L, L, 3)).copy()
    rgb *= (0.92 + 0.12 * _smooth_noise(rng, L, (4, 4)))[..., None]
    pit = _blur(_dots(L, rng, mask, pits, 0.008 * L), 1.0)
    rgb *= (1 - 0.12 * pit)[..., None]
    height = _dome(mask, r * aspect) - 0.012 * pit
    decor = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    d = ImageDraw.Draw(decor)
    if nib:  # lemon: greenish nub at one pointed end
        x = c + r * (1 + nib) * 0.92 - 0.02 * r
        q = 0.035 * r
        d.ellipse([x - q, c - q, x + q, c + q], fill=(150, 150, 40, 255))
    else:  # orange: small stem scar off-centre
        x = c + rng.uniform(-0.25, 0.25) * r
        y = c + rng.uniform(-0.25, 0.25) * r
        q = 0.05 * r
        d.ellipse([x - q, y - q, x + q, y + q], fill=(120, 110, 40, 230))
    return _Fruit(mask, rgb, height, shininess=18, specular=0.28, decor=decor)


def _orange(L: int, rng: np.random.Generator) -> _Fruit:
    return _citrus(L, rng, (246, 138, 14), aspect=rng.uniform(0.94, 1.0), nib=0.0, pits=1400)


def _lemon(L: int, rng: np.random.Generator) -> _Fruit:
    return _citrus(L, rng, (245, 222, 60), aspect=rng.uniform(0.66, 0.76), nib=0.13, pits=900)


def _grape(L: int, rng: np.random.Generator) -> _Fruit:
    c, r = L / 2, 0.4 * L
    rb = 0.19 * r * rng.uniform(0.9, 1.1)
    rows = [4, 5, 4, 4, 3, 2, 1]
    yy, xx = np.mgrid[0:L, 0:L]
    mask = np.zeros((L, L))
    height = np.zeros((L, L))
    rgb = np.zeros((L, L, 3))
    base = _jitter(rng, (82, 30, 92), 10)
    centres = []
    for i, n in enumerate(rows):
        y = c - 0.8 * r + i * 1.55 * rb
        for j in range(n):
            if rng.random() < 0.08:
                continue
            x = c + (j - (n - 1) / 2) * 1.8 * rb
            centres.append((x + rng.normal(0, 0.12 * rb), y + rng.normal(0, 0.12 * rb)))
    for x, y in centres:
        rx, ry = rb * rng.uniform(0.95, 1.05), rb * rng.uniform(1.0, 1.15)
        rho2 = ((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2
        h = np.sqrt(np.clip(1 - rho2, 0, 1)) * rb / r
        front = h > height - 1e-9
        inside = rho2 < 1
        upd = inside & front
        height[upd] = h[upd]
        col = np.clip(base + rng.normal(0, 10, 3), 0, 255)
        rgb[upd] = col
        mask[inside] = 1.0
    # Grapes carry a dusty bloom and darken where berries touch.
    bloom = _smooth_noise(rng, L, (10, 10))
    rgb = _mix(rgb, np.array([140.0, 120.0, 160.0]), 0.25 * bloom)
    rgb *= (0.45 + 0.55 * np.clip(height * r / rb * 3, 0, 1))[..., None]
    decor = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    d = ImageDraw.Draw(decor)
    ty = c - 0.8 * r - rb
    d.line(
        [(c, ty), (c + rng.uniform(-0.1, 0.1) * r, ty - 0.2 * r)],
        fill=(110, 100, 45, 255),
        width=max(1, round(0.06 * r)),
    )
    return _Fruit(mask, rgb, height * 4, shininess=45, specular=0.4, decor=decor)


def _strawberry(L: int, rng: np.random.Generator) -> _Fruit:
    c, r = L / 2, 0.4 * L
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    x = 0.9 * r * np.cos(t) * rng.uniform(0.92, 1.05)
    y = r * np.sin(t)
    taper = 1 - 0.62 * np.clip((y + 0.1 * r) / (1.1 * r), 0, 1) ** 1.1
    xs = c + x * taper
    ys = c + 0.08 * r + np.maximum(y, -0.72 * r)
    mask = _polygon_mask(L, xs, ys)
    red = _jitter(rng, (200, 24, 36), 12)
    rgb = np.broadcast_to(red, (L, L, 3)).copy()
    rgb *= (0.85 + 0.2 * _smooth_noise(rng, L, (5, 5)))[..., None]
    # Achenes on a jittered lattice: the signature texture of a strawberry.
    img = Image.new("L", (L, L), 0)
    pits = Image.new("L", (L, L), 0)
    ds, dp = ImageDraw.Draw(img), ImageDraw.Draw(pits)
    step = 0.16 * r
    q = 0.028 * r
    for iy, sy in enumerate(np.arange(c - 0.6 * r, c + 1.1 * r, step)):
        for sx in np.arange(c - r + (iy % 2) * step / 2, c + r, step):
            px, py = sx + rng.normal(0, 0.02 * r), sy + rng.normal(0, 0.02 * r)
            ix, iy2 = int(px), int(py)
            if 0 <= ix < L and 0 <= iy2 < L and mask[iy2, ix] > 0.5:
                dp.ellipse([px - 1.8 * q, py - 1.8 * q, px + 1.8 * q, py + 1.8 * q], fill=255)
                ds.ellipse([px - q, py - 0.7 * q, px + q, py + 1.3 * q], fill=255)
    pit = np.asarray(pits, float) / 255
    seeds = np.asarray(img, float) / 255
    rgb *= (1 - 0.3 * pit)[..., None]
    rgb = _mix(rgb, _jitter(rng, (230, 200, 95), 8), seeds)
    height = _dome(mask, r) - 0.03 * pit
    decor = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    d = ImageDraw.Draw(decor)
    green = tuple(int(v) for v in _jitter(rng, (48, 125, 40), 10)) + (255,)
    top = c - 0.64 * r
    n = int(rng.integers(6, 9))
    for k in range(n):
        a = np.pi + (k + 0.5) * np.pi / n + rng.normal(0, 0.08)
        ln = r * rng.uniform(0.35, 0.5)
        tipx, tipy = c + ln * np.cos(a), top + 0.55 * ln * np.sin(a) + 0.15 * r
        nx, ny = -np.sin(a) * 0.07 * r, np.cos(a) * 0.07 * r
        d.polygon([(c + nx, top + ny), (tipx, tipy), (c - nx, top - ny)], fill=green)
    d.line(
        [(c, top), (c + rng.uniform(-0.1, 0.1) * r, top - 0.25 * r)],
        fill=green,
        width=max(1, round(0.07 * r)),
    )
    return _Fruit(mask, rgb, height, shininess=35, specular=0.45, decor=decor)


def _kiwi(L: int, rng: np.random.Generator) -> _Fruit:
    c, r = L / 2, 0.4 * L
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    xs = c + r * np.cos(t)
    ys = c + r * rng.uniform(0.72, 0.82) * np.sin(t)
    mask = _polygon_mask(L, xs, ys)
    rgb = np.broadcast_to(_jitter(rng, (138, 102, 58), 10), (L, L, 3)).copy()
    fuzz = rng.random((L, L))
    rgb *= (0.8 + 0.3 * fuzz)[..., None]
    rgb *= (0.9 + 0.15 * _smooth_noise(rng, L, (6, 6)))[..., None]
    return _Fruit(mask, rgb, _dome(mask, 0.8 * r), shininess=6, specular=0.03)


def _pear(L: int, rng: np.random.Generator) -> _Fruit:
    c, r = L / 2, 0.4 * L
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    st = np.sin(t)
    width = r * (0.55 + 0.35 * (st + 1) / 2) ** 1.0
    width *= 1 + 0.12 * np.exp(-(((t - np.pi / 2) / 0.9) ** 2))
    xs = c + width * np.cos(t)
    ys = c + 0.08 * r + r * 1.0 * st
    mask = _polygon_mask(L, xs, ys)
    rgb = np.broadcast_to(_jitter(rng, (196, 192, 70), 10), (L, L, 3)).copy()
    blush = _smooth_noise(rng, L, (3, 3)) ** 3 * rng.uniform(0.0, 0.6)
    rgb = _mix(rgb, np.array([200.0, 90.0, 50.0]), blush)
    specks = _dots(L, rng, mask, 150, 0.008 * L)
    rgb = _mix(rgb, np.array([120.0, 100.0, 50.0]), 0.6 * specks)
    decor = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    _stem(
        ImageDraw.Draw(decor),
        c,
        c - 0.88 * r,
        c + rng.uniform(-0.15, 0.15) * r,
        c - 1.2 * r,
        0.05 * r,
    )
    return _Fruit(mask, rgb, _dome(mask, 0.7 * r), shininess=20, specular=0.25, decor=decor)


# (folder name, painter, maximum in-plane rotation in degrees)
_CLASSES: tuple[tuple[str, Callable[[int, np.random.Generator], _Fruit], float], ...] = (
    ("Red Apple", _apple, 30.0),
    ("Banana", _banana, 180.0),
    ("Orange", _orange, 180.0),
    ("Lemon", _lemon, 180.0),
    ("Grape", _grape, 25.0),
    ("Strawberry", _strawberry, 30.0),
    ("Kiwi", _kiwi, 180.0),
    ("Pear", _pear, 25.0),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _CLASSES)
"""All class folder names this generator can paint, in the order `classes=` takes them."""


# ----------------------------------------------------------------------------- rendering


def _shade(fruit: _Fruit, rng: np.random.Generator, brightness: float) -> Image.Image:
    """Lambert + Blinn-Phong lighting from the relief, so fruits look round, not flat."""
    L = fruit.mask.shape[0]
    gy, gx = np.gradient(fruit.height)
    k = 0.55 * L
    n = np.stack([-gx * k, -gy * k, np.ones_like(gx)], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    light = np.array([rng.uniform(-0.5, 0.2), rng.uniform(-0.6, 0.0), 1.0])
    light /= np.linalg.norm(light)
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    diffuse = np.clip(n @ light, 0, 1)
    spec = np.clip(n @ half, 0, 1) ** fruit.shininess * fruit.specular
    rgb = fruit.rgb * (0.3 + 0.7 * diffuse)[..., None] * brightness + 255.0 * spec[..., None]
    alpha = np.clip(fruit.mask * 255.0, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    img.putalpha(Image.fromarray(alpha, "L"))
    if fruit.decor is not None:
        img = Image.alpha_composite(img, fruit.decor)
    return img


def render(class_index: int, image_index: int, size: int, seed: int) -> Image.Image:
    # Seeding per (seed, class, image) keeps each file independent of `classes` and
    # `per_class`, so a smaller sample is a subset of a larger one.
    rng = np.random.default_rng([seed, class_index, image_index])
    _, painter, max_rot = _CLASSES[class_index]
    big = size * _SS
    fruit = _shade(painter(big, rng), rng, brightness=rng.uniform(0.85, 1.1))
    fruit = fruit.rotate(rng.uniform(-max_rot, max_rot), Image.Resampling.BICUBIC)
    scale = rng.uniform(0.8, 1.05)
    side = max(1, round(big * scale))
    fruit = fruit.resize((side, side), Image.Resampling.BILINEAR)
    # Fruits-360 shots are on (almost) white with a faint, uneven background.
    bg = rng.uniform(242, 255) + 4 * (_smooth_noise(rng, big, (2, 2)) - 0.5)
    canvas = Image.fromarray(np.clip(np.repeat(bg[..., None], 3, axis=2), 0, 255).astype(np.uint8))
    shift = 0.06 * big
    ox = round((big - side) / 2 + rng.uniform(-shift, shift))
    oy = round((big - side) / 2 + rng.uniform(-shift, shift))
    canvas.paste(fruit, (ox, oy), fruit)
    out = canvas.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(out, float) + rng.normal(0, 1.5, (size, size, 3))
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
