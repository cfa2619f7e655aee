"""`unet`: a small DDPM-style U-Net backbone for diffusion / flow models (Ho et al. 2020, the
layout of their CIFAR-10 net at a CPU-friendly size), and its zoo builder returning a `Denoiser`.

net(x [B, C, H, W], time [B] float, y [B] int64 | None) -> [B, C, H, W]:

* `time` is embedded whatever its scale (the Denoiser feeds 1000 t, or EDM's c_noise = ln(sigma)/4):
  max(64, channels) sinusoids (max period 10000, as DDPM and EDM's DDPM++/ADM ports) -> Linear ->
  SiLU -> Linear, width 4 * channels. With `conditional`, a class embedding of num_classes + 1 rows
  (the last row is the NULL label, classifier-free guidance's unconditional input; y=None means
  that row) is ADDED to it. An unconditional net has no class embedding and ignores `y`. There is
  no label dropout here: replacing labels by the null label is the training objective's job.
* `conv_in` 3x3 -> levels i = 0..L-1 of width channels * channel_mult[i]: `num_res_blocks`
  ResBlocks (GroupNorm, SiLU, conv, + Linear(SiLU(emb)) per channel, GroupNorm, SiLU, dropout,
  conv, + a 1x1-conv skip when the width changes), each followed by self-attention when the level's
  resolution is in `attn_resolutions`; a stride-2 3x3 conv between levels. `mid`: ResBlock,
  attention, ResBlock at the lowest resolution. The up path mirrors it: every down ResBlock's
  output is a skip, concatenated to the input of the matching up ResBlock; between levels a 2x2
  stride-2 transposed conv (a learned depth-to-space: 1/9 of the cost of DDPM's nearest x2 + 3x3
  conv at the finer resolution, which dominated the CPU time at 28 px). `out`: GroupNorm, SiLU,
  3x3 conv back to C channels.
* Sizes: any H x W, no padding: a stride-2 conv takes n to ceil(n/2) and the up path crops
  2 ceil(n/2) back to the skip's n, so 28 px runs 28 -> 14 -> 7 -> 4 -> 2. A "resolution"
  (attn_resolutions) is a level's feature-map height; only one listed value must exist for the
  input size (a YAML serves 8, 28 and 32 px data), none existing is a UserError.
* Init: PyTorch's defaults, and (`zero_init`, DDPM's choice) the last conv of every ResBlock, the
  attention output projection and `out`'s conv start at zero, so each block starts as the identity
  and a fresh net outputs exactly 0 (set zero_init=false for a net whose untrained outputs differ).
* Attention is single-head (DDPM) through `F.scaled_dot_product_attention`.

Zoo contract (of the backbone; the `Denoiser` prefixes "net."): `stages` = each level's output at
its own resolution (`down.<i>`, before the stride-2 conv) then the bottleneck `mid`; `feature_dim`
= the bottleneck width channels * channel_mult[-1]; `out` is the output layer (`classifier`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.registry import register


def timestep_embedding(time: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] float -> [B, dim]: cos then sin of time * max_period^(-i/half), i = 0..half-1 (DDPM's
    sinusoids, ADM's ordering); an odd `dim` gets a zero last column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=time.device) / half)
    args = time.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def batch_time(time, x: torch.Tensor) -> torch.Tensor:
    """`time` as a float32 [B] tensor on x's device: a python float or a 0-d tensor is broadcast."""
    t = torch.as_tensor(time, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(x.shape[0])


def _zero_(module: nn.Module, enabled: bool) -> nn.Module:
    if enabled:
        for p in module.parameters():
            nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int,
                 zero_init: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(cout, cout, 3, padding=1), zero_init)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, ch: int, groups: int, zero_init: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero_(nn.Conv2d(ch, ch, 1), zero_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C], scale 1/sqrt(C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class DownLevel(nn.Module):
    """ResBlocks (+ attention) at one resolution; pushes each block's output onto `skips`."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]):
        super().__init__()
        self.blocks, self.attns = nn.ModuleList(blocks), nn.ModuleList(attns)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: list) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            h = attn(block(h, emb))
            skips.append(h)
        return h


class UpLevel(DownLevel):
    """ResBlocks (+ attention) at one resolution; each first concatenates the latest skip."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: list) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
        return h


class Mid(nn.Module):
    def __init__(self, ch: int, emb_dim: int, dropout: float, groups: int, zero_init: bool):
        super().__init__()
        self.block1 = ResBlock(ch, ch, emb_dim, dropout, groups, zero_init)
        self.attn = Attention(ch, groups, zero_init)
        self.block2 = ResBlock(ch, ch, emb_dim, dropout, groups, zero_init)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(h, emb)), emb)


def level_resolutions(image_size: tuple[int, int], levels: int) -> list[int]:
    """Feature-map height of each level: a stride-2 conv (padding 1) maps n to ceil(n / 2)."""
    res = [int(image_size[0])]
    for _ in range(levels - 1):
        res.append(-(-res[-1] // 2))
    return res


class UNet(nn.Module):
    """x [B, C, H, W], time [B], y [B] | None -> [B, C, H, W]; see the module docstring."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 conditional: bool, channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
                 num_res_blocks: int = 1, attn_resolutions: tuple[int, ...] = (),
                 dropout: float = 0.0, groups: int = 8, zero_init: bool = True):
        super().__init__()
        self.in_channels, self.image_size = in_channels, tuple(image_size)
        self.num_classes, self.conditional = num_classes, conditional
        emb_dim = 4 * channels
        # DDPM embeds `channels` sinusoids; at least 64 here so a 16-wide net still resolves
        # nearby times (progressive distillation's 1/1024 grid) at any time scale
        self.time_channels = max(64, channels)
        self.time_embed = nn.Sequential(nn.Linear(self.time_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        # row num_classes is the null label (classifier-free guidance)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if conditional else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        res = level_resolutions(image_size, len(channel_mult))
        args = (emb_dim, dropout, groups, zero_init)

        def attn(ch: int, level: int) -> nn.Module:
            return Attention(ch, groups, zero_init) if res[level] in attn_resolutions \
                else nn.Identity()

        self.down, self.downsample, skip_ch, ch = nn.ModuleList(), nn.ModuleList(), [], channels
        for i, mult in enumerate(channel_mult):
            width, blocks = channels * mult, []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width, *args))
                ch = width
                skip_ch.append(ch)
            self.down.append(DownLevel(blocks, [attn(ch, i) for _ in blocks]))
            if i < len(channel_mult) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = Mid(ch, *args)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channel_mult))):
            width, blocks = channels * channel_mult[i], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch + skip_ch.pop(), width, *args))
                ch = width
            self.up.append(UpLevel(blocks, [attn(ch, i) for _ in blocks]))
            if i > 0:
                self.upsample.append(nn.ConvTranspose2d(ch, ch, 2, stride=2))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(),
                                 _zero_(nn.Conv2d(ch, in_channels, 3, padding=1), zero_init))
        self.stages = tuple(f"down.{i}" for i in range(len(channel_mult))) + ("mid",)
        self.feature_dim = channels * channel_mult[-1]
        self.classifier = "out"

    def embed(self, time, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(batch_time(time, x), self.time_channels))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        return emb

    def forward(self, x: torch.Tensor, time, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"unet expects [B, {self.in_channels}, H, W] images, got "
                             f"{tuple(x.shape)}")
        emb = self.embed(time, y, x)
        h = self.conv_in(x)
        skips: list[torch.Tensor] = []
        for i, level in enumerate(self.down):
            h = level(h, emb, skips)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, level in enumerate(self.up):
            h = level(h, emb, skips)
            if i < len(self.upsample):  # an odd n went down to ceil(n/2): crop 2 ceil(n/2) to n
                h = self.upsample[i](h)[..., :skips[-1].shape[-2], :skips[-1].shape[-1]]
        return self.out(h)


def option_error(arch: str, what: str, key: str, fix: str) -> UserError:
    return UserError(f"Architecture {arch!r}: {what}", key=key,
                     fix=f"set student.{key} (or teacher.{key}) {fix}")


def check_common(arch: str, num_classes: int, dropout: float) -> None:
    """The checks the unet and dit builders share."""
    if int(num_classes) < 1:
        raise UserError(f"Architecture {arch!r} needs num_classes >= 1 (the class embedding has "
                        f"num_classes + 1 rows, the last the null label), got {num_classes}",
                        key="arch", fix="use it with an image dataset that has class labels")
    if not 0.0 <= float(dropout) < 1.0:
        raise option_error(arch, f"dropout={dropout}", "dropout", "to a value in [0, 1)")


@register("unet")
def unet(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
         process="vp_cosine", param: str = "v", sampler: str = "auto", steps: int = 32,
         conditional: bool = False, guidance: float = 1.0, sigma_data: float = 0.5,
         channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 1,
         attn_resolutions=(), dropout: float = 0.0, groups: int = 8,
         zero_init: bool = True) -> Denoiser:
    """A `Denoiser` around a `UNet` sized for [B, in_channels, *input_size] images."""
    check_common("unet", num_classes, dropout)
    channels, num_res_blocks, groups = int(channels), int(num_res_blocks), int(groups)
    mult = tuple(int(m) for m in channel_mult)  # a list / ListConfig from YAML
    attn_res = tuple(int(r) for r in attn_resolutions)
    if channels < 1 or not mult or min(mult) < 1:
        raise option_error("unet", f"channels={channels}, channel_mult={list(mult)}",
                            "channel_mult" if channels >= 1 else "channels",
                            "to positive integers, e.g. channels=32 channel_mult=[1,2]")
    if num_res_blocks < 1:
        raise option_error("unet", f"num_res_blocks={num_res_blocks}", "num_res_blocks",
                            "to 1 or more")
    bad = [channels * m for m in mult if groups < 1 or (channels * m) % groups]
    if bad:
        raise option_error("unet", f"groups={groups} does not divide the level widths {bad}",
                            "groups", "to a divisor of channels (GroupNorm), e.g. 8")
    res = level_resolutions(input_size, len(mult))
    if attn_res and not set(attn_res) & set(res):  # some may miss: one YAML serves 8-32 px data
        raise option_error("unet", f"attn_resolutions {list(attn_res)} match no level (levels "
                            f"run at {res} for {tuple(input_size)} inputs)", "attn_resolutions",
                            f"to include one of {res} (or [] for no attention)")
    net = UNet(int(in_channels), tuple(input_size), int(num_classes), bool(conditional),
               channels, mult, num_res_blocks, attn_res, float(dropout), groups, bool(zero_init))
    return Denoiser(net, process=process, param=param, num_classes=int(num_classes),
                    conditional=bool(conditional), sampler=sampler, steps=int(steps),
                    guidance=float(guidance), sigma_data=float(sigma_data),
                    stages=net.stages, feature_dim=net.feature_dim)
