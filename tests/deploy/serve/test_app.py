"""`cnc serve`: the HTTP API on a real uvicorn server (scores equal Detector.predict, batching under concurrency, every
limit and malformed input, a failing model, the token rules, a client that disconnects) and the web page in headless
Chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra: pip install -e '.[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="cnc serve needs the serve extra: pip install -e '.[serve]'")

from cnc_ad import Detector  # noqa: E402
from cnc_ad.cli import main  # noqa: E402
from cnc_ad.deploy.serve.app import create_app  # noqa: E402
from cnc_ad.deploy.serve.settings import ServeSettings, bound_names, check_access, is_loopback  # noqa: E402
from cnc_ad.errors import ConfigError  # noqa: E402
from cnc_ad.files import read_jsonl  # noqa: E402

THRESHOLDS = {"image": {"__all__": 0.5, "brick": 0.25}, "pixel": {"__all__": 0.6, "brick": 0.3}}
LIMITS = ServeSettings(max_upload_bytes=200_000, max_pixels=250_000, max_images=4, max_batch_size=8, max_wait_ms=20)
SIZES = [(40, 50), (33, 21), (64, 64), (20, 30), (48, 40), (25, 25)]  # (H, W)


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_thresholds() -> dict:
    return THRESHOLDS


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> Detector:
    return Detector.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """PNG and JPEG files of several sizes, random content."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for seed, (height, width) in enumerate(SIZES):
        array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = root / f"part{seed}.{'jpg' if seed % 3 == 2 else 'png'}"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 and a free port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server(detector: Detector) -> Iterator[tuple[str, object]]:
    """A running server with small limits; yields (base URL, app)."""
    app = create_app(detector, LIMITS)
    with running(app) as url:
        yield url, app


@pytest.fixture
def server_log() -> Iterator[list[logging.LogRecord]]:
    """Records of WARNING and above from uvicorn and the server's modules while the test runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "cnc_ad.deploy.serve")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg" if p.suffix == ".jpg" else "image/png")) for p in paths]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]["message"]


def _exchange(url: str, head: bytes, body: bytes = b"", wait_s: float = 10.0) -> tuple[int, dict[str, str], dict]:
    """Send raw bytes (headers, perhaps part of a body) and read the answer the server gives without more of them:
    its status, headers and JSON body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
            chunk = sock.recv(65536)  # raises socket.timeout when the server waits for the body instead
            if not chunk:
                break
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head_text.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(payload)


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def _post_head(url: str, length: int, extra: str = "") -> bytes:
    host = url.removeprefix("http://")
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n"
        f"{extra}\r\n"
    ).encode()


# ------------------------------------------------------------------------------------------------- results
def test_scores_equal_detector_predict(server, detector: Detector, images: list[Path]):
    url, _ = server
    expected = detector.predict([str(p) for p in images])
    got = []
    for start in range(0, len(images), 3):  # several images per request, several requests
        response = httpx.post(f"{url}/v1/predict", files=_files(images[start : start + 3]), timeout=60)
        assert response.status_code == 200, response.text
        got += response.json()["images"]
    assert [r["name"] for r in got] == [p.name for p in images]
    np.testing.assert_allclose([r["score"] for r in got], expected.scores, rtol=1e-5, atol=1e-6)
    for result, path, size, anomaly_map, mask, flagged in zip(
        got, images, SIZES, expected.maps, expected.masks, expected.is_anomalous, strict=True
    ):
        assert (result["height"], result["width"]) == size, path
        assert result["is_anomalous"] == bool(flagged)
        assert result["threshold"] == THRESHOLDS["image"]["__all__"] and result["threshold_source"] == "__all__"
        assert result["pixel_threshold"] == THRESHOLDS["pixel"]["__all__"]
        stats = result["map_stats"]
        assert stats["map_size"] == list(size)
        assert stats["max"] == pytest.approx(float(anomaly_map.max()), rel=1e-5)
        assert stats["mean"] == pytest.approx(float(anomaly_map.mean()), rel=1e-5)
        assert stats["anomalous_fraction"] == pytest.approx(float(mask.mean()), abs=0.01)
        assert "map" not in result and "overlay" not in result

    # One raw image body gives the same result as the same file in a multipart request.
    raw = httpx.post(f"{url}/v1/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["images"][0]["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5, abs=1e-6)


def test_thresholds_and_their_source(server, detector: Detector, images: list[Path]):
    url, _ = server
    score = float(detector.predict(str(images[0])).scores[0])

    def ask(params=None, data=None) -> dict:
        response = httpx.post(f"{url}/v1/predict", files=_files(images[:1]), params=params, data=data)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["images"][0]

    cases = [
        (None, None, 0.5, "__all__", 0.6),
        ({"category": "brick"}, None, 0.25, "category", 0.3),
        (None, {"category": "brick"}, 0.25, "category", 0.3),  # form field
        ({"threshold": score + 1}, None, score + 1, "request", 0.6),
        (None, {"threshold": str(score - 1), "category": "brick"}, score - 1, "request", 0.3),
        ({"threshold": score, "pixel_threshold": 0.05}, None, score, "request", 0.05),
    ]
    for params, data, threshold, source, pixel in cases:
        result = ask(params, data)
        assert result["threshold"] == pytest.approx(threshold) and result["threshold_source"] == source, (params, data)
        assert result["pixel_threshold"] == pytest.approx(pixel)
        assert result["is_anomalous"] == (score >= threshold)
    message = _error(httpx.post(f"{url}/v1/predict", files=_files(images[:1]), params={"category": "tyre"}), 422,
                     "unknown_category")  # fmt: skip
    assert "tyre" in message and "brick" in message

    # Without stored thresholds: no decision, no source, no mask statistics.
    bare = Detector(detector.backend, None)
    with running(create_app(bare, LIMITS)) as bare_url:
        result = httpx.post(f"{bare_url}/v1/predict", files=_files(images[:1]), params={"return": "mask"}).json()
        result = result["images"][0]
        assert result["is_anomalous"] is None and result["threshold"] is None and result["threshold_source"] is None
        assert result["map_stats"]["anomalous_fraction"] is None and result["mask"] is None
        assert httpx.get(f"{bare_url}/v1/model").json()["categories"] == []

    # A NaN threshold (a category without anomalous test images) is JSON null and decides nothing.
    nan = {"image": {"__all__": 0.5, "screw": float("nan")}, "pixel": {"__all__": 0.6, "screw": float("nan")}}
    with running(create_app(Detector(detector.backend, nan), LIMITS)) as nan_url:
        model = httpx.get(f"{nan_url}/v1/model")
        assert model.status_code == 200 and model.json()["thresholds"]["image"] == {"__all__": 0.5, "screw": None}
        response = httpx.post(f"{nan_url}/v1/predict", files=_files(images[:1]), params={"category": "screw"})
        result = response.json()["images"][0]
        assert result["threshold"] is None and result["threshold_source"] is None and result["is_anomalous"] is None


def test_map_mask_and_overlay_pngs(server, detector: Detector, images: list[Path]):
    url, _ = server
    path = images[0]
    expected = detector.predict(str(path))
    response = httpx.post(f"{url}/v1/predict", files=_files([path]), params={"return": "map,mask,overlay"})
    assert response.status_code == 200, response.text
    result = response.json()["images"][0]
    anomaly_map, mask = expected.maps[0], expected.masks[0]
    grey = _decode_png(result["map"]).astype(np.float64)
    low, high = result["map_range"]
    assert grey.shape == anomaly_map.shape
    np.testing.assert_allclose(low + grey / 255 * (high - low), anomaly_map, atol=(high - low) / 255 + 1e-6)
    predicted = _decode_png(result["mask"]) > 127
    assert predicted.shape == mask.shape and (predicted != mask).mean() < 0.01
    overlay = _decode_png(result["overlay"])
    assert overlay.shape == (*anomaly_map.shape, 3) and overlay.std() > 0

    # Large images come back at most output_max_side pixels on their longer side.
    settings = ServeSettings(output_max_side=32)
    with running(create_app(detector, settings)) as small_url:
        big = np.random.default_rng(9).integers(0, 256, (100, 80, 3), dtype=np.uint8)
        result = httpx.post(
            f"{small_url}/v1/predict",
            files=[("files", ("big.png", _png(big), "image/png"))],
            params={"return": "overlay"},
        ).json()["images"][0]
    assert (result["height"], result["width"]) == (100, 80) and result["map_stats"]["map_size"] == [32, 26]
    assert _decode_png(result["overlay"]).shape == (32, 26, 3)


def test_model_and_health(server, detector: Detector):
    url, _ = server
    model = httpx.get(f"{url}/v1/model").json()
    assert model["preset"] == "tiny" and model["backend"] == "torch" and model["image_size"] == detector.image_size
    assert model["categories"] == ["brick"] and model["thresholds"] == THRESHOLDS
    assert model["limits"]["max_images"] == LIMITS.max_images and model["version"]
    assert httpx.get(f"{url}/v1/health").json() == {"status": "ok", "version": model["version"], "auth": False}
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/v1/health", "/v1/stats"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{url}/v1/ready").json() == {"status": "ready"}


def test_api_docs_pages_are_off_unless_asked_for(server, detector: Detector):
    url, _ = server  # the pages load Swagger UI / ReDoc from a CDN: a server for a line PC does not link to one
    for page in ("/docs", "/redoc"):
        _error(httpx.get(f"{url}{page}"), 404, "not_found")
    assert httpx.get(f"{url}/openapi.json").status_code == 200
    with running(create_app(detector, ServeSettings(api_docs=True))) as docs_url:
        assert httpx.get(f"{docs_url}/docs").status_code == 200 and httpx.get(f"{docs_url}/redoc").status_code == 200


def test_an_onnx_graph_serves_the_same_scores(
    tiny_checkpoint: Path, detector: Detector, images: list[Path], tmp_path: Path
):
    pytest.importorskip("onnxruntime", reason="ONNX serving needs the export extra (in the test extra)")
    from cnc_ad.checkpoint import load_model
    from cnc_ad.deploy.export import export_onnx

    graph = export_onnx(load_model(tiny_checkpoint, pretrained=False), tmp_path / "tiny.onnx")
    (tmp_path / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    served = Detector.load(graph, thresholds=tmp_path / "thresholds.json")
    expected = detector.predict([str(p) for p in images[:3]]).scores
    with running(create_app(served, LIMITS)) as url:
        model = httpx.get(f"{url}/v1/model").json()
        assert model["backend"] == "onnxruntime" and model["preset"] == "tiny" and model["categories"] == ["brick"]
        response = httpx.post(f"{url}/v1/predict", files=_files(images[:3]))
    assert response.status_code == 200, response.text
    np.testing.assert_allclose([r["score"] for r in response.json()["images"]], expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------ batching
def test_concurrent_requests_are_batched(server, detector: Detector, images: list[Path]):
    url, app = server
    expected = detector.predict([str(p) for p in images]).scores
    before = dict(vars(app.state.batcher.stats))
    requests = 16
    barrier = threading.Barrier(requests)

    def one(index: int) -> float:
        path = images[index % len(images)]
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            response = client.post(f"{url}/v1/predict", files=_files([path]))
        assert response.status_code == 200, response.text
        return response.json()["images"][0]["score"]

    with ThreadPoolExecutor(requests) as pool:
        scores = list(pool.map(one, range(requests)))
    np.testing.assert_allclose(scores, [expected[i % len(images)] for i in range(requests)], rtol=1e-5, atol=1e-6)
    stats = httpx.get(f"{url}/v1/stats").json()
    calls = stats["model_calls"] - before["model_calls"]
    assert stats["images"] - before["images"] == requests
    assert 2 <= calls < requests, stats  # batches of up to 8: at least 2 calls, and fewer than one per request
    assert stats["largest_batch"] > 1


class _Backend:
    """A stand-in engine: ``score`` in place of the real backend's call, everything else the real one's."""

    def __init__(self, real, score):
        self.name, self.image_size, self.config, self.score_rule = (
            real.name,
            real.image_size,
            real.config,
            real.score_rule,
        )
        self.score = score

    def __call__(self, batch):
        return self.score(batch)


class _Held:
    """A model that holds every batch after the first (the start-up self-test) until ``release`` is set."""

    def __init__(self, detector: Detector) -> None:
        self.real = detector.backend
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def detector(self) -> Detector:
        return Detector(_Backend(self.real, self), THRESHOLDS)

    def __call__(self, batch):
        self.calls += 1
        if self.calls > 1:
            self.entered.set()
            self.release.wait(30)
        return self.real(batch)


def test_a_failing_model_answers_503_without_its_text_and_the_worker_lives_on(
    detector: Detector, images: list[Path], server_log
):
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the first call is the start-up self-test
            raise RuntimeError("CUDA out of memory at /opt/secret/path (simulated)")
        return detector.backend(batch)

    app = create_app(Detector(_Backend(detector.backend, flaky), THRESHOLDS), LIMITS)
    with running(app) as url:
        message = _error(httpx.post(f"{url}/v1/predict", files=_files(images[:2])), 503, "model_error")
        assert "memory" not in message and "secret" not in message and "RuntimeError" not in message
        error_id = message.partition("(id ")[2].rstrip(")")
        assert "see the server log" in message and len(error_id) == 8, message
        again = httpx.post(f"{url}/v1/predict", files=_files(images[:2]))
        assert again.status_code == 200 and len(again.json()["images"]) == 2
        assert httpx.get(f"{url}/v1/health").json()["status"] == "ok"
        stats = httpx.get(f"{url}/v1/stats").json()
    assert stats["failed_calls"] == 1 and stats["model_calls"] >= 1
    logged = [r for r in server_log if error_id in r.getMessage()]
    assert logged and "out of memory" in str(logged[0].exc_info[1])  # the details are in the server log, by id


def test_an_unexpected_error_answers_500_with_an_id_not_its_text(server, images: list[Path], server_log, monkeypatch):
    url, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("internal detail /opt/secret/path")

    monkeypatch.setattr("cnc_ad.deploy.serve.scoring.render_result", broken)
    message = _error(httpx.post(f"{url}/v1/predict", files=_files(images[:1])), 500, "internal_error")
    assert "secret" not in message and "RuntimeError" not in message and "internal detail" not in message
    error_id = message.partition("(id ")[2].rstrip(")")
    assert len(error_id) == 8, message
    logged = [r for r in server_log if r.name == "cnc_ad.deploy.serve.app" and error_id in r.getMessage()]
    assert logged and "internal detail" in str(logged[0].exc_info[1])
    monkeypatch.undo()
    assert httpx.post(f"{url}/v1/predict", files=_files(images[:1])).status_code == 200
    server_log.clear()  # the error above was logged on purpose


def test_a_full_queue_and_a_slow_model_answer_503(detector: Detector, images: list[Path]):
    held = _Held(detector)
    settings = ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue=1, request_timeout_s=0.5)
    with running(create_app(held.detector(), settings)) as url:
        # One image is in the model, the next waits in the queue (it holds one): a third request is refused.
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/predict", files=_files(images[:1]), timeout=30)
            assert held.entered.wait(10)
            second = pool.submit(httpx.post, f"{url}/v1/predict", files=_files(images[:1]), timeout=30)
            time.sleep(0.2)
            busy = httpx.post(f"{url}/v1/predict", files=_files(images[:1]))
            _error(busy, 503, "busy")
            assert busy.headers["retry-after"] == "1"
            _error(first.result(), 503, "timeout")  # no result within request_timeout_s
            _error(second.result(), 503, "timeout")
        held.release.set()
        time.sleep(0.2)
        ok = httpx.post(f"{url}/v1/predict", files=_files(images[:1]), timeout=30)
        assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------------------------- admission
@pytest.mark.parametrize(
    ("limits", "refused_get", "reason"),
    [
        (ServeSettings(max_requests=1), True, "1 requests at once"),  # any route counts
        (ServeSettings(max_requests=8, max_decoding=1, max_images=1), False, "1 images"),  # a GET brings no images
    ],
    ids=["max_requests", "max_decoding"],
)
def test_requests_beyond_the_limits_are_refused_at_once_before_their_body(
    detector: Detector, images: list[Path], limits: ServeSettings, refused_get: bool, reason: str
):
    held = _Held(detector)
    with running(create_app(held.detector(), limits)) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/predict", files=_files(images[:1]), timeout=30)
        assert held.entered.wait(10)  # one request in flight, its image decoded and in the model
        start = time.monotonic()
        status, headers, body = _exchange(url, _post_head(url, 100_000))  # headers only: the body never comes
        assert time.monotonic() - start < 5
        assert status == 503 and body["error"]["code"] == "busy" and reason in body["error"]["message"], body
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        model = httpx.get(f"{url}/v1/model")
        assert model.status_code == (503 if refused_get else 200), model.text
        for probe in ("/v1/health", "/v1/ready"):  # probes are never refused
            assert httpx.get(f"{url}{probe}").status_code == 200
        held.release.set()
        assert first.result().status_code == 200
        assert httpx.post(f"{url}/v1/predict", files=_files(images[:1])).status_code == 200  # room again
        assert httpx.get(f"{url}/v1/stats").json()["requests"] == 1  # this one


def test_the_request_timeout_covers_reading_the_body(detector: Detector, images: list[Path]):
    settings = ServeSettings(request_timeout_s=1.0)
    with running(create_app(detector, settings)) as url:
        start = time.monotonic()
        good = images[0].read_bytes()
        status, headers, body = _exchange(url, _post_head(url, len(good)), good[:100])  # the rest never comes
        assert status == 503 and body["error"]["code"] == "timeout", body
        assert 0.9 < time.monotonic() - start < 5 and headers["connection"] == "close"
        assert httpx.post(f"{url}/v1/predict", files=_files(images[:1])).status_code == 200
        assert httpx.get(f"{url}/v1/stats").json()["requests"] == 1


def test_the_pixels_of_all_images_of_a_request_are_bounded(detector: Detector, images: list[Path]):
    settings = ServeSettings(max_request_pixels=3000)
    two = [images[0], images[3]]  # 40 x 50 and 20 x 30 pixels: 2600 together
    with running(create_app(detector, settings)) as url:
        assert httpx.post(f"{url}/v1/predict", files=_files(two)).status_code == 200
        calls = httpx.get(f"{url}/v1/stats").json()["model_calls"]
        message = _error(httpx.post(f"{url}/v1/predict", files=_files([*two, images[0]])), 413, "too_many_pixels")
        assert "4600 pixels together" in message and "3000" in message
        assert httpx.get(f"{url}/v1/stats").json()["model_calls"] == calls  # refused before decoding


# ------------------------------------------------------------------------------------- limits and bad input
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(server, images: list[Path], server_log):
    url, app = server
    good = images[0].read_bytes()
    noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG
    unfinished = b"--xyz\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\nabc"

    def chunks():
        for _ in range(30):
            yield b"\0" * 10_000

    post = f"{url}/v1/predict"

    def send(**kwargs):
        return lambda: httpx.post(post, **kwargs)

    def one_file(name: str, data: bytes):
        return send(files=[("files", (name, data))])

    def typed(content_type: str, content):
        return send(content=content, headers={"content-type": content_type})

    image = _files(images[:1])
    cases = [
        ("body over max_upload_bytes", one_file("n.png", _png(noise)), 413, "upload_too_large"),
        ("chunked body over the limit", typed("image/png", chunks()), 413, "upload_too_large"),
        ("too many pixels", one_file("z.png", _png(np.zeros((600, 500, 3), np.uint8))), 413, "too_many_pixels"),
        ("empty file", one_file("e.png", b""), 400, "empty_file"),
        ("empty raw body", typed("image/png", b""), 400, "empty_file"),
        ("text named .png", one_file("t.png", b"hello, not an image"), 400, "undecodable_image"),
        ("truncated PNG", one_file("cut.png", good[: len(good) // 2]), 400, "undecodable_image"),
        ("text/plain body", typed("text/plain", b"hi"), 415, "unsupported_media_type"),
        ("JSON body", send(json={"image": "x"}), 415, "unsupported_media_type"),
        ("no content type", typed("", good), 415, "unsupported_media_type"),
        ("too many images", send(files=_files(images[:1] * 5)), 413, "too_many_images"),
        ("files in another field", send(files=[("image", ("a.png", good))]), 400, "no_images"),
        ("text in the files field", send(data={"files": "a.png"}, files=[("x", ("a", b"1"))]), 400, "no_images"),
        ("unfinished multipart", typed("multipart/form-data; boundary=xyz", unfinished), 400, "no_images"),
        ("multipart without boundary", typed("multipart/form-data", good), 400, "malformed_request"),
        ("threshold not a number", send(files=image, params={"threshold": "abc"}), 422, "invalid_parameter"),
        ("threshold NaN (form)", send(files=image, data={"threshold": "nan"}), 422, "invalid_parameter"),
        ("unknown return value", send(files=image, params={"return": "map,jpeg"}), 422, "invalid_parameter"),
        ("unknown route", lambda: httpx.get(f"{url}/v1/nothing"), 404, "not_found"),
        ("wrong method", lambda: httpx.get(post), 405, "method_not_allowed"),
    ]
    calls_before = app.state.batcher.stats.model_calls
    for name, send, status, code in cases:
        response = send()
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, (name, response.json())
    assert app.state.batcher.stats.model_calls == calls_before  # nothing bad reached the model
    assert "11 x" not in _error(cases[2][1](), 413, "too_many_pixels") and "500 x 600" in _error(
        cases[2][1](), 413, "too_many_pixels"
    )
    assert "t.png" in _error(cases[5][1](), 400, "undecodable_image")
    ok = httpx.post(post, files=_files(images[:2]))
    assert ok.status_code == 200 and len(ok.json()["images"]) == 2
    assert not [r for r in server_log if r.levelno >= logging.ERROR], [r.getMessage() for r in server_log]


def _raw_request(url: str, head: bytes, body: bytes) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(0.2)  # let the server start reading, then vanish mid-upload


def test_a_client_that_disconnects_mid_upload_harms_nothing(server, images: list[Path], server_log):
    url, app = server
    good = images[0].read_bytes()
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    multipart = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    raw = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    for _ in range(3):
        _raw_request(url, multipart, part + good[:200])
        _raw_request(url, raw, good[:200])
    _raw_request(url, multipart[:40], b"")  # cut inside the headers
    time.sleep(0.3)
    ok = httpx.post(f"{url}/v1/predict", files=_files(images[:1]))
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/v1/health").json()["status"] == "ok" and app.state.batcher.alive
    assert not [r for r in server_log if r.levelno >= logging.ERROR], [r.getMessage() for r in server_log]


# ------------------------------------------------------------------------------------------------------ fuzz
FUZZ_REQUESTS = 600


def test_requests_generated_from_the_openapi_schema_never_get_a_5xx(server, server_log):
    """schemathesis generates requests from /openapi.json (valid and invalid parameters and bodies: multipart forms,
    raw images of every declared type); each must be answered within 10 s, without a 5xx, and every 4xx in the
    error shape."""
    schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs the test extra")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    requests = pytest.importorskip("requests")
    url, app = server
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/predict"), ("GET", "/v1/ready")}
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in modes])
    answered: dict[int, int] = {}
    session = requests.Session()

    @given(case=cases)
    @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def call(case) -> None:
        response = case.call(base_url=url, session=session, timeout=10)  # a hang raises a timeout
        answered[response.status_code] = answered.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:300], case.as_curl_command())
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], body

    call()
    assert sum(answered.values()) >= 500 and answered.get(200, 0) > 10, answered  # some images were scored too
    assert app.state.batcher.alive
    assert not [r for r in server_log if r.levelno >= logging.ERROR], [r.getMessage() for r in server_log]


# ---------------------------------------------------------------------------------------------------- access
def test_token_rules(detector: Detector, images: list[Path]):
    settings = ServeSettings(token="s3cret")
    with running(create_app(detector, settings)) as url:
        assert httpx.get(f"{url}/v1/health").json()["auth"] is True  # health never needs the token
        assert httpx.get(f"{url}/").status_code == 200  # the page asks for the token itself
        for method, path in (("GET", "/v1/model"), ("GET", "/v1/stats"), ("POST", "/v1/predict")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                files = _files(images[:1]) if method == "POST" else None
                response = httpx.request(method, f"{url}{path}", headers=headers, files=files)
                _error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v1/model", headers=good).status_code == 200
        response = httpx.post(f"{url}/v1/predict", headers=good, files=_files(images[:1]))
        assert response.status_code == 200 and response.json()["images"][0]["score"] is not None


def test_a_foreign_host_and_cross_site_posts_are_refused(server, images: list[Path]):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    evil = {"Host": f"evil.example:{port}"}
    for method, path in (("GET", "/v1/model"), ("GET", "/"), ("GET", "/openapi.json"), ("POST", "/v1/predict")):
        files = _files(images[:1]) if method == "POST" else None
        message = _error(httpx.request(method, f"{url}{path}", headers=evil, files=files), 403, "host_not_allowed")
        assert "evil.example" in message
    assert httpx.get(f"{url}/v1/health", headers=evil).status_code == 200  # probes answer any Host
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/v1/model", headers={"Host": host}).status_code == 200, host

    def post(origin: str | None) -> httpx.Response:
        return httpx.post(f"{url}/v1/predict", files=_files(images[:1]), headers={"Origin": origin} if origin else {})

    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"http://127.0.0.1:{int(port) + 1}"):
        assert "refused" in _error(post(origin), 403, "origin_not_allowed"), origin
    for origin in (None, f"http://127.0.0.1:{port}"):  # no Origin (curl, scripts); the server's own page
        assert post(origin).status_code == 200, origin
    assert httpx.get(f"{url}/v1/model", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: CORS


def test_allowed_hosts_admit_their_names(detector: Detector, images: list[Path]):
    settings = ServeSettings(allowed_hosts=("Cam-Line-3.local",))
    with running(create_app(detector, settings)) as url:
        port = url.rsplit(":", 1)[1]
        named = {"Host": f"cam-line-3.local:{port}", "Origin": f"http://cam-line-3.local:{port}"}
        assert httpx.post(f"{url}/v1/predict", files=_files(images[:1]), headers=named).status_code == 200
        _error(httpx.get(f"{url}/v1/model", headers={"Host": "other.local"}), 403, "host_not_allowed")
    with running(create_app(detector, ServeSettings(token="s3cret", allowed_hosts=("*",)))) as url:
        auth = {"Authorization": "Bearer s3cret", "Host": "192.168.7.7:8000"}  # any name, with the token
        assert httpx.get(f"{url}/v1/model", headers=auth).status_code == 200
    with pytest.raises(ConfigError, match="DNS rebinding"):
        ServeSettings(allowed_hosts=("*",))  # any Host without a token
    assert bound_names("127.0.0.1") == () and bound_names("0.0.0.0") == () and bound_names("[::]") == ()
    assert bound_names("192.168.1.10") == ("192.168.1.10",) and bound_names("Line-PC") == ("line-pc",)


def test_ready_after_the_start_up_self_test(detector: Detector, images: list[Path], server_log):
    from starlette.testclient import TestClient

    app = create_app(detector, LIMITS)
    before = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: the self-test has not run
    assert before.get("/v1/ready").status_code == 503 and "starting" in before.get("/v1/ready").json()["reason"]
    with running(app) as url:
        assert httpx.get(f"{url}/v1/ready").json() == {"status": "ready"}
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["model_calls"] == 1 and stats["images"] == 1  # the self-test went through the batcher

    def broken(batch):
        raise RuntimeError("the engine cannot run (simulated)")

    with running(create_app(Detector(_Backend(detector.backend, broken), THRESHOLDS), LIMITS)) as url:
        response = httpx.get(f"{url}/v1/ready")
        assert response.status_code == 503 and response.json()["status"] == "not_ready"
        reason = response.json()["reason"]
        assert "self-test" in reason and "simulated" not in reason
        assert httpx.get(f"{url}/v1/health").json()["status"] == "ok"  # alive, not ready
        _error(httpx.post(f"{url}/v1/predict", files=_files(images[:1])), 503, "model_error")
    error_id = reason.partition("(id ")[2].rstrip(")")
    assert any(error_id in r.getMessage() for r in server_log if r.name == "cnc_ad.deploy.serve.app")
    server_log.clear()


def test_binding_beyond_loopback_needs_a_token_or_insecure(tiny_checkpoint: Path, capsys, monkeypatch):
    for host in ("127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
        check_access(host, None, insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="token"):
            check_access(host, None, insecure=False)
        check_access(host, "s3cret", insecure=False)
        check_access(host, None, insecure=True)
    monkeypatch.delenv("CNC_SERVE_TOKEN", raising=False)
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token" in err and "--insecure" in err and "CNC_SERVE_TOKEN" in err
    with pytest.raises(ConfigError, match="empty"):
        ServeSettings(token=" ")


def test_cli_hands_its_limits_and_hosts_to_the_server(tiny_checkpoint: Path, capsys, monkeypatch, tmp_path: Path):
    monkeypatch.delenv("CNC_SERVE_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # the default decision log is ./decisions
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--allow-host", "*"]) == 2
    err = capsys.readouterr().err
    assert "--allow-host '*'" in err and "--token TOKEN" in err and "DNS rebinding" in err
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    argv = ["serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--max-requests", "8"]
    argv += ["--max-decoding", "40", "--request-timeout", "9.5", "--allow-host", "Line-PC", "--api-docs"]
    assert main([*argv, "--host", "192.168.3.4", "--insecure"]) == 0
    app, kwargs = calls[0]
    assert kwargs["limit_concurrency"] == 4 * 8 + 16 and kwargs["timeout_graceful_shutdown"] == 11
    settings = app.state.settings
    assert (settings.max_requests, settings.max_decoding, settings.request_timeout_s) == (8, 40, 9.5)
    assert settings.allowed_hosts == ("192.168.3.4", "line-pc") and settings.api_docs
    assert "host names: loopback, 192.168.3.4, line-pc" in capsys.readouterr().out


@contextlib.contextmanager
def cli_server(model: Path, *options: str, token: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m cnc_ad serve --model MODEL`` on a free port in a subprocess, once it answers ``/v1/ready``; yields
    its URL and process (ended with SIGINT on the way out, if it still runs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CNC_SERVE_TOKEN", None)
    env.update({"CNC_SERVE_TOKEN": token} if token else {})
    command = [sys.executable, "-m", "cnc_ad", "serve", "--model", str(model), "--port", str(port), *options]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/ready").status_code == 200:
                    break
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=30)
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_cli_serves_until_interrupted(tiny_checkpoint: Path, images: list[Path]):
    with cli_server(tiny_checkpoint, "--device", "cpu", "--no-decisions", token="t0ken") as (url, process):
        auth = {"Authorization": "Bearer t0ken"}
        assert httpx.post(f"{url}/v1/predict", files=_files(images[:1])).status_code == 401  # the env token counts
        assert httpx.post(f"{url}/v1/predict", files=_files(images[:1]), headers=auth).status_code == 200
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{url.rsplit(':', 1)[1]}/" in output and "token required" in output


def test_sigterm_lets_the_request_in_flight_finish(tiny_checkpoint: Path, images: list[Path], tmp_path: Path):
    pytest.importorskip("onnxruntime", reason="served as ONNX: a server without torch starts in seconds (test extra)")
    from cnc_ad.checkpoint import load_model
    from cnc_ad.deploy.export import export_onnx

    graph = export_onnx(load_model(tiny_checkpoint, pretrained=False), tmp_path / "tiny.onnx")
    decisions = tmp_path / "decisions"
    with cli_server(graph, "--allow-host", "line-pc.local", "--decisions", str(decisions)) as (url, process):
        port = url.rsplit(":", 1)[1]
        named = {"Host": f"line-pc.local:{port}"}
        assert httpx.get(f"{url}/v1/model", headers=named).status_code == 200  # --allow-host admits the name
        _error(httpx.get(f"{url}/v1/model", headers={"Host": "other.local"}), 403, "host_not_allowed")
        assert httpx.get(f"{url}/docs").status_code == 404
        body, halfway, go_on = images[0].read_bytes(), threading.Event(), threading.Event()

        def slow_body() -> Iterator[bytes]:  # the upload is in flight when SIGTERM arrives
            yield body[:100]
            halfway.set()
            go_on.wait(30)
            yield body[100:]

        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(httpx.post, f"{url}/v1/predict", content=slow_body(),
                               headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
            assert halfway.wait(30)
            time.sleep(0.5)  # the server has the headers and the first bytes
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert process.poll() is None  # still draining
            go_on.set()
            response = sent.result()
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["score"] is not None
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert "host names: loopback, line-pc.local" in output and "stopped by SIGTERM" in output
    assert f"decisions logged in {decisions}" in output and len(read_jsonl(decisions / "decisions.jsonl")) == 1


# ------------------------------------------------------------------------------------------------------- page
def test_page_is_self_contained(server):
    url, _ = server
    response = httpx.get(f"{url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    text = response.text
    assert "/v1/predict" in text and "/v1/model" in text and 'type="file"' in text and 'type="range"' in text
    assert "http://" not in text and "https://" not in text and "@import" not in text  # no CDN, no external fetch
    assert "<script src" not in text and "<link" not in text


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client (the test extra)

        self.socket = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:  # the page may still be loading: an error counts as "not yet"
            value = self.evaluate(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for: {expression}"
            time.sleep(0.1)


@contextlib.contextmanager
def chromium_page(profile: Path) -> Iterator[DevTools]:
    """Headless Chromium with remote debugging on a free port; yields a DevTools client on its first page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    pytest.importorskip("websocket", reason="the browser test drives Chromium with websocket-client (test extra)")
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1300,1000",
        f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        "about:blank",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "Chromium did not open its debugging port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        try:
            yield tools
        finally:
            tools.socket.close()
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.browser
def test_page_scores_an_upload_in_headless_chromium(detector: Detector, tmp_path: Path):
    # A synthetic part with a defect: a grey textured square with a dark scratch.
    rng = np.random.default_rng(3)
    part = (rng.normal(150, 8, (96, 80, 3))).clip(0, 255).astype(np.uint8)
    part[40:46, 10:70] = 20
    defect = tmp_path / "defect.png"
    Image.fromarray(part).save(defect)
    score = float(detector.predict(str(defect)).scores[0])
    thresholds = {"image": {"__all__": score - 0.01}, "pixel": {"__all__": score * 0.9}}
    app = create_app(Detector(detector.backend, thresholds), LIMITS)

    with running(app) as url, chromium_page(tmp_path / "profile") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{url}/")
        page.wait_for("document.getElementById('status').textContent.startsWith('Ready')")
        slider = page.evaluate("Number(document.getElementById('threshold').value)")
        assert slider == pytest.approx(score - 0.01, abs=1e-3)
        assert "all categories" in page.evaluate("document.getElementById('thresholds').textContent")
        assert "tiny" in page.evaluate("document.getElementById('model-info').textContent")

        root = page.call("DOM.getDocument")["root"]["nodeId"]
        node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        page.call("DOM.setFileInputFiles", files=[str(defect)], nodeId=node)
        card = page.wait_for(
            """(() => { const c = document.querySelector('.card'); const o = c && c.querySelector('img.overlay');
                 const m = c && c.querySelector('canvas.mask');
                 return c && o.complete && o.naturalWidth > 0 && c.dataset.mask === 'drawn' && {
                   verdict: c.dataset.verdict, text: c.querySelector('.verdict').textContent,
                   score: Number(c.querySelector('.score').textContent), overlay: [o.naturalWidth, o.naturalHeight],
                   mask: [m.width, m.height], requests: window.cncState.requests }; })()"""
        )
        assert card["verdict"] == "anomalous" and card["text"] == "anomalous", card
        assert card["score"] == pytest.approx(score, abs=1e-4)
        assert card["overlay"] == [80, 96] and card["mask"] == [80, 96]
        white = page.evaluate(
            """(() => { const m = document.querySelector('canvas.mask');
                 const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
                 let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 127; return n; })()"""
        )
        # Moving the slider above the score re-decides on the page, without a new request.
        page.evaluate(
            f"""(() => {{ const s = document.getElementById('threshold'); s.max = {score * 4}; s.value = {score + 0.01};
                  s.dispatchEvent(new Event('input')); }})()"""
        )
        after = page.evaluate(
            "({verdict: document.querySelector('.card').dataset.verdict, requests: window.cncState.requests})"
        )
        assert after == {"verdict": "normal", "requests": card["requests"]}
        # The pixel-threshold slider redraws the mask from the returned map: at 0 every pixel is anomalous.
        page.evaluate(
            """(() => { const s = document.getElementById('pixel-threshold'); s.value = 0;
                 s.dispatchEvent(new Event('input')); })()"""
        )
        everything = page.evaluate(
            """(() => { const m = document.querySelector('canvas.mask');
                 const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
                 let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 127; return n; })()"""
        )
        assert everything == 80 * 96 and white < everything
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "page.png").write_bytes(shot)
        pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
        assert pixels.std() > 20  # a drawn page, not a blank one

    # With a token, the page asks for it before anything else.
    with running(create_app(detector, ServeSettings(token="s3cret"))) as url, chromium_page(tmp_path / "p2") as page:
        page.call("Page.navigate", url=f"{url}/")
        page.wait_for("document.getElementById('status').textContent.includes('token')")
        assert page.evaluate("!document.getElementById('token-box').classList.contains('hidden')")
        page.evaluate(
            "document.getElementById('token').value = 's3cret'; document.getElementById('token-save').click()"
        )
        page.wait_for("document.getElementById('status').textContent.startsWith('Ready')")
