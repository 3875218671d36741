"""Chat rendering on the device, without torch or transformers: the model's own chat template, run with jinja2.

The exporter writes ``chat_template.json`` into the artifact (the tokenizer's ``chat_template``, a string or a
dict of named templates, and its ``special_tokens_map``: ``bos_token``, ``eos_token``, ...). ``ChatTemplate``
renders a conversation the way ``transformers``' ``tokenizer.apply_chat_template(messages, tools=...)`` does
(read from ``transformers/utils/chat_template_utils.py``): the same sandboxed environment (immutable sandbox,
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a pass-through ``{% generation %}`` tag), the same globals
(``raise_exception``, ``strftime_now``, a safe ``dict`` and ``namespace``), a ``tojson`` filter that does not
escape HTML, messages with ``None`` values dropped and reasoning fields aliased, the special tokens' strings as
variables, and the rendered text tokenized without adding special tokens. The ids equal transformers' (tests
check it on real templates).

Which tokens train (``tokenize``): by default the assistant turns only. Each assistant message's span is found
by rendering prefixes (as TRL and mlx-lm do): it starts where ``messages[:i]`` rendered with the generation
prompt ends and ends where ``messages[:i+1]`` rendered ends, trailing whitespace excluded, so the assistant's
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``) is trained and the model learns to stop, while the
template's next header is not. Where a template renders an earlier turn differently once later turns follow
(some drop old reasoning), the prefix renders are not prefixes of the whole; the span then starts where the
message's content appears in the rendered text (after the previous span) and runs through the longest end of
the text the prefix render puts after the content (its end-of-turn) found right after it. A token trains when its
character span overlaps an assistant span, so a token merged across the boundary (a SentencePiece word with its
leading space) trains. ``train_all`` trains every token.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..artifact.files import CHAT_TEMPLATE
from ..errors import UserError
from ..fileio import atomic_write_json

ROLES = ("system", "developer", "user", "assistant", "tool")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases of a message's reasoning


def _environment():
    """The sandboxed jinja2 environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers' tracker, inactive)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        """``dict(...)`` without attribute access to the real type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` refusing underscore-prefixed attributes."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot store the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


class ChatTemplate:
    """A model's chat template and its special tokens' strings, rendered and tokenized like transformers."""

    def __init__(self, template: str | dict[str, str] | None, special_tokens: dict[str, str]):
        self.template, self.special_tokens = template, dict(special_tokens)
        self._env = None
        self._compiled: dict[str, Any] = {}

    @classmethod
    def load(cls, artifact: str | Path) -> "ChatTemplate | None":
        """The artifact's chat template, or None for an artifact exported before it was carried."""
        path = Path(artifact) / CHAT_TEMPLATE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data.get("chat_template"), data.get("special_tokens") or {})

    def save(self, directory: str | Path) -> None:
        """Write ``chat_template.json`` into an artifact directory (the exporter's call)."""
        atomic_write_json(Path(directory) / CHAT_TEMPLATE,
                          {"chat_template": self.template, "special_tokens": self.special_tokens})

    def source(self, tools: list | None, where: str) -> str:
        """The template text transformers would pick: the single one, or of a dict ``tool_use`` with tools, else
        ``default``."""
        if isinstance(self.template, dict):
            name = "tool_use" if tools is not None and "tool_use" in self.template else "default"
            if name in self.template:
                return self.template[name]
        elif self.template:
            return self.template
        raise UserError(f"{where}: the model has no chat template to render messages with: use {{\"text\"}} or "
                        "{\"prompt\", \"completion\"} lines, or export a model whose tokenizer has one")

    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
               where: str = "chat") -> str:
        """The conversation as text; a template error is one line naming ``where``."""
        import jinja2

        text = self.source(tools, where)
        if text not in self._compiled:
            self._env = self._env or _environment()
            try:
                self._compiled[text] = self._env.from_string(text)
            except jinja2.TemplateSyntaxError as exc:
                raise UserError(f"the model's chat template does not parse ({exc.message}, line {exc.lineno}): "
                                "fix chat_template.json or re-export the model") from None
        chat = _normalized(messages)
        try:
            return self._compiled[text].render(messages=chat, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as exc:  # a template's raise_exception, undefined values, type errors
            raise UserError(f"{where}: the chat template failed ({type(exc).__name__}: {_first_line(exc)}): "
                            "fix the messages to fit the model's chat format") from None

    def encode(self, tokenizer, messages: list[dict], tools: list | None = None,
               add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation (``apply_chat_template(..., tokenize=True)``)."""
        return list(tokenizer.encode(self.render(messages, tools, add_generation_prompt), add_special_tokens=False).ids)

    def tokenize(self, tokenizer, messages: list[dict], tools: list | None, train_all: bool,
                 where: str) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether it is trained (assistant turns, or all)."""
        rendered = self.render(messages, tools, where=where)
        encoding = tokenizer.encode(rendered, add_special_tokens=False)
        ids = list(encoding.ids)
        if train_all:
            return ids, [True] * len(ids)
        spans = self.assistant_spans(messages, tools, rendered, where)
        trained = [any(end > a and start < b for a, b in spans) for start, end in encoding.offsets]
        return ids, trained

    def assistant_spans(self, messages: list[dict], tools: list | None, rendered: str,
                        where: str) -> list[tuple[int, int]]:
        """Character spans of the assistant messages (content and end-of-turn) in ``rendered``."""
        spans: list[tuple[int, int]] = []
        done = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], tools, add_generation_prompt=True, where=where) if i else ""
            through = self.render(messages[: i + 1], tools, where=where)
            content = message.get("content") if isinstance(message.get("content"), str) else ""
            if rendered.startswith(before) and rendered.startswith(through) and len(before) <= len(through):
                start, end = len(before), len(through.rstrip())
            else:
                found = rendered.find(content, done) if content else -1
                if found < 0:
                    continue
                start, end = found, found + len(content)
                end += _end_of_turn(through, content, rendered, end)
            if end > start:
                spans.append((start, end))
                done = end
        return spans


def _end_of_turn(through: str, content: str, rendered: str, at: int) -> int:
    """Length of the end-of-turn text at ``rendered[at:]``: the longest end of what ``through`` puts after the
    content (trailing whitespace excluded) found within that many characters."""
    tail = through[through.rfind(content) + len(content):].rstrip()
    for k in range(len(tail)):
        found = rendered.find(tail[k:], at, at + len(tail))
        if found >= 0:
            return found + len(tail) - k - at
    return 0


def _normalized(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to the template: ``None`` values dropped, reasoning aliased."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def check_messages(messages: Any, tools: Any, where: str) -> None:
    """One-line errors for a conversation that is not a list of ``{"role", "content"}`` objects with known roles."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    if tools is not None and not isinstance(tools, list):
        raise UserError(f'{where}: "tools" must be a list of tool (function) schemas')
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or not (
                "content" in message or (message.get("role") == "assistant" and message.get("tool_calls"))):
            found = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise UserError(f'{where}: message {n} lacks "role" or "content" (found {found}): '
                            'give every message both')
        if message["role"] not in ROLES:
            raise UserError(f"{where}: message {n} has the unknown role {message['role']!r}: use one of "
                            f"{', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise UserError(f'{where}: message {n} has a non-string "content": give its text as one string')


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
