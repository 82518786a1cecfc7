"""Command-line flags from a config dataclass, shared by every entry script, and the checks of their values.

Every field becomes `--field-name VALUE` (booleans: `--flag` / `--no-flag`), with its default and the
docstring under it in --help, as cleanrl writes its Args. Bad values stop with one line: a float that
is not finite (nan, inf) here, ranges and paths in each config's `__post_init__` with `require` and
`check_writable`; `main` runs an entry script and turns its ValueErrors into that line.

    @dataclass
    class Config:
        lr: float = 1e-5
        '''peak learning rate'''
    main(Config, train)           # parses sys.argv[1:], then train(cfg)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import math
import os
import sys
import time
import typing


def _kind(tp):
    """(python type, is_optional) of an annotation such as 'Optional[int]' or 'str'."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def field_docs(cls) -> dict:
    """{field name: the string literal written under it in the class body}."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def parse_config(cls, argv=None, description: str = None):
    """An instance of dataclass `cls` with defaults overridden by command-line flags."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    summary = (cls.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(description=description or (summary[0] if summary else None))
    for f in dataclasses.fields(cls):
        tp, optional = _kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            convert = (lambda s, t=tp: None if s.lower() == "none" else t(s)) if optional else tp
            parser.add_argument(flag, dest=f.name, type=convert, default=default,
                                help=f"{doc} (default: {default})".strip())
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{name}={value}: expected a finite number")
    try:
        return cls(**vars(args))
    except ValueError as e:  # a config's own check (__post_init__): one line, as argparse does
        fail(str(e))


def require(cfg, names: str, test, expected: str) -> None:
    """ValueError naming the first of the space-separated fields `names` whose value fails `test` (None
    passes: a default resolved later), and what would be accepted."""
    for name in names.split():
        value = getattr(cfg, name)
        if value is not None and not test(value):
            raise ValueError(f"{name}={value!r}: expected {expected}")


def check_writable(path: str, what: str = "out") -> None:
    """ValueError unless `path` is, or can be made, a folder we may write in; creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a file: expected a folder (existing or to create)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what}={path!r} lies under the file {parent!r}: expected a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={path!r}: {parent!r} is not writable")


def main(cls, run, argv=None):
    """An entry script's main: its config from the command line, then `run(cfg)`; a ValueError from either
    (a bad value, a missing file, a refused run folder) stops with one line."""
    cfg = parse_config(cls, argv)
    try:
        return run(cfg)
    except ValueError as e:
        fail(str(e))


def fail(message: str, code: int = 2):
    """Stop with one line on stderr: what was wrong and what would be accepted. Under torchrun the line also
    goes to the launcher's error file, so that its failure report shows it instead of a pointer to the docs."""
    print(f"error: {message}", file=sys.stderr)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
    sys.exit(code)
