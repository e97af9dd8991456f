"""Training: a frozen RunPlan (plan.py) from TrainConfig (config.py), one runner per mode
(runners.py) around one epoch loop (engine.py), hooks for everything else (callbacks.py).
Import the submodules; this package imports nothing (the CLI reads config.py alone)."""
