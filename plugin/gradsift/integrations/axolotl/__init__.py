"""gradsift as an axolotl plugin: list `gradsift.integrations.axolotl.GradSiftPlugin` under `plugins:`."""

from gradsift.integrations.axolotl.args import AxolotlGradSiftConfig, GradSiftArgs
from gradsift.integrations.axolotl.plugin import GradSiftPlugin

__all__ = ["AxolotlGradSiftConfig", "GradSiftArgs", "GradSiftPlugin"]
