"""The ``mcdrop`` command: ``mcdrop demo`` and ``mcdrop report``.

Bad input (a missing file, an unreadable model, wrong columns, mismatched shapes) exits with code 2
and one clear message on stderr, never a traceback.

Loading a model is a trust boundary. A ``--weights`` state dict and ``.pt`` data files are read with
``torch.load(weights_only=True)``, which cannot run code, and a model file is told apart (exported
program, TorchScript, ``torch.save(model)``, or a state dict given by mistake) without running any
of it. Whatever runs code from outside (importing the module of a ``package.module:factory``
model, from the current folder or the installed packages; loading a TorchScript file, whose program
is the model and whose loader a crafted file can make execute arbitrary code; ``torch.export.load``
and unpickling a whole model) needs ``--trust-code``.
Reports are written atomically into ``--out`` only; an existing report folder is replaced only
with ``--force``, and a folder holding anything else never.

Example:
    >>> from mcdrop.cli import build_parser
    >>> build_parser().parse_args(["demo", "--out", "rep"]).out
    'rep'
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mcdrop.errors import CliError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mcdrop`` command."""
    parser = argparse.ArgumentParser(
        prog="mcdrop", description="Monte Carlo dropout uncertainty reports for PyTorch models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small dropout MLP on bundled digits and write its report")
    demo.add_argument("--out", default="mcdrop-report", help="report folder (default: %(default)s)")
    demo.add_argument(
        "--n-samples",
        type=_n_samples,
        default=100,
        help="MC passes per input, or 'auto' for adaptive N (default: %(default)s)",
    )
    demo.add_argument("--tolerance", type=float, default=None, help=_TOLERANCE_HELP)
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="overwrite an existing report folder")
    demo.add_argument("--quiet", action="store_true", help="print only errors and warnings")

    rep = sub.add_parser("report", help="evaluate a saved model on a data file and write its report")
    rep.add_argument(
        "--model",
        required=True,
        help="an exported program (torch.export.save, .pt2), a TorchScript file, a torch.save(model) file, "
        "or package.module:factory (importable from the current folder) with --weights",
    )
    rep.add_argument("--weights", help="state-dict file for a package.module:factory model")
    rep.add_argument(
        "--trust-code",
        action="store_true",
        help="allow running code from --model: loading a model file or importing the factory's module",
    )
    rep.add_argument("--data", required=True, help=".npz, .pt or .csv file with inputs and targets")
    rep.add_argument("--target", default="y", help="target column/key (default: %(default)s)")
    rep.add_argument("--inputs", default=None, help="input key for .npz/.pt (default: 'x' or 'X')")
    rep.add_argument("--ood", help="out-of-distribution data file, same format (its targets are ignored)")
    rep.add_argument("--task", choices=["classification", "regression", "auto"], default="auto")
    rep.add_argument(
        "--output",
        type=int,
        default=None,
        metavar="J",
        help="for a regression model with several outputs per input: the index of the one to report",
    )
    rep.add_argument(
        "--n-samples",
        type=_n_samples,
        default=50,
        help="MC passes per input, or 'auto' for adaptive N (default: %(default)s)",
    )
    rep.add_argument("--tolerance", type=float, default=None, help=_TOLERANCE_HELP)
    rep.add_argument("--batch-size", type=int, default=256)
    rep.add_argument("--device", default="cpu", help="where to evaluate, e.g. cpu or cuda:0 (default: cpu)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the model once with dropout off and compare MC dropout with it (default: on)",
    )
    rep.add_argument(
        "--title", default=None, help="the report's title (default: the model and data file names)"
    )
    rep.add_argument(
        "--n-bins",
        type=int,
        default=15,
        help="confidence bins of the calibration errors (default: %(default)s)",
    )
    rep.add_argument("--out", default="mcdrop-report", help="report folder (default: %(default)s)")
    rep.add_argument("--force", action="store_true", help="overwrite an existing report folder")
    rep.add_argument("--quiet", action="store_true", help="print only errors and warnings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (0 success, 2 bad input).

    Example:
        >>> from mcdrop.cli import main
        >>> main(["report", "--model", "missing.pt", "--data", "missing.npz", "--out", "x"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.weights_used = None  # set by _load_model: which weights were evaluated, in words
    from mcdrop.errors import McdropError

    try:
        _check_numbers(args)
        if args.command == "demo":
            return _demo(args)
        return _report(args)
    except (CliError, McdropError, OSError) as err:
        print(f"mcdrop {args.command}: error: {err}", file=sys.stderr)
        return 2


# (option, attribute, minimum, maximum): checked before any work. A demo seed also seeds scikit-learn's
# train_test_split and numpy, which take [0, 2**32 - 1]; MCDropout takes [0, 2**64 - 1].
_NUMBER_OPTIONS = {
    "demo": [
        ("--n-samples", "n_samples", 1, None),
        ("--epochs", "epochs", 1, None),
        ("--seed", "seed", 0, 2**32 - 1),
    ],
    "report": [
        ("--n-samples", "n_samples", 1, None),
        ("--batch-size", "batch_size", 1, None),
        ("--seed", "seed", 0, 2**64 - 1),
        ("--output", "output", 0, None),
        ("--n-bins", "n_bins", 1, None),
    ],
}


_TOLERANCE_HELP = (
    "with --n-samples auto: the Monte Carlo standard error of each input's top-class probability "
    "(regression: mean) at which its sampling stops (default 0.01; see docs/outputs.md)"
)


def _n_samples(text: str) -> int | str:
    """``--n-samples``: a whole number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto'; got {text!r}") from None


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The MCDropout options of ``--n-samples`` and ``--tolerance`` (refused there if they clash)."""
    options: dict[str, Any] = {"n_samples": args.n_samples}
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance
    return options


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse out-of-range numeric options up front, before any training, loading or writing."""
    for option, attr, low, high in _NUMBER_OPTIONS[args.command]:
        value = getattr(args, attr)
        if value is None or value == "auto":
            continue
        if value < low:
            raise CliError(f"{option} must be at least {low}; got {value}")
        if high is not None and value > high:
            raise CliError(f"{option} must be at most {high}; got {value}")


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _demo(args: argparse.Namespace) -> int:
    import torch

    import mcdrop
    from mcdrop._demo import load_digits_data, train_digits_mlp

    out = Path(args.out)
    _check_out(out, args.force)
    started = time.perf_counter()
    _say(args, "mcdrop demo: training a dropout MLP on scikit-learn's digits ...")
    data = load_digits_data(seed=args.seed)
    model = train_digits_mlp(data, epochs=args.epochs, seed=args.seed)
    _say(
        args,
        f"  trained in {time.perf_counter() - started:.1f} s; evaluating with MC dropout (N = {args.n_samples}) ...",
    )
    mc = mcdrop.MCDropout(model, seed=args.seed, **_sampling(args))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=256
    )
    pred = mc.predict_loader(loader, progress=False, deterministic=True)  # about a second: no bar needed
    ood = mc.predict(data.x_ood)
    ood.deterministic = mc.predict_deterministic(data.x_ood)  # the baseline's OOD rows
    report = mcdrop.report(
        pred,
        ood={"pixel-shuffled digits": ood},
        title="mcdrop demo: dropout MLP on scikit-learn digits",
        model=mc,
        metadata={
            "command": "mcdrop demo",
            "data": "scikit-learn's digits (8x8 images), a stratified 70/30 split",
            "ood": "the test digits with their 64 pixels shuffled",
            "epochs": args.epochs,
        },
    )
    if not args.quiet:
        print(_summary_text(report.summary), flush=True)
    report.save(out, overwrite=args.force)
    _say(args, f"mcdrop demo: report written to {out.resolve()} (open {out.resolve() / 'report.html'})")
    return 0


def _check_out(out: Path, force: bool) -> None:
    """Refuse up front, before any work, an output folder that ``report.save`` would refuse."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise CliError(f"--out {out} is {kind}, not a report folder; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CliError(f"the output folder {out} exists and is not empty; pass --force to overwrite it")
        from mcdrop.report import check_report_folder

        check_report_folder(Path(os.path.abspath(out)), True)  # --force replaces only an mcdrop report


_SAFE_LOAD_HINT = (
    " (read with torch.load(weights_only=True), which loads tensors and plain containers only and "
    "never runs code from the file; save a state dict / a dict of tensors)"
)


def _load_tensors(path: Path, map_location: Any) -> Any:
    """``torch.load(path, weights_only=True)``, with torch's warnings shown only if it loads.

    A plain pickle makes torch warn about its pickle protocol before refusing it; mcdrop's own
    one-line error then says what went wrong, so the warning (two more lines) is dropped. After a
    load that works, torch's warnings are shown as they were.
    """
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = torch.load(str(path), map_location=map_location, weights_only=True)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def _first_line(err: BaseException) -> str:
    """``Type: message`` of an exception, in one short line (torch's messages can span a screen).

    Usually the first line of the message. A TorchScript error starts with "The following operation
    failed in the TorchScript interpreter" and a traceback of the scripted code; its cause
    (e.g. ``RuntimeError: mat1 and mat2 shapes cannot be multiplied ...``) is the last line, so
    that is kept instead.
    """
    text = str(err)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if "Weights only load failed" in first or "Unsupported global" in text:
        first = "the file holds pickled Python objects beyond tensors, which weights_only=True refuses"
    elif len(lines) > 1 and ("TorchScript interpreter" in first or "Traceback of TorchScript" in text):
        return lines[-1][:300]  # already "ErrorType: message"
    return f"{type(err).__name__}: {first[:300]}"


def _check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {text!r} is not a device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {text}: no CUDA device is available here; use --device cpu")
    if device.type == "meta":
        raise CliError("--device meta holds no data, so nothing can be evaluated on it; use cpu or cuda")


#: TorchScript's own deprecation notices (torch >= 2.11: "`torch.jit.load` is deprecated. Please switch
#: to `torch.export`."), silenced around mcdrop's own calls only: the user chose the format already.
_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch's TorchScript deprecation warnings (and only those) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
        yield


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current folder first on ``sys.path`` inside the block, as for ``python -m``.

    The ``mcdrop`` console script puts its own folder (``.venv/bin``) there instead, so a
    ``models.py`` next to the data could not be imported by ``--model models:make``.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


#: Model file kinds told apart by :func:`_model_file_kind`.
_TORCHSCRIPT, _EXPORTED, _STATE_DICT, _PICKLED_MODULE, _CHECKPOINT, _OTHER = (
    "torchscript",
    "exported program",
    "state dict",
    "pickled module",
    "checkpoint",
    "other",
)


def _model_file_kind(path: Path) -> tuple[str, str]:
    """``(kind, detail)`` of a model file, found without running any code from it.

    A zip archive with ``code/`` (or ``constants.pkl``) is TorchScript; one with ``archive_format``
    or ``models/*.json`` is a ``torch.export.save`` program; one with ``data.pkl`` (or a file that is
    not a zip: the legacy format or a plain pickle) is read with ``torch.load(weights_only=True)``,
    which cannot run code: a dict of tensors is a state dict, a dict holding one is a checkpoint.
    If that load refuses the file, the classes its pickle names are read with :mod:`pickletools`
    (which decodes the opcodes without executing them): a pickle naming ``torch.nn.modules`` classes
    is a whole model saved with ``torch.save(model)``. ``detail`` says what was found (key names,
    the class), for the message.
    """
    import zipfile

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
                if any(t.startswith("code/") for t in tails) or "constants.pkl" in tails:
                    return _TORCHSCRIPT, ""
                if "archive_format" in tails or any(
                    t.startswith("models/") and t.endswith(".json") for t in tails
                ):
                    return _EXPORTED, ""
                pickles = [n for n in names if n.endswith("data.pkl")]
                if not pickles:
                    return _OTHER, "a zip archive that is no PyTorch file"
                with archive.open(pickles[0]) as stream:
                    globals_ = _pickle_globals(stream)
        except (OSError, zipfile.BadZipFile) as err:
            return _OTHER, f"an unreadable zip archive ({err})"
    else:
        try:
            with path.open("rb") as stream:
                globals_ = _pickle_globals(stream)
        except OSError as err:
            return _OTHER, f"unreadable ({err})"
        if globals_ is None:
            return _OTHER, "neither a PyTorch file nor a pickle"
    return _kind_of_pickle(path, globals_ or [])


def _pickle_globals(stream: Any) -> list[str] | None:
    """``module.name`` of every class or function a pickle refers to, without unpickling it.

    Reads up to four consecutive pickles of the binary ``stream`` (torch's legacy format writes
    several, then raw tensor bytes); ``None`` if it does not start with a pickle.
    """
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    for index in range(4):
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings = [*strings[-1:], str(arg)]
                elif opcode.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                    found.append(".".join(strings))
        except Exception:  # noqa: BLE001 - pickletools raises ValueError and others past the pickles
            return None if index == 0 else found
    return found


def _kind_of_pickle(path: Path, globals_: list[str]) -> tuple[str, str]:
    """The kind of a ``torch.save`` file or pickle, given the globals its pickle names."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the kind is what we report
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - refused by the safe loader: look at the classes it names
        loaded = None
    else:
        return _kind_of_object(loaded)
    modules = [g for g in globals_ if g.startswith("torch.nn.modules.") or g.endswith("._rebuild_parameter")]
    if modules:
        top = globals_[0] if globals_ else modules[0]
        return _PICKLED_MODULE, top
    others = [
        g for g in globals_ if not g.startswith(("torch.", "collections.", "builtins.", "__builtin__."))
    ]
    return _OTHER, "a pickle of " + (
        f"Python objects ({', '.join(others[:3])})" if others else "Python objects"
    )


def _kind_of_object(loaded: Any) -> tuple[str, str]:
    """The kind of what ``torch.load(weights_only=True)`` read from a model file."""
    import torch

    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        keys = list(loaded)
        return (
            _STATE_DICT,
            f"{len(keys)} tensors: {', '.join(map(repr, keys[:3]))}{', ...' if len(keys) > 3 else ''}",
        )
    if isinstance(loaded, dict):
        nested = [
            k
            for k, v in loaded.items()
            if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())
        ]
        if nested:
            return _CHECKPOINT, f"keys {sorted(map(str, loaded))[:8]}; the state dict is under {nested[0]!r}"
        return _OTHER, f"a dict with keys {sorted(map(str, loaded))[:8]}, not a model"
    return _OTHER, f"a {type(loaded).__name__}, not a model"


def _load_model(args: argparse.Namespace) -> Any:
    """The model ``--model`` names (a file or ``package.module:factory``), on ``--device``, in eval mode.

    Also sets ``args.weights_used``: which weights are evaluated, in words, for the output and the
    report's metadata.
    """
    spec = args.model
    path = Path(spec)
    if path.exists() or path.suffix.lower() in _MODEL_SUFFIXES:
        if not path.exists():
            raise CliError(f"model file {spec} not found")
        if args.weights:
            raise CliError(
                f"--weights applies to a package.module:factory model; --model {spec} is a file that holds "
                "its own weights"
            )
        model = _load_model_file(path, args)
        args.weights_used = f"those saved in {spec}"
    elif ":" not in spec:
        raise CliError(f"--model {spec!r} is neither an existing file nor of the form package.module:factory")
    else:
        model = _load_factory_model(spec, args)
    return model.to(args.device).eval()  # the mode MCDropout expects on entry: it switches only dropout on


#: Suffixes of model files: a missing one is reported as a missing file, not as a bad factory spec.
_MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript", ".pkl", ".bin")

_FACTORY_FIX = (
    "mcdrop report --model package.module:factory --weights {file} --trust-code ..., where factory() "
    "builds the model (untrained) and lives in a module importable from the current folder"
)


def _load_model_file(path: Path, args: argparse.Namespace) -> Any:
    """Load a model file of whatever kind it is; refuse the kinds that are no model, saying what to pass."""
    kind, detail = _model_file_kind(path)
    if kind == _STATE_DICT:
        raise CliError(
            f"--model {path} holds a state dict ({detail}): the weights without the code that builds the "
            f"model. Give that code as a factory and the file as its weights: {_FACTORY_FIX.format(file=path)}"
        )
    if kind == _CHECKPOINT:
        raise CliError(
            f"--model {path} is a training checkpoint ({detail}): save that state dict on its own, "
            f"torch.save(ckpt[key], 'weights.pt'), then {_FACTORY_FIX.format(file='weights.pt')}"
        )
    if kind == _OTHER:
        raise CliError(
            f"--model {path} is {detail}. mcdrop reads an exported program (torch.export.save, .pt2), a "
            "TorchScript file (torch.jit.save), a whole model saved with torch.save(model) (with --trust-code), "
            "or package.module:factory with --weights (a state dict)"
        )
    if not args.trust_code:
        raise CliError(_trust_message(path, kind, detail))
    if kind == _TORCHSCRIPT:
        return _load_torchscript(path, args)
    if kind == _EXPORTED:
        from mcdrop._exported import load_exported

        model, note = load_exported(path, _first_line)
        if note:
            print(f"mcdrop report: note: {note}", file=sys.stderr, flush=True)
        return model
    return _load_pickled_module(path, args, detail)


def _trust_message(path: Path, kind: str, detail: str) -> str:
    """Why loading ``path`` (of ``kind``) needs ``--trust-code``, and the alternative."""
    if kind == _PICKLED_MODULE:
        return (
            f"--model {path} is a whole model saved with torch.save(model) (class {detail}); unpickling it runs "
            "code named by the file, so mcdrop loads it only with --trust-code (pass it if you trust where the "
            "file came from; its class must be importable from the current folder). Safer: save "
            f"model.state_dict() and give {_FACTORY_FIX.format(file='weights.pt')}"
        )
    what = (
        "an exported program (torch.export.save); torch.export.load unpickles parts of it, which can run code"
        if kind == _EXPORTED
        else "a TorchScript file, which runs code from the file (the model's program, and torch.jit.load can be "
        "made to execute arbitrary code by a crafted file)"
    )
    return (
        f"--model {path} is {what}; pass --trust-code if you trust where it came from, or give "
        "package.module:factory with --weights (a state dict, read with torch.load(weights_only=True))"
    )


def _load_torchscript(path: Path, args: argparse.Namespace) -> Any:
    import torch

    try:
        with _quiet_jit():
            return torch.jit.load(str(path), map_location=args.device)
    except Exception as err:  # noqa: BLE001 - any failure here means "not a TorchScript file"
        raise CliError(
            f"could not load {path} as a TorchScript model ({_first_line(err)}). Export it instead, "
            "torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), or give package.module:factory "
            "with --weights"
        ) from None


def _load_pickled_module(path: Path, args: argparse.Namespace, cls: str) -> Any:
    import torch

    try:
        with _cwd_importable(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's note on weights_only: chosen knowingly
            model = torch.load(str(path), map_location=args.device, weights_only=False)
    except (AttributeError, ImportError) as err:
        where = (
            "in the script that saved it (its __main__), which no other program can import"
            if cls.startswith("__main__.")
            else "in a module that cannot be imported from here"
        )
        raise CliError(
            f"could not load {path}: its class {cls} was defined {where} ({_first_line(err)}). Move the class "
            "into a module file in the current folder and save again, or save model.state_dict() and give "
            f"{_FACTORY_FIX.format(file='weights.pt')}"
        ) from None
    except Exception as err:  # noqa: BLE001 - the file's pickle is the user's; any failure is theirs
        raise CliError(f"could not load {path} with torch.load: {_first_line(err)}") from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_factory_model(spec: str, args: argparse.Namespace) -> Any:
    """``factory()`` of ``package.module:factory`` (importable from the current folder), with ``--weights``."""
    import torch

    if not args.trust_code:
        raise CliError(
            f"--model {spec} imports and runs Python code from module {spec.split(':')[0]!r}; pass --trust-code "
            "if you trust it"
        )
    module_name, factory_name = spec.split(":", 1)
    with _cwd_importable():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise CliError(
                f"cannot import module {module_name!r} (searched the current folder {os.getcwd()} and the "
                f"installed packages): {err}"
            ) from None
        except Exception as err:  # noqa: BLE001 - the module's own code raised while importing
            raise CliError(
                f"cannot import module {module_name!r}: importing it raised {_first_line(err)}"
            ) from None
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise CliError(f"module {module_name!r} has no callable {factory_name!r}")
        required = _required_parameters(factory)
        if required:
            raise CliError(
                f"--model {spec}: {factory_name}() needs arguments ({', '.join(required)}); the factory must be "
                "callable with no arguments and return the nn.Module (wrap it: def make(): return Net(...))"
            )
        try:
            model = factory()
        except Exception as err:  # noqa: BLE001 - the factory is the user's code; any failure is theirs
            raise CliError(f"calling {spec}() failed: {_first_line(err)}") from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if not args.weights:
        args.weights_used = _NO_WEIGHTS
        return model
    wpath = Path(args.weights)
    if not wpath.exists():
        raise CliError(f"weights file {wpath} not found")
    try:
        state = _load_tensors(wpath, args.device)
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001
        raise CliError(f"could not load weights {wpath}: {_first_line(err)}{_SAFE_LOAD_HINT}") from None
    args.weights_used = f"{wpath} (a state dict)"
    return model


#: What the output and the report's metadata say when a factory model gets no ``--weights``.
_NO_WEIGHTS = "none given: the factory's own initialisation (pass --weights FILE for trained weights)"


def _required_parameters(func: Any) -> list[str]:
    """Names of the parameters ``func`` cannot be called without (empty when unknown)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins and some C callables have none: just call them
        return []
    return [
        name
        for name, param in signature.parameters.items()
        if param.default is inspect.Parameter.empty
        and param.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _numbers(value: Any, path: Path, what: str) -> Any:
    """``value`` (a tensor, an array or a nested list of numbers from a data file) as a tensor."""
    import numpy as np
    import torch

    expected = "expected a tensor or array of numbers with one row per input"
    if isinstance(value, np.ndarray) and not (
        np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.bool_)
    ):
        sample = value.reshape(-1)[:1].tolist()
        got = f"an array of dtype {value.dtype}" + (f" (first value {sample[0]!r})" if sample else "")
        raise CliError(f"{path}: {what} must be numbers; got {got}; {expected}")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        got = type(value).__name__
        if isinstance(value, (list, tuple)) and value:
            got += f" starting with {type(value[0]).__name__} {value[0]!r:.40}"
        raise CliError(f"{path}: {what} must be numbers; got {got}; {expected}") from None
    if tensor.dim() == 0:
        raise CliError(f"{path}: {what} is a single number; {expected}")
    return tensor


def _load_data(path_text: str, args: argparse.Namespace, need_target: bool) -> tuple[Any, Any]:
    """Inputs and targets of a data file; ``need_target=False`` (the ``--ood`` file) ignores its targets.

    The inputs come back as a tensor, the targets as a tensor or (``need_target=False``) ``None``.
    """
    import numpy as np
    import torch

    path = Path(path_text)
    if not path.exists():
        raise CliError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path)
        except Exception as err:  # noqa: BLE001
            raise CliError(f"could not read {path} as CSV: {err}") from None
        if len(frame) == 0:
            raise CliError(f"{path} has no data rows (only a header: {list(frame.columns)})")
        if args.target in frame.columns:
            y = frame[args.target] if need_target else None
            x = frame.drop(columns=[args.target])
        elif need_target:
            raise CliError(f"{path} has no target column {args.target!r}; columns are {list(frame.columns)}")
        else:
            y, x = None, frame
        if len(x.columns) == 0:
            raise CliError(
                f"{path} has no feature columns (only the target column {args.target!r}); every column "
                "other than --target is an input"
            )
        # pandas' own predicates: pandas >= 3 reads text as a StringDtype, which numpy cannot interpret
        types = pd.api.types
        non_numeric = [c for c in x.columns if not types.is_numeric_dtype(x[c]) or types.is_bool_dtype(x[c])]
        if non_numeric:
            raise CliError(f"{path}: input columns must be numeric; these are not: {non_numeric}")
        xs = torch.from_numpy(x.to_numpy(dtype=np.float32, na_value=np.nan))
        if y is None:
            return xs, None
        if not types.is_numeric_dtype(y):
            not_numbers = y[pd.to_numeric(y, errors="coerce").isna() & y.notna()]
            bad = not_numbers.iloc[0] if len(not_numbers) else y.iloc[0]
            raise CliError(
                f"{path}: target column {args.target!r} must hold numbers (class labels 0..K-1, or "
                f"regression targets); it holds {bad!r} (dtype {y.dtype})"
            )
        ys = y.to_numpy() if isinstance(y.dtype, np.dtype) else y.to_numpy(dtype=np.float64, na_value=np.nan)
        return xs, torch.from_numpy(np.array(ys))  # a copy: pandas may hand out a read-only view
    if suffix == ".npz":
        try:
            store = dict(np.load(path, allow_pickle=False))
        except Exception as err:  # noqa: BLE001
            raise CliError(f"could not read {path} as .npz: {err}") from None
    elif suffix in (".pt", ".pth"):
        try:
            store = _load_tensors(path, "cpu")
        except Exception as err:  # noqa: BLE001
            raise CliError(
                f"could not read {path} as a tensor dict: {_first_line(err)}{_SAFE_LOAD_HINT}"
            ) from None
        if not isinstance(store, dict):
            raise CliError(f"{path} must hold a dict of tensors, e.g. {{'x': X, 'y': y}}")
    else:
        raise CliError(f"unsupported data format {suffix!r} for {path}; use .npz, .pt or .csv")
    keys = [args.inputs] if args.inputs else ["x", "X", "inputs"]
    x_key = next((k for k in keys if k in store), None)
    names = sorted(str(k) for k in store)
    if x_key is None:
        raise CliError(f"{path} has no inputs under {keys}; keys are {names} (use --inputs)")
    x = _numbers(store[x_key], path, f"the inputs {x_key!r}")
    if len(x) == 0:
        raise CliError(f"{path}: the inputs {x_key!r} have no rows (shape {tuple(x.shape)})")
    if x.is_floating_point():
        x = x.float()
    if not need_target:
        return x, None
    if store.get(args.target) is None:
        raise CliError(f"{path} has no targets under {args.target!r}; keys are {names} (use --target)")
    y = _numbers(store[args.target], path, f"the targets {args.target!r}")
    if len(y) != len(x):
        raise CliError(f"{path}: {len(x)} inputs but {len(y)} targets")
    return x, y


def _report(args: argparse.Namespace) -> int:
    import torch

    import mcdrop

    out = Path(args.out)
    _check_out(out, args.force)  # --n-samples, --batch-size, --seed, --output: checked in main
    _check_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _report_distributed(args, out)
    model = _load_model(args)
    x, y = _load_data(args.data, args, need_target=True)
    mc = mcdrop.MCDropout(model, task=args.task, seed=args.seed, **_sampling(args))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size)
    with _model_errors(x, args.data):
        pred = mc.predict_loader(loader, progress=not args.quiet, deterministic=args.baseline)
    ood = None
    if args.ood:
        x_ood, _ = _load_data(args.ood, args, need_target=False)
        if x_ood.shape[1:] != x.shape[1:]:
            raise CliError(
                f"--ood inputs have shape {tuple(x_ood.shape[1:])} per row; --data has {tuple(x.shape[1:])}"
            )
        with _model_errors(x_ood, args.ood):
            ood = _predict_in_batches(mc, x_ood, args)
    report = _build_report(args, pred, ood, mc)
    _say_weights(args)
    _print_summary(args, report)
    report.save(out, overwrite=args.force)
    _say(args, f"mcdrop report: written to {out.resolve()} (open {out.resolve() / 'report.html'})")
    return 0


def _predict_in_batches(mc: Any, x: Any, args: argparse.Namespace, *, mc_passes: bool = True) -> Any:
    """MC prediction of ``x`` in ``--batch-size`` parts, with its dropout-off baseline if ``--baseline``.

    ``mc_passes=False`` makes the baseline alone (under torchrun the MC passes are sharded).
    """
    import mcdrop

    parts = []
    for start in range(0, len(x), args.batch_size):
        chunk = x[start : start + args.batch_size]
        if not mc_passes:
            parts.append(mc.predict_deterministic(chunk))
            continue
        part = mc.predict(chunk)
        if args.baseline:
            part.deterministic = mc.predict_deterministic(chunk)
        parts.append(part)
    return mcdrop.concat_predictions(parts)


def _say_weights(args: argparse.Namespace) -> None:
    """Say which weights are evaluated; a factory model without ``--weights`` is warned of on stderr."""
    _say(args, f"mcdrop report: weights: {args.weights_used}")
    if args.weights_used == _NO_WEIGHTS:
        print(
            f"mcdrop report: warning: no --weights given for {args.model}: evaluating the weights its factory "
            "builds (random initialisation unless the factory loads trained ones)",
            file=sys.stderr,
            flush=True,
        )


def _print_summary(args: argparse.Namespace, report: Any) -> None:
    """The summary table (metric, value, bootstrap interval) on stdout, unless ``--quiet``."""
    if not args.quiet:
        print(_summary_text(report.summary), flush=True)


def _summary_text(summary: Any) -> str:
    """A report's summary as a plain-text table (4 significant digits).

    Columns: the metric, its MC dropout value and bootstrap interval, and, with a baseline, the
    value with dropout off (the ``deterministic`` column of the summary).
    """
    import math

    def number(value: Any) -> str:
        value = float(value)
        if math.isnan(value):
            return "nan"
        return f"{int(value)}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"

    baseline = "deterministic" in summary.columns
    header = ("metric", "MC dropout", "interval (bootstrap)", *(("dropout off",) if baseline else ()))
    rows = []
    for _, row in summary.iterrows():
        low, high = float(row.get("ci_low", math.nan)), float(row.get("ci_high", math.nan))
        cells = [
            str(row["metric"]),
            number(row["value"]),
            "" if math.isnan(low) else f"[{number(low)}, {number(high)}]",
        ]
        if baseline:
            off = float(row["deterministic"])
            cells.append("" if math.isnan(off) else number(off))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    align = ["<", ">", "<", ">"]
    return "\n".join(
        "  ".join(f"{cell:{align[i]}{widths[i]}}" for i, cell in enumerate(cells)).rstrip()
        for cells in [header, *rows]
    )


@contextlib.contextmanager
def _model_errors(x: Any, source: str) -> Iterator[None]:
    """Turn a failure of the model's forward pass on ``x`` (from file ``source``) into a one-line CliError.

    mcdrop's own errors already say what was wrong and pass through, as do torch.distributed's.
    """
    import torch

    from mcdrop.errors import McdropError

    try:
        yield
    except McdropError:
        raise
    except Exception as err:  # noqa: BLE001 - the model is the user's code; any failure is theirs
        if isinstance(err, getattr(torch.distributed, "DistError", ())):  # absent from some builds
            raise
        raise CliError(
            f"the model failed on inputs of shape {tuple(x.shape)} from {source}: {_first_line(err)}"
        ) from None


def _build_report(args: argparse.Namespace, pred: Any, ood: Any, mc: Any) -> Any:
    """``mcdrop.report`` of the prediction, with ``--output`` checked against what the model gave."""
    import mcdrop

    if isinstance(pred, mcdrop.RegressionPrediction):
        mean = pred.mean
        if mean.dim() > 2:
            raise CliError(
                f"the model gives an output of shape {tuple(mean.shape[1:])} per input (mean of shape "
                f"{tuple(mean.shape)}), and a report covers one number per input, or a few with --output J: "
                "give --model a factory (package.module:factory) whose model returns (n,) or (n, d), e.g. "
                "its outputs flattened or reduced"
            )
        d = 1 if mean.dim() == 1 else mean.shape[1]
        if args.output is None and d > 1:
            raise CliError(_several_outputs_message(args, pred, d))
        if args.output is not None and args.output >= d:
            raise CliError(f"--output {args.output} is out of range: the model gives {d} output(s) per input")
    elif args.output is not None:
        raise CliError(
            f"--output applies to regression models with several outputs; this is a {type(pred).__name__} "
            "(pass --task regression if the model is a regressor)"
        )
    title = args.title or f"mcdrop report: {args.model} on {args.data}"
    if args.output is not None:
        title += f" (output {args.output})"
    return mcdrop.report(
        pred,
        ood=None if ood is None else {Path(args.ood).name: ood},
        title=title,
        model=mc,
        output=args.output,
        n_bins=args.n_bins,
        baseline=pred.deterministic,
        metadata=_metadata(args),
    )


def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    """What the report records of the command: its inputs (absolute paths) and the weights evaluated."""

    def where(text: str | None) -> str | None:
        return None if text is None else str(Path(text).resolve())

    model = where(args.model) if Path(args.model).exists() else args.model
    facts = {
        "command": "mcdrop report",
        "model": model,
        "weights": args.weights_used,
        "data": where(args.data),
        "ood": where(args.ood),
        "task": args.task,
        "output": args.output,
        "baseline": args.baseline,
    }
    return {key: value for key, value in facts.items() if value is not None}


def _several_outputs_message(args: argparse.Namespace, pred: Any, d: int) -> str:
    """Why a regression report of ``d > 1`` outputs per input needs a choice, and which one fits.

    With one target per input (shape ``(n,)`` or ``(n, 1)``), ``d`` outputs are most likely the
    scores of ``d`` classes: ``--task classification``. Only targets with ``d`` columns make a
    regressor of ``d`` outputs plausible, and then ``--output J`` picks the one to report.
    """
    targets = pred.targets
    shape = tuple(pred.mean.shape)
    if targets is not None and targets.dim() == 2 and targets.shape[1] == d:
        return (
            f"the model gives {d} outputs per input (mean of shape {shape}) and the targets have {d} columns: "
            f"a report covers one output, so choose it with --output J (0 <= J < {d}), one report per output "
            "(or, if the outputs are class scores, pass --task classification)"
        )
    given = "--task regression" if args.task == "regression" else "regression (--task auto)"
    got = "no targets" if targets is None else f"targets of shape {tuple(targets.shape)}"
    return (
        f"the model gives {d} outputs per input (mean of shape {shape}) and the data have {got}: with one "
        f"target per input these look like the scores of {d} classes, read as {given}; pass --task "
        f"classification. --output J (0 <= J < {d}) is for a regressor of {d} targets, with targets of "
        f"shape (n, {d})"
    )


def _report_distributed(args: argparse.Namespace, out: Path) -> int:
    """``mcdrop report`` under ``torchrun``: each rank evaluates its shard, rank 0 writes the report.

    The process group comes from torchrun's environment (``gloo`` for ``--device cpu``, ``nccl`` for
    CUDA, where rank r uses ``cuda:LOCAL_RANK``); the data are sharded with ``DistributedSampler`` and
    the per-input rows gathered to rank 0 in data-set order (:mod:`mcdrop.distributed`).
    """
    import torch

    import mcdrop
    from mcdrop import distributed

    with distributed.process_group(device=args.device) as world:
        rank = distributed.get_rank()
        if torch.device(args.device).type == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process
        if rank != 0:
            args.quiet = True
        model = _load_model(args)
        x, y = _load_data(args.data, args, need_target=True)
        x_ood = None
        if args.ood:
            x_ood, _ = _load_data(args.ood, args, need_target=False)
            if x_ood.shape[1:] != x.shape[1:]:
                raise CliError(
                    f"--ood inputs have shape {tuple(x_ood.shape[1:])} per row; --data has {tuple(x.shape[1:])}"
                )
        mc = mcdrop.MCDropout(model, task=args.task, seed=args.seed, **_sampling(args))
        _say(args, f"mcdrop report: evaluating {len(x)} inputs on {world} processes ...")
        dataset = torch.utils.data.TensorDataset(x, y)
        with _model_errors(x, args.data):
            loader = distributed.shard_loader(dataset, batch_size=args.batch_size)
            pred = distributed.predict_loader(mc, loader, progress=not args.quiet)
        ood = None
        if x_ood is not None:
            with _model_errors(x_ood, args.ood):
                ood_loader = distributed.shard_loader(
                    torch.utils.data.TensorDataset(x_ood), batch_size=args.batch_size
                )
                ood = distributed.predict_loader(mc, ood_loader, progress=False)
        if rank == 0:
            if args.baseline:  # one dropout-off pass over the data, on rank 0: cheap beside the MC passes
                with _model_errors(x, args.data):
                    pred.deterministic = _predict_in_batches(mc, x, args, mc_passes=False)
                    pred.deterministic.targets = pred.targets
                if ood is not None:
                    with _model_errors(x_ood, args.ood):
                        ood.deterministic = _predict_in_batches(mc, x_ood, args, mc_passes=False)
            report = _build_report(args, pred, ood, mc)
            _say_weights(args)
            _print_summary(args, report)
            report.save(out, overwrite=args.force)
            _say(args, f"mcdrop report: written to {out.resolve()} ({world} processes)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
