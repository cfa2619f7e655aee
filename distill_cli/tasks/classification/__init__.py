"""Classification distillation: (x, y) batches, class logits, accuracy/NLL/ECE/agreement."""
from distill_cli.tasks.classification.task import ClassificationTask

__all__ = ["ClassificationTask"]
