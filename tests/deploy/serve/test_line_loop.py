"""The line loop through a real server: decisions recorded, an operator's corrections, thresholds set again from the
parts confirmed good (`cnc calibrate --from-feedback`) and reloaded without a restart, the next decision made (and
recorded) with them; the same loop on the web page in headless Chromium; the CLI's decision log options."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="cnc serve needs the serve extra: pip install -e '.[serve]'")

from cnc_ad import Detector  # noqa: E402
from cnc_ad.deploy.decisions import DecisionLog, read_decisions, read_feedback  # noqa: E402
from cnc_ad.deploy.serve.app import create_app  # noqa: E402
from cnc_ad.deploy.serve.settings import ServeSettings  # noqa: E402
from cnc_ad.files import read_jsonl  # noqa: E402
from cnc_ad.thresholds import load_thresholds  # noqa: E402
from tests.deploy.serve.test_app import chromium_page, running  # noqa: E402
from tests.helpers import run_cli, save_tiny_checkpoint  # noqa: E402

RULE = "false_alarm_rate=0.01;max+margin"
TOKEN = "l1ne-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _parts(folder: Path, count: int = 6) -> list[Path]:
    """Synthetic parts: a grey texture, some with a dark scratch."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        rng = np.random.default_rng(k)
        part = rng.normal(150, 8 + 6 * k, (64, 56, 3)).clip(0, 255).astype(np.uint8)
        if k % 2:
            part[20 + k : 24 + k, 8:48] = 20
        path = folder / f"part{k}.png"
        Image.fromarray(part).save(path)
        paths.append(path)
    return paths


def _line(tmp_path: Path, *, with_category: bool = True) -> tuple[Path, Path, Path, float]:
    """A checkpoint whose stored thresholds (set on 10 good images, as training does) call one part a (false) alarm and
    pass another: returns the checkpoint, the alarmed part, the passed part, and the threshold between them."""
    parts = _parts(tmp_path / "parts")
    bare = save_tiny_checkpoint(tmp_path / "ckpt")
    scores = Detector.load(bare, device="cpu").predict([str(p) for p in parts]).scores
    alarmed, passed = parts[int(np.argmax(scores))], parts[int(np.argmin(scores))]
    threshold = float((scores.max() + scores.min()) / 2)
    categories = ["__all__", "brick"] if with_category else ["__all__"]
    stored = {
        "image": {c: threshold for c in categories},
        "pixel": {c: threshold for c in categories},
        "basis": {kind: {c: {"rule": RULE, "images": 10} for c in categories} for kind in ("image", "pixel")},
    }
    (bare / "thresholds.json").write_text(json.dumps(stored))
    return bare, alarmed, passed, threshold


def _predict(url: str, part: Path, **params: str) -> dict:
    response = httpx.post(f"{url}/v1/predict", files=[("files", (part.name, part.read_bytes(), "image/png"))],
                          params=params, headers=AUTH, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_the_loop_through_the_server(tmp_path: Path) -> None:
    checkpoint, alarmed, passed, old_threshold = _line(tmp_path)
    folder = tmp_path / "decisions"
    detector = Detector.load(checkpoint, device="cpu")
    old_digest = detector.thresholds.digest()
    heard: list[str] = []
    log = DecisionLog(folder, source="serve", model=detector.model_id, keep="anomalous")
    log.subscribe(lambda decision: heard.append(decision.id))
    with log, running(create_app(detector, ServeSettings(token=TOKEN), log)) as url:
        # 1. Every decision is on record before its answer: the alarm keeps its image and heatmap, the pass does not.
        alarm = _predict(url, alarmed, category="brick")
        ok = _predict(url, passed, category="brick")
        assert (alarm["is_anomalous"], ok["is_anomalous"]) == (True, False)
        assert alarm["threshold"] == pytest.approx(old_threshold) and alarm["threshold_rule"] == RULE
        assert alarm["threshold_images"] == 10 and alarm["threshold_source"] == "category"
        records = list(read_decisions(folder))
        assert [r.id for r in records] == [alarm["id"], ok["id"]] == heard
        first = records[0]
        assert first.source == "serve" and first.model == detector.model_id and first.category == "brick"
        assert first.thresholds_digest == old_digest and first.threshold_rule == RULE and first.threshold_images == 10
        assert first.score == pytest.approx(alarm["score"]) and first.verdict == "anomalous"
        assert first.name == alarmed.name and (first.width, first.height) == (56, 64)
        listed = httpx.get(f"{url}/v1/decisions", params={"limit": 5}, headers=AUTH).json()["decisions"]
        assert [d["id"] for d in listed] == [ok["id"], alarm["id"]]  # newest first
        image = httpx.get(f"{url}/v1/decisions/{alarm['id']}/image", headers=AUTH)
        assert image.status_code == 200 and image.content == alarmed.read_bytes()
        overlay = httpx.get(f"{url}/v1/decisions/{alarm['id']}/overlay", headers=AUTH)
        assert overlay.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(overlay.content)).size == (56, 64)
        assert httpx.get(f"{url}/v1/decisions/{ok['id']}/image", headers=AUTH).json()["error"]["code"] == "not_kept"
        assert httpx.get(f"{url}/v1/decisions").status_code == 401

        # 2. Two corrections: a false alarm and a missed defect (token-protected; unknown ids and labels refused).
        post = lambda body, headers=AUTH: httpx.post(f"{url}/v1/feedback", json=body, headers=headers)  # noqa: E731
        assert post({"id": alarm["id"], "label": "good"}, {}).status_code == 401
        good = post({"id": alarm["id"], "label": "good", "note": "a reflection, not a scratch"})
        assert good.status_code == 200 and good.json()["correction"] == "false_alarm"
        defect = post({"id": ok["id"], "label": "defect"})
        assert defect.status_code == 200 and defect.json()["correction"] == "missed_defect"
        unknown = post({"id": "0" * 32, "label": "good"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_decision"
        assert post({"id": ok["id"], "label": "fine"}).status_code == 422
        assert {k: f.label for k, f in read_feedback(folder).items()} == {alarm["id"]: "good", ok["id"]: "defect"}

        # 3. Thresholds set again from the part confirmed good; the part confirmed defective is checked against them.
        done = run_cli("calibrate", "--model", checkpoint, "--from-feedback", folder, "--category", "brick",
                       "--min-images", "1", "--device", "cpu", "--num-workers", "0", "--json")  # fmt: skip
        assert done.code == 0, done.err
        summary = json.loads(done.out)
        brick = summary["categories"]["brick"]
        assert brick["images"] == 1 and brick["image_rule"] == RULE and brick["image_threshold"] > alarm["score"]
        new_threshold = brick["image_threshold"]
        feedback = summary["feedback"]
        assert feedback["good_images"] == 1 and feedback["defects_flagged"] == 0
        (missed,) = feedback["defects"]
        assert missed["id"] == ok["id"] and missed["score"] == pytest.approx(ok["score"], abs=1e-5)
        assert missed["threshold"] == pytest.approx(new_threshold) and missed["flagged"] is False
        assert load_thresholds(checkpoint).image["brick"].value == pytest.approx(new_threshold)
        assert _predict(url, alarmed, category="brick")["threshold"] == pytest.approx(old_threshold)  # not yet

        # 4. Reloaded without a restart (token-protected).
        assert httpx.post(f"{url}/v1/reload").status_code == 401
        reloaded = httpx.post(f"{url}/v1/reload", headers=AUTH).json()
        assert reloaded["reloaded"] is True and reloaded["thresholds_file"] == str(checkpoint / "thresholds.json")
        assert reloaded["thresholds"]["image"]["brick"] == pytest.approx(new_threshold)
        assert reloaded["threshold_basis"]["image"]["brick"] == {"rule": RULE, "images": 1}
        model = httpx.get(f"{url}/v1/model", headers=AUTH).json()
        assert model["threshold_basis"]["image"]["brick"]["images"] == 1
        assert model["thresholds_digest"] == reloaded["thresholds_digest"] != old_digest

        # 5. The next decision is made, and recorded, with the new thresholds.
        again = _predict(url, alarmed, category="brick")
        assert again["is_anomalous"] is False and again["threshold"] == pytest.approx(new_threshold)
        assert again["threshold_images"] == 1 and again["threshold_rule"] == RULE
        last = list(read_decisions(folder))[-1]
        assert last.id == again["id"] and last.thresholds_digest == reloaded["thresholds_digest"]
        assert last.threshold == pytest.approx(new_threshold) and last.verdict == "ok"
        assert httpx.post(f"{url}/v1/reload", headers=AUTH).json()["reloaded"] is False  # nothing new


def test_calibrating_from_feedback_needs_the_kept_images(tmp_path: Path) -> None:
    checkpoint, alarmed, passed, _ = _line(tmp_path)
    detector = Detector.load(checkpoint, device="cpu")
    folder = tmp_path / "decisions"
    argv = ["calibrate", "--model", checkpoint, "--from-feedback", folder, "--min-images", "1", "--device", "cpu"]
    before = (checkpoint / "thresholds.json").read_text()
    with DecisionLog(folder, source="serve", model=detector.model_id, keep="none") as log:
        for part in (alarmed, passed):
            (outcome,) = detector.results([part])
            log.record(outcome.result, detector.choose_thresholds(), name=part.name, image=part.read_bytes())
        assert run_cli(*argv).code == 3  # nothing confirmed good yet
        first, _ = (d.id for d in read_decisions(folder))
        log.add_feedback(first, "good")
        done = run_cli(*argv)
    assert done.code == 3 and done.err.count("\n") == 1, done.err
    assert "no kept image" in done.err and "--keep anomalous" in done.err and "--keep none" in done.err
    assert json.loads(run_cli(*argv, "--json").out)["ok"] is False
    assert (checkpoint / "thresholds.json").read_text() == before  # nothing stored


def test_cli_serve_opens_the_decision_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(app))
    monkeypatch.chdir(tmp_path)
    base = ["serve", "--checkpoint", checkpoint, "--device", "cpu"]
    assert run_cli(*base).code == 0  # default: ./decisions, keep anomalous
    log = calls[-1].state.decisions
    assert log.folder == Path("decisions") and log.keep == "anomalous" and log.max_bytes == 1024 * 2**20
    assert log.model == Detector.load(checkpoint, device="cpu").model_id
    assert run_cli(*base, "--decisions", tmp_path / "d2", "--keep", "all", "--log-max-mb", "5").code == 0
    log = calls[-1].state.decisions
    assert (log.folder, log.keep, log.max_bytes) == (tmp_path / "d2", "all", 5 * 2**20)
    assert run_cli(*base, "--no-decisions").code == 0 and calls[-1].state.decisions is None
    assert log._lock_fd is None  # released when the server stopped


def test_cli_predict_records_each_decision(tmp_path: Path) -> None:
    checkpoint, alarmed, passed, threshold = _line(tmp_path)
    folder, out = tmp_path / "decisions", tmp_path / "out"
    argv = ["predict", "--model", checkpoint, alarmed, passed, "--out", out, "--device", "cpu", "--no-progress"]
    assert run_cli(*argv, "--decisions", folder, "--keep", "all").code == 0
    predictions = {Path(r["path"]).name: r for r in read_jsonl(out / "predictions.jsonl")}
    decisions = {Path(d.name).name: d for d in read_decisions(folder)}
    assert set(decisions) == {alarmed.name, passed.name}
    for name, decision in decisions.items():
        assert predictions[name]["decision"] == decision.id and decision.source == "predict"
        assert decision.threshold == pytest.approx(threshold) and decision.threshold_rule == RULE
        assert decision.score == pytest.approx(predictions[name]["score"])
        assert (folder / decision.image).read_bytes() == (alarmed if name == alarmed.name else passed).read_bytes()
        kept = np.asarray(Image.open(folder / decision.overlay), int)  # JPEG of the overlay predict wrote as PNG
        written = np.asarray(Image.open(out / predictions[name]["overlay"]), int)
        assert kept.shape == written.shape and np.abs(kept - written).mean() < 16  # JPEG on noise
    plain = ["predict", "--model", checkpoint, alarmed, "--out", tmp_path / "plain", "--device", "cpu", "--no-progress"]
    assert run_cli(*plain).code == 0  # without --decisions: no log, as before
    assert "decision" not in read_jsonl(tmp_path / "plain" / "predictions.jsonl")[0]


@pytest.mark.browser
def test_the_page_closes_the_loop_in_headless_chromium(tmp_path: Path) -> None:
    checkpoint, alarmed, _, old_threshold = _line(tmp_path, with_category=False)
    folder = tmp_path / "decisions"
    detector = Detector.load(checkpoint, device="cpu")
    log = DecisionLog(folder, source="serve", model=detector.model_id, keep="anomalous")
    with log, running(create_app(detector, ServeSettings(), log)) as url, chromium_page(tmp_path / "p") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{url}/")
        page.wait_for("document.getElementById('status').textContent.startsWith('Ready')")
        table = page.evaluate("document.getElementById('thresholds').textContent")
        assert RULE in table and "F1-max" not in page.evaluate("document.body.textContent")
        assert (
            page.evaluate("document.querySelector('#thresholds tr[data-category=__all__] .images').textContent") == "10"
        )

        def upload() -> None:
            root = page.call("DOM.getDocument")["root"]["nodeId"]
            node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            page.call("DOM.setFileInputFiles", files=[str(alarmed)], nodeId=node)

        # Score a part: a (false) alarm, in the history with its heatmap.
        upload()
        page.wait_for(
            "document.querySelector('.card') && document.querySelector('.card').dataset.verdict === 'anomalous'"
        )
        assert page.wait_for("(() => { const i = document.querySelector('#history img'); "
                             "return i && i.complete && i.naturalWidth === 56; })()")  # fmt: skip
        assert RULE in page.evaluate("document.querySelector('.card .rule').textContent")

        # Mark it a false alarm: the correction is on record, and shown.
        page.evaluate("document.querySelector('.card .mark-good').click()")
        page.wait_for("document.querySelector('.card').dataset.feedback === 'good'")
        assert "false alarm" in page.evaluate("document.querySelector('.card .marked').textContent")
        page.wait_for("document.querySelector('#history .correction').textContent.includes('false alarm')")
        (given,) = read_feedback(folder).values()
        assert given.label == "good" and given.correction == "false_alarm"

        # Thresholds set again from it; the page reloads them and shows the new one, with its rule and image count.
        done = run_cli("calibrate", "--model", checkpoint, "--from-feedback", folder, "--min-images", "1",
                       "--device", "cpu", "--num-workers", "0", "--json")  # fmt: skip
        assert done.code == 0, done.err
        new_threshold = json.loads(done.out)["categories"]["__all__"]["image_threshold"]
        assert new_threshold > old_threshold
        page.evaluate("document.getElementById('reload').click()")
        page.wait_for("document.getElementById('status').textContent.startsWith('Thresholds reloaded')")
        shown = page.evaluate(
            "Number(document.querySelector('#thresholds tr[data-category=__all__] .image').textContent)"
        )
        assert shown == pytest.approx(new_threshold, abs=1e-4)
        assert (
            page.evaluate("document.querySelector('#thresholds tr[data-category=__all__] .images').textContent") == "1"
        )
        assert page.evaluate("Number(document.getElementById('threshold').value)") == pytest.approx(new_threshold)

        # The same part again: the server passes it, by the new threshold.
        upload()
        page.wait_for("document.querySelectorAll('.card').length === 2")
        card = page.evaluate("""(() => { const c = document.querySelector('.card');
            return {verdict: c.dataset.verdict, rule: c.querySelector('.rule').textContent}; })()""")
        assert card["verdict"] == "normal" and "on 1 images" in card["rule"], card
        top = page.evaluate("Number(document.querySelector('#history tr[data-id] .threshold').textContent)")
        assert top == pytest.approx(new_threshold, abs=1e-4)
    last = list(read_decisions(folder))[-1]
    assert last.verdict == "ok" and last.threshold == pytest.approx(new_threshold) and last.threshold_images == 1


def test_a_decision_that_cannot_be_recorded_is_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint, alarmed, _, threshold = _line(tmp_path)
    detector = Detector.load(checkpoint, device="cpu")
    with DecisionLog(tmp_path / "decisions", source="serve") as log, running(create_app(detector, None, log)) as url:

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device", str(tmp_path / "decisions" / "decisions.jsonl"))

        monkeypatch.setattr(log, "record", full)
        response = httpx.post(f"{url}/v1/predict", files=[("files", (alarmed.name, alarmed.read_bytes(), "image/png"))])
        assert response.status_code == 503 and response.json()["error"]["code"] == "decision_log_failed"
        message = response.json()["error"]["message"]
        assert "server log (id " in message and "No space" not in message and "score" not in response.text
        monkeypatch.undo()

        # An unreadable thresholds file is refused by /v1/reload; the thresholds in use stay.
        (checkpoint / "thresholds.json").write_text("{cut short")
        refused = httpx.post(f"{url}/v1/reload")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "thresholds_unreadable"
        assert _predict(url, alarmed)["threshold"] == pytest.approx(threshold)
    with running(create_app(Detector(detector.backend, {"image": {"__all__": 0.5}, "pixel": {}}))) as url:
        none = httpx.post(f"{url}/v1/reload")
        assert none.status_code == 409 and none.json()["error"]["code"] == "no_thresholds_file"
        assert httpx.get(f"{url}/v1/decisions").json()["error"]["code"] == "no_decision_log"
        result = httpx.post(f"{url}/v1/predict", files=[("files", (alarmed.name, alarmed.read_bytes(), "image/png"))])
        assert result.json()["images"][0]["id"] is None  # no log: no id
