"""Is it the set or the evaluation? One protocol network trained on a distilled set with HARD
labels, and (with --teacher) one on the teacher's soft labels, tested on the source's test split,
with the histogram of what each predicts (a network that predicts one class says "chance" louder
than its accuracy does).

    python benchmarks/dd_set_check.py <run>/distilled.pt --teacher <store>/teachers/<key>/checkpoints/best.pt
        [--root data] [--epochs 300] [--dsa color_crop_cutout_scale_rotate] [--seed 0]

The evaluation protocol (network, epochs, augmentation, soft-label settings) and the seed are the
run's own (`task.eval` in the set's `<run>/.hydra/config.yaml`); a set without its run falls back
to the protocol's defaults with the CPU tables' ConvNet-3 width 32 and the MNIST DSA strategy (no
flip). The flags override either.

Used for benchmarks/results/dd_mnist.md (SRe2L at 100 recover updates trained its networks to chance).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

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


CPU_TABLE_NET = dict(arch="convnet", width=32, depth=3, norm="instancenorm", act="relu",
                     pool="avgpool")


def run_protocol(set_path: str) -> tuple[Protocol, int]:
    """The protocol and seed the set's run evaluated with (its composed Hydra config)."""
    config = Path(set_path).parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return Protocol(net=dict(CPU_TABLE_NET), dsa_strategy="color_crop_cutout_scale_rotate"), 0
    cfg = OmegaConf.load(config)
    eval_node = cfg.task.eval
    return Protocol.from_node(eval_node, OmegaConf.to_container(eval_node.net, resolve=True)), \
        int(cfg.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("--teacher")
    ap.add_argument("--root")
    ap.add_argument("--epochs", type=int, help="default: the run's task.eval.epochs")
    ap.add_argument("--dsa", help="default: the run's task.eval.dsa_strategy")
    ap.add_argument("--seed", type=int, help="default: the run's seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    protocol, seed = run_protocol(args.set)
    if args.epochs is not None:
        protocol = dataclasses.replace(protocol, epochs=args.epochs)
    if args.dsa is not None:
        protocol = dataclasses.replace(protocol, dsa_strategy=args.dsa)
    seed = seed if args.seed is None else args.seed
    obj = read_distilled(args.set)
    data = load(args.set, root=args.root)
    images, labels = obj["images"], obj["labels"]
    shape = tuple(images.shape[1:])
    lr = obj.get("lr") if protocol.use_learned_lr else None   # MTT's learned step size
    modes = [("hard labels", None)]
    if args.teacher:
        teacher = frozen_teacher(args.teacher, data)
        acc, _, _ = test_predictions(teacher, data.test, obj["num_classes"])
        print(f"teacher: test {acc:.2f}; on the set {teacher(images).argmax(1).tolist()} "
              f"(labels {labels.tolist()})")
        modes.append((f"soft labels {protocol.relabel or '(defaults)'}", teacher))
    print(f"protocol: {protocol.net}, {protocol.epochs} epochs, dsa {protocol.dsa_strategy!r}, "
          f"seed {seed}")
    for name, teacher in modes:
        model = Evaluator(protocol, shape, obj["num_classes"], seed).train_one(
            images.clone(), labels.clone(), 0, lr, teacher)
        acc, hist, seen = test_predictions(model, data.test, obj["num_classes"])
        print(f"{name}: test {acc:.2f} over {seen} images; predicted per class {hist}", flush=True)


if __name__ == "__main__":
    main()
