"""CLI flags generated from the policy registry: one flag per field of every registered policy.

:func:`add_policy_flags` is called when a command's parser is built, so a
policy registered (``@attnrw.policies.register_policy``) before
:func:`attnrw.cli.main` runs gets flags like the built-in ones:
``--window``, ``--size-bias``, ``--protect`` (a field's name with dashes for
underscores). Fields of the same name in several policies share one flag.

A flag keeps the text it was given; :func:`policy_from_flags` parses it by
the type of the field of the policy ``--policy`` names, once that is known
(so a shared flag parses as each policy needs):

* ``int``, ``float``, ``str`` directly; ``bool`` as true/false, 1/0, yes/no;
* ``tuple[int, ...]`` (and other tuples and lists of those) as a comma
  list: ``--protect 0,5`` (an empty string is the empty tuple);
* a union of those, e.g. Merge's schedules: a number, a comma list, or
  JSON (``--ratio '{"encoder.layer.1.*": 0.5}'``);
* ``Optional[X]`` as ``X``; ``Literal[...]`` as one of its values;
* a ``Callable`` as ``pkg.module:fn``, which is imported;
* anything else as JSON (a JSON object where a :class:`~attnrw.Policy` is
  expected becomes one, through :func:`~attnrw.policy_from_dict`).

Bad input, or a flag the chosen policy does not have, is a
:class:`~attnrw.ConfigError` naming the flag, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import functools
import json
import pprint
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnrw.errors import ConfigError
from attnrw_cli import parser as cli_parser
from attnrw_cli.parser import (
    FALSE,
    TRUE,
    BadValue as _BadValue,
    FieldSpec,
    PolicySpec,
    bad_value_message,
    flag_name,
    given_flags,
    parse_bool as _parse_bool,
    parse_choice,
    parse_scalar as _scalar,
)
from attnrw.imports import CALLABLE_SPEC, cwd_on_path, import_callable
from attnrw.policies import FieldInfo, Policy, get_policy, policy_fields, policy_from_dict, registry

__all__ = [
    "CALLABLE_SPEC",
    "FieldSyntax",
    "add_policy_flags",
    "cwd_on_path",
    "field_spec",
    "field_syntax",
    "flag_name",
    "flag_table",
    "format_value",
    "given_flags",
    "import_callable",
    "parse_field",
    "policy_from_flags",
    "policy_spec",
    "spec_module_text",
    "type_name",
]

# --- parsing a field's text by its type ----------------------------------------------------


@dataclass(frozen=True)
class FieldSyntax:
    """How a flag's text becomes a field's value: ``parse(text)``, its ``metavar``, and what it ``expects``."""

    parse: Callable[[str], Any]
    metavar: str
    expects: str
    #: How :mod:`attnrw_cli` checks the text without torch (see :class:`attnrw_cli.parser.FieldSpec`).
    kind: str = "other"
    choices: tuple[str, ...] = ()


def field_syntax(tp: Any) -> FieldSyntax:
    """The command-line syntax of a field of type ``tp`` (see the module docstring)."""
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return FieldSyntax(_parse_bool, "{true,false}", "true or false (or 1/0, yes/no)", "bool")
    if tp is int:
        return FieldSyntax(_scalar(int), "N", "an int", "int")
    if tp is float:
        return FieldSyntax(_scalar(float), "X", "a number", "float")
    if tp is str:
        return FieldSyntax(str, "TEXT", "text", "text")
    if origin is typing.Literal:
        return _literal_syntax(typing.get_args(tp))
    if tp is collections.abc.Callable or origin is collections.abc.Callable:
        return FieldSyntax(_import_callable, "pkg.mod:fn", "an importable pkg.module:function")
    if origin in (tuple, list) and _comma_items(tp) is not None:
        return _sequence_syntax(tp)
    if _is_union(tp) and all(_simple(m) for m in typing.get_args(tp)):
        return _union_syntax(typing.get_args(tp))
    return FieldSyntax(lambda text: _json(text, tp), "JSON", "JSON")


def parse_field(flag: str, info: FieldInfo, text: str) -> Any:
    """``text`` given to ``flag`` as a value of the field ``info``; :class:`ConfigError` naming the flag if it does not parse."""
    syntax = field_syntax(info.type)
    try:
        return syntax.parse(text)
    except _BadValue as e:
        raise ConfigError(bad_value_message(flag, syntax.expects, text, str(e))) from None
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        if len(args) == 1:
            return args[0]
        if len(args) < len(typing.get_args(tp)):
            return typing.Union[args]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _literal_syntax(values: tuple[Any, ...]) -> FieldSyntax:
    texts = [str(v) for v in values]
    return FieldSyntax(parse_choice(values), f"{{{','.join(texts)}}}", f"one of {', '.join(texts)}", "choice",
                       tuple(texts))


#: Types whose values a comma list can spell, by their own syntax.
_ITEM_TYPES = (int, float, str, bool)
_PLURAL = {int: "ints", float: "numbers", str: "words", bool: "true/false values"}


def _comma_items(tp: Any) -> tuple[Any, ...] | None:
    """The item types of a tuple/list type spelled as a comma list (``(X,)`` for ``tuple[X, ...]``), or None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        args = args[:1]
    if not args or not all(_strip_optional(a) in _ITEM_TYPES for a in args):
        return None
    return args


def _sequence_syntax(tp: Any) -> FieldSyntax:
    items = _comma_items(tp)
    assert items is not None
    variadic = typing.get_origin(tp) is list or Ellipsis in typing.get_args(tp)
    item_syntax = [field_syntax(a) for a in items]
    make = list if typing.get_origin(tp) is list else tuple

    def parse(text: str) -> Any:
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        if not variadic and len(parts) != len(items):
            raise _BadValue()
        return make(item_syntax[0 if variadic else i].parse(p) for i, p in enumerate(parts))

    one = item_syntax[0]
    if variadic:
        plural = _PLURAL[_strip_optional(items[0])]
        return FieldSyntax(parse, f"{one.metavar},{one.metavar},...", f"a comma-separated list of {plural}")
    metavar = ",".join(s.metavar for s in item_syntax)
    return FieldSyntax(parse, metavar, f"{len(items)} comma-separated values ({metavar})")


def _simple(member: Any) -> bool:
    """Whether a union member has a text form here: a scalar, a sequence of scalars, a mapping."""
    origin = typing.get_origin(member) or member
    if member in _ITEM_TYPES or member is type(None):
        return True
    if origin in (tuple, list):
        return not typing.get_args(member) or _comma_items(member) is not None
    return origin in (dict, Mapping, collections.abc.Mapping)


def _union_syntax(members: tuple[Any, ...]) -> FieldSyntax:
    """A number, a word, a comma list or JSON, as the union's members allow (Merge's schedules)."""
    origins = {typing.get_origin(m) or m for m in members}
    numbers = [t for t in (int, float) if t in origins]
    sequence = tuple in origins or list in origins
    mapping = bool(origins & {dict, Mapping, collections.abc.Mapping})

    def word(text: str) -> Any:
        for kind in numbers:
            with contextlib.suppress(ValueError):
                return kind(text)
        if bool in origins and text.strip().lower() in TRUE + FALSE:
            return _parse_bool(text)
        if str in origins:
            return text
        raise _BadValue()

    def parse(text: str) -> Any:
        stripped = text.strip()
        if stripped[:1] in ("{", "[") and (mapping or sequence):
            value = _json(stripped, typing.Union[members])
            if isinstance(value, dict) and not mapping or isinstance(value, list) and not sequence:
                raise _BadValue()
            return tuple(value) if isinstance(value, list) and tuple in origins else value
        if sequence and "," in stripped:
            value = [word(p.strip()) for p in stripped.split(",")]
            return tuple(value) if tuple in origins else value
        return word(stripped)

    spelled = ["a number" if float in numbers else "an int"] if numbers else []
    spelled += ["true/false"] if bool in origins else []
    spelled += ["text"] if str in origins else []
    spelled += ["a comma-separated list (one per site)"] if sequence else []
    spelled += ["a JSON object"] if mapping else []
    expects = ", ".join(spelled[:-1]) + f" or {spelled[-1]}" if len(spelled) > 1 else spelled[0]
    return FieldSyntax(parse, "VALUE", expects)


def _json(text: str, tp: Any) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadValue(f"not JSON: {e.msg} at column {e.colno}") from None
    return _policies_from_json(value, _strip_optional(tp))


def _policies_from_json(value: Any, tp: Any) -> Any:
    """Turn JSON objects into policies where ``tp`` expects a :class:`Policy` (alone or in a tuple/list)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Policy) and isinstance(value, Mapping):
        name = value.get("policy", "dense")
        missing = [f.name for f in policy_fields(get_policy(name)) if f.required and f.name not in value]
        if missing:
            keys = " and ".join(f'"{m}"' for m in missing)
            raise ConfigError(f'the "{name}" policy object needs the key{"s" if len(missing) > 1 else ""} {keys}')
        return policy_from_dict(value)
    if origin in (tuple, list) and isinstance(value, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = _strip_optional(args[0]) if len(args) == 1 else Any
        items = [_policies_from_json(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _import_callable(text: str) -> Callable[..., Any]:
    spec = text.strip()
    if not CALLABLE_SPEC.match(spec):
        raise _BadValue()
    return import_callable(spec)


# --- the policy spec and the flags -----------------------------------------------------------


def field_spec(info: FieldInfo) -> FieldSpec:
    """The command-line view of a policy field (what :mod:`attnrw_cli` builds its flag from)."""
    syntax = field_syntax(info.type)
    return FieldSpec(
        name=info.name, required=info.required, default="" if info.required else format_value(info.default),
        type=type_name(info.type), doc=info.doc, metavar=syntax.metavar, expects=syntax.expects,
        kind=syntax.kind, choices=list(syntax.choices),
    )


def policy_spec(builtin_only: bool = False) -> PolicySpec:
    """The fields of every registered policy (only attnrw's own with ``builtin_only``), as flags see them.

    Built once per set of registered classes (reading the field docstrings parses each
    class's source); the result is shared: do not modify it.
    """
    return _policy_spec(tuple(registry().items()), builtin_only)


@functools.lru_cache(maxsize=8)
def _policy_spec(policies: tuple[tuple[str, type[Policy]], ...], builtin_only: bool) -> PolicySpec:
    return {
        name: [field_spec(info) for info in policy_fields(cls)]
        for name, cls in policies
        if not builtin_only or cls.__module__.startswith("attnrw.")
    }


#: The snapshot of :func:`policy_spec` for the built-in policies that ``attnrw --help`` reads.
SPEC_MODULE = Path(__file__).resolve().parent.parent / "attnrw_cli" / "builtin_policies.py"


def spec_module_text() -> str:
    """The text of :data:`SPEC_MODULE`, from the live registry: ``python -m attnrw.cli_flags`` writes it."""
    body = pprint.pformat(policy_spec(builtin_only=True), width=110, sort_dicts=False)
    return (
        '"""The flags of the built-in policies, for the torch-free ``attnrw`` launcher.\n\n'
        "Generated from the policy registry by ``python -m attnrw.cli_flags``; do not edit.\n"
        "``tests/test_cli_launcher.py`` checks that it matches the registry.\n"
        '"""\n\nfrom attnrw_cli.parser import PolicySpec\n\n'
        f"SPEC: PolicySpec = {body}\n"
    )


def flag_table(taken: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """``{policy: {field: flag}}`` for every registered policy (see :func:`attnrw_cli.parser.flag_table`)."""
    return cli_parser.flag_table(policy_spec(), taken)


def add_policy_flags(p: argparse.ArgumentParser, default: str = "dense") -> None:
    """Add ``--policy`` and one flag per field of every registered policy to ``p``.

    Call it after the command's own options, so a field whose flag one of
    them already has gets ``--POLICY-FIELD`` instead (see :func:`flag_table`).
    """
    cli_parser.add_policy_flags(p, policy_spec(), default)


def type_name(tp: Any) -> str:
    """A field's type as written in Python, without module prefixes: ``tuple[int, ...] | None``."""
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    if _is_union(tp):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        if origin is collections.abc.Callable:
            return base
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def format_value(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)) and all(isinstance(v, _ITEM_TYPES) for v in value):
        return ",".join(format_value(v) for v in value)
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', value)}"
    return str(value) if isinstance(value, (int, float, str)) else json.dumps(value, default=str)


# --- from the parsed namespace to a policy -------------------------------------------------


def policy_from_flags(ns: argparse.Namespace) -> Policy:
    """The policy ``--policy`` names, its fields set from the policy flags given.

    :class:`ConfigError` for an unknown policy, a flag the policy does not
    take (naming both), a missing required flag, or text that does not parse
    as the field's type (naming the flag).
    """
    name = getattr(ns, "policy", None) or "dense"
    cli_parser.check_policy_flags(ns, policy_spec())
    cls = get_policy(name)
    table = getattr(ns, cli_parser.TABLE, None) or flag_table()
    flags = table.get(name, {})
    by_flag = {flag: field for field, flag in flags.items()}
    infos = {info.name: info for info in policy_fields(cls)}
    values = {by_flag[flag]: parse_field(flag, infos[by_flag[flag]], text) for flag, text in given_flags(ns).items()}
    try:
        return policy_from_dict({"policy": name, **values})
    except ConfigError as e:
        raise ConfigError(_in_flags(str(e), cls, flags)) from None


def _in_flags(message: str, cls: type[Policy], flags: Mapping[str, str]) -> str:
    """A policy's validation message (``Sparse.window must be >= 1``) in the flags' words (``--window ...``).

    The field checks of :mod:`attnrw.policies.base` start their messages with
    ``Class.field``; a message about another class (a nested candidate of
    Auto, say) is left as it is.
    """
    m = re.match(r"(\w+)\.(\w+)", message)
    if m is None or m.group(1) != cls.__name__ or m.group(2) not in flags:
        return message
    return flags[m.group(2)] + message[m.end():]


if __name__ == "__main__":
    SPEC_MODULE.write_text(spec_module_text())
    print(f"wrote {SPEC_MODULE}", file=sys.stderr)
