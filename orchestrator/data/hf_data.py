"""Local data files read with `datasets`, tokenized once and cached beside the data.

A data path is a file or a folder of files, one format per folder: text (.txt, .text, .md: one document
per file), JSON lines or JSON (.jsonl, .json), Parquet (.parquet), Arrow (.arrow, as save_to_disk writes
it). Files are streamed with the packaged builders of `datasets` (never the hub: HF_DATASETS_OFFLINE and
HF_HUB_OFFLINE are set before `datasets` is imported, and its scratch cache is a temporary folder).

Pretraining reads the `text` column: each document's tokens and then eos, into a 1-D uint16/uint32 array
for BatchStream; documents go to train or validation by a stable hash of their text (one file, or all in
one split: the tail val_fraction of the tokens). SFT reads the `messages` column ([{role, content}, ...])
into SFTSamples (orchestrator/data/sft.py).

The cache of `<path>` is the folder `<path>.tok-<key>` beside it (or in `cache_dir`, or
~/.cache/orchestrator/tokenized when the data's folder is not writable); key = digest of each file's name,
size, mtime and content (all of it up to 64 MiB, else its first and last 8 MiB), the tokenizer's
fingerprint and the mode. It is written to a temporary folder and renamed, so concurrent readers see it
whole or not at all; writing it removes the caches of older versions of the same data, tokenizer and mode.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import tokenize
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from orchestrator.config import ConfigError
from orchestrator.data.corpus import Corpus, stdlib_documents, stdlib_root
from orchestrator.data.sft import SFTSamples, tokenize_conversations
from orchestrator.data.tokenizer import token_dtype, tokenizer_fingerprint

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".arrow": "arrow"}
_NOT_DATA = {"state.json", "dataset_info.json"}      # save_to_disk's metadata beside its .arrow files
_FORMAT = 1                                          # bump when a cache's layout or content changes
_FULL_DIGEST_BYTES, _EDGE_BYTES = 64 << 20, 8 << 20
_BATCH = 1000


def data_files(path: str | Path) -> tuple[str, list[Path]]:
    """The `datasets` builder and the files of a data path (a file, or a folder searched recursively)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path={str(path)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() not in BUILDERS:
            raise ConfigError(f"data.path={str(path)!r}: unknown data file type {p.suffix!r}; use one of "
                              f"{', '.join(sorted(BUILDERS))}")
        return BUILDERS[p.suffix.lower()], [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS
                   and f.name not in _NOT_DATA and not any(".tok-" in part for part in f.relative_to(p).parts))
    builders = sorted({BUILDERS[f.suffix.lower()] for f in files})
    if not files:
        raise ConfigError(f"data.path={str(path)!r} is a folder with no data files "
                          f"(looked for {', '.join(sorted(BUILDERS))})")
    if len(builders) > 1:
        raise ConfigError(f"data.path={str(path)!r} mixes data formats ({', '.join(builders)}); give a folder "
                          f"of one format")
    return builders[0], files


def cache_folder(path: str | Path, tokenizer, mode: str, cache_dir: str | Path | None = None) -> Path:
    """Where the tokenized form of `path` for this tokenizer and mode is (or will be) cached."""
    p = Path(path).expanduser().resolve()
    _, files = data_files(p)
    h = hashlib.sha256(f"format-{_FORMAT}\0{mode}\0{tokenizer_fingerprint(tokenizer)}\0".encode())
    for f in files:
        h.update(_file_digest(f, p).encode())
    parent = Path(cache_dir).expanduser() if cache_dir is not None else p.parent
    if cache_dir is None and not os.access(parent, os.W_OK):
        parent = Path.home() / ".cache" / "orchestrator" / "tokenized"
    return parent / f"{p.name}.tok-{h.hexdigest()[:20]}"


def _file_digest(f: Path, root: Path) -> str:
    try:
        st = f.stat()
        h = hashlib.blake2b(digest_size=16)
        with open(f, "rb") as fh:
            if st.st_size <= _FULL_DIGEST_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(_EDGE_BYTES))
                fh.seek(st.st_size - _EDGE_BYTES)
                h.update(fh.read(_EDGE_BYTES))
    except OSError as e:
        raise ConfigError(f"data.path={str(root)!r}: cannot read {f}: {e}") from e
    name = f.relative_to(root).as_posix() if f != root else f.name
    return f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{h.hexdigest()}\0"


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def _read_records(path: Path, column: str) -> Iterator[list]:
    """Batches of the values of `column`, file by file, in file order; ConfigError naming the file."""
    for _, batch in records_by_file(path, column):
        yield batch


def records_by_file(path: Path, column: str) -> Iterator[tuple[Path, list]]:
    """(file, a batch of the values of `column`), file by file, in file order (a file's records in their order);
    ConfigError naming the file."""
    builder, files = data_files(path)
    datasets = _datasets()
    scratch = tempfile.mkdtemp(prefix="orchestrator-datasets-")   # datasets' lock files; removed after
    try:
        for f in files:
            options = {"sample_by": "document"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True,
                                           cache_dir=scratch, **options)
                batches = ds.iter(batch_size=_BATCH)
                first = next(batches, None)
            except Exception as e:  # datasets and pyarrow raise many types for a bad file
                raise ConfigError(f"data.path={str(path)!r}: cannot read {f} as {builder}: {e}") from e
            if first is None:
                continue
            if column not in first:
                raise ConfigError(f"data.path={str(path)!r}: the records of {f} have no {column!r} column "
                                  f"(columns: {', '.join(first) or 'none'})")
            yield f, first[column]
            while True:
                try:
                    batch = next(batches, None)
                except Exception as e:
                    raise ConfigError(f"data.path={str(path)!r}: cannot read {f} as {builder}: {e}") from e
                if batch is None:
                    break
                yield f, batch[column]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cached(folder: Path, mode: str, tokenizer, write) -> dict:
    """The cache folder's meta.json, after `write(tmp_folder) -> meta` made it if it was missing."""
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"format": _FORMAT, "mode": mode, "tokenizer": tokenizer_fingerprint(tokenizer), **write(tmp)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.is_dir() and not (folder / "meta.json").is_file():   # left incomplete by hand or by a bug
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process wrote it first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
    stem = folder.name.rsplit(".tok-", 1)[0]
    for old in folder.parent.glob(f"{glob.escape(stem)}.tok-*"):
        if old != folder and old.is_dir() and ".partial-" not in old.name and _same_kind(old, meta):
            shutil.rmtree(old, ignore_errors=True)
    return json.loads((folder / "meta.json").read_text())


def _same_kind(old: Path, meta: dict) -> bool:
    try:
        theirs = json.loads((old / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return theirs.get("mode") == meta["mode"] and theirs.get("tokenizer") == meta["tokenizer"]


def _tokens_file(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r"))


def load_pretraining_corpus(path: str | Path, tokenizer, val_fraction: float = 0.05,
                            cache_dir: str | Path | None = None) -> Corpus:
    """Documents (the `text` column) -> tokens, each document followed by eos, split train/validation."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token to separate documents with")
    p = Path(path).expanduser().resolve()
    mode = f"pretrain-val{val_fraction!r}"
    folder = cache_folder(p, tokenizer, mode, cache_dir)
    dtype = token_dtype(len(tokenizer))
    threshold = int(round(val_fraction * 10_000))

    def write(tmp: Path) -> dict:
        counts = {"train": 0, "val": 0}
        with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val:
            for texts in _read_records(p, "text"):
                ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
                for text, doc in zip(texts, ids):
                    split = "val" if zlib.crc32(text.encode("utf-8", "surrogatepass")) % 10_000 < threshold \
                        else "train"
                    (val if split == "val" else train).write(
                        np.asarray([*doc, tokenizer.eos_token_id], dtype=dtype).tobytes())
                    counts[split] += 1
        return {"dtype": dtype.name, "documents": counts, "split": "documents" if all(counts.values()) else "tail"}

    meta = _cached(folder, mode, tokenizer, write)
    train, val = (_tokens_file(folder / f"{s}.bin", np.dtype(meta["dtype"])) for s in ("train", "val"))
    if meta["split"] == "tail":
        tokens = train if len(train) else val
        cut = int(len(tokens) * (1.0 - val_fraction))
        train, val = tokens[:cut], tokens[cut:]
    return Corpus(train=train, val=val, description=f"{p} tokenized ({sum(meta['documents'].values())} documents, "
                                                    f"cache {folder})")


def load_sft_samples(path: str | Path, tokenizer, cache_dir: str | Path | None = None) -> SFTSamples:
    """Conversations (the `messages` column) rendered with the tokenizer's chat template; see sft.py."""
    p = Path(path).expanduser().resolve()
    folder = cache_folder(p, tokenizer, "sft", cache_dir)

    def write(tmp: Path) -> dict:
        samples = tokenize_conversations(_conversations(p), tokenizer)
        samples.tokens.tofile(tmp / "tokens.bin")
        samples.trained.astype(np.uint8).tofile(tmp / "trained.bin")
        np.save(tmp / "offsets.npy", samples.offsets)
        return {"dtype": samples.tokens.dtype.name, "samples": len(samples)}

    meta = _cached(folder, "sft", tokenizer, write)
    return SFTSamples(tokens=_tokens_file(folder / "tokens.bin", np.dtype(meta["dtype"])),
                      trained=_tokens_file(folder / "trained.bin", np.dtype(np.uint8)).view(bool),
                      offsets=np.load(folder / "offsets.npy"))


def _conversations(path: Path) -> Iterator[list[dict]]:
    """Each record's `messages` as [{role, content}]; ConfigError naming the file and the record (1-based; the
    driver checks JSON files line by line before Ray starts: orchestrator/runtime/preflight.py)."""
    n, current = 0, None
    for f, batch in records_by_file(path, "messages"):
        if f != current:
            n, current = 0, f
        for messages in batch:
            n += 1
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ConfigError(f"{f}, record {n}: `messages` must be a list of {{role, content}} strings, not "
                                  f"{str(messages)[:200]}; fix or remove the record")
            yield [{"role": m["role"], "content": m["content"]} for m in messages]


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Records as JSON lines (written to a temporary file and renamed)."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def stdlib_instructions(max_samples: int, cache_dir: str | Path | None = None,
                        max_source_chars: int = 1200) -> list[dict]:
    """Instruction samples from the standard library: user = "Write a Python function `name(args)` that does:
    <docstring>", assistant = the function's source (decorators included, docstring kept).

    Module-level functions with a docstring and source shorter than max_source_chars, from files in a
    fixed pseudo-random order (crc32 of the path relative to the stdlib, so few files are parsed for a
    small max_samples and the modules are mixed), functions in file order; test folders are skipped.
    With cache_dir, the list is cached there as JSON lines, per Python version and arguments.
    """
    root = stdlib_root()
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser() / (f"stdlib_instructions-py{sys.version_info[0]}.{sys.version_info[1]}"
                                                f"-{max_samples}-{max_source_chars}.jsonl")
        if cache.is_file():
            return [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    files = [f for f in stdlib_documents()
             if not {"test", "tests", "idle_test"} & set(f.relative_to(root).parts[:-1])]
    files.sort(key=lambda f: (zlib.crc32(f.relative_to(root).as_posix().encode()), f.as_posix()))
    out: list[dict] = []
    for f in files:
        if len(out) >= max_samples:
            break
        out.extend(_file_instructions(f, max_source_chars)[: max_samples - len(out)])
    if cache is not None:
        write_jsonl(out, cache)
    return out


def _file_instructions(f: Path, max_source_chars: int) -> list[dict]:
    try:
        with tokenize.open(f) as fh:     # honours the file's coding declaration
            source = fh.read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines, out = source.splitlines(keepends=True), []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("test"):
            continue
        doc = ast.get_docstring(node)
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        code = "".join(lines[first - 1: node.end_lineno]).rstrip() + "\n"
        if not doc or len(code) >= max_source_chars:
            continue
        prompt = f"Write a Python function `{node.name}({ast.unparse(node.args)})` that does:\n{doc}"
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": code}]})
    return out
