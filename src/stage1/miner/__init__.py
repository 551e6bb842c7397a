"""The miner's side: a subnet detector that asks the ``stage1 serve`` sidecar (PIL + stdlib only).

``detector.py`` imports nothing from stage1, so it can be copied into the subnet's
``base_miner/detectors/`` and run in its older environment (docs/subnet.md).
"""
