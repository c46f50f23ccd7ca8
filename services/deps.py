"""Dependencies the routes declare with ``Annotated``: settings, a database session, the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from sqlalchemy.orm import Session

from services.db import auth
from services.db.models import Tenant
from services.settings import Settings


class FieldErrors(Exception):
    """Bad input, answered as 422 ``{"detail": [{"field", "message"}, ...]}``."""

    def __init__(self, errors: list[tuple[str, str]]):
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors))
        self.errors = errors


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed when the route returns and rolled back when it raises."""
    with request.app.state.session_factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# scope="function": commit before the response is sent, so a client sees its own writes at once.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def current_tenant(
    session: SessionDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Tenant:
    """The tenant whose API key is in ``Authorization: Bearer <key>``; 401 when missing or unknown."""
    token = bearer_token(authorization)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send the header 'Authorization: Bearer <key>' (the align CLI sends "
            "$ALIGN_API_KEY, else the key in $ALIGN_HOME/api_key or ./.align/api_key, else ~/.config/align/api_key)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = auth.tenant_for_key(session, token)
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked API key: send a key of this service in 'Authorization: Bearer <key>' (the "
            "align CLI: set ALIGN_API_KEY; `align serve` writes the key it creates to .align/api_key and "
            "~/.config/align/api_key)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # End the look-up's transaction: on SQLite every transaction holds the write lock, and a route may
    # spend seconds checking data before it writes.
    session.commit()
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def refuse_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not take, or one given twice: a misspelt filter (``?status=``
    for ``?state=``) or a second ``?state=`` would otherwise be ignored silently."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    cached = _QUERY_NAMES.get(id(dependant))
    if cached is None or cached[0] is not dependant:
        cached = _QUERY_NAMES[id(dependant)] = (dependant, frozenset(_query_names(dependant)))
    known = cached[1]
    names = [name for name, _value in request.query_params.multi_items()]
    takes = ", ".join(sorted(known)) or "none"
    problems = [(name or "(query)", f"this operation takes no query parameter {name!r}; it takes: {takes}")
                for name in dict.fromkeys(names) if name not in known]
    problems += [(name, f"given {names.count(name)} times; give it once")
                 for name in dict.fromkeys(names) if name in known and names.count(name) > 1]
    if problems:
        raise FieldErrors(problems)


_QUERY_NAMES: dict[int, tuple[object, frozenset[str]]] = {}
"""Each route's dependant (held, so that its ``id`` stays its own) and the query parameters it takes."""


def _query_names(dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
