"""Reading a config: the structured defaults, a YAML file, `key=value` overrides; every error one line naming
the key, the file and its 1-based line."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from orchestrator.config.base import DEFAULT_CONFIG, ConfigError
from orchestrator.config.schema import Config
from orchestrator.config.validate import validate

# "orchestrator.config": the logger a config's messages have always come under (tests catch it by that name).
log = logging.getLogger("orchestrator.config")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Config from the structured defaults, then the YAML file, then `key=value` overrides.

    Keys from the dataclass defaults and from the default config file (DEFAULT_CONFIG: what the jobs read when
    --config is not given) are defaults; keys from another --config file and from overrides are the user's. A
    user's key that has no effect under the chosen options is refused (every one of them, in one ConfigError); a
    default that does not apply resolves to what does, said once in the log. Raises ConfigError (one line, naming
    the key, the file and its 1-based line where there is one)."""
    merged: DictConfig = OmegaConf.structured(Config)
    user: set[str] = set()
    if path is not None:
        data = _read_yaml(Path(path))
        merged = _merge(merged, data, f"config file {path}", Path(path))
        if not _is_default_file(Path(path)):
            user |= _dotted_keys(data)
    for item in overrides or []:
        extra = _parse_override(item)
        merged = _merge(merged, extra, f"override {item!r}")
        user |= _dotted_keys(extra)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:   # a missing mandatory field (a fault without kind), an interpolation
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad value for '{key}': {str(e).splitlines()[0]}") from None
    resolved = validate(cfg, frozenset(user))
    if resolved:
        log.info("defaults that do not apply here resolve to what does: %s", "; ".join(resolved))
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (how actors receive it)."""
    cfg: Config = OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(data), "config"))  # type: ignore[assignment]
    return cfg


def _is_default_file(path: Path) -> bool:
    try:
        return path.resolve() == DEFAULT_CONFIG.resolve()
    except OSError:
        return False


def _dotted_keys(data: DictConfig) -> set[str]:
    """Every leaf key of a config file or override as a dotted path (a list is one leaf: `faults.plan`)."""
    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix:
            out.add(prefix)

    walk(OmegaConf.to_container(data, resolve=False), "")
    return out


def _yaml_error(e: Exception, lines: bool = True) -> str:
    """A YAML parser's error as one line, with 1-based line and column numbers (yaml's marks count from 0);
    lines=False: columns only (an override's value is one line, and its end of stream counts as the next)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark, context, cmark = (getattr(e, n, None) for n in ("problem_mark", "context", "context_mark"))

    def at(m: Any) -> str:
        return f"line {m.line + 1}, column {m.column + 1}" if lines else f"column {m.column + 1}"

    where = f"{at(mark)}: " if mark is not None and (lines or cmark is None) else ""
    if context:
        return f"{where}{problem} ({context}{f' at {at(cmark)}' if cmark is not None else ''})"
    return f"{where}{problem}"


def _parse_override(item: str) -> DictConfig:
    """One `key=value` override; its value is YAML (`[1, 2]`, `{kind: kill}`, a quoted string)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example train.steps=50)")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        value = item.split("=", 1)[1]
        raise ConfigError(f"override {item!r}: its value {value!r} is not valid YAML ({_yaml_error(e, False)}); close "
                          f"its brackets and quotes, or quote the whole value (key='...')") from None


def _read_yaml(path: Path) -> DictConfig:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file such as {DEFAULT_CONFIG}")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error(e)}; fix that line (indent with "
                          f"spaces, close brackets and quotes, quote values holding ': ' or ' #')") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...), not a list")
    return data


def _key_line(path: Path, key: str | None) -> int | None:
    """The 1-based line of dotted `key` in the YAML file `path` (the deepest part of it found), or None."""
    import yaml

    if not key:
        return None
    try:
        node = yaml.compose(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for part in re.split(r"\.|\[", key):
        part = part.rstrip("]")
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == part), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _merge(base: DictConfig, extra: DictConfig, where: str, file: Path | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        line = _key_line(file, key) if file is not None else None
        raise ConfigError(f"{where}: unknown config key '{key}'{f' (line {line})' if line else ''}; known sections "
                          f"are {', '.join(Config.__dataclass_fields__)} (see {DEFAULT_CONFIG} for every key)") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        line = _key_line(file, key) if file is not None else None
        what = f"bad value for '{key}'" if key else "bad value"
        raise ConfigError(f"{where}{f', line {line}' if line else ''}: {what}: {msg}") from None
