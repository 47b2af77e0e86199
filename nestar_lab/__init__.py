"""nestar_lab: a plugin-based research sandbox for Nested AutoRegressive image generation."""

__version__ = "0.1.0"
