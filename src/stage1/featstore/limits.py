"""Read limits shared by the image reader and the CLI (stdlib only, so `stage1 --help` stays fast)."""
from __future__ import annotations

#: Default cap on an image file's size in bytes (``extract --max-bytes``); larger files are quarantined unread.
MAX_BYTES = 256 * 1024 * 1024
