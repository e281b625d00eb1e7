"""One way to configure every service: a flag, else its environment variable, else the file, else the default.

A service declares one frozen dataclass whose fields are `setting(...)`: the environment variable, a help line,
the kind (str, int, bool, size, duration, path), bounds, choices, a validator and the default (a value, or a
callable computed when settings are resolved); `prefixed` declares a service's SLLM_<SERVICE>_<FIELD> variables.
From that one declaration:

- `resolve(cls, flags, env, file)` reads each field in that order and checks its value; an empty environment
  variable counts as unset. A refused value raises SettingsError naming the field's flag, where the value came
  from (`flag --x`, `env VAR`, `file PATH`, `default`) and the value. Checks that span fields raise `Conflict`
  from the class's `__post_init__`; `resolve` adds each named field's source to its message.
- `add_arguments(parser, cls)` adds the argparse flags (help: the env variable and the default), and
  `given(args, cls)` reads back the ones given, as text, for `resolve`.
- `validate(obj)`, from `__post_init__`, runs the same checks on settings built directly.
- `to_json` and `from_json` hand resolved settings from a command to the worker processes it starts.
- `rows(cls)` are the README's table rows (tests check that the README lists every one).

Nothing here, nor in a settings class, reads the environment at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sllm_faas.common.units import parse_seconds, parse_size

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"   # every service's default Redis and key prefix
DEFAULT_KEY_PREFIX = "sllm:"
KINDS = ("str", "int", "number", "bool", "size", "duration", "path")
_METAVARS = {"int": "N", "size": "SIZE", "duration": "SECONDS", "path": "PATH"}


class SettingsError(ValueError):
    """A refused setting: the message names the field's flag, the value's source and the value."""


class Conflict(SettingsError):
    """Settings each valid alone but not together. `template` names fields as {field}; each becomes
    `--flag=value`, with `(from SOURCE)` once `resolve` knows where the value came from."""

    def __init__(self, template: str, settings: object, sources: Mapping[str, str] | None = None) -> None:
        self.template, self.settings = template, settings

        def show(match: re.Match) -> str:
            spec = spec_of(type(settings), match[1])
            text = f"{spec.label}={_shown(spec, getattr(settings, match[1]))}"
            return f"{text} (from {sources[match[1]]})" if sources else text

        super().__init__(re.sub(r"\{(\w+)\}", show, template))


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one field is set: see `setting`."""

    env: str
    help: str
    kind: str = "str"
    flag: str | None = ""                # "": --field-name (filled in by `specs`); None: no flag, env only
    optional: bool = False               # None is a value (an unset optional setting)
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None           # strictly greater than
    choices: tuple[str, ...] = ()
    check: Callable[[Any], Any] | None = None   # value -> value, or ValueError(the problem)
    env_fallback: tuple[str, ...] = ()  # read when `env` is unset (e.g. the conventional REDIS_URL)
    shown_default: str = ""              # how help and the README say a computed or empty default
    secret: bool = False                 # never shown in errors

    @property
    def label(self) -> str:
        """How errors name the setting: its flag, or its variable for one without a flag."""
        return self.flag or self.env

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"setting {self.env}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")


def setting(env: str, help: str, default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field declared as a setting; a callable `default` is computed at each resolve."""
    kwargs: dict[str, Any] = {"metadata": {"setting": Spec(env, help, **spec)}}
    if callable(default):
        kwargs["default_factory"] = default
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def prefixed(prefix: str) -> Callable[..., Any]:
    """`setting` for a service whose variables are PREFIX + the field name in capitals (SLLM_LOADER_NODE_ID)."""

    def declare(name: str, help: str, default: Any = dataclasses.MISSING, **spec: Any) -> Any:
        return setting(prefix + name.upper(), help, default, **spec)

    return declare


def specs(cls: type) -> Iterator[tuple[dataclasses.Field, Spec]]:
    """Each settings field of `cls` with its Spec, its flag filled in."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is not None:
            yield f, spec if spec.flag != "" else dataclasses.replace(spec, flag="--" + f.name.replace("_", "-"))


def spec_of(cls: type, name: str) -> Spec:
    return next(spec for f, spec in specs(cls) if f.name == name)


def env_names(cls: type) -> dict[str, str]:
    """Field name -> environment variable."""
    return {f.name: spec.env for f, spec in specs(cls)}


def _shown(spec: Spec, value: Any) -> str:
    return "<hidden>" if spec.secret and value else str(value)


def parse(spec: Spec, raw: Any, source: str) -> Any:
    """`raw` (text from a flag or the environment, or a TOML value) as the field's value, checked; a
    SettingsError naming the flag, `source` and the value otherwise."""

    def refuse(problem: str) -> SettingsError:
        shown = "<hidden>" if spec.secret else repr(raw)
        return SettingsError(f"{spec.label}={shown} (from {source}): {problem}")

    text = raw if isinstance(raw, str) else str(raw)
    if spec.optional and text == "":
        return None
    try:
        value = _typed(spec.kind, raw, text)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise refuse(f"must be at least {spec.minimum:g}")
        if spec.above is not None and not value > spec.above:
            raise refuse(f"must be above {spec.above:g}")
        if spec.maximum is not None and value > spec.maximum:
            raise refuse(f"must be at most {spec.maximum:g}")
    if spec.choices and value not in spec.choices:
        raise refuse(f"not one of {', '.join(spec.choices)}")
    if spec.check is not None:
        try:
            value = spec.check(value)
        except ValueError as exc:
            raise refuse(str(exc)) from None
    return value


def _typed(kind: str, raw: Any, text: str) -> Any:
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if text.strip().lower() not in TRUE + FALSE:
            raise ValueError(f"not a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)})")
        return text.strip().lower() in TRUE
    if kind == "int":
        try:
            return raw if isinstance(raw, int) and not isinstance(raw, bool) else int(text)
        except ValueError:
            raise ValueError("not an integer") from None
    if kind == "number":
        try:
            value = raw if isinstance(raw, int | float) and not isinstance(raw, bool) else float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return float(value)
    if kind == "size":
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(text)
    if kind == "duration":
        return parse_seconds(text)   # TOML numbers too: str(12) is "12"
    if kind == "path":
        return Path(text)
    return text


def resolve(cls: type, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
            file: Mapping[str, Any] | None = None, file_name: str = "") -> Any:
    """An instance of `cls`: each field from `flags` (field name -> text), else `env` (the process environment
    unless given; empty = unset), else `file` (field name -> value, read from `file_name`), else its default."""
    flags, file = flags or {}, file or {}
    env = os.environ if env is None else env
    names = {f.name for f, _ in specs(cls)}
    unknown = sorted(set(file) - names)
    if unknown:
        raise SettingsError(f"{file_name}: unknown settings {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    missing = []
    for f, spec in specs(cls):
        candidates = [(flags.get(f.name), f"flag {spec.flag}")]
        candidates += [(env.get(name) or None, f"env {name}") for name in (spec.env, *spec.env_fallback)]
        candidates.append((file.get(f.name), f"file {file_name}"))
        raw, source = next(((raw, source) for raw, source in candidates if raw is not None), (None, "default"))
        if raw is not None:
            values[f.name], sources[f.name] = parse(spec, raw, source), source
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f"{spec.label} (or env {spec.env})")
        else:
            sources[f.name] = "default"
    if missing:
        raise SettingsError("missing " + ", ".join(missing))
    try:
        return cls(**values)
    except Conflict as exc:
        raise Conflict(exc.template, exc.settings, sources) from None


def default_text(f: dataclasses.Field, spec: Spec) -> str:
    """The default as help and the README say it."""
    if spec.shown_default:
        return spec.shown_default
    if f.default is dataclasses.MISSING:
        return "required"
    if f.default is None or f.default == "" or f.default == ():
        return "unset"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field (a positional argument for a flag without dashes); values stay text for `resolve`."""
    for f, spec in specs(cls):
        text = f"{spec.help} (env {spec.env}; default: {default_text(f, spec)})".replace("%", "%%")
        if spec.flag is None:
            continue
        if not spec.flag.startswith("-"):
            parser.add_argument(f.name, nargs="?", metavar=spec.flag, help=text)
        elif spec.kind == "bool":
            parser.add_argument(spec.flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else \
                _METAVARS.get(spec.kind, spec.flag.lstrip("-").upper().replace("-", "_"))
            parser.add_argument(spec.flag, dest=f.name, default=None, metavar=metavar, help=text)


def given(args: argparse.Namespace, cls: type) -> dict[str, str]:
    """Field name -> the flag's text, for the flags given on the command line."""
    flags = {}
    for f, spec in specs(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            flags[f.name] = ("1" if value else "0") if spec.kind == "bool" else value
    return flags


def validate(settings: object) -> None:
    """Each field's own checks (kind, bounds, choices, validator) on an object built directly, not by `resolve`:
    for `__post_init__`, so that no way of making settings skips them."""
    for f, spec in specs(type(settings)):
        value = getattr(settings, f.name)
        if not (value is None and spec.optional):
            parse(spec, value, "constructor")


def to_json(settings: object) -> str:
    """`settings` as JSON: how a command hands what it resolved to the worker processes it starts."""
    return json.dumps(dataclasses.asdict(settings))


def from_json(cls: type, text: str, source: str) -> Any:
    """`to_json`'s text as `cls` again, every value checked as a file's would be (`source` names where it came from);
    the environment is not read."""
    return resolve(cls, env={}, file=json.loads(text), file_name=source)


def rows(cls: type) -> list[tuple[str, str, str, str]]:
    """(flag, env, help, default) per field: what the README's settings tables list ("" for no flag)."""
    return [(spec.flag or "", spec.env, spec.help, default_text(f, spec)) for f, spec in specs(cls)]


def argument_type(parser: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parser` (e.g. units.parse_size) as an argparse `type=`: its ValueError becomes the flag's error message."""

    def convert(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parser.__name__
    return convert
