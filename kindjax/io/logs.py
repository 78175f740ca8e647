"""Run logs: console progress, TensorBoard event files, sample-grid PNGs.

TensorBoard events are the ``tensorboard`` package's protos in its record framing
(:class:`EventFile`); TensorFlow is never imported.  Only process 0 writes.
"""
from __future__ import annotations

import io
import itertools
import os
import socket
import sys
import time

import jax
import numpy as np
from PIL import Image
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from kindjax.io.paths import as_path

_FILE_IDS = itertools.count()


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


class EventFile:
    """One TensorBoard event file in ``logdir``: ``Event`` protos in TFRecord framing, written
    synchronously through ``etils.epath`` (local or cloud paths).

    ``tensorboard``'s own ``EventFileWriter`` opens files through ``tf.io.gfile``, which imports
    TensorFlow whenever it is installed: 8–30 s at the start of every run on the 2-core machine.
    """

    def __init__(self, logdir: epath.PathLike):
        directory = as_path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_FILE_IDS)}")
        self.path = directory / name
        self._records = RecordWriter(self.path.open("wb"))
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_event(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def duration(seconds: float) -> str:
    """``4m05s``-style text for a number of seconds (``1h02m``, ``37s``)."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunLogger:
    """Scalars and images to the console and to ``WORKDIR/tensorboard``.

    A console line of training scalars reads ``[stage] step s/N  p%  R img/s  E elapsed  ~L left |
    name=value …``; ``stage`` defaults to the workdir's name (``pretrain`` / ``transfer`` in a
    two-stage job).  The time left is ``(N − s)/rate``, the rate being steps per second since
    the first console line (so it excludes the compile before it); the first line has none.
    """

    #: Throughput scalars shown in the progress part of a console line, not repeated after it.
    THROUGHPUT = ("images_per_sec", "steps_per_sec")

    def __init__(self, workdir: str, total_steps: int, stage: str | None = None):
        self.is_main = jax.process_index() == 0
        self.total_steps = total_steps
        self.stage = stage if stage is not None else os.path.basename(os.path.normpath(workdir))
        self.writer = EventFile(as_path(workdir) / "tensorboard") if self.is_main else None
        self.start = time.time()
        self._first: tuple[int, float] | None = None   # (step, time) of the first progress line
        self._last_step: int | None = None              # step of the latest one

    def _event(self, step: int, value: summary_pb2.Summary.Value) -> None:
        if self.writer is not None:
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                  summary=summary_pb2.Summary(value=[value])))

    def seconds_left(self, step: int, now: float) -> float | None:
        """Estimated seconds to ``total_steps`` at the measured rate (None before any rate)."""
        if self._first is None or self._first[0] >= step:
            return None
        rate = (step - self._first[0]) / max(now - self._first[1], 1e-9)
        return (self.total_steps - step) / rate

    def progress(self, step: int, values: dict[str, float], now: float) -> str:
        """The progress part of a console line (stage, step, share done, images/s, elapsed, time left)."""
        parts = [f"[{self.stage}] step {step}/{self.total_steps}"]
        if self.total_steps > 0:
            parts.append(f"{100 * step / self.total_steps:3.0f}%")
        if "images_per_sec" in values:
            parts.append(f"{values['images_per_sec']:.0f} img/s")
        parts.append(f"{duration(now - self.start)} elapsed")
        left = self.seconds_left(step, now) if step < self.total_steps else None
        if left is not None:
            parts.append(f"~{duration(left)} left")
        return "  ".join(parts)

    def scalars(self, step: int, values: dict[str, float], console: bool = True) -> None:
        for tag, v in values.items():
            self._event(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(v)))
        self.flush()
        if console and self.is_main:
            now = time.time()
            if self._last_step is None or step > self._last_step:
                head = self.progress(step, values, now)
                self._first = self._first or (step, now)
                self._last_step = step
            else:   # more figures at a step already reported (e.g. evaluation)
                head = f"[{self.stage}] step {step}/{self.total_steps}"
            text = "  ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in self.THROUGHPUT)
            print(f"{head} | {text}", flush=True)

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
