"""Shared foundations that every domain may import: atomic io and JSON, the one ``Registry``,
the ``Stage1Error`` family and torch/zarr-free constants. Imports nothing heavier than numpy."""
