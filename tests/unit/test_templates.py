"""Assistant masks from chat templates as models ship them (no {% generation %} markers), template
errors, and plain-text rows tokenised token for token as TRL tokenises them."""

import json

import datasets
import pytest
from data_helpers import DEFAULT_CHAT_TEMPLATE, build_tokenizer, style_tokenizer

from align.data.load import TemplateError
from align.data.render import marked_sample, render_conversation, render_prompt
from align.data.templates import END_OF_TURN, has_generation_markers, template_name
from align.data.tokenize import tokenize_preference, tokenize_prompt, tokenize_sft
from align.preflight import TEMPLATE_SAMPLE_ROWS, check_chat_template

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four, thanks."},
    {"role": "user", "content": "And the sky?"},
    {"role": "assistant", "content": "The sky is blue today."},
]
REPLIES = ("Four, thanks.", "The sky is blue today.")

# style: (has a system role, the text before each reply's content, the token that ends a reply)
STYLES = {
    "chatml": (True, "", "<|im_end|>"),
    "llama3": (True, "", "<|eot_id|>"),
    "mistral": (True, " ", "</s>"),
    "gemma": (False, "", "<end_of_turn>"),
}


def masked_runs(tokenizer, input_ids, mask) -> list[list[int]]:
    runs, current = [], []
    for token, keep in zip(input_ids, mask):
        if keep:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("style", STYLES)
def test_each_template_style_masks_exactly_the_replies_and_their_end_token(style):
    tokenizer = style_tokenizer(style)
    has_system, lead, end = STYLES[style]
    assert not has_generation_markers(tokenizer.chat_template)
    conversation = [SYSTEM, *TURNS] if has_system else TURNS
    input_ids, mask = render_conversation(tokenizer, conversation)
    assert input_ids == list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    runs = masked_runs(tokenizer, input_ids, mask)
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert runs == [[*tokenizer.encode(lead + reply, add_special_tokens=False), end_id] for reply in REPLIES]
    assert [tokenizer.decode(run) for run in runs] == [f"{lead}{reply}{end}" for reply in REPLIES]
    rendered = marked_sample(tokenizer, input_ids, mask)
    if has_system:
        assert "Be brief." in rendered.split("⟦")[0]


def test_chatml_as_qwen2_ships_it_marks_the_replies_after_its_default_system_turn():
    tokenizer = style_tokenizer("chatml")
    input_ids, mask = render_conversation(tokenizer, TURNS[:2])
    assert marked_sample(tokenizer, input_ids, mask) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is two plus two?"
        "<|im_end|>\n<|im_start|>assistant\n⟦Four, thanks.<|im_end|>⟧\n"
    )


def test_llama3_rendering_and_mask_text():
    tokenizer = style_tokenizer("llama3")
    input_ids, mask = render_conversation(tokenizer, [SYSTEM, *TURNS])
    assert marked_sample(tokenizer, input_ids, mask) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus two?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦Four, thanks.<|eot_id|>⟧"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the sky?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦The sky is blue today.<|eot_id|>⟧"
    )


def test_mistral_system_message_opens_the_first_instruction():
    tokenizer = style_tokenizer("mistral")
    input_ids, mask = render_conversation(tokenizer, [SYSTEM, *TURNS])
    assert marked_sample(tokenizer, input_ids, mask) == (
        "<s> [INST] Be brief.\n\nWhat is two plus two? [/INST]⟦ Four, thanks.</s>⟧"
        " [INST] And the sky? [/INST]⟦ The sky is blue today.</s>⟧"
    )


@pytest.mark.parametrize("style", STYLES)
def test_preference_rows_split_prompt_and_replies_with_each_style(style):
    tokenizer = style_tokenizer(style)
    has_system, lead, end = STYLES[style]
    prompt = ([SYSTEM] if has_system else []) + TURNS[:3]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green, today."}],
    }
    features = tokenize_preference(row, "preference_conversational", tokenizer, max_length=512)
    length = features["prompt_length"]
    assert features["chosen_input_ids"][:length] == render_prompt(tokenizer, prompt)
    for side, reply in (("chosen", "Blue."), ("rejected", "Green, today.")):
        ids, mask = features[f"{side}_input_ids"], features[f"{side}_loss_mask"]
        assert not any(mask[:length])
        assert [tokenizer.decode(run) for run in masked_runs(tokenizer, ids, mask)] == [f"{lead}{reply}{end}"]
        assert ids == render_conversation(tokenizer, prompt + row[side])[0]


def test_generation_markers_are_used_when_present_and_prefix_rendering_agrees_with_them():
    marked = build_tokenizer()
    plain = build_tokenizer(chat_template=DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""))
    conversation = [SYSTEM, *TURNS]
    assert render_conversation(plain, conversation) == render_conversation(marked, conversation)
    # Markers that leave out <|end|> are followed exactly: the mask comes from them, not from prefixes.
    content_only = build_tokenizer(chat_template=DEFAULT_CHAT_TEMPLATE.replace(
        "{{ message['content'] }}<|end|>{% endgeneration %}", "{{ message['content'] }}{% endgeneration %}<|end|>"))
    input_ids, mask = render_conversation(content_only, conversation)
    assert [content_only.decode(run) for run in masked_runs(content_only, input_ids, mask)] == list(REPLIES)


def test_template_that_drops_the_system_turn_is_refused_with_the_rendered_sample():
    tokenizer = style_tokenizer("mistral_v3")
    input_ids, mask = render_conversation(tokenizer, TURNS)  # without a system turn it lines up
    assert [tokenizer.decode(run) for run in masked_runs(tokenizer, input_ids, mask)] == [
        f" {reply}</s>" for reply in REPLIES
    ]
    with pytest.raises(TemplateError) as caught:
        render_conversation(tokenizer, [SYSTEM, *TURNS])
    error = caught.value
    assert error.template == template_name(tokenizer.chat_template)
    assert error.template.startswith("Mistral [INST] chat template (sha256 ")
    assert "does not isolate assistant turn 2" in str(error)
    # The reply's span would have started inside the user turn, and the system turn is gone.
    assert error.sample.endswith(
        "<s>[INST] ⟦What is two plus two?[/INST] Four, thanks.</s>⟧"
        "[INST] And the sky?[/INST] The sky is blue today.</s>"
    )


def test_template_exceptions_become_template_errors():
    with pytest.raises(TemplateError, match="Gemma turns chat template .* System role not supported"):
        tokenize_sft({"messages": [SYSTEM, *TURNS]}, "messages", style_tokenizer("gemma"), 512)


def test_template_that_never_writes_replies_is_refused():
    tokenizer = build_tokenizer(chat_template=(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"))
    with pytest.raises(TemplateError, match="custom chat template") as caught:
        tokenize_sft({"messages": TURNS}, "messages", tokenizer, 512)
    assert "no token is masked" in caught.value.sample


def test_preflight_check_locates_the_row_and_skips_text_rows(tmp_path):
    tokenizer = style_tokenizer("mistral_v3")
    good = {"messages": TURNS}
    rows = datasets.Dataset.from_list([good] * (TEMPLATE_SAMPLE_ROWS + 3) + [{"messages": [SYSTEM, *TURNS]}])
    with pytest.raises(TemplateError) as caught:
        check_chat_template(rows, "messages", "sft", tokenizer, str(tmp_path / "sft.jsonl"))
    assert str(caught.value).startswith(f"{tmp_path / 'sft.jsonl'} row {TEMPLATE_SAMPLE_ROWS + 3}: the Mistral [INST]")
    text_rows = datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    check_chat_template(text_rows, "preference", "preference", style_tokenizer("gemma"), "prefs.jsonl")


def test_template_errors_are_not_retryable_in_the_worker(tmp_path):
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from align.spec import parse_spec
    from align.stage_launch import StageLaunch
    from workers.entrypoint import classify

    spec = {"name": "t", "base_model": "/models/mistral", "stages": [{"type": "sft", "data": {"path": "/d.jsonl"}}]}
    ticket = StageLaunch(spec=parse_spec(spec), index=0, work_dir=tmp_path, artifact_root=str(tmp_path))
    with pytest.raises(TemplateError) as caught:
        tokenize_sft({"messages": [SYSTEM, *TURNS]}, "messages", style_tokenizer("mistral_v3"), 512)
    wrapped = WorkerGroupError("worker failed", {0: UserExceptionWithTraceback(caught.value, "Traceback ...")})
    payload = classify(wrapped, ticket)
    assert payload == {"code": "bad_template", "message": str(caught.value), "field": "base_model", "retryable": False}
    assert "Mistral [INST] chat template" in payload["message"] and "⟦" in payload["message"]


def test_data_and_template_errors_survive_pickling_with_their_type(tmp_path):
    import pickle

    from align.data.load import DataError
    from align.spec import parse_spec
    from align.stage_launch import StageLaunch
    from workers.entrypoint import classify

    spec = {"name": "t", "base_model": "/models/m", "stages": [{"type": "sft", "data": {"path": "/d.jsonl"}}]}
    ticket = StageLaunch(spec=parse_spec(spec), index=0, work_dir=tmp_path, artifact_root=str(tmp_path))
    with pytest.raises(TemplateError) as caught:
        tokenize_sft({"messages": [SYSTEM, *TURNS]}, "messages", style_tokenizer("mistral_v3"), 512)
    template_error = caught.value.at("/d.jsonl", 3)
    back = pickle.loads(pickle.dumps(template_error))
    assert type(back) is TemplateError and str(back) == str(template_error)
    assert (back.path, back.row, back.template, back.sample, back.fix) == (
        "/d.jsonl", 3, template_error.template, template_error.sample, template_error.fix)
    assert classify(back, ticket) == {"code": "bad_template", "message": str(template_error), "field": "base_model",
                                      "retryable": False}
    data_error = DataError("/d.jsonl", 7, "messages", "expected a list of messages", "give a list")
    back = pickle.loads(pickle.dumps(data_error))
    assert type(back) is DataError
    assert str(back) == "/d.jsonl row 7 column 'messages': expected a list of messages; give a list"
    assert (back.path, back.row, back.column, back.problem, back.fix) == (
        "/d.jsonl", 7, "messages", "expected a list of messages", "give a list")
    assert classify(back, ticket) == {"code": "bad_data", "message": str(data_error),
                                      "field": "stages[0].data.path", "retryable": False}


def test_template_names():
    assert template_name(DEFAULT_CHAT_TEMPLATE).startswith("align's default chat template (sha256 ")
    names = {style: template_name(style_tokenizer(style).chat_template).split(" chat template")[0] for style in STYLES}
    assert names == {
        "chatml": "ChatML", "llama3": "Llama-3 headers", "mistral": "Mistral [INST]", "gemma": "Gemma turns",
    }


# Plain-text rows, token for token as TRL tokenises them.
#
# Recorded with trl 1.16.0 (transformers 5.24.0, tokenizers 0.23.3) by building SFTTrainer and DPOTrainer
# on a one-layer Llama with build_tokenizer() (no BOS) and build_tokenizer(bos="<s>") (a BOS added to
# encoded text, as Llama tokenizers do), then reading their prepared train_dataset: SFTTrainer's
# "input_ids" and "labels" (-100 outside the completion, shown here as the loss mask) and DPOTrainer's
# "prompt_ids", "chosen_ids", "rejected_ids". TRL appends the EOS token's text to the completion (unless
# it already ends with it) and encodes tokenizer(prompt) and tokenizer(prompt + completion), special
# tokens included; the completion starts where the two differ (row 2: "capi" + "tal" merge).

SFT_TEXT_ROWS = [
    {"prompt": "What is two plus two?", "completion": " Four, thanks."},
    {"prompt": "The teacher explains the capi", "completion": "tal of France."},
    {"prompt": "Count", "completion": " one two<|end|>"},
]
PREFERENCE_TEXT_ROWS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.",
     "rejected": " The teacher reads a short poem again and again."},
    {"prompt": "My cat likes numb", "chosen": "ers.", "rejected": "the sky."},
]
TRL_SFT = {
    None: [
        ([59, 76, 69, 88, 354, 284, 332, 284, 35, 225, 42, 348, 86, 16, 316, 18, 1], 9),
        ([264, 263, 73, 69, 71, 261, 86, 367, 280, 308, 300, 306, 18, 1], 9),
        ([39, 348, 347, 225, 83, 82, 73, 284, 1], 3),
    ],
    "<s>": [
        ([5, 60, 77, 70, 89, 355, 285, 333, 285, 36, 226, 43, 349, 87, 17, 317, 19, 1], 10),
        ([5, 265, 264, 74, 70, 72, 262, 87, 368, 281, 309, 301, 307, 19, 1], 10),
        ([5, 40, 349, 348, 226, 84, 83, 74, 285, 1], 4),
    ],
}
TRL_DPO = {
    None: [
        ([59, 76, 69, 88, 354, 280, 308, 300, 306, 35], [225, 52, 69, 86, 343, 18, 1],
         [225, 264, 263, 73, 69, 71, 261, 86, 364, 269, 307, 303, 282, 315, 282, 18, 1]),
        ([49, 93, 285, 69, 88, 363], [335, 18, 1], [328, 81, 70, 88, 261, 333, 18, 1]),
    ],
    "<s>": [
        ([5, 60, 77, 70, 89, 355, 281, 309, 301, 307, 36], [226, 53, 70, 87, 344, 19, 1],
         [226, 265, 264, 74, 70, 72, 262, 87, 365, 270, 308, 304, 283, 316, 283, 19, 1]),
        ([5, 50, 94, 286, 70, 89, 364], [336, 19, 1], [329, 82, 71, 89, 262, 334, 19, 1]),
    ],
}


@pytest.mark.parametrize("bos", [None, "<s>"], ids=["no_bos", "bos"])
def test_text_rows_tokenise_as_trl_does(bos):
    tokenizer = build_tokenizer(bos=bos)
    for row, (input_ids, prompt_length) in zip(SFT_TEXT_ROWS, TRL_SFT[bos]):
        features = tokenize_sft(row, "prompt_completion", tokenizer, max_length=512)
        reply_length = len(input_ids) - prompt_length
        assert features == {"input_ids": input_ids, "loss_mask": [0] * prompt_length + [1] * reply_length}
    for row, (prompt, chosen, rejected) in zip(PREFERENCE_TEXT_ROWS, TRL_DPO[bos]):
        features = tokenize_preference(row, "preference", tokenizer, max_length=512)
        assert features == {
            "chosen_input_ids": prompt + chosen,
            "chosen_loss_mask": [0] * len(prompt) + [1] * len(chosen),
            "rejected_input_ids": prompt + rejected,
            "rejected_loss_mask": [0] * len(prompt) + [1] * len(rejected),
            "prompt_length": len(prompt),
        }
    # A text prompt for generation is tokenizer(prompt), as GRPOTrainer encodes a plain-text prompt.
    features = tokenize_prompt({"prompt": "Count"}, "prompt", tokenizer)
    assert features["prompt_input_ids"] == tokenizer("Count")["input_ids"]


def test_text_rows_use_no_template_and_end_with_eos():
    tokenizer = build_tokenizer()
    features = tokenize_sft({"prompt": "Hi", "completion": " Hello!"}, "prompt_completion", tokenizer, 512)
    assert tokenizer.decode(features["input_ids"]) == f"Hi Hello!{END_OF_TURN}"
    assert tokenizer.decode([t for t, keep in zip(features["input_ids"], features["loss_mask"]) if keep]) == (
        f" Hello!{END_OF_TURN}"
    )
    # A row that mixes a text prompt with a message-list completion is conversational.
    mixed = {"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello!"}]}
    assert tokenizer.decode(tokenize_sft(mixed, "prompt_completion", tokenizer, 512)["input_ids"]) == (
        f"<|user|>\nHi{END_OF_TURN}<|assistant|>\nHello!{END_OF_TURN}"
    )
    json.dumps(features)  # plain lists, ready for the collators


def test_job_preflight_loads_the_local_tokenizer_and_refuses_its_template(tmp_path):
    from align.preflight import check_job
    from align.spec import parse_spec

    model = tmp_path / "mistral"
    style_tokenizer("mistral_v3").save_pretrained(model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # safetensors: no tensors
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": TURNS}) + "\n" + json.dumps({"messages": [SYSTEM, *TURNS]}) + "\n")
    job = parse_spec({"name": "j", "base_model": str(model), "stages": [{"type": "sft", "data": {"path": str(data)}}]})
    with pytest.raises(TemplateError, match=f"^{data} row 1: the Mistral \\[INST\\] chat template"):
        check_job(job)
    data.write_text(json.dumps({"messages": TURNS}) + "\n")
    check_job(job)
