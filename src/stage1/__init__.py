"""stage1: cached backbone features, small heads and certified exit policies for Stage-1 classifiers.

Sub-packages: ``featstore`` (backbones, images, Zarr store, splits), ``heads`` (trained on cached
features), ``policies`` (calibrators, exit policies, risks, metrics; numpy/scipy only), ``runs``
(the run folder and the train / calibrate / evaluate steps), ``workflows`` (sweep, bundle,
predictor, demo), ``finetune`` (PEFT / ExPLoRA), ``cli`` and ``_core`` (io, registry, errors,
constants). docs/architecture.md says who may import whom.
"""
from __future__ import annotations

__version__ = "0.2.0"
