"""Input of `deepmoe data prepare` (docs/design.md#t2-data): the input files (txt, JSON Lines, parquet) streamed
document by document, each with the file and line it came from, and chat conversations rendered with a
tokenizer's chat template (jinja2, as transformers does) together with the character spans of the assistant
turns that count in the loss."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from deepmoe.data.sources import TEXT_EXTENSIONS

INPUT_FORMATS = ("auto", "txt", "jsonl", "parquet")
JSONL_EXTENSIONS = frozenset({".jsonl", ".json"})
PARQUET_EXTENSIONS = frozenset({".parquet"})
TXT_EXTENSIONS = TEXT_EXTENSIONS - JSONL_EXTENSIONS
MAX_DOCUMENT_CHARS = 1_000_000
"""A txt document longer than this (characters) is cut into pieces of about this size (bounded memory)."""
_READ_CHUNK = 1 << 16
ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""The chat template used when the tokenizer has none: `<|role|>` NEWLINE content, a newline after a system or
user turn, the end-of-text token right after an assistant turn (`<|user|>\\nHi\\n<|assistant|>\\nHello<eot>`)."""


class BadInput(ValueError):
    """One document of the input that cannot be used; the message starts with "FILE:LINE:"."""


@dataclass
class SourceStats:
    """One input file as index.json lists it."""

    path: str
    format: str
    bytes: int = 0
    sha256: str = ""
    documents: int = 0
    skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def input_files(inputs: list[str | os.PathLike], fmt: str = "auto") -> list[tuple[Path, str]]:
    """(absolute path, format) of every input file: a file as given, a folder's files recursively in sorted order
    (hidden ones skipped) whose extension belongs to `fmt` (auto: any known one). ValueError naming the path
    for a missing path, a file whose format the extension does not tell, or no input file at all."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {fmt!r}: expected one of {', '.join(INPUT_FORMATS)}")
    wanted = {"txt": TXT_EXTENSIONS, "jsonl": JSONL_EXTENSIONS, "parquet": PARQUET_EXTENSIONS}
    known = TXT_EXTENSIONS | JSONL_EXTENSIONS | PARQUET_EXTENSIONS if fmt == "auto" else wanted[fmt]
    files: list[tuple[Path, str]] = []
    for item in inputs:
        root = Path(os.path.abspath(Path(item).expanduser()))
        if root.is_file():
            files.append((root, format_of(root, fmt)))
        elif root.is_dir():
            found = []
            for directory, dirs, names in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                found += [
                    Path(directory) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in known
                ]
            files += [(f, format_of(f, fmt)) for f in sorted(found, key=lambda f: f.relative_to(root).as_posix())]
        else:
            raise ValueError(f"input {str(root)!r} does not exist")
    if not files:
        raise ValueError(f"no input files in {', '.join(map(str, inputs))} (looked for {', '.join(sorted(known))})")
    return files


def format_of(path: Path, fmt: str = "auto") -> str:
    """`fmt`, or with "auto" the format the extension tells (ValueError naming the file when it tells none)."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    for name, extensions in (("jsonl", JSONL_EXTENSIONS), ("parquet", PARQUET_EXTENSIONS), ("txt", TXT_EXTENSIONS)):
        if suffix in extensions:
            return name
    raise ValueError(f"{path}: cannot tell the input format from the extension {suffix!r}: give --format")


def read_source(path: Path, fmt: str, field: str, stats: SourceStats, chat: ChatRenderer | None = None) -> Iterator:
    """The documents of one file in order: a str (text), or (rendered text, assistant spans) with `chat`; a
    `BadInput` for a document that cannot be used (the caller fails or skips). Fills `stats.bytes` and
    `stats.sha256` (of the bytes read)."""
    stats.bytes = path.stat().st_size
    digest = hashlib.sha256()
    if fmt == "txt":
        yield from _txt_documents(path, digest)
    elif fmt == "jsonl":
        for location, record in _jsonl_records(path, digest):
            if isinstance(record, BadInput):
                yield record
            elif chat is not None:
                yield _conversation(location, record, chat)
            else:
                yield _text_field(location, record, field)
    elif fmt == "parquet":
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        yield from _parquet_documents(path, field)
    else:
        raise ValueError(f"unknown input format {fmt!r}")
    stats.sha256 = digest.hexdigest()


def _txt_documents(path: Path, digest) -> Iterator[str]:
    """Paragraphs (runs of non-blank lines) of a UTF-8 text file, without the last line break; one longer than
    `MAX_DOCUMENT_CHARS` is cut into pieces. Invalid UTF-8 is an error naming the line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    size, line, at_line_start = 0, 0, True
    with open(path, "rb") as f:
        while True:
            raw = f.readline(_READ_CHUNK)
            if not raw:
                break
            digest.update(raw)
            line += at_line_start
            whole_line, at_line_start = at_line_start, raw.endswith(b"\n")
            try:
                piece = decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
            if line == 1 and whole_line:
                piece = piece.removeprefix("\ufeff")
            piece = piece.replace("\r\n", "\n")
            if whole_line and at_line_start and not piece.strip():
                if parts:
                    yield "".join(parts).removesuffix("\n")
                    parts, size = [], 0
                continue
            parts.append(piece)
            size += len(piece)
            if size >= MAX_DOCUMENT_CHARS:
                yield "".join(parts).removesuffix("\n")
                parts, size = [], 0
        try:
            tail = decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
        parts.append(tail)
    if "".join(parts).strip():
        yield "".join(parts).removesuffix("\n")


def _jsonl_records(path: Path, digest) -> Iterator[tuple[str, dict | BadInput]]:
    """("FILE:LINE", the JSON object) of each non-blank line, or a `BadInput`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            digest.update(raw)
            location = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield location, BadInput(f"{location}: not UTF-8 text ({e.reason})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip())
            except json.JSONDecodeError as e:
                yield location, BadInput(f"{location}: malformed JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(record, dict):
                yield location, BadInput(f"{location}: not a JSON object but a {type(record).__name__}")
                continue
            yield location, record


def _check_text(location: str, value, field: str) -> str | BadInput:
    if value is None:
        return BadInput(f"{location}: has no field {field!r}")
    if not isinstance(value, str):
        return BadInput(f"{location}: field {field!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        return BadInput(f"{location}: empty document (field {field!r} holds no text)")
    return value


def _text_field(location: str, record: dict, field: str) -> str | BadInput:
    return _check_text(location, record.get(field), field)


def _parquet_documents(path: Path, field: str) -> Iterator[str | BadInput]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own errors
        raise ValueError(f"{path}: not a readable parquet file: {str(e).splitlines()[0]}") from None
    if field not in file.schema_arrow.names:
        raise ValueError(f"{path}: has no column {field!r} (columns: {', '.join(file.schema_arrow.names)})")
    row = 0
    for batch in file.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _check_text(f"{path}:row {row}", value, field)


# ---- chat ---------------------------------------------------------------------------------------------


def _token_text(value) -> str:
    """A special token of tokenizer_config.json: a string or an AddedToken-like {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatRenderer:
    """Renders conversations with a jinja2 chat template the way transformers does (sandboxed, trim_blocks,
    lstrip_blocks, `raise_exception`, variables messages, bos_token, eos_token, add_generation_prompt)."""

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template_source = template or DEFAULT_CHAT_TEMPLATE
        self.template = env.from_string(self.template_source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_config(cls, config: dict | None, eot_token: str) -> ChatRenderer:
        """The renderer of a tokenizer_config.json (its `chat_template`, bos and eos tokens), else the default
        template with `eot_token` as the end-of-turn token."""
        config = config or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        eos = _token_text(config.get("eos_token")) or eot_token
        return cls(template if isinstance(template, str) else None, _token_text(config.get("bos_token")), eos)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn: its content and what the
        template puts right after it up to the next turn (the end-of-turn token; trailing whitespace left out).
        Each turn is found by rendering the conversation up to it; ValueError where the template does not
        render a conversation as the concatenation of its prefixes or leaves an assistant content out."""
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = None
            for prefix in (self.render(messages[:k], add_generation_prompt=True), self.render(messages[:k])):
                if text.startswith(prefix):
                    start = len(prefix)
                    break
            turn = self.render(messages[: k + 1])
            if start is None or not text.startswith(turn):
                raise ValueError("the chat template does not render a conversation as its prefixes followed by a turn")
            a = text.find(message["content"], start)
            b = a + len(message["content"])
            if a < 0 or b > len(turn):
                raise ValueError(f"the chat template leaves out the content of message {k} (assistant)")
            spans.append((a, b + len(text[b : len(turn)].rstrip())))
        return text, spans


def check_conversation(location: str, record: dict) -> list[dict] | BadInput:
    """The messages of a chat record, or a `BadInput` naming what is wrong."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return BadInput(f"{location}: has no 'messages' list (chat input is {{\"messages\": [{{role, content}}]}})")
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            return BadInput(f"{location}: message {k} is not a JSON object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return BadInput(f"{location}: message {k} has the unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            return BadInput(f"{location}: message {k} ({role}) has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        return BadInput(f"{location}: the conversation has no assistant turn (nothing to learn from)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _conversation(location: str, record: dict, chat: ChatRenderer) -> tuple[str, list] | BadInput:
    messages = check_conversation(location, record)
    if isinstance(messages, BadInput):
        return messages
    try:
        return chat.render_with_spans(messages)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateError and the template's raise_exception
        return BadInput(f"{location}: cannot render the conversation: {str(e).splitlines()[0] if str(e) else e}")
