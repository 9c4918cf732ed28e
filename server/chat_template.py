"""Chat templates: messages -> one prompt string, rendered in a sandboxed Jinja2 environment.

Where the template comes from, first match wins: `--chat-template FILE`; `chat_template.jinja` in the
model directory; the "chat_template" string of the model directory's tokenizer_config.json (Hugging
Face's convention); else DEFAULT_CHAT_TEMPLATE, a plain-text layout that small models trained on plain
text can continue. Templates see `messages` (role, content), `add_generation_prompt`, `eos_token` and
`bos_token`, as in Hugging Face, and may call raise_exception(msg) to reject a conversation (400).
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.errors import InvalidRequest

TEMPLATE_FILE = "chat_template.jinja"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The configured template does not compile (start-up error)."""


class _Rejected(Exception):
    pass


def _raise(message: str):
    raise _Rejected(message)


def find_template(model_dir: Path, override: Path | None) -> tuple[str, str]:
    """(template source, where it came from)."""
    if override is not None:
        return Path(override).read_text(), str(override)
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text(), str(model_dir / TEMPLATE_FILE)
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tpl = json.loads(cfg.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            tpl = None
        if isinstance(tpl, str):
            return tpl, f"{cfg}:chat_template"
    return DEFAULT_CHAT_TEMPLATE, "default"


class ChatTemplate:
    """A compiled, sandboxed chat template."""

    def __init__(self, source: str, origin: str = "default", eos_token: str = "", bos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template {origin}: {e}") from None
        self.origin, self.eos_token, self.bos_token = origin, eos_token, bos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """The prompt text; 400 if the template rejects the conversation."""
        try:
            text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        eos_token=self.eos_token, bos_token=self.bos_token)
        except _Rejected as e:
            raise InvalidRequest(f"chat template: {e}", param="messages") from None
        except (TemplateError, TypeError, ValueError) as e:  # a template bug or odd input: still the client's 400
            raise InvalidRequest(f"chat template could not render these messages ({e})",
                                 param="messages") from None
        if continue_final_message and messages and messages[-1]["role"] == "assistant":
            final = messages[-1]["content"]
            cut = text.rfind(final)
            text = text[: cut + len(final)] if final and cut >= 0 else text
        return text
