"""Export the native MoE transformer as the Hugging Face transformers model that computes the same function.

    python -m orchestrator export CHECKPOINT --hf OUT

Which transformers class the native model is, and its state under that class's names, is hf_mapping.py's (its
docstring: the classes, RoPE, the settings refused, numerics); this module writes the model folder: config.json,
model.safetensors, README.md, tokenizer files, from a native state or a checkpoint.

A checkpoint of a Hugging Face model trained here (model.hf_path / model.hf_config) already holds the transformers
parameter names: `export_hf_checkpoint` builds the class from its config.json, loads and saves it, in the training
dtype: a run from an FP8 checkpoint exports dequantized weights, without the source's quantization_config.

transformers is imported lazily: this module imports without it; the functions that need it say how to install it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from orchestrator.checkpoint.hf_mapping import (CLASS_NAMES, CONFIG_NAMES, ERNIE, GLM4_MOE, MIXTRAL, QWEN2_MOE,
                                                ROTATE_HALF, _native_state, _transformers, hf_architecture,
                                                hf_config_for, hf_to_native_state, is_hf_model, native_to_hf_state)
from orchestrator.config import BalanceConfig, ConfigError, ModelConfig
from orchestrator.errors import RunError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


# --------------------------------------------------------------------------- writing
def _no_init():
    """transformers' context that skips random init of a model about to be loaded (a no-op where it is missing)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tied head's weight is the embedding: a state that leaves lm_head.weight out (a tied parameter is named
    once in named_parameters, so checkpoints hold it once) gets it."""
    state = dict(state)
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    tied = getattr(model, "_tied_weights_keys", None) or {}
    pairs = tied.items() if isinstance(tied, Mapping) else [(t, "model.embed_tokens.weight") for t in tied]
    for target, source in pairs:
        if isinstance(target, str) and target not in state and source in state:
            state[target] = state[source]
    return state


def _load_and_save(model: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> int:
    state = _fill_tied(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunError(f"the state does not load into {type(model).__name__}: {str(e).splitlines()[0]} "
                       f"{str(e).splitlines()[1:3]}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()   # one line per run, as the other subcommands print
    try:
        model.save_pretrained(str(out_dir))
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    return sum(p.numel() for p in model.parameters())


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    """The tokenizer files of a folder to copy (checked before anything is written)."""
    if tokenizer_dir is None:
        return []
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise RunError(f"tokenizer {src} is not a directory (a folder with tokenizer.json / tokenizer_config.json)")
    files = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not any(f.name.startswith("tokenizer") or f.name in ("vocab.json", "vocab.txt") for f in files):
        raise RunError(f"tokenizer {src} holds none of {', '.join(TOKENIZER_FILES[:5])}: not a tokenizer folder")
    return files


def _copy_tokenizer(files: list[Path], out_dir: Path, vocab_size: int) -> str:
    """Copy a tokenizer's files; the note on what was written (the return values and the README say it)."""
    if not files:
        if vocab_size == 256:
            return ("byte-level model: token id = byte value (ids = list(text.encode('utf-8')), text = "
                    "bytes(ids).decode('utf-8', 'replace')); no tokenizer files written")
        return "no tokenizer given (--tokenizer DIR): weights and config only"
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
    return f"tokenizer files copied from {files[0].parent}: {', '.join(f.name for f in files)}"


def _write_readme(out_dir: Path, lines: list[str]) -> None:
    (out_dir / "README.md").write_text("# Exported model\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")


MTP_FILE = "mtp.safetensors"   # a native model's multi-token prediction modules, beside the exported model


def export_native(state: Any, model_cfg: ModelConfig, balance_cfg: BalanceConfig | None, out_dir: str | Path,
                  tokenizer_dir: str | Path | None = None, *, dtype: str | torch.dtype | None = None,
                  dropless: bool = False, source: str | None = None) -> dict[str, Any]:
    """Write the native model (a full state dict or the model) as a transformers model folder: config.json,
    model.safetensors (transformers' own on-disk names), generation_config.json, README.md, tokenizer files when
    given. `AutoModelForCausalLM.from_pretrained(out_dir)` then computes the native logits. A model with MTP modules
    (model.mtp_depth) has them written beside it, in mtp.safetensors under the native names (MTP_FILE). Returns what
    was done."""
    tf = _transformers()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory; give a folder for the Hugging Face model")
    first = next(iter(_native_state(state, model_cfg).values()), None)
    dtype = dtype or (first.dtype if first is not None else None)
    cfg = hf_config_for(model_cfg, balance_cfg, dropless=dropless, dtype=dtype)
    try:
        hf_state = native_to_hf_state(state, model_cfg, balance_cfg, dropless=dropless)
    except ConfigError:
        raise
    except ValueError as e:   # the state is not a full state of this config
        raise RunError(str(e)) from None
    arch = cfg.model_type
    cls = getattr(tf, CLASS_NAMES[arch])
    with _no_init():
        model = cls(cfg)
    if cfg.dtype is not None:
        model = model.to(cfg.dtype)
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    n_params = _load_and_save(model, hf_state, out)
    tokenizer = _copy_tokenizer(tokenizer_files, out, model_cfg.vocab_size)
    notes = []
    mtp = {k: v for k, v in _native_state(state, model_cfg).items() if k.startswith("mtp.")}
    if mtp:   # no transformers class here has MTP modules: they travel beside the model, under the native names
        from safetensors.torch import save_file

        save_file({k: v.detach().to(model.dtype).contiguous().clone() for k, v in mtp.items()},   # as the model
                  str(out / MTP_FILE), metadata={"format": "pt"})
        notes.append(f"multi-token prediction: the {model_cfg.mtp_depth} MTP module(s) are not part of "
                     f"{CLASS_NAMES[arch]} (the model computes the main logits only); their {len(mtp)} tensors are in "
                     f"{MTP_FILE} under the native names (mtp.<k-1>.*: orchestrator/model/mtp.py; embedding and head "
                     f"are the model's)")
    if arch in ROTATE_HALF:
        notes.append(f"RoPE: the native interleaved pairs are {CLASS_NAMES[arch]}'s rotate-half pairs after permuting "
                     f"the rows of every head of q_proj and k_proj (head dim order 0, 2, 4, ..., 1, 3, 5, ...)")
    if dropless and (balance_cfg or BalanceConfig()).capacity_factor:
        notes.append(f"dropless: the native run dropped copies over balance.capacity_factor="
                     f"{(balance_cfg or BalanceConfig()).capacity_factor}; this model never drops")
    if cfg.dtype == torch.float64:
        notes.append("float64: load with experts_implementation='eager' (torch's grouped_mm, transformers' default "
                     "for experts, has no float64); HF norms, RoPE and router scores are float32")
    if arch in (QWEN2_MOE,) or (arch == GLM4_MOE and not model_cfg.num_shared_experts):
        notes.append("the class always has a shared expert: exported with width 0 (it adds 0)")
    lines = [f"architecture: {CLASS_NAMES[arch]} ({CONFIG_NAMES[arch]}), transformers {tf.__version__}",
             f"source: {source}" if source else "source: a native MoETransformer state",
             f"parameters: {n_params}, dtype {str(cfg.dtype).replace('torch.', '')}", *notes, f"tokenizer: {tokenizer}"]
    _write_readme(out, lines)
    return {"out_dir": str(out), "architecture": arch, "model_class": CLASS_NAMES[arch], "parameters": n_params,
            "tokenizer": tokenizer, "notes": notes}


def export_hf_checkpoint(state: Mapping[str, torch.Tensor], hf_config_dict_or_dir: Mapping[str, Any] | str | Path,
                         out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                         source: str | None = None) -> dict[str, Any]:
    """Export a checkpoint of a Hugging Face model trained here (model.hf_path / model.hf_config): its parameter
    names already are the transformers model's, so this builds the class from the config (a config.json dict with
    its model_type, or a folder holding config.json), loads the state strictly and saves it. Experts saved per id
    must be stacked first (checkpoint.tools.full_state_dict).

    The weights are written in the checkpoint's (training) dtype, never FP8: a run from an FP8 block-quantized
    checkpoint (DeepSeek-V3/V4 as released) dequantized it on read (model/fp8.py), so the export drops the source
    config's quantization_config and transformers loads the folder as an unquantized model."""
    tf = _transformers()
    src = hf_config_dict_or_dir
    if not isinstance(src, Mapping):
        path = Path(src).expanduser()
        if path.is_dir():   # model.hf_path: the model folder (config.json, weights, maybe the tokenizer)
            if tokenizer_dir is None and any((path / n).is_file() for n in TOKENIZER_FILES[:2]):
                tokenizer_dir = path
            path = path / "config.json"
        if not path.is_file():
            raise RunError(f"{src}: no config.json there; the Hugging Face config the run trained from is needed "
                           f"(give its folder or config.json file)")
        try:
            src = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{path} is not valid JSON: {e}") from None
    d = dict(src)
    d.pop("quantization_config", None)   # an FP8 source was dequantized on read: the export is the training dtype
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise RunError("the Hugging Face config has no model_type: give config.json's contents, file or folder")
    try:
        cfg = tf.AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise RunError(f"model_type {model_type!r}: {e}") from None
    first = next(iter(state.values()), None)
    if first is not None and first.is_floating_point():
        cfg.dtype = first.dtype
    with _no_init():
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to(first.dtype) if first is not None and first.is_floating_point() else model
    out = Path(out_dir)
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    n_params = _load_and_save(model, dict(state), out)
    tokenizer = _copy_tokenizer(tokenizer_files, out, getattr(cfg, "vocab_size", 0))
    arch = type(model).__name__
    _write_readme(out, [f"architecture: {arch} (the model the run trained), transformers {tf.__version__}",
                        f"source: {source}" if source else "source: a checkpoint state", f"parameters: {n_params}",
                        f"tokenizer: {tokenizer}"])
    return {"out_dir": str(out), "architecture": cfg.model_type, "model_class": arch, "parameters": n_params,
            "tokenizer": tokenizer, "notes": []}


# --------------------------------------------------------------------------- checkpoints
def export_checkpoint(path: str, out_dir: str, tokenizer_dir: str | None = None, config_file: str | None = None,
                      dropless: bool = False) -> dict[str, Any]:
    """`python -m orchestrator export CHECKPOINT --hf OUT`: a checkpoint folder (or a run dir / checkpoint root: its
    newest committed checkpoint) as a transformers model folder. The model config is the manifest's fingerprint; the
    routing settings (balance) are the manifest's saved training settings, else the run directory's config.yaml,
    else `config_file`'s (which also overrides both)."""
    from orchestrator.checkpoint.tools import full_state_dict, newest_checkpoint, read_parameters
    from orchestrator.config import config_from_dict

    ckpt = newest_checkpoint(path)
    params, manifest = read_parameters(ckpt)
    state = full_state_dict(params)
    model_dict = dict((manifest.get("fingerprint") or {}).get("model") or {})
    dtype = (manifest.get("fingerprint") or {}).get("dtype")
    source = f"{ckpt.shown} (step {manifest['step']})"
    if tokenizer_dir is None and ckpt.local:   # the run's own: the driver saves it beside the checkpoints and in
        root = Path(ckpt.root).parent          # the run dir (<run dir>/checkpoints/step_N by default)
        tokenizer_dir = next((str(d) for d in (root / "tokenizer", root.parent / "tokenizer") if d.is_dir()), None)

    # ---- a Hugging Face model trained here: the names are already the transformers names ----------------------
    # model.hf_path (the model folder: config.json + *.safetensors) / model.hf_config (a config.json file) are the
    # keys of model/hf.py; the manifest records the path, so the config.json must still be there (a dict, the
    # file's contents, is taken as well). export_hf_checkpoint is the whole export for them.
    if is_hf_model(model_dict):
        hf_src = model_dict.get("hf_path") or model_dict.get("hf_config")
        if isinstance(hf_src, str) and hf_src.lstrip().startswith("{"):
            hf_src = json.loads(hf_src)
        return {**export_hf_checkpoint(state, hf_src, out_dir, tokenizer_dir, source=source), "step": manifest["step"],
                "source": ckpt.shown}

    # ---- the native model -------------------------------------------------------------------------------------
    balance: dict[str, Any] | None
    if config_file is not None:
        balance = _yaml_section(Path(config_file), "balance")
        if balance is None:
            raise ConfigError(f"--config {config_file}: no balance section (the run's routing settings) in it")
    else:
        balance = (manifest.get("training") or {}).get("balance")
        if balance is None and ckpt.local:   # <run dir>/checkpoints/step_N -> <run dir>/config.yaml
            balance = _yaml_section(Path(ckpt.root).parent.parent / "config.yaml", "balance")
        if balance is None:
            raise RunError(f"{source} predates saved training settings and no run config.yaml was found next to it: "
                           f"its routing settings (balance.routing, num_groups, ...) are unknown; pass --config with "
                           f"the run's config file")
    full = config_from_dict({"model": model_dict, "balance": balance})
    info = export_native(state, full.model, full.balance, out_dir, tokenizer_dir, dtype=dtype, dropless=dropless,
                         source=source)
    return {**info, "step": manifest["step"], "source": ckpt.shown}


def _yaml_section(path: Path, section: str) -> dict[str, Any] | None:
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    value = data.get(section) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else None


__all__ = ["hf_architecture", "hf_config_for", "native_to_hf_state", "hf_to_native_state", "export_native",
           "export_hf_checkpoint", "export_checkpoint", "is_hf_model", "MIXTRAL", "ERNIE", "QWEN2_MOE", "GLM4_MOE"]
