"""Chat templates: how a conversation becomes one string for the tokenizer.

data.chat_template picks one: unset, the tokenizer's own; a name below; or a path to a Jinja
file (the format transformers' apply_chat_template renders). The choice is set on the
tokenizer the run loads, so checkpoints and exports carry the template they trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    """Preflight: a Jinja file named by data.chat_template exists and reads as text."""
    if choice is not None and not is_named(choice):
        template_text(choice)


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
