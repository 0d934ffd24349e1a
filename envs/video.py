"""Record episodes to mp4/gif with imageio; compose several policies side by side with labels.

``record_episode(env, policy, "run/expert.mp4", seed=0)`` rolls one episode of an ``render_mode="rgb_array"``
environment and writes its frames. ``side_by_side({"expert": frames_a, "MPC": frames_b}, "run/compare")``
writes ``compare.mp4`` and ``compare.gif`` with one labelled panel per policy. Labels are rasterised with
matplotlib's Agg backend (headless). The environments also work with ``gymnasium.wrappers.RecordVideo``
when its optional dependency (moviepy) is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")
MACRO_BLOCK = 16  # mp4 (H.264, yuv420p) frames are padded to multiples of this
LABEL_HEIGHT = 32
SEPARATOR = 4
TIME_BAR = 4  # rows of the time bar under side-by-side panels


def _as_action(action: Any) -> np.ndarray:
    if hasattr(action, "detach"):  # a torch tensor, without importing torch here
        action = action.detach().cpu().numpy()
    return np.asarray(action, dtype=np.float32)


def _policy_fn(policy: Any) -> Callable[[np.ndarray], Any]:
    if hasattr(policy, "act") and callable(policy.act):
        return policy.act
    if callable(policy):
        return policy
    raise TypeError(f"policy must be a callable obs -> action or have .act(obs), got {type(policy)!r}")


def rollout_frames(
    env: gym.Env,
    policy: Any,
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    max_steps: int | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run one episode of ``policy`` in ``env`` (``render_mode="rgb_array"``) and collect its frames.

    ``policy`` is a callable ``obs -> action`` or an object with ``.act(obs)`` (and optionally ``.reset()``,
    called before the episode). The episode ends on termination/truncation or after ``max_steps`` steps
    (required when the env has no time limit). Returns ``(frames, stats)``; frames has ``steps + 1`` entries
    (the initial state included) and stats holds ``steps``, ``return``, ``cost`` (sum of ``info["cost"]``
    where present), ``observations`` ``(steps+1, obs_dim)``, ``actions`` ``(steps, act_dim)``, ``costs``.
    """
    if getattr(env, "render_mode", None) != "rgb_array":
        raise ValueError(f"env must be created with render_mode='rgb_array', got {env.render_mode!r}")
    act = _policy_fn(policy)
    spec_limit = env.spec.max_episode_steps if getattr(env, "spec", None) is not None else None
    if max_steps is None and spec_limit is None:
        raise ValueError("env has no time limit (spec.max_episode_steps): pass max_steps")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if hasattr(policy, "reset") and callable(policy.reset):
        policy.reset()
    obs, _ = env.reset(seed=seed, options=options)
    frames = [np.asarray(env.render())]
    observations, actions, costs = [np.asarray(obs)], [], []
    total_reward, steps = 0.0, 0
    while max_steps is None or steps < max_steps:
        action = _as_action(act(obs))
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        total_reward += float(reward)
        observations.append(np.asarray(obs))
        actions.append(action.reshape(-1))
        if "cost" in info:
            costs.append(float(info["cost"]))
        frames.append(np.asarray(env.render()))
        if terminated or truncated:
            break
    stats = {
        "steps": steps,
        "return": total_reward,
        "cost": float(sum(costs)) if costs else None,
        "costs": costs,
        "observations": np.stack(observations),
        "actions": np.stack(actions) if actions else np.zeros((0,) + tuple(env.action_space.shape)),
    }
    return frames, stats


def record_episode(
    env: gym.Env,
    policy: Any,
    path: str | os.PathLike,
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    max_steps: int | None = None,
    fps: float | None = None,
) -> dict[str, Any]:
    """Roll one episode (see :func:`rollout_frames`) and write it with :func:`write_video`.

    ``fps`` defaults to the env's ``metadata["render_fps"]``. Returns the rollout stats plus ``paths`` (the
    files written) and ``frames`` (their number).
    """
    frames, stats = rollout_frames(env, policy, seed=seed, options=options, max_steps=max_steps)
    fps = fps or env.metadata.get("render_fps", 10)
    stats["paths"] = [str(p) for p in write_video(frames, path, fps)]
    stats["frames"] = len(frames)
    return stats


def _video_paths(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return [path]
    return [path.with_name(path.name + s) if path.suffix else path.with_suffix(s) for s in VIDEO_SUFFIXES]


def _check_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("no frames to write")
    out = []
    for i, f in enumerate(frames):
        f = np.asarray(f)
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(f"frame {i} must be an H×W×3 uint8 array, got shape {f.shape} dtype {f.dtype}")
        if out and f.shape != out[0].shape:
            raise ValueError(f"frame {i} has shape {f.shape}, expected {out[0].shape} like frame 0")
        out.append(f)
    return out


def _pad_to(frame: np.ndarray, height: int, width: int, value: int = 255) -> np.ndarray:
    h, w, _ = frame.shape
    if (h, w) == (height, width):
        return frame
    out = np.full((height, width, 3), value, dtype=np.uint8)
    out[:h, :w] = frame
    return out


def write_video(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 10) -> list[Path]:
    """Write H×W×3 uint8 ``frames`` to ``path``: ``.mp4`` (H.264 via imageio-ffmpeg; frames padded with white
    to multiples of 16), ``.gif`` (looping, via Pillow), or both ``<path>.mp4`` and ``<path>.gif`` when the
    suffix is neither. Parent directories are created. Returns the paths written.

    Pillow's GIF writer merges *identical* consecutive frames into one longer frame (same total duration,
    fewer frames than the mp4); :func:`side_by_side` draws a time bar so that its frames never repeat."""
    import imageio.v2 as iio2
    import imageio.v3 as iio3

    frames = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    written = []
    for p in _video_paths(path):
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() == ".mp4":
            h, w, _ = frames[0].shape
            H, W = -(-h // MACRO_BLOCK) * MACRO_BLOCK, -(-w // MACRO_BLOCK) * MACRO_BLOCK
            with iio2.get_writer(p, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                 macro_block_size=MACRO_BLOCK, pixelformat="yuv420p") as writer:
                for f in frames:
                    writer.append_data(_pad_to(f, H, W))
        else:
            iio3.imwrite(p, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
        written.append(p)
    return written


@lru_cache(maxsize=64)
def label_image(text: str, width: int, height: int = LABEL_HEIGHT) -> np.ndarray:
    """A ``height×width×3`` uint8 strip with ``text`` centred in black on white (matplotlib Agg, headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    fontsize_px = 0.55 * height
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=fontsize_px * 72 / dpi, color="black",
             family="DejaVu Sans")
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    h, w = min(height, img.shape[0]), min(width, img.shape[1])
    out[:h, :w] = img[:h, :w]
    out.setflags(write=False)
    return out


def compose_side_by_side(frame_lists: Mapping[str, Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Compose labelled panels: frame t shows each list's frame t (its last frame once it has ended) under
    its label, panels left to right in the mapping's order, separated by a grey bar; a time bar below
    fills with ``t`` (so no two frames are equal and mp4 and gif have the same frame count)."""
    if not frame_lists:
        raise ValueError("frame_lists is empty")
    lists = {str(k): _check_frames(v) for k, v in frame_lists.items()}
    H = max(f[0].shape[0] for f in lists.values())
    W = max(f[0].shape[1] for f in lists.values())
    T = max(len(f) for f in lists.values())
    panels = {k: label_image(k, W) for k in lists}
    sep = np.full((H + LABEL_HEIGHT, SEPARATOR, 3), 128, dtype=np.uint8)
    out = []
    for t in range(T):
        row = []
        for k, frames in lists.items():
            if row:
                row.append(sep)
            f = _pad_to(frames[min(t, len(frames) - 1)], H, W)
            row.append(np.concatenate([panels[k], f], axis=0))
        frame = np.concatenate(row, axis=1)
        bar = np.full((TIME_BAR, frame.shape[1], 3), 230, dtype=np.uint8)
        bar[:, : max(1, round(frame.shape[1] * (t + 1) / T))] = 90
        out.append(np.concatenate([frame, bar], axis=0))
    return out


def side_by_side(
    frame_lists: Mapping[str, Sequence[np.ndarray]], path: str | os.PathLike, fps: float | None = None
) -> list[Path]:
    """Write ``{label: frames}`` side by side (see :func:`compose_side_by_side`) to ``<path>.mp4`` and
    ``<path>.gif`` (a ``.mp4``/``.gif`` suffix on ``path`` is replaced) at ``fps`` — pass the env's
    ``metadata["render_fps"]``. Returns the paths written."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        path = path.with_suffix("")
    frames = compose_side_by_side(frame_lists)
    if fps is None:
        raise ValueError("side_by_side needs fps: pass the env's metadata['render_fps'] (real-time playback)")
    return write_video(frames, path, fps)
