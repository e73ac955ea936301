"""Chat templates: how a conversation becomes one string for the tokenizer.

data.chat_template picks one: unset, the tokenizer's own; a name below; or a path to a Jinja
file (the format transformers' apply_chat_template renders). The choice is set on the
tokenizer the run loads, so checkpoints and exports carry the template they trained with.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ftdist.errors import UserError

# ChatML: each turn is <|im_start|>role\ncontent<|im_end|>\n.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, after the BOS token.
LLAMA3 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

NAMED = {"chatml": CHATML, "llama3": LLAMA3}
CHAT_FORMATS = ("chat", "alpaca", "sharegpt")  # formats rendered through the chat template


def is_named(choice: str) -> bool:
    return choice in NAMED


def check_choice(choice: Optional[str]) -> None:
    """Preflight: a Jinja file named by data.chat_template exists, reads as text, compiles, and
    renders a short conversation without reaching outside Jinja's sandbox."""
    if choice is not None and not is_named(choice):
        text = template_text(choice)
        with rendering(f"data.chat_template {choice}", CONFIG_FIX):
            render_sample(text)


CONFIG_FIX = "fix the file, or set data.chat_template to another (chatml, llama3 or a Jinja file's path)"
SAMPLE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]


def render_sample(text: str) -> None:
    """`text` compiled and rendered with SAMPLE in the sandbox transformers renders chat templates
    in (ImmutableSandboxedEnvironment): a syntax error or a sandbox escape raises; a template that
    refuses this conversation (raise_exception) is left to the real rows."""
    import jinja2
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' {% generation %}...{% endgeneration %}: here, its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(text)
    try:
        template.render(messages=SAMPLE, add_generation_prompt=True, bos_token="", eos_token="")
    except SecurityError:
        raise
    except Exception:  # noqa: BLE001 - the template's own refusal of the sample: the rows decide
        pass


@contextmanager
def rendering(where: str, fix: str) -> Iterator[None]:
    """Rendering with the chat template `where` names (data.chat_template FILE, a tokenizer's):
    Jinja's errors become one message naming the template, what went wrong and `fix`. A
    template that tries to leave the sandbox (Python attributes, changing the conversation)
    is stopped by Jinja; this tells it."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

    try:
        yield
    except SecurityError as e:
        raise UserError(f"{where}: the template tried to reach outside Jinja's sandbox ({e}), which a chat "
                        f"template may not (it only formats the conversation); {fix}") from None
    except TemplateSyntaxError as e:
        raise UserError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message}); {fix}") from None
    except TemplateError as e:
        raise UserError(f"{where}: the template failed: {e}; {fix}") from None


def describe_template(choice: Optional[str], tokenizer) -> tuple[str, str]:
    """(what names the chat template a run renders with, how to fix it) for `rendering`."""
    if choice is not None:
        return f"data.chat_template {choice}", CONFIG_FIX
    name = getattr(tokenizer, "name_or_path", "")
    return (f"the chat template of the tokenizer {name}" if name else "the tokenizer's chat template",
            "set data.chat_template to one that works (chatml, llama3 or a Jinja file's path)")


def template_text(choice: str) -> str:
    if is_named(choice):
        return NAMED[choice]
    path = Path(choice)
    if not path.is_file():
        raise UserError(f"data.chat_template: {choice} is neither a named template ({', '.join(NAMED)}) "
                        "nor a Jinja file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.chat_template: {choice}: not valid UTF-8 text") from None
    except PermissionError as e:
        raise UserError(f"data.chat_template: cannot read {choice} ({e.strerror}); give this user read access to "
                        "it, or copy it somewhere it can read") from None


def apply_choice(tokenizer, choice: Optional[str]) -> None:
    """Set data.chat_template on the tokenizer (unset: keep its own)."""
    if choice is not None:
        tokenizer.chat_template = template_text(choice)


def require_template(tokenizer, fmt: str) -> None:
    """`fmt`: a format, or a mixture's formats joined by "+"."""
    chat = [f for f in fmt.split("+") if f in CHAT_FORMATS]
    if chat and not getattr(tokenizer, "chat_template", None):
        fmt = chat[0]
        raise UserError(f"data.format {fmt} renders each row with a chat template, and this tokenizer has none; "
                        f"set data.chat_template: chatml (or {', '.join(n for n in NAMED if n != 'chatml')}, "
                        "or a Jinja file's path), or model.tokenizer to one with a template")
