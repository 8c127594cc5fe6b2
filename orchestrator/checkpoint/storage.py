"""One storage interface over local paths and URIs, through `pyarrow.fs`.

    Storage("runs/r1/checkpoints")                     a local folder
    Storage("s3://bucket/prefix")                      S3 (credentials from the usual AWS variables)
    Storage("s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http")   an S3-compatible server
    Storage("gs://bucket/prefix"), Storage("hdfs://...")                     whatever pyarrow.fs knows

Paths given to the methods are relative to the root, '/'-separated, and stay inside it: an absolute path, a
'.' or '..' component, an empty one ('a//b'), a backslash or a NUL is refused (a checkpoint manifest is data
from storage, and a name in it must not reach outside its checkpoint). `write_atomic` makes an object visible whole
or not at all: a temporary file and one rename locally, a single PUT on object stores (whose
objects appear atomically). A Storage is cheap to rebuild from its URI, which is what travels to
actors. Messages and repr show the URI with its credentials redacted (`shown`). A full disk is said as such,
with the bytes the write needed and those free (orchestrator/runtime/disk.py, whose test hook local writes obey).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from orchestrator.config import redact_text, redact_url
from orchestrator.runtime.disk import free_bytes, full, room
from orchestrator.errors import RunError


class StorageError(RunError):
    """A storage operation failed; the message names the URI and the path."""


def uri_join(uri: str, *parts: str) -> str:
    """Append path parts to a path or URI, keeping a URI's query (`?endpoint_override=...`) at the end."""
    base, sep, query = uri.partition("?")
    path = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return path + sep + query


def check_relative(rel: str, root: str) -> str:
    """`rel` if it is a path inside a storage root; else StorageError naming it and the root (redacted)."""
    why = None
    if not isinstance(rel, str) or not rel:
        why = "is empty" if rel == "" else "is not a string"
    elif "\\" in rel or "\0" in rel:
        why = "holds a backslash or a NUL"
    elif rel.startswith("/") or (len(rel) > 1 and rel[0].isalpha() and rel[1] == ":"):  # or a drive (C:/...)
        why = "is absolute"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        why = "has an empty, '.' or '..' component"
    if why:
        raise StorageError(f"refusing the path {rel!r} under {redact_url(root)}: it {why}; paths in a storage are "
                           f"relative to its root, '/'-separated, and stay inside it")
    return rel


class Storage:
    def __init__(self, uri: str):
        self.uri = uri
        self.shown = redact_url(uri)   # for messages and logs: the URI may carry credentials (s3://KEY:SECRET@...)
        try:
            if "://" in uri and not uri.startswith("file://"):
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
                self.local = False
            else:
                path = uri[len("file://"):] if uri.startswith("file://") else uri
                self.fs, self.root = pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())
                self.local = True
        except Exception as e:
            raise StorageError(f"storage URI {self.shown!r} cannot be opened: {redact_text(str(e))}") from None
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.shown!r})"

    def _full(self, rel: str) -> str:
        """The filesystem path of `rel` (checked: inside the root); '' is the root itself."""
        return f"{self.root}/{check_relative(rel, self.uri)}" if rel else self.root

    def _fail(self, what: str, rel: str, e: Exception) -> StorageError:
        if isinstance(e, StorageError):  # a refused path (from _full): its own message says it all
            return e
        return StorageError(f"could not {what} {rel or '.'} under {self.shown}: {redact_text(str(e))}")

    def child(self, rel: str) -> "Storage":
        check_relative(rel, self.uri)
        if not self.local and ("?" in rel or "#" in rel):  # would change the URI's query (endpoint, credentials)
            raise StorageError(f"refusing the path {rel!r} under {self.shown}: '?' and '#' would change the URI")
        return Storage(uri_join(self.uri, rel))

    def check(self) -> None:
        """Raise StorageError now if the root cannot be reached or created."""
        try:
            self.fs.create_dir(self.root, recursive=True)
            self.fs.get_file_info(self.root)
        except Exception as e:
            raise self._fail("reach or create", "", e) from None

    def write(self, rel: str, data: bytes) -> None:
        try:
            parent = self._full(rel).rsplit("/", 1)[0]
            if self.local:
                self.fs.create_dir(parent, recursive=True)
                room(self._full(rel), len(data))
            with self.fs.open_output_stream(self._full(rel)) as f:
                f.write(data)
        except Exception as e:
            if full(e):
                free = free_bytes(self._full(rel)) if self.local else None
                raise StorageError(f"no space left writing {rel} under {self.shown}: it needs {len(data):,} bytes"
                                   + (f", {free:,} are free there" if free is not None else "")) from None
            raise self._fail("write", rel, e) from None

    def write_atomic(self, rel: str, data: bytes) -> None:
        check_relative(rel, self.uri)   # before a temporary name is made from it
        if not self.local:
            self.write(rel, data)  # one PUT: the object appears whole or not at all
            return
        tmp = f"{rel}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.write(tmp, data)
            with open(self._full(tmp), "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._full(tmp), self._full(rel))
        except Exception as e:
            try:  # what a full disk let through of the temporary file
                os.unlink(self._full(tmp))
            except OSError:
                pass
            raise self._fail("commit", rel, e) from None

    def read(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._full(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{rel} does not exist under {self.shown}") from None
        except Exception as e:
            raise self._fail("read", rel, e) from None

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the file does not exist."""
        try:
            info = self.fs.get_file_info(self._full(rel))
        except Exception as e:
            raise self._fail("look at", rel, e) from None
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the sub-folders of rel (sorted); none when rel does not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._full(rel), allow_not_found=True))
        except Exception as e:
            raise self._fail("list", rel, e) from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._full(rel))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._fail("delete", rel, e) from None

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self._full(rel))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._fail("delete", rel, e) from None

    def move_dir(self, rel: str, dest: str) -> None:
        """Move the folder `rel` to `dest` (both under the root): one rename locally; on object stores a copy of
        each object, then the source deleted."""
        try:
            src, dst = self._full(rel), self._full(dest)
            if self.local:
                self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
                self.fs.move(src, dst)
                return
            infos = self.fs.get_file_info(pafs.FileSelector(src, recursive=True, allow_not_found=True))
            for info in infos:
                if info.type == pafs.FileType.File:
                    self.fs.copy_file(info.path, dst + info.path[len(src):])
            self.fs.delete_dir(src)
        except Exception as e:
            raise self._fail("move", f"{rel} to {dest}", e) from None
