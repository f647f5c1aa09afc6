"""The ``attnrw`` command: inspect, rewrite and export the attention of a model.

::

    attnrw inspect MODEL [--json]
    attnrw rewrite MODEL -o OUT.pt2 [--policy NAME] [policy flags] [--force] [--dynamic-seq | --static-shapes]
    attnrw export  MODEL -o OUT.onnx [--policy NAME] [policy flags] [--opset N] [--no-verify]
                   [--force] [--dynamic-seq | --static-shapes]

``hf:`` text models keep the sequence length dynamic unless ``--static-shapes``
is given (:mod:`attnrw.shapes` says which axes); a program ``rewrite`` saves
returns plain dicts and tuples (:func:`plain_outputs`), so it loads with
``torch`` and ``attnrw`` alone.

The ``attnrw`` console script is the torch-free launcher :mod:`attnrw_cli`,
which answers ``--help`` and the errors a command line shows by itself, then
calls :func:`main` here; both build their parser with
:func:`attnrw_cli.parser.build_parser`.

The policy flags are generated from the registered policies
(:mod:`attnrw.cli_flags`): one per field, e.g. ``--window``, ``--size-bias``,
``--protect 0,5``, for the built-in policies and any registered with
``@attnrw.policies.register_policy`` before :func:`main` runs.

MODEL is one of:

* ``path/to/program.pt2``: a ``torch.export`` program, read with
  ``torch.export.load`` (after ``import attnrw``, which registers the
  ``torch.ops.attnrw.*`` ops it may call); its saved example inputs are used;
* ``pkg.module:fn``: the module is imported (the current directory is
  searched first, as with ``python -m``) and ``fn()`` is called; it returns
  ``(model, args)`` or ``(model, args, kwargs)``. This runs that code;
* ``hf:PATH``: a local Hugging Face model folder, loaded offline from its
  safetensors weights only (a folder with only pickled weights is refused);
  inputs are built from the config (``--batch``, ``--seq-len``).

Errors a user can cause (a bad MODEL, a bad policy flag, an existing output
without ``--force``) print one line on stderr and exit with status 2; a
failure while exporting or rewriting exits with status 1 (``-v`` shows the
traceback). Outputs are written to a temporary file in the output's folder
and moved into place, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect as _inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import attnrw
from attnrw import cli_bench
from attnrw.cli_flags import CALLABLE_SPEC, import_callable, policy_from_flags, policy_spec
from attnrw.errors import (
    AttnrwError,
    ConfigError,
    DynamicShapeError,
    ExporterLimitError,
    ModelSpecError,
    VerificationError,
)
from attnrw.files import CLI_HINT, check_output, write_atomically
from attnrw.rewriter.trace import PYTREE_DEPRECATION
from attnrw.shapes import dynamic_seq_errors, dynamic_seq_shapes
from attnrw_cli import parser as cli_parser
from attnrw_cli.parser import DEFAULT_BATCH, DEFAULT_SEQ_LEN, EXIT_FAILED, EXIT_OK, EXIT_USAGE

log = logging.getLogger("attnrw.cli")

@dataclass
class LoadedModel:
    """A model (or exported program) with the example inputs to trace it with."""

    model: nn.Module | torch.export.ExportedProgram
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    spec: str = ""
    #: Draws another (args, kwargs) sample of the same shapes, where the MODEL form can (hf:).
    fresh_inputs: Callable[[], tuple[tuple, dict[str, Any]]] | None = None
    #: Whether the inputs have a sequence axis the commands keep dynamic by default (hf: text models).
    seq_axis: bool = False


# --- MODEL forms ------------------------------------------------------------------------


def load_model(spec: str, batch: int | None = None, seq_len: int | None = None) -> LoadedModel:
    """Resolve a MODEL argument (``.pt2``, ``pkg.module:fn`` or ``hf:PATH``) into a model and inputs.

    Raises :class:`ModelSpecError` with a message that says what to do when
    the spec is malformed, the file or folder is missing, the import fails or
    the factory returns something else than ``(model, args[, kwargs])``.
    """
    if spec.startswith("hf:"):
        return _load_hf(spec, batch if batch is not None else DEFAULT_BATCH, seq_len or DEFAULT_SEQ_LEN)
    if batch is not None or seq_len is not None:
        raise ModelSpecError(
            "--batch and --seq-len apply only to hf:PATH models; a .pt2 file or a factory brings its own inputs"
        )
    if spec.endswith(".pt2"):
        return _load_pt2(spec)
    if CALLABLE_SPEC.match(spec):
        return _load_factory(spec)
    hint = f"; for a Hugging Face folder write hf:{spec}" if Path(spec).is_dir() else ""
    raise ModelSpecError(
        f"cannot use MODEL {spec!r}: give a torch.export file (NAME.pt2), a factory (pkg.module:fn) "
        f"or a local Hugging Face folder (hf:PATH){hint}"
    )


#: Packages whose output types a ``.pt2`` file may name and the CLI imports to read it back.
#: A program exported from a Hugging Face model returns a ``ModelOutput`` subclass, which is
#: known to torch's pytree only once its module has been imported.
PYTREE_TYPE_PACKAGES = ("transformers",)

_UNREGISTERED_RE = re.compile(r"Deserializing ([A-Za-z_][\w.]*)\.[A-Za-z_]\w* in pytree is not registered")


class _Capture(logging.Handler):
    """Keeps the records of a logger (torch.export logs the real cause of a failed load)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))


def _export_load(path: Path) -> torch.export.ExportedProgram:
    """``torch.export.load``, importing the output-type modules of :data:`PYTREE_TYPE_PACKAGES` it needs.

    torch.export logs the cause of a failed load as a warning and raises a
    generic error; the cause is captured (and kept off stderr) to find an
    unregistered output type, whose module is imported before one more try.
    Raises :class:`ModelSpecError` naming the cause when the file cannot be read.
    """
    logger = logging.getLogger("torch.export")
    tried: set[str] = set()
    while True:
        capture = _Capture()
        handlers, logger.handlers = logger.handlers, [capture]
        propagate, logger.propagate = logger.propagate, False
        try:
            return torch.export.load(path)
        except Exception as e:  # torch raises many types for a bad archive
            lines = [ln.strip() for ln in "\n".join(capture.text).splitlines() if ln.strip()]
            match = _UNREGISTERED_RE.search("\n".join(lines))
            module = match.group(1) if match else None
            if module is None or module in tried or module.split(".")[0] not in PYTREE_TYPE_PACKAGES:
                log.debug("torch.export.load said:\n%s", "\n".join(lines))
                cause = lines[-1] if lines else f"{type(e).__name__}: {e}"
                raise ModelSpecError(f"cannot read {str(path)!r} with torch.export.load: {cause}") from e
            tried.add(module)
            log.info("importing %s to read back the program's output type", module)
            importlib.import_module(module)
        finally:
            logger.handlers = handlers
            logger.propagate = propagate


def _load_pt2(spec: str) -> LoadedModel:
    path = Path(spec)
    if not path.is_file():
        raise ModelSpecError(f"no such .pt2 file: {spec!r}")
    program = _export_load(path)
    example = getattr(program, "example_inputs", None)
    if example is None:
        raise ModelSpecError(
            f"{spec!r} holds no example inputs; save it from a program exported with example "
            "inputs, or pass a factory (pkg.module:fn) instead"
        )
    args, kwargs = example
    return LoadedModel(program, tuple(args), dict(kwargs), spec)


def _load_factory(spec: str) -> LoadedModel:
    fn = import_callable(spec, ModelSpecError, f"MODEL {spec!r}")
    try:
        result = fn()
    except Exception as e:
        raise ModelSpecError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    return _check_factory_result(spec, result)


def _check_factory_result(spec: str, result: Any) -> LoadedModel:
    shape = "(model, args) or (model, args, kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ModelSpecError(f"factory {spec!r} must return {shape}, got {type(result).__name__}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise ModelSpecError(f"factory {spec!r} returned {type(model).__name__} as the model; expected an nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise ModelSpecError(f"factory {spec!r}: args must be a tuple, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise ModelSpecError(f"factory {spec!r}: kwargs must be a dict, got {type(kwargs).__name__}")
    return LoadedModel(model, tuple(args), dict(kwargs), spec)


def _load_hf(spec: str, batch: int, seq_len: int) -> LoadedModel:
    folder = Path(spec[len("hf:") :])
    if not str(folder):
        raise ModelSpecError("hf: needs a folder: hf:PATH")
    if not folder.is_dir():
        raise ModelSpecError(f"no such Hugging Face model folder: {str(folder)!r} (nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"{str(folder)!r} has no config.json; point hf: at a saved model folder")
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        if not any(p.suffix in PICKLED_WEIGHTS for p in folder.iterdir()):
            raise ModelSpecError(
                f"{str(folder)!r} has a config.json but no weights (no *.safetensors file); point hf: at "
                "a folder written by model.save_pretrained(folder)"
            )
        raise ModelSpecError(
            f"{str(folder)!r} has no safetensors weights; attnrw loads only safetensors (pickled "
            "weights can run code). Convert them, e.g. model.save_pretrained(folder, safe_serialization=True)"
        )
    if batch < 1 or seq_len < 1:
        raise ModelSpecError(f"--batch and --seq-len must be >= 1, got {batch} and {seq_len}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError("hf: models need transformers: pip install 'attnrw[demo]'") from e
    try:
        with _no_progress_bar_unless_terminal(transformers):
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception as e:
        raise ModelSpecError(f"cannot load {spec!r} with transformers: {type(e).__name__}: {e}") from e
    model.eval()
    if hasattr(model.config, "use_cache"):
        # Cache objects do not flatten for torch.export; set in the config rather than passed, so
        # that a saved program takes the inputs a user has (input_ids, attention_mask) and no flag.
        model.config.use_cache = False
    kwargs = hf_inputs(model, config, batch, seq_len)
    return LoadedModel(model, (), kwargs, spec, lambda: ((), hf_inputs(model, config, batch, seq_len)),
                       seq_axis="input_ids" in kwargs and seq_len >= 2)


@contextlib.contextmanager
def _no_progress_bar_unless_terminal(transformers: Any) -> Iterator[None]:
    """transformers draws a "Loading weights" bar on stderr: keep it off a log file or a pipe, and restore it."""
    hf_logging = transformers.utils.logging
    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


#: Suffixes of weight files attnrw refuses to read (pickles can run code), to tell "no weights" from "pickled".
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def hf_inputs(model: nn.Module, config: Any, batch: int, seq_len: int) -> dict[str, Any]:
    """Example inputs for a ``transformers`` model built from its config.

    Vision configs (those with ``image_size``) get ``pixel_values`` of the
    configured size; text configs get ``input_ids`` and an all-ones
    ``attention_mask`` of ``(batch, seq_len)``, and ``decoder_input_ids`` for
    encoder-decoders. (``torch.export`` cannot flatten cache objects: the CLI
    sets ``model.config.use_cache = False`` rather than passing a flag.)
    """
    gen = torch.Generator().manual_seed(0)
    params = _inspect.signature(model.forward).parameters
    vision = getattr(config, "vision_config", None) or config
    image_size = getattr(vision, "image_size", None)
    if image_size is not None and "pixel_values" in params:
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, *size, generator=gen)}
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or "input_ids" not in params:
        raise ModelSpecError(
            f"cannot build inputs for {type(model).__name__}: its config is neither a text model "
            "(vocab_size) nor a vision model (image_size); write a factory (pkg.module:fn) instead"
        )
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise ModelSpecError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "attention_mask" in params:
        kwargs["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    return kwargs


# --- dynamic sequence length ------------------------------------------------------------


def dynamic_axes(program: torch.export.ExportedProgram) -> list[str]:
    """``input_ids dim 1``, ...: each axis of a user input of ``program`` that has a symbolic size."""
    axes = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT:
            continue
        node = next((n for n in program.graph.nodes if n.name == spec.arg.name), None)
        val = node.meta.get("val") if node is not None else None
        if isinstance(val, torch.Tensor):
            axes += [f"{node.name} dim {i}" for i, s in enumerate(val.shape) if not isinstance(s, int)]
    return axes


def _marked_axes(shapes: dict[str, Any] | None) -> list[str]:
    """``input_ids dim 1``, ...: the axes a ``dynamic_shapes`` spec of :func:`dynamic_seq_shapes` marks."""
    axes = []
    for name, spec in (shapes or {}).items():
        for path, leaf in pytree.tree_flatten_with_path(spec, is_leaf=lambda x: isinstance(x, dict) and
                                                        all(isinstance(k, int) for k in x))[0]:
            if isinstance(leaf, dict):
                where = name + pytree.keystr(path)
                axes += [f"{where} dim {axis}" for axis in sorted(leaf)]
    return axes


def _axes_text(axes: list[str]) -> str:
    return f"dynamic: {', '.join(axes)}" if axes else "static shapes"


def _keep_seq_dynamic(ns: argparse.Namespace, loaded: LoadedModel) -> bool | None:
    """True: ``--dynamic-seq``; None: dynamic by default (an hf: text model); False: static."""
    if ns.dynamic_seq:
        return True
    return None if loaded.seq_axis and not ns.static_shapes else False


def _seq_dynamic_or_static(wanted: bool | None, run: Callable[[bool], Any]) -> Any:
    """``run(dynamic)``; a default dynamic sequence (``wanted`` None) the model cannot take falls back to static.

    An explicit ``--dynamic-seq`` that cannot hold stays an error.
    """
    if wanted is False:
        return run(False)
    try:
        with dynamic_seq_errors():
            return run(True)
    except DynamicShapeError as e:
        if wanted:
            raise
        log.warning("the sequence length cannot vary in this model (%s); writing static shapes", _one_line(e))
        return run(False)


# --- output containers --------------------------------------------------------------------

#: Containers every torch pytree knows without another import: a program returning only these
#: loads with ``torch`` (and ``attnrw``, for its ops) alone.
PLAIN_CONTAINERS = (tuple, list, dict)


def plain_outputs(program: torch.export.ExportedProgram) -> list[str]:
    """Make ``program`` return plain tuples, lists and dicts; return the names of the containers replaced.

    A model library's output class (``transformers``' ``BaseModelOutput...``,
    a namedtuple, a registered dataclass) is stored in the program by name,
    and ``torch.export.load`` can rebuild it only after that library has been
    imported. A container whose pytree context is its field names (as
    ``ModelOutput`` and dataclasses register) becomes a dict of those fields,
    any other becomes a tuple of its children, in order. The graph is not
    touched: only how its flat outputs are packed.
    """
    replaced: list[str] = []
    signature = program._module_call_graph[0].signature
    if signature is None:
        return replaced

    def plain(spec: pytree.TreeSpec) -> pytree.TreeSpec:
        if spec.is_leaf():
            return spec
        # TreeSpec.children() replaced children_specs (deprecated) in newer torch; the GPU machine's has only the latter.
        kids = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
        children = [plain(c) for c in kids]
        if spec.type in PLAIN_CONTAINERS:
            return pytree.TreeSpec(spec.type, spec.context, children)
        replaced.append(getattr(spec.type, "__qualname__", str(spec.type)))
        ctx = spec.context
        if isinstance(ctx, (list, tuple)) and len(ctx) == len(children) and all(isinstance(k, str) for k in ctx):
            return pytree.TreeSpec(dict, list(ctx), children)
        return pytree.TreeSpec(tuple, None, children)

    signature.out_spec = plain(signature.out_spec)
    return replaced


# --- policy flags -----------------------------------------------------------------------


def policy_from_args(ns: argparse.Namespace) -> attnrw.Policy | attnrw.Plan:
    """The policy named by ``--policy`` with the policy flags that were given, or the ``--plan`` file.

    The flags are parsed by the types of the chosen policy's fields
    (:mod:`attnrw.cli_flags`); a flag it does not take is a :class:`ConfigError`.
    """
    plan = getattr(ns, "plan", None)
    if plan is not None:  # alone: check_command_line refuses --plan beside a policy
        return attnrw.Plan.load(plan)
    return policy_from_flags(ns)


def _policy_name(policy: attnrw.Policy | attnrw.Plan) -> str:
    return "plan" if isinstance(policy, attnrw.Plan) else policy.name


# --- commands ---------------------------------------------------------------------------


def _load(ns: argparse.Namespace) -> LoadedModel:
    log.info("loading %s", ns.model)
    return load_model(ns.model, getattr(ns, "batch", None), getattr(ns, "seq_len", None))


def cmd_inspect(ns: argparse.Namespace) -> int:
    """``attnrw inspect MODEL``: print the attention sites found and the candidates skipped."""
    loaded = _load(ns)
    report = attnrw.inspect(loaded.model, loaded.args, loaded.kwargs)
    if ns.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report)
    return EXIT_OK


def cmd_rewrite(ns: argparse.Namespace) -> int:
    """``attnrw rewrite MODEL -o OUT.pt2``: rewrite the attention sites and save the program."""
    policy = policy_from_args(ns)
    out = check_output(ns.output, ns.force, CLI_HINT)
    loaded = _load(ns)
    wanted = _keep_seq_dynamic(ns, loaded)

    def rewrite(dynamic: bool) -> torch.export.ExportedProgram:
        shapes = dynamic_seq_shapes(loaded.model, loaded.args, loaded.kwargs) if dynamic else None
        return attnrw.rewrite(loaded.model, loaded.args, loaded.kwargs, policy=policy, dynamic_shapes=shapes)

    program = _seq_dynamic_or_static(wanted, rewrite)
    axes = dynamic_axes(program)
    if wanted and not axes:
        log.warning("--dynamic-seq: torch.export kept every input size static (no sequence axis could vary)")
    error = None
    if cli_bench.is_lossy(policy):
        ref = cli_bench.float_outputs(loaded.model, loaded.args, loaded.kwargs)
        error = cli_bench.error_line(cli_bench.float_outputs(program, loaded.args, loaded.kwargs), ref, loaded.kwargs)
    replaced = plain_outputs(program)
    if replaced:
        log.info("the program returns plain dicts/tuples in place of %s", ", ".join(replaced))
    write_atomically(out, lambda folder: torch.export.save(program, folder / out.name), ns.force, CLI_HINT)
    ops = sum(
        1
        for n in program.graph.nodes
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "attnrw"
    )
    print(f"wrote {out}: {ops} call(s) to torch.ops.attnrw.* (policy {_policy_name(policy)}; {_axes_text(axes)})")
    if error is not None:
        print(error)
    return EXIT_OK


def cmd_export(ns: argparse.Namespace) -> int:
    """``attnrw export MODEL -o OUT.onnx``: rewrite and export to ONNX (verified in onnxruntime)."""
    policy = policy_from_args(ns)
    out = check_output(ns.output, ns.force, CLI_HINT)
    loaded = _load(ns)
    try:
        from attnrw.export import to_onnx
    except ImportError as e:
        raise ModelSpecError(f"ONNX export needs the onnx extras: pip install 'attnrw[onnx]' ({e})") from e
    extra: dict[str, Any] = {} if ns.opset is None else {"opset": ns.opset}
    wanted = _keep_seq_dynamic(ns, loaded)

    def export(dynamic: bool) -> list[str]:
        # to_onnx writes atomically itself: nothing is left behind if export or verification fails.
        to_onnx(
            loaded.model, loaded.args, out, kwargs=loaded.kwargs, policy=policy,
            dynamic_seq=dynamic, verify=not ns.no_verify, force=ns.force, **extra,
        )
        return _marked_axes(dynamic_seq_shapes(loaded.model, loaded.args, loaded.kwargs)) if dynamic else []

    axes = _seq_dynamic_or_static(wanted, export)
    verified = "not verified" if ns.no_verify else "verified in onnxruntime"
    print(f"wrote {out} (policy {_policy_name(policy)}, {verified}; {_axes_text(axes)})")
    if cli_bench.is_lossy(policy):
        print(_onnx_error_line(out, loaded))
    return EXIT_OK


def _onnx_error_line(path: Path, loaded: LoadedModel) -> str:
    """The error of the ONNX file, run in onnxruntime, against the unmodified model on the example inputs.

    The file's inputs carry the names of ``forward``'s parameters; a model
    whose inputs do not map onto them that way (nested containers) gets the
    reason instead of a number.
    """
    from attnrw.export.verify import onnxruntime_outputs

    ref = cli_bench.float_outputs(loaded.model, loaded.args, loaded.kwargs)
    forward = loaded.model.module() if isinstance(loaded.model, torch.export.ExportedProgram) else loaded.model
    try:
        bound = _inspect.signature(forward.forward).bind(*loaded.args, **loaded.kwargs).arguments
        named = [(name, value) for name, value in bound.items() if isinstance(value, torch.Tensor)]
        outputs = onnxruntime_outputs(path, named)
    except (TypeError, AttnrwError) as e:
        return f"error against the unmodified model: not measured ({_one_line(e)})"
    out = [torch.from_numpy(a) for a in outputs if a.dtype.kind == "f"]
    return cli_bench.error_line(out, ref, loaded.kwargs, of=" of the ONNX file (onnxruntime)")


# --- argument parsing -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``attnrw`` argument parser, with flags for every policy registered now (:mod:`attnrw_cli.parser`)."""
    return cli_parser.build_parser(policy_spec(), attnrw.__version__)


def cmd_bench(ns: argparse.Namespace) -> int:
    """``attnrw bench MODEL --policy auto --budget B``: calibrate, rewrite, measure speed and error."""
    policy = policy_from_args(ns)
    cli_bench.check_args(ns)
    loaded = _load(ns)
    return cli_bench.run(ns, loaded, policy)


#: The function of each command of :func:`build_parser`.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect, "rewrite": cmd_rewrite, "export": cmd_export, "bench": cmd_bench,
}


def _setup_logging(verbosity: int) -> None:
    root = logging.getLogger("attnrw")
    if not any(getattr(h, "_attnrw_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("attnrw: %(levelname)s: %(message)s"))
        handler._attnrw_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG)


#: Loggers of libraries the commands drive whose warnings a user cannot act on (torch.onnx on a
#: missing torchvision, onnxscript's constant folding); shown again with -v.
_NOISY_LOGGERS = ("torch.onnx", "onnxscript")


@contextlib.contextmanager
def _quiet_dependencies(verbosity: int) -> Iterator[None]:
    """Hide the dependencies' internal warnings at verbosity 0, and restore everything after."""
    if verbosity > 0:
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        # Also raised by the ONNX exporter, outside attnrw.rewrite's own filter.
        warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnrw`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    _setup_logging(ns.verbose)
    try:
        cli_parser.check_command_line(ns, policy_spec())
        with _quiet_dependencies(ns.verbose):
            return COMMANDS[ns.command](ns)
    except VerificationError as e:
        print(f"attnrw: verification failed: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except ExporterLimitError as e:  # not a usage error: the model needs what the exporter cannot give
        print(f"attnrw: {ns.command} failed: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except (AttnrwError, ConfigError) as e:
        print(f"attnrw: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnrw: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if ns.verbose:
            log.exception("%s failed", ns.command)
        print(
            f"attnrw: {ns.command} failed: {type(e).__name__}: {_one_line(e)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
