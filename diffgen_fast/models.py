"""A small trained denoiser with EDM preconditioning, to compare against the exact optima (docs/science.md 4, 5, 7).

EDMPrecondMLP (Karras et al. 2022, "Elucidating the design space", Table 1):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4

with F an MLP (SiLU) on [c_in x, Fourier features of c_noise]; the noise embedding is also added to every hidden
layer. EDMPrecondUNet has the same preconditioning and call convention with F a small convolutional UNet (two
resolution levels, residual conv blocks with GroupNorm and SiLU, the noise embedding added in every block), for
image-shaped items (C, H, W) with even H and W.
train_denoiser minimises EDM's loss E_{sigma, y, n} lambda(sigma) ||D(y + sigma n; sigma) - y||^2 with
lambda = (sigma^2 + sd^2) / (sigma sd)^2 and ln(sigma) ~ N(P_mean, P_std^2), by Adam, reproducibly from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from diffgen_fast.errors import InputError, InputTypeError

__all__ = ["EDMPrecondMLP", "EDMPrecondUNet", "train_denoiser"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class EDMPrecondMLP(torch.nn.Module):
    """MLP denoiser with EDM preconditioning and EDM's call convention.

    Args:
        d: the data dimension (items of shape (d,)) or an item shape such as (1, 8, 8).
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        sigma_data: EDM's sigma_data (the data's standard deviation scale).
        n_freq: Fourier features of c_noise (2 n_freq embedding channels).
        seed: when given, the weights are initialised from this seed without touching the global RNG.
    forward(x [M, *shape] (or [M, d]), sigma (float, 0-d, [M] or [M, 1, 1, 1]), class_labels=None) -> [M, *shape]
    in x's dtype (computed in the parameters' dtype, float32 by default).
    """

    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(
        self,
        d: Union[int, Sequence[int]],
        *,
        hidden: int = 256,
        depth: int = 3,
        sigma_data: float = 0.5,
        n_freq: int = 8,
        seed: Optional[int] = None,
    ):
        super().__init__()
        if _is_int(d):
            shape = (int(d),)
        elif isinstance(d, (tuple, list, torch.Size)) and len(d) > 0 and all(_is_int(s) for s in d):
            shape = tuple(int(s) for s in d)
        else:
            raise InputTypeError(f"d: expected an int dimension or an item shape (tuple of ints), got {d!r}")
        if any(s < 1 for s in shape):
            raise InputError(f"d: expected positive sizes, got {d!r}")
        for name, v in (("hidden", hidden), ("depth", depth), ("n_freq", n_freq)):
            if not _is_int(v) or v < 1:
                raise InputError(f"{name}: expected an int >= 1, got {v!r}")
        if not (isinstance(sigma_data, (int, float)) and not isinstance(sigma_data, bool) and sigma_data > 0):
            raise InputError(f"sigma_data: expected a number > 0, got {sigma_data!r}")
        self.shape = shape
        self.d = math.prod(shape)
        self.hidden = int(hidden)
        self.depth = int(depth)
        self.sigma_data = float(sigma_data)
        self.n_freq = int(n_freq)
        self.img_channels = shape[0] if len(shape) == 3 else 1
        self.img_resolution = shape[-1] if len(shape) == 3 else None
        self.label_dim = 0
        self.register_buffer("freqs", (2.0 ** torch.arange(self.n_freq, dtype=torch.float32)) * math.pi / 4)
        if seed is None:
            self._build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                self._build()

    def _build(self) -> None:
        e, h = 2 * self.n_freq, self.hidden
        self.inp = torch.nn.Linear(self.d + e, h)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(h, h) for _ in range(self.depth - 1))
        self.emb = torch.nn.ModuleList(torch.nn.Linear(e, h) for _ in range(self.depth - 1))
        self.out = torch.nn.Linear(h, self.d)
        torch.nn.init.zeros_(self.out.weight)  # F = 0 at init: D starts as c_skip x + c_out b
        torch.nn.init.zeros_(self.out.bias)

    @property
    def device(self) -> torch.device:
        return self.out.weight.device

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def embed(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Fourier features [cos, sin](freqs * c_noise) of the noise level, [M] -> [M, 2 n_freq]."""
        a = c_noise[:, None] * self.freqs[None, :]
        return torch.cat([a.cos(), a.sin()], dim=1)

    def F(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """The raw network F(c_in x, c_noise) on flat inputs [M, d], c_noise [M]."""
        emb = self.embed(c_noise)
        h = torch.nn.functional.silu(self.inp(torch.cat([x_in, emb], dim=1)))
        for lin, el in zip(self.layers, self.emb):
            h = torch.nn.functional.silu(lin(h) + el(emb))
        return self.out(h)

    def forward(self, x, sigma, class_labels=None):
        if class_labels is not None:
            raise InputError(f"class_labels: {type(self).__name__} is unconditional")
        xt = torch.as_tensor(x)
        if xt.ndim < 1 or xt.shape[0] < 1 or math.prod(xt.shape[1:]) != self.d:
            raise InputError(f"x: expected [M, *{self.shape}] (or [M, {self.d}]), got {tuple(xt.shape)}")
        M = xt.shape[0]
        p = self.out.weight
        xf = xt.reshape(M, self.d).to(device=p.device, dtype=p.dtype)
        s = torch.as_tensor(sigma, device=p.device, dtype=p.dtype).reshape(-1)
        if s.numel() == 1:
            s = s.expand(M)
        elif s.numel() != M:
            raise InputError(f"sigma: expected a scalar or {M} values, got {tuple(torch.as_tensor(sigma).shape)}")
        if not bool((s > 0).all()):
            raise InputError("sigma: expected values > 0")
        sd2 = self.sigma_data**2
        s2 = s * s
        c_skip = sd2 / (s2 + sd2)
        c_out = s * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1.0 / (s2 + sd2).sqrt()
        c_noise = s.log() / 4
        out = c_skip[:, None] * xf + c_out[:, None] * self.F(c_in[:, None] * xf, c_noise)
        return out.to(device=xt.device, dtype=xt.dtype if xt.is_floating_point() else p.dtype).reshape(xt.shape)


class _ResBlock(torch.nn.Module):
    """GroupNorm-SiLU-conv3x3, + noise embedding (per channel), GroupNorm-SiLU-conv3x3, residual (1x1 if needed)."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.n1 = torch.nn.GroupNorm(_groups(cin), cin)
        self.c1 = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.e = torch.nn.Linear(emb, cout)
        self.n2 = torch.nn.GroupNorm(_groups(cout), cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, padding=1)
        torch.nn.init.zeros_(self.c2.weight)  # each block starts as the identity (its skip)
        torch.nn.init.zeros_(self.c2.bias)
        self.skip = torch.nn.Conv2d(cin, cout, 1) if cin != cout else torch.nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        silu = torch.nn.functional.silu
        h = self.c1(silu(self.n1(x))) + self.e(emb)[:, :, None, None]
        h = self.c2(silu(self.n2(h)))
        return self.skip(x) + h


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


class EDMPrecondUNet(EDMPrecondMLP):
    """A small convolutional UNet denoiser with EDM preconditioning and EDM's call convention (see EDMPrecondMLP).

    F(c_in x, c_noise): conv3x3 in; at full resolution ``blocks`` residual blocks of ``channels`` channels; a stride-2
    conv down; ``blocks`` residual blocks of 2 ``channels`` at half resolution (the bottleneck); nearest-neighbour
    up, concatenation with the full-resolution skip and ``blocks`` residual blocks back to ``channels``;
    GroupNorm-SiLU-conv3x3 out (zero-initialised, so F = 0 at init). The noise level enters as Fourier features of
    c_noise through a 2-layer MLP, added per channel in every residual block. With the defaults (channels 32,
    blocks 1) it has ~0.2 M parameters and trains on 8x8 digits at roughly 10 steps of batch 128 per second on
    2 CPU cores.

    Args:
        shape: the item shape (C, H, W), H and W even.
        channels, blocks: width at full resolution and residual blocks per stage.
        sigma_data, n_freq, seed: as in EDMPrecondMLP.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        channels: int = 32,
        blocks: int = 1,
        sigma_data: float = 0.5,
        n_freq: int = 8,
        seed: Optional[int] = None,
    ):
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 3 and all(_is_int(v) for v in shape)):
            raise InputTypeError(f"shape: expected an image item shape (C, H, W), got {shape!r}")
        if any(v < 1 for v in shape) or shape[1] % 2 or shape[2] % 2:
            raise InputError(f"shape: expected positive sizes with even H and W, got {tuple(shape)!r}")
        for name, v in (("channels", channels), ("blocks", blocks)):
            if not _is_int(v) or v < 1:
                raise InputError(f"{name}: expected an int >= 1, got {v!r}")
        self.channels = int(channels)
        self.blocks = int(blocks)
        super().__init__(tuple(shape), hidden=int(channels), depth=1, sigma_data=sigma_data, n_freq=n_freq, seed=seed)

    def _build(self) -> None:
        C, ch, e = self.shape[0], self.channels, 2 * self.n_freq
        emb = 4 * ch
        self.emb_mlp = torch.nn.Sequential(torch.nn.Linear(e, emb), torch.nn.SiLU(), torch.nn.Linear(emb, emb))
        self.conv_in = torch.nn.Conv2d(C, ch, 3, padding=1)
        self.enc = torch.nn.ModuleList(_ResBlock(ch, ch, emb) for _ in range(self.blocks))
        self.down = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = torch.nn.ModuleList(_ResBlock(ch if i == 0 else 2 * ch, 2 * ch, emb) for i in range(self.blocks))
        self.dec = torch.nn.ModuleList(_ResBlock(3 * ch if i == 0 else ch, ch, emb) for i in range(self.blocks))
        self.norm_out = torch.nn.GroupNorm(_groups(ch), ch)
        self.out = torch.nn.Conv2d(ch, C, 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)  # F = 0 at init: D starts as c_skip x + c_out b
        torch.nn.init.zeros_(self.out.bias)

    def F(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """The raw network F(c_in x, c_noise) on flat inputs [M, d], c_noise [M] -> [M, d]."""
        M = x_in.shape[0]
        emb = self.emb_mlp(self.embed(c_noise))
        h = self.conv_in(x_in.reshape(M, *self.shape))
        for blk in self.enc:
            h = blk(h, emb)
        skip = h
        h = self.down(h)
        for blk in self.mid:
            h = blk(h, emb)
        h = torch.nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        h = torch.cat([h, skip], dim=1)
        for blk in self.dec:
            h = blk(h, emb)
        h = self.out(torch.nn.functional.silu(self.norm_out(h)))
        return h.reshape(M, self.d)


def train_denoiser(
    model: EDMPrecondMLP,
    train,
    *,
    steps: int = 2000,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    progress=False,
) -> list:
    """Train an EDM-preconditioned denoiser on a training set with EDM's loss; returns the loss of every step.

    Args:
        model: an EDMPrecondMLP / EDMPrecondUNet (or any module with the EDM call and a sigma_data attribute).
        train: TrainingSet or anything TrainingSet.coerce accepts; its item size must match the model.
        steps, batch, lr: Adam steps, minibatch size (drawn with replacement), learning rate (cosine-decayed to
            lr / 20 over the run, after a short warm-up).
        seed: seeds the batches, noise levels and noise (a private CPU generator: the run is reproducible).
        P_mean, P_std: ln(sigma) ~ N(P_mean, P_std^2).
        progress: True for a tqdm bar.
    Returns:
        list of float losses (EDM-weighted squared error per dimension), one per step.
    """
    from diffgen_fast.data import TrainingSet

    for name, v in (("steps", steps), ("batch", batch), ("seed", seed)):
        if not _is_int(v) or (v < 1 if name != "seed" else False):
            raise InputError(f"{name}: expected an int{' >= 1' if name != 'seed' else ''}, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InputError(f"lr: expected a number > 0, got {lr!r}")
    if not (isinstance(P_std, (int, float)) and P_std >= 0):
        raise InputError(f"P_std: expected a number >= 0, got {P_std!r}")
    ts = TrainingSet.coerce(train, name="train")
    if len(ts) == 0:
        raise InputError("train: empty training set")
    if ts.d != getattr(model, "d", ts.d):
        raise InputError(f"train: items of dimension {ts.d} do not match the model's d = {model.d}")
    p0 = next(model.parameters())
    dev, dt = p0.device, p0.dtype
    data = ts.flat().to(device=dev, dtype=dt)
    N = data.shape[0]
    sd = float(model.sigma_data)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=float(lr))
    warm = max(1, min(100, steps // 20))

    def lr_at(i: int) -> float:
        if i < warm:
            return lr * (i + 1) / warm
        t = (i - warm) / max(1, steps - warm)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", leave=False)
    losses = []
    model.train()
    for i in range(steps):
        idx = torch.randint(0, N, (batch,), generator=gen)
        y = data[idx.to(dev)]
        sigma = (torch.randn(batch, generator=gen) * P_std + P_mean).exp().to(device=dev, dtype=dt)
        n = torch.randn((batch, data.shape[1]), generator=gen).to(device=dev, dtype=dt)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        D = model(y + sigma[:, None] * n, sigma)
        loss = (weight[:, None] * (D - y) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return losses
