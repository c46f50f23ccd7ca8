"""Shared test set-up: one cache for built models and compiled ops, a small model, small datasets."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from databases import create_postgres_database, drop_postgres_database

REPO = Path(__file__).resolve().parent.parent
# Built-in model, built-in data and DeepSpeed's compiled ops (under <cache>/torch_extensions) are built once
# per checkout.
os.environ.setdefault("ALIGN_CACHE_DIR", str(REPO / ".align" / "cache"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A service started by a test writes its API key to the user's config folder too; keep that out of ~/.config.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="align-tests-config-")
sys.path.insert(0, str(REPO / "tests" / "unit"))


def pytest_addoption(parser) -> None:
    parser.addoption("--trials", type=int, default=None,
                     help="Trials of each repeated fault in tests/reliability (default: each test's CI size)")


def pytest_report_header(config) -> list[str]:
    """What this machine computes with, at the top of every test log: CPUs differ across machines."""
    from align.precision import hardware_summary, measured_bf16_slowdown, resolve

    hardware = hardware_summary()
    return [
        (f"cpu: {hardware['cpu']}, torch capability {hardware['cpu_capability']}, "
        f"oneDNN cap {hardware['onednn_isa_cap'] or 'none'}"),
        (f"precision auto -> {resolve('auto').precision} ({hardware['cpu_bf16_reason']}); "
        f"bf16/fp32 matmul time {measured_bf16_slowdown():.1f}x"),
    ]


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a small byte-level BPE tokenizer, saved as a local folder."""
    from data_helpers import build_small_model

    return build_small_model(tmp_path_factory.mktemp("small-model"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """SFT rows (messages) and preference rows (prompt/chosen/rejected) of varying length."""
    root = tmp_path_factory.mktemp("small-data")
    sft = [
        {"messages": [{"role": "user", "content": f"add {i} and {i * 7 % 13}"},
                      {"role": "assistant", "content": str(i + i * 7 % 13) + " ok" * (i % 4)}]}
        for i in range(48)
    ]
    prefs = [
        {"prompt": f"add {i} and {i * 7 % 13}", "chosen": str(i + i * 7 % 13) + " yes" * (i % 3),
         "rejected": str(i + i * 7 % 13 + 1)}
        for i in range(48)
    ]
    return {"sft": _write_jsonl(root / "sft.jsonl", sft), "prefs": _write_jsonl(root / "prefs.jsonl", prefs)}


def make_job(model: Path, stages: list[dict], **overrides):
    """A JobSpec on ``model`` with small defaults; ``overrides`` replace top-level fields."""
    from align.spec import parse_spec

    spec = {
        "name": "test",
        "base_model": str(model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "stages": stages,
    }
    spec.update(overrides)
    return parse_spec(spec)


@pytest.fixture
def job_factory():
    return make_job


# ---------------------------------------------------------------------------------------------------------
# Database fixtures (services/): every test gets a migrated, empty database on SQLite and on Postgres.
# SQLite: a copy of a file migrated once per session. Postgres: one database per session, created with a
# random name on the local server, migrated once, emptied before each test and dropped at the end.
# ---------------------------------------------------------------------------------------------------------

DB_TABLES = ("events", "artifacts", "stage_runs", "jobs", "api_keys", "tenants")


@pytest.fixture(scope="session")
def _migrated_sqlite_template(tmp_path_factory) -> Path:
    from services.db.session import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "align.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _migrated_postgres_url():
    from services.db.session import upgrade

    url = create_postgres_database()
    upgrade(url)
    yield url
    drop_postgres_database(url)


def _empty_postgres(url: str) -> None:
    from sqlalchemy import text

    from services.db.session import make_engine

    engine = make_engine(url)
    with engine.begin() as connection:
        # A connection left idle in a transaction would block TRUNCATE: fail loudly instead of hanging.
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        connection.execute(text(f"TRUNCATE {', '.join(DB_TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    """A migrated, empty database: a fresh SQLite file, or the session's Postgres database truncated."""
    import shutil

    if request.param == "sqlite":
        path = tmp_path / "align.db"
        shutil.copyfile(request.getfixturevalue("_migrated_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("_migrated_postgres_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def session_factory(database_url):
    """A sessionmaker on ``database_url`` (``expire_on_commit=False``); the engine is disposed afterwards."""
    from services.db.session import make_engine, make_sessionmaker

    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request, tmp_path):
    """URL of a database with no tables at all (for migration tests); Postgres ones are dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    url = create_postgres_database("align_migrations")
    yield url
    drop_postgres_database(url)
