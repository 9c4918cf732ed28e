"""Chat templates: where they come from, how they render, and that the sandbox holds."""

from __future__ import annotations

import json

import pytest

from server.chat_template import (DEFAULT_CHAT_TEMPLATE, TEMPLATE_FILE, ChatTemplate, ChatTemplateError,
                                  find_template)
from server.errors import InvalidRequest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_default_template():
    t = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    assert t.render(MESSAGES) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert t.render(MESSAGES, add_generation_prompt=False) == "System: Be brief.\n\nUser: Hi\n\n"


def test_template_sources_in_order(tmp_path):
    assert find_template(tmp_path, None) == (DEFAULT_CHAT_TEMPLATE, "default")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    assert find_template(tmp_path, None)[0] == "{{ messages[0].content }}"
    (tmp_path / TEMPLATE_FILE).write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    source, origin = find_template(tmp_path, None)
    assert origin.endswith(TEMPLATE_FILE)
    assert ChatTemplate(source).render(MESSAGES) == "<system>Be brief.<user>Hi"
    override = tmp_path / "mine.jinja"
    override.write_text("X")
    assert find_template(tmp_path, override) == ("X", str(override))


def test_continue_final_message():
    t = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    msgs = MESSAGES + [{"role": "assistant", "content": "Hello, I"}]
    assert t.render(msgs, add_generation_prompt=False, continue_final_message=True).endswith("Assistant: Hello, I")


def test_rejections_are_client_errors():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    with pytest.raises(InvalidRequest, match="user first"):
        t.render(MESSAGES)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")


def test_sandbox_blocks_python_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest):
        t.render(MESSAGES)
