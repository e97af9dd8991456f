"""Default recipes: what `imgrec train DATA` does when the user names nothing else.

Each built-in dataset gets imgrec's fastest accurate recipe (measured by benchmarks/), not
necessarily a workshop model. Explicit options always win over a recipe.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # Measured on 2 CPU cores (benchmarks/mnist_vs_keras.py): ~5 s of training with AMX
    # (bfloat16), the whole process ~7 s. Chosen on a 10% validation split of train, seeds
    # 0-11 (never test), against session 8's recipe (28 px, stem width 32, batch 128, lr 0.02,
    # a 3x3 pooling grid: 99.19-99.21% mean): the centre 24 x 24 crop (MNIST's digits sit in
    # their 20 x 20 box, centred by mass) 99.25% (seeds 0-5) at 18% less time a step; 22 and
    # 20 px no better and slower (odd feature-map sides); batch 256 (lr 0.03/0.04/0.05:
    # 99.23/99.22/99.24%) 15% less a step than 128; stem width 16 99.20% at 25% less than 32.
    # Then, at no cost, grid 6 (the last 6 x 6 map flattened, no pooling): +0.07 points over
    # grid 3 on 23 paired seeds (99.27% against 99.20%, standard error 0.03). Not worth their
    # time: 3 epochs +0.09 points at 1.5x, width 24 +0.07 at 1.5x; no better: lr 0.06, label
    # smoothing 0.2, weight decay 2e-3, shift 0.08, zoom 0.05, batch 384 for 3 epochs. On the
    # whole test set (60,000 training images) seeds 0-5 scored 99.36-99.49% (mean 99.44%)
    # against 99.34-99.45% (99.40%) for session 8's recipe. Earlier, on the pooling stem:
    # lookahead, rotation 8, label smoothing 0.05, test-time shifts no better; without the
    # +-1.2 px shifts test accuracy fell to 99.30-99.38%.
    "mnist": {"model": "fast-cnn", "model_args": {"width": 16, "grid": 6,
                                                  "stem": "space-to-depth", "stem_width": 16},
              "crop": 24, "epochs": 2, "batch_size": 256, "lr": 4e-2, "augment": "shift=0.05",
              "label_smoothing": 0.1, "val_fraction": 0.0, "fused_optimizer": True,
              # custom images (drawings, photos of digits on paper) get MNIST's own framing:
              # 75% -> 99.2% on drawings, 10% -> 99.0% on photographs (digit_drawings.py)
              "fit": "digit", "invert": "auto"},
    # Chosen on a 10% validation split of train (never test), 8 epochs: width 16 93.45% val,
    # width 32 93.71% (mean of seeds 0-3), width 40 93.84% (seeds 0-2, +0.06 on them), width
    # 48 94.03% (seeds 0-3, better on 3 of the 4), 10 epochs 93.80%, 12 epochs no better than
    # 8 (seeds 0, 1), 3x3 grid = 7x7 grid, whole-pixel crops 93.03%. Width 48 costs ~1.4x the
    # whole run of width 32 (88.6 s against 63.2 s on 2 cores with AMX, bf16 autocast).
    "fashion-mnist": {"model": "fast-cnn", "model_args": {"width": 48, "grid": 3}, "epochs": 8,
                      "batch_size": 128, "lr": 2e-2, "augment": "flip", "label_smoothing": 0.1,
                      "val_fraction": 0.0, "tta": "flip",
                      # product photos: inverted, trimmed to the object, fitted to the frame
                      "fit": "object", "invert": "auto"},
    # airnet (models/airbench.py): airbench's lessons sized for a CPU; see benchmarks/cifar10.py.
    # 6 epochs: ~170 CPU-seconds an epoch of 50,000 images, so the whole run fits 15 minutes on
    # 2 cores with margin (measured figure in README's benchmark table).
    "cifar10": {"model": "airnet", "model_args": {"widths": [32, 64, 128]}, "epochs": 6,
                "batch_size": 512, "optimizer": "sgd", "lr": 0.5, "weight_decay": 1.3e-3,
                "augment": "flip,crop=2", "label_smoothing": 0.2, "val_fraction": 0.0,
                "tta": "flip", "lookahead": True},
    # --recipe long: airbench94's own widths and ~10 epochs, for the best accuracy (hours on a
    # laptop's CPU, minutes on a GPU)
    "cifar10-long": {"model": "airnet", "model_args": {"widths": [64, 256, 256]}, "epochs": 10,
                     "batch_size": 512, "optimizer": "sgd", "lr": 0.5, "weight_decay": 1.3e-3,
                     "augment": "flip,crop=2", "label_smoothing": 0.2, "val_fraction": 0.0,
                     "tta": "flip", "lookahead": True},
    "memory": {"model": "fast-cnn", "epochs": 10, "batch_size": 128, "lr": 1e-2,
               "augment": "none", "label_smoothing": 0.1},
    "folder": {"model": "small-cnn", "epochs": 20, "batch_size": 32, "lr": 1e-3,
               "augment": "standard", "label_smoothing": 0.1},
}

GENERIC = {"optimizer": "adamw", "weight_decay": 5e-4, "patience": 5, "val_fraction": 0.1,
           "test_fraction": 0.1}


BUILTIN_RECIPES = ("mnist", "fashion-mnist", "cifar10")

#: datasets whose default is their long recipe where bfloat16 runs fast (a GPU, a CPU with
#: AMX): it still fits the laptop budget there. CIFAR-10 at 50,000 images on 2 cores with
#: AMX: long 534.8-566.6 s (51-54 s an epoch) against 15 minutes; without AMX, in float32, the short
#: recipe alone fits (407.9 s) and long would take over half an hour (benchmarks/cifar10.py)
LONG_WHERE_FAST = ("cifar10",)


#: The training a built-in dataset gives a network other than the one its recipe was tuned
#: for (the workshops' mlp on MNIST, cifar-cnn on CIFAR-10): the recipes' optimisation is
#: their network's (fast-cnn's adamw lr 0.04, airnet's SGD lr 0.5 at batch 512 with
#: lookahead), and on those networks it unlearned (mlp: 91.4% after 1 epoch, 90.2% after 2)
#: or learned nothing (cifar-cnn: 10.0%, chance).
OTHER_NETWORK = {"optimizer": "adamw", "lr": 1e-3, "batch_size": 128, "weight_decay": 5e-4,
                 "label_smoothing": 0.1, "epochs": 10, "val_fraction": 0.1, "patience": 5}
#: what another network keeps of a built-in recipe: how the data is read and augmented
DATA_SETTINGS = ("model", "augment", "tta", "fit", "invert", "test_fraction")


def other_network_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """A built-in recipe's data settings with OTHER_NETWORK's training."""
    return {**GENERIC, **{k: recipe[k] for k in DATA_SETTINGS if k in recipe}, **OTHER_NETWORK}


def recipe_for(key: str) -> dict[str, Any]:
    """The recipe for a built-in dataset name, 'memory' (pixel CSVs) or 'folder'; GENERIC
    alone for anything else (used before the data is loaded)."""
    return {**GENERIC, **RECIPES.get(key, {})}

#: the mlp head's dropout (the workshops' cats-vs-dogs head: Dense 256, dropout 0.5) and
#: finetune's layer-wise lr decay (each block's lr this times the one above; the stem of
#: Lite0 gets ~0.06), where --dropout / --layer-decay are not given
HEAD_DROPOUT = 0.5
LAYER_DECAY = 0.85

#: The transfer modes' defaults where the user gave none. features: the head's epochs, lr and
#: batch on the feature tensor; finetune: the whole network's (after the same head warm-up,
#: which uses the features defaults).
TRANSFER_DEFAULTS: dict[str, dict[str, Any]] = {
    "features": {"epochs": 100, "lr": 1e-3, "batch_size": 256, "patience": 15,
                 "weight_decay": 1e-2, "label_smoothing": 0.1, "augment": "standard"},
    "finetune": {"epochs": 4, "lr": 2e-4, "batch_size": 32, "patience": 2,
                 "weight_decay": 1e-2, "label_smoothing": 0.1, "augment": "light"},
}
