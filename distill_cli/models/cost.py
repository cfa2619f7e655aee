"""What a model costs: parameters and multiply-accumulates of one forward (the `distill-search`
table's params / FLOPs columns)."""
from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape, device=None) -> int:
    """Multiply-accumulates of one sample's forward through the conv and linear layers (forward
    hooks; biases, norms, activations and pooling are not counted; FLOPs ≈ 2 × MACs).
    Conv: output elements × in_channels/groups × kernel size; linear: output elements ×
    in_features. The model runs once in eval mode on zeros; its mode is restored."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
            total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was_training = model.training
    param = next(model.parameters(), None)
    device = device or (param.device if param is not None else "cpu")
    dtype = param.dtype if param is not None else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
