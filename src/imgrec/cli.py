"""The `imgrec` command line: parses, calls the Python API, prints. Errors a user can cause
print one line and exit with status 2; nothing prints a traceback."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer

from .errors import ImgrecError

app = typer.Typer(
    name="imgrec",
    help="Train, evaluate, explain and serve image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Mode(str, Enum):
    scratch = "scratch"
    features = "features"
    finetune = "finetune"


class Invert(str, Enum):
    auto = "auto"
    yes = "yes"
    no = "no"


class Optimizer(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    rmsprop = "rmsprop"


class ClassWeights(str, Enum):
    auto = "auto"
    balanced = "balanced"
    none = "none"


def _echo(msg: str = "") -> None:
    print(msg, flush=True)


@app.command()
def train(
    data: Annotated[str, typer.Argument(help="mnist, fashion-mnist, cifar10, a folder or a CSV")],
    model: Annotated[str | None, typer.Option(help="registry or timm name (default: the "
                                              "dataset's recipe); see `imgrec models`")] = None,
    mode: Annotated[Mode, typer.Option(help="scratch: train all weights from random init")] =
    Mode.scratch,
    epochs: Annotated[int | None, typer.Option(min=1, help="epochs (default: recipe)")] = None,
    image_size: Annotated[int | None, typer.Option(min=8, max=1024,
                                                   help="input side in pixels")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    augment: Annotated[str | None, typer.Option(
        help="preset (none, flip, light, digits, standard, strong) and/or key=value list: "
             "rotation=DEG, shift=F, width_shift=F, height_shift=F, zoom=F, flip, brightness=F; "
             "e.g. 'standard,zoom=0.3'")] = None,
    out: Annotated[Path | None, typer.Option(help="bundle folder (default runs/DATA-MODEL)")] = None,
    seed: Annotated[int, typer.Option(help="seed for splits, init and shuffling")] = 0,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (one-cycle)")] = None,
    optimizer: Annotated[Optimizer | None, typer.Option()] = None,
    weight_decay: Annotated[float | None, typer.Option(min=0.0)] = None,
    label_smoothing: Annotated[float | None, typer.Option(min=0.0, max=0.99)] = None,
    patience: Annotated[int | None, typer.Option(min=0, help="early-stop patience in epochs "
                                                 "(0: off); the best epoch is restored")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=0.89, help="validation share carved from train when there is none")] = None,
    class_weights: Annotated[ClassWeights, typer.Option(
        help="auto: balance the loss when classes are imbalanced")] = ClassWeights.auto,
    invert: Annotated[Invert | None, typer.Option(
        help="recorded in the contract: invert dark-on-light inputs (MNIST-style)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its checkpoint")] =
    False,
    data_dir: Annotated[Path | None, typer.Option(help="root of built-in datasets "
                                                  "(else $IMGREC_DATA)")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="image decoding processes")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best)")] =
    None,
    tensorboard: Annotated[bool, typer.Option(help="write TensorBoard scalars")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
) -> None:
    """Train a classifier and write a bundle.

    Example: imgrec train mnist --out runs/mnist
    """
    from .train.loop import TrainConfig, Trainer

    cfg = TrainConfig(
        data=data, model=model, mode=mode.value, epochs=epochs, image_size=image_size,
        batch_size=batch_size, augment=augment, out=str(out) if out else None, seed=seed, lr=lr,
        optimizer=optimizer.value if optimizer else None, weight_decay=weight_decay,
        label_smoothing=label_smoothing, patience=patience, val_fraction=val_fraction,
        class_weights=class_weights.value, invert=invert.value if invert else None,
        resume=resume, data_dir=str(data_dir) if data_dir else None, workers=workers,
        device=device, quiet=quiet or json_out, tensorboard=tensorboard,
    )
    result = Trainer(cfg).run()
    summary = {"bundle": str(result.bundle.path), "seconds": round(result.seconds, 1),
               "epochs_run": len(result.history), "history": result.history,
               "test": result.test_metrics and {k: result.test_metrics[k]
                                                for k in ("accuracy", "top5_accuracy", "n")},
               "skipped": result.skipped, "interrupted": result.interrupted}
    if json_out:
        _echo(json.dumps(summary, indent=2))
    else:
        _echo(f"bundle  {result.bundle.path}  ({result.seconds:.1f}s)")
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="bundle folder or pretrained name")],
    data: Annotated[str, typer.Argument(help="dataset: built-in name, folder or CSV")],
    split: Annotated[str, typer.Option(help="train, val or test (test falls back to val)")] =
    "test",
    json_file: Annotated[Path | None, typer.Option("--json", help="write metrics JSON here")] =
    None,
    report: Annotated[Path | None, typer.Option(help="folder for the confusion-matrix PNG "
                                                "(default: the bundle's evaluation/ folder)")] =
    None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    engine: Annotated[str, typer.Option(help="auto, onnx or torch")] = "auto",
    mistakes: Annotated[int, typer.Option(min=0, help="how many confident mistakes to list")] =
    10,
) -> None:
    """Measure a bundle on a dataset split: accuracy, top-5, per-class metrics, confusion
    matrix (table and PNG) and the most confident mistakes.

    Example: imgrec evaluate runs/mnist mnist --json metrics.json
    """
    from .evaluate import evaluate_bundle
    from .zoo import open_bundle

    bundle = open_bundle(model, need_weights=engine == "torch")
    rep = evaluate_bundle(bundle, data, split, data_dir=str(data_dir) if data_dir else None,
                          engine=engine)
    _echo(f"{rep.dataset} {rep.split}: accuracy {rep.accuracy:.4f}" +
          (f"  top-5 {rep.top5_accuracy:.4f}" if rep.top5_accuracy is not None else "") +
          f"  (n={rep.n})")
    _echo()
    _echo(rep.table())
    wrong = rep.mistakes(mistakes)
    if wrong:
        _echo()
        _echo("most confident mistakes")
        for m in wrong:
            _echo(f"  {m['input']}: {m['true']} predicted as {m['predicted']} "
                  f"({m['probability']:.1%})")
    folder = report or bundle.path / "evaluation" / f"{rep.dataset}-{rep.split}"
    png = rep.plot_confusion(Path(folder) / "confusion_matrix.png")
    _echo(f"\nconfusion matrix: {png}")
    if rep.skipped:
        _echo(f"skipped {len(rep.skipped)} unreadable file(s):")
        for path, reason in rep.skipped.items():
            _echo(f"  {path}: {reason}")
    if json_file:
        rep.write_json(json_file)
        _echo(f"metrics: {json_file}")


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
    engine: Annotated[str, typer.Option(help="auto, onnx or torch")] = "auto",
) -> None:
    """Predict the top-k labels of images with a bundle (default: the offline ImageNet model).

    Example: imgrec predict photos/ --top-k 3 --json
    """
    from .predict import Predictor, expand_inputs, sample_photos

    sources = list(expand_inputs(inputs)) if inputs else sample_photos()
    if not inputs and not json_out:
        _echo("no input given: predicting the sample photos bundled with imgrec")
    predictor = Predictor.load(model, engine=engine)
    results = predictor.predict(sources, top_k=top_k, invert=invert.value if invert else None)
    records = []
    for src, res in zip(sources, results, strict=True):
        if isinstance(res, ImgrecError):
            records.append({"input": src, "error": str(res)})
        else:
            records.append({"input": src, "predictions": [p.to_dict() for p in res]})
    if json_out:
        _echo(json.dumps(records, indent=2))
    else:
        for r in records:
            if "error" in r:
                _echo(f"{r['input']}: error: {r['error']}")
                continue
            preds = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
            _echo(f"{r['input']}: {preds}")
    if all("error" in r for r in records):
        raise typer.Exit(2)


@app.command()
def models() -> None:
    """List the built-in model names (any timm architecture name works too).

    Example: imgrec models
    """
    from .models.registry import describe_models

    for name, summary in describe_models():
        _echo(f"{name:<20} {summary}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the Typer app, turning user errors into one line and exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = command.main(args=args, prog_name="imgrec", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except ImgrecError as e:
        print(f"imgrec: error: {e}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.UsageError as e:
        sub = f" {e.ctx.info_name}" if e.ctx and e.ctx.info_name != "imgrec" else ""
        print(f"imgrec: error: {e.format_message()} (see `imgrec{sub} --help`)", file=sys.stderr)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print("imgrec: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("imgrec: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("imgrec: error: out of memory; lower --batch-size or --image-size", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the user's fault: still one line unless debugging
        if os.environ.get("IMGREC_DEBUG"):
            raise
        print(f"imgrec: internal error: {type(e).__name__}: {e} "
              "(set IMGREC_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
