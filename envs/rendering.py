"""Tiny headless rasteriser: numpy-drawn RGB frames (no display, no pygame).

Shapes are drawn in *world* coordinates through a :class:`Canvas` that maps a rectangular world window onto an
``H×W×3`` uint8 image (y up). Anti-aliasing is not attempted; frames are for videos and sanity checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (160, 160, 160)
LIGHT_GREY = (225, 225, 225)
BROWN = (202, 152, 101)
BLUE = (70, 110, 200)
RED = (215, 60, 60)
GREEN = (60, 170, 90)


@dataclass
class Canvas:
    """An RGB image plus the affine map world (x right, y up) → pixel (column right, row down)."""

    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    background: tuple[int, int, int] = WHITE
    image: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"canvas size must be positive, got {self.width}x{self.height}")
        self.image = np.empty((self.height, self.width, 3), dtype=np.uint8)
        self.image[...] = np.asarray(self.background, dtype=np.uint8)
        # pixel centres in world coordinates
        x0, x1 = self.x_range
        y0, y1 = self.y_range
        self._sx = self.width / (x1 - x0)
        self._sy = self.height / (y1 - y0)

    # --- coordinate maps -------------------------------------------------------------------------------
    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """World point → (column, row) in pixel units (fractional)."""
        return (x - self.x_range[0]) * self._sx, (self.y_range[1] - y) * self._sy

    def length_px(self, length: float) -> float:
        return length * self._sx

    def _window(self, c0: float, c1: float, r0: float, r1: float):
        """Integer pixel bounding box (clipped) and the pixel-centre grids inside it, or None if empty."""
        ci0, ci1 = max(int(np.floor(c0)), 0), min(int(np.ceil(c1)) + 1, self.width)
        ri0, ri1 = max(int(np.floor(r0)), 0), min(int(np.ceil(r1)) + 1, self.height)
        if ci0 >= ci1 or ri0 >= ri1:
            return None
        cols = np.arange(ci0, ci1) + 0.5
        rows = np.arange(ri0, ri1) + 0.5
        return (slice(ri0, ri1), slice(ci0, ci1)), cols[None, :], rows[:, None]

    # --- primitives (world coordinates) ----------------------------------------------------------------
    def rect(self, cx: float, cy: float, w: float, h: float, color) -> None:
        """Axis-aligned filled rectangle centred at (cx, cy) with world width w and height h."""
        c0, r0 = self.to_px(cx - w / 2, cy + h / 2)
        c1, r1 = self.to_px(cx + w / 2, cy - h / 2)
        win = self._window(c0, c1, r0, r1)
        if win is None:
            return
        sl, cols, rows = win
        mask = (cols >= c0) & (cols <= c1) & (rows >= r0) & (rows <= r1)
        self.image[sl][mask] = color

    def circle(self, cx: float, cy: float, radius: float, color) -> None:
        """Filled disc."""
        pc, pr = self.to_px(cx, cy)
        rad = self.length_px(radius)
        win = self._window(pc - rad, pc + rad, pr - rad, pr + rad)
        if win is None:
            return
        sl, cols, rows = win
        mask = (cols - pc) ** 2 + (rows - pr) ** 2 <= rad**2
        self.image[sl][mask] = color

    def line(self, xa: float, ya: float, xb: float, yb: float, width: float, color) -> None:
        """Thick segment from a to b (world width ``width``; at least one pixel), with round caps."""
        ca, ra = self.to_px(xa, ya)
        cb, rb = self.to_px(xb, yb)
        half = max(self.length_px(width) / 2, 0.5)
        win = self._window(min(ca, cb) - half, max(ca, cb) + half, min(ra, rb) - half, max(ra, rb) + half)
        if win is None:
            return
        sl, cols, rows = win
        dc, dr = cb - ca, rb - ra
        seg2 = dc * dc + dr * dr
        if seg2 == 0.0:
            t = np.zeros((rows.shape[0], cols.shape[1]))
        else:
            t = np.clip(((cols - ca) * dc + (rows - ra) * dr) / seg2, 0.0, 1.0)
        dist2 = (cols - ca - t * dc) ** 2 + (rows - ra - t * dr) ** 2
        self.image[sl][dist2 <= half * half] = color

    def hline(self, y: float, color, thickness_px: int = 1) -> None:
        """Horizontal line across the whole canvas at world height y."""
        _, r = self.to_px(0.0, y)
        r0 = int(np.floor(r - thickness_px / 2 + 0.5))
        r0, r1 = max(r0, 0), min(r0 + thickness_px, self.height)
        if r0 < r1:
            self.image[r0:r1, :] = color

    def vline(self, x: float, color, thickness_px: int = 1) -> None:
        """Vertical line across the whole canvas at world abscissa x."""
        c, _ = self.to_px(x, 0.0)
        c0 = int(np.floor(c - thickness_px / 2 + 0.5))
        c0, c1 = max(c0, 0), min(c0 + thickness_px, self.width)
        if c0 < c1:
            self.image[:, c0:c1] = color


class HumanViewer:
    """Shows frames in a matplotlib window (``render_mode="human"``); imported lazily, optional."""

    def __init__(self, title: str) -> None:
        import matplotlib.pyplot as plt

        self._plt = plt
        self._fig, self._ax = plt.subplots(num=title)
        self._ax.set_axis_off()
        self._im = None

    def show(self, frame: np.ndarray, fps: float) -> None:
        if self._im is None:
            self._im = self._ax.imshow(frame)
        else:
            self._im.set_data(frame)
        self._plt.pause(1.0 / fps)

    def close(self) -> None:
        self._plt.close(self._fig)


class FrameRenderMixin:
    """``render()`` / ``close()`` shared by the envs: ``"rgb_array"`` returns :meth:`draw_frame`, ``"human"``
    shows it in a :class:`HumanViewer` titled ``viewer_title``. Put it before ``gym.Env`` in the bases."""

    viewer_title = "diffmpc"
    render_mode: str | None = None
    metadata: dict
    _viewer: HumanViewer | None = None

    def draw_frame(self) -> np.ndarray:
        raise NotImplementedError

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array' to make()")
            return None
        frame = self.draw_frame()
        if self.render_mode == "rgb_array":
            return frame
        if self._viewer is None:
            self._viewer = HumanViewer(self.viewer_title)
        self._viewer.show(frame, self.metadata["render_fps"])
        return None

    def close(self) -> None:
        if self._viewer is not None:
            self._viewer.close()
            self._viewer = None
