"""One config style for every command: its options are a dataclass, filled from an optional YAML file
(`--config FILE`), then the command-line flags, then dotted `key=value` overrides, and checked by the
dataclass itself (as `train.py`'s `TrainConfig`).

    python infer.py --image x.png --prompt "Find every circle."            # flags
    python infer.py --config my_infer.yaml --image x.png conf=0.5          # YAML, a flag, an override

A field `foo_bar` is the flag `--foo-bar` and the key `foo_bar`; its help is `field(metadata={"help": ..})`
and a field may name a `"parse"` callable for its flag's text (e.g. `--tasks det,seg`). Booleans are
switches (`--chat`; `chat=false` to turn a YAML `true` off). No torch here: `--help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

from grounded_llava.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from grounded_llava.errors import UsageError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    """The non-None type of `X | None` (the type a flag's text converts to)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag per field of dataclass `cls`, `--config FILE` and positional `key=value` overrides.
    Flags default to "not given" (None), so that a YAML value stays unless the flag is given."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if not required:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            help_text += "" if default is None or default is False else f" (default: {default})"
        if hints[field.name] is bool:
            parser.add_argument(_flag(field.name), action="store_true", default=None, help=help_text)
            continue
        kind = str if "parse" in field.metadata else _scalar_type(hints[field.name])
        parser.add_argument(
            _flag(field.name),
            type=kind if kind in (int, float) else str,
            default=None,
            metavar=field.name.upper(),
            help=help_text + (" (required: here or in --config)" if required else ""),
        )
    parser.add_argument(
        "--config", type=Path, metavar="YAML", help="these options as a YAML mapping (flags override it)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of any option, applied last"
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` from `--config`, the flags given and the overrides (in that order); a missing
    required option or a bad value raises a `UserError` naming it (and the YAML file, for its values).
    Overrides of text and path options keep their text as written (`prompt=Is it red? yes`)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    from_file: dict[str, Any] = load_yaml(args.config) if args.config is not None else {}
    data = dict(from_file)
    for field in fields:
        value = getattr(args, field.name, None)
        if value is not None:
            data[field.name] = value
    text_keys = [f.name for f in fields if _scalar_type(hints[f.name]) in (str, Path)]
    data = apply_overrides(data, args.overrides, text_keys=text_keys)
    for field in fields:
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and data.get(field.name) is None:
            raise UsageError(f"{_flag(field.name)} is required (or `{field.name}:` in --config)")
        parse = field.metadata.get("parse")
        if parse is not None and isinstance(data.get(field.name), str):
            data[field.name] = list(parse(data[field.name]))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        key = str(err).split(":")[0].removeprefix("unknown config key ").strip()
        came_from_file = key in from_file and from_file[key] == data.get(key)
        raise ConfigError(f"{args.config}: {err}" if came_from_file else str(err)) from None
