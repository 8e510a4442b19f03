"""Compile and render a configured chat template before any job, the way transformers will.

A template with a syntax error, or one that raises on the conversation every job renders (a user
turn, after ``model.system_prompt``'s system turn when set), otherwise fails in the first GPU job,
after the prompts and the GGUF conversion ran. Torch-free: Snakemake runs this while it parses the
workflow, so it uses Jinja directly with the environment transformers builds (sandboxed, trimmed
blocks, loop controls, ``raise_exception``, the ``{% generation %}`` tag) instead of importing it.
"""

from __future__ import annotations

from datetime import datetime

from .errors import ConfigError

SAMPLE_PROMPT = "How do I make a cup of tea?"


def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}`` marks assistant text for masks; it renders its body."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def check(text: str, system_prompt: str | None, source: str = "model.chat_template") -> None:
    """Raise ConfigError naming ``source`` when ``text`` does not compile, raises on a sample
    conversation, or renders without the user's prompt."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    env = _environment()
    try:
        template = env.from_string(text)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{source} does not compile: {exc.message} (template line {exc.lineno})") from exc
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": SAMPLE_PROMPT})
    turns = "a system turn (model.system_prompt) and a user turn" if system_prompt is not None else "a user turn"
    try:
        rendered = template.render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                   eos_token="</s>", tools=None, documents=None)
    except TemplateError as exc:
        hint = "; set model.system_prompt to null if it takes no system turn" if system_prompt is not None else ""
        raise ConfigError(f"{source} fails on {turns}: {exc}{hint}") from exc
    except Exception as exc:  # a template is code: a TypeError in it is the template's fault too
        raise ConfigError(f"{source} fails on {turns}: {type(exc).__name__}: {exc}") from exc
    if SAMPLE_PROMPT not in rendered:
        raise ConfigError(f"{source} renders {turns} without the user's text (got {rendered[:120]!r}); "
                          "it must write messages[i]['content']")
