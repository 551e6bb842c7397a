"""``stage1 serve``: a loopback HTTP sidecar that answers one image per request with a verified bundle.

A miner's detector (``stage1.miner.detector``) runs inside the subnet's own, older environment and
posts each challenge image here; this process holds the bundle, loaded and warmed up once. The
server is waitress (a production WSGI server) around a small WSGI app:

- ``POST /predict``: the image as raw bytes (``Content-Type: image/*`` or
  ``application/octet-stream``) or JSON ``{"image": "<base64>"}``; answers the ``predict`` record
  (``answer`` is the float to send). An image that cannot be scored gets its record with answer -1
  and status 200, never a 500. Results are cached by the image's sha256 (validators send the same
  bytes to every sampled miner), in a bounded LRU; headers ``X-Stage1-Cache`` (hit | miss) and
  ``X-Stage1-Server-Ms`` (time spent in the app) come with it.
- ``GET /health``: the bundle, backbone hash, policy and warm-up time.
- ``GET /metrics``: requests, cache hits, errors and latency percentiles (ms) of ``/predict``.

Only loopback addresses are served unless ``allow_remote`` (the sidecar has no authentication).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import math
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from stage1._core.errors import ConfigError

#: where the sidecar listens unless told otherwise (the detector's default ``sidecar_url`` matches).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: largest request body accepted (a 224 px JPEG q75 is ~10-30 KB; base64 JSON adds a third).
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_CACHE_SIZE = 1024
#: latencies kept for the percentiles of /metrics (the most recent ones).
LATENCY_WINDOW = 10_000

StartResponse = Callable[..., Any]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) resolves only to loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback ``--host`` unless ``--allow-remote`` (the sidecar has no authentication)."""
    if not allow_remote and not is_loopback(host):
        raise ConfigError(f"--host {host} is not a loopback address; the sidecar has no authentication, so it "
                          "serves 127.0.0.1 only: bind --host 127.0.0.1, or pass --allow-remote to expose it")


class ResultCache:
    """A thread-safe LRU of records keyed by the image's sha256 (0 entries = off)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        """A copy of the cached record for ``key`` (now the most recent), or None."""
        with self._lock:
            rec = self._items.get(key)
            if rec is None:
                return None
            self._items.move_to_end(key)
            return dict(rec)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Keep ``record`` for ``key``, dropping the least recently used beyond ``size``."""
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = dict(record)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Metrics:
    """Counters and recent /predict latencies, safe to update from waitress's worker threads."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "cache_hits": 0, "image_errors": 0, "bad_requests": 0, "too_large": 0}
        self._all: deque[float] = deque(maxlen=window)
        self._hits: deque[float] = deque(maxlen=window)
        self._misses: deque[float] = deque(maxlen=window)
        self.started = time.time()

    def count(self, name: str) -> None:
        """Add one to counter ``name``."""
        with self._lock:
            self.counts[name] += 1

    def record(self, seconds: float, hit: bool, error: bool) -> None:
        """One answered /predict request: its latency, whether the cache answered, whether it failed."""
        ms = seconds * 1000.0
        with self._lock:
            self.counts["requests"] += 1
            self.counts["cache_hits"] += hit
            self.counts["image_errors"] += error
            self._all.append(ms)
            (self._hits if hit else self._misses).append(ms)

    def snapshot(self) -> dict[str, Any]:
        """The /metrics body: counters, uptime and latency percentiles (ms) over the recent window."""
        with self._lock:
            out: dict[str, Any] = dict(self.counts)
            out["uptime_s"] = round(time.time() - self.started, 3)
            out["latency_ms"] = percentiles(list(self._all))
            out["latency_ms_cache_hit"] = percentiles(list(self._hits))
            out["latency_ms_cache_miss"] = percentiles(list(self._misses))
        return out


def percentiles(values: list[float]) -> dict[str, Any]:
    """n, p50, p90, p99 and max of ``values`` (nearest-rank; None when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(values)

    def rank(q: float) -> float:
        return round(s[max(0, math.ceil(q * len(s)) - 1)], 3)

    return {"n": len(s), "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": round(s[-1], 3)}


class SidecarApp:
    """The WSGI app: routes /predict, /health, /metrics; one forward pass at a time (a lock)."""

    def __init__(self, predictor: Any, max_bytes: int = DEFAULT_MAX_BYTES, cache_size: int = DEFAULT_CACHE_SIZE,
                 info: dict[str, Any] | None = None) -> None:
        self.predictor = predictor
        self.max_bytes = int(max_bytes)
        self.cache = ResultCache(cache_size)
        self.metrics = Metrics()
        self.info = dict(info or {})
        self._lock = threading.Lock()

    # -- WSGI -----------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        routes = {"/predict": ("POST", self._predict), "/health": ("GET", self._health),
                  "/metrics": ("GET", self._metrics)}
        if path not in routes:
            return _json(start_response, 404, {"error": f"no route {path}; use POST /predict, GET /health, GET /metrics"})
        want, handler = routes[path]
        if method != want:
            return _json(start_response, 405, {"error": f"{path} takes {want}"}, [("Allow", want)])
        return handler(environ, start_response)

    def _health(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _json(start_response, 200, {"status": "ok", **self.info, "cache_entries": len(self.cache)})

    def _metrics(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _json(start_response, 200, {**self.metrics.snapshot(), "cache_entries": len(self.cache),
                                           "cache_size": self.cache.size})

    def _predict(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        t0 = time.perf_counter()
        body = _read_body(environ, self.max_bytes)
        if body is None:
            self.metrics.count("too_large")
            return _json(start_response, 413, {"error": f"request body over the limit of {self.max_bytes} bytes "
                                                        "(stage1 serve --max-bytes)", "answer": -1.0})
        ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            image, problem = _image_from_json(body)
            if problem is not None:
                self.metrics.count("bad_requests")
                return _json(start_response, 400, {"error": problem, "answer": -1.0})
        elif ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
            image = body
        else:
            self.metrics.count("bad_requests")
            return _json(start_response, 415, {"error": f"Content-Type {ctype!r}: send the image as image/* (raw "
                                                        "bytes) or application/json {\"image\": base64}",
                                               "answer": -1.0})
        record, hit = self.answer(image)
        took = time.perf_counter() - t0
        self.metrics.record(took, hit, "error" in record)
        return _json(start_response, 200, record, [("X-Stage1-Cache", "hit" if hit else "miss"),
                                                   ("X-Stage1-Server-Ms", f"{took * 1000:.3f}")])

    # -- the work ------------------------------------------------------------------------------------------
    def answer(self, image: bytes | None) -> tuple[dict[str, Any], bool]:
        """The record for ``image`` (None: base64 that did not decode) and whether the cache had it."""
        if image is None:
            return self.predictor.failed("<request>", "the image field is not valid base64", "bad_base64"), False
        key = hashlib.sha256(image).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        with self._lock:  # one forward pass at a time; waitress threads keep /health answering
            record = self.predictor.predict([image])[0]
        record["path"] = f"sha256:{key}"
        self.cache.put(key, record)
        return record, False


def _read_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """The request body, or None when it is (or claims to be) larger than ``limit`` bytes."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        return None
    stream = environ["wsgi.input"]
    data = stream.read(length) if length else stream.read(limit + 1)
    return None if len(data) > limit else data


def _image_from_json(body: bytes) -> tuple[bytes | None, str | None]:
    """(image bytes or None for bad base64, a problem with the request or None)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, "the body is not valid JSON; send {\"image\": \"<base64 of the image file>\"}"
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        return None, "the JSON body needs an \"image\" field holding the base64 of the image file"
    try:
        return base64.b64decode(obj["image"], validate=True), None
    except (binascii.Error, ValueError):
        return None, None


def _json(start_response: StartResponse, status: int, obj: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               413: "Payload Too Large", 415: "Unsupported Media Type"}
    body = json.dumps(obj, allow_nan=False).encode("utf-8")
    start_response(f"{status} {reasons[status]}", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def warm_up(predictor: Any, rounds: int = 2) -> float:
    """Run ``rounds`` predictions on a grey JPEG (first calls allocate); seconds the last one took."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (128, 128, 128)).save(buf, format="JPEG")
    took = 0.0
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        predictor.predict([buf.getvalue()])
        took = time.perf_counter() - t0
    return took


def build_app(bundle: str, backbone: str | None = None, device: str = "cpu", on_defer: str = "abstain",
              max_bytes: int = DEFAULT_MAX_BYTES, cache_size: int = DEFAULT_CACHE_SIZE) -> SidecarApp:
    """Load and verify the bundle once, warm it up, and wrap it in the WSGI app."""
    from stage1 import __version__
    from stage1.workflows.predictor import Stage1Predictor

    if max_bytes < 1:
        raise ConfigError(f"--max-bytes {max_bytes}: must be at least 1")
    if cache_size < 0:
        raise ConfigError(f"--cache-size {cache_size}: must be 0 (off) or more")
    t0 = time.perf_counter()
    predictor = Stage1Predictor.from_bundle(bundle, backbone=backbone, device=device, on_defer=on_defer)
    load_s = time.perf_counter() - t0
    warm_s = warm_up(predictor)
    m = predictor.manifest
    info = {"bundle": str(bundle), "backbone_sha256": m["backbone"]["weights_sha256"], "head": m["head"]["name"],
            "policy": m["policy"].get("policy"), "on_defer": on_defer, "device": device,
            "tool_version": __version__, "load_s": round(load_s, 3), "warm_request_ms": round(warm_s * 1000, 3)}
    return SidecarApp(predictor, max_bytes=max_bytes, cache_size=cache_size, info=info)


def serve(app: SidecarApp, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, allow_remote: bool = False,
          threads: int = 4, announce: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` with waitress until SIGTERM or SIGINT, then close the socket and return.

    ``announce`` gets one JSON line with the actual URL (``--port 0`` picks a free port) once listening.
    """
    from waitress import create_server

    check_bind(host, allow_remote)
    # waitress's own limit is a backstop above ours, so oversize bodies get our JSON 413
    server = create_server(app, host=host, port=port, threads=threads,
                           max_request_body_size=app.max_bytes + (1 << 20), ident="stage1-serve")
    url = f"http://{host}:{server.effective_port}"
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # waitress's loop catches it and shuts its worker threads down

    for sig in previous:
        signal.signal(sig, stop)
    try:
        (announce or (lambda line: print(line, flush=True)))(json.dumps({"listening": url, **app.info}))
        server.run()
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.stderr.write(f"stage1 serve: stopped ({app.metrics.counts['requests']} request(s) answered)\n")
