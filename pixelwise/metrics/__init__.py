"""Metrics: semantic confusion matrix (FCN §5), box IoU and panoptic quality (PQ)."""
from pixelwise.metrics.boxes import box_iou
from pixelwise.metrics.instance import coco_evaluate
from pixelwise.metrics.panoptic import PQStat, pq_compute, pq_single_image
from pixelwise.metrics.semantic import ConfusionMatrix

__all__ = ["ConfusionMatrix", "coco_evaluate", "PQStat", "box_iou", "pq_compute", "pq_single_image"]
