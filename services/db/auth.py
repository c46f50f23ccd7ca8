"""Tenants and their API keys (stored as sha256 hashes only)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db.models import ApiKey, Tenant


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_tenant(s: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    s.add(tenant)
    s.flush()
    return tenant


def create_api_key(s: Session, tenant_id: str, name: str, plaintext: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant; the plaintext is returned once and only its sha256 is stored."""
    plaintext = plaintext or "align_" + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, name=name, key_hash=hash_key(plaintext))
    s.add(key)
    s.flush()
    return key, plaintext


def tenant_for_key(s: Session, plaintext: str) -> Tenant | None:
    query = (select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
             .where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)))
    return s.scalars(query).first()
