"""Errors the daemon answers with: each becomes a 4xx/5xx JSON body.

    ApiError
    ├── BadRequest        400  malformed body, envelope or field
    ├── Unauthorized      401  missing or wrong token
    ├── Forbidden         403  an agent asks for what belongs to a job it does not work for
    ├── NotFound          404  unknown job or agent
    ├── Conflict          409  the job is finished, or its id is taken
    │   └── VersionMismatch 409  an agent of a Burla version this daemon cannot work with
    ├── TooLarge          413  a function or input over the configured limits
    └── Unsatisfiable     422  no node could ever run the job

The body is ``{"error": {"code": ..., "message": ...}}``; the client maps the
code back to its own error class.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class VersionMismatch(Conflict):
    code = "version_mismatch"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class Unsatisfiable(ApiError):
    status = 422
    code = "unsatisfiable"
