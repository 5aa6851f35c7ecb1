"""`--help` of the config-driven scripts: every KTOConfig option with its type, default and meaning.

The meanings are the fields' docstrings in config.py, read from its source, so they stay the one
place an option is documented.
"""

import ast
import dataclasses
import inspect
import types
import typing

from kto_scale.config import KTOConfig


def _field_docs() -> dict[str, str]:
    """Each KTOConfig field's docstring (the string under it in config.py): the one source of --help."""
    tree = ast.parse(inspect.getsource(KTOConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(annotation: object) -> str:
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if isinstance(annotation, types.UnionType) and len(options) > 1:
        return "|".join(_type_name(a) for a in options)
    option = options[0]
    return "LIST" if typing.get_origin(option) is list else getattr(option, "__name__", str(option)).upper()


def options_help() -> str:
    """Every option: `--name TYPE (default: value)` and its meaning, from the dataclass and its docs."""
    docs, hints = _field_docs(), typing.get_type_hints(KTOConfig)
    lines = ["options (--config FILE.yaml first, then any of these as --name value; values are YAML):"]
    for f in dataclasses.fields(KTOConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines += [f"  --{f.name} {_type_name(hints[f.name])} (default: {default})", f"      {docs.get(f.name, '')}"]
    return "\n".join(lines)


def exit_if_help(argv: list[str], usage: str) -> None:
    """For the config-driven scripts: print `usage` and every option, then exit, on -h/--help."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: {usage.strip()}\n\n{options_help()}")
        raise SystemExit(0)
