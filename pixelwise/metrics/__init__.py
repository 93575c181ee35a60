"""Metrics: semantic confusion matrix (FCN §5) and box IoU."""
from pixelwise.metrics.boxes import box_iou
from pixelwise.metrics.semantic import ConfusionMatrix

__all__ = ["ConfusionMatrix", "box_iou"]
