"""Bearer JWTs for the coordinator protocol (docs/protocol.md): fetched and refreshed on the client
side (`TokenSource`), verified on the server side (`verify_bearer`).

The client cannot verify a token's signature (it does not hold the issuer's key), so it
decodes it unverified and only to schedule refreshes (`exp`, `iat`, `nbf`), refusing tokens
whose algorithm is not allow-listed. The server is the one that verifies. aiohttp and PyJWT
errors are translated here, at the edge, into `Unauthorized` (a caller's bearer token),
`CoordinatorAuthFailed` (this sidecar's own credentials) or `CoordinatorUnavailable`.

PyJWT (and the `cryptography` it loads, ~11 MB of RSS) is imported on first use: only a
process that fetches or verifies bearer tokens pays for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from sidecar.errors import CoordinatorAuthFailed, CoordinatorUnavailable, Unauthorized

if TYPE_CHECKING:
    from sidecar.config import AuthConfig

log = logging.getLogger("sidecar.coordinator.auth")

DEFAULT_REFRESH_AT: Final = 0.8
DEFAULT_TIMEOUT: Final = 3.0
#: after a failed refresh, keep serving the still-valid token and try again this much later
DEFAULT_RETRY_AFTER: Final = 1.0
DEFAULT_LEEWAY: Final = 5.0


def _alg_refused(alg: object, algorithms: Sequence[str]) -> bool:
    return not isinstance(alg, str) or alg.lower() == "none" or alg not in algorithms


# --- server side --------------------------------------------------------------------------


def _bearer_reasons() -> tuple[tuple[type[Exception], str], ...]:
    """PyJWT's exceptions → the reason we give; the most specific first (they subclass each
    other)."""
    import jwt

    return (
        (jwt.ExpiredSignatureError, "token expired"),
        (jwt.ImmatureSignatureError, "token not yet valid (nbf or iat in the future)"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.MissingRequiredClaimError, "missing required claim"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidKeyError, "unusable verification key"),
        (jwt.DecodeError, "malformed token"),
    )


def verify_bearer(
    authorization_header: str | None,
    key: str,
    *,
    algorithms: Sequence[str],
    audience: str | None,
    leeway_s: float = DEFAULT_LEEWAY,
) -> dict[str, Any]:
    """The claims of a valid `Authorization: Bearer <jwt>`, or Unauthorized saying why.

    The algorithm must be in `algorithms` (never "none"); `exp` is required; `nbf`/`iat` and
    `exp` are checked with `leeway_s` of clock skew. With an `audience`, `aud` is required and
    must name it; without one, a token that carries `aud` is refused (PyJWT's rule: a token
    meant for someone else is not for us). `key` is the HMAC secret or the PEM public key.
    """
    import jwt

    if not authorization_header or not authorization_header.strip():
        raise Unauthorized("bearer token rejected: missing bearer token (no Authorization)")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "bearer token rejected: missing bearer token (Authorization: Bearer <jwt>)"
        )
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        raise Unauthorized("bearer token rejected: malformed token") from None
    if _alg_refused(alg, algorithms):
        shown = alg if isinstance(alg, str) and alg.isprintable() and len(alg) < 20 else "?"
        raise Unauthorized(
            f"bearer token rejected: algorithm not allowed ({shown}; allowed: "
            f"{', '.join(algorithms)})"
        )
    required = ["exp", "aud"] if audience is not None else ["exp"]
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[a for a in algorithms if a.lower() != "none"],
            audience=audience,
            leeway=leeway_s,
            options={"require": required},
        )
    except NotImplementedError:  # RS*/ES*/EdDSA without the `cryptography` package
        raise Unauthorized(
            f"bearer token rejected: algorithm {alg} is not available on this server"
        ) from None
    except jwt.PyJWTError as exc:
        for cls, reason in _bearer_reasons():
            if isinstance(exc, cls):
                if isinstance(exc, jwt.MissingRequiredClaimError):
                    reason = f"{reason} {exc.claim!r}"
                raise Unauthorized(f"bearer token rejected: {reason}") from None
        # e.g. a claim of the wrong type; the class name says which, without echoing input
        raise Unauthorized(f"bearer token rejected: invalid token ({type(exc).__name__})") from None
    return claims


# --- client side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = ""
    #: on the injected (wall) clock
    refresh_at: float = 0.0
    expires_at: float = 0.0

    def __repr__(self) -> str:  # the token is a credential: never in logs
        return f"_Token(refresh_at={self.refresh_at}, expires_at={self.expires_at})"


SessionSource = aiohttp.ClientSession | Callable[[], aiohttp.ClientSession]


class TokenSource:
    """Gives the current bearer token, fetching it from `token_url` on demand.

    Token endpoint: `POST token_url` with JSON `{"accessKey": "..."}` → 200 with JSON
    `{"access_token": "<jwt>", "expires_in": <seconds>}` (docs/signing.md). A token is
    refreshed once `refresh_at` (0.8) of its lifetime has passed: `iat`→`exp` when the token
    has both, else `expires_in` from the moment it was fetched. Many concurrent callers
    during a refresh all await one fetch. When a refresh fails with the endpoint unreachable
    while the old token is still valid, the old token keeps being served and the refresh is
    retried `retry_after` seconds later.

    `session` is a ClientSession to borrow (never closed here) or a factory whose session
    this object owns and closes in `close()`. `clock` is the wall clock (JWT times are epoch
    seconds).
    """

    def __init__(
        self,
        session: SessionSource,
        token_url: str,
        access_key: str,
        *,
        audience: str | None = None,
        algorithms: Sequence[str] = ("HS256",),
        clock: Callable[[], float] = time.time,
        refresh_at: float = DEFAULT_REFRESH_AT,
        timeout: float = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> None:
        if not 0.0 < refresh_at <= 1.0:
            raise ValueError("refresh_at must be in (0, 1]")
        if not access_key:
            raise ValueError("access_key must not be empty")
        if isinstance(session, aiohttp.ClientSession):
            self._session: aiohttp.ClientSession | None = session
            self._factory: Callable[[], aiohttp.ClientSession] | None = None
        else:
            self._session = None
            self._factory = session
        self.token_url = token_url
        self._access_key = access_key
        self.audience = audience
        self.algorithms = tuple(a for a in algorithms if a.lower() != "none")
        if not self.algorithms:
            raise ValueError("no usable algorithm in the allow-list")
        self._clock = clock
        self._ratio = refresh_at
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retry_after = retry_after
        self._current: _Token | None = None
        self._inflight: asyncio.Task[str] | None = None
        self._closed = False
        #: fetches started (successful or not): for tests and metrics
        self.fetches = 0

    @classmethod
    def from_config(cls, cfg: AuthConfig, session: SessionSource) -> TokenSource | None:
        """None when the config names no token endpoint (no bearer tokens are sent)."""
        if cfg.token_url is None or cfg.access_key_file is None:
            return None
        return cls(
            session,
            str(cfg.token_url),
            cfg.access_key_file.reveal(),
            audience=cfg.audience,
            algorithms=cfg.algorithms,
        )

    def rotate_access_key(self, access_key: str) -> None:
        """A rotated access key (its secret file changed): used from the next fetch on; the
        token already held stays until it is due (the endpoint issued it)."""
        if not access_key:
            raise ValueError("access_key must not be empty")
        self._access_key = access_key

    def __repr__(self) -> str:
        return f"TokenSource(token_url={self.token_url!r}, access_key=<redacted>)"

    async def token(self) -> str:
        """The current token; fetched (once, for all concurrent callers) when due."""
        cur = self._current
        if cur is not None and self._clock() < cur.refresh_at:
            return cur.value
        return await self._refresh()

    async def invalidate(self, bad_token: str) -> str:
        """The server refused `bad_token` (HTTP 401): drop it and return a fresh token.

        Many callers that got a 401 for the same token cause exactly one fetch: the first
        drops it, the others find it already gone (being replaced or replaced) and share
        the result."""
        cur = self._current
        if cur is not None and cur.value == bad_token:
            self._current = None
        return await self.token()

    async def close(self) -> None:
        """Stop: a fetch in flight is abandoned (its waiters get CoordinatorUnavailable)."""
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            # its outcome no longer matters; gather collects it (cancelled or failed) so
            # nothing is logged as "never retrieved", and a cancel of close() itself propagates
            await asyncio.gather(task, return_exceptions=True)
        if self._factory is not None and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- internals ----------------------------------------------------------------------

    async def _refresh(self) -> str:
        if self._closed:
            raise CoordinatorUnavailable("token source closed (shutting down)")
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._run_refresh(self._current), name="gts-token-refresh"
            )
            self._inflight = task
            task.add_done_callback(self._refresh_done)
        # shield: a caller that gives up (cancelled) must not cancel the fetch the others
        # wait for
        return await asyncio.shield(task)

    def _refresh_done(self, task: asyncio.Task[str]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved by the awaiters; never "never retrieved"

    async def _run_refresh(self, stale: _Token | None) -> str:
        try:
            fresh = await self._fetch()
        except asyncio.CancelledError:
            if self._closed:  # the waiters were not cancelled: tell them why they get nothing
                raise CoordinatorUnavailable("token source closed (shutting down)") from None
            raise
        except CoordinatorUnavailable as exc:
            now = self._clock()
            # `stale` is None after invalidate(): a token the server refused is never reused
            if stale is None or now >= stale.expires_at or self._current is not stale:
                raise
            log.warning("token refresh failed, the current token stays in use: %s", exc.message)
            self._current = replace(
                stale, refresh_at=min(now + self._retry_after, stale.expires_at)
            )
            return stale.value
        self._current = fresh
        return fresh.value

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            assert self._factory is not None
            self._session = self._factory()
        return self._session

    async def _fetch(self) -> _Token:
        self.fetches += 1
        fetched_at = self._clock()
        try:
            async with self._get_session().post(
                self.token_url,
                json={"accessKey": self._access_key},
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                data: object = await resp.json(content_type=None) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CoordinatorUnavailable(
                f"token endpoint {self.token_url} unreachable: {type(exc).__name__}"
                + (f" {exc}" if str(exc) else "")
            ) from None
        except ValueError:  # the body is not JSON
            raise CoordinatorUnavailable(
                f"token endpoint {self.token_url} answered with a body that is not JSON"
            ) from None
        if status in (401, 403):
            raise CoordinatorAuthFailed(
                f"token endpoint {self.token_url} refused the access key (HTTP {status}); "
                "check coordinator.auth.access_key_file"
            )
        if status != 200:
            raise CoordinatorUnavailable(f"token endpoint {self.token_url} answered HTTP {status}")
        return self._parse(data, fetched_at)

    def _parse(self, data: object, fetched_at: float) -> _Token:
        where = f"token endpoint {self.token_url}"
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise CoordinatorUnavailable(f'{where} answered without a string "access_token"')
        value: str = data["access_token"]
        expires_in = data.get("expires_in")
        if expires_in is not None and (
            isinstance(expires_in, bool) or not isinstance(expires_in, int | float)
        ):
            raise CoordinatorUnavailable(f'{where}: "expires_in" is not a number')
        import jwt

        try:
            alg = jwt.get_unverified_header(value).get("alg")
            # not verified: the client holds no key to verify with; the server does that
            claims = jwt.decode(value, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise CoordinatorAuthFailed(f"{where} issued a token that is not a JWT") from None
        if _alg_refused(alg, self.algorithms):
            raise CoordinatorAuthFailed(
                f"{where} issued a token signed with an algorithm not allowed here "
                f"(allowed: {', '.join(self.algorithms)})"
            )
        if self.audience is not None:
            aud = claims.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if self.audience not in auds:
                raise CoordinatorAuthFailed(f"{where} issued a token for another audience")
        exp, iat, nbf = (_num(claims.get(c)) for c in ("exp", "iat", "nbf"))
        if exp is not None and iat is not None and exp > iat:
            start, lifetime = iat, exp - iat
        elif expires_in is not None and expires_in > 0:
            start, lifetime = fetched_at, float(expires_in)
        elif exp is not None:
            start = nbf if nbf is not None and nbf < exp else fetched_at
            lifetime = exp - start
        else:
            raise CoordinatorAuthFailed(f"{where} issued a token with neither exp nor expires_in")
        expires_at = exp if exp is not None else fetched_at + lifetime
        if expires_at <= fetched_at:
            raise CoordinatorAuthFailed(
                f"{where} issued a token that is already expired (check the clocks: NTP)"
            )
        return _Token(value, start + self._ratio * lifetime, expires_at)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
