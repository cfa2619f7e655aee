"""A teacher's weights into a frozen model: from a distill_cli checkpoint (checked against the
dataset first) or torchvision's published weights. Frozen = eval mode, no gradients, never in
an optimizer."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from omegaconf import DictConfig
from torch import nn

from distill_cli.config.build import build_model, model_node
from distill_cli.errors import UserError


def check_compatible(ckpt: dict, arch: DictConfig, data, key: str,
                     any_classes: bool = False) -> None:
    """The checkpoint must hold this architecture, trained for this dataset's classes and this
    very input shape (channels AND size: a conv net with global pooling runs on 28x28 inputs
    after training on 8x8 ones, at chance level) — `any_classes`: another class count is fine
    (a teacher from another task). `ckpt` passed `checkpoint.load`'s structure check."""
    saved_arch = ckpt["model_config"].get("arch")
    if saved_arch != arch.arch:
        raise UserError(f"The checkpoint holds a `{saved_arch}` but teacher={arch.arch} was asked "
                        "for", "teacher", f"Set teacher={saved_arch}, or point "
                        f"`{key}` at a {arch.arch} checkpoint")
    saved = ckpt["data"]
    if saved["num_classes"] != data.num_classes and not any_classes:
        raise UserError(f"The teacher checkpoint was trained for {saved['num_classes']} "
                        f"classes ({saved.get('name')}) but dataset {data.name} has "
                        f"{data.num_classes}", key,
                        "Use a teacher trained on the same dataset (or drop "
                        "teacher.checkpoint to let the teacher store train one)")
    if list(saved["input_shape"]) != list(data.input_shape):
        raise UserError(f"The teacher checkpoint was trained on {saved.get('name')} inputs of "
                        f"shape {list(saved['input_shape'])} but dataset {data.name} gives "
                        f"{list(data.input_shape)}", key,
                        "Use a teacher trained on inputs of the same channels and size (or drop "
                        "teacher.checkpoint to let the teacher store train one)")


def frozen_from_checkpoint(node: DictConfig, ckpt: dict, data, device, key: str,
                           any_classes: bool = False) -> nn.Module:
    """The checkpoint's model, frozen. With `any_classes` it keeps the class count it was trained
    for (its head may not predict this dataset's classes)."""
    arch = model_node(node)
    check_compatible(ckpt, arch, data, key, any_classes)
    if any_classes:
        data = SimpleNamespace(num_classes=ckpt["data"]["num_classes"],
                               input_shape=data.input_shape)
    model = build_model(node, "teacher", data)
    # tensors that are non-finite by construction (e.g. a -inf mask buffer) are not damage
    by_design = {k for k, v in model.state_dict().items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())}
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"The teacher checkpoint does not fit teacher={arch.arch} with these "
                        f"options ({str(exc).splitlines()[0][:160]})", "teacher",
                        "Use the same architecture options the teacher was trained with "
                        f"(saved: {ckpt['model_config']})") from None
    broken = [k for k, v in model.state_dict().items() if k not in by_design
              and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:   # a NaN teacher scores at chance and teaches nothing: cheap to catch here
        raise UserError(f"The teacher checkpoint holds non-finite weights (NaN/inf in "
                        f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''})", key,
                        "The file is damaged or its training diverged; use another checkpoint")
    return model.to(device).eval().requires_grad_(False)


def pretrained(arch: DictConfig, data, device) -> nn.Module:
    """A torchvision teacher with published weights (e.g. ImageNet ResNet-34): used as is, so
    its classes must be the dataset's — a re-initialised head would make it no teacher.
    A zoo model other than `tv` that takes `weights` loads them itself when built (`hf`: a
    local Hugging Face model, models/hf.py, which checks its vocabulary against the data)."""
    if arch.arch != "tv":
        return build_model(arch, "teacher", data).to(device).eval().requires_grad_(False)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch.name)[arch.weights]
    except (KeyError, ValueError) as exc:
        raise UserError(f"No weights {arch.weights!r} for torchvision model {arch.name!r} "
                        f"({exc})", "teacher.weights",
                        "Use a name from torchvision's weights enum, e.g. IMAGENET1K_V1") from None
    classes = len(weights.meta.get("categories") or [])
    if classes != data.num_classes:
        raise UserError(f"teacher.weights={arch.weights} predicts {classes} classes but dataset "
                        f"{data.name} has {data.num_classes}", "teacher.weights",
                        "Drop teacher.weights to let the teacher store train a teacher on this "
                        "dataset, or pass teacher.checkpoint")
    model = build_model(arch, "teacher", data)
    return model.to(device).eval().requires_grad_(False)
