"""Who may change anything from the pages: the configured token, on a POST that carries a CSRF token.

The CSRF defence is a signed double submit: every page sets a random cookie (SameSite=Strict,
HttpOnly) and puts the cookie's value, signed with a key of this process (itsdangerous), in
each form. A POST is accepted only when the form's signed value matches the cookie and is
younger than ``CSRF_MAX_AGE_S``; another site can neither read the cookie nor forge the
signature. The token itself is compared in constant time and never rendered.
"""

from __future__ import annotations

import hmac
import secrets

from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import SecretStr

from worker.errors import WorkerError

CSRF_COOKIE = "rc_worker_csrf"
CSRF_MAX_AGE_S = 3600


class Refused(WorkerError):
    """Raised when a POST lacks the token or a valid CSRF token; ``reason`` is shown."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Guard:
    """Issues and checks CSRF tokens, and checks the configured token."""

    def __init__(self, token: SecretStr | None) -> None:
        self._token = token.get_secret_value() if token is not None else None
        self._signer = URLSafeTimedSerializer(secrets.token_urlsafe(32), salt="rc-worker-web-csrf")

    @property
    def read_only(self) -> bool:
        """True when no token is configured: nothing can be changed from the pages."""
        return not self._token

    @staticmethod
    def new_cookie() -> str:
        """A fresh random cookie value."""
        return secrets.token_urlsafe(24)

    def form_token(self, cookie: str) -> str:
        """The value a form carries for ``cookie``."""
        return self._signer.dumps(cookie)

    def check(self, cookie: str | None, form_token: str | None, token: str | None) -> None:
        """Pass, or raise Refused saying why."""
        if self._token is None:
            raise Refused("these pages are read-only: no web.token is configured (set RC_WORKER_WEB__TOKEN to allow re-drives)")
        if not cookie or not form_token:
            raise Refused("the form's CSRF token is missing: reload the page and try again")
        try:
            signed = self._signer.loads(form_token, max_age=CSRF_MAX_AGE_S)
        except BadSignature:
            raise Refused("the form's CSRF token is invalid or expired: reload the page and try again") from None
        if not isinstance(signed, str) or not hmac.compare_digest(signed, cookie):
            raise Refused("the form's CSRF token does not match this browser's cookie: reload the page and try again")
        if not token or not hmac.compare_digest(token.encode(), self._token.encode()):
            raise Refused("wrong or missing token: enter the web.token configured for these pages")
