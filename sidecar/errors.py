"""One error tree for everything the sidecar itself answers with.

Each error knows its stable upper-case code and its HTTP status; `error_body` is the one
place that turns an error into the JSON error body (README, "Errors the sidecar itself
answers"). Only listeners turn errors into responses; adapters translate foreign exceptions
into these.
"""

from __future__ import annotations

from typing import ClassVar

import orjson

#: Response header that tells the sidecar's own errors apart from the app's.
ERROR_HEADER = "x-gts-sidecar-error"


class SidecarError(Exception):
    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, header: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.header = header

    def body(self) -> bytes:
        return error_body(self.code, self.message, header=self.header)


def error_body(code: str, message: str, *, header: str | None = None) -> bytes:
    err: dict[str, str] = {"code": code, "message": message}
    if header is not None:
        err["header"] = header
    return orjson.dumps({"error": err})


class XidInvalid(SidecarError, ValueError):
    code = "XID_INVALID"
    status = 400

    def __init__(self, message: str, *, header: str | None = None, reason: str = "format"):
        super().__init__(message, header=header)
        #: short machine reason, used as a metric label (bounded set)
        self.reason = reason


class BadRequest(SidecarError, ValueError):
    code = "BAD_REQUEST"
    status = 400


class AdmissionReviewInvalid(SidecarError, ValueError):
    """The injector was sent something that is not an AdmissionReview v1 it can answer."""

    code = "ADMISSION_REVIEW_INVALID"
    status = 400


class HeadersTooLarge(SidecarError):
    code = "HEADERS_TOO_LARGE"
    status = 431


class RequestTimeout(SidecarError, TimeoutError):
    code = "REQUEST_TIMEOUT"
    status = 408


class UpstreamNotFound(SidecarError, LookupError):
    code = "UPSTREAM_NOT_FOUND"
    status = 404


class UpstreamTimeout(SidecarError, TimeoutError):
    code = "UPSTREAM_TIMEOUT"
    status = 504

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        #: which timeout fired: connect, response_header or total
        self.kind = kind


class UpstreamUnavailable(SidecarError, ConnectionError):
    code = "UPSTREAM_UNAVAILABLE"
    status = 502


class PoolExhausted(SidecarError):
    code = "POOL_EXHAUSTED"
    status = 503


class ConnectionLimit(SidecarError):
    """A proxy listener is at its connection cap (per listener or per client address)."""

    code = "CONNECTION_LIMIT"
    status = 503


class NotImplementedByProxy(SidecarError):
    code = "NOT_IMPLEMENTED"
    status = 501


class Draining(SidecarError):
    code = "DRAINING"
    status = 503


class ConfigError(Exception):
    """A config file that cannot be used; carries every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class InvalidRequest(SidecarError, ValueError):
    """A control-plane request body that is not the JSON the API expects."""

    code = "INVALID_REQUEST"
    status = 400


class SignatureInvalid(SidecarError):
    code = "SIGNATURE_INVALID"
    status = 401

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: unknown_key, stale, mismatch, replay, malformed (a bounded set: a metric label)
        self.reason = reason


class Unauthorized(SidecarError):
    code = "UNAUTHORIZED"
    status = 401


class CoordinatorAuthFailed(Unauthorized):
    """The coordinator (or its token endpoint) refused *this sidecar's* credentials: its
    signing key, clock or access key. The app sent none of them, so it gets a 502 naming the
    sidecar's config, not a 401 that would send it looking at its own."""

    code = "COORDINATOR_AUTH_FAILED"
    status = 502


class TransactionNotFound(SidecarError, LookupError):
    code = "TRANSACTION_NOT_FOUND"
    status = 404


class BranchNotFound(SidecarError, LookupError):
    code = "BRANCH_NOT_FOUND"
    status = 404


class TransactionNotActive(SidecarError):
    """A branch registration or report for a transaction that is no longer Begin."""

    code = "TRANSACTION_NOT_ACTIVE"
    status = 409


class IdempotencyConflict(SidecarError):
    code = "IDEMPOTENCY_KEY_REUSED"
    status = 422


class CoordinatorUnavailable(SidecarError, ConnectionError):
    code = "COORDINATOR_UNAVAILABLE"
    status = 503


class JournalUnavailable(SidecarError):
    code = "JOURNAL_UNAVAILABLE"
    status = 503


class DuplicateKey(JournalUnavailable):
    """A journal write reused an idempotency key that another record holds; nothing of that
    write was stored. Callers that can explain it (a retried registration) do; to anyone
    else it is a write that failed. The journal itself is fine."""


class NotOwner(JournalUnavailable):
    """A replicated journal refused a write: another replica took the transaction over (or
    this replica's lease is gone). Nothing was stored; the journal itself is fine, and a
    retry reaches the transaction's current driver through the database."""

    code = "TRANSACTION_MOVED"

    def __init__(
        self, message: str, *, xids: tuple[str, ...] = (), lease_lost: bool = False
    ) -> None:
        super().__init__(message)
        self.xids = xids
        self.lease_lost = lease_lost


class PayloadTooLarge(SidecarError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class StoreUnavailable(SidecarError, ConnectionError):
    """The idempotency, nonce or lock store (Redis) cannot be reached or answered wrongly."""

    code = "STORE_UNAVAILABLE"
    status = 503


class LockConflict(SidecarError):
    """A global lock is held by another transaction; the body names the holder and the key."""

    code = "LOCK_CONFLICT"
    status = 409

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(f"lock {key!r} is held by transaction {holder}")
        self.key = key
        self.holder = holder

    def body(self) -> bytes:
        err = {"code": self.code, "message": self.message, "holder": self.holder, "key": self.key}
        return orjson.dumps({"error": err})


class VersionNotSupported(SidecarError):
    code = "HTTP_VERSION_NOT_SUPPORTED"
    status = 505
