"""Tenants and their API keys (stored as sha256 hashes only)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db.models import ApiKey, Tenant, utcnow


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_tenant(s: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    s.add(tenant)
    s.flush()
    return tenant


def tenant_named(s: Session, name: str) -> Tenant | None:
    return s.scalars(select(Tenant).where(Tenant.name == name)).first()


def list_tenants(s: Session) -> list[Tenant]:
    return list(s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.name)))


def create_api_key(s: Session, tenant_id: str, name: str, plaintext: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant; the plaintext is returned once and only its sha256 is stored."""
    plaintext = plaintext or "align_" + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, name=name, key_hash=hash_key(plaintext))
    s.add(key)
    s.flush()
    return key, plaintext


def list_api_keys(s: Session, tenant_id: str | None = None) -> list[tuple[ApiKey, Tenant]]:
    """Keys with their tenants, oldest first; every tenant's when ``tenant_id`` is None."""
    query = select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return [(key, tenant) for key, tenant in s.execute(query.order_by(ApiKey.created_at, ApiKey.id))]


def revoke_api_key(s: Session, key_id: str) -> tuple[ApiKey, bool] | None:
    """Mark the key revoked: from its next request on, it gets 401. Returns the key and whether this call
    revoked it (a key revoked before keeps its first ``revoked_at``); None when there is no such key."""
    key = s.get(ApiKey, key_id, with_for_update=True)
    if key is None:
        return None
    if key.revoked_at is not None:
        return key, False
    key.revoked_at = utcnow()
    s.flush()
    return key, True


def tenant_for_key(s: Session, plaintext: str) -> Tenant | None:
    query = (select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
             .where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)))
    return s.scalars(query).first()
