"""Credentials never recorded: user:password in URLs and the signature / token parameters of signed URLs
(S3, GCS, Azure SAS, bearer tokens in query strings) are replaced by ``REDACTED`` wherever mqgen records
something: log lines (console and files), MLflow params, tags and artifacts, Prefect flow parameters, the ingest
manifest and error messages. The config itself keeps the real value: the stage that reads the data needs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "REDACTED"
# query parameters whose value is a secret (case-insensitive; also any name containing one of _SECRET_PARTS)
_SECRET_PARAMS = frozenset({"sig", "key", "apikey", "api_key", "code", "sas", "awsaccesskeyid", "googleaccessid",
                            "x-amz-credential", "x-goog-credential", "x-amz-security-token"})
_SECRET_PARTS = ("signature", "token", "secret", "password", "passwd", "credential", "auth")
_URL = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"<>]+@)?(?P<rest>[^\s'\"<>]*)")


def _secret_param(name: str) -> bool:
    low = name.lower()
    return low in _SECRET_PARAMS or any(part in low for part in _SECRET_PARTS)


def _redact_query(rest: str) -> str:
    head, q, query = rest.partition("?")
    if not q:
        return rest
    query, hash_, fragment = query.partition("#")
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        parts.append(f"{name}={MASK}" if eq and value and _secret_param(name) else item)
    return f"{head}?{'&'.join(parts)}{hash_}{fragment}"


def _redact_url(m: re.Match[str]) -> str:
    userinfo = f"{MASK}@" if m.group("userinfo") else ""
    return f"{m.group('scheme')}{userinfo}{_redact_query(m.group('rest'))}"


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by :data:`MASK`."""
    return _URL.sub(_redact_url, text) if "://" in text else text


def redact(value: Any) -> Any:
    """:func:`redact_text` applied to every string inside ``value`` (mappings, lists and tuples rebuilt)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def has_secret(value: Any) -> bool:
    """Whether :func:`redact` would change ``value``."""
    return redact(value) != value


# Values with credentials that must pass through a record (a Prefect flow run's parameters) stay in this process:
# the record gets the redacted value and a token; the flow body, running in this process, reads the real one.
_PRIVATE: dict[str, Any] = {}


def keep_private(value: Any) -> Any:
    """``value`` itself when it holds no credential; otherwise ``{"redacted": ..., "private": token}``, with the
    real value kept in this process for :func:`private_value`."""
    if not has_secret(value):
        return value
    import uuid

    token = uuid.uuid4().hex
    _PRIVATE[token] = value
    return {"redacted": redact(value), "private": token}


def private_value(param: Any) -> Any:
    """The real value behind a parameter made by :func:`keep_private` (``param`` itself otherwise)."""
    if isinstance(param, Mapping) and set(param) == {"redacted", "private"}:
        try:
            return _PRIVATE[param["private"]]
        except KeyError:
            raise PermissionError("this run's parameters hold credentials that were kept in the process that "
                                  "started it; start it again from there, or give the credentials through the "
                                  "environment (e.g. AWS_* variables or an fsspec config) instead of the URL"
                                  ) from None
    return param


def redact_exception(exc: BaseException) -> BaseException:
    """Redact ``exc`` and every exception it was raised from, in place (type, traceback and chain kept): its
    message arguments, notes and file names. Called before an orchestrator records a failure (Prefect keeps the
    message in the task's state, its API logs and the persisted result)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        try:
            e.args = tuple(redact_text(a) if isinstance(a, str) else a for a in e.args)
            if getattr(e, "__notes__", None):
                e.__notes__ = [redact_text(n) if isinstance(n, str) else n for n in e.__notes__]
            if isinstance(e, OSError):
                for name in ("filename", "filename2"):
                    value = getattr(e, name, None)
                    if isinstance(value, str):
                        setattr(e, name, redact_text(value))
        except (AttributeError, TypeError):  # an exception type that refuses new attributes: leave it
            pass
        stack += [e.__cause__, e.__context__]
    return exc
