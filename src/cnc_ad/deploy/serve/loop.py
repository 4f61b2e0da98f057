"""The line loop's routes: the decisions the server made (``GET /v1/decisions``, their kept images and overlays), the
corrections operators post (``POST /v1/feedback``) and new thresholds without a restart (``POST /v1/reload``).

The decisions and corrections are :class:`~cnc_ad.deploy.decisions.DecisionLog`'s; the thresholds are re-read by
:meth:`cnc_ad.deploy.Detector.reload_thresholds` from the file they came from (after ``cnc calibrate
--from-feedback``, for one), so every decision from then on is made, and recorded, with them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParameter
from fastapi.params import Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cnc_ad.deploy.decisions import RECENT, VERDICTS, DecisionLog, UnknownDecision, decision_json
from cnc_ad.deploy.detector import Detector
from cnc_ad.deploy.serve.errors import APIError
from cnc_ad.deploy.serve.render import describe_thresholds
from cnc_ad.errors import ConfigError, DataError

MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff",
               ".webp": "image/webp"}  # fmt: skip
ID_PATTERN = "^[0-9a-f]{32}$"
NOTE_CHARS = 1000


class FeedbackBody(BaseModel):
    """An operator's correction of one decision."""

    id: str = Field(max_length=64, description="the decision's id: the `id` of a /v1/predict result")
    label: Literal["good", "defect"] = Field(description="good: the part is good; defect: it is defective")
    note: str | None = Field(None, max_length=NOTE_CHARS, description="free text, e.g. what the operator saw")


class LineLoop:
    """The routes that close the loop between the server's decisions and its thresholds.

    Args:
        detector: the model and the thresholds it decides by.
        decisions: the server's decision log, or None (its routes then answer 404 ``no_decision_log``).
    """

    def __init__(self, detector: Detector, decisions: DecisionLog | None) -> None:
        self.detector = detector
        self.decisions = decisions

    def router(self, dependencies: list[Depends]) -> APIRouter:
        """The routes, each behind ``dependencies`` (the token check)."""
        router = APIRouter(dependencies=dependencies)
        router.add_api_route(
            "/v1/decisions", self.newest, methods=["GET"], summary="The newest decisions, with their corrections"
        )
        router.add_api_route(
            "/v1/decisions/{decision_id}/{kind}",
            self.kept_file,
            methods=["GET"],
            summary="A decision's kept image (as received) or heatmap overlay (JPEG)",
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
        )
        router.add_api_route(
            "/v1/feedback", self.feedback, methods=["POST"], summary="Correct a decision: the part is good or defective"
        )
        router.add_api_route(
            "/v1/reload", self.reload, methods=["POST"], summary="Re-read the thresholds from their file, no restart"
        )
        return router

    def _log(self) -> DecisionLog:
        if self.decisions is None:
            raise APIError(404, "no_decision_log", "this server keeps no decision log; start it with one")
        return self.decisions

    async def newest(
        self,
        limit: int = Query(20, ge=1, le=RECENT, description="how many, newest first"),
        category: str | None = Query(None, description="only decisions for this category"),
        verdict: str | None = Query(None, description=f"only this verdict: {', '.join(VERDICTS)}"),
    ) -> dict[str, Any]:
        if verdict is not None and verdict not in VERDICTS:
            raise APIError(422, "invalid_parameter", f"verdict must be one of {', '.join(VERDICTS)}")
        found = self._log().recent(limit, category=category, verdict=verdict)
        return {"decisions": [decision_json(decision, feedback) for decision, feedback in found]}

    async def kept_file(
        self,
        decision_id: str = PathParameter(pattern=ID_PATTERN, description="the decision's id"),
        kind: Literal["image", "overlay"] = PathParameter(description="image (as received) or overlay (JPEG)"),
    ) -> Response:
        path = await run_in_threadpool(self._log().kept_file, decision_id, kind)
        if path is None:
            raise APIError(404, "not_kept", f"no kept {kind} for decision {decision_id}: unknown, not kept, or removed")
        data = await run_in_threadpool(path.read_bytes)
        media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return Response(data, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    async def feedback(self, body: FeedbackBody) -> dict[str, Any]:
        log = self._log()
        try:
            given = await run_in_threadpool(log.add_feedback, body.id, body.label, body.note)
        except UnknownDecision:
            raise APIError(404, "unknown_decision", f"no decision {body.id[:40]!r} in this server's log") from None
        return {**given.to_json(), "correction": given.correction}

    async def reload(self) -> dict[str, Any]:
        try:
            changed = await run_in_threadpool(self.detector.reload_thresholds)
        except ConfigError as err:
            raise APIError(409, "no_thresholds_file", str(err)) from None
        except DataError as err:
            raise APIError(409, "thresholds_unreadable", f"{err}; the thresholds in use stay") from None
        source = self.detector.thresholds_source
        return {
            "reloaded": changed,
            "thresholds_file": None if source is None else str(source),
            **describe_thresholds(self.detector.thresholds),
        }
