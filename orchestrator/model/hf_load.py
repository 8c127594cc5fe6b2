"""Read a Hugging Face safetensors checkpoint for one expert-parallel device: every dense tensor, only its own experts.

transformers (5.x) MoE models hold their routed experts fused, one tensor per MoE layer and projection::

    <layer>.mlp.experts.gate_up_proj   [E, 2F, D]     (gate rows first, then up rows)
    <layer>.mlp.experts.down_proj      [E, D, F]

but ``save_pretrained`` writes (and the hub holds) the model's original on-disk layout, one tensor per expert, e.g.
Mixtral ``model.layers.N.block_sparse_moe.experts.E.w1.weight`` [F, D], Qwen2-MoE / DeepSeek-V3
``model.layers.N.mlp.experts.E.gate_proj.weight`` [F, D], DeepSeek-V4 ``layers.N.ffn.experts.E.w1.weight`` [F, D].
``from_pretrained`` renames and fuses them through the model type's conversion mapping
(``transformers.conversion_mapping.get_model_conversion_mapping``: ``WeightRenaming``s, then at most one
``WeightConverter`` per key, whose operations -- ``MergeModulelist``, ``Concatenate``, ... -- build the fused tensor).

:func:`read_hf_state` uses that same machinery (the mapping, ``rename_source_key``, the converters' ``convert``) but
first decides, from the checkpoint's key list alone, which on-disk tensors this device needs:

* a dense (non-expert) model tensor: every on-disk tensor it is built from;
* a fused expert parameter ``P`` (``experts_of(P)`` is a list of global expert ids ``ids``):
  - per-expert on disk (the converter merges a module list): only the tensors of experts in ``ids``, each once;
  - already fused on disk ([E, ...]): only the rows in ``ids``, read with ``get_slice`` in contiguous runs.

The result for ``P`` has shape ``[len(ids), *P.shape[1:]]`` and row ``j`` is expert ``ids[j]`` (an id listed twice,
a replica, gives two equal rows). Which on-disk tensor is expert ``e`` follows transformers exactly: the tensors a
``MergeModulelist`` stacks are taken in natural key order (``dot_natural_key``), so expert ``e`` is the ``e``-th.

FP8 block-quantized checkpoints (the released DeepSeek-V3 / V4 weights: ``float8_e4m3fn`` weights, one scale per
128 x 128 block, config.json ``quantization_config``) are dequantized on read, per stored tensor, before any
converter fuses experts: each weight this device reads is multiplied by its block scales in float32 (for expert
rows: only those experts' scale rows are read) and cast to the model's dtype (model/fp8.py). Scale tensors are
consumed by their weights, never planned as model tensors.

Not supported (a ``ConfigError`` says so): other quantized checkpoints, a user ``key_mapping``, ``.bin`` checkpoints,
and an expert converter that merges along a dimension other than 0.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import ConfigError
from orchestrator.model.fp8 import Fp8Format, dequantize, quantization_format, scale_grid, scale_key_of

__all__ = ["ReadStats", "read_hf_state", "is_expert_param", "list_checkpoint_keys", "weight_files",
           "check_weight_files"]

_EXPERT_PARAM = re.compile(r"(?:^|\.)experts\.[A-Za-z_]\w*$")
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                       "float8_e8m0fnu") if hasattr(torch, n)}


def is_expert_param(name: str) -> bool:
    """True for a fused routed-expert tensor of a transformers MoE model: a tensor held directly by a module named
    ``experts`` (``model.layers.3.mlp.experts.gate_up_proj``, ``...experts.down_proj``,
    ``...experts.gate_up_proj_bias``); false for per-expert modules (``experts.3.w1.weight``), shared experts and the
    router."""
    return _EXPERT_PARAM.search(name) is not None


@dataclass
class ReadStats:
    """What :func:`read_hf_state` actually read from disk.

    ``tensors_read``: reads issued (one ``get_tensor``, or one ``get_slice`` row range); ``bytes_read``: bytes of the
    tensors those reads returned; ``files_opened``: safetensors files opened (to list keys when there is no index, or to
    read); ``keys_read``: the on-disk keys read, in whole or (fused experts) in part.
    """
    tensors_read: int = 0
    bytes_read: int = 0
    files_opened: int = 0
    keys_read: set[str] = field(default_factory=set)


@dataclass
class _Group:
    """The on-disk tensors that make one model tensor (or, for a one-to-many converter, several)."""
    target: str                                    # first target name, as `rename_source_key` gives it
    transform: Any                                 # a WeightConverter, or None for a plain (possibly renamed) copy
    sources: dict[str, list[str]] = field(default_factory=dict)   # source pattern -> on-disk keys, natural order


class _Files:
    """The checkpoint's key -> file map; opens each file once, on first need, and counts what it reads."""

    def __init__(self, path: Path, stack: ExitStack, stats: ReadStats):
        from safetensors import safe_open

        self._safe_open, self._stack, self.stats, self.path = safe_open, stack, stats, path
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}
        self.fp8: Fp8Format | None = None     # set by quantized(): the checkpoint's FP8 format
        self.scale_of: dict[str, str] = {}    # weight key -> its block-scale key (FP8 checkpoints)
        weight_map, files = weight_files(path)
        if weight_map is not None:
            self.file_of = dict(weight_map)
            return
        for fname in files:
            for key in self._open(fname).keys():
                if key in self.file_of:
                    raise ConfigError(f"{path}: key {key!r} is in both {self.file_of[key]} and {fname}")
                self.file_of[key] = fname

    def _open(self, fname: str):
        if fname not in self._handles:
            try:
                self._handles[fname] = self._stack.enter_context(
                    self._safe_open(str(self.path / fname), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise ConfigError(f"{self.path / fname}: cannot open as safetensors: {e}") from e
            self.stats.files_opened += 1
        return self._handles[fname]

    def where(self, key: str) -> str:
        return str(self.path / self.file_of[key])

    def shape(self, key: str) -> list[int]:
        try:
            return list(self._open(self.file_of[key]).get_slice(key).get_shape())
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{self.where(key)}: cannot read the shape of {key!r}: {e}") from e

    def _count(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        self.stats.tensors_read += 1
        self.stats.bytes_read += tensor.numel() * tensor.element_size()
        self.stats.keys_read.add(key)
        return tensor

    def tensor(self, key: str) -> torch.Tensor:
        try:
            t = self._open(self.file_of[key]).get_tensor(key)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{self.where(key)}: cannot read {key!r}: {e}") from e
        return self._count(key, t)

    def quantized(self, fmt: Fp8Format | None) -> set[str]:
        """Note the checkpoint's FP8 format (None: unquantized) and pair every weight with its block scale;
        returns the scale keys (no model tensor is made of them)."""
        self.fp8 = fmt
        if fmt is not None:
            self.scale_of = {k: s for k in self.file_of if (s := scale_key_of(k, self.file_of)) is not None}
        return set(self.scale_of.values())

    def weight(self, key: str, dtype: torch.dtype, ids: list[int] | None = None) -> torch.Tensor:
        """Tensor `key` (rows `ids` of it when given); an FP8 weight dequantized with its block scales (those
        rows' scales only) and cast to `dtype`. ConfigError naming the file and key for a float8 tensor without
        a scale, or in a checkpoint whose config.json has no quantization_config."""
        t = self.tensor(key) if ids is None else self.rows(key, ids)
        scale = self.scale_of.get(key)
        if scale is None:
            if t.dtype in _FLOAT8:
                why = (f"its scale ({key}_scale_inv, or .scale / .qscale_weight of its module) is not in the "
                       f"checkpoint" if self.fp8 is not None else
                       f"{self.path / 'config.json'} has no quantization_config (FP8 checkpoints declare "
                       f"quant_method 'fp8' there)")
                dtype_name = str(t.dtype).removeprefix("torch.")
                raise ConfigError(f"{self.where(key)}: {key!r} is {dtype_name}, but {why}; give the checkpoint "
                                  f"as released (every FP8 weight with its block scale)")
            return t
        assert self.fp8 is not None
        s = self.tensor(scale) if ids is None else self.rows(scale, ids)
        return dequantize(t, s, self.fp8, dtype, f"{self.where(key)}: {key!r}")

    def rows(self, key: str, ids: list[int]) -> torch.Tensor:
        """Rows `ids` (in that order, repeats allowed) of `key`, reading each contiguous run of distinct rows once."""
        unique = sorted(set(ids))
        runs: list[tuple[int, int]] = []
        for i in unique:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        try:
            sl = self._open(self.file_of[key]).get_slice(key)
            parts = [self._count(key, sl[a:b]) for a, b in runs]
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{self.where(key)}: cannot read rows {unique} of {key!r}: {e}") from e
        block = torch.cat(parts) if len(parts) > 1 else parts[0]
        pos = {i: n for n, i in enumerate(unique)}
        return block[torch.tensor([pos[i] for i in ids], dtype=torch.long)] if unique != list(ids) else block


def weight_files(path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """The safetensors files of checkpoint folder `path` as from_pretrained picks them: an index's (and its
    weight_map, key -> file name), else model.safetensors, else every *.safetensors (weight_map None). Raises
    ConfigError naming the folder or the index."""
    indexes = sorted(path.glob("*.safetensors.index.json"), key=lambda p: p.name != "model.safetensors.index.json")
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            items = list(weight_map.items())
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise ConfigError(f"{index}: not a safetensors index (no readable 'weight_map': {e}); save the model "
                              f"again with save_pretrained") from e
        for key, fname in items:
            if not (path / str(fname)).is_file():
                raise ConfigError(f"{index}: key {key!r} is in {fname!r}, which is not in {path}; copy that file "
                                  f"there, or save the model again")
        return {str(k): str(f) for k, f in items}, sorted({str(f) for _, f in items})
    files = (["model.safetensors"] if (path / "model.safetensors").is_file()
             else sorted(p.name for p in path.glob("*.safetensors")))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors file (and no *.safetensors.index.json); "
                          "save the model with save_pretrained(..., safe_serialization=True)")
    return None, files


def check_weight_files(path: str | Path) -> None:
    """Every safetensors file of checkpoint folder `path` is whole: its header (an 8-byte little-endian length,
    then JSON) parses, and the end of its last tensor's data is the file's end, as safetensors requires on open.
    An FP8 checkpoint (model/fp8.py) also: its config.json's quantization_config is the FP8 block format, and every
    float8 tensor is float8_e4m3fn with a block scale of the right shape. Reads the headers (and config.json) only
    (no tensor), so the driver can run it before anything starts. Raises ConfigError naming the file, what is
    wrong and the fix."""
    folder = Path(path).expanduser()
    _, files = weight_files(folder)
    headers: dict[str, tuple[str, str, list[int]]] = {}   # key -> (file, safetensors dtype, shape)
    for fname in files:
        f = folder / fname

        def damaged(what: str) -> ConfigError:
            return ConfigError(f"model.hf_path={str(path)!r}: {f} is not a whole safetensors file: {what}; copy or "
                               f"download it again (or save the model again with save_pretrained)")

        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise damaged(f"it has {size} bytes, fewer than the 8 of its header's length")
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                raise damaged(f"its header is {n:,} bytes long, but the file has {size:,} bytes (truncated)")
            try:
                header = json.loads(fh.read(n))
                ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
                headers.update({k: (fname, str(t["dtype"]), [int(d) for d in t["shape"]])
                                for k, t in header.items() if k != "__metadata__"})
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                raise damaged(f"its header is not a safetensors header ({e})") from None
        end = 8 + n + max(ends, default=0)
        if end != size:
            raise damaged(f"its header says its tensors end at byte {end:,}, but the file has {size:,} bytes "
                          + ("(truncated)" if size < end else "(bytes after the last tensor)"))
    _check_fp8_headers(path, folder, headers)


def _check_fp8_headers(path: str | Path, folder: Path, headers: dict[str, tuple[str, str, list[int]]]) -> None:
    """check_weight_files' FP8 part, on the headers: `headers` key -> (file, safetensors dtype, shape)."""
    fmt = quantization_format(folder)   # a quantization_config other than FP8 blocks: ConfigError
    scales = {s for k in headers if (s := scale_key_of(k, headers)) is not None} if fmt is not None else set()
    for key, (fname, dtype, shape) in headers.items():
        scale = scale_key_of(key, headers) if fmt is not None and key not in scales else None
        if key in scales or not (dtype.startswith("F8_") or scale is not None):
            continue
        where = f"model.hf_path={str(path)!r}: {folder / fname}: {key!r}"
        if fmt is None:
            raise ConfigError(f"{where} is {dtype}, but {folder / 'config.json'} has no quantization_config (FP8 "
                              f"checkpoints declare quant_method 'fp8' there); give the checkpoint as released")
        if dtype != "F8_E4M3":
            raise ConfigError(f"{where} is {dtype}" + (f" with a block scale ({scale!r})" if scale else "")
                              + ": only float8_e4m3fn (F8_E4M3) weights with block scales load")
        if scale is None:
            raise ConfigError(f"{where} is float8_e4m3fn, but its scale ({key}_scale_inv, or .scale / "
                              f".qscale_weight of its module) is not in the checkpoint; give the checkpoint as "
                              f"released (every FP8 weight with its block scale)")
        if len(shape) < 2:
            raise ConfigError(f"{where} has shape {shape} and a block scale ({scale!r}): a block-scaled weight has "
                              f"2 dims (or more: fused experts)")
        want = scale_grid(shape, fmt.block)
        if headers[scale][2] != want:
            raise ConfigError(f"{where} has shape {shape}, its scale {scale!r} ({folder / headers[scale][0]}) "
                              f"{headers[scale][2]}; in {fmt.block[0]} x {fmt.block[1]} blocks "
                              f"(quantization_config.weight_block_size) it must be {want}")


def list_checkpoint_keys(path: str | Path) -> dict[str, str]:
    """On-disk key -> file name of the safetensors checkpoint in `path` (reads the index, or the file headers)."""
    with ExitStack() as stack:
        return dict(_Files(Path(path), stack, ReadStats()).file_of)


def _plan(files: _Files, model, meta_sd: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> list[_Group]:
    """Group the on-disk keys by the model tensor they make, as `convert_and_load_state_dict_in_model` does;
    the keys in `skip` (FP8 block scales, read with their weights) take no part."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    groups: dict[str, _Group] = {}
    # Natural order matters: some renamings are stateful, and MergeModulelist stacks in arrival order
    for key in sorted(files.file_of, key=dot_natural_key):
        if key in skip:
            continue
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if target not in meta_sd and key in meta_sd:  # already in the model's naming; keep it
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_sd)
        if target not in meta_sd:
            continue  # not a tensor of this model (e.g. MTP layers); never read
        if pattern is not None:
            group = groups.setdefault(target, _Group(target, pattern_to_converter[pattern]))
            group.sources.setdefault(pattern, []).append(key)
        elif target not in groups:  # as transformers: the first key renamed to a target wins
            groups[target] = _Group(target, None, {key: [key]})
    return list(groups.values())


def _targets(group: _Group) -> list[str]:
    if group.transform is None:
        return [group.target]
    pats = group.transform.target_patterns
    return [group.target.replace(pats[0], p, 1) for p in pats]


def _expert_ids(group: _Group, targets: list[str], experts_of, meta_sd, path: Path) -> list[int] | None:
    found = [(t, experts_of(t)) for t in targets if t in meta_sd]
    lists = {tuple(ids) for _, ids in found if ids is not None}
    if not lists:
        return None
    if len(lists) > 1 or any(ids is None for _, ids in found):
        raise ConfigError(f"{path}: {targets} are built from the same checkpoint tensors but experts_of gives them "
                          f"different expert lists: {dict(found)}")
    ids = [int(i) for i in lists.pop()]
    n = meta_sd[group.target].shape[0]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{path}: experts_of({group.target!r}) = {ids}: ids must be in [0, {n}) "
                          "(the model's number of experts)")
    return ids


def _read_group(group: _Group, ids: list[int] | None, files: _Files, meta_sd) -> dict[str, list[torch.Tensor]]:
    """The source tensors of `group`, per source pattern, restricted to experts `ids` when given."""
    from transformers.core_model_loading import MergeModulelist

    dtype = meta_sd[group.target].dtype   # what an FP8 weight is dequantized to
    if ids is None:
        return {p: [files.weight(k, dtype) for k in keys] for p, keys in group.sources.items()}
    n_experts = meta_sd[group.target].shape[0]
    ops = getattr(group.transform, "operations", [])
    if any(getattr(op, "supports_many_to_many", False) for op in ops):
        raise ConfigError(f"{group.target}: its converter ({type(group.transform).__name__} with "
                          f"{[type(op).__name__ for op in ops]}) maps several expert sources to several targets; "
                          "reading a subset of experts through it is not supported")
    merges = [op for op in ops if isinstance(op, MergeModulelist)]
    out: dict[str, list[torch.Tensor]] = {}
    if merges:  # one tensor per expert on disk: read only ours
        if any(op.dim != 0 for op in merges):
            raise ConfigError(f"{group.target}: its converter merges experts along dim {merges[0].dim}; "
                              "only dim 0 is supported")
        for pattern, keys in group.sources.items():
            if len(keys) != n_experts:
                raise ConfigError(f"{files.path}: {len(keys)} on-disk tensors match {pattern!r} for "
                                  f"{group.target} (first {keys[0]!r} in {files.where(keys[0])}); "
                                  f"the model has {n_experts} experts")
            cache = {e: files.weight(keys[e], dtype) for e in sorted(set(ids))}
            out[pattern] = [cache[e] for e in ids]
        return out
    for pattern, keys in group.sources.items():  # already fused on disk: [E, ...], read our rows
        rows = []
        for key in keys:
            shape = files.shape(key)
            if not shape or shape[0] != n_experts:
                raise ConfigError(f"{files.where(key)}: {key!r} has shape {shape}; as the fused source of expert "
                                  f"parameter {group.target} its first dim must be the {n_experts} experts")
            rows.append(files.weight(key, dtype, ids))
        out[pattern] = rows
    return out


def _convert(group: _Group, tensors: dict[str, list[torch.Tensor]], model, files: _Files) -> dict[str, torch.Tensor]:
    if group.transform is None:
        (key, (t,)), = tensors.items()
        return {group.target: t}
    conv = deepcopy(group.transform)
    for pattern, ts in tensors.items():
        for t in ts:  # in order: row j of a merged expert tensor is the j-th tensor added
            conv.add_tensor(group.target, group.sources[pattern][0], pattern, t)
    try:
        result = conv.convert(group.target, model=model, config=model.config)
    except Exception as e:
        keys = [k for ks in group.sources.values() for k in ks]
        raise ConfigError(f"{files.path}: converting {keys[:4]}{'...' if len(keys) > 4 else ''} "
                          f"(in {files.where(keys[0])}) into {group.target} failed: {type(e).__name__}: {e}") from e
    return {name: (t[0] if isinstance(t, list) else t) for name, t in result.items()}


def _as_model_tensor(name: str, value: torch.Tensor, group: _Group, ids: list[int] | None, files: _Files, model,
                     meta_sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """A converted tensor checked against the model's `name` (its shape; of an expert parameter, `ids`' rows; not
    pre-quantized) and cast to the model's dtype."""
    keys = [k for ks in group.sources.values() for k in ks]
    where = f"{files.where(keys[0])}: {keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
    if name not in meta_sd:
        raise ConfigError(f"{where} converts to {name!r}, which is not a tensor of "
                          f"{type(model).__name__}")
    want = meta_sd[name]
    shape = list(want.shape)
    if ids is not None:
        shape[0] = len(ids)
    if list(value.shape) != shape:
        raise ConfigError(f"{where} gives {name} shape {list(value.shape)}; the model expects {shape}"
                          + (f" (experts {ids})" if ids is not None else ""))
    if value.dtype in _FLOAT8 and want.dtype not in _FLOAT8:   # (read_group dequantizes FP8 weights: a safety net)
        raise ConfigError(f"{where} is {value.dtype}: only FP8 weights with block scales are dequantized")
    return value.to(want.dtype) if value.dtype != want.dtype else value


def read_hf_state(path: str | Path, model, experts_of: Callable[[str], list[int] | None]
                  ) -> tuple[dict[str, torch.Tensor], ReadStats]:
    """Read from the safetensors checkpoint in `path` the state of `model` that one expert-parallel device holds.

    `path`: a directory with one or more ``*.safetensors`` files (with or without ``*.safetensors.index.json``), as
    ``save_pretrained`` writes it. `model`: the transformers model (any device, ``meta`` included) whose
    ``state_dict()`` names and shapes are the targets and whose class / ``config.model_type`` selects transformers'
    conversion mapping. `experts_of(name)`: for a fused expert parameter (``...mlp.experts.gate_up_proj`` [E, 2F, D],
    ``...mlp.experts.down_proj`` [E, D, F]) the global expert ids this device holds, in slot order; ``None`` for any
    other tensor.

    Returns ``(state, stats)``: ``state`` maps every tensor of ``model.state_dict()`` (parameters and persistent
    buffers, e.g. DeepSeek-V4 ``mlp.gate.tid2eid``, ``mlp.gate.e_score_correction_bias``) to a CPU tensor of the
    model's dtype -- the full tensor, or for an expert parameter ``[len(ids), *shape[1:]]`` with row ``j`` = expert
    ``ids[j]``; a tied parameter absent from the checkpoint is the same tensor as its source. ``stats`` counts what was
    read: only the needed keys (and of fused expert tensors only the needed rows) are ever read.

    An FP8 checkpoint (config.json ``quantization_config``, model/fp8.py) is dequantized on read: each float8
    weight read (for experts, ``ids``' rows) times its block scales (the same rows), in float32, cast to the model's
    dtype; its scales count in ``stats``.

    Raises ``ConfigError`` (a ``ValueError``) naming the file and key for: no safetensors in `path`, a model tensor
    missing from the checkpoint, a missing expert, a shape mismatch, an unreadable tensor, a quantization other
    than FP8 blocks, a float8 weight without its scale.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a save_pretrained checkpoint folder)")
    meta_sd = model.state_dict()
    stats = ReadStats()
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        files = _Files(path, stack, stats)
        scales = files.quantized(quantization_format(path))
        for group in _plan(files, model, meta_sd, scales):
            targets = _targets(group)
            ids = _expert_ids(group, targets, experts_of, meta_sd, path)
            if ids == []:  # no expert of this layer on this device: nothing to read
                for name in targets:
                    want = meta_sd[name]
                    state[name] = torch.empty((0, *want.shape[1:]), dtype=want.dtype)
                continue
            tensors = _read_group(group, ids, files, meta_sd)
            for name, value in _convert(group, tensors, model, files).items():
                state[name] = _as_model_tensor(name, value, group, ids, files, model, meta_sd)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name, source in tied.items():
        if name in meta_sd and name not in state and source in state:
            state[name] = state[source]
    missing = [n for n in meta_sd if n not in state]
    if missing:
        raise ConfigError(f"{path}: the checkpoint has no tensor for {len(missing)} tensor(s) of "
                          f"{type(model).__name__}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return state, stats
