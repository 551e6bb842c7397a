"""The main job a user runs: Optuna sweeps, deployable bundles, ``predict`` and the demo."""
