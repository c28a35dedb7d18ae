"""Command-line flags, environment variables and TOML files mapped onto a role's config model, in one place.

Every field of the model, and of its nested sections, gets a flag named after it: `cache_wait_s` ->
`--cache-wait`, `identity_path` -> `--identity` (the unit suffixes `_s` and `_path` are dropped), unless
the field names its own flag (`json_schema_extra={"flag": "--lr"}`, and its value's name with "metavar"). A section's fields get top-level
flags (`--initial-peers` sets `network.initial_peers`), so two fields anywhere in one model must not
share a flag (`options` refuses that). The field's description is the flag's help; booleans get
`--x/--no-x`, lists take several values (`--initial-peers A B`), literals their choices. Values are
validated by the model itself, so a flag, an environment variable and a TOML key accept the same text.

Layers, later wins: the model's defaults, a TOML file (`--config FILE`, sections as tables), environment
variables (`<PREFIX><FIELD>` and `<PREFIX><SECTION>__<FIELD>`, e.g. SWARM_PEER_CACHE_TOKENS and
SWARM_PEER_NETWORK__INITIAL_PEERS; a list as JSON or separated by spaces), flags. Adding an option is
one field. Nothing here starts anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from swarm.config import build_config, load_toml
from swarm.errors import ConfigError

Config = TypeVar("Config", bound=BaseModel)
UNIT_SUFFIXES = ("_s", "_path")


@dataclasses.dataclass(frozen=True)
class Option:
    """One settable value: where it lives in the model, and its flag."""

    path: tuple[str, ...]  # ("network", "initial_peers")
    flag: str  # "--initial-peers"
    field: FieldInfo

    @property
    def env_suffix(self) -> str:
        return "__".join(self.path).upper()


def options(model_type: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[Option]:
    """Every field of `model_type` and of its sections, with its flag; raises if two share one."""
    found: list[Option] = []
    for name, field in model_type.model_fields.items():
        section = _section_type(field.annotation)
        if section is not None:
            found.extend(options(section, (*prefix, name)))
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = extra.get("flag") or "--" + _strip_unit(name).replace("_", "-")
        found.append(Option((*prefix, name), str(flag), field))
    if not prefix:
        seen: dict[str, Option] = {}
        for option in found:
            other = seen.setdefault(option.flag, option)
            if other is not option:
                raise TypeError(f"{model_type.__name__}: {'.'.join(other.path)} and {'.'.join(option.path)} both map to {option.flag}")
    return found


def build_parser(model_type: type[BaseModel], *, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file with these settings (sections as tables); flags override it")
    for option in options(model_type):
        parser.add_argument(option.flag, dest="__".join(option.path), default=argparse.SUPPRESS, **_argparse_kind(option))
    return parser


def parse(model_type: type[Config], argv: Sequence[str] | None, *, prog: str, description: str, env_prefix: str) -> Config:
    """The config of one role from a TOML file, the environment and the command line; ConfigError if invalid.

    argparse itself exits with status 2 on a malformed command line (an unknown flag, a missing value)."""
    args = vars(build_parser(model_type, prog=prog, description=description).parse_args(argv))
    file_path = args.pop("config", None)
    file_layer = load_toml(file_path) if file_path else {}
    flag_layer: dict[str, Any] = {}
    for dest, value in args.items():
        _set(flag_layer, tuple(dest.split("__")), value)
    try:
        return build_config(model_type, file_layer, environment(model_type, env_prefix), flag_layer)
    except ConfigError as exc:
        raise ConfigError(_flag_message(model_type, exc)) from exc.__cause__


def _flag_message(model_type: type[BaseModel], exc: ConfigError) -> str:
    """A validation error in the words of the command line: `--cache-tokens (cache_tokens): ...`."""
    if not isinstance(exc.__cause__, ValidationError):
        return str(exc)
    first = exc.__cause__.errors()[0]
    location = tuple(str(part) for part in first.get("loc", ()))
    flags = [option.flag for option in options(model_type) if location[: len(option.path)] == option.path]
    if not flags:
        return str(exc)
    if first.get("type") == "missing":
        return f"{flags[0]} is required"
    return f"{flags[0]} ({'.'.join(location)}): {first.get('msg', '').removeprefix('Value error, ')}"


def environment(model_type: type[BaseModel], prefix: str) -> dict[str, Any]:
    """The values that `<prefix>...` environment variables give, as a nested dict."""
    by_name = {prefix + option.env_suffix: option for option in options(model_type)}
    layer: dict[str, Any] = {}
    for name, text in os.environ.items():
        if not name.startswith(prefix):
            continue
        option = by_name.get(name)
        if option is None:
            raise ConfigError(f"unknown setting {name}; known ones: {', '.join(sorted(by_name))}")
        _set(layer, option.path, _list_from_text(text) if _is_list(option.field.annotation) else text)
    return layer


# ---- helpers -----------------------------------------------------------------------------------
def _strip_unit(name: str) -> str:
    for suffix in UNIT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (`X | None` -> (X, NoneType)), or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(member) in (list, tuple) for member in _members(annotation))


def _argparse_kind(option: Option) -> dict[str, Any]:
    """How argparse takes this field's value: as text that the model validates."""
    field = option.field
    annotation = field.annotation
    members = [member for member in _members(annotation) if member is not type(None)]
    help_text = (field.description or "").replace("%", "%%")  # argparse formats help with %
    shown = field.default is not None and field.default is not False and field.default not in ("", [], ())  # 0 is shown
    if not field.is_required() and shown and field.default_factory is None:
        help_text += f" (default: {field.default})"
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    kind: dict[str, Any] = {"help": help_text, "metavar": extra.get("metavar") or option.flag.lstrip("-").replace("-", "_").upper()}
    if members == [bool]:
        return {"help": help_text, "action": argparse.BooleanOptionalAction}
    if _is_list(annotation):
        kind["nargs"] = "+"
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
        kind["choices"] = [str(value) for value in typing.get_args(members[0])]
        kind.pop("metavar")
    return kind


def _list_from_text(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not a JSON list: {text[:100]!r}") from exc
    return text.split()


def _set(layer: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        layer = layer.setdefault(key, {})
    layer[path[-1]] = value
