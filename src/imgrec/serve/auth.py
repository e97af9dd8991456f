"""API keys: read from the command line, the environment or a file, checked on every route
but the health checks and the web page (`middleware.ApiKeyAuth`, before the body is read),
and declared in /openapi.json as a Bearer security scheme on the routes that need them."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import InputError
from .errors import Unauthorized

API_KEY_ENV = "IMGREC_API_KEY"

bearer = HTTPBearer(
    auto_error=False, scheme_name="ApiKey",
    description="an API key the server was started with (`imgrec serve --api-key`)")


def read_key_file(path: Path) -> list[str]:
    """The keys in a file, one a line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read the API key file {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"the API key file {path} is not text (UTF-8)",
                         "write one key a line, in plain text") from None
    keys = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    if not keys:
        raise InputError(f"the API key file {path} holds no key", "write one key a line")
    return keys


def api_keys(key: str | None, key_file: Path | None) -> list[str]:
    """--api-key (or $IMGREC_API_KEY) and the keys of --api-key-file, checked: a key is one
    word of visible ASCII (it travels in a header)."""
    if key is None and API_KEY_ENV in os.environ:  # click reads an empty variable as unset
        key = os.environ[API_KEY_ENV]
    if key is not None and not key.strip():  # `--api-key "$UNSET"` must not mean no key
        raise InputError("--api-key is empty (or $IMGREC_API_KEY is set but empty): the server "
                         "would run without authentication",
                         "give the key, or leave --api-key out to run without one")
    keys = ([key.strip()] if key else []) + (read_key_file(key_file) if key_file else [])
    for k in keys:
        if not k.isascii() or not k.isprintable() or " " in k:
            raise InputError("an API key must be one word of visible ASCII characters",
                             "use letters, digits and punctuation (e.g. from "
                             "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    return keys


async def require_key(request: Request, _: HTTPAuthorizationCredentials | None =
                      Security(bearer)) -> None:
    """The dependency of the protected routers: declares the scheme in /openapi.json, and
    checks the key again (the middleware has refused a request without one already)."""
    auth = getattr(request.app.state, "auth", None)
    if auth is None:
        return
    problem = auth.problem(request.headers.get("authorization"))
    if problem is not None:
        raise Unauthorized(problem)
