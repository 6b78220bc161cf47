"""Command settings as frozen dataclasses whose fields carry their command-line form.

Each command's settings dataclass owns every default and every check of a value: `option(...)` declares a field
with its help, its range or choices, and how a command-line string becomes its value. The checks run when the
dataclass is built (`check_options` from __post_init__), so a Python caller and a command-line user get the same
defaults and the same errors, each naming the flag. `add_options` turns the fields into argparse arguments (the
only thing cli.py does with them), and `from_mapping` builds settings from parsed flags or a config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moejax.errors import SettingsError

MESH_HELP = ("run sharded over a device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; the product "
             "must not exceed the devices): parameters split by logical-axis rules, MoE blocks expert-parallel")
STEERING_HELP = ("steer the router with this spec: JSON {\"mode\": \"soft\"|\"hard\", \"lambda\": 0.5, \"seed\": 0, "
                 "\"layers\": {\"10\": {\"promote\": [3], \"suppress\": [5]}}} (MoE-layer indices as in layers.csv), "
                 "or an experts.json from `moejax experts` with mode, lambda and direction added")


def option(default: Any, help: str, *, kind: type = str, element: type = str, metavar: str | None = None,
           choices: tuple | None = None, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, positional: bool = False, repeat: bool = False,
           flag: str | None = None) -> Any:
    """A settings field and its command-line form.

    kind: int, float, str, bool (a switch), Path, or list (comma-separated on the command line, a tuple of
    `element` values); minimum / maximum bound numbers (a list's elements) inclusively, `above` exclusively;
    positional: a positional argument; repeat: the flag may be given several times (a tuple of values).
    """
    metadata = {"help": help, "kind": kind, "element": element, "metavar": metavar, "choices": choices,
                "minimum": minimum, "above": above, "maximum": maximum, "positional": positional, "repeat": repeat,
                "flag": flag}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line name of a settings field: --seq-len for seq_len (or its positional NAME)."""
    if field.metadata.get("positional"):
        return field.name.upper()
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_options(settings) -> None:
    """Every option's value against its kind, choices and range: a SettingsError naming the flag."""
    for field in dataclasses.fields(settings):
        meta = field.metadata
        if "kind" not in meta:
            continue
        value, name, kind = getattr(settings, field.name), flag_of(field), meta["kind"]
        values = value if meta["repeat"] or kind is list else (value,)
        if kind is list:
            kind = meta["element"]
        for v in values:
            if v is None:
                continue
            if kind in (int, float) and not _is_number(v) or kind is int and not float(v).is_integer():
                raise SettingsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
            if kind is bool and not isinstance(v, bool):
                raise SettingsError(f"{name} must be true or false, got {v!r}")
            if kind in (int, float) and not math.isfinite(v):
                raise SettingsError(f"{name} must be a finite number, got {v!r}")
            if meta["choices"] is not None and v not in meta["choices"]:
                raise SettingsError(f"{name} {v!r} is not one of {', '.join(map(str, meta['choices']))}")
            if meta["minimum"] is not None and v < meta["minimum"]:
                raise SettingsError(f"{name} must be >= {meta['minimum']:g}, got {v!r}")
            if meta["above"] is not None and v <= meta["above"]:
                raise SettingsError(f"{name} must be > {meta['above']:g}, got {v!r}")
            if meta["maximum"] is not None and v > meta["maximum"]:
                raise SettingsError(f"{name} must be <= {meta['maximum']:g}, got {v!r}")


def _parser_of(kind: type, name: str) -> Callable[[str], Any]:
    """The command-line string -> value conversion of a kind; its error names the flag."""
    def parse(text: str):
        try:
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is Path:
            return Path(text)
        return text
    return parse


def add_options(parser: argparse.ArgumentParser, settings_cls) -> None:
    """One argparse argument per option of `settings_cls`. Nothing is given a default here: a flag left out is
    absent from the parsed namespace, and the dataclass's own default applies."""
    for field in dataclasses.fields(settings_cls):
        meta = field.metadata
        if "kind" not in meta:
            continue
        name, kind = flag_of(field), meta["kind"]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = "" if default in (None, False, (), []) else f" (default: {_show(default)})"
        kwargs = {"help": meta["help"].replace("%", "%%") + shown.replace("%", "%%"), "default": argparse.SUPPRESS}
        if kind is bool:
            parser.add_argument(name, action="store_true", **kwargs)
            continue
        element = str if kind is list else kind
        kwargs["type"] = _parser_of(element, name)
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["positional"]:
            parser.add_argument(field.name, **kwargs)
        else:
            parser.add_argument(name, action="append" if meta["repeat"] else "store", **kwargs)


def _show(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def from_mapping(settings_cls, values: Mapping[str, Any], where: str = "the command line"):
    """Settings from field values (parsed flags, a config file); comma-separated strings become lists where the
    field is a list; unknown names are a SettingsError."""
    fields = {f.name: f for f in dataclasses.fields(settings_cls) if "kind" in f.metadata}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    converted = {}
    for name, value in values.items():
        meta = fields[name].metadata
        if meta["kind"] is list and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
            if meta["element"] in (int, float):
                parse = _parser_of(meta["element"], flag_of(fields[name]))
                try:
                    value = [parse(item) for item in value]
                except argparse.ArgumentTypeError as e:
                    raise SettingsError(str(e)) from None
        if meta["kind"] is list or meta["repeat"]:
            value = tuple(value) if isinstance(value, list | tuple) else (value,)
        if meta["kind"] is Path and isinstance(value, str):
            value = Path(value)
        converted[name] = value
    return settings_cls(**converted)
