"""An lt-posttrain plugin: ``LabelSmoothingSFT`` (``--model label_smoothing``) and ``AlpacaSourceType`` (``type:
alpaca``)."""

from lt_posttrain_example.alpaca import AlpacaSourceType
from lt_posttrain_example.trainer import LabelSmoothingSFT

__all__ = ["AlpacaSourceType", "LabelSmoothingSFT"]
