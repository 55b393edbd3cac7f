"""An lt-posttrain plugin: ``LabelSmoothingSFT`` (``--model label_smoothing``) and ``AlpacaFormat`` (``type:
alpaca``)."""

from lt_posttrain_example.alpaca import AlpacaFormat
from lt_posttrain_example.trainer import LabelSmoothingSFT

__all__ = ["AlpacaFormat", "LabelSmoothingSFT"]
