"""`task=diffusion`: diffusion and flow models, and their step distillation.

batch           `Batch(index, x, y)`: real training images in [-1, 1] (uint8 / 127.5 - 1; a random
                horizontal flip with `flip`, CIFAR's), a pure function of (data_seed, epoch, step);
                the objective draws the noise levels and the noise itself
model contract  a `Denoiser` (models/diffusion/denoiser.py): a backbone + a noise process + a
                parameterisation, `generate(noise, y, steps)` with the model's own sampler
teacher store   the teacher is a student run of this task with `teacher.train.loss` (dsm or
                flow_matching); the feature classifier `task.feature_net` is a CLASSIFICATION run
                of the same data, trained once by the store
evaluation      samples from fixed seeded noise (conditioned on the split's labels, in order),
                scored in the feature space of the stored classifier against the real training
                images: Fréchet distance `fd_<arch>`, KID, precision / recall, class coverage
                (entropy of the predicted classes) and, for conditional models, the classifier's
                accuracy on the conditioning labels. Validation at the model's own step count
                (`best` by -FD); test at every `eval.steps` count and the model's own
stored output  the teacher's (noise, ODE endpoint) pairs (pairs.py), by the methods that need them
"""
from __future__ import annotations

from pathlib import Path

import torch

from distill_cli.config.build import build_model
from distill_cli.data.bundle import Batch, augment_generator
from distill_cli.errors import UserError
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.seeding import derive_seed
from distill_cli.tasks.base import Task
from distill_cli.tasks.diffusion.columns import REPORT_COLUMNS
from distill_cli.tasks.diffusion.quality import SampleScorer

FEATURE_NET = "feature_net"


class DiffusionTask(Task):
    name = "diffusion"
    selection_metric = "neg_fd"
    report_columns = REPORT_COLUMNS

    def __init__(self, conditional: bool = False, flip: bool = False, eval=None,
                 feature_net=None, **_):
        # process / param / steps / guidance are read by the model YAMLs (conf/student/unet_*)
        self.conditional, self.flip = bool(conditional), bool(flip)
        ev = dict(eval or {})
        self.samples = _positive(ev.get("samples", 1000), "task.eval.samples", 2)
        self.val_samples = _positive(ev.get("val_samples", 500), "task.eval.val_samples", 2)
        self.reference = _positive(ev.get("reference", 10000), "task.eval.reference", 2)
        self.steps = [_positive(s, "task.eval.steps") for s in ev.get("steps", [1, 2, 4, 8])]
        self.batch_size = _positive(ev.get("batch_size", 256), "task.eval.batch_size")
        self.seed = int(ev.get("seed", 0))
        self.grid_columns = _positive(ev.get("grid_columns", 10), "task.eval.grid_columns")
        self.pr_k = _positive(ev.get("pr_k", 3), "task.eval.pr_k")
        self.kid_subsets = _positive(ev.get("kid_subsets", 10), "task.eval.kid_subsets")
        self.kid_subset_size = _positive(ev.get("kid_subset_size", 500),
                                         "task.eval.kid_subset_size", 2)
        if min(self.samples, self.val_samples) <= self.pr_k:
            raise UserError(f"task.eval.samples / val_samples must exceed task.eval.pr_k="
                            f"{self.pr_k} (the k of the k-NN precision / recall)",
                            "task.eval.val_samples", "Raise them (hundreds at least: FD needs "
                            "more samples than feature dimensions to be unbiased)")
        self.feature_node = feature_net
        self.scorer: SampleScorer | None = None
        self._val = self._train = None

    # ---------------------------------------------------------------- models
    def build_model(self, node, key, data):
        if len(data.input_shape) != 3:
            raise UserError(f"task=diffusion generates images, but dataset={data.name} holds "
                            f"{tuple(data.input_shape)} samples", "dataset",
                            "Use an image dataset (digits, fashion_mnist, mnist, cifar10, ...)")
        model = build_model(node, key, data)
        if not isinstance(model, Denoiser):
            raise UserError(f"{key}={node.get('arch')} is not a diffusion model (task=diffusion "
                            "trains denoisers: noisy image, time -> prediction)", key,
                            f"Use {key}=unet_tiny, unet_small or dit_tiny")
        if model.conditional != self.conditional:
            raise UserError(f"{key}.conditional={model.conditional} but task.conditional="
                            f"{self.conditional}", f"{key}.conditional",
                            "Set task.conditional and leave the model's to follow it")
        self._val, self._train = data.val, data.train
        return model

    def stored_models(self):
        if self.feature_node is None:
            raise UserError("task=diffusion scores samples in a stored classifier's features, "
                            "but task.feature_net is null", "task.feature_net",
                            "Keep conf/task/diffusion.yaml's feature_net (a zoo classifier the "
                            "teacher store trains on the same data)")
        return {FEATURE_NET: self.feature_node}

    def use_stored(self, name, model, info):
        self.scorer = SampleScorer(model, arch=str(self.feature_node.get("arch")),
                                   batch_size=self.batch_size, pr_k=self.pr_k,
                                   kid_subsets=self.kid_subsets,
                                   kid_subset_size=self.kid_subset_size, seed=self.seed)

    # ---------------------------------------------------------------- batches
    def train_batches(self, data, batch_size, data_seed, epoch, start_step, mix):
        split = data.train
        if split.x.dtype != torch.uint8:
            raise UserError(f"dataset={data.name} is not held as 8-bit images", "dataset",
                            "Use an image dataset held in memory (digits, fashion_mnist, "
                            "mnist, cifar10, svhn)")
        batches = split.train_batches(batch_size, data_seed, epoch, start_step)
        for step, batch in enumerate(batches, start=start_step):
            x = to_unit_range(split.x.index_select(0, batch.index))
            if self.flip:   # CIFAR's random horizontal flip (PD, CM, RF all train with it)
                g = augment_generator(derive_seed("diffusion-flip", data_seed), epoch, step)
                flip = torch.rand(x.shape[0], generator=g) < 0.5
                x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
            yield Batch(batch.index, x, batch.y)

    def steps_per_epoch(self, data, batch_size):
        return data.train.num_batches(batch_size, train=True)

    # ---------------------------------------------------------------- evaluation
    def _scorer(self) -> SampleScorer:
        if self.scorer is None:
            raise RuntimeError("the feature classifier was not bound (use_stored)")
        return self.scorer

    def predict(self, model, split, batch_size, device, precision):
        """Samples of `model` at each step count, as rows of [features | logits | steps] of
        the feature classifier: `[S, N, D + C + 1]`, with the split's first N labels (the
        conditioning labels, in order)."""
        scorer = self._scorer()
        validation = split is self._val
        n = min(len(split), self.val_samples if validation else self.samples)
        if n <= self.pr_k:
            raise UserError(f"The {'validation' if validation else 'test'} split holds {n} "
                            f"images: too few to score samples against (task.eval.pr_k="
                            f"{self.pr_k})", "dataset.limit_eval",
                            "Raise dataset.limit_eval / dataset.val_fraction (hundreds at least)")
        own = int(model.steps)   # first: its block gives the unsuffixed metrics
        counts = [own] + ([] if validation else other_counts(model, self.steps))
        labels = split.targets[:n].to(device)
        y = labels if model.conditional else None
        noise = seeded_noise(n, model_shape(split), derive_seed(
            "diffusion-eval", self.seed, "val" if validation else "test"), device)
        rows = []
        was_training = model.training
        model.eval()
        try:
            for steps in counts:
                images = generate(model, noise, y, steps, self.batch_size, self.seed)
                rows.append(scorer.rows(images, split, steps))
        finally:
            model.train(was_training)
        return torch.stack(rows), labels

    def score(self, outputs, targets, reference=None):
        # the real images FD compares against: the training split (the field's convention,
        # e.g. CIFAR-10 FID against its 50,000 training images), `eval.reference` of them
        return self._scorer().score(outputs, targets[: outputs.shape[1]].to(outputs.device),
                                    self._train, self.reference, self.conditional)

    def stored_row_shape(self, data):
        return (2, *data.input_shape)

    # ---------------------------------------------------------------- artifacts
    def artifacts(self, model, run_dir, tag, data, logger, source):
        """Sample grids: row = a step count (`eval.steps` and the model's own), column = a fixed
        noise (class j % C for conditional models): `samples_<tag>.png`, also to W&B."""
        from distill_cli.evaluation.image_grid import save_grid

        if tag == "start" or not isinstance(model, Denoiser):
            return
        cols = self.grid_columns
        counts = sorted([int(model.steps), *other_counts(model, self.steps)])
        device = next(model.parameters()).device
        noise = seeded_noise(cols, model_shape(data.train),
                             derive_seed("diffusion-grid", self.seed), device)
        y = (torch.arange(cols, device=device) % data.num_classes) if model.conditional else None
        was_training = model.training
        model.eval()
        try:
            images = torch.cat([generate(model, noise, y, s, self.batch_size, self.seed)
                                for s in counts])
        finally:
            model.train(was_training)
        c = images.shape[1]
        png = save_grid(Path(run_dir) / f"samples_{tag}.png", images.cpu(), [0.5] * c,
                        [0.5] * c, len(counts), cols)
        logger.log_image(f"samples/{tag}", png)


def _positive(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}={value!r} must be an integer >= {minimum}", key,
                        f"Give a whole number >= {minimum}")
    return value


def other_counts(model: Denoiser, steps) -> list[int]:
    """The evaluation step counts besides the model's own; none for a one-step map (Luhman &
    Luhman's student has no multi-step sampler)."""
    if model.resolved_sampler == "onestep":
        return []
    return sorted(set(steps) - {int(model.steps)})


def to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (PD's normalize_data: x / 127.5 - 1)."""
    return x_uint8.float() / 127.5 - 1.0


def model_shape(split) -> tuple[int, ...]:
    return tuple(split.x.shape[1:])


def seeded_noise(n: int, shape, seed: int, device) -> torch.Tensor:
    """Standard normal noise for `n` samples, a pure function of (seed, n, shape): drawn on the
    CPU so every device gets the same samples."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(device)


@torch.no_grad()
def generate(model: Denoiser, noise, y, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """`model.generate` in chunks; a stochastic sampler draws from a generator seeded by
    (seed, steps, chunk), so the samples do not depend on the chunking of other step counts."""
    out = []
    for i in range(0, noise.shape[0], batch_size):
        g = torch.Generator(device=noise.device).manual_seed(
            derive_seed("diffusion-sampler", seed, steps, i))
        out.append(model.generate(noise[i:i + batch_size],
                                  None if y is None else y[i:i + batch_size],
                                  steps=steps, generator=g))
    return torch.cat(out)
