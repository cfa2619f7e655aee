"""A diffusion teacher's (noise, ODE endpoint) pairs, computed once and served by index.

Row i belongs to training sample i (like a stored logit row): its noise is a pure function of
(seed, i) — standard normal from a generator seeded with `derive_seed("pairs", seed, i)`,
regenerated exactly whenever it is needed, so only the endpoints are stored (half the disk) —
and, for a conditional teacher, its label is the training sample's label. The endpoint is the
teacher's sample from that noise with its sampler (default: its own sampler and step count),
deterministic. Reflow (Liu et al. 2023) and Luhman & Luhman (2021) train on such fixed pairs;
RF's `run_lib_reflow.py` and LL's `create_dataset.py` generate them offline the same way.

The runner hands the pairs to an objective that declares `stored_samples = "pairs"` (its
`samples_options`, received by `use_samples`; teachers/samples.py), the way it serves a
classifier teacher's stored logits: a stored teacher signal. The table lives in
the output store (outputs.py `TableStore`): `<store.root>/outputs/
<key>/pairs.npy`, keyed by the teacher's WEIGHTS (their SHA-256, wherever the teacher came from),
its process / parameterisation, the sampler, step count, guidance, seed, the data and the dtype,
so a sweep over students and methods pays for the teacher's sampling once.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from distill_cli.errors import UserError
from distill_cli.models.diffusion import samplers
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.seeding import derive_seed
from distill_cli.teachers.outputs import DTYPES, TableStore
from distill_cli.teachers.samples import weights_digest
from distill_cli.teachers.store import content_key

FORMAT = 1


def pair_noise(seed: int, index: torch.Tensor, shape) -> torch.Tensor:
    """The standard-normal noise of rows `index`: row i from its own seeded generator (CPU, so
    every device sees the same pairs), on `index`'s device."""
    rows = [torch.randn(*shape, generator=torch.Generator().manual_seed(
        derive_seed("pairs", seed, int(i)))) for i in index.tolist()]
    return torch.stack(rows).to(index.device)


class TeacherPairs:
    """`get(index)` -> (noise, endpoint), float32 `[B, C, H, W]` each, on `index`'s device."""

    def __init__(self, endpoints: torch.Tensor, seed: int, key: str, built: bool):
        self.endpoints, self.seed, self.key, self.built = endpoints, seed, key, built

    def __len__(self) -> int:
        return int(self.endpoints.shape[0])

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = tuple(self.endpoints.shape[1:])
        endpoint = self.endpoints.index_select(0, index.to(self.endpoints.device))
        return pair_noise(self.seed, index, shape), endpoint.to(index.device)


def teacher_pairs(teacher, data, *, store_root: str, sampler: str | None = None,
                  steps: int | None = None, seed: int = 0, dtype: str = "float16",
                  batch_size: int = 256) -> TeacherPairs:
    """The pairs of `teacher` for every training sample of `data` (computed once)."""
    if not isinstance(teacher, Denoiser):
        raise UserError("This method trains on a diffusion teacher's (noise, endpoint) pairs, "
                        "but the run's teacher is not a diffusion model", "teacher",
                        "Use teacher=unet_tiny|unet_small|dit_tiny (trained by the store with "
                        "loss@teacher.train.loss=dsm) or a checkpoint of one")
    if dtype not in DTYPES:
        raise UserError(f"loss.pairs.dtype={dtype} is not an option", "loss.pairs.dtype",
                        f"Use one of: {', '.join(DTYPES)}")
    method = samplers.resolve(teacher, sampler or teacher.sampler)
    if method not in samplers.DETERMINISTIC:
        raise UserError(f"loss.pairs.sampler={method} draws noise at every step: its endpoint "
                        "is not a function of the pair's noise", "loss.pairs.sampler",
                        f"Use a deterministic sampler: {', '.join(samplers.DETERMINISTIC)}")
    steps = int(steps or teacher.steps)
    train = data.train
    shape = tuple(train.x.shape[1:])
    n = len(train)
    ident = {"format": FORMAT, "teacher": weights_digest(teacher),
             "diffusion": {"process": teacher.process.name, "param": teacher.param,
                           "conditional": teacher.conditional, "guidance": teacher.guidance},
             "sampler": method, "steps": steps, "seed": int(seed), "data": data.identity,
             "dtype": dtype, "n": n}
    key = content_key(ident)
    device = next(teacher.parameters()).device
    labels = train.targets.to(device)

    def compute() -> np.ndarray:
        print(f"teacher pairs: sampling {n} endpoints with {method} x {steps} steps once "
              f"(store key {key})", file=sys.stderr, flush=True)
        out = torch.empty(n, *shape)
        was = teacher.training
        teacher.eval()
        try:
            for i in range(0, n, batch_size):
                index = torch.arange(i, min(i + batch_size, n), device=device)
                noise = pair_noise(seed, index, shape)
                y = labels[index] if teacher.conditional else None
                x = samplers.sample(teacher, noise, y, steps=steps, method=method)
                out[i:i + len(index)] = x.float().cpu()
        finally:
            teacher.train(was)
        arr = out.numpy().astype(DTYPES[dtype])
        if not np.isfinite(arr).all():
            raise UserError("The teacher's samples are non-finite (damaged or diverged "
                            "weights)", "teacher", "Use another teacher, or prune its entry")
        return arr

    tables = TableStore(store_root, shape, dtype)
    arr = tables.get(key, "pairs", n, compute)
    endpoints = torch.from_numpy(np.array(arr, dtype=np.float32)).to(device)
    return TeacherPairs(endpoints, int(seed), key, built=bool(tables.built))
