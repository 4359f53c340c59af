"""ezengine: EfficientZero training, play and evaluation."""

__version__ = "0.1.0"
