"""Command-line flags from a config dataclass, shared by every entry script.

Every field becomes `--field-name VALUE` (booleans: `--flag` / `--no-flag`), its default and its
comment (the `doc` metadata, else the field name) in --help. Bad values stop with one line.

    @dataclass
    class Config:
        lr: float = 1e-5          # shown in --help when given as field(metadata={"doc": ...})
    cfg = parse_config(Config)    # sys.argv[1:]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing


def _kind(tp):
    """(python type, is_optional) of an annotation such as 'Optional[int]' or 'str'."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def parse_config(cls, argv=None, description: str = None):
    """An instance of dataclass `cls` with defaults overridden by command-line flags."""
    hints = typing.get_type_hints(cls)
    summary = (cls.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(description=description or (summary[0] if summary else None))
    for f in dataclasses.fields(cls):
        tp, optional = _kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            convert = (lambda s, t=tp: None if s.lower() == "none" else t(s)) if optional else tp
            parser.add_argument(flag, dest=f.name, type=convert, default=default,
                                help=f"{doc} (default: {default})".strip())
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:  # a config's own check (__post_init__): one line, as argparse does
        fail(str(e))


def fail(message: str, code: int = 2):
    """Stop with one line on stderr: what was wrong and what would be accepted."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
