"""task=diffusion under real torchrun (gloo on CPU, 2 ranks, one thread each): two ranks train
what one process trains.

Each rank keeps a contiguous slice of the global batch (training/distributed.py); the objectives
draw their noise levels and noise per SAMPLE from (noise_seed, step, index)
(tasks/diffusion/methods/common.py `SampleDraws`), so the ranks' halves draw exactly what the one
process draws for those samples, and the DDP-averaged gradient is the one-process gradient.

Marked `serial` (as tests/test_ddp.py, whose `launch` helper this reuses): `make test` runs these
after the parallel pass, alone, so the two ranks do not share the 2 cores with other workers.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_ddp import launch
from test_diffusion_task import TINY

pytestmark = pytest.mark.serial

assert "trainer.batch_size=32" in TINY   # even: each of the 2 ranks keeps 16 samples

# groups=4, not unet_tiny's 8: with channels=8 and 8 groups the 8-channel level's GroupNorms
# normalise each channel alone, which cancels the per-channel biases added before them
# (up.1's conv1/emb biases before norm2; its conv2/skip biases before `out`'s GroupNorm). Their
# gradient is mathematically 0, so what reaches Adam is float-rounding noise (~1e-10) that
# differs with the batch split, and Adam's m/sqrt(v) turns ANY such noise into lr-sized steps:
# those dead biases random-walk differently in the two runs (1e-6..1e-5, 2e-5..1 relative) while
# every live parameter agrees to ~1e-7. Two channels per group leaves no bias without a gradient.
GROUPS = ["student.groups=4", "teacher.groups=4"]
CASES = {
    # a teacher's own run: no teacher, so the teacher's settings are left out
    "dsm": [o for o in TINY + GROUPS if not o.startswith("teacher.")]
    + ["loss=dsm", "teacher=none"],
    # distils the store-trained denoiser (trained once, inside torchrun, by rank 0)
    "progressive": [*TINY, *GROUPS, "loss=progressive", "loss.start_steps=4"],
    # three networks: the generator (DDP), the critic (averaged by the topology) and its head
    "dmd2": [*TINY, *GROUPS, "loss=dmd2", "loss.ratio=2", "trainer.epochs=1"],
    # the critic steps FIRST, averaged over the ranks by the topology itself (update_critic)
    "sid": [*TINY, *GROUPS, "loss=sid", "trainer.epochs=1"],
}


def last(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """tests/test_ddp.py's tolerance: 1e-5 relative to the tensor's largest entry."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max()))


def live(name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries a gradient can move. An attention's KEY bias has a zero gradient exactly
    (it adds q . b_k to every logit of a query: softmax ignores it), so, like the dead biases
    above, Adam random-walks it on rounding noise; SiD's generator loss, back-propagated
    through two frozen networks into the generator, makes that noise big enough to show
    (the 16 key-bias entries of a 16-channel level, ~2e-4 of the tensor's largest entry)."""
    if name.endswith("qkv.bias"):
        q, _, v = a.chunk(3)
        q2, _, v2 = b.chunk(3)
        return torch.cat([q, v]), torch.cat([q2, v2])
    return a, b


# DMD2's critic (8 steps, each a critic step): its gradient is a sum over the batch in another
# order on two ranks (halves, then an all-reduce), and Adam's m/sqrt(v) turns the rounding of
# near-zero gradient entries into visible steps: one weight of two tensors differed by ~3e-5 of
# the tensor's largest entry (measured); every other weight agrees to 1e-5
TOLERANCE = {"model": 1e-5, "critic_model": 1e-4}


@pytest.mark.parametrize("method", sorted(CASES))
def test_two_ranks_train_the_diffusion_student_one_process_trains(tmp_path, method):
    args = CASES[method]
    two = launch([*args, "hydra.run.dir=two"], tmp_path, timeout=600)
    launch([*args, "hydra.run.dir=one"], tmp_path, ranks=None, timeout=600)
    one_ckpt, two_ckpt = last(tmp_path / "one"), last(tmp_path / "two")
    assert one_ckpt["state"]["step"] == two_ckpt["state"]["step"] > 0
    for part in ("model", "critic_model") if "critic_model" in one_ckpt else ("model",):
        a, b = one_ckpt[part], two_ckpt[part]
        assert set(a) == set(b)
        bad = [k for k in a if not close(*live(k, a[k], b[k]), TOLERANCE[part])]
        assert not bad, (part, [(k, float((a[k] - b[k]).abs().max()), float(a[k].abs().max()),
                                 int(((a[k] - b[k]).abs() > 1e-5 * a[k].abs().max()).sum()))
                                for k in bad[:5]], two.stdout[-2000:])
    # the objective's state: the same noise seed on every rank and in the one process (and,
    # for progressive, the same round and round-start snapshot)
    oa, ob = one_ckpt["objective"], two_ckpt["objective"]
    assert int(oa["noise_seed"]) == int(ob["noise_seed"])
    assert all(close(oa[k], ob[k]) for k in oa), [k for k in oa if not close(oa[k], ob[k])][:5]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["status"] == s2["status"] == "finished"
