"""The `align` command's service side and the client's spec reading."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from align.client import ServiceError, read_spec
from services.cli import app

runner = CliRunner()


def test_db_upgrade_and_downgrade_on_sqlite(tmp_path, monkeypatch):
    path = tmp_path / "align.db"
    monkeypatch.setenv("ALIGN_DATABASE_URL", f"sqlite:///{path}")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    tables = {row[0] for row in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")}
    assert {"jobs", "stage_runs", "events", "artifacts", "tenants", "api_keys"} <= tables
    assert runner.invoke(app, ["db", "downgrade", "base"]).exit_code == 0
    tables = {row[0] for row in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")}
    assert "jobs" not in tables


def test_dispatcher_needs_ray_address_and_shared_secret(monkeypatch):
    monkeypatch.delenv("ALIGN_RAY_ADDRESS", raising=False)
    result = runner.invoke(app, ["dispatcher"])
    assert result.exit_code == 2 and "ALIGN_RAY_ADDRESS" in result.output
    monkeypatch.setenv("ALIGN_RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.delenv("ALIGN_REPORT_SECRET", raising=False)
    result = runner.invoke(app, ["dispatcher"])
    assert result.exit_code == 2 and "ALIGN_REPORT_SECRET" in result.output


def test_submit_without_a_service_says_so(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nbase_model: builtin:tiny\nstages: [{type: sft, data: {path: builtin:parity/sft}}]\n")
    result = runner.invoke(app, ["submit", str(spec), "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1 and "cannot reach the service" in result.output


def test_read_spec_makes_relative_locations_absolute(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "x", "base_model": "models/base",
        "stages": [{"type": "sft", "data": {"path": "data/sft.jsonl", "eval_path": "/abs/eval.jsonl"}},
                   {"type": "dpo", "data": {"path": "builtin:parity/prefs"}}],
    }))
    data = read_spec(spec)
    assert data["base_model"] == str(folder / "models" / "base")
    assert data["stages"][0]["data"] == {"path": str(folder / "data" / "sft.jsonl"), "eval_path": "/abs/eval.jsonl"}
    assert data["stages"][1]["data"]["path"] == "builtin:parity/prefs"


def test_service_error_lists_fields():
    error = ServiceError(422, [{"field": "stages[0].lr", "message": "must be > 0"}])
    assert error.errors == [("stages[0].lr", "must be > 0")]
    assert "stages[0].lr: must be > 0" in str(error)


# --- the client commands against a real service (uvicorn in a thread, SQLite, no dispatcher) ------------

KEY = "cli-test-key"


@pytest.fixture(autouse=True)
def _own_key_places(tmp_path, monkeypatch):
    """No key from the environment or the developer's own files: every test sets what it needs."""
    for name in ("ALIGN_API_KEY", "ALIGN_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, _migrated_sqlite_template):
    from servers import served

    from services.app import create_app
    from services.settings import Settings

    root = tmp_path_factory.mktemp("cli-service")
    (root / "data").mkdir()
    (root / "models").mkdir()
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    (root / "data" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copyfile(_migrated_sqlite_template, root / "align.db")
    settings = Settings(
        database_url=f"sqlite:///{root / 'align.db'}", artifact_root=str(root / "artifacts"),
        work_root=str(root / "work"), data_roots=[str(root / "data")], model_roots=[str(root / "models")],
        bootstrap_api_key=KEY, run_dispatcher=False, report_secret="cli-test-secret",
    )
    with served(create_app(settings)) as url:
        yield SimpleNamespace(url=url, root=root, data=root / "data", models=root / "models", settings=settings)


def write_spec(path: Path, data_path: str, base_model: str = "builtin:tiny", name: str = "cli-job") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "base_model": base_model,
                                    "stages": [{"type": "sft", "data": {"path": data_path}, "max_steps": 2}]}))
    return path


def test_submit_prints_a_refusal_with_brackets_as_it_is(service, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_API_KEY", KEY)
    outside = tmp_path / "some" / "folder"
    spec = write_spec(tmp_path / "job.yaml", str(outside / "sft.jsonl"), base_model=str(outside / "model"))
    result = runner.invoke(app, ["submit", str(spec), "--url", service.url])
    assert result.exit_code == 2, result.output
    assert f"  base_model: '{outside}/model': no such model folder in your model folders [{service.models}]; give " \
           "the full path of one under them (the service's ALIGN_MODEL_ROOTS)\n" in result.output
    assert f"  stages[0].data.path: '{outside}/sft.jsonl': no such file or folder in your data folders " \
           f"[{service.data}]; give the full path of one under them (the service's ALIGN_DATA_ROOTS)\n" in result.output


def test_validate_prints_a_pattern_whole(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: Bad Name\nbase_model: builtin:tiny\n"
                    "stages: [{type: sft, data: {path: builtin:parity/sft}}]\n")
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert result.output == (f"{spec}: invalid job spec\n"
                             "  name: String should match pattern '^[a-z0-9][a-z0-9_.-]{0,62}$' (got 'Bad Name')\n")


def test_validate_checks_the_data_files_from_the_specs_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "sft.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    (folder / "prefs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    monkeypatch.chdir(tmp_path)  # relative paths are taken from the spec's folder, not the working one
    result = runner.invoke(app, ["validate", str(write_spec(folder / "good.yaml", "sft.jsonl"))])
    assert result.exit_code == 0 and result.output.startswith("ok: cli-job (sft), spec hash sha256:"), result.output
    result = runner.invoke(app, ["validate", str(write_spec(folder / "missing.yaml", "[data]/nope.jsonl"))])
    assert result.exit_code == 2
    assert (f"  stages[0].data.path: {folder}/[data]/nope.jsonl: no such file or folder; check the path and that "
            "the file was uploaded\n") in result.output
    spec = folder / "dpo.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "base_model": "builtin:tiny",
                                    "stages": [{"type": "dpo", "data": {"path": "prefs.jsonl"}}]}))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2 and "stages[0].data.path: " in result.output and "'rejected'" in result.output


def test_train_takes_relative_paths_from_the_specs_folder_as_validate_does(tmp_path, monkeypatch):
    from align.cli import train_job
    from align.data.stage_data import resolve_data_path
    from align.models.load import resolve_base_model

    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")
    (folder / "model" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for name in ("sft.jsonl", "held-out.jsonl"):
        (folder / "data" / name).write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "rel", "base_model": "model", "stages": [
        {"type": "sft", "data": {"path": "data/sft.jsonl", "eval_path": "./data/held-out.jsonl"}}]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["validate", "../project/job.yaml"])
    assert result.exit_code == 0 and result.output.startswith("ok: rel (sft)"), result.output
    job = train_job(Path("../project/job.yaml"))
    assert resolve_base_model(job.base_model) == folder / "model"
    assert resolve_data_path(job.stages[0].data.path) == folder / "data" / "sft.jsonl"
    assert resolve_data_path(job.stages[0].data.eval_path) == folder / "data" / "held-out.jsonl"


def test_validate_renders_the_data_with_the_base_models_chat_template(tmp_path):
    from data_helpers import style_tokenizer

    model = tmp_path / "mistral-v0.3"
    style_tokenizer("mistral_v3").save_pretrained(model)  # drops the system turn of a finished conversation
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # safetensors: no tensors
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
                    {"role": "assistant", "content": "Four."}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    result = runner.invoke(app, ["validate", str(write_spec(tmp_path / "job.yaml", "sft.jsonl", str(model)))])
    assert result.exit_code == 2, result.output
    assert f"  base_model: {tmp_path}/sft.jsonl row 0: the Mistral [INST] chat template (sha256 " in result.output
    assert "<s>[INST] ⟦What is two plus two?[/INST] Four.</s>⟧" in result.output


def test_validate_renders_built_in_data_with_a_local_models_template_and_names_unreadable_tokenizers(tmp_path):
    """As POST /jobs does: one check (align.preflight.job_problems) for both."""
    from data_helpers import style_tokenizer

    from align.data.load import TemplateError
    from align.models.load import ModelError
    from align.preflight import check_job
    from align.spec import load_spec

    model = tmp_path / "model"
    tokenizer = style_tokenizer("chatml")
    tokenizer.chat_template = "{{ raise_exception('this template takes no conversations') }}"
    tokenizer.save_pretrained(model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # safetensors: no tensors
    spec = write_spec(tmp_path / "job.yaml", "builtin:parity/sft", str(model))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "  base_model: builtin:parity/sft row 0: the " in result.output
    assert "cannot render a conversation with roles [user, assistant]: TemplateError: this template takes no " \
           "conversations" in result.output
    with pytest.raises(TemplateError, match="^builtin:parity/sft row 0: "):
        check_job(load_spec(spec))
    (model / "tokenizer.json").write_text("{not json")
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert f"  base_model: '{model}': cannot load its tokenizer from {model}: " in result.output
    with pytest.raises(ModelError, match=f"^base_model: '{model}': cannot load its tokenizer from {model}: "):
        check_job(load_spec(spec))


def test_a_401_says_where_the_key_was_looked_for(service, tmp_path, monkeypatch):
    result = runner.invoke(app, ["jobs", "list", "--url", service.url])
    assert result.exit_code == 2
    places = f"ALIGN_API_KEY, {tmp_path}/home/api_key, {tmp_path}/config/align/api_key"
    assert "send the header 'Authorization: Bearer <key>'" in result.output
    assert f"no API key found (looked at, in order: {places}); set ALIGN_API_KEY=<key>" in result.output
    monkeypatch.setenv("ALIGN_API_KEY", "not-a-key")
    result = runner.invoke(app, ["jobs", "list", "--url", service.url])
    assert result.exit_code == 2 and "invalid or revoked API key" in result.output
    assert "the key sent came from ALIGN_API_KEY, and the service does not accept it" in result.output


def test_key_lookup_order(tmp_path, monkeypatch):
    from align.client import find_api_key

    assert find_api_key() == (None, "")
    config_file = tmp_path / "config" / "align" / "api_key"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("from-config\n")
    assert find_api_key() == ("from-config", str(config_file))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "api_key").write_text("from-home\n")
    assert find_api_key() == ("from-home", str(tmp_path / "home" / "api_key"))
    monkeypatch.setenv("ALIGN_API_KEY", "from-env")
    assert find_api_key() == ("from-env", "ALIGN_API_KEY")
    # Without ALIGN_HOME the state folder is ./.align; without XDG_CONFIG_HOME the config is ~/.config/align.
    for name in ("ALIGN_API_KEY", "ALIGN_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".align").mkdir()
    (tmp_path / ".align" / "api_key").write_text("from-dot-align\n")
    assert find_api_key() == ("from-dot-align", str(tmp_path / ".align" / "api_key"))
    (tmp_path / ".align" / "api_key").unlink()
    assert find_api_key() == (None, "")
    (tmp_path / "user" / ".config" / "align").mkdir(parents=True)
    (tmp_path / "user" / ".config" / "align" / "api_key").write_text("from-home-config\n")
    assert find_api_key()[0] == "from-home-config"


def test_serve_writes_its_key_where_the_cli_finds_it_from_any_folder(tmp_path, monkeypatch, _migrated_sqlite_template):
    from align.client import find_api_key
    from services.cli import ensure_local_api_key
    from services.settings import Settings

    shutil.copyfile(_migrated_sqlite_template, tmp_path / "align.db")
    monkeypatch.delenv("ALIGN_HOME")
    (tmp_path / "service").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "service")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'align.db'}")
    written = ensure_local_api_key(settings)
    assert written == [tmp_path / "service" / ".align" / "api_key", tmp_path / "config" / "align" / "api_key"]
    key = written[0].read_text().strip()
    assert key.startswith("al-") and written[1].read_text().strip() == key
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {"0o600"}
    assert find_api_key() == (key, str(written[0]))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert find_api_key() == (key, str(written[1]))
    assert ensure_local_api_key(settings) == [], "a database that has a key gets no second one"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == "align 0.1.0\n"


def test_cancel_a_job_that_has_ended_exits_1_and_says_so(service, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_API_KEY", KEY)
    spec = write_spec(tmp_path / "job.yaml", str(service.data / "sft.jsonl"), name="to-cancel")
    result = runner.invoke(app, ["submit", str(spec), "--url", service.url])
    assert result.exit_code == 0, result.output
    job_id = result.output.split()[1]
    result = runner.invoke(app, ["jobs", "cancel", job_id, "--url", service.url])
    assert result.exit_code == 0 and "cancelled" in result.output, result.output
    result = runner.invoke(app, ["jobs", "cancel", job_id, "--url", service.url])
    assert result.exit_code == 1
    assert result.output == f"{job_id} has already ended (cancelled); there is nothing to cancel\n"


def test_follow_shows_steps_loss_and_time_since_the_stage_started(service, tmp_path, monkeypatch, capsys):
    """A stage that started two minutes before following began shows 0:02:0x elapsed when it is cancelled, not
    the seconds spent following; its bar has the reported step, plan and loss, and a bracketed warning prints."""
    import httpx
    from sqlalchemy import update

    from align.cli_service import follow_job
    from align.client import Client
    from services.db import transitions
    from services.db.models import StageRun
    from services.db.session import make_engine, make_sessionmaker

    monkeypatch.setenv("ALIGN_API_KEY", KEY)
    spec = write_spec(tmp_path / "job.yaml", str(service.data / "sft.jsonl"), name="followed")
    engine = make_engine(f"sqlite:///{service.root / 'align.db'}")
    with Client(service.url) as client:
        job = client.submit(spec)
        with make_sessionmaker(engine).begin() as session:
            run = transitions.claim_next(session, "test-owner", 300)
            session.execute(update(StageRun).where(StageRun.id == run.id)
                            .values(started_at=run.started_at - timedelta(seconds=120)))
        token = service.settings.report_token(run.id, run.attempt)
        for kind, payload in [("heartbeat", {"step": 1, "total_steps": 2}), ("metrics", {"step": 1, "loss": 0.25}),
                              ("message", {"level": "warning", "text": "rows in [/data/x] dropped"})]:
            body = {"stage_run_id": run.id, "attempt": run.attempt, "type": kind, "payload": payload}
            answer = httpx.post(f"{service.url}/internal/reports", json=body,
                                headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
        client.cancel(job["id"])
        capsys.readouterr()
        assert follow_job(client, job["id"])["status"] == "cancelled"
    engine.dispose()
    output = capsys.readouterr().out
    assert "  [sft] rows in [/data/x] dropped\n" in output
    bar = next(line for line in output.splitlines() if line.startswith("sft "))
    assert "1/2" in bar and "cancelled" in bar and "loss=0.25" in bar and re.search(r" 0:02:0\d ", bar), bar


def test_library_warnings_stay_out_of_cli_output(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ = model.is_gradient_checkpointing
    assert [w.category for w in caught] == [FutureWarning], "the library no longer warns here; pick another call"
    spec = write_spec(tmp_path / "job.yaml", "builtin:parity/sft")
    assert runner.invoke(app, ["validate", str(spec)]).exit_code == 0  # any command quiets them
    with warnings.catch_warnings(record=True) as caught:
        _ = model.is_gradient_checkpointing
        warnings.warn_explicit("a library's notice", UserWarning, "peft/utils/save_and_load.py", 1,
                               module="peft.utils.save_and_load")
        warnings.warn_explicit("ours", UserWarning, "align/cli.py", 1, module="align.cli")
    assert [str(w.message) for w in caught] == ["ours"]


def test_stage_progress_as_align_train_drives_it():
    """The renderer `align train` and `--follow` share: per stage its steps, state, loss and time since start."""
    import io

    from rich.console import Console

    from align.progress import StageProgress, epoch_seconds

    out = io.StringIO()
    with StageProgress(Console(file=out, width=120)) as bars:
        bars.add("sft", "sft", "waiting")
        bars.add("dpo", "dpo", "waiting")
        bars.start("sft", total=12, started=time.time() - 65)
        bars.note("sft", "builtin:tiny: pretraining step 40/400 (10%) [cached]")  # before its first step: shown
        info = bars.progress.tasks[bars.bars["sft"]].fields["info"]
        assert info == "builtin:tiny: pretraining step 40/400 (10%) [cached]"
        bars.step("sft", {"step": 10, "loss": 1.5, "lr": 1e-3})
        bars.note("sft", "a message after the first step leaves the loss on the bar")
        bars.print("  [sft] step    10 held-out loss=[1.2]")
        bars.end("sft", steps=12)
        bars.start("dpo", total=6)
        bars.step("dpo", {"step": 3, "loss": 0.69})
    lines = out.getvalue().splitlines()
    assert "  [sft] step    10 held-out loss=[1.2]" in lines
    sft, dpo = (next(line for line in lines if line.startswith(name + " ")) for name in ("sft", "dpo"))
    shown = re.search(r" 12/12 succeeded  loss=1\.5 +0:(\d\d):(\d\d) ", sft)
    assert shown, sft
    # time since the stage started (65 s before), not since following began; a loaded machine may add a few
    assert 65 <= int(shown[1]) * 60 + int(shown[2]) < 95, sft
    assert re.search(r" 3/6 running    loss=0\.69 +0:00:0\d ", dpo), dpo
    assert epoch_seconds("2026-01-01T00:00:00") == epoch_seconds("2026-01-01T00:00:00+00:00") == 1767225600


def test_rank_lines_reach_the_callbacks_and_the_rest_does_not():
    from align.runner import RANK_EVENT_PREFIX, relay_rank_line

    metrics, messages = [], []
    lines = [RANK_EVENT_PREFIX + json.dumps({"metrics": {"step": 3, "loss": 0.5}}) + "\n",
             RANK_EVENT_PREFIX + json.dumps({"message": "rows in [/data] dropped", "level": "warning"}) + "\n",
             "[rank1]: some library noise\n",
             RANK_EVENT_PREFIX + '{"metrics": {"step": 4, "lo[rank1]: noise\n',
             RANK_EVENT_PREFIX + "[1, 2]\n"]
    relayed = [relay_rank_line(line, metrics.append, lambda text, level: messages.append((text, level)))
               for line in lines]
    assert relayed == [True, True, False, False, False]
    assert metrics == [{"step": 3, "loss": 0.5}] and messages == [("rows in [/data] dropped", "warning")]
