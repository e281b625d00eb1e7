"""OpenFaaS stack files (stack.yml) and the `com.openfaas.scale.*` labels, as the local gateway reads them.

Only what a local run needs is read: per function its handler, template (lang), environment, labels
and annotations; `image`, `requests` and `limits` are accepted and ignored (there is no container).
Errors name the file, the function and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sllm_faas.common.units import parse_duration
from sllm_faas.redis_schema.keys import validate_id


class StackError(ValueError):
    pass


@dataclass(frozen=True)
class ScaleSettings:
    """OpenFaaS defaults, except that min is 0 when scale-to-zero is on (the local gateway starts nothing
    until the first request)."""

    min: int = 0
    max: int = 4
    target: int = 8              # concurrent requests per instance before another starts
    zero: bool = True            # scale to zero when idle
    zero_duration_s: float = 600.0

    @classmethod
    def from_labels(cls, labels: dict[str, str], where: str = "labels") -> ScaleSettings:
        def integer(name: str, default: int, minimum: int) -> int:
            raw = labels.get(f"com.openfaas.scale.{name}")
            if raw is None:
                return default
            try:
                value = int(str(raw))
            except ValueError:
                raise StackError(f"{where}: com.openfaas.scale.{name}={raw!r} is not an integer") from None
            if value < minimum:
                raise StackError(f"{where}: com.openfaas.scale.{name}={value} must be >= {minimum}")
            return value

        zero_raw = str(labels.get("com.openfaas.scale.zero", "true")).lower()
        if zero_raw not in ("true", "false"):
            raise StackError(f"{where}: com.openfaas.scale.zero={zero_raw!r} must be true or false")
        try:
            zero_duration = parse_duration(str(labels.get("com.openfaas.scale.zero-duration", "10m")))
        except ValueError as exc:
            raise StackError(f"{where}: com.openfaas.scale.zero-duration: {exc}") from None
        settings = cls(min=integer("min", 0, 0), max=integer("max", 4, 1), target=integer("target", 8, 1),
                       zero=zero_raw == "true", zero_duration_s=zero_duration)
        if settings.min > settings.max:
            raise StackError(f"{where}: com.openfaas.scale.min ({settings.min}) exceeds max ({settings.max})")
        return settings


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    lang: str
    handler: Path
    environment: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    image: str = ""

    @property
    def model(self) -> str:
        return self.annotations.get("sllm.io/model") or self.environment.get("SLLM_MODEL", "")


def _strings(value, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StackError(f"{where} must be a mapping")
    return {str(k): str(v) for k, v in value.items()}


def read_stack(path: str | Path) -> list[FunctionSpec]:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise StackError(f"{path}: no such stack file") from None
    except yaml.YAMLError as exc:
        raise StackError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("functions"), dict) or not document["functions"]:
        raise StackError(f"{path}: a stack file needs a `functions:` mapping with at least one function")
    specs = []
    for name, body in document["functions"].items():
        where = f"{path}: functions.{name}"
        try:
            validate_id(str(name), "function name")
        except ValueError as exc:
            raise StackError(f"{where}: {exc}") from None
        if not isinstance(body, dict):
            raise StackError(f"{where} must be a mapping")
        for required in ("lang", "handler"):
            if not isinstance(body.get(required), str) or not body[required]:
                raise StackError(f"{where}.{required} is missing")
        handler = (path.parent / body["handler"]).resolve()
        if not handler.is_dir():
            raise StackError(f"{where}.handler: {handler} is not a directory")
        spec = FunctionSpec(str(name), body["lang"], handler, _strings(body.get("environment"), f"{where}.environment"),
                            _strings(body.get("labels"), f"{where}.labels"),
                            _strings(body.get("annotations"), f"{where}.annotations"), str(body.get("image", "")))
        if not spec.model:
            raise StackError(f"{where}: name the model in environment.SLLM_MODEL or annotations['sllm.io/model']")
        ScaleSettings.from_labels(spec.labels, f"{where}.labels")
        specs.append(spec)
    return specs
