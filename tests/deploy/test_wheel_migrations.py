"""`align db upgrade` from an installed wheel: the migrations ship in it, so no clone is needed to migrate.

The wheel is built from a copy of the sources and installed with ``--no-deps`` into a fresh venv; the
dependencies come from this interpreter's site-packages through a ``.pth`` line (a plain path line, so the
editable install's finder there is not run and ``align`` can only come from the wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from databases import create_postgres_database, drop_postgres_database
from sqlalchemy import inspect

from services.db.session import current_revision, head_revision, make_engine

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("align", "services", "workers", "migrations")
TABLES = {"tenants", "api_keys", "jobs", "stage_runs", "artifacts", "events"}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    shown = " ".join(map(str, command))
    assert result.returncode == 0, f"{shown} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("align-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "align-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_align_db_upgrade_from_an_installed_wheel(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("ALIGN_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"

    where = run([str(venv / "bin" / "python"), "-c",
                 "import align, services, migrations; print(services.__file__); print(migrations.__file__)"],
                cwd=outside, env=env).stdout.split()
    for path in where:
        assert Path(path).is_relative_to(venv), f"imported from {path}, not from the wheel in {venv}"
    assert (Path(where[1]).parent / "script.py.mako").is_file()
    assert (Path(where[1]).parent / "versions" / "0001_initial.py").is_file()

    url = create_postgres_database("align_wheel")
    try:
        result = run([str(venv / "bin" / "align"), "db", "upgrade"], cwd=outside,
                     env=dict(env, ALIGN_DATABASE_URL=url))
        assert "database at head" in result.stdout
        engine = make_engine(url)
        try:
            assert set(inspect(engine).get_table_names()) - {"alembic_version"} == TABLES
            assert current_revision(engine) == head_revision() == "0004_tenant_quotas"
        finally:
            engine.dispose()
    finally:
        drop_postgres_database(url)
    assert not (outside / ".align").exists(), "migrating Postgres leaves no local state behind"
