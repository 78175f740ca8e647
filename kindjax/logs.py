"""Run logs: console progress, TensorBoard event files, sample-grid PNGs.

TensorBoard events are written with the ``tensorboard`` package's own event-file
writer and protos (no TensorFlow needed); only process 0 writes.
"""
from __future__ import annotations

import io
import os
import sys
import time

import jax
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 pixels."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, upscale: int = 1, pad: int = 1, border: int = 96) -> np.ndarray:
    """``(N, H, W, C)`` uint8 images → one ``(rows·(H+pad)+pad, cols·(W+pad)+pad, C)`` grid, row-major,
    cells separated by ``pad`` pixels of grey level ``border``."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), border, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    return grid


def png_bytes(grid: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


class RunLogger:
    """Scalars and images to the console and to ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str, total_steps: int):
        self.is_main = jax.process_index() == 0
        self.total_steps = total_steps
        self.writer = EventFileWriter(os.path.join(workdir, "tensorboard")) if self.is_main else None
        self.start = time.time()

    def _event(self, step: int, value: summary_pb2.Summary.Value) -> None:
        if self.writer is not None:
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                  summary=summary_pb2.Summary(value=[value])))

    def scalars(self, step: int, values: dict[str, float], console: bool = True) -> None:
        for tag, v in values.items():
            self._event(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(v)))
        self.flush()
        if console and self.is_main:
            elapsed = time.time() - self.start
            text = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"[step {step}/{self.total_steps}  {elapsed:7.1f}s] {text}", flush=True)

    def image(self, step: int, tag: str, grid: np.ndarray, png: bytes | None = None) -> None:
        """Logs ``grid`` (``png``: its already-encoded PNG, to avoid encoding it twice)."""
        h, w, c = grid.shape
        self._event(step, summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            height=h, width=w, colorspace=c, encoded_image_string=png or png_bytes(grid))))

    def text(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stdout, flush=True)

    def flush(self) -> None:
        """Writes pending events now (a run killed later keeps everything logged so far)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
