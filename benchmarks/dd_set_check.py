"""Is it the set or the evaluation? One protocol network trained on a distilled set with HARD
labels, and (with --teacher) one on the teacher's soft labels, tested on the source's test split,
with the histogram of what each predicts (a network that predicts one class says "chance" louder
than its accuracy does).

    python benchmarks/dd_set_check.py <run>/distilled.pt --teacher <store>/teachers/<key>/checkpoints/best.pt
        [--root data] [--width 32] [--depth 3] [--epochs 300] [--dsa color_crop_cutout_scale_rotate]

Used for benchmarks/results/dd_mnist.md (SRe2L at 100 recover updates trained its networks to chance).
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from distill_cli.data.distilled import load, read_distilled
from distill_cli.tasks.dataset_distill.protocol import Evaluator, Protocol
from distill_cli.teachers.load import frozen_from_checkpoint


def frozen_teacher(path: str, data) -> torch.nn.Module:
    """The store checkpoint's model, through the runner's own loader (its checks included)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a store checkpoint: ours
    return frozen_from_checkpoint(OmegaConf.create(ckpt["model_config"]), ckpt, data, "cpu",
                                  "--teacher")


def test_predictions(net: torch.nn.Module, split, classes: int) -> tuple[float, list[int], int]:
    net.eval()
    preds, right, seen = [], 0, 0
    with torch.no_grad():
        for batch in split.eval_batches(1000):
            p = net(batch.x).argmax(1)
            preds.append(p)
            right += int((p == batch.y).sum())
            seen += len(batch.y)
    return 100.0 * right / seen, torch.bincount(torch.cat(preds), minlength=classes).tolist(), seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--teacher")
    ap.add_argument("--root")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--dsa", default="color_crop_cutout_scale_rotate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    obj = read_distilled(args.set)
    data = load(args.set, root=args.root)
    images, labels = obj["images"], obj["labels"]
    shape = tuple(images.shape[1:])
    net = dict(arch="convnet", width=args.width, depth=args.depth, norm="instancenorm",
               act="relu", pool="avgpool")
    modes = [("hard labels", None, {})]
    if args.teacher:
        teacher = frozen_teacher(args.teacher, data)
        acc, _, _ = test_predictions(teacher, data.test, obj["num_classes"])
        print(f"teacher: test {acc:.2f}; on the set {teacher(images).argmax(1).tolist()} "
              f"(labels {labels.tolist()})")
        modes.append(("soft labels (T 20, AdamW 1e-3)", teacher,
                      dict(temperature=20.0, lr=1e-3, weight_decay=0.01)))
    for name, teacher, relabel in modes:
        protocol = Protocol(net=net, epochs=args.epochs, dsa_strategy=args.dsa, relabel=relabel)
        model = Evaluator(protocol, shape, obj["num_classes"], args.seed).train_one(
            images.clone(), labels.clone(), 0, None, teacher)
        acc, hist, seen = test_predictions(model, data.test, obj["num_classes"])
        print(f"{name}: test {acc:.2f} over {seen} images; predicted per class {hist}", flush=True)


if __name__ == "__main__":
    main()
