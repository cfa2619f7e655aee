"""`task=dataset_distill`: the student is a small synthetic training set.

batch           real, class-balanced and class-ordered: for each class c, min(batch_real, n_c)
                distinct random training images of c (normalised, no augmentation), a pure
                function of (data_seed, epoch, step); `iterations` steps make an epoch
model contract  the student is a `SyntheticSet` (IPC images per class, + a learnable step size
                for MTT); teachers (SRe2L's classifier) are zoo classifiers
teacher store   a teacher is a CLASSIFICATION run on the real data (`teacher_task`)
evaluation      the field's protocol (protocol.py): `eval.models` fresh networks trained on the
                set, mean ± std of their test accuracy; `val_models` of them select `best`
stored output   none: the methods run their networks themselves
"""
from __future__ import annotations

from pathlib import Path

import torch

from distill_cli.config.build import build_model
from distill_cli.data.augment import normalize
from distill_cli.data.bundle import Batch
from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.tasks.base import Task
from distill_cli.tasks.classification.evaluate import predict as classifier_predict
from distill_cli.tasks.classification.evaluate import score as classifier_score
from distill_cli.tasks.dataset_distill.columns import REPORT_COLUMNS
from distill_cli.tasks.dataset_distill.protocol import Evaluator, Protocol
from distill_cli.tasks.dataset_distill.synthetic import SyntheticSet, class_indices, init_set

STUDENT_ARCH = "synthetic"


class DatasetDistillTask(Task):
    name = "dataset_distill"
    selection_metric = "acc1"
    report_columns = REPORT_COLUMNS

    def __init__(self, iterations: int = 100, batch_real: int = 256, net=None, eval=None,
                 seed: int = 0, teacher_task=None, **_):
        for key, value in (("iterations", iterations), ("batch_real", batch_real)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"task.{key}={value!r} must be a positive integer",
                                f"task.{key}", "Give a whole number >= 1")
        self.iterations, self.batch_real, self.seed = iterations, batch_real, int(seed)
        self.net = dict(net or {"arch": "convnet"})
        self.protocol = Protocol.from_node(eval or {}, self.net)
        self._evaluator: Evaluator | None = None
        self._val = None
        self._pools: tuple[int, list[torch.Tensor]] | None = None
        self.relabel_teacher = None

    # ---------------------------------------------------------------- models
    def build_model(self, node, key, data):
        if key != "student":   # a teacher (SRe2L's classifier) is a zoo classifier
            return build_model(node, key, data)
        if node.get("arch") != STUDENT_ARCH:
            raise UserError(f"task=dataset_distill trains a synthetic set, not the zoo "
                            f"architecture {node.get('arch')!r}", "student",
                            "Use student=synthetic (student.ipc=..., student.init=real|noise); "
                            "the evaluation networks are task.eval.net / task.net")
        self._val = data.val
        self._evaluator = Evaluator(self.protocol, data.input_shape, data.num_classes,
                                    self.seed)
        return init_set(data.train, data.num_classes, int(node.get("ipc", 10)),
                        str(node.get("init", "real")), self.seed)

    def steps_per_epoch(self, data, batch_size: int) -> int:
        return self.iterations

    # ---------------------------------------------------------------- batches
    def train_batches(self, data, batch_size, data_seed, epoch, start_step, mix):
        split = data.train
        if self._pools is None or self._pools[0] != id(split):
            self._pools = (id(split), class_indices(split.targets, data.num_classes))
        pools = self._pools[1]
        for step in range(start_step, self.iterations):
            g = torch.Generator().manual_seed(derive_seed("dd-real", data_seed, epoch, step))
            idx = torch.cat([p[torch.randperm(len(p), generator=g)[:self.batch_real]]
                             for p in pools]).to(split.x.device)
            yield Batch(idx, normalize(split.x.index_select(0, idx), split._mean, split._std),
                        split.y.index_select(0, idx))

    # ---------------------------------------------------------------- evaluation
    def predict(self, model, split, batch_size, device, precision):
        if not isinstance(model, SyntheticSet):
            return classifier_predict(model, split, batch_size, device, precision)
        count = self.protocol.val_models if split is self._val else self.protocol.models
        teacher = getattr(model, "relabel_teacher", None)
        nets = self._evaluator.networks(model, count, teacher)
        outputs = [classifier_predict(net, split, batch_size, device, precision)
                   for net in nets]
        return torch.stack([o for o, _ in outputs]), outputs[0][1]

    def score(self, outputs, targets, reference=None):
        if outputs.dim() == 2:   # one classifier (a teacher)
            return classifier_score(outputs, targets, reference)
        accs = torch.stack([(o.argmax(1) == targets).double().mean() * 100 for o in outputs])
        return {"acc1": float(accs.mean()),
                "acc1_model_std": float(accs.std(unbiased=False)) if len(accs) > 1 else 0.0,
                "models": len(accs), "n": int(targets.numel())}

    def stored_row_shape(self, data):
        return (data.num_classes,)

    # ---------------------------------------------------------------- artifacts
    def artifacts(self, model, run_dir: Path, tag: str, data, logger, source: dict) -> None:
        """The set as a class-by-IPC grid PNG (`grid_<tag>.png`, also to W&B) and, for the
        final sets, a dataset file (`distilled.pt` for best, `distilled_last.pt`) that
        `dataset=distilled dataset.path=...` trains on."""
        from distill_cli.data.distilled import save_distilled
        from distill_cli.evaluation.image_grid import save_grid

        if not isinstance(model, SyntheticSet):
            return
        split = data.train
        images = model.images.detach().float().cpu()
        png = save_grid(Path(run_dir) / f"grid_{tag}.png", images, split.mean, split.std,
                        model.num_classes, model.ipc)
        logger.log_image(f"synthetic/{tag}", png)
        if tag in ("best", "last"):
            name = "distilled.pt" if tag == "best" else "distilled_last.pt"
            save_distilled(Path(run_dir) / name, images, model.labels.cpu(), mean=split.mean,
                           std=split.std, source=source, num_classes=model.num_classes,
                           ipc=model.ipc, lr=model.learned_lr())
