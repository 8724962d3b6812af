"""Settings, each declared once: environment variable, flag, type, default, bounds and help.

A `Setting` is the one place a setting is written down. From a service's tuple of them come its
config object's field defaults (`Settings.default`), its command-line flags (`Settings.add_flags`),
the values it starts with (`Settings.read`: the flag when given, else the environment variable,
else the default) and the README's configuration table (`python -m scripts.settings_table`).

A value that cannot be used stops the start with a `ConfigError` naming the variable (or the flag
it came from) and what is expected, e.g. ``GATEWAY_MAX_K='lots' is not an integer``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(SystemExit):
    """A setting is missing or malformed; the message says which and what is expected."""

    def __init__(self, message: str) -> None:
        super().__init__(f"configuration error: {message}")


@dataclass(frozen=True)
class Setting:
    """One setting.

    ``field`` is the config object's attribute; ``flag`` the command-line flag (derived from the
    field when left empty; None for a setting read from the environment only, as training's, and
    for ``secret`` ones: a token on the command line shows in ``ps``). ``default`` None means unset; ``required`` is the message when a required setting is
    missing. ``scale`` multiplies the value into the field's unit (``..._MB`` settings into
    bytes). ``parse`` replaces the plain conversion for a setting with its own syntax (it raises
    `ConfigError` naming the variable). ``shown`` is the default as a person reads it in the
    README (``8 MiB``, ``min(2, cores)``) when ``str(default)`` is not. ``deprecated_env``: former
    names of the variable, still read (with a logged warning naming the new one) when it is unset,
    for one release after a rename; ``deprecated_flags`` the same for former command-line flags.
    """

    env: str
    field: str
    type: type = str
    default: Any = None
    help: str = ""
    flag: str | None = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    scale: int = 1
    shown: str | None = None
    required: str | None = None
    secret: bool = False
    deprecated_env: tuple[str, ...] = ()
    deprecated_flags: tuple[str, ...] = ()

    @property
    def flag_name(self) -> str | None:
        if self.secret or self.flag is None:
            return None
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        """A plain boolean: its flag is ``--name`` / ``--no-name`` rather than taking a value."""
        return self.type is bool and self.parse is None

    @property
    def field_default(self) -> Any:
        """The default in the config object's unit (``scale`` applied)."""
        if self.default is None or self.scale == 1:
            return self.default
        return self.default * self.scale

    def convert(self, raw: str, source: str) -> Any:
        """``raw`` (from the environment variable or flag named ``source``) as a checked value."""
        if self.parse is not None:
            return self.parse(raw)
        if self.type is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ConfigError(f"{source}={raw!r} is not a boolean (use true/false)")
        if self.type is int:
            try:
                value: Any = int(raw)
            except ValueError:
                raise ConfigError(f"{source}={raw!r} is not an integer") from None
        elif self.type is float:
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{source}={raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ConfigError(f"{source}={raw!r} is not a finite number")
        elif self.type is Path:
            value = Path(raw)
        else:
            value = raw.strip().lower() if self.choices else raw
        self.check(value, source)
        return value

    def check(self, value: Any, source: str, scale: int = 1) -> None:
        """ConfigError unless ``value`` is within bounds and choices; ``scale`` is its unit
        (a config object's bytes of a ``..._MB`` setting)."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise ConfigError(f"{source}={value!r} must be one of {', '.join(self.choices)}")
        low = self.minimum * scale if self.minimum is not None else None
        high = self.maximum * scale if self.maximum is not None else None
        if low is not None and high is not None and not low <= value <= high:
            raise ConfigError(f"{source}={value} must be between {low} and {high}")
        if low is not None and value < low:
            raise ConfigError(f"{source}={value} must be >= {low}")
        if high is not None and value > high:
            raise ConfigError(f"{source}={value} must be <= {high}")

    def from_environment(self) -> Any:
        """The value from the environment variable (empty counts as unset), else from a former
        name of it (``deprecated_env``, with a warning), else the default."""
        raw, source = os.environ.get(self.env), self.env
        for old in self.deprecated_env:
            old_raw = os.environ.get(old)
            if not old_raw:
                continue
            if raw:
                log.warning("%s is ignored: %s is set (%s is its former name; remove it)", old, self.env, old)
            else:
                log.warning(
                    "%s is deprecated: rename it %s (the old name is read for one release)", old, self.env
                )
                raw, source = old_raw, old
        if raw is None or raw == "":
            return self.default
        return self.convert(raw, source)

    # ------------------------------------------------------------------ the README
    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.required is not None:
            return "required"
        if self.default is None:
            return "unset"
        if self.type is bool:
            return "true" if self.default else "false"
        if isinstance(self.default, Path):
            try:
                return str(self.default.relative_to(REPO_ROOT))
            except ValueError:
                return str(self.default)
        return str(self.default)

    @property
    def values_text(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.type is bool:
            return "true/false (on/off)"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"{_number(low)}..{_number(high)}"
        if low is not None:
            return f">= {_number(low)}"
        if high is not None:
            return f"<= {_number(high)}"
        return ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _FormerFlag(argparse.Action):
    """A renamed flag, still taken for one release: stores into the new flag's field and logs a
    warning naming the new flag."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        log.warning(
            "%s is deprecated: use %s (the old flag is taken for one release)", option_string, self.new
        )
        setattr(namespace, self.dest, values)


class Settings:
    """The settings one service or command reads, by config field."""

    def __init__(self, *settings: Setting) -> None:
        self.by_field = {setting.field: setting for setting in settings}
        if len(self.by_field) != len(settings):
            raise ValueError("a config field is declared twice")

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.by_field.values())

    def __getitem__(self, field: str) -> Setting:
        return self.by_field[field]

    def default(self, field: str) -> Any:
        """A config object's field default: the declared default, in the field's unit."""
        return self.by_field[field].field_default

    def add_flags(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """One flag per setting (secrets excepted); unset flags stay None, so `read` can tell
        a flag given from one left to the environment."""
        for setting in self:
            name = setting.flag_name
            if name is None:
                continue
            text = f"{setting.help} (env {setting.env}; default {setting.default_text})"
            text = text.replace("%", "%%")
            if setting.is_switch:
                parser.add_argument(
                    name, dest=setting.field, default=None, help=text, action=argparse.BooleanOptionalAction
                )
            else:
                parser.add_argument(name, dest=setting.field, default=None, help=text, metavar=setting.env)
            for old in setting.deprecated_flags:
                parser.add_argument(
                    old,
                    dest=setting.field,
                    default=None,
                    help=argparse.SUPPRESS,
                    action=_FormerFlag,
                    new=name,
                )
        return parser

    def read(self, args: argparse.Namespace | None = None) -> dict[str, Any]:
        """Each setting's value, in its field's unit: the flag when given, else the environment
        variable, else the default. A missing required setting is a ConfigError."""
        values: dict[str, Any] = {}
        for setting in self:
            given = getattr(args, setting.field, None) if args is not None else None
            if isinstance(given, bool):
                value: Any = given
            elif given is not None:
                value = setting.convert(given, setting.flag_name or setting.env)
            else:
                value = setting.from_environment()
            if value is None and setting.required is not None:
                raise ConfigError(setting.required)
            values[setting.field] = (
                value * setting.scale if value is not None and setting.scale != 1 else value
            )
        return values

    def parse_args(self, prog: str, description: str, argv: Sequence[str] | None) -> dict[str, Any]:
        """A parser of every setting's flag, applied to ``argv``, then `read`."""
        parser = self.add_flags(argparse.ArgumentParser(prog=prog, description=description))
        return self.read(parser.parse_args(argv))

    def check(self, config: Any, skip: Iterable[str] = ()) -> None:
        """ConfigError naming the field unless every declared field of the config object
        ``config`` (but those in ``skip``) is within its setting's bounds (a config built
        directly, as tests do)."""
        assert is_dataclass(config)
        names = {f.name for f in fields(config)} - set(skip)
        for setting in self:
            if setting.field not in names or setting.parse is not None and not setting.choices:
                continue
            value = getattr(config, setting.field)
            if value is None or isinstance(value, bool) or setting.type not in (int, float, str):
                continue
            if setting.type is str and not setting.choices:
                continue
            setting.check(value, setting.field, setting.scale)


def merged(*groups: Iterable[Setting]) -> Settings:
    """One `Settings` from several groups (a service's own settings and shared ones)."""
    return Settings(*(setting for group in groups for setting in group))


# ---------------------------------------------------------------------------- shared settings
LOG_LEVEL = Setting(
    "LOG_LEVEL", "log_level", default="info", help="log level; `debug` logs one line per request"
)
INDEXER_PARTITIONS = Setting(
    "INDEXER_PARTITIONS",
    "partitions",
    int,
    256,
    minimum=1,
    help="logical partitions of the index (fixed when the cluster is created): an indexer "
    "replica records it in its data directory, the gateway and its commands route "
    "listing -> partition -> shard through the shard map",
)
