"""The configured chat template is compiled and rendered before any job, as transformers renders it."""

from __future__ import annotations

import pytest
from abliterate import chat_template_check
from abliterate.errors import ConfigError
from tiny_tokenizer import tiny_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_templates_transformers_renders_pass_and_render_alike():
    tokenizer = tiny_tokenizer()
    for template in (tokenizer.chat_template, CHATML,
                     "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"):
        chat_template_check.check(template, None)
        chat_template_check.check(template, "Be brief.")
    tokenizer.chat_template = CHATML
    messages = [{"role": "user", "content": chat_template_check.SAMPLE_PROMPT}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    env = chat_template_check._environment()
    assert env.from_string(CHATML).render(messages=messages, add_generation_prompt=True) == expected


@pytest.mark.parametrize("template, system, message", [
    ("{% for m in messages %}{{ m.content }", None, r"does not compile: .*line 1"),
    (("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
      "{{ messages[-1].content }}"), "Be brief.", r"fails on a system turn .*System role not supported.*null"),
    ("{{ messages[0].content + 1 }}", None, r"fails on a user turn: TypeError"),
    ("{% for m in messages %}{{ m.role }}{% endfor %}", None, r"renders a user turn without the user's text"),
])
def test_broken_templates_are_refused_naming_the_key(template, system, message):
    with pytest.raises(ConfigError, match=r"model\.chat_template " + message):
        chat_template_check.check(template, system)
