"""Chat SFT at prepare time: conversations in, token ids and a per-token loss mask out.

    python -m train.prepare --task sft --input chats.jsonl --tokenizer models/qwen --output data/chat
    python -m train.prepare --task sft --input python-stdlib-chat --train-tokenizer 4096 \\
        --output data/stdlib-chat            # the embedded offline corpus, built-in chatml

Formats (detected from the first record and named in the summary; `--messages-field` names a
messages field explicitly):
  messages           OpenAI style: {"messages": [{"role", "content"}, ...]}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
  alpaca             {"instruction", "input" (optional), "output"}
  prompt-completion  {"prompt", "completion"} (strings, or lists of messages as TRL has them)

Each conversation is rendered whole, once, with the chat template (transformers' own Jinja
renderer, the one `apply_chat_template` calls), never turn by turn: BPE does not compose across
a seam. Which characters the assistant said comes from the template's `{% generation %}`
markers, as `apply_chat_template(..., return_assistant_tokens_mask=True)` computes it (a token
overlapping a marked span is an assistant token); tests/test_chat.py checks the two agree token
for token. A template without markers is refused unless `--mask-strategy prefix`, which
recovers each assistant turn as the tokens that render(msgs[:k+1]) adds to
render(msgs[:k], add_generation_prompt=True), and refuses a template for which that is not an
exact token prefix (one that rewrites history).

Why not call apply_chat_template itself: text in a message that spells a control token (a user
typing "<|im_end|>") would become that token's id, and its own guard against that
(`sanitize_control_tokens`) cannot be combined with the assistant mask. Here such text is
wrapped in private-use markers before rendering, tokenized as plain text, and counted
(`--special-tokens-in-content error` refuses it instead). Batched encoding is also what makes
prepare several times faster than a per-conversation `datasets.map` (benchmarks/).

The mask written to disk is shift-aware: token t is trained exactly when token t+1 is an
assistant token of the same conversation. Codes (int16, the label stream's dtype): bit 0 set =
trained, bit 1 set = the conversation's first token (the offsets; conversation boundaries never
come from the EOS id, which is also the end-of-turn of some templates).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from train.errors import UsageError

STDLIB_CHAT = "python-stdlib-chat"
FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "model": "assistant", "system": "system"}
MASK_STRATEGIES = ("generation", "prefix")
TRAINED, CONVERSATION_START = 1, 2  # the bits of a mask code
TEMPLATE_FILE = "chat_template.jinja"  # beside tokenizer.json, where transformers 5 looks
SAMPLE_FILE = "chat_sample.json"  # a few conversations and their ids: export's parity check
SAMPLE_SIZE = 16

# ChatML with generation markers, for a tokenizer that has no template of its own (the tiny
# tokenizers the project trains). Its control tokens are added to a tokenizer trained for it.
CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}
BUILTIN_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"]}
BUILTIN_END_OF_TURN = {"chatml": "<|im_end|>"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Private-use characters that wrap control-token text inside message contents while rendering.
ESCAPE_OPEN, ESCAPE_CLOSE = "\ue000", "\ue001"


# ---------------------------------------------------------------------------------------------
# Records -> conversations (lists of {role, content}), checked
# ---------------------------------------------------------------------------------------------

@dataclass
class Conversation:
    messages: list[dict]
    where: str  # "path line N": what an error names

    @cached_property
    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    def __len__(self) -> int:  # characters, for prepare's batching (asked twice per document)
        return self.chars


class ConversationBatch:
    """A batch of conversations on its way to a worker process: pickled as flat lists (where,
    messages per conversation, roles, contents), which pickle 3x faster than the Conversation
    objects and message dicts; it arrives as the list of Conversations it was made from."""

    def __init__(self, conversations: list[Conversation]):
        self.conversations = conversations

    def __reduce__(self):
        convs = self.conversations
        if not all(len(m) == 2 and "role" in m and "content" in m
                   for c in convs for m in c.messages):
            return list, (convs,)
        return _unpack, ([c.where for c in convs], [len(c.messages) for c in convs],
                         [m["role"] for c in convs for m in c.messages],
                         [m["content"] for c in convs for m in c.messages])


def _unpack(wheres: list[str], sizes: list[int], roles: list[str], contents: list[str]
            ) -> list[Conversation]:
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    out, at = [], 0
    for where, n in zip(wheres, sizes):
        out.append(Conversation(messages[at:at + n], where))
        at += n
    return out


def detect_format(record, messages_field: str | None, where: str) -> str:
    """The format of a record: from --messages-field when given, else from its fields."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record is a {type(record).__name__}, not an object with "
                         f"fields; give one JSON object per conversation")
    if messages_field:
        value = record.get(messages_field)
        if not isinstance(value, list) or not value or not isinstance(value[0], dict):
            raise UsageError(f"{where}: --messages-field {messages_field!r} does not hold a list "
                             f"of messages; the record has fields: {', '.join(record)}")
        return "sharegpt" if "from" in value[0] else "messages"
    found = [name for name, present in (
        ("messages", "messages" in record), ("sharegpt", "conversations" in record),
        ("alpaca", "instruction" in record and "output" in record),
        ("prompt-completion", "prompt" in record and "completion" in record)) if present]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"{where}: no chat format recognized in the fields "
                         f"{', '.join(record) or '(none)'}: expected messages, conversations, "
                         f"instruction/output or prompt/completion, or name the field of "
                         f"messages with --messages-field")
    raise UsageError(f"{where}: the record fits several formats ({', '.join(found)}): name the "
                     f"field of messages with --messages-field")


def to_messages(record, fmt: str, messages_field: str | None, where: str) -> list[dict]:
    """A record of a known format -> [{role, content}], checked (check_messages)."""
    if fmt == "alpaca":
        fields = ("instruction", "input", "output")
        _check_strings(record, fields, where, optional=("input",))
        prompt = record["instruction"]
        if record.get("input"):
            prompt += "\n\n" + record["input"]
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": record["output"]}]
    elif fmt == "prompt-completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        else:
            _check_strings(record, ("prompt", "completion"), where)
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion}]
    else:
        field = messages_field or ("conversations" if fmt == "sharegpt" else "messages")
        messages = record.get(field)
        if not isinstance(messages, list):
            raise UsageError(f"{where}: {field!r} is a {type(messages).__name__}, not a list of "
                             f"messages")
        if fmt == "sharegpt":
            messages = [_from_sharegpt(m, where, i) for i, m in enumerate(messages)]
    return check_messages(messages, where)


def _check_strings(record: dict, fields, where: str, optional=()) -> None:
    for name in fields:
        if name not in record and name in optional:
            continue
        if name not in record:
            raise UsageError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], str) and not (name in optional and record[name] is None):
            raise UsageError(f"{where}: field {name!r} is a {type(record[name]).__name__}, not a "
                             f"string")


def _from_sharegpt(message, where: str, i: int) -> dict:
    if not isinstance(message, dict) or "from" not in message:
        raise UsageError(f"{where}: message {i} has no 'from' (ShareGPT messages are "
                         f"{{from, value}})")
    role = SHAREGPT_ROLES.get(message["from"])
    if role is None:
        raise UsageError(f"{where}: message {i} has the unknown role {message['from']!r}; known "
                         f"are {', '.join(SHAREGPT_ROLES)}")
    if "value" not in message:
        raise UsageError(f"{where}: message {i} has no content (ShareGPT's 'value')")
    return {"role": role, "content": message["value"]}


def check_messages(messages: list, where: str) -> list[dict]:
    """Each message a {role, content} with a known role and string content; an assistant turn."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UsageError(f"{where}: message {i} is a {type(message).__name__}, not "
                             f"{{role, content}}")
        role = message.get("role")
        if role not in ROLES:
            raise UsageError(f"{where}: message {i} has the unknown role {role!r}; use one of "
                             f"{', '.join(ROLES)}")
        if "content" not in message:
            raise UsageError(f"{where}: message {i} ({role}) is missing its content")
        content = message["content"]
        if not isinstance(content, str):
            raise UsageError(f"{where}: message {i} ({role}) has content of type "
                             f"{type(content).__name__}, not a string (multimodal parts are not "
                             f"supported)")
        # a record's own {role, content} dict as it is (JSON gives exact dicts and strs); other
        # fields (a name, tool calls) are dropped in a copy
        plain = len(message) == 2 and type(message) is dict and type(content) is str
        out.append(message if plain else {"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UsageError(f"{where}: the conversation has no assistant turn, so nothing to train "
                         f"on; remove it or add the reply")
    return out


# ---------------------------------------------------------------------------------------------
# Sources of conversations
# ---------------------------------------------------------------------------------------------

class ChatSource:
    """One --input of chat records (JSON lines, JSON, Parquet, hf:NAME, or python-stdlib-chat);
    its documents are Conversations. `fmt` is the detected format, once the first is read."""

    def __init__(self, spec: str, messages_field: str | None):
        from train.data import sources

        self.spec, self.messages_field, self.fmt = spec, messages_field, None
        if spec == STDLIB_CHAT:
            self.files, self.fmt = sources.stdlib_files(), "messages"
        elif spec.startswith(sources.HF_PREFIX):
            self.files = []
        else:
            self.files = sources.resolve(spec).files
            wrong = [f for f in self.files if f.suffix not in (".jsonl", ".json", ".parquet")]
            if wrong:
                raise UsageError(f"input {wrong[0]}: --task sft reads .jsonl, .json or .parquet "
                                 f"records (or hf:NAME, or {STDLIB_CHAT})")

    @property
    def total_bytes(self):
        return None  # progress counts conversations

    def describe(self) -> dict:
        from train.data import sources

        return sources.Source(self.spec, self.files).describe()

    def iter_docs(self) -> Iterator[tuple[Conversation, int]]:
        if self.spec == STDLIB_CHAT:
            for messages, where in stdlib_conversations(self.files):
                yield Conversation(messages, where), 1
            return
        formats: dict[tuple, str] = {}
        for record, where in self._records():
            if self.fmt is None:
                self.fmt = detect_format(record, self.messages_field, where)
            elif not self.messages_field and isinstance(record, dict):
                # the format follows from which fields a record has: once per set of fields
                keys = tuple(record)
                fmt = formats.get(keys)
                if fmt is None:
                    fmt = formats[keys] = detect_format(record, None, where)
                if fmt != self.fmt:
                    raise UsageError(f"{where}: a {fmt} record among {self.fmt} records; give "
                                     f"one format per input")
            yield Conversation(to_messages(record, self.fmt, self.messages_field, where),
                               where), 1

    def _records(self) -> Iterator[tuple[object, str]]:
        from train.data import sources

        if self.spec.startswith(sources.HF_PREFIX):
            yield from _hf_records(self.spec)
        for path in self.files:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                for b, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=1024)):
                    for i, record in enumerate(batch.to_pylist()):
                        yield record, f"{path} row {b * 1024 + i}"
                continue
            with open(path, "rb") as f:
                head = f.read(4096).lstrip()
            if head.startswith(b"["):
                records = json.loads(sources.decode(path.read_bytes(), str(path)))
                yield from ((r, f"{path} record {i}") for i, r in enumerate(records))
                continue
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if raw.strip():
                        where = f"{path}:{line_no}"
                        try:
                            yield json.loads(sources.decode(raw, where)), where
                        except json.JSONDecodeError as err:
                            raise UsageError(f"{where}: not valid JSON ({err.msg})") from None


def _hf_records(spec: str):
    import datasets

    from train.data import sources

    name, config, split = sources.parse_hf_spec(spec)
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, record in enumerate(ds):
        yield record, f"{spec} row {i}"


def stdlib_conversations(files: list[Path]) -> Iterator[tuple[list[dict], str]]:
    """The embedded chat corpus: for each public top-level function of the standard library
    with a docstring, a user asks what it does (the answer is the docstring's first paragraph)
    and then for its signature. Every third conversation opens with a system prompt. Read with
    `ast`, never imported: importing the stdlib's modules has side effects."""
    count = 0
    for path in files:
        if "test" in path.parts or "idlelib" in path.parts or path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        module = ".".join(path.with_suffix("").parts[-2:]) if path.parent.name != "lib" \
            and (path.parent / "__init__.py").exists() else path.stem
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            answer = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if not answer:
                continue
            name = f"{module}.{node.name}"
            messages = [{"role": "user", "content": f"What does {name} do?"},
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": "What is its signature?"},
                        {"role": "assistant",
                         "content": f"{name}({ast.unparse(node.args)})"}]
            if count % 3 == 0:
                messages.insert(0, {"role": "system",
                                    "content": "You answer questions about Python's standard "
                                               "library."})
            count += 1
            yield messages, f"{path}:{node.lineno}"


# ---------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------

@dataclass
class ChatTemplate:
    source: str   # the Jinja text
    name: str     # "chatml", the file, or "the tokenizer's"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def has_markers(self) -> bool:
        return _GENERATION_TAG.search(self.source) is not None


def tokenizer_template(tokenizer_dir: Path) -> str | None:
    """The chat template a Hugging Face tokenizer directory carries, if any."""
    path = Path(tokenizer_dir)
    if (path / TEMPLATE_FILE).exists():
        return (path / TEMPLATE_FILE).read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.exists() else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def choose_template(option: str | None, tokenizer_dir: Path | None) -> ChatTemplate:
    """--chat-template FILE or a built-in name; else the tokenizer's own; else refused."""
    if option in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[option], option)
    if option:
        path = Path(option)
        if not path.is_file():
            raise UsageError(f"--chat-template {option}: no such file, and not a built-in "
                             f"template ({', '.join(BUILTIN_TEMPLATES)})")
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    template = tokenizer_template(tokenizer_dir) if tokenizer_dir is not None else None
    if not template:
        raise UsageError(f"the tokenizer {tokenizer_dir} has no chat template: pass "
                         f"--chat-template FILE (Jinja) or --chat-template chatml")
    return ChatTemplate(template, "the tokenizer's")


def check_strategy(template: ChatTemplate, strategy: str) -> None:
    if strategy == "generation" and not template.has_markers:
        raise UsageError(f"chat template {template.name} has no {{% generation %}} markers, so "
                         f"the assistant's tokens cannot be found from it: add the markers "
                         f"around each assistant reply and its end-of-turn token (see "
                         f"docs/sft.md), or pass --mask-strategy prefix")


# ---------------------------------------------------------------------------------------------
# Rendering and encoding: conversations -> (ids, mask codes)
# ---------------------------------------------------------------------------------------------

@dataclass
class ChatOptions:
    template: str
    strategy: str = "generation"
    train_on: str = "all"            # all assistant turns, or the last
    too_long: str = "drop"           # drop | truncate
    max_length: int = 1024
    special_in_content: str = "text"  # text | error
    engine: str = "hf"               # hf | tiktoken (choose_engine decides)


@dataclass
class Encoded:
    """One conversation: ids, which are assistant tokens, how many control strings were
    escaped."""

    ids: np.ndarray
    assistant: np.ndarray  # bool, per token
    escaped: int


class ChatEncoder:
    """Renders and tokenizes conversations with one template and one tokenizer (Hugging Face's,
    or tiktoken built from it, which gives the same ids several times faster)."""

    def __init__(self, tokenizer_dir: Path, options: ChatOptions):
        from tokenizers import Tokenizer

        self.options = options
        self.fast = FastPieces(Path(tokenizer_dir)) if options.engine == "tiktoken" else None
        self.markers = options.strategy == "generation"
        path = str(Path(tokenizer_dir) / "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        self.as_text = Tokenizer.from_file(path)
        self.as_text.encode_special_tokens = True  # special tokens' text stays text
        self.template_kwargs = _special_token_strings(Path(tokenizer_dir))
        specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                           if t.special and t.content.strip()), key=len, reverse=True)
        self.control = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.escaped_piece = re.compile(f"{ESCAPE_OPEN}(.*?){ESCAPE_CLOSE}", re.S)
        self.direct = _direct_renderer(options.template)

    # -- the pieces ----------------------------------------------------------------------------
    def escape(self, messages: list[dict], where: str) -> tuple[list[dict], int]:
        """Wrap control-token text in message contents in private-use markers (or refuse it)."""
        if self.control is None:
            return messages, 0
        count, out = 0, []
        for message in messages:
            content, n = self.control.subn(
                lambda m: ESCAPE_OPEN + m.group(0) + ESCAPE_CLOSE, message["content"])
            if n and self.options.special_in_content == "error":
                found = self.control.search(message["content"]).group(0)
                raise UsageError(f"{where}: a {message['role']} message contains the text of the "
                                 f"control token {found!r}; remove it, or drop "
                                 f"--special-tokens-in-content error to tokenize it as text")
            count += n
            out.append({**message, "content": content} if n else message)
        return out, count

    def render(self, conversations: list[list[dict]], wheres: list[str], **kwargs
               ) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Rendered texts and their generation spans (character offsets)."""
        from jinja2.exceptions import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            if self.direct is not None and all(_plain(m) for c in conversations for m in c):
                return self._render_directly(conversations, **kwargs)
            return render_jinja_template(conversations, chat_template=self.options.template,
                                         return_assistant_tokens_mask=self.markers,
                                         **self.template_kwargs, **kwargs)
        except TemplateError as err:
            # find the one conversation the template refuses, to name it
            for conversation, where in zip(conversations, wheres):
                try:
                    render_jinja_template([conversation], chat_template=self.options.template,
                                          **self.template_kwargs, **kwargs)
                except TemplateError as one:
                    raise UsageError(f"{where}: the chat template refuses the conversation: "
                                     f"{one}") from None
            raise UsageError(f"{wheres[0]}: the chat template failed: {err}") from None

    def _render_directly(self, conversations: list[list[dict]], add_generation_prompt=False
                         ) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """render_jinja_template's own loop for messages that are already plain {role: str,
        content: str} dicts (what check_messages builds): the same compiled template (its
        cache), the same generate-and-track function, the same arguments, without the deep copy
        of every message and the reasoning-field aliasing that such messages do not need (a
        third of the rendering time). The generation tracker is activated once for the batch,
        not once per conversation (a quarter of what remains): _render_with_assistant_indices
        activates it around the same loop, whose lists are emptied between conversations here
        (the tracker measures spans from the blocks rendered so far)."""
        compiled, with_indices = self.direct
        kwargs = dict(tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                      **self.template_kwargs)
        if not self.markers:
            return [compiled.render(messages=m, **kwargs) for m in conversations], []
        texts, spans = [], []
        activate = getattr(compiled.environment, "activate_tracker", None)
        if activate is None:
            for messages in conversations:
                text, indices = with_indices(compiled, messages, **kwargs)
                texts.append(text)
                spans.append(indices)
            return texts, spans
        blocks, indices = [], []
        with activate(blocks, indices):
            for messages in conversations:
                for block in compiled.generate(messages=messages, **kwargs):
                    blocks.append(block)
                texts.append("".join(blocks))
                spans.append(indices[:])
                blocks.clear()
                indices.clear()
        return texts, spans

    def tokenize(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rendered texts -> (ids, [start, end) character offsets into the text) of each. Text
        between escape markers is tokenized as plain text; elsewhere control tokens are
        tokens, exactly as the tokenizer itself reads the rendered text."""
        if self.fast is not None:
            return self.fast.tokenize(texts)
        pieces, owners = [], []  # (text, offset into the rendered text, escaped?)
        for i, text in enumerate(texts):
            if ESCAPE_OPEN not in text:
                pieces.append((text, 0, False))
                owners.append(i)
                continue
            at = 0
            for m in self.escaped_piece.finditer(text):
                for piece in ((text[at:m.start()], at, False), (m.group(1), m.start(1), True)):
                    if piece[0]:
                        pieces.append(piece)
                        owners.append(i)
                at = m.end()
            if at < len(text):
                pieces.append((text[at:], at, False))
                owners.append(i)
        plain = [j for j, p in enumerate(pieces) if not p[2]]
        escaped = [j for j, p in enumerate(pieces) if p[2]]
        encodings = [None] * len(pieces)
        for chosen, tokenizer in ((plain, self.tokenizer), (escaped, self.as_text)):
            if chosen:  # encode_batch, not _fast: the offsets are what the mask needs
                found = tokenizer.encode_batch([pieces[j][0] for j in chosen],
                                               add_special_tokens=False)
                for j, e in zip(chosen, found):
                    encodings[j] = e
        out = [([], []) for _ in texts]
        for (_, start, _), owner, encoding in zip(pieces, owners, encodings):
            out[owner][0].append(np.asarray(encoding.ids, dtype=np.int64))
            out[owner][1].append(np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                                 + start)
        return [(np.concatenate(ids) if ids else np.empty(0, np.int64),
                 np.concatenate(offs) if offs else np.empty((0, 2), np.int64))
                for ids, offs in out]

    def tokenize_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokenize, of a whole batch at once: (ids, offsets, tokens per text), the ids and
        offsets of all texts one after the other (offsets into each text, as tokenize's)."""
        if self.fast is not None:
            return self.fast.tokenize_flat(texts)
        each = self.tokenize(texts)
        sizes = np.fromiter((len(ids) for ids, _ in each), dtype=np.int64, count=len(each))
        if not each:
            return np.empty(0, np.int64), np.empty((0, 2), np.int64), sizes
        return (np.concatenate([ids for ids, _ in each]),
                np.concatenate([offsets for _, offsets in each]), sizes)

    # -- whole conversations -------------------------------------------------------------------
    def encode(self, conversations: list[Conversation]) -> list[Encoded]:
        ids, assistant, lengths, escaped = self.encode_flat(conversations)
        ends = np.cumsum(lengths)
        return [Encoded(ids[e - n:e], assistant[e - n:e], int(k))
                for e, n, k in zip(ends, lengths, escaped)]

    def encode_flat(self, conversations: list[Conversation]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """encode, as arrays for the whole batch: the ids and assistant flags of every
        conversation one after the other, tokens per conversation, escaped strings per
        conversation. The mask is found for all conversations at once: each text's offsets and
        spans moved by where the text would start in the texts joined (no text is joined)."""
        escaped = [self.escape(c.messages, c.where) for c in conversations]
        counts = np.fromiter((n for _, n in escaped), dtype=np.int64, count=len(escaped))
        wheres = [c.where for c in conversations]
        if self.options.strategy == "prefix":
            each = [self._encode_by_prefix(m, w, n) for (m, n), w in zip(escaped, wheres)]
            lengths = np.fromiter((len(e.ids) for e in each), dtype=np.int64, count=len(each))
            if not each:
                return np.empty(0, np.int64), np.zeros(0, bool), lengths, counts
            return (np.concatenate([e.ids for e in each]),
                    np.concatenate([e.assistant for e in each]), lengths, counts)
        texts, spans = self.render([m for m, _ in escaped], wheres)
        ids, offsets, lengths = self.tokenize_flat(texts)
        text_starts = np.cumsum([len(t) for t in texts], dtype=np.int64)
        text_starts -= np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        if self.options.train_on == "last":
            spans = [conversation_spans[-1:] for conversation_spans in spans]
        spans_per_text = np.fromiter(map(len, spans), dtype=np.int64, count=len(spans))
        flat_spans = np.asarray([span for conversation_spans in spans
                                 for span in conversation_spans], dtype=np.int64).reshape(-1, 2)
        flat_spans += np.repeat(text_starts, spans_per_text)[:, None]
        assistant = overlapping(offsets + np.repeat(text_starts, lengths)[:, None], flat_spans)
        return ids, assistant, lengths, counts

    def _encode_by_prefix(self, messages: list[dict], where: str, escaped: int) -> Encoded:
        """Assistant turn k = what render(msgs[:k+1]) adds to render(msgs[:k], generation
        prompt), each an exact token prefix of the next render, and the last of the whole."""
        (full, _), = self.tokenize(self.render([messages], [where])[0])
        assistant = np.zeros(len(full), dtype=bool)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if self.options.train_on == "last":
            turns = turns[-1:]
        for k in turns:
            texts = [self.render([messages[:k]], [where], add_generation_prompt=True)[0][0],
                     self.render([messages[:k + 1]], [where])[0][0]]
            (prompt, _), (upto, _) = self.tokenize(texts)
            for shorter, longer in ((prompt, upto), (upto, full)):
                if len(shorter) > len(longer) or \
                        not np.array_equal(longer[:len(shorter)], shorter):
                    raise UsageError(
                        f"{where}: --mask-strategy prefix: the chat template does not render "
                        f"turn {k} as an exact token prefix of the conversation that follows "
                        f"(it rewrites earlier turns); use a template with {{% generation %}} "
                        f"markers")
            assistant[len(prompt):len(upto)] = True
        return Encoded(full, assistant, escaped)


class FastPieces:
    """tiktoken (train/data/tiktoken_bpe.py) in ChatEncoder.tokenize's place: the rendered text
    is split where the tokenizer splits it (at its special tokens, which all its added tokens
    are, and at the escape markers), the pieces are encoded as ordinary text, and each token's
    character offsets come from its byte length."""

    def __init__(self, tokenizer_dir: Path):
        from train.data.tiktoken_bpe import TiktokenBPE

        spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        reason = fast_why_not(spec)
        if reason:
            raise UsageError(f"--tokenizer-engine tiktoken cannot be used: {reason}")
        self.bpe = TiktokenBPE(tokenizer_dir / "tokenizer.json")
        decode = self.bpe.encoding.decode_single_token_bytes
        ranks = len(self.bpe.rank_to_id)
        # The special tokens get ranks after the BPE's, so that one lookup maps every rank of a
        # text to its id and its length in bytes.
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.special_rank = {text: np.array([ranks + k]) for k, text in enumerate(specials)}
        self.rank_to_id = np.concatenate([self.bpe.rank_to_id, list(specials.values())])
        self.rank_bytes = np.array([len(decode(r)) for r in range(ranks)] +
                                   [len(text.encode()) for text in specials], dtype=np.int64)
        pattern = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
        self.split = re.compile(f"{ESCAPE_OPEN}(.*?){ESCAPE_CLOSE}" +
                                (f"|{pattern}" if pattern else ""), re.S)
        # A text with no escape markers in one call: an Encoding that knows the special tokens
        # (at the ranks special_rank gives them) splits at them itself, as self.split does, when
        # no special token's text begins another's (then at most one can match at a place, and
        # leftmost-first finds what longest-first does).
        texts = list(specials)
        self.whole = None
        if texts and all(texts) and not any(a != b and b.startswith(a)
                                            for a in texts for b in texts):
            import tiktoken

            self.whole = tiktoken.Encoding(
                name=f"{self.bpe.encoding.name}-specials", pat_str=self.bpe.encoding._pat_str,
                mergeable_ranks=self.bpe.encoding._mergeable_ranks,
                special_tokens={text: int(rank[0]) for text, rank in self.special_rank.items()})
            self.allowed = set(texts)

    def ranks(self, text: str) -> np.ndarray:
        """One text's ranks: the BPE's, and special_rank's for its special tokens; the text
        between escape markers is encoded as ordinary text, without the markers."""
        if self.whole is not None and ESCAPE_OPEN not in text:
            return self.whole.encode_to_numpy(text, allowed_special=self.allowed,
                                              disallowed_special=())
        encode = self.bpe.encoding.encode_to_numpy
        parts, at = [], 0
        for m in self.split.finditer(text):
            if m.start() > at:
                parts.append(encode(text[at:m.start()], allowed_special=set(),
                                    disallowed_special=()))
            if m.group(1) is None:
                parts.append(self.special_rank[m.group(0)])
            elif m.group(1):
                parts.append(encode(m.group(1), allowed_special=set(), disallowed_special=()))
            at = m.end()
        if at < len(text):
            parts.append(encode(text[at:], allowed_special=set(), disallowed_special=()))
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def tokenize_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ChatEncoder.tokenize_flat: one lookup and one running sum of byte lengths for the
        whole batch; character offsets differ from byte offsets only in non-ASCII texts."""
        parts = [self.ranks(text) for text in texts]
        sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        ranks = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
        ids, nbytes = self.rank_to_id[ranks], self.rank_bytes[ranks]
        ends = np.cumsum(nbytes)
        firsts = np.cumsum(sizes) - sizes  # each text's first token
        base = np.concatenate([[0], ends])[firsts]  # the bytes of the texts before it
        ends -= np.repeat(base, sizes)
        offsets = np.stack([ends - nbytes, ends], axis=1)
        for i, text in enumerate(texts):
            if not text.isascii() and sizes[i]:
                chosen = slice(firsts[i], firsts[i] + sizes[i])
                offsets[chosen] = self.char_offsets(text, offsets[chosen])
        return ids, offsets, sizes

    def tokenize(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, offsets, sizes = self.tokenize_flat(texts)
        ends = np.cumsum(sizes)
        return [(ids[e - n:e], offsets[e - n:e]) for e, n in zip(ends, sizes)]

    @staticmethod
    def char_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
        """Byte offsets into the text as tokenized (escape markers removed) -> [start, end)
        characters of the rendered text, widened to whole characters (as Hugging Face reports
        a token holding part of a character)."""
        if text.isascii() or not len(offsets):
            return offsets
        kept = np.array([c not in (ESCAPE_OPEN, ESCAPE_CLOSE) for c in text]) \
            if ESCAPE_OPEN in text else None
        stripped = text.replace(ESCAPE_OPEN, "").replace(ESCAPE_CLOSE, "") \
            if kept is not None else text
        data = np.frombuffer(stripped.encode("utf-8"), dtype=np.uint8)
        char_of_byte = np.cumsum((data & 0xC0) != 0x80) - 1  # continuation bytes: 10xxxxxx
        chars = np.stack([char_of_byte[offsets[:, 0]], char_of_byte[offsets[:, 1] - 1] + 1], 1)
        if kept is None:
            return chars
        original = np.append(np.flatnonzero(kept), len(text))  # stripped char -> text char
        return np.stack([original[chars[:, 0]], original[chars[:, 1] - 1] + 1], axis=1)


def _plain(message: dict) -> bool:
    """A message render_jinja_template would pass to the template as it is (a copy of it): what
    check_messages builds, {role, content} with exact str values, so no reasoning field to
    alias and nothing to convert."""
    return len(message) == 2 and type(message.get("content")) is str and \
        type(message.get("role")) is str


def _direct_renderer(template: str):
    """(compiled template, the function that renders it tracking generation spans), from
    transformers' chat-template module, as render_jinja_template uses them; None where this
    transformers lacks them (render_jinja_template is used then)."""
    try:
        from transformers.utils.chat_template_utils import (
            _compile_jinja_template, _render_with_assistant_indices)
    except ImportError:
        return None
    return _compile_jinja_template(template), _render_with_assistant_indices


def fast_why_not(spec: dict) -> str | None:
    """Why tiktoken cannot stand in for this tokenizer in chat prepare, or None."""
    from train.data.tiktoken_bpe import why_not

    reason = why_not(spec)
    if reason is None and any(t.get(flag) for t in spec.get("added_tokens", [])
                              for flag in ("lstrip", "rstrip", "single_word", "normalized")):
        reason = "an added token strips whitespace or is normalized"
    return reason


def choose_engine(tokenizer_dir: Path, options: ChatOptions, requested: str,
                  first: list[Conversation]) -> tuple[str, str | None]:
    """("tiktoken", None) when it applies and gives Hugging Face's ids and offsets on the first
    conversations; else ("hf", why not). requested "hf" is taken as it is."""
    from dataclasses import replace

    if requested == "hf":
        return "hf", None
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    reason = fast_why_not(spec)
    if reason is None:
        hf = ChatEncoder(tokenizer_dir, replace(options, engine="hf"))
        fast = ChatEncoder(tokenizer_dir, replace(options, engine="tiktoken"))
        for a, b, conversation in zip(hf.encode(first), fast.encode(first), first):
            if a.ids.tolist() != b.ids.tolist() or a.assistant.tolist() != b.assistant.tolist():
                reason = f"tiktoken and Hugging Face differ on {conversation.where}"
                break
    if reason and requested == "tiktoken":
        raise UsageError(f"--tokenizer-engine tiktoken cannot be used: {reason}; use "
                         f"--tokenizer-engine auto or hf")
    return ("hf", reason) if reason else ("tiktoken", None)


def overlapping(offsets: np.ndarray, spans) -> np.ndarray:
    """Per token, whether it overlaps a span: apply_chat_template's assistant-mask rule."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if not len(spans) or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    spans = spans[spans[:, 1] > spans[:, 0]]
    if not len(spans):
        return np.zeros(len(offsets), dtype=bool)
    first = np.searchsorted(spans[:, 1], offsets[:, 0], side="right")  # first span ending after
    inside = first < len(spans)
    result = np.zeros(len(offsets), dtype=bool)
    result[inside] = offsets[inside, 1] > spans[first[inside], 0]
    return result


def _special_token_strings(tokenizer_dir: Path) -> dict[str, str]:
    """{"bos_token": "<s>", "eos_token": ...}: what templates read as variables."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if path.exists():
            for key, value in json.loads(path.read_text()).items():
                if isinstance(value, dict):
                    value = value.get("content")
                if key.endswith("_token") and isinstance(value, str):
                    out.setdefault(key, value)
    return out


# ---------------------------------------------------------------------------------------------
# Worker side of prepare: batches of conversations -> tokens, lengths, codes, counts
# ---------------------------------------------------------------------------------------------

_encoder: ChatEncoder | None = None
_dtype = None


def init_worker(tokenizer_dir: str, options: ChatOptions, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _encoder, _dtype
    _encoder, _dtype = ChatEncoder(Path(tokenizer_dir), options), np.dtype(dtype)


COUNT_NAMES = ("conversations", "trained_tokens", "dropped_too_long", "truncated",
               "dropped_no_trained_token", "escaped_special_strings", "max_conversation_tokens")


def encode_batch(conversations: list[Conversation]):
    """(tokens, tokens per conversation, mask codes, counts). A dropped conversation keeps its
    place with length 0, so that a resumed prepare counts input conversations exactly. The
    codes of the whole batch at once, as of each conversation alone: token t is trained when
    token t+1 is an assistant token of the same conversation (so never a conversation's last
    token), and a conversation's first token carries CONVERSATION_START."""
    options = _encoder.options
    counts = dict.fromkeys(COUNT_NAMES, 0)
    ids, assistant, lengths, escaped = _encoder.encode_flat(conversations)
    starts = np.cumsum(lengths) - lengths
    too_long = lengths > options.max_length
    dropped = too_long if options.too_long == "drop" else np.zeros(len(lengths), dtype=bool)
    counts["dropped_too_long" if options.too_long == "drop" else "truncated"] = \
        int(too_long.sum())
    kept_lengths = np.where(dropped, 0, np.minimum(lengths, options.max_length))
    # each conversation's first kept_lengths tokens
    keep = np.arange(len(ids)) - np.repeat(starts, lengths) < np.repeat(kept_lengths, lengths)
    ids, assistant = ids[keep], assistant[keep]
    # token t is trained when t+1 is an assistant token of the same conversation
    codes = np.zeros(len(ids), dtype=np.int16)
    codes[:-1] = assistant[1:] * TRAINED
    codes[np.cumsum(kept_lengths)[kept_lengths > 0] - 1] = 0  # each conversation's last token
    running = np.concatenate([[0], np.cumsum(codes, dtype=np.int64)])
    ends = np.cumsum(kept_lengths)
    trained = running[ends] - running[ends - kept_lengths]
    none = (trained == 0) & ~dropped
    counts["dropped_no_trained_token"] = int(none.sum())
    final = np.where(none, 0, kept_lengths)
    keep = np.repeat(final > 0, kept_lengths)
    ids, codes = ids[keep], codes[keep]
    kept = final > 0
    codes[(np.cumsum(final) - final)[kept]] |= CONVERSATION_START
    counts["conversations"] = int(kept.sum())
    counts["trained_tokens"] = int(trained[kept].sum())
    counts["escaped_special_strings"] = int(escaped[kept].sum())
    counts["max_conversation_tokens"] = int(final.max()) if len(final) else 0
    return ids.astype(_dtype), final.astype(np.int64), codes, counts


def add_counts(total: dict, more: dict) -> None:
    for key, value in more.items():
        total[key] = max(total.get(key, 0), value) if key.startswith("max_") \
            else total.get(key, 0) + value
