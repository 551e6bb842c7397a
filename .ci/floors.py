"""Print ``name==floor`` for every dependency (and dev extra) in pyproject.toml, torch excepted.

The floors CI pass installs exactly these, so a floor the code does not really meet fails CI.
torch stays at the local CPU wheel (2.13.0, also the declared floor).
"""
import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
pins = []
for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    m = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", spec)
    if not m:
        sys.exit(f"pyproject.toml: {spec!r} declares no >= floor; every dependency needs one")
    if m.group(1).lower() != "torch":
        pins.append(f"{m.group(1)}=={m.group(2)}")
print(" ".join(pins))
