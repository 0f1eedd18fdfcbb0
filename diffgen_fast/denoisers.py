"""Denoisers with EDM's call convention: D(x, sigma, class_labels=None) -> the x0-prediction.

- EmpiricalDenoiser: the optimal denoiser of the empirical training distribution, D*(x) = sum_i w_i y_i.
- GaussianDenoiser: the optimal denoiser of the Gaussian with the training set's mean and covariance (SCIENCE.md 4).

Both take sigma as a float, a 0-d tensor, [M] or [M, 1, 1, 1] (as EDM's samplers pass it) and an optional VP signal
scale alpha (x = alpha y + sigma n); eps / score / v predictions are one call away (schedules.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError
from diffgen_fast.ops import softmax_denoise
from diffgen_fast.ops._checks import check_queries, per_query
from diffgen_fast.schedules import eps_from_x0, score_from_x0, v_from_x0


class _Denoiser(torch.nn.Module):
    """Common surface: shape, EDM attributes, round_sigma, eps / score / v."""

    sigma_min = 0.0
    sigma_max = float("inf")

    def __init__(self, train: TrainingSet):
        super().__init__()
        self.shape = tuple(train.shape)
        self.d = train.d
        self.n_train = len(train)
        self.img_channels = self.shape[0] if len(self.shape) == 3 else 1
        self.img_resolution = self.shape[-1] if len(self.shape) == 3 else None
        self.label_dim = 0

    @property
    def device(self) -> torch.device:
        """Where the denoiser's data lives; sample() draws on this device by default."""
        train = getattr(self, "train_set", None)
        if train is not None:
            return torch.device(train.device)
        return next(self.buffers()).device

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _check_x(self, x) -> torch.Tensor:
        xt, _ = check_queries(x, "x")
        if math.prod(xt.shape[1:]) != self.d:
            raise InputError(f"x: items of shape {tuple(xt.shape[1:])} do not match the training items {self.shape}")
        return xt

    def eps(self, x, sigma, class_labels=None, *, alpha=1.0):
        """eps-prediction (x - alpha D) / sigma."""
        return eps_from_x0(x, self(x, sigma, class_labels, alpha=alpha), sigma, alpha)

    def score(self, x, sigma, class_labels=None, *, alpha=1.0):
        """Score (alpha D - x) / sigma^2 of the noisy distribution."""
        return score_from_x0(x, self(x, sigma, class_labels, alpha=alpha), sigma, alpha)

    def v(self, x, sigma, class_labels=None, *, alpha=1.0):
        """v-prediction alpha eps - sigma D."""
        return v_from_x0(x, self(x, sigma, class_labels, alpha=alpha), sigma, alpha)


class EmpiricalDenoiser(_Denoiser):
    """The empirical optimal denoiser D*(x) = sum_i softmax_i(-||x - alpha y_i||^2 / 2 sigma^2) y_i.

    Args:
        train: a TrainingSet, or anything TrainingSet.coerce accepts ([N, *shape] tensor / array, a path).
        backend, precision: passed to softmax_denoise.
    forward(x [M, *shape], sigma, class_labels=None, *, alpha=1.0) -> [M, *shape] in x's dtype.
    With class_labels ([M] ints or [M, label_dim] one-hot), each query only sees the training points of its class.
    """

    def __init__(self, train, *, backend: str = "auto", precision: str = "auto"):
        ts = TrainingSet.coerce(train, name="train")
        if len(ts) == 0:
            raise InputError("train: empty training set; expected at least one point")
        ts.check_finite()
        super().__init__(ts)
        self.train_set = ts
        self.backend = backend
        self.precision = precision
        if ts.labels is not None:
            self.label_dim = int(ts.labels.max()) + 1
        self._by_class: dict[int, TrainingSet] = {}

    def forward(self, x, sigma, class_labels=None, *, alpha=1.0):
        xt = self._check_x(x)
        if class_labels is None:
            return softmax_denoise(xt, self.train_set, sigma, alpha, backend=self.backend, precision=self.precision)
        return self._conditional(xt, sigma, alpha, class_labels)

    def _conditional(self, x: torch.Tensor, sigma, alpha, class_labels) -> torch.Tensor:
        if self.train_set.labels is None:
            raise InputError("class_labels: this training set has no labels")
        M = x.shape[0]
        lab = torch.as_tensor(class_labels)
        if lab.ndim == 2:
            lab = lab.argmax(dim=1)
        lab = lab.reshape(-1).long()
        if lab.numel() != M:
            raise InputError(f"class_labels: expected {M} labels (or [M, label_dim] one-hot), got {tuple(lab.shape)}")
        s = per_query(sigma, M, "sigma", device=x.device)
        a = per_query(alpha, M, "alpha", device=x.device)
        out = torch.empty_like(x)
        for c in lab.unique().tolist():
            if c not in self._by_class:
                idx = (self.train_set.labels == c).nonzero().reshape(-1)
                if idx.numel() == 0:
                    raise InputError(f"class_labels: class {c} has no training points")
                self._by_class[c] = self.train_set.subset(idx)
            rows = (lab == c).nonzero().reshape(-1).to(x.device)
            out[rows] = softmax_denoise(
                x[rows], self._by_class[c], s[rows], a[rows], backend=self.backend, precision=self.precision
            )
        return out


class GaussianDenoiser(_Denoiser):
    """Optimal denoiser of N(mu, Sigma) fitted to the training set (float64 streamed statistics).

        D_G(x) = mu + U diag(alpha lam / (alpha^2 lam + sigma^2)) U^T (x - alpha mu)

    Args:
        train: TrainingSet or anything TrainingSet.coerce accepts.
        rank: keep only the top `rank` eigenpairs of Sigma (None: all).
    forward(x [M, *shape], sigma, class_labels=None, *, alpha=1.0) -> [M, *shape] in x's dtype.
    """

    def __init__(self, train, *, rank: Optional[int] = None):
        ts = TrainingSet.coerce(train, name="train")
        if len(ts) == 0:
            raise InputError("train: empty training set; expected at least one point")
        ts.check_finite()
        super().__init__(ts)
        mu = ts.mean(dtype=torch.float64).reshape(-1).cpu()
        cov = ts.covariance(dtype=torch.float64).cpu()
        lam, U = torch.linalg.eigh(cov)
        lam = lam.clamp(min=0.0).flip(0)
        U = U.flip(1)
        if rank is not None:
            if not (1 <= rank <= lam.numel()):
                raise InputError(f"rank: expected 1 <= rank <= d = {lam.numel()}, got {rank}")
            lam, U = lam[:rank], U[:, :rank]
        self.register_buffer("mean", mu)
        self.register_buffer("eigvals", lam)
        self.register_buffer("eigvecs", U)

    def forward(self, x, sigma, class_labels=None, *, alpha=1.0):
        xt = self._check_x(x)
        M = xt.shape[0]
        dev = self.mean.device
        s = per_query(sigma, M, "sigma", device=dev)
        a = per_query(alpha, M, "alpha", device=dev)
        x64 = xt.reshape(M, -1).to(device=dev, dtype=torch.float64)
        c = (x64 - a[:, None] * self.mean[None, :]) @ self.eigvecs
        lam = self.eigvals[None, :]
        c = c * (a[:, None] * lam / (a[:, None] ** 2 * lam + (s * s)[:, None]))
        out = self.mean[None, :] + c @ self.eigvecs.T
        return out.to(device=xt.device, dtype=xt.dtype).reshape(xt.shape)
