"""The ``mcdrop`` command: ``mcdrop demo`` and ``mcdrop report``.

Bad input (a missing file, an unreadable model, wrong columns, mismatched shapes) exits with code 2
and one clear message on stderr, never a traceback.

Loading a model is a trust boundary. A ``--weights`` state dict and ``.pt`` data files are read with
``torch.load(weights_only=True)``, which cannot run code. Whatever runs code from outside (importing
the module of a ``package.module:factory`` model; loading a TorchScript file, whose program is the
model and whose loader a crafted file can make execute arbitrary code) needs ``--trust-code``.
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
    demo.add_argument("--n-samples", type=int, default=100, help="MC passes per input (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="overwrite an existing report folder")
    demo.add_argument("--quiet", action="store_true", help="no progress output")

    rep = sub.add_parser("report", help="evaluate a saved model on a data file and write its report")
    rep.add_argument("--model", required=True, help="TorchScript file (.pt), or package.module:factory")
    rep.add_argument("--weights", help="state-dict file for a package.module:factory model")
    rep.add_argument(
        "--trust-code",
        action="store_true",
        help="allow running code from --model: loading a TorchScript file or importing the factory's module",
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
    rep.add_argument("--n-samples", type=int, default=50, help="MC passes per input (default: %(default)s)")
    rep.add_argument("--batch-size", type=int, default=256)
    rep.add_argument("--device", default="cpu", help="where to evaluate, e.g. cpu or cuda:0 (default: cpu)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--out", default="mcdrop-report", help="report folder (default: %(default)s)")
    rep.add_argument("--force", action="store_true", help="overwrite an existing report folder")
    rep.add_argument("--quiet", action="store_true", help="no progress output")
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
    ],
}


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse out-of-range numeric options up front, before any training, loading or writing."""
    for option, attr, low, high in _NUMBER_OPTIONS[args.command]:
        value = getattr(args, attr)
        if value is None:
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
    mc = mcdrop.MCDropout(model, n_samples=args.n_samples, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=256
    )
    pred = mc.predict_loader(loader, progress=False)  # about a second: no bar needed
    ood = mc.predict(data.x_ood)
    report = mcdrop.report(pred, ood=ood, title="mcdrop demo: dropout MLP on scikit-learn digits", model=mc)
    if not args.quiet:
        print(report.summary[["metric", "value"]].to_string(index=False))
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


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    spec = args.model
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript") or path.exists():
        if not path.exists():
            raise CliError(f"model file {spec} not found")
        if not args.trust_code:
            raise CliError(
                f"--model {spec} is loaded as a TorchScript file, which runs code from the file (the model's "
                "program, and torch.jit.load can be made to execute arbitrary code by a crafted file); pass "
                "--trust-code if you trust where it came from, or give package.module:factory with --weights "
                "(a state dict, read with torch.load(weights_only=True))"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is still what users have
                return torch.jit.load(str(path), map_location=args.device)
        except Exception as err:  # noqa: BLE001 - any failure here means "not a TorchScript file"
            raise CliError(
                f"could not load {spec} as a TorchScript model ({_first_line(err)}). Save it with "
                "torch.jit.save(torch.jit.script(model), path), or give package.module:factory with --weights"
            ) from None
    if ":" not in spec:
        raise CliError(f"--model {spec!r} is neither an existing file nor of the form package.module:factory")
    if not args.trust_code:
        raise CliError(
            f"--model {spec} imports and runs Python code from module {spec.split(':')[0]!r}; pass --trust-code "
            "if you trust it"
        )
    module_name, factory_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CliError(f"cannot import module {module_name!r}: {err}") from None
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
    if args.weights:
        wpath = Path(args.weights)
        if not wpath.exists():
            raise CliError(f"weights file {wpath} not found")
        try:
            state = _load_tensors(wpath, args.device)
            model.load_state_dict(state)
        except Exception as err:  # noqa: BLE001
            raise CliError(f"could not load weights {wpath}: {_first_line(err)}{_SAFE_LOAD_HINT}") from None
    return model.to(args.device).eval()


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
    mc = mcdrop.MCDropout(model, n_samples=args.n_samples, task=args.task, seed=args.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size)
    with _model_errors(x, args.data):
        pred = mc.predict_loader(loader, progress=not args.quiet)
    ood = None
    if args.ood:
        x_ood, _ = _load_data(args.ood, args, need_target=False)
        if x_ood.shape[1:] != x.shape[1:]:
            raise CliError(
                f"--ood inputs have shape {tuple(x_ood.shape[1:])} per row; --data has {tuple(x.shape[1:])}"
            )
        with _model_errors(x_ood, args.ood):
            ood = mcdrop.concat_predictions(
                [mc.predict(x_ood[i : i + args.batch_size]) for i in range(0, len(x_ood), args.batch_size)]
            )
    report = _build_report(args, pred, ood, mc)
    report.save(out, overwrite=args.force)
    _say(args, f"mcdrop report: written to {out.resolve()}")
    return 0


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
            raise CliError(
                f"the model gives {d} outputs per input (mean of shape {tuple(mean.shape)}) and a report covers "
                f"one: choose it with --output J (0 <= J < {d}), one report per output"
            )
        if args.output is not None and args.output >= d:
            raise CliError(f"--output {args.output} is out of range: the model gives {d} output(s) per input")
    elif args.output is not None:
        raise CliError(
            f"--output applies to regression models with several outputs; this is a {type(pred).__name__} "
            "(pass --task regression if the model is a regressor)"
        )
    title = f"mcdrop report: {args.model} on {args.data}"
    if args.output is not None:
        title += f" (output {args.output})"
    return mcdrop.report(pred, ood=ood, title=title, model=mc, output=args.output)


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
        mc = mcdrop.MCDropout(model, n_samples=args.n_samples, task=args.task, seed=args.seed)
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
            report = _build_report(args, pred, ood, mc)
            report.save(out, overwrite=args.force)
            _say(args, f"mcdrop report: written to {out.resolve()} ({world} processes)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
