"""Fashion-MNIST and the distill_cli model zoo, registered in torchdistill's registries.

The torchdistill side of benchmarks/bench_torchdistill.py: `fmnist_kd.yaml` names this module
under `dependencies` (torchdistill imports it, which runs the two `register_*` decorators) and
builds its datasets with `!import_call fmnist_td.FashionMNISTArrays`. Runs in the torchdistill
venv, where distill_cli is not installed: the benchmark puts the repository on PYTHONPATH, and
`distill_cli.models` needs nothing but torch.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchdistill.datasets.registry import register_dataset
from torchdistill.models.registry import register_model


@register_dataset
class FashionMNISTArrays(Dataset):
    """One split of the arrays file that the benchmark writes from distill_cli's own
    Fashion-MNIST view (the same images, labels and split as the runner's run).

    `path` holds {split: {"x": uint8 [N,1,28,28], "y": int64 [N]}, "mean": [..], "std": [..]}.
    Images are normalised once, here, as the runner does per batch: (x/255 - mean)/std. (The
    usual torchdistill dataset would run ToTensor + Normalize on every sample; doing it once is
    the cheapest a map-style Dataset can be, so the DataLoader's per-sample cost is all that is
    left for torchdistill's data path.)"""

    def __init__(self, path: str, split: str):
        blob = torch.load(path, weights_only=True)
        part = blob[split]
        shape = (1, -1, 1, 1)
        mean = torch.tensor(blob["mean"], dtype=torch.float32).view(shape)
        std = torch.tensor(blob["std"], dtype=torch.float32).view(shape)
        self.x = (part["x"].float() / 255 - mean) / std
        self.y = part["y"].long()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int):
        return self.x[index], int(self.y[index])   # int target, as torchvision's datasets give


@register_model
def distill_cli_zoo(arch: str, num_classes: int, in_channels: int, input_size, **options):
    """The same nn.Module the runner builds: `distill_cli.models.create` (so the teacher's
    state_dict from the runner's teacher store loads with strict=True)."""
    from distill_cli.models import create

    return create(arch, num_classes, in_channels, tuple(input_size), **options)
