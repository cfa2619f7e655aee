"""FitNet, AT, RKD and CRD (issue #6): every loss on fixed tensors vs an independent float64 NumPy
re-implementation (heads' weights copied out), AT/RKD identities and invariances, shape adaptation
(channels, 2x sizes, tokens vs maps, vectors), no gradient into the teacher, CRD's memory banks
(update rule, state round trip, negatives, Z), and one end-to-end digits run per method with a
bit-exact stop/resume for CRD."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DIGITS, make_cfg
from torch import nn

from distill_cli.config.build import build_objective
from distill_cli.errors import UserError
from distill_cli.training.run import RunInterrupted, run
from distill_cli.losses.at import AT
from distill_cli.losses.crd import CRD
from distill_cli.losses.fitnet import FitNet, HintRegressor, as_map
from distill_cli.losses.rkd import RKD

B, NC = 6, 5


def rand(*shape, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.abs() + 0.1 if positive else x


def labels(seed=0, n=B, nc=NC):
    return torch.randint(0, nc, (n,), generator=torch.Generator().manual_seed(seed))


def np_(t):
    return t.detach().cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------- NumPy references (float64)
def np_ce(s, y):
    m = s.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
    y = np.asarray(y).astype(int)
    return np.mean(lse - s[np.arange(len(y)), y])


def np_conv2d(x, w, b, stride, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    ho = (xp.shape[2] - kh) // stride + 1
    wo = (xp.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.einsum("bckl,ockl->bo", patch, w)
    return out + b[None, :, None, None]


def np_conv_transpose2d(x, w, b, stride, pad):
    """w: [C_in, C_out, kh, kw] (PyTorch's layout); scatter each input pixel."""
    kh, kw = w.shape[2:]
    h, wd = x.shape[2:]
    full = np.zeros((x.shape[0], w.shape[1], (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            full[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
                "bc,cokl->bokl", x[:, :, i, j], w)
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + b[None, :, None, None]


def np_adaptive_pool(x, size):
    """PyTorch's adaptive average pool bins: [floor(i*H/o), ceil((i+1)*H/o))."""
    (h, w), (oh, ow) = x.shape[2:], size
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
            c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def np_bn_train(x, gamma, beta, eps=1e-5):
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)  # biased
    return (x - mu) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)


def np_tokens_to_map(tok, h, w):
    b, _n, d = tok.shape
    return tok.transpose(0, 2, 1).reshape(b, d, h, w)


def np_pool(f):
    return f.mean(axis=(2, 3)) if f.ndim == 4 else f.mean(axis=1) if f.ndim == 3 else f


def np_regressor(reg: HintRegressor, x):
    """Forward of a HintRegressor (train-mode BN) from its copied weights."""
    conv = reg.conv
    if isinstance(conv, nn.Linear):
        out = np_pool(x) @ np_(conv.weight).T + np_(conv.bias)
    elif isinstance(conv, nn.ConvTranspose2d):
        out = np_conv_transpose2d(x, np_(conv.weight), np_(conv.bias), conv.stride[0],
                                  conv.padding[0])
    else:
        if isinstance(conv, nn.Sequential):   # adaptive pool, then 3x3 conv
            x, conv = np_adaptive_pool(x, conv[0].output_size), conv[1]
        out = np_conv2d(x, np_(conv.weight), np_(conv.bias), conv.stride[0], conv.padding[0])
    out = np_bn_train(out, np_(reg.bn.weight), np_(reg.bn.bias))
    return np.maximum(out, 0)


def np_attention(f):
    a = (f ** 2).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def np_at_pair(fs, ft):
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    fs, ft = np_adaptive_pool(fs, size), np_adaptive_pool(ft, size)  # identity when equal
    return np.mean((np_attention(fs) - np_attention(ft)) ** 2)


def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.mean(np.where(d < 1, 0.5 * d ** 2, d - 0.5))


def np_rkd(s, t):
    def dist(e):
        d = np.sqrt(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
        return d / d[d > 0].mean()

    def angles(e):
        diff = e[None, :, :] - e[:, None, :]                      # [i, j] = e_j - e_i
        diff = diff / np.maximum(np.linalg.norm(diff, axis=2, keepdims=True), 1e-12)
        return np.einsum("ijd,ikd->ijk", diff, diff).ravel()

    return np_smooth_l1(dist(s), dist(t)), np_smooth_l1(angles(s), angles(t))


def np_nce(p, n_data):
    k_pn = (p.shape[1] - 1) / n_data
    d1 = np.log(p[:, 0] / (p[:, 0] + k_pn + 1e-7))
    d0 = np.log(k_pn / (p[:, 1:] + k_pn + 1e-7))
    return -(d1.sum() + d0.sum()) / p.shape[0]


def np_normalize(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------- helpers
def fitnet_for(s_shape, t_shape, relu=True, seed=0, regressor="repdistiller"):
    """A float64 FitNet with one regressor for per-sample shapes (as bind would build it) and
    non-trivial BN affine parameters."""
    torch.manual_seed(seed)
    obj = FitNet(stages=[0], relu=relu, regressor=regressor)
    obj.build_heads([torch.Size(s_shape)], [torch.Size(t_shape)], NC)
    with torch.no_grad():
        obj.regressors[0].bn.weight.uniform_(0.5, 1.5)
        obj.regressors[0].bn.bias.uniform_(-0.5, 0.5)
    return obj.double()


def run_fitnet(obj, f_s, f_t, seed=0):
    s_logits = rand(B, NC, seed=seed + 7)
    y = labels(seed)
    terms = obj(s_logits, None, y, s_feats=[f_s], t_feats=[f_t])
    return terms, s_logits, y


# ---------------------------------------------------------------- FitNet
SHAPES = {  # (student per-sample shape, teacher per-sample shape)
    "equal size, different channels": ((3, 4, 4), (5, 4, 4)),
    "student 2x larger": ((3, 8, 8), (5, 4, 4)),
    "student 2x smaller": ((3, 2, 2), (4, 4, 4)),
    "non-integer ratio": ((3, 6, 6), (4, 4, 4)),
    "student tokens vs teacher map": ((16, 6), (4, 4, 4)),
    "student map vs teacher tokens": ((3, 8, 8), (16, 5)),
    "student vector vs teacher map": ((7,), (4, 2, 2)),
    "both vectors": ((7,), (9,)),
}
# the regressor's layer, kernel and stride per rule; RepDistiller ConvReg (models/util.py) for
# "repdistiller": a 1x1 conv for equal sizes, kernel (1 + Hs - Ht, 1 + Ws - Wt) when larger
LAYERS = {
    "repdistiller": {
        "equal size, different channels": (nn.Conv2d, (1, 1), (1, 1)),
        "student 2x larger": (nn.Conv2d, (3, 3), (2, 2)),
        "student 2x smaller": (nn.ConvTranspose2d, (4, 4), (2, 2)),
        "non-integer ratio": (nn.Conv2d, (3, 3), (1, 1)),
        "student tokens vs teacher map": (nn.Conv2d, (1, 1), (1, 1)),
        "student map vs teacher tokens": (nn.Conv2d, (3, 3), (2, 2)),
        "student vector vs teacher map": (nn.Linear, None, None),
        "both vectors": (nn.Linear, None, None),
    },
    "ours": {
        "equal size, different channels": (nn.Conv2d, (3, 3), (1, 1)),
        "student 2x larger": (nn.Conv2d, (3, 3), (2, 2)),
        "student 2x smaller": (nn.ConvTranspose2d, (4, 4), (2, 2)),
        "non-integer ratio": (nn.Sequential, (3, 3), (1, 1)),
        "student tokens vs teacher map": (nn.Conv2d, (3, 3), (1, 1)),
        "student map vs teacher tokens": (nn.Conv2d, (3, 3), (2, 2)),
        "student vector vs teacher map": (nn.Linear, None, None),
        "both vectors": (nn.Linear, None, None),
    },
}


@pytest.mark.parametrize("rule", list(LAYERS))
@pytest.mark.parametrize("case", list(SHAPES))
def test_fitnet_matches_numpy_for_every_shape_adaptation(case, rule):
    s_shape, t_shape = SHAPES[case]
    layer, kernel, stride = LAYERS[rule][case]
    obj = fitnet_for(s_shape, t_shape, regressor=rule)
    reg = obj.regressors[0]
    conv = reg.conv[1] if isinstance(reg.conv, nn.Sequential) else reg.conv
    assert isinstance(reg.conv, layer)
    if kernel is not None:
        assert (conv.kernel_size, conv.stride) == (kernel, stride)
    f_s, f_t = rand(B, *s_shape, seed=1), rand(B, *t_shape, seed=2, positive=True)
    terms, s_logits, y = run_fitnet(obj, f_s, f_t)

    xs = np_(f_s)
    if len(s_shape) == 2 and len(t_shape) != 1:
        xs = np_tokens_to_map(xs, 4, 4)
    xt = np_(f_t)
    if len(t_shape) == 1 or len(s_shape) == 1:
        xt = np_pool(xt)
    elif len(t_shape) == 2:
        xt = np_tokens_to_map(xt, 4, 4)
    pred = np_regressor(reg, xs)
    assert pred.shape == xt.shape
    hint = np.mean((pred - xt) ** 2)
    ce = np_ce(np_(s_logits), np_(y))
    np.testing.assert_allclose(terms["hint"].item(), hint, rtol=1e-10)
    np.testing.assert_allclose(terms["ce"].item(), ce, rtol=1e-10)
    np.testing.assert_allclose(terms["loss"].item(), ce + 100.0 * hint, rtol=1e-10)


def test_fitnet_gradient_reaches_student_and_regressor_never_teacher():
    obj = fitnet_for((3, 4, 4), (5, 4, 4))
    f_s = rand(B, 3, 4, 4, seed=1).requires_grad_()
    f_t = rand(B, 5, 4, 4, seed=2).requires_grad_()
    obj(rand(B, NC), None, labels(), s_feats=[f_s], t_feats=[f_t])["loss"].backward()
    assert f_t.grad is None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert obj.regressors[0].conv.weight.grad.abs().sum() > 0


def test_fitnet_default_hint_is_the_middle_stage_and_bad_stages_are_user_errors():
    assert build_objective(make_cfg(["loss=fitnet"]).loss).middle
    with pytest.raises(UserError, match="loss.stages"):
        FitNet(stages="first")
    obj = FitNet(relu=False)
    obj.build_heads([torch.Size((3, 4, 4))], [torch.Size((3, 4, 4))], NC)
    assert isinstance(obj.regressors[0].relu, nn.Identity)


class TokenNet(nn.Module):
    """A stand-in for the zoo's token models: stages are [B, N, D] row-major over `grid_size`
    (non-square here, so the grid must come from the model, not sqrt(N))."""

    def __init__(self, grid=(2, 4), dim=6, num_classes=NC):
        super().__init__()
        self.grid_size = grid
        self.embed = nn.Conv2d(1, dim, kernel_size=(4, 2), stride=(4, 2))   # 8x8 -> 2x4
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.fc = nn.Linear(dim, num_classes)
        self.stages, self.feature_dim, self.classifier = ("block",), dim, "fc"

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.block(tokens).mean(1))


def test_fitnet_and_at_lay_non_square_tokens_on_the_models_grid():
    torch.manual_seed(0)
    student = TokenNet()
    cnn = nn.Sequential()
    obj = FitNet(stages=[0])
    s_shape, t_shape = torch.Size((8, 6)), torch.Size((3, 2, 4))
    obj.build_heads([s_shape], [t_shape], NC, student, cnn)
    reg = obj.regressors[0]
    assert reg.s_grid == (2, 4) and isinstance(reg.conv, nn.Conv2d)
    tok = rand(B, 8, 6, seed=3).float()
    out = reg(tok)
    assert out.shape == (B, 3, 2, 4)
    # token n sits at row n // 4, column n % 4 of the 2x4 map
    assert torch.equal(as_map(tok, reg.s_grid)[:, :, 1, 2], tok[:, 6, :])
    at = AT()
    at.build_heads([s_shape], [t_shape], NC, student, cnn)
    assert at.grids == [((2, 4), None)]
    with pytest.raises(UserError, match="no square grid"):
        AT().build_heads([torch.Size((7, 6))], [t_shape], NC, None, None)


# ---------------------------------------------------------------- AT
def test_at_matches_numpy_over_pairs_with_pooling_and_tokens():
    obj = AT().double()
    s_feats = [rand(B, 3, 8, 8, seed=1), rand(B, 4, 4, 4, seed=2), rand(B, 16, 6, seed=3)]
    t_feats = [rand(B, 6, 4, 4, seed=4), rand(B, 8, 6, 6, seed=5), rand(B, 5, 4, 4, seed=6)]
    s_logits, y = rand(B, NC, seed=7), labels()
    terms = obj(s_logits, None, y, s_feats=s_feats, t_feats=t_feats)
    pairs = [(np_(s_feats[0]), np_(t_feats[0])),                      # student 2x larger
             (np_(s_feats[1]), np_(t_feats[1])),                      # teacher 6x6 -> 4x4
             (np_tokens_to_map(np_(s_feats[2]), 4, 4), np_(t_feats[2]))]  # tokens vs map
    at = sum(np_at_pair(fs, ft) for fs, ft in pairs)
    ce = np_ce(np_(s_logits), np_(y))
    np.testing.assert_allclose(terms["at"].item(), at, rtol=1e-10)
    np.testing.assert_allclose(terms["loss"].item(), ce + 1000.0 * at, rtol=1e-10)


def test_at_is_zero_for_equal_features_and_ignores_a_positive_per_sample_scale():
    obj = AT().double()
    f_s, f_t = rand(B, 3, 4, 4, seed=1), rand(B, 7, 8, 8, seed=2)
    s_logits, y = rand(B, NC), labels()
    same = obj(s_logits, None, y, s_feats=[f_s], t_feats=[f_s.clone()])
    assert same["at"].item() == 0.0
    base = obj(s_logits, None, y, s_feats=[f_s], t_feats=[f_t])["at"].item()
    assert base > 1e-4
    scale = torch.linspace(0.1, 30, B, dtype=torch.float64).view(B, 1, 1, 1)
    for s_scale, t_scale in ((scale, 1.0), (1.0, scale), (scale, scale.flip(0))):
        scaled = obj(s_logits, None, y, s_feats=[f_s * s_scale], t_feats=[f_t * t_scale])["at"]
        np.testing.assert_allclose(scaled.item(), base, rtol=1e-9)


def test_at_gradient_never_reaches_the_teacher_and_vectors_are_a_user_error():
    obj = AT().double()
    f_s = rand(B, 3, 4, 4, seed=1).requires_grad_()
    f_t = rand(B, 5, 4, 4, seed=2).requires_grad_()
    obj(rand(B, NC), None, labels(), s_feats=[f_s], t_feats=[f_t])["loss"].backward()
    assert f_t.grad is None and f_s.grad.abs().sum() > 0
    with pytest.raises(UserError, match="vector"):
        AT().build_heads([torch.Size((3, 4, 4))], [torch.Size((64,))], NC)
    with pytest.raises(UserError, match="loss.stages"):
        AT(stages="middle")


# ---------------------------------------------------------------- RKD
def test_rkd_matches_numpy_for_different_widths_and_layouts():
    obj = RKD()
    s_map, t_vec = rand(B, 7, 3, 3, seed=1), rand(B, 11, seed=2)
    s_logits, y = rand(B, NC, seed=3), labels()
    terms = obj(s_logits, None, y, s_feats=[s_map], t_feats=[t_vec])
    dist, angle = np_rkd(np_pool(np_(s_map)), np_(t_vec))
    ce = np_ce(np_(s_logits), np_(y))
    np.testing.assert_allclose(terms["rkd_dist"].item(), dist, rtol=1e-9)
    np.testing.assert_allclose(terms["rkd_angle"].item(), angle, rtol=1e-9)
    np.testing.assert_allclose(terms["loss"].item(), ce + 25 * dist + 50 * angle, rtol=1e-9)
    tokens = rand(B, 9, 7, seed=4)   # tokens are averaged over the sequence
    terms = obj(s_logits, None, y, s_feats=[tokens], t_feats=[t_vec])
    np.testing.assert_allclose(terms["rkd_dist"].item(), np_rkd(np_(tokens).mean(1), np_(t_vec))[0],
                               rtol=1e-9)


def test_rkd_is_invariant_to_scale_and_rotation_and_zero_for_equal_features():
    obj = RKD()
    s, t = rand(B, 8, seed=1), rand(B, 8, seed=2)
    s_logits, y = rand(B, NC), labels()

    def rkd(a, b):
        terms = obj(s_logits, None, y, s_feats=[a], t_feats=[b])
        return np.array([terms["rkd_dist"].item(), terms["rkd_angle"].item()])

    base = rkd(s, t)
    assert (base > 1e-4).all()
    q, _ = torch.linalg.qr(rand(8, 8, seed=5))        # a random orthogonal matrix
    np.testing.assert_allclose(rkd(s * 17.0, t), base, rtol=1e-9)
    np.testing.assert_allclose(rkd(s, t * 0.03), base, rtol=1e-9)
    np.testing.assert_allclose(rkd(s @ q, t), base, rtol=1e-9)
    np.testing.assert_allclose(rkd(s, t @ q.T), base, rtol=1e-9)
    np.testing.assert_allclose(rkd(3.0 * s @ q, s), 0.0, atol=1e-12)


def test_rkd_gradient_never_reaches_the_teacher():
    s = rand(B, 8, seed=1).requires_grad_()
    t = rand(B, 8, seed=2).requires_grad_()
    RKD()(rand(B, NC), None, labels(), s_feats=[s], t_feats=[t])["loss"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- CRD
N_DATA, S_DIM, T_DIM, DIM = 24, 7, 9, 8
TRAIN_Y = torch.arange(N_DATA) % 3                         # 3 classes of 8 samples


def make_crd(seed=0, **kw):
    torch.manual_seed(seed)
    opts = {"feat_dim": DIM, "nce_k": 5}
    opts.update(kw)
    obj = CRD(**opts)
    obj.setup(S_DIM, T_DIM, N_DATA, TRAIN_Y)
    return obj.double()


def crd_batch(seed=0):
    index = torch.randperm(N_DATA, generator=torch.Generator().manual_seed(seed))[:B]
    return (rand(B, NC, seed=seed + 1), rand(B, NC, seed=seed + 2), TRAIN_Y[index],
            rand(B, S_DIM, 2, 2, seed=seed + 3), rand(B, T_DIM, seed=seed + 4), index)


def call(obj, batch, rng_seed=11):
    s_logits, t_logits, y, f_s, f_t, index = batch
    torch.manual_seed(rng_seed)
    return obj(s_logits, t_logits, y, s_feats=[f_s], t_feats=[f_t], index=index)


def np_crd(obj, batch, idx, z=None):
    s_logits, _t_logits, y, f_s, f_t, _index = map(np_, batch)
    v_s = np_normalize(np_pool(f_s) @ np_(obj.embed_s.weight).T + np_(obj.embed_s.bias))
    v_t = np_normalize(f_t @ np_(obj.embed_t.weight).T + np_(obj.embed_t.bias))
    mem_s, mem_t, T = np_(obj.memory_s), np_(obj.memory_t), obj.nce_t
    out_s = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], v_s) / T)   # student anchor, teacher bank
    out_t = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], v_t) / T)
    if z is None:
        z = (out_s.mean() * N_DATA, out_t.mean() * N_DATA)
    crd_s, crd_t = np_nce(out_s / z[0], N_DATA), np_nce(out_t / z[1], N_DATA)
    return {"ce": np_ce(s_logits, y.astype(int)), "crd_student": crd_s, "crd_teacher": crd_t,
            "crd": crd_s + crd_t}, z, v_s, v_t


def test_crd_negatives_are_distinct_other_class_samples_and_k_is_capped():
    obj = make_crd(nce_k=16384)
    assert obj.k == N_DATA - 8                       # all 16 samples of the two other classes
    index = torch.tensor([0, 1, 5, 23])
    torch.manual_seed(3)
    idx = obj.contrast_indices(index)
    assert idx.shape == (4, 1 + obj.k) and torch.equal(idx[:, 0], index)
    for row in idx:
        neg = row[1:]
        assert len(set(neg.tolist())) == obj.k
        assert (TRAIN_Y[neg] != TRAIN_Y[row[0]]).all()
    anyneg = make_crd(nce_k=16384, negatives="any")
    assert anyneg.k == N_DATA - 1
    torch.manual_seed(3)
    idx = anyneg.contrast_indices(index)
    for row in idx:
        assert sorted(row[1:].tolist()) == sorted(set(range(N_DATA)) - {int(row[0])})
    small = make_crd(nce_k=3)
    assert small.k == 3
    with pytest.raises(UserError, match="no negatives"):
        CRD().setup(S_DIM, T_DIM, 5, torch.zeros(5, dtype=torch.long))
    for bad in ({"nce_t": 0}, {"nce_m": 1.0}, {"negatives": "all"}, {"nce_k": 0}):
        with pytest.raises(UserError, match=f"loss.{next(iter(bad))}"):
            CRD(**bad)


def test_crd_loss_matches_numpy_and_sets_z_once():
    obj = make_crd(kd_weight=0.5)
    batch = crd_batch(0)
    torch.manual_seed(11)
    idx = obj.contrast_indices(batch[-1])
    terms = call(obj, batch, rng_seed=11)     # same RNG state -> the same negatives
    ref, z, _, _ = np_crd(obj, batch, np_(idx).astype(int))
    for k in ("ce", "crd", "crd_student", "crd_teacher"):
        np.testing.assert_allclose(terms[k].item(), ref[k], rtol=1e-9, err_msg=k)
    np.testing.assert_allclose(np_(obj.z), z, rtol=1e-9)
    s, t = np_(batch[0]) / 4, np_(batch[1]) / 4
    ls = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    lt = t - t.max(1, keepdims=True) - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True))
    kd = 16 * np.mean((np.exp(lt) * (lt - ls)).sum(1))
    np.testing.assert_allclose(terms["kd"].item(), kd, rtol=1e-9)
    np.testing.assert_allclose(terms["loss"].item(), ref["ce"] + 0.8 * ref["crd"] + 0.5 * kd,
                               rtol=1e-9)
    # a second batch keeps the first Z (ContrastMemory sets it once)
    batch2 = crd_batch(1)
    torch.manual_seed(12)
    idx2 = obj.contrast_indices(batch2[-1])
    terms2 = call(obj, batch2, rng_seed=12)
    ref2, _z2, _, _ = np_crd(obj, batch2, np_(idx2).astype(int), z=z)
    np.testing.assert_allclose(np_(obj.z), z, rtol=1e-12)
    np.testing.assert_allclose(terms2["crd"].item(), ref2["crd"], rtol=1e-9)
    assert "kd" not in call(make_crd(), batch)


def test_crd_memory_update_rule_on_known_indices():
    obj = make_crd()
    batch = crd_batch(0)
    before_s, before_t = np_(obj.memory_s), np_(obj.memory_t)
    terms = call(obj, batch)
    # forward alone scores against the old banks and changes nothing
    np.testing.assert_array_equal(np_(obj.memory_s), before_s)
    _, _, v_s, v_t = np_crd(obj, batch, np.zeros((B, 1), dtype=int))
    obj.after_step(terms, None)
    index = np_(batch[-1]).astype(int)
    rest = np.setdiff1d(np.arange(N_DATA), index)
    for bank, before, v in ((obj.memory_s, before_s, v_s), (obj.memory_t, before_t, v_t)):
        expect = np_normalize(0.5 * before[index] + 0.5 * v)
        np.testing.assert_allclose(np_(bank)[index], expect, rtol=1e-10)
        np.testing.assert_array_equal(np_(bank)[rest], before[rest])
    obj.after_step(terms, None)                   # nothing pending: no second update
    np.testing.assert_allclose(np_(obj.memory_s)[index], np_normalize(0.5 * before_s[index] + 0.5 * v_s),
                               rtol=1e-10)


def test_crd_state_dict_round_trip_keeps_banks_z_and_heads():
    obj = make_crd()
    obj.after_step(call(obj, crd_batch(0)), None)
    state = obj.state_dict()
    assert {"memory_s", "memory_t", "z", "embed_s.weight", "embed_t.bias"} <= set(state)
    assert "labels" not in state                  # data, not state: rebuilt by bind
    fresh = make_crd(seed=99)
    assert not torch.equal(fresh.memory_s, obj.memory_s)
    fresh.load_state_dict(state)
    for k, v in obj.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    batch = crd_batch(2)
    a, b = call(obj, batch, 5), call(fresh, batch, 5)
    assert torch.equal(a["loss"], b["loss"])


def test_crd_loss_is_lower_when_student_embeddings_equal_the_teachers():
    torch.manual_seed(0)
    obj = CRD(feat_dim=DIM, nce_k=16)
    obj.setup(DIM, DIM, N_DATA, TRAIN_Y)
    obj.double()
    with torch.no_grad():   # identity embeds on equal widths: v = normalise(feature)
        for embed in (obj.embed_s, obj.embed_t):
            embed.weight.copy_(torch.eye(DIM, dtype=torch.float64))
            embed.bias.zero_()
        bank = torch.nn.functional.normalize(rand(N_DATA, DIM, seed=8), dim=1)
        obj.memory_s.copy_(bank)
        obj.memory_t.copy_(bank)
    s_logits, t_logits, y, _, _, index = crd_batch(0)
    f_t = bank[index] * 3.0                       # v_t = the bank rows of the batch
    f_random = rand(B, DIM, seed=9)
    random = obj(s_logits, t_logits, y, s_feats=[f_random], t_feats=[f_t], index=index)
    equal = obj(s_logits, t_logits, y, s_feats=[f_t.clone()], t_feats=[f_t], index=index)
    assert equal["crd_student"] < random["crd_student"] - 1.0
    assert equal["crd"] < random["crd"]


# ---------------------------------------------------------------- end to end on digits
def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run_dir, name="best.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


E2E = {  # loss -> (student, extra overrides, logged terms, head keys in the objective state)
    "fitnet": ("mlp", [], {"train/ce", "train/hint"}, {"regressors.0.conv.weight"}),
    # 8x8 digits give a 2x2 last stage, where RepDistiller's CIFAR weight 1000 swamps CE
    "at": ("resnet8", ["loss.feat_weight=100"], {"train/ce", "train/at"}, set()),
    "rkd": ("resnet8", [], {"train/ce", "train/rkd_dist", "train/rkd_angle"}, set()),
}


@pytest.mark.parametrize("loss", list(E2E))
def test_feature_method_trains_on_digits(tmp_path, digits_teacher, loss):
    student, extra, logged, heads = E2E[loss]
    run_dir = tmp_path / loss
    summary = run(make_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                                     f"student={student}", f"loss={loss}"] + extra),
                  run_dir, tty=False)
    assert summary["status"] == "finished"
    assert summary["best/test/acc1"] > 50.0                       # chance is 10%
    rows = read_metrics(run_dir)
    assert logged <= set(rows[0])
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    ckpt = _ckpt(run_dir)
    assert heads <= set(ckpt["objective"])
    assert not any(k.startswith(("regressors", "embed", "memory")) for k in ckpt["model"])


def test_fitnet_on_resnet_pairs_middle_stages(tmp_path, digits_teacher):
    run_dir = tmp_path / "fitnet"
    run(make_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                           "student=resnet8", "loss=fitnet", "trainer.epochs=1"]), run_dir,
        tty=False)
    obj = _ckpt(run_dir, "last.pt")["objective"]
    # layer2 of resnet8 on 8x8 digits: [32, 4, 4] -> RepDistiller's 1x1 conv 32 -> 32
    assert obj["regressors.0.conv.weight"].shape == (32, 32, 1, 1)
    assert 0 < read_metrics(run_dir)[0]["train/hint"] < 10


def test_crd_trains_and_resumes_bit_exactly(tmp_path, digits_teacher):
    base = DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                     "student=resnet8", "loss=crd"]
    full = tmp_path / "full"
    summary = run(make_cfg(base), full, tty=False)
    assert summary["status"] == "finished" and summary["best/test/acc1"] > 50.0
    rows = read_metrics(full)
    assert {"train/ce", "train/crd", "train/crd_student", "train/crd_teacher"} <= set(rows[0])
    assert "train/kd" not in rows[0]                              # RepDistiller: -a 0
    last = _ckpt(full, "last.pt")
    obj = last["objective"]
    n_train = 1293                                                # digits train split
    assert obj["memory_s"].shape == obj["memory_t"].shape == (n_train, 128)
    assert (obj["z"] > 0).all()
    assert {"embed_s.weight", "embed_t.weight"} <= set(obj)
    assert not any(k.startswith(("embed", "memory")) for k in last["model"])
    # rows touched by training are unit vectors (the momentum update renormalises)
    norms = obj["memory_s"].norm(dim=1)
    assert torch.isclose(norms, torch.ones(()), atol=1e-5).sum() >= 20 * 64   # one epoch's rows

    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.stop_at_step=7"]), parted, tty=False)
    run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)
    a, b = last, _ckpt(parted, "last.pt")
    for part in ("model", "objective"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    strip = lambda rs: [{k: v for k, v in r.items() if "images_per_s" not in k} for r in rs]
    assert strip(read_metrics(full)) == strip(read_metrics(parted))


def test_stage_pairs_by_relative_depth_and_out_of_range_is_a_user_error():
    from distill_cli.losses.features import stage_pairs
    assert stage_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert stage_pairs(3, 4) == [(0, 0), (1, 2), (2, 3)]      # round(1 * 3 / 2) = 2
    assert stage_pairs(4, 3, [-1, 0]) == [(0, 0), (3, 2)]
    assert stage_pairs(1, 4) == [(0, 3)]
    with pytest.raises(UserError) as info:
        stage_pairs(3, 3, [3])
    assert info.value.key == "loss.stages"


def test_penultimate_readers_take_1d_signal_models_that_stage_readers_refuse():
    """RKD / CRD read the classifier's input `[B, C]`, so a 1-D conv net (stages `[B, C, L]`)
    works with them; AT, which reads the stages, still refuses it (they would read as tokens)."""
    from distill_cli.data.fake import build as fake_data
    from distill_cli.losses.base import StepContext
    from distill_cli.models import create
    data = fake_data(shape=[1, 40], num_classes=4, train_size=24, test_size=4)
    torch.manual_seed(0)
    teacher = create("cnn1d", 4, 1, (40,)).eval().requires_grad_(False)
    student = create("cnn1d", 4, 1, (40,)).train()
    batch = next(iter(data.train.train_batches(6, 0, 1)))
    for obj in (RKD(), CRD(feat_dim=8)):
        obj.bind(student, teacher, data)
        terms = obj.step_terms(student, teacher, batch, StepContext(1, 0, 1, 1))
        assert torch.isfinite(terms["loss"])
    with pytest.raises(UserError) as info:
        AT().bind(student, teacher, data)
    assert info.value.key == "student" and "1-D" in info.value.what
