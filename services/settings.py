"""Service settings, read from ``ALIGN_*`` environment variables (``ALIGN_DATABASE_URL``, ...)."""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _under_cwd(*parts: str) -> str:
    return str(Path.cwd().joinpath(*parts))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGN_", extra="ignore", use_attribute_docstrings=True)

    database_url: str = Field(default_factory=lambda: "sqlite:///" + _under_cwd(".align", "align.db"))
    """SQLAlchemy URL: `sqlite:///path` (embedded) or `postgresql://user@host/db`."""
    ray_address: str | None = None
    """Ray Jobs API address (`http://head:8265`); unset starts a local Ray."""
    artifact_root: str = Field(default_factory=lambda: _under_cwd(".align", "artifacts"))
    """Artifact store root: a local path or an fsspec URL (`s3://bucket/prefix`)."""
    work_root: str = Field(default_factory=lambda: _under_cwd(".align", "work"))
    """Checkpoints and logs per stage run, `<work_root>/<job_id>/<stage_run_id>`; shared on clusters."""
    data_roots: list[str] = Field(default_factory=lambda: [str(Path.cwd())])
    """Local folders a job's data may be read from."""
    model_roots: list[str] = Field(default_factory=lambda: [str(Path.cwd())])
    """Local folders a job's base model may be read from."""
    allowed_schemes: list[str] = Field(default_factory=lambda: ["file"])
    """URL schemes allowed for data and model locations."""
    bootstrap_api_key: str | None = None
    """An API key created for tenant `default` at start-up, if set."""
    report_secret: str = Field(default_factory=lambda: secrets.token_hex(32))
    """Secret that signs worker report tokens. Set it when more than one API process runs."""
    report_token_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    """A report token is refused (401) this long after the dispatcher issued it; a stage attempt that
    runs longer needs a larger value."""
    host: str = "127.0.0.1"
    """Address the API listens on."""
    port: int = 8321
    """Port the API listens on."""
    public_url: str | None = None
    """URL workers use to reach the API (default `http://{host}:{port}`)."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per stage run before a retryable failure becomes final."""
    lease_seconds: float = Field(300.0, gt=0)
    """A running stage run with no report for this long is rescued (Ray job stopped, stage requeued)."""
    dispatcher_poll_seconds: float = Field(1.0, gt=0)
    """Pause between dispatcher passes."""
    worker_python: str | None = None
    """Python interpreter the Ray job runs the worker with (default: `python` on a cluster's PATH, this
    interpreter for a local Ray)."""
    run_dispatcher: bool = True
    """Run the dispatcher in the API process."""
    sse_poll_seconds: float = Field(0.5, gt=0)
    """How often a live event stream re-reads the database when it cannot wait for Postgres NOTIFY
    (SQLite, or while the LISTEN connection is down)."""
    ready_probe_seconds: float = Field(30.0, ge=0)
    """`/readyz` submits a no-op Ray job to check that jobs can start; a success stands for this long."""

    @model_validator(mode="after")
    def _default_public_url(self) -> Settings:
        if self.public_url is None:
            self.public_url = f"http://{self.host}:{self.port}"
        return self

    def _report_signer(self) -> TimestampSigner:
        return TimestampSigner(self.report_secret, salt="align.report-token")

    def report_token(self, stage_run_id: str, attempt: int) -> str:
        """Bearer token for one stage attempt's reports: ``<stage_run_id>:<attempt>`` signed with the
        time it was issued (itsdangerous, HMAC-SHA1 of the secret; valid ``report_token_seconds``)."""
        return self._report_signer().sign(f"{stage_run_id}:{attempt}").decode()

    def check_report_token(self, stage_run_id: str, attempt: int, token: str) -> str | None:
        """None when ``token`` is this attempt's and not expired, else why it is refused."""
        try:
            value = self._report_signer().unsign(token, max_age=self.report_token_seconds)
        except SignatureExpired as expired:
            issued = expired.date_signed.isoformat(timespec="seconds") if expired.date_signed else "long ago"
            return (f"report token expired: issued {issued}, valid {self.report_token_seconds:g} s "
                    "(ALIGN_REPORT_TOKEN_SECONDS); the worker stops this attempt and the dispatcher retries the "
                    "stage with a new token while attempts remain (ALIGN_MAX_ATTEMPTS)")
        except BadSignature:
            return "bad report token for this stage run and attempt"
        if value.decode() != f"{stage_run_id}:{attempt}":
            return "bad report token for this stage run and attempt"
        return None


@lru_cache
def get_settings() -> Settings:
    return Settings()
