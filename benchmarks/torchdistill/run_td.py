"""The torchdistill side of benchmarks/bench_torchdistill.py: one KD training with torchdistill.

Runs in the torchdistill venv, in a work folder that holds fashion_mnist.pt and teacher.pt (see
fmnist_kd.yaml). The steps are those of torchdistill's example script
(examples/torchvision/image_classification.py: load_yaml_file, import_dependencies, models from
the registry with load_ckpt, get_distillation_box, then per epoch pre_epoch_process, a
forward_process + post_forward_process per batch, post_epoch_process), minus its per-step
MetricLogger and its per-epoch validation. Writes one JSON file (--result):
epoch_images_per_s (train images / seconds of each epoch's batch loop, data loading included,
as the runner measures), the teacher's test acc1 (checks the runner's weights arrived), the
student's val/test acc1 after the last epoch (checks the job trained), and the versions.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torchdistill
import torchvision
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.datasets.util import build_data_loader
from torchdistill.misc.log import set_basic_log_config
from torchdistill.models.registry import get_model


def load_model(model_config: dict, device: torch.device) -> torch.nn.Module:
    """As the example script's load_model: from the registry, then its src_ckpt (strict)."""
    model = get_model(model_config["key"], **model_config["kwargs"])
    load_ckpt(model_config.get("src_ckpt"), model=model, strict=True)
    return model.to(device)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, loader, channels_last: bool) -> float:
    """Top-1 accuracy in percent (the runner's unit)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--result", required=True, help="JSON file to write")
    ap.add_argument("--epochs", type=int, help="replaces train.num_epochs")
    ap.add_argument("--batch", type=int, help="replaces the training batch size")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    ap.add_argument("--channels-last", action="store_true",
                    help="teacher, student and batches in NHWC (the runner's channels_last)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    set_basic_log_config()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    config = yaml_util.load_yaml_file(args.config)
    import_dependencies(config.get("dependencies"))
    train_config = config["train"]
    if args.epochs is not None:
        train_config["num_epochs"] = args.epochs
    if args.batch is not None:
        train_config["train_data_loader"]["kwargs"]["batch_size"] = args.batch
    device = torch.device("cpu")
    models = config["models"]
    teacher = load_model(models["teacher_model"], device)
    student = load_model(models["student_model"], device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher.to(memory_format=fmt)
    student.to(memory_format=fmt)
    box = get_distillation_box(teacher, student, config["datasets"], train_config, device,
                               None, False, 1)
    # torchdistill leaves the teacher's mode to the script (its example leaves a freshly built
    # teacher in train mode: BatchNorm on batch statistics). A frozen KD teacher predicts in
    # eval mode, as the runner's does, so the two frameworks run the same computation.
    box.teacher_model.eval()

    epoch_ips = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        images = 0
        t0 = time.perf_counter()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch = sample_batch.contiguous(memory_format=fmt)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            images += len(targets)
        epoch_ips.append(images / (time.perf_counter() - t0))
        box.post_epoch_process()
        if box.teacher_model.training:
            raise RuntimeError("torchdistill put the teacher in train mode")

    datasets = config["datasets"]
    test_loader = build_data_loader(datasets[config["test"]["test_data_loader"]["dataset_id"]],
                                    config["test"]["test_data_loader"], False)
    result = {
        "epoch_images_per_s": epoch_ips,
        "images_per_epoch": images,
        "teacher_test_acc1": accuracy(box.teacher_model, test_loader, args.channels_last),
        "student_val_acc1": accuracy(box.student_model, box.val_data_loader, args.channels_last),
        "student_test_acc1": accuracy(box.student_model, test_loader, args.channels_last),
        "final_loss": float(loss),
        "threads": torch.get_num_threads(),
        "versions": {"torchdistill": torchdistill.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
    }
    with open(args.result, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
