"""The package version, in a module of its own: imgrec/__init__.py reaches the training
API, and modules that record the version must not import that."""

__version__ = "0.1.0"
