"""docs/configuration-reference.md, generated from the config dataclasses: every key with its type, its default
and the comment written beside its field (continuation lines included; a comment block above fields describes
the first of them, the following uncommented ones point to it).

    python -m orchestrator.config.docgen            # rewrite docs/configuration-reference.md
    python -m orchestrator.config.docgen --check    # exit 1 if the committed page is stale

tests/test_config_reference.py fails when the committed page differs from what this writes."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

from orchestrator.config.base import REPO_ROOT
from orchestrator.config.schema import Config

PAGE = REPO_ROOT / "docs" / "configuration-reference.md"
COMMAND = "python -m orchestrator.config.docgen"
_FIELD = re.compile(r"^    (\w+)\s*:")


def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass `cls` -> its comment, read from the source: the comment after the field and the
    comment-only lines indented under it; a comment block at field indentation goes to the field below it."""
    lines = _class_lines(cls)
    comments = _line_comments("".join(lines))
    out: dict[str, str] = {}
    current: str | None = None   # the field whose comment continues on the next comment-only lines
    block: list[str] = []        # a comment block waiting for the field below it
    lead: str | None = None      # the field that block went to, for the uncommented fields after it
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        m = _FIELD.match(line)
        if m and m.group(1) in cls.__dataclass_fields__:
            name = m.group(1)
            own = comments.get(i)
            if block:
                out[name], lead, block = " ".join(block + ([own] if own else [])), name, []
            elif own:
                out[name], lead = own, None
            elif lead:
                out[name] = f"see `{lead}` above"
            current = name if own else None
        elif stripped.startswith("#"):
            text = comments.get(i, "")
            if current and len(line) - len(line.lstrip()) > 4:
                out[current] += " " + text
            else:
                block.append(text)
                current = None
        elif not stripped:
            current = None
    return out


def _class_lines(cls: type) -> list[str]:
    """The source lines of `cls` down to the next unindented line (inspect's own end stops before the comment
    lines that continue the last field's comment)."""
    module, start = inspect.getsourcelines(sys.modules[cls.__module__])[0], inspect.getsourcelines(cls)[1]
    out: list[str] = []
    seen_class = False
    for line in module[start - 1:]:   # from its decorator, if any
        if seen_class and line.strip() and not line[0].isspace():
            break
        seen_class = seen_class or line.startswith("class ")
        out.append(line)
    return out


def _line_comments(source: str) -> dict[int, str]:
    """1-based line -> the text of the comment on it (tokenize: a '#' inside a string is no comment)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        if value and dataclasses.is_dataclass(value[0]):   # a list of rules: their names
            first = dataclasses.fields(value[0])[0].name
            return f"{len(value)} entries: " + ", ".join(f"`{getattr(v, first)}`" for v in value)
        return "`[" + ", ".join(map(str, value)) + "]`"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of `cls` and of every section and list-of-dataclass entry under it, in order."""
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        value = _default(f) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING \
            else None
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            out += _sections(type(value), key)
        elif isinstance(value, list) and f.type.startswith(("list[", "List[")):
            inner = f.type[5:-1]
            entry = getattr(sys.modules[cls.__module__], inner, None)
            if dataclasses.is_dataclass(entry):
                out += _sections(entry, key + "[]")
    return out


def render() -> str:
    """The page, as text."""
    out = ["# Configuration reference", "",
           f"Generated from the config dataclasses (`orchestrator/config/`) by `{COMMAND}`; do not edit by hand. "
           "Every key can be set in a YAML file (`--config`) or as an override (`section.key=value`); "
           "a key that has no effect under the chosen options is refused, naming it.", ""]
    for prefix, cls in _sections(Config, ""):
        comments = field_comments(cls)
        rows = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(_default_or_none(f))]
        if not rows:
            continue
        out += [f"## `{prefix}`" if prefix else "## top level", ""]
        doc = cls.__doc__ or ""
        if doc and not doc.startswith(cls.__name__ + "("):   # a docstring written, not the dataclass's own
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in rows:
            key = f"{prefix}.{f.name}" if prefix else f.name
            out.append(f"| `{key}` | `{_cell(str(f.type))}` | {_cell(_show(_default_or_none(f)))} | "
                       f"{_cell(comments.get(f.name, ''))} |")
        out.append("")
    return "\n".join(out)


def _default_or_none(f: dataclasses.Field) -> Any:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return dataclasses.MISSING
    return _default(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed page is stale")
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = not args.out.is_file() or args.out.read_text() != text
        if stale:
            print(f"{args.out} is stale: run {COMMAND}", file=sys.stderr)
        return int(stale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
