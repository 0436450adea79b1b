"""Tasks (bundled real datasets, local files, hub datasets) and federated client partitions."""

from fedtt.data.partition import KINDS, label_histograms, partition
from fedtt.data.tasks import BUNDLED_TASKS, TaskData, load_task

__all__ = ["BUNDLED_TASKS", "KINDS", "TaskData", "label_histograms", "load_task", "partition"]
