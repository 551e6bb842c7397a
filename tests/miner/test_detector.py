"""The miner detector: PIL + stdlib only, the subnet's interface, talking to the real sidecar; -1 on any failure."""
from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import make_image
from workflows.tiny_bundle import Sidecar, make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = ROOT / "examples" / "miner" / "stage1_sidecar.yaml"


def _config(tmp_path: Path, **values: object) -> str:
    path = tmp_path / "detector.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return str(path)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, Path]]:
    tiny = make_tiny_bundle(tmp_path_factory.mktemp("detector"))
    server = Sidecar(tiny["bundle"])
    yield server, tiny["bundle"]
    assert server.stop(signal.SIGTERM) == 0 and "stage1 serve: stopped (" in server.stderr_text()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections and never replies (a hung sidecar)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    sock.close()


@pytest.fixture
def fake_sidecar() -> Iterator[tuple[str, dict]]:
    """A stub HTTP server: /health 200, /predict answers ``reply["body"]`` with ``reply["status"]``."""
    reply = {"status": 200, "body": {"answer": 0.25}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, obj: object) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._send(200, {"status": "ok"})

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(reply["status"], reply["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", reply
    server.shutdown()
    server.server_close()


def test_answers_what_the_sidecar_answers(sidecar: tuple[Sidecar, Path], tmp_path: Path) -> None:
    from stage1.miner.detector import Stage1SidecarDetector, encode_image
    from stage1.workflows.predictor import Stage1Predictor

    server, bundle = sidecar
    det = Stage1SidecarDetector("Stage1Sidecar", _config(tmp_path, sidecar_url=server.url, timeout_s=8.0), "cpu")
    assert det.health["status"] == "ok" and det.timeout_s == 8.0
    predictor = Stage1Predictor.from_bundle(bundle)
    answers = []
    for seed in range(4):
        image = make_image(seed, size=(224, 224))
        got = det(image)
        want = predictor.predict([encode_image(image)])[0]["answer"]
        assert got == pytest.approx(want, abs=1e-6) and (got == -1.0 or 0.0 <= got <= 1.0)
        answers.append(got)
    assert det.last_error is None


def test_example_config_loads(sidecar: tuple[Sidecar, Path], tmp_path: Path) -> None:
    from stage1.miner.detector import DEFAULTS, Stage1SidecarDetector

    text = EXAMPLE_CONFIG.read_text().replace("http://127.0.0.1:8765", sidecar[0].url)
    (tmp_path / "cfg.yaml").write_text(text)
    det = Stage1SidecarDetector("Stage1Sidecar", str(tmp_path / "cfg.yaml"))
    assert det.timeout_s == DEFAULTS["timeout_s"] and det.startup_wait_s == DEFAULTS["startup_wait_s"]
    assert "IMAGE_DETECTOR=Stage1Sidecar" in (EXAMPLE_CONFIG.parent / "miner.env").read_text()


def test_a_hung_sidecar_answers_minus_one_within_the_budget(fake_sidecar, silent_server: str, tmp_path: Path) -> None:
    from stage1.miner.detector import Stage1SidecarDetector

    det = Stage1SidecarDetector("Stage1Sidecar", _config(tmp_path, sidecar_url=fake_sidecar[0], timeout_s=0.5))
    det.sidecar_url = silent_server  # healthy at load, then it hangs
    t0 = time.monotonic()
    assert det(make_image(0, size=(224, 224))) == -1.0
    assert time.monotonic() - t0 < 5.0 and "within 0.5 s" in det.last_error  # the budget, not a hang


@pytest.mark.parametrize("status, body", [(200, {"answer": 7.0}), (200, {"answer": float("nan")}),
                                          (200, {"no": "answer"}), (500, {"error": "boom"})])
def test_bad_replies_answer_minus_one(fake_sidecar, tmp_path: Path, status: int, body: dict) -> None:
    from stage1.miner.detector import Stage1SidecarDetector

    url, reply = fake_sidecar
    det = Stage1SidecarDetector("Stage1Sidecar", _config(tmp_path, sidecar_url=url))
    assert det(make_image(1)) == 0.25
    reply.update(status=status, body=body)
    assert det(make_image(1)) == -1.0 and det.last_error


def test_sidecar_gone_answers_minus_one_and_load_model_says_how_to_start_it(fake_sidecar, tmp_path: Path) -> None:
    from stage1.miner.detector import Stage1SidecarDetector

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError, match="stage1 serve BUNDLE"):
        Stage1SidecarDetector("Stage1Sidecar", _config(tmp_path, sidecar_url=closed, startup_wait_s=0.3))
    det = Stage1SidecarDetector("Stage1Sidecar", _config(tmp_path, sidecar_url=fake_sidecar[0]))
    det.sidecar_url = closed
    assert det(make_image(2)) == -1.0 and "ConnectionRefused" in det.last_error
    assert det("not a PIL image") == -1.0  # anything else going wrong abstains too


@pytest.mark.parametrize("key, value, needle", [("timeout_s", 12, "validators' timeout"),
                                                ("timeout_s", 0, "validators' timeout"),
                                                ("sidecar_url", "ftp://x", "http://HOST:PORT")])
def test_bad_settings_are_refused(tmp_path: Path, key: str, value: object, needle: str) -> None:
    from stage1.miner.detector import Stage1SidecarDetector

    with pytest.raises(ValueError, match=needle):
        Stage1SidecarDetector("Stage1Sidecar", _config(tmp_path, **{key: value}))


def test_detector_imports_only_pil_and_the_standard_library() -> None:
    """It must run in the subnet's environment: no stage1 code, torch, numpy or transformers."""
    import ast

    path = ROOT / "src" / "stage1" / "miner" / "detector.py"
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"__future__", "PIL", "yaml", "base_miner"}
    assert tops <= allowed, tops - allowed
    code = ("import sys, stage1.miner.detector; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'numpy', 'transformers') or (m.startswith('stage1.') and not m.startswith('stage1.miner'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
