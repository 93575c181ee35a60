"""The tasks: semantic, instance and panoptic segmentation, one :class:`~pixelwise.tasks.base.Task`
object each, registered by name. Everything that differs between them (data, loss step,
evaluator, prediction result, drawing, report sections) is in that task's module:

- :mod:`pixelwise.tasks.semantic`: FCN, SegNet, U-Net, PSPNet, DeepLab (confusion-matrix metrics);
- :mod:`pixelwise.tasks.instance`: Mask R-CNN (COCO mask / box AP);
- :mod:`pixelwise.tasks.panoptic`: Panoptic FPN (PQ, the things' mask AP).

A model's registry entry (:class:`pixelwise.models.registry.ModelInfo`) names its task; the
models layer sits below this one, so the name is resolved here (:func:`task_for_model`).
"""
from __future__ import annotations

from typing import Any

from pixelwise.errors import PixelwiseError
from pixelwise.tasks.base import Evaluator, Task
from pixelwise.tasks.instance import InstanceTask
from pixelwise.tasks.panoptic import PanopticTask
from pixelwise.tasks.semantic import SemanticTask

__all__ = ["Task", "Evaluator", "TASKS", "get_task", "task_for_model", "task_of_checkpoint", "register_task"]

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` under ``task.name``."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


for _task in (SemanticTask(), InstanceTask(), PanopticTask()):
    register_task(_task)


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise PixelwiseError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_for_model(model_name: str) -> Task:
    """The task of a registered model (its registry entry's ``task``)."""
    from pixelwise.models.registry import model_info

    return get_task(model_info(model_name).task)


def task_of_checkpoint(ckpt: dict[str, Any]) -> Task:
    """The task a checkpoint was trained for (``task`` entry; old checkpoints: semantic)."""
    return get_task(str(ckpt.get("task", "semantic")))
