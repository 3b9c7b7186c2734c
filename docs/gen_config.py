"""Writes docs/config.md, the configuration reference, from the Config dataclasses in
train/config.py: every key, its type, its default and its description.

    python docs/gen_config.py > docs/config.md

A field's description is its `metadata={"help": ...}` if it has one, else its comment in
train/config.py: the comment at the end of the field's line (with the comment-only lines below
it that continue it), or else the comment lines just above the field. A section's introduction
is its dataclass's docstring. Valid choices come from config.CHOICES and old names from
config.LEGACY, so a key added to the dataclasses appears here once this script is rerun;
tests/test_docs.py fails while docs/config.md is stale or a key has no description.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import sys
import tokenize
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import config  # noqa: E402  (the checkout's, not an installed copy)

SOURCE = Path(config.__file__)
HEADER = """# Configuration reference

Generated from the `Config` dataclasses in `train/config.py` by `python docs/gen_config.py >
docs/config.md`; do not edit by hand (tests/test_docs.py fails when this page is stale). A run's
config is YAML, and any key can be overridden on the command line as `dotted.key=value`
(`data.seq_len=512 max_steps=100`). An unknown key is an error that lists the valid ones.
Training hyperparameters use the names of transformers' `TrainingArguments`.
"""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): its comment text} for every annotated field in `source`."""
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, text) of each comment
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    found = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            first, last = node.lineno, node.end_lineno
            # the comment at the end of the field's line(s), continued on the comment-only
            # lines below that are indented past the field
            text = [comments[n][1] for n in range(first, last + 1) if n in comments]
            line = last + 1
            while line in comments and line not in code_lines \
                    and comments[line][0] > node.col_offset:
                text.append(comments[line][1])
                line += 1
            line = first - 1
            while not text and line in comments and line not in code_lines \
                    and comments[line][0] == node.col_offset:  # or the lines just above it
                text.insert(0, comments[line][1])
                line -= 1
            found[(cls.name, node.target.id)] = " ".join(text)
    return found


def section_of(f: dataclasses.Field):
    """The dataclass a field holds (a section such as `data`), or None for a plain value."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return type(value) if dataclasses.is_dataclass(value) else None
    return None


def default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    else:
        value = f.default
    return "`null`" if value is None else f"`{json.dumps(value)}`"


def rows(cls, prefix: str, comments: dict) -> tuple[list[tuple], list[tuple]]:
    """([(key, type, default, description)], [(section key, section class)]) of one dataclass."""
    plain, sections = [], []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        section = section_of(f)
        if section is not None:
            sections.append((key, section))
            continue
        text = f.metadata.get("help") or comments.get((cls.__name__, f.name), "")
        choices = config.CHOICES.get(key)
        if choices:
            text = f"{text.rstrip('.')}. One of: {', '.join(f'`{c}`' for c in choices)}."
        old = [name for name, (new, _) in config.LEGACY.items() if new == key]
        if old:
            text = (f"{text.rstrip('.')}. Old name, accepted with a note: "
                    f"{', '.join(f'`{o}`' for o in old)}.")
        plain.append((key, str(f.type), default_text(f), text.strip()))
        items = f.metadata.get("items")
        if items is not None:  # a list of records (data.mixture): document one entry's keys
            sections.append((f"{key}[]", items))
    return plain, sections


def table(entries: list[tuple]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{key}` | `{cell(kind)}` | {cell(default)} | {cell(text)} |"
              for key, kind, default, text in entries]
    return "\n".join(lines) + "\n"


def reference() -> tuple[str, list[str]]:
    """(the markdown page, the keys that have no description)."""
    comments = field_comments(SOURCE.read_text())
    out, undocumented = [HEADER], []
    pending = [("", config.Config)]
    while pending:
        prefix, cls = pending.pop(0)
        plain, sections = rows(cls, f"{prefix}." if prefix else "", comments)
        title = f"`{prefix}`" if prefix else "Top level"
        out.append(f"\n## {title}\n")
        doc = cls.__doc__ or ""
        if prefix and doc and not doc.startswith(cls.__name__ + "("):  # not dataclass's default
            out.append("\n" + " ".join(doc.split()) + "\n")
        if prefix == "":
            out.append("\nSections: " + ", ".join(f"`{k}`" for k, _ in sections) + ".\n")
        out.append("\n" + table(plain))
        undocumented += [key for key, _, _, text in plain if not text]
        pending += sections
    return "".join(out), undocumented


def main() -> int:
    page, undocumented = reference()
    sys.stdout.write(page)
    if undocumented:
        print(f"error: no description for {', '.join(undocumented)}: add a comment to the field "
              f"in train/config.py (or metadata={{'help': ...}})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
