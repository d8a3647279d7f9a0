"""gradsift: select fine-tuning samples by per-sample gradient norm to keep a model's safety alignment.

The package imports only its light core here; the axolotl and TRL integrations load when they are imported.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradsift")
except PackageNotFoundError:  # a source checkout on PYTHONPATH
    __version__ = "0.0.0+source"

from gradsift.config import DataConfig, GradSiftConfig, ScoringConfig, SelectionConfig  # noqa: E402

__all__ = ["DataConfig", "GradSiftConfig", "ScoringConfig", "SelectionConfig", "__version__"]
