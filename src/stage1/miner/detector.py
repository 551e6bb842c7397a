"""A StreetVision detector that forwards each image to the loopback ``stage1 serve`` sidecar.

Self-contained on purpose: only PIL and the standard library (http.client), no stage1, torch or
numpy import, so this one file runs inside the subnet's own environment (torch 2.6, transformers
4.45) while the model runs in this project's environment behind the sidecar. Copy it into the
subnet's ``base_miner/detectors/`` and import it from ``base_miner/detectors/__init__.py``; there it
subclasses ``FeatureDetector`` and registers as ``Stage1Sidecar``. Elsewhere (tests, a plain
script) it stands alone with the same interface: ``__init__(model_name, config_name=None,
device="cpu")``, ``load_model()`` and ``__call__(PIL.Image) -> float``.

The answer is the sidecar record's ``answer``: p_roadwork, or -1 to abstain (validators pay 0 for
that round and keep it out of their MCC / accuracy windows). Whatever goes wrong (sidecar down, a
bad reply, the time budget spent) answers -1 too, never a guess: 0.5 would be scored as class 0.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import math
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

ABSTAIN = -1.0
#: the validators' timeout is 9 s per request; the detector keeps a margin for the axon's own work.
VALIDATOR_TIMEOUT_S = 9.0
DEFAULTS: dict[str, Any] = {
    "sidecar_url": "http://127.0.0.1:8765",  # `stage1 serve BUNDLE` listens here by default
    "timeout_s": 8.0,  # whole budget for one answer (encode + request + reply); over it answers -1
    "startup_wait_s": 60.0,  # load_model() waits this long for the sidecar's /health
    "max_reply_bytes": 1 << 20,
}

try:  # inside the subnet: subclass its base and register under a name miner.env can choose
    from base_miner.detectors.feature_detector import FeatureDetector as _Base  # type: ignore[import-not-found]
    from base_miner.registry import DETECTOR_REGISTRY as _REGISTRY  # type: ignore[import-not-found]
except ImportError:  # standalone: the same interface, YAML config keys become attributes
    _REGISTRY = None

    class _Base:  # type: ignore[no-redef]
        """Stand-in for the subnet's ``FeatureDetector`` (config keys -> attributes, then load_model)."""

        def __init__(self, model_name: str, config_name: Optional[str] = None, device: str = "cpu") -> None:
            self.model_name = model_name
            self.device = device
            if config_name:
                self.set_class_attrs(config_name)
            self.load_model()

        def set_class_attrs(self, detector_config: str) -> None:
            """Read the YAML config (a path, or a name in ``configs/`` beside this file) into attributes."""
            path = Path(detector_config)
            if not path.exists():
                path = Path(__file__).resolve().parent / "configs" / detector_config
            for key, value in _read_yaml(path).items():
                setattr(self, key, value)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A flat ``key: value`` YAML file (PyYAML when installed; else scalars parsed by hand)."""
    text = path.read_text(encoding="utf-8")
    try:
        import yaml  # type: ignore[import-untyped]

        return dict(yaml.safe_load(text) or {})
    except ImportError:
        out: dict[str, Any] = {}
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            key, value = (part.strip() for part in line.split(":", 1))
            value = value.strip("'\"")
            try:
                out[key] = float(value) if "." in value else int(value)
            except ValueError:
                out[key] = value
        return out


class Stage1SidecarDetector(_Base):
    """Encodes the challenge image losslessly (PNG) and asks the sidecar; answers its ``answer``.

    Config keys (YAML, optional): ``sidecar_url``, ``timeout_s`` (the whole budget, below the
    validators' 9 s), ``startup_wait_s``, ``max_reply_bytes``. ``device`` is the sidecar's
    business (``stage1 serve --device``) and is ignored here.
    """

    def __init__(self, model_name: str = "Stage1Sidecar", config_name: Optional[str] = None,
                 device: str = "cpu") -> None:
        for key, value in DEFAULTS.items():
            setattr(self, key, value)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="stage1-sidecar")
        self.last_error: Optional[str] = None
        super().__init__(model_name, config_name, device)

    # -- the interface -------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Check the settings and wait (up to ``startup_wait_s``) for the sidecar's /health."""
        url = urllib.parse.urlsplit(str(self.sidecar_url))
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"sidecar_url {self.sidecar_url!r}: expected http://HOST:PORT (the `stage1 serve` address)")
        self.timeout_s = float(self.timeout_s)
        if not 0 < self.timeout_s <= VALIDATOR_TIMEOUT_S:
            raise ValueError(f"timeout_s {self.timeout_s}: must be in (0, {VALIDATOR_TIMEOUT_S}], the validators' timeout")
        deadline = time.monotonic() + float(self.startup_wait_s)
        while True:
            try:
                status, body = self._request("GET", "/health", None, None, timeout=2.0)
                if status == 200:
                    self.health = json.loads(body)
                    return
                problem = f"HTTP {status}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no stage1 sidecar at {self.sidecar_url} ({problem}); start it with "
                                      f"`stage1 serve BUNDLE --port {url.port or 80}` before the miner")
            time.sleep(0.2)

    def __call__(self, image: Any) -> float:
        """The sidecar's answer for ``image`` (a PIL image): p in [0, 1], or -1 (abstain / any failure)."""
        start = time.monotonic()
        self.last_error = None
        try:
            body = encode_image(image)
            left = self.timeout_s - (time.monotonic() - start)
            if left <= 0:
                return self._fail("encoding used up the time budget")
            future = self._pool.submit(self._request, "POST", "/predict", body, "image/png", left)
            status, reply = future.result(timeout=left)  # the whole request, however slowly bytes trickle
            if status != 200:
                return self._fail(f"HTTP {status}: {reply[:200]!r}")
            return checked_answer(json.loads(reply).get("answer"))
        except concurrent.futures.TimeoutError:
            return self._fail(f"no answer within {self.timeout_s} s")
        except Exception as exc:  # noqa: BLE001 - a miner must always answer; -1 abstains
            return self._fail(f"{type(exc).__name__}: {exc}")

    # -- helpers -----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[bytes], ctype: Optional[str],
                 timeout: float) -> tuple[int, bytes]:
        url = urllib.parse.urlsplit(str(self.sidecar_url))
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
        try:
            headers = {"Content-Type": ctype} if ctype else {}
            conn.request(method, (url.path.rstrip("/") or "") + path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(int(self.max_reply_bytes))
        finally:
            conn.close()

    def _fail(self, why: str) -> float:
        self.last_error = why
        sys.stderr.write(f"{self.model_name}: answering -1: {why}\n")
        return ABSTAIN


def encode_image(image: Any) -> bytes:
    """PNG bytes of ``image`` (lossless, so the sidecar sees the pixels the validator sent)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def checked_answer(value: Any) -> float:
    """``value`` as a float if it is -1 or finite in [0, 1]; a ValueError otherwise (the caller answers -1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the reply's answer {value!r} is not a number")
    answer = float(value)
    if answer == ABSTAIN or (math.isfinite(answer) and 0.0 <= answer <= 1.0):
        return answer
    raise ValueError(f"the reply's answer {answer} is neither -1 nor in [0, 1]")


if _REGISTRY is not None:  # pragma: no cover - only inside the subnet
    Stage1SidecarDetector = _REGISTRY.register_module(module_name="Stage1Sidecar")(Stage1SidecarDetector)
