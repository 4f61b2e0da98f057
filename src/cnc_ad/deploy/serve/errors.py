"""The server's error: an HTTP status, a stable machine-readable code and a message that says what to change.

Every error response has the body ``{"error": {"code": CODE, "message": MESSAGE}}``.
"""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses or cannot answer.

    Args:
        status: the HTTP status code (4xx: the request is at fault; 503: try again later).
        code: a stable snake_case name of the problem (``upload_too_large``, ``undecodable_image`` ...).
        message: what is wrong and what to change, on one line.
        headers: extra response headers (``WWW-Authenticate``, ``Retry-After``).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}
