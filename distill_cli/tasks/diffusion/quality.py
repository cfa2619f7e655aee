"""Scoring a generator's samples in a stored classifier's feature space.

`rows` turns samples (in [-1, 1]) into the classifier's penultimate features and logits, one row
per sample with the step count that made it: what `DiffusionTask.predict` returns. `score` turns
`[S, N, D + C + 1]` of those (block 0 = the model's own step count) into the metrics of
evaluation/sample_quality.py against the real training images' features. Keys: `fd` (and
`fd_<arch>`, the name that says which features: never "FID"), `kid`, `precision`, `recall`,
`class_entropy`, `class_acc` and `class_fd` (conditional models: the mean over classes of the
FD between the real images of class c and the samples generated for c — a mode dropped inside
one class shows here when the overall FD hides it), `steps`, `neg_fd` (what selects best.pt), and
`<name>@<steps>` for every step count evaluated.
"""
from __future__ import annotations

import torch

from distill_cli.evaluation import sample_quality as q
from distill_cli.models.taps import ClassifierInput
from distill_cli.seeding import derive_seed


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] samples -> [0, 1] pixels (what x_uint8 / 255 is for real images)."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class SampleScorer:
    def __init__(self, net, *, arch: str, batch_size: int, pr_k: int, kid_subsets: int,
                 kid_subset_size: int, seed: int):
        self.net, self.arch, self.batch_size = net.eval(), arch, batch_size
        self.pr_k, self.kid_subsets, self.kid_subset_size = pr_k, kid_subsets, kid_subset_size
        self.seed = seed
        # (id(split), n, features, labels) of the real reference images
        self._real: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, split) -> torch.Tensor:
        """[N, D + C]: the classifier's penultimate features and logits of [0, 1] pixels,
        normalised like the classifier's training batches."""
        out = []
        for i in range(0, pixels.shape[0], self.batch_size):
            x = (pixels[i:i + self.batch_size] - split._mean) / split._std
            with ClassifierInput(self.net) as pen:
                logits = self.net(x).float()
                out.append(torch.cat([pen.value.float().flatten(1), logits], 1))
        return torch.cat(out)

    def rows(self, images: torch.Tensor, split, steps: int) -> torch.Tensor:
        feats = self.features(to_pixels(images), split)
        return torch.cat([feats, torch.full((feats.shape[0], 1), float(steps),
                                            device=feats.device)], 1)

    def real(self, split, n: int, device) -> torch.Tensor:
        """Features of `n` real images of `split` (a seeded choice), computed once."""
        if self._real is None or self._real[:2] != (id(split), n):
            n = min(n, len(split))
            g = torch.Generator().manual_seed(derive_seed("diffusion-reference", self.seed))
            idx = torch.randperm(len(split), generator=g)[:n].to(split.x.device)
            pixels = split.x.index_select(0, idx).float() / 255.0
            self._real = (id(split), n, self.features(pixels.to(device), split),
                          split.targets.index_select(0, idx.to(split.targets.device)))
        return self._real[2]

    def score(self, outputs: torch.Tensor, labels: torch.Tensor, split, reference: int,
              conditional: bool) -> dict:
        real = self.real(split, reference, outputs.device)
        d = self.net.feature_dim
        real_f = real[:, :d]
        out: dict = {}
        for b, block in enumerate(outputs):
            feats, logits, steps = block[:, :d], block[:, d:-1], int(block[0, -1])
            m = {"fd": q.frechet_distance(real_f, feats),
                 "kid": q.kernel_distance(real_f, feats, self.kid_subsets,
                                          self.kid_subset_size, self.seed)[0]}
            m["precision"], m["recall"] = q.precision_recall(real_f, feats, self.pr_k)
            m["class_entropy"] = q.class_entropy(logits, logits.shape[1])
            if conditional:
                m["class_acc"] = q.class_accuracy(logits, labels)
                per_class = q.per_class_frechet(real_f, self._real[3], feats, labels,
                                                logits.shape[1])
                m["class_fd"] = (sum(per_class.values()) / len(per_class) if per_class
                                 else float("nan"))
            out.update({f"{k}@{steps}": v for k, v in m.items()})
            if b == 0:   # the model's own step count; fd_<arch> says whose features
                out.update(m, steps=steps, neg_fd=-m["fd"], **{f"fd_{self.arch}": m["fd"]})
        out["n"] = int(outputs.shape[1])
        return out
