"""Prompt templates: styles, engine syntax, raw-text rendering."""

import pytest

from deepretrieval.data import prompts


def test_reasoning_prompt_opens_think_and_asks_for_json_answer():
    style = prompts.get_style("reasoning")
    assert style.think_in_prompt and style.assistant_prefix.endswith("<think>\n")
    content = prompts.build_user_content("pico_publication", "P: adults\nI: x\nC: y\nO: z", "pubmed")
    assert "<think> </think>" in content and "<answer>" in content and '"query"' in content
    assert prompts.ENGINE_SYNTAX["pubmed"] in content
    assert content.endswith("The research is defined by the following PICO:\nP: adults\nI: x\nC: y\nO: z")


def test_no_reason_prompt_has_no_think_instructions():
    style = prompts.get_style("no_reason")
    assert not style.reasoning and not style.think_in_prompt and style.assistant_prefix == ""
    content = prompts.build_user_content("review_question", "Statins for stroke?", "local", "no_reason")
    assert "<think>" not in content and "<answer>" in content
    assert prompts.ENGINE_SYNTAX["local"] in content


def test_reasoning_free_style_lets_model_open_think():
    style = prompts.get_style("reasoning_free")
    assert style.reasoning and not style.think_in_prompt


@pytest.mark.parametrize("engine", ["pubmed", "ctgov", "local", "local_trials"])
def test_each_engine_gets_its_own_syntax(engine):
    content = prompts.build_user_content("pico_trial", "P: a", engine)
    others = [text for name, text in prompts.ENGINE_SYNTAX.items() if name != engine]
    assert prompts.ENGINE_SYNTAX[engine] in content and not any(o in content for o in others)


def test_unknown_names_raise():
    with pytest.raises(ValueError):
        prompts.get_style("chatty")
    with pytest.raises(ValueError):
        prompts.build_user_content("poetry", "x", "pubmed")
    with pytest.raises(ValueError):
        prompts.build_user_content("pico_trial", "x", "google")


def test_messages_and_raw_text_rendering():
    messages = prompts.build_messages("patient_trials", "A 58-year-old woman.", "local")
    assert [m["role"] for m in messages] == ["user"]
    text = prompts.render_raw_text(messages, prompts.get_style("reasoning").assistant_prefix)
    assert text.startswith(prompts.BASE_PREAMBLE)
    assert "\nUser: The Assistant is a clinical research coordinator." in text
    assert text.endswith("A 58-year-old woman.\nAssistant: Let me solve this step by step.\n<think>\n")


def test_format_pico():
    assert prompts.format_pico({"P": " adults ", "I": "aspirin", "C": None, "O": "stroke"}) == (
        "P: adults\nI: aspirin\nC: \nO: stroke"
    )


def test_original_style_frame_and_raw_rows():
    style = prompts.get_style("original")
    assert style.think_in_prompt and style.assistant_prefix == "Let me solve this step by step. \n<think>\n"
    text = prompts.build_original_prompt(prompts.format_pico_original({"P": "a", "I": "b", "C": None, "O": "d"}))
    assert text.startswith(prompts.BASE_PREAMBLE + "\n\nThe Assistant is a clinical specialist.")
    assert text.endswith("User: The research is defined by the following PICO:\nP: a\nI: b\nC: None\nO: d\n"
                         "\nAssistant: Let me solve this step by step. \n<think>\n")
    assert prompts.is_raw_frame({"extra_info": {"prompt_style": "original"}})
    assert prompts.is_raw_frame({"data_source": "literature", "ability": "literature_mining"})
    assert prompts.is_raw_frame({"data_source": "pubmed", "ability": "literature_mining"})  # later original files
    assert not prompts.is_raw_frame({"data_source": "pubmed", "ability": "literature_search"})
    assert not prompts.is_raw_frame({"data_source": "pubmed", "extra_info": {"prompt_style": "reasoning"}})
