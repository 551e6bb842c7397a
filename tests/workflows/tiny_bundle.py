"""Helpers of the serving tests (predictor answers, sidecar, miner detector, model card): a tiny
trained bundle and a ``stage1 serve`` subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from conftest import make_backbone_dir, make_image


def make_tiny_run(root: Path, n: int = 32, seed: int = 2000, coverage: float = 0.5) -> dict[str, Path]:
    """extract -> split -> train (mlp) -> calibrate (coverage policy) on ``n`` generated images.

    Labels alternate 0 / 1 (a bright square marks 1); about ``coverage`` of the images exit, the rest
    defer, so both answers occur. Returns the ``root``, ``backbone``, ``images``, ``store`` and ``run`` paths.
    """
    from PIL import Image

    from stage1.featstore.extract import ExtractConfig, run_extract
    from stage1.featstore.splits import write_splits
    from stage1.runs.steps import calibrate_run, train_run

    backbone = make_backbone_dir(root / "backbone")
    images = root / "images"
    images.mkdir()
    lines = ["path,label"]
    for i in range(n):
        img = make_image(seed + i, size=(36, 30))
        if i % 2:  # a visible signal: a bright square
            arr = np.asarray(img).copy()
            arr[4:20, 4:20] = 250
            img = Image.fromarray(arr)
        img.save(images / f"im{i:02d}.png")
        lines.append(f"im{i:02d}.png,{i % 2}")
    (images / "labels.csv").write_text("\n".join(lines) + "\n")
    store = root / "store"
    run_extract(ExtractConfig(images=str(images), backbone=str(backbone), out=str(store),
                              labels=str(images / "labels.csv"), image_size=32, dtype="float32",
                              batch_size=8, workers=0, progress=False))
    write_splits(store, seed=0)
    run = root / "run"
    train_run(store, "mlp", run, {"epochs": 3, "hidden": 16, "batch_size": 8}, progress=False)
    calibrate_run(run, "coverage", {"target_coverage": coverage}, score="p")
    return {"root": root, "backbone": backbone, "images": images, "store": store, "run": run}


def make_tiny_bundle(root: Path, coverage: float = 0.5) -> dict[str, Path]:
    """``make_tiny_run`` on 32 images, then export; the ``bundle``, ``backbone``, ``run`` and ``images`` paths."""
    from stage1.workflows.bundle import export_bundle

    made = make_tiny_run(root, 32, 2000, coverage)
    return {"bundle": export_bundle(made["run"], root / "bundle"), "backbone": made["backbone"],
            "run": made["run"], "images": made["images"]}


class Sidecar:
    """A ``stage1 serve`` subprocess on a free loopback port; ``url`` once it announced itself."""

    def __init__(self, bundle: Path, *args: str, timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen([sys.executable, "-m", "stage1", "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not first or not first[0].startswith("{"):
            self.stop()
            raise AssertionError(f"sidecar did not start: {first} {self.stderr_text()[-2000:]}")
        self.info = json.loads(first[0])
        self.url = self.info["listening"]

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and return the exit status (killed, and the test failed, after ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
