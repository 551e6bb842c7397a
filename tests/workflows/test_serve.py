"""``stage1 serve``: the real waitress sidecar in a subprocess on 127.0.0.1, spoken to over HTTP."""
from __future__ import annotations

import base64
import io
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from stage1 import cli
from conftest import make_image
from workflows.tiny_bundle import Sidecar, make_tiny_bundle


def http(url: str, data: bytes | None = None, ctype: str | None = None,
         method: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of one request, with a timeout; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype} if ctype else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(seed, size=(224, 224)).save(buf, format="JPEG")  # as validators send: 224 px, quality 75
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_bundle(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def sidecar(tiny: dict[str, Path]):
    server = Sidecar(tiny["bundle"], "--max-bytes", "200000", "--cache-size", "4")
    yield server
    assert server.stop() == 0


def test_predict_raw_bytes_then_cache_hit_then_base64(sidecar: Sidecar, tiny: dict[str, Path]) -> None:
    from stage1.workflows.predictor import Stage1Predictor

    image = jpeg(1)
    status, rec, headers = http(sidecar.url + "/predict", image, "image/jpeg")
    assert status == 200 and headers["X-Stage1-Cache"] == "miss"
    expected = Stage1Predictor.from_bundle(tiny["bundle"]).predict([image])[0]
    assert rec["answer"] == pytest.approx(expected["answer"], abs=1e-6) and rec["decision"] == expected["decision"]
    assert rec["path"].startswith("sha256:") and set(expected) == set(rec)
    status, again, headers = http(sidecar.url + "/predict", image, "image/jpeg")
    assert status == 200 and headers["X-Stage1-Cache"] == "hit" and again == rec
    body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    status, from_json, headers = http(sidecar.url + "/predict", body, "application/json")
    assert status == 200 and from_json == rec and headers["X-Stage1-Cache"] == "hit"  # same bytes, same key


def test_bad_images_get_answer_minus_one_with_status_200(sidecar: Sidecar) -> None:
    for data, ctype in [(b"not an image", "image/jpeg"), (b"", "image/png"),
                        (jpeg(2)[:300], "image/jpeg")]:  # a truncated JPEG
        status, rec, _ = http(sidecar.url + "/predict", data, ctype)
        assert status == 200 and rec["answer"] == -1.0 and rec["error"] and rec["reason"], rec
    body = json.dumps({"image": "***not base64***"}).encode()
    status, rec, _ = http(sidecar.url + "/predict", body, "application/json")
    assert status == 200 and rec["answer"] == -1.0 and rec["reason"] == "bad_base64"


def test_malformed_requests_get_json_errors(sidecar: Sidecar) -> None:
    cases = [
        (sidecar.url + "/predict", b"{not json", "application/json", "POST", 400),
        (sidecar.url + "/predict", b'{"img": "x"}', "application/json", "POST", 400),
        (sidecar.url + "/predict", b"x", "text/plain", "POST", 415),
        (sidecar.url + "/predict", b"x" * 300_000, "image/jpeg", "POST", 413),
        (sidecar.url + "/predict", None, None, "GET", 405),
        (sidecar.url + "/nothing", None, None, "GET", 404),
    ]
    for url, data, ctype, method, want in cases:
        status, body, _ = http(url, data, ctype, method)
        assert status == want and "error" in body, (want, status, body)
    status, body, _ = http(sidecar.url + "/predict", b"x" * 300_000, "image/jpeg")
    assert status == 413 and "200000" in body["error"] and body["answer"] == -1.0


def test_health_and_metrics(sidecar: Sidecar) -> None:
    status, health, _ = http(sidecar.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["on_defer"] == "abstain"
    assert len(health["backbone_sha256"]) == 64 and health["warm_request_ms"] > 0
    image = jpeg(7)
    for _ in range(3):
        assert http(sidecar.url + "/predict", image, "image/jpeg")[0] == 200
    status, m, _ = http(sidecar.url + "/metrics")
    assert status == 200 and m["requests"] >= 3 and m["cache_hits"] >= 2
    assert m["latency_ms"]["n"] == m["requests"] and m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]
    assert m["latency_ms_cache_hit"]["n"] == m["cache_hits"] and m["cache_entries"] <= m["cache_size"] == 4


def test_on_defer_answer_and_cache_off_in_process(tiny: dict[str, Path]) -> None:
    """The WSGI app itself (no server): --on-defer answer never sends -1 for a good image; cache 0 is off."""
    from wsgiref.util import setup_testing_defaults

    from stage1.workflows.predictor import Stage1Predictor
    from stage1.workflows.serve import SidecarApp

    app = SidecarApp(Stage1Predictor.from_bundle(tiny["bundle"], on_defer="answer"), cache_size=0)
    for _ in range(2):
        body = jpeg(3)
        environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "CONTENT_TYPE": "image/jpeg",
                                   "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
        setup_testing_defaults(environ)
        seen: dict[str, Any] = {}
        out = app(environ, lambda status, headers: seen.update(status=status, headers=dict(headers)))
        rec = json.loads(b"".join(out))
        assert seen["status"] == "200 OK" and seen["headers"]["X-Stage1-Cache"] == "miss"
        assert 0.0 <= rec["answer"] <= 1.0 and rec["answer"] == rec["p_roadwork"]
    assert app.metrics.snapshot()["cache_hits"] == 0 and len(app.cache) == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_non_loopback_host_is_refused_without_allow_remote(tmp_path: Path, host: str) -> None:
    res = CliRunner().invoke(cli.main, ["serve", str(tmp_path), "--host", host])
    assert res.exit_code == 2 and "--allow-remote" in res.output


def test_loopback_detection_and_cache_and_percentiles() -> None:
    from stage1.workflows.serve import ResultCache, is_loopback, percentiles

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.5.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
    cache = ResultCache(2)
    cache.put("a", {"x": 1})
    cache.put("b", {"x": 2})
    assert cache.get("a") == {"x": 1}  # a is now the most recent
    cache.put("c", {"x": 3})
    assert cache.get("b") is None and cache.get("a") == {"x": 1} and len(cache) == 2
    got = cache.get("a")
    got["x"] = 99  # a copy: callers cannot change the cached record
    assert cache.get("a") == {"x": 1}
    assert percentiles([]) ["n"] == 0
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"]) == (50.0, 90.0, 99.0, 100.0)


def test_zz_sigint_stops_the_server_cleanly(sidecar: Sidecar) -> None:
    """Last in the file: Ctrl-C (SIGINT) closes the module's server with exit status 0 (the detector's
    tests stop theirs with SIGTERM)."""
    assert sidecar.stop(signal.SIGINT) == 0
    assert "stage1 serve: stopped (" in sidecar.stderr_text()
