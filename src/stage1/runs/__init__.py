"""Run folders: the layout that ``train`` writes (``layout``, the only code that knows its file
names) and the train / calibrate / evaluate steps (``steps``) that bundle, sweep, demo and the
benchmarks call."""
