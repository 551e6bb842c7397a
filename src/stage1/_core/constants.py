"""Names and defaults that the CLI (light) and the heavy modules both need, written once.

Nothing here imports torch, zarr or numpy, so ``stage1 --help`` can use them.
"""
from __future__ import annotations

#: The four splits, in the order they are made and reported.
SPLIT_NAMES: tuple[str, ...] = ("train", "val_select", "val_calib", "test")
#: Default split fractions (a larger val_calib, for certification).
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.55, "val_select": 0.10, "val_calib": 0.20, "test": 0.15}
#: Stored feature precisions.
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")
DEFAULT_FEATURE_DTYPE = "float16"
#: Distortion levels of the validator-style views, and the levels extra views cycle over by default.
VIEW_LEVELS: tuple[int, ...] = (0, 1, 2, 3)
DEFAULT_VIEW_LEVELS: tuple[int, ...] = (1, 2, 3)
#: Rows per Zarr chunk and per durable commit.
DEFAULT_CHUNK_ROWS = 4096
#: Images larger than this many pixels are quarantined as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485
#: Backbone input side in pixels.
DEFAULT_IMAGE_SIZE = 224
#: Devices the CLI accepts (cuda:N is also accepted where a command says so).
DEVICES: tuple[str, ...] = ("cpu", "cuda")

#: Files of a run folder (stage1.runs.layout is the only code that opens them by name).
RUN_CONFIG = "config.json"
RUN_SPLITS = "splits.json"
RUN_SCORES = "scores.safetensors"
RUN_POLICY = "policy.json"
RUN_METRICS = "metrics.json"
RUN_METRICS_CSV = "metrics.csv"
#: Files of a head folder.
HEAD_JSON = "head.json"
HEAD_WEIGHTS = "head.safetensors"
#: The splits file inside a store.
STORE_SPLITS = "splits.json"
#: bundle.json and the files a bundle carries besides it.
BUNDLE_JSON = "bundle.json"
