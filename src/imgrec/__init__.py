"""imgrec: train, evaluate, explain and serve image classifiers.

The small public API:
    imgrec.train("mnist")                      -> TrainResult (.bundle)
    imgrec.evaluate("runs/mnist", "mnist")     -> EvalReport
    imgrec.Predictor.load("imagenet").predict(["cat.jpg"])
    imgrec.load("runs/mnist")                  -> Bundle (metadata; torch-free)
    imgrec.audit("data/pets")                  -> LabelAudit (label issues, near duplicates,
                                                  outliers; .records)
    imgrec.tune("photos/", model="efficientnet_lite0", trials=20) -> TuneSummary
"""

from __future__ import annotations

from ._version import __version__

__all__ = ["__version__", "load", "train", "tune", "evaluate", "audit", "Predictor"]


def load(model=None):
    """A bundle's metadata from a folder or a pretrained name (torch-free)."""
    from .zoo import open_bundle

    return open_bundle(model)


def train(data, **options):
    """Train a classifier: `imgrec.train("mnist")`, or `imgrec.train((x, y), model=net,
    callbacks=[cb], epochs=5)`; see imgrec.training.api.train."""
    from .training.api import train as _train

    return _train(data, **options)


def tune(data, **options):
    """Search training options with Optuna: `imgrec.tune("mnist", trials=12, subset=10000)`;
    see imgrec.tuning.api.tune."""
    from .training.api import kept_random_state
    from .tuning.api import tune as _tune

    with kept_random_state():  # its trials seed the global generators, as train's runs do
        return _tune(data, **options)


def evaluate(model, data, split: str = "test", **options):
    from .evaluation import evaluate_bundle

    return evaluate_bundle(model, data, split, **options)


def audit(data, model=None, **options):
    """Audit a folder dataset's labels: likely label errors (cleanlab on cross-validated
    probabilities), near duplicates and outliers; see imgrec.label_audit.audit."""
    from .label_audit import audit as _audit

    return _audit(data, model, **options)


def __getattr__(name: str):
    if name == "Predictor":
        from .predict import Predictor

        return Predictor
    raise AttributeError(name)
