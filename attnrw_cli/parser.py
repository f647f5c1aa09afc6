"""The ``attnrw`` argument parser and the checks of its policy flags, with the standard library only.

The parser is built from a *policy spec*: for each registered policy, the
command-line view of its fields (:class:`FieldSpec`: flag syntax, help,
default). :mod:`attnrw.cli_flags` builds the spec from the live registry;
:mod:`attnrw_cli.builtin_policies` holds a snapshot of it for the built-in
policies, so that ``attnrw --help`` and the errors a command line can be
found wrong by itself are answered without importing torch.

Both the launcher (:mod:`attnrw_cli`) and :func:`attnrw.cli.main` build the
same parser and run :func:`check_policy_flags`, so a command line gets the
same answer whichever of them sees it first.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

from attnrw_cli.errors import ConfigError
from attnrw_cli.files import CLI_HINT, check_output

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SEQ_LEN",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "BadValue",
    "FieldSpec",
    "PolicySpec",
    "add_policy_flags",
    "bad_value_message",
    "build_parser",
    "check_command_line",
    "check_policy_flags",
    "flag_name",
    "flag_table",
    "given_flags",
    "owners_text",
    "parse_bool",
    "parse_choice",
    "parse_scalar",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_BATCH = 1
DEFAULT_SEQ_LEN = 128

#: Namespace attribute holding the policy flags given: ``{flag: text}``.
GIVEN = "policy_flags"
#: Namespace attribute holding the flag of each policy field: ``{policy: {field: flag}}``.
TABLE = "policy_flag_table"


class FieldSpec(TypedDict):
    """One policy field as the command line sees it."""

    name: str
    required: bool
    #: The default as typed on the command line ("" when required).
    default: str
    #: The field's type as written in Python: ``tuple[int, ...] | None``.
    type: str
    #: The first line of the field's docstring.
    doc: str
    metavar: str
    #: What the flag's text must be, for messages: ``an int``, ``one of mean, query``.
    expects: str
    #: ``int``, ``float``, ``bool``, ``choice`` or ``text``: checked here; ``other``: only by attnrw.
    kind: str
    #: The values of a ``choice`` field.
    choices: list[str]


#: ``{policy name: [its fields]}``, in registration order.
PolicySpec = dict[str, list[FieldSpec]]


class BadValue(ValueError):
    """A flag's text does not parse as its field's type (a message, if any, says why)."""


# --- the text of a scalar field --------------------------------------------------------------

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")


def parse_bool(text: str) -> bool:
    """``true``/``1``/``yes`` or ``false``/``0``/``no`` (any case); :class:`BadValue` otherwise."""
    low = text.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise BadValue()


def parse_scalar(kind: type) -> Callable[[str], Any]:
    """A parser of ``int`` or ``float`` text that raises :class:`BadValue`."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise BadValue() from None

    return parse


def parse_choice(values: Sequence[Any]) -> Callable[[str], Any]:
    """A parser of one of ``values``, each spelled as ``str(value)``."""
    by_text = {str(v): v for v in values}

    def parse(text: str) -> Any:
        if text not in by_text:
            raise BadValue()
        return by_text[text]

    return parse


def bad_value_message(flag: str, expects: str, text: str, why: str = "") -> str:
    """``--window: expected an int, got 'x'``, with ``why`` in parentheses where there is one."""
    return f"{flag}: expected {expects}, got {text!r}" + (f" ({why})" if why else "")


_SCALAR_PARSERS: dict[str, Callable[[FieldSpec], Callable[[str], Any]]] = {
    "int": lambda f: parse_scalar(int),
    "float": lambda f: parse_scalar(float),
    "bool": lambda f: parse_bool,
    "choice": lambda f: parse_choice(f["choices"]),
    "text": lambda f: str,
}


# --- the policy flags ------------------------------------------------------------------------


def flag_name(field: str) -> str:
    """The flag of a policy field: ``size_bias`` -> ``--size-bias``."""
    return "--" + field.replace("_", "-")


def flag_table(spec: PolicySpec, taken: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """``{policy: {field: flag}}`` for every policy of ``spec``.

    A field's flag is :func:`flag_name` of it, shared by every policy with a
    field of that name; where a command already has that option (``taken``,
    e.g. ``bench``'s own ``--calib``), the field gets ``--POLICY-FIELD``.
    """
    taken_set = set(taken)
    table: dict[str, dict[str, str]] = {}
    for name, fields in spec.items():
        table[name] = {}
        for f in fields:
            flag = flag_name(f["name"])
            if flag in taken_set:
                flag = flag_name(f"{name}_{f['name']}")
            table[name][f["name"]] = flag
    return table


class _StoreFlag(argparse.Action):
    """Keeps the text a policy flag was given, under ``namespace.policy_flags[flag]``, to parse later."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = dict(getattr(namespace, GIVEN, None) or {})
        given[self.option_strings[0]] = values
        setattr(namespace, GIVEN, given)


def add_policy_flags(p: argparse.ArgumentParser, spec: PolicySpec, default: str = "dense") -> None:
    """Add ``--policy`` and one flag per field of every policy of ``spec`` to ``p``.

    Call it after the command's own options, so a field whose flag one of
    them already has gets ``--POLICY-FIELD`` instead (see :func:`flag_table`).
    """
    taken = list(p._option_string_actions)
    table = flag_table(spec, taken)
    g = p.add_argument_group("policy (a flag that the chosen policy does not take is an error)")
    g.add_argument("--policy", default=default, metavar="NAME", help=f"{', '.join(spec)} (default {default})")
    owners: dict[str, list[tuple[str, FieldSpec]]] = {}
    for name, fields in spec.items():
        for f in fields:
            owners.setdefault(table[name][f["name"]], []).append((name, f))
    for flag, fields in owners.items():
        if flag in taken:  # the qualified spelling is taken too: leave it to the command
            continue
        g.add_argument(flag, action=_StoreFlag, dest=GIVEN, default=None,
                       metavar=_metavar(fields), help=_help(fields))
    p.set_defaults(**{TABLE: table})


def _metavar(fields: list[tuple[str, FieldSpec]]) -> str:
    metavars = {f["metavar"] for _, f in fields}
    return metavars.pop() if len(metavars) == 1 else "VALUE"


_EMPTY = '""'


def _help(fields: list[tuple[str, FieldSpec]]) -> str:
    """``policies: doc (type, default)`` for each distinct doc/type/default among the fields sharing a flag."""
    groups: dict[str, list[str]] = {}
    for name, f in fields:
        doc = f["doc"].rstrip(".") or f["name"].replace("_", " ")
        default = "required" if f["required"] else f"default {f['default'] or _EMPTY}"
        spelled = f"; give {f['expects']}" if f["metavar"] == "VALUE" else ""
        groups.setdefault(f"{doc} ({f['type']}, {default}{spelled})", []).append(name)
    text = "; ".join(f"{', '.join(names)}: {desc}" for desc, names in groups.items())
    return text.replace("%", "%%")  # argparse %-formats help


def given_flags(ns: argparse.Namespace) -> dict[str, str]:
    """The policy flags given on the command line: ``{flag: text}``."""
    return dict(getattr(ns, GIVEN, None) or {})


def check_policy_flags(ns: argparse.Namespace, spec: PolicySpec) -> None:
    """Raise :class:`ConfigError` if the policy flags of ``ns`` are wrong whatever the model.

    Wrong are: an unknown ``--policy``; a flag the policy does not take
    (naming the policies that do); text that does not parse as a scalar
    field's type (int, float, bool, a choice); a required flag left out.
    Fields of other types are parsed by :mod:`attnrw.cli_flags`.
    """
    name = getattr(ns, "policy", None) or "dense"
    if name not in spec:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(spec)}")
    table = getattr(ns, TABLE, None) or flag_table(spec)
    flags = table.get(name, {})
    by_flag = {flag: field for field, flag in flags.items()}
    fields = {f["name"]: f for f in spec[name]}
    given = given_flags(ns)
    foreign = [flag for flag in given if flag not in by_flag]
    if foreign:
        takes = ", ".join(flags.values()) or "no flags"
        raise ConfigError(
            f"{', '.join(foreign)} {'is not a flag' if len(foreign) == 1 else 'are not flags'} of --policy {name} "
            f"({owners_text(table, foreign)}; --policy {name} takes {takes})"
        )
    for flag, text in given.items():
        f = fields[by_flag[flag]]
        if f["kind"] in _SCALAR_PARSERS:
            try:
                _SCALAR_PARSERS[f["kind"]](f)(text)
            except BadValue:
                raise ConfigError(bad_value_message(flag, f["expects"], text)) from None
    missing = [flags[n] for n, f in fields.items() if f["required"] and flags[n] not in given]
    if missing:
        raise ConfigError(f"--policy {name} needs {' and '.join(missing)}")


def owners_text(table: Mapping[str, Mapping[str, str]], flags: Sequence[str]) -> str:
    """``--window goes with --policy sparse``: the policies that take each flag, flags with the same owners together."""
    by_owners: dict[tuple[str, ...], list[str]] = {}
    for flag in flags:
        owners = tuple(policy for policy, fields in table.items() if flag in fields.values())
        by_owners.setdefault(owners, []).append(flag)
    parts = []
    for owners, group in by_owners.items():
        verb = "goes" if len(group) == 1 else "go"
        parts.append(f"{' and '.join(group)} {verb} with --policy {' or '.join(owners)}")
    return "; ".join(parts)


def check_command_line(ns: argparse.Namespace, spec: PolicySpec) -> None:
    """Every check of a parsed command line that needs neither torch nor the model.

    The policy flags (:func:`check_policy_flags`), ``--plan`` beside a
    policy, contradicting shape options and the counts that must be positive
    raise :class:`ConfigError`; the output paths (``-o``, ``--plot``,
    ``--plan-out``) the errors of :func:`attnrw_cli.files.check_output`.
    """
    if getattr(ns, "plan", None) is not None:
        if given_flags(ns) or getattr(ns, "policy", "dense") != "dense":
            raise ConfigError("--plan fixes every site's policy; drop --policy and the policy flags")
    elif hasattr(ns, "policy"):
        check_policy_flags(ns, spec)
    if getattr(ns, "dynamic_seq", False) and getattr(ns, "static_shapes", False):
        raise ConfigError("--dynamic-seq and --static-shapes contradict each other; give one")
    for what in ("batch", "seq_len", "calib", "repeat"):
        value = getattr(ns, what, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{what.replace('_', '-')} must be at least 1, got {value}")
    for what in ("output", "plot", "plan_out"):
        if getattr(ns, what, None):
            check_output(getattr(ns, what), getattr(ns, "force", False), CLI_HINT)


# --- the parser ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit 2), as every other error.

    argparse prints the whole usage (a dozen lines for a command with policy
    flags) before the message; here the message names the command and where
    its options are listed instead.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="NAME.pt2, pkg.module:fn, or hf:PATH")
    g = p.add_argument_group("inputs of hf:PATH models")
    g.add_argument("--batch", type=int, default=None, help=f"batch size (default {DEFAULT_BATCH})")
    g.add_argument("--seq-len", type=int, default=None, help=f"sequence length (default {DEFAULT_SEQ_LEN})")


def _add_output(p: argparse.ArgumentParser, suffix: str) -> None:
    p.add_argument("-o", "--output", required=True, metavar=f"OUT{suffix}", help="file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument(
        "--dynamic-seq", action="store_true",
        help="keep the sequence length dynamic (axis 1 of batch-first inputs); the default for hf: text "
        "models, an error where the model fixes the length",
    )
    p.add_argument(
        "--static-shapes", action="store_true",
        help="fix every input size to the example's (hf: text models otherwise keep the sequence length dynamic)",
    )


def build_parser(spec: PolicySpec, version: str) -> argparse.ArgumentParser:
    """The ``attnrw`` argument parser, with policy flags for the policies of ``spec``.

    The command chosen is ``namespace.command``: ``inspect``, ``rewrite``,
    ``export`` or ``bench``.
    """
    parser = _Parser(
        prog="attnrw",
        description="Find the attention in a PyTorch model and rewrite it.",
        epilog="MODEL: NAME.pt2 (read by torch.export.load), pkg.module:fn (runs that code; returns "
        "(model, args[, kwargs])), or hf:PATH (a local Hugging Face folder; safetensors weights only).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"attnrw {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="list the attention sites found, and why other candidates were not")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("rewrite", help="rewrite the attention sites and save a torch.export program")
    _add_model(p)
    _add_output(p, ".pt2")
    p.add_argument("--plan", default=None, help="apply a saved plan (from attnrw bench --plan-out)")
    add_policy_flags(p, spec)

    p = sub.add_parser("export", help="rewrite and export to ONNX, verified in onnxruntime")
    _add_model(p)
    _add_output(p, ".onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: attnrw's choice)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison against PyTorch")
    p.add_argument("--plan", default=None, help="apply a saved plan (from attnrw bench --plan-out)")
    add_policy_flags(p, spec)

    p = sub.add_parser("bench", help="rewrite (calibrating --policy auto) and measure speed-up and error")
    _add_model(p)
    p.add_argument("--plan", default=None, help="apply a saved plan instead of a policy")
    p.add_argument("--calib", type=int, default=1, help="calibration batches (hf: models draw fresh inputs)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per model (median)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the error/cost plots to this PNG")
    p.add_argument("--plan-out", default=None, metavar="PLAN.json", help="save the calibrated plan")
    p.add_argument("--force", action="store_true", help="overwrite --plot / --plan-out files")
    # Last, so that a policy field named like one of bench's options (Auto's calib) gets --POLICY-FIELD.
    add_policy_flags(p, spec)
    return parser
