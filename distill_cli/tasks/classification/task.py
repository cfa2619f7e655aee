"""`task=classification`: the runner's original family.

batch           `Batch(index, x, y)`: images or signals, hard labels or (mixed) label
                distributions; augmentation and mixing are pure functions of (seed, epoch, step)
model contract  `model(x) -> [B, C]` logits; `model.stages` names the feature taps
teacher store   the teacher is a student run with `teacher.train.loss` (CE by default)
evaluation      acc1 / acc5 / NLL / ECE, top-1 agreement with the teacher; `best` by val acc1
stored output   one `[C]` logit row per training sample
"""
from __future__ import annotations

from distill_cli.config.build import build_model
from distill_cli.data.mixing import training_batches
from distill_cli.tasks.base import Task
from distill_cli.tasks.classification.columns import REPORT_COLUMNS
from distill_cli.tasks.classification.evaluate import predict, score


class ClassificationTask(Task):
    name = "classification"
    selection_metric = "acc1"
    report_columns = REPORT_COLUMNS

    def build_model(self, node, key: str, data):
        return build_model(node, key, data)

    def train_batches(self, data, batch_size, data_seed, epoch, start_step, mix):
        return training_batches(data.train, batch_size, data_seed, epoch, start_step, mix,
                                data.num_classes)

    def predict(self, model, split, batch_size, device, precision):
        return predict(model, split, batch_size, device, precision)

    def score(self, outputs, targets, reference=None):
        return score(outputs, targets, reference)

    def stored_row_shape(self, data) -> tuple[int, ...]:
        return (data.num_classes,)
