"""What every section of the config shares: its error, where the default config file is, the small checks
(`_positive`, `_choice`), and the plain-dict form (`to_dict`) the config travels as. No torch, no Ray."""
from __future__ import annotations

from dataclasses import MISSING
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "default.yaml"

# The root Config (schema.py) as the sections' checks see it: schema.py imports every section, so a section
# names the root by this alias instead of importing it (no import cycle inside the package).
Root = Any


try:
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour (the member is its plain string in str(), f-strings, JSON)
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, spec: str) -> str:
            return str.__format__(self, spec)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to do."""


def _positive(cfg: Any, keys: list[str], allow_zero: bool = False) -> None:
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 0 or (value == 0 and not allow_zero):
            need = "zero or more" if allow_zero else "positive"
            raise ConfigError(f"{key}={value} must be {need}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _show(value: Any) -> str:
    """A value as an override would spell it (repr for strings, as the other messages here)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _default_of(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A Config as plain data (how it travels to actors, into checkpoints and config.yaml)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


class _Keys:
    """Keys that have no effect under the chosen options, as validation finds them: one the user set (their config
    file or an override) is refused, every one of them in a single ConfigError; a default (the dataclasses', the
    default config file's) resolves to the value that applies, and says so. Either way the key takes its
    default value, so the checks after it do not trip over it."""

    def __init__(self, user: frozenset[str] | None):
        self.user = user              # None: every key counts as the user's (a Config built in code)
        self.refused: list[str] = []  # one message per key, each naming it and the fix
        self.resolved: list[str] = [] # `key=value -> default (why)`

    def by_user(self, key: str) -> bool:
        """Did the user set `key`, or a section or list holding it (`faults.plan` for `faults.plan[0].steps`)?"""
        return self.user is None or any(key == u or key.startswith((u + ".", u + "[")) for u in self.user)

    def check(self, obj: Any, name: str, key: str, default: Any, refusal: str, reason: str) -> None:
        """`obj.name` (dotted `key`) has no effect unless it equals `default`: refuse it with `refusal` if the
        user set it, else resolve it to `default` (`reason` says why, in the log)."""
        value = getattr(obj, name)
        if value == default:
            return
        if self.by_user(key):
            self.refused.append(refusal)
        else:
            self.resolved.append(f"{key}={_show(value)} -> {_show(default)} ({reason})")
        setattr(obj, name, default)

    def idle(self, obj: Any, name: str, key: str, why: str) -> None:
        """`obj.name` is read by nothing under the chosen options: `why` says so and what to do."""
        value = getattr(obj, name)
        self.check(obj, name, key, _default_of(type(obj), name), f"{key}={_show(value)} has no effect {why}",
                   f"no effect {_reason(why)}")

    def section(self, cfg: Root, section: str, names: tuple[str, ...], why: str) -> None:
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        for name in names:
            self.idle(obj, name, f"{section}.{name}", why)

    def raise_refused(self) -> None:
        if len(self.refused) == 1:
            raise ConfigError(self.refused[0])
        if self.refused:
            raise ConfigError(f"{len(self.refused)} keys have no effect under the chosen options: "
                              + " ".join(f"({i}) {r}" for i, r in enumerate(self.refused, 1)))


def _reason(why: str) -> str:
    """The reason part of an idle key's `why` ("with X (because): remove it, ..."): up to its first ': ' outside
    parentheses, where the fix starts."""
    depth = 0
    for i, ch in enumerate(why):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and why.startswith(": ", i):
            return why[:i]
    return why
