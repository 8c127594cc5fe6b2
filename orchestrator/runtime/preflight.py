"""A run's input files, checked on the driver before Ray starts and before the run directory is made.

`validate` (config.py) checks the config's values; `check_inputs` opens the files they name, cheaply:

  model.hf_path   every safetensors file the folder (or its index) names: its header parses and its tensors end
                  where the file ends; an FP8 checkpoint's quantization_config is FP8 blocks and every float8
                  weight has its block scale, of the right shape (headers only; model/hf_load.py
                  check_weight_files)
  train.freeze    every pattern names a parameter of the model (planner.frozen_names, on the meta device)
  byte-level data the corpus as load_corpus builds it (a folder's text files, token files' sizes, both splits long
                  enough: token files are memory-mapped, not read) and every token id below model.vocab_size, each
                  file named (data/corpus.py check_token_ids)
  tokenizer data  the data files exist (a folder holds some); a tokenizer folder loads (with an eos token for
                  pretraining, a {% generation %} block for SFT); every JSON record parses and holds `text`
                  (pretraining) or `messages`, a list of {role, content} strings (SFT), named by its 1-based line
                  (JSON lines) or record; and the chat template renders the first conversation of each role the
                  data uses (the template is the oracle of the roles it accepts: the project's own when
                  data.train_tokenizer trains one at run time)

Every error is a ConfigError of one line naming the file, the 1-based line or record, the value and the fix. What
only tokenizing the data can tell (an SFT split left empty after truncation, ids of a tokenizer larger than the
model's vocabulary) the driver still finds when it loads the data (data/source.py), after Ray started.

Cost: one pass over JSON / Parquet / Arrow data files (parsing, no tokenization) and over token files (a chunked
maximum); the safetensors headers; a tokenizer load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.config import Config, ConfigError, tokenizer_source


def check_inputs(cfg: Config) -> None:
    """Everything about a run's input files that can be checked before anything starts; raises ConfigError."""
    if cfg.model.hf_path:
        from orchestrator.model.hf_load import check_weight_files

        check_weight_files(cfg.model.hf_path)
    if cfg.train.freeze:   # every pattern names a parameter (the model built on the meta device)
        from orchestrator.memory.plan import frozen_names

        frozen_names(cfg)
    d = cfg.data
    folder = tokenizer_source(cfg)
    if folder is None and not d.train_tokenizer:   # bytes
        if d.path is not None:                     # (the embedded corpus is this machine's standard library)
            from orchestrator.data.corpus import check_token_ids, load_corpus

            load_corpus(d)
            check_token_ids(d, cfg.model.vocab_size)
        return
    tokenizer = None
    if not d.train_tokenizer:
        from orchestrator.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder)
    if d.task == "pretrain":
        if tokenizer is not None and tokenizer.eos_token_id is None:
            raise ConfigError(f"data.tokenizer: the tokenizer in {folder} has no eos token to separate documents "
                              f"with; give a tokenizer that has one (tokenizer_config.json eos_token)")
        _check_records(Path(d.path).expanduser(), "text", _text_record)
        return
    render, source = _chat_renderer(tokenizer, folder)
    if d.path is not None:
        _check_roles(_check_records(Path(d.path).expanduser(), "messages", _sft_record), render, source)


# --------------------------------------------------------------------------- records
def _check_records(path: Path, column: str, check: Callable[[Any, str], list | None]) -> dict[str, tuple]:
    """Run `check(record, where)` on every record of the data files of `path`; returns, for SFT, the first
    (where, messages) of each role, in order of appearance."""
    from orchestrator.data.hf_data import data_files, records_by_file

    builder, files = data_files(path)
    if builder == "text" and column == "messages":
        raise ConfigError(f"data.path={str(path)!r}: {_names(files, 'is', 'are')} text, but data.task=sft reads records with "
                          f"`messages`: give .jsonl, .json, .parquet or .arrow files, or set data.task=pretrain")
    roles: dict[str, tuple] = {}
    count = 0

    def note(messages: list | None, where: str) -> None:
        nonlocal count
        count += 1
        for m in messages or []:
            roles.setdefault(m["role"], (where, messages))

    if builder == "json":
        for f in files:
            for where, record in _json_records(f):
                note(check(record, where), where)
    elif builder != "text":   # Parquet, Arrow: through datasets, as the run reads them
        n, current = 0, None
        for f, batch in records_by_file(path, column):
            if f != current:
                n, current = 0, f
            for value in batch:
                n += 1
                where = f"{f}, record {n}"
                note(check({column: value}, where), where)
    if builder != "text" and count == 0:
        raise ConfigError(f"data.path={str(path)!r}: {_names(files, 'has', 'have')} no records; give data with records")
    return roles


def _names(files: list[Path], verb: str, verbs: str) -> str:
    """`a.jsonl has` / `its 3 files (a.jsonl, b.jsonl, c.jsonl) have`: a sentence's subject and verb."""
    if len(files) == 1:
        return f"{files[0].name} {verb}"
    shown = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
    return f"its {len(files)} files ({shown}) {verbs}"


def _json_records(f: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON file: JSON lines (`<file>, line N`, blank lines skipped), or one JSON array of
    records (`<file>, record N`), both 1-based, as datasets' json builder reads either."""
    try:
        with open(f, encoding="utf-8") as fh:
            head = fh.read(4096).lstrip()
            fh.seek(0)
            if head.startswith("["):
                try:
                    records = json.load(fh)
                except ValueError as e:
                    raise ConfigError(f"{f}, line {getattr(e, 'lineno', '?')}: not valid JSON ({getattr(e, 'msg', e)}); "
                                      f"fix the file") from None
                if not isinstance(records, list):
                    raise ConfigError(f"{f}: a JSON file of records holds one array of objects or one object per "
                                      f"line")
                for i, record in enumerate(records, 1):
                    yield f"{f}, record {i}", record
                return
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ConfigError(f"{f}, line {n}: not valid JSON ({getattr(e, 'msg', e)} at column "
                                      f"{getattr(e, 'colno', '?')}); fix the line (one JSON object per line)") from None
                yield f"{f}, line {n}", record
    except UnicodeDecodeError as e:
        raise ConfigError(f"{f}: not UTF-8 text ({e}); save it as UTF-8") from None


def _show(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _field(record: Any, where: str, key: str, fix: str) -> Any:
    """`record[key]`: ConfigError naming `where` when the record is not an object or lacks `key` (its keys said)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: the record is {_show(record)}, not an object with `{key}`; {fix}")
    if record.get(key) is None:
        keys = ", ".join(k for k, v in record.items() if v is not None) or "none"
        raise ConfigError(f"{where}: the record has no `{key}` (its keys: {keys}); {fix}")
    return record[key]


def _text_record(record: Any, where: str) -> None:
    fix = "a pretraining record needs `text`, a string: fix or remove the record"
    text = _field(record, where, "text", fix)
    if not isinstance(text, str):
        raise ConfigError(f"{where}: `text` is {_show(text)}; {fix}")


def _sft_record(record: Any, where: str) -> list:
    """The record's messages, checked as the run reads them (data/hf_data.py _conversations)."""
    fix = "give every record `messages`: a list of {role, content} strings"
    messages = _field(record, where, "messages", fix)
    if not isinstance(messages, list):
        raise ConfigError(f"{where}: `messages` is {_show(messages)}, not a list; {fix}")
    for k, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f"{where}: message {k} of `messages` is {_show(m)}, not {{role, content}} strings; "
                              f"{fix}")
    return messages


# --------------------------------------------------------------------------- chat roles
def _chat_renderer(tokenizer: Any, folder: str | None) -> tuple[Callable[[list], Any], str]:
    """A function rendering one conversation with the run's chat template, and what that template is."""
    if tokenizer is None:   # trained at run time, with the project's template (data/tokenizer.py)
        from transformers.utils.chat_template_utils import render_jinja_template

        from orchestrator.data.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD

        return (lambda messages: render_jinja_template(conversations=[messages], chat_template=CHAT_TEMPLATE,
                                                       bos_token=BOS, eos_token=EOS, pad_token=PAD),
                "the chat template of the tokenizer data.train_tokenizer trains (data/tokenizer.py)")
    from orchestrator.data.tokenizer import has_generation_block

    if not has_generation_block(tokenizer):
        raise ConfigError(f"data.task=sft: the chat template of the tokenizer in {folder} has no {{% generation %}} "
                          f"block, so assistant tokens cannot be told apart; use a tokenizer whose template marks "
                          f"them, or data.train_tokenizer=V (its template does)")
    return (lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
            f"the chat template of the tokenizer in {folder}")


def _check_roles(first: dict[str, tuple], render: Callable[[list], Any], source: str) -> None:
    """Render the first conversation of each role; the template refusing one (jinja's TemplateError from its
    raise_exception, or any other error of its code) names that record, the role and the roles it took."""
    refused = []
    for role, (where, messages) in first.items():
        try:
            render(messages)
        except Exception as e:  # a template's code may raise anything; jinja2.TemplateError mostly
            refused.append((role, where, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
    if refused:
        role, where, why = refused[0]
        accepted = [r for r in first if r not in {x[0] for x in refused}]
        also = f"; it also refuses role {', '.join(repr(r[0]) for r in refused[1:])}" if len(refused) > 1 else ""
        raise ConfigError(f"{where}: {source} refuses this conversation, the first with role {role!r} ({why}){also}; "
                          f"the data's roles it accepts: {', '.join(map(repr, accepted)) or 'none'}: change the role "
                          f"or remove the record")
