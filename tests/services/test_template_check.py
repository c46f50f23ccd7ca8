"""POST /jobs renders a sample of the data with the base model's chat template and refuses a template
that cannot mark the assistant's tokens (SQLite and Postgres)."""

from __future__ import annotations

import json

import pytest
from data_helpers import style_tokenizer
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import auth
from services.settings import Settings

SYSTEM_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]


@pytest.fixture
def roots(tmp_path):
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    models.mkdir()
    rows = [{"messages": SYSTEM_CONVERSATION[1:]}] * 2 + [{"messages": SYSTEM_CONVERSATION}]
    (data / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    prefs = [{"prompt": "Is 4 even or odd?", "chosen": " even", "rejected": " odd"}]
    (data / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prefs))
    return data, models


@pytest.fixture
def client(tmp_path, roots, database_url, session_factory):
    data, models = roots
    settings = Settings(
        database_url=database_url,
        artifact_root=str(tmp_path / "artifacts"),
        work_root=str(tmp_path / "work"),
        data_roots=[str(data)],
        model_roots=[str(models)],
        bootstrap_api_key="bootstrap-key",
        report_secret="secret",
        run_dispatcher=False,
    )
    with TestClient(create_app(settings, session_factory=session_factory)) as test_client:
        with session_factory() as session:
            tenant = auth.create_tenant(session, "alice")
            _, key = auth.create_api_key(session, tenant.id, "test")
            session.commit()
        test_client.headers["Authorization"] = f"Bearer {key}"
        yield test_client


def model_folder(models, style: str):
    """A model folder as check_model accepts it (weights are never read) with a style's tokenizer."""
    folder = models / style
    style_tokenizer(style).save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # safetensors: no tensors
    return folder


def spec_for(data, model) -> dict:
    return {
        "name": "template-check",
        "base_model": str(model),
        "stages": [
            {"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 1},
            {"type": "dpo", "data": {"path": str(data / "prefs.jsonl")}, "max_steps": 1},
        ],
    }


def test_a_template_that_cannot_mark_the_replies_is_refused_with_the_rendered_row(client, roots):
    data, models = roots
    response = client.post("/jobs", json=spec_for(data, model_folder(models, "mistral_v3")))
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["field"] == "base_model"
    message = problem["message"]
    assert message.startswith(f"{data / 'sft.jsonl'} row 2: the Mistral [INST] chat template (sha256 ")
    assert "cannot mark the assistant tokens" in message
    assert message.endswith(
        "rendered sample (the masked span is between ⟦ and ⟧):\n<s>[INST] ⟦What is two plus two?[/INST] Four.</s>⟧"
    )


def test_templates_that_mark_the_replies_are_accepted(client, roots):
    data, models = roots
    for style in ("chatml", "llama3", "mistral"):
        response = client.post("/jobs", json=spec_for(data, model_folder(models, style)))
        assert response.status_code == 201, response.text


def test_built_in_data_is_rendered_with_a_local_models_template(client, roots):
    data, models = roots
    spec = spec_for(data, model_folder(models, "mistral_v3"))
    spec["stages"][0]["data"] = {"path": "builtin:parity/sft", "eval_path": "builtin:parity/eval"}
    spec["stages"][1]["data"] = {"path": "builtin:parity/prefs"}
    assert client.post("/jobs", json=spec).status_code == 201  # no system turns: Mistral v0.3 lines up
    spec["base_model"] = str(model_folder(models, "gemma"))
    assert client.post("/jobs", json=spec).status_code == 201
