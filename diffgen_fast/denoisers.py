"""Denoisers with EDM's call convention: D(x, sigma, class_labels=None) -> the x0-prediction.

- EmpiricalDenoiser: the optimal denoiser of the empirical training distribution, D*(x) = sum_i w_i y_i.
- GaussianDenoiser: the optimal denoiser of the Gaussian with the training set's mean and covariance
  (docs/science.md 4.1).

Both take sigma as a float, a 0-d tensor, [M] or [M, 1, 1, 1] (as EDM's samplers pass it) and an optional VP signal
scale alpha (x = alpha y + sigma n); eps / score / v predictions are one call away (schedules.py).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from diffgen_fast.data import TrainingSet
from diffgen_fast.errors import InputError
from diffgen_fast.ops import softmax_denoise
from diffgen_fast.ops._checks import check_queries, per_query
from diffgen_fast.schedules import eps_from_x0, score_from_x0, v_from_x0


class _Denoiser(torch.nn.Module):
    """Common surface: shape, EDM attributes, round_sigma, eps / score / v."""

    # EDM's range: finite, so that k-diffusion's get_sigmas_karras(model.sigma_min, model.sigma_max) works; the
    # denoisers themselves accept any sigma > 0.
    sigma_min = 0.002
    sigma_max = 80.0

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

    def __call__(self, x, *args, **kwargs):
        # Numpy in, numpy out (sigma / alpha may be numpy too); torch tensors go straight through.
        if isinstance(x, np.ndarray):
            args = tuple(torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args)
            kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                      for k, v in kwargs.items()}  # fmt: skip
            out = super().__call__(torch.from_numpy(np.ascontiguousarray(x)), *args, **kwargs)
            return out.detach().cpu().numpy()
        return super().__call__(x, *args, **kwargs)

    def _check_x(self, x) -> torch.Tensor:
        xt, _ = check_queries(x, "x")
        if math.prod(xt.shape[1:]) != self.d:
            raise InputError(f"x: items of shape {tuple(xt.shape[1:])} do not match the training items {self.shape}")
        return xt

    def _derived(self, conv, x, sigma, class_labels, alpha):
        was_np = isinstance(x, np.ndarray)
        if was_np:
            x = torch.from_numpy(np.ascontiguousarray(x))
            sigma, alpha = (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for v in (sigma, alpha))
        out = conv(x, self(x, sigma, class_labels, alpha=alpha), sigma, alpha)
        return out.detach().cpu().numpy() if was_np else out

    def eps(self, x, sigma, class_labels=None, *, alpha=1.0):
        """eps-prediction (x - alpha D) / sigma."""
        return self._derived(eps_from_x0, x, sigma, class_labels, alpha)

    def score(self, x, sigma, class_labels=None, *, alpha=1.0):
        """Score (alpha D - x) / sigma^2 of the noisy distribution."""
        return self._derived(score_from_x0, x, sigma, class_labels, alpha)

    def v(self, x, sigma, class_labels=None, *, alpha=1.0):
        """v-prediction alpha eps - sigma D."""
        return self._derived(v_from_x0, x, sigma, class_labels, alpha)


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


class KNNDenoiser(_Denoiser):
    """Approximate empirical denoiser for very large N (Niedoba et al. 2024; docs/science.md section 8).

    Per query: the k nearest training points of x / alpha (exact kNN, or a faiss index) get their exact softmax
    logits; the other N - k points are estimated by importance sampling: `n_samples` indices drawn uniformly from
    the whole set (those that fall among the k neighbours are dropped), each standing for N / n_samples points. The
    self-normalised estimate

        D(x) = (sum_K w_j y_j + N/s sum_S w_i y_i) / (sum_K w_j + N/s sum_S w_i),  w = exp(-||x - a y||^2 / 2 s^2)

    is exact when the neighbours carry all the mass (small sigma, or k = N) and unbiased in the tail sums otherwise.
    Cost per call: the kNN search plus O((k + n_samples) d) per query, independent of N after the search.

    Args:
        train: TrainingSet or anything TrainingSet.coerce accepts.
        k: neighbours computed exactly (clipped to N).
        n_samples: uniform tail samples per query (0: neighbours only).
        knn_backend: backend of the neighbour search ("auto", "cpu", "cuda", "faiss", "torch"); with a CUDA
            training set the search and everything after it stays on the GPU (no host round trip).
        index: optional faiss index spec / FaissIndex / saved path for the search (see knn(index=...)).
        seed: seed of the tail samples (a generator advanced call after call; reproducible from construction).

    After each call, `last_error` holds per-query diagnostics: `tail_bound` = (N - k) exp(z_k - z_1) / l, an upper
    bound on the weight fraction outside the neighbours (certified), `tail_fraction` = the estimated weight fraction
    of the tail, and `tail_stderr` = the standard error of the tail's share of the denominator from the samples.
    """

    def __init__(
        self, train, *, k: int = 64, n_samples: int = 256, knn_backend: str = "auto", index=None, seed: int = 0
    ):
        ts = TrainingSet.coerce(train, name="train")
        if len(ts) == 0:
            raise InputError("train: empty training set; expected at least one point")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k: expected an int >= 1, got {k!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
            raise InputError(f"n_samples: expected an int >= 0, got {n_samples!r}")
        ts.check_finite()
        super().__init__(ts)
        self.train_set = ts
        self.k = min(k, len(ts))
        self.n_samples = n_samples
        self.knn_backend = knn_backend
        self.index = index
        self._gen = torch.Generator(device="cpu").manual_seed(seed)
        self.last_error: dict = {}

    def forward(self, x, sigma, class_labels=None, *, alpha=1.0):
        from diffgen_fast.ops import knn

        if class_labels is not None:
            raise InputError("class_labels: KNNDenoiser is unconditional; build one per class for conditioning")
        xt = self._check_x(x)
        M, N, k = xt.shape[0], len(self.train_set), self.k
        dev = self.train_set.device
        s = per_query(sigma, M, "sigma", device=dev)
        a = per_query(alpha, M, "alpha", device=dev)
        x64 = xt.reshape(M, -1).to(device=dev, dtype=torch.float64)
        q = (x64 / a[:, None]).to(xt.dtype if xt.dtype != torch.bfloat16 else torch.float32)
        if self.index is not None:
            _, nbr = knn(q, self.train_set, k, index=self.index)
        else:
            _, nbr = knn(q, self.train_set, k, backend=self.knn_backend)
        nbr = torch.as_tensor(nbr).to(dev)
        inv2s2 = 0.5 / (s * s)

        def logits(idx: torch.Tensor) -> torch.Tensor:  # [M, c] exact logits of the rows idx [M, c]
            rows = self.train_set.flat()[idx.reshape(-1)].to(torch.float64).reshape(*idx.shape, -1)
            diff = x64[:, None, :] - a[:, None, None] * rows
            return -(diff * diff).sum(-1) * inv2s2[:, None], rows

        z_k, y_k = logits(nbr)
        m = z_k.max(dim=1).values
        w_k = torch.exp(z_k - m[:, None])
        l_k = w_k.sum(dim=1)
        o = (w_k[:, :, None] * y_k).sum(dim=1)
        l_t = torch.zeros(M, dtype=torch.float64, device=dev)
        se = torch.zeros(M, dtype=torch.float64, device=dev)
        if self.n_samples and k < N:
            samp = torch.randint(0, N, (M, self.n_samples), generator=self._gen).to(dev)
            keep = ~(samp[:, :, None] == nbr[:, None, :]).any(dim=2)
            z_s, y_s = logits(samp)
            w_s = torch.where(keep, torch.exp(z_s - m[:, None]), torch.zeros_like(z_s)) * (N / self.n_samples)
            l_t = w_s.sum(dim=1)
            o = o + (w_s[:, :, None] * y_s).sum(dim=1)
            se = w_s.std(dim=1) * math.sqrt(self.n_samples) if self.n_samples > 1 else se
        l = l_k + l_t
        zk_min = z_k.min(dim=1).values
        bound = (N - k) * torch.exp(zk_min - m) / l_k if k < N else torch.zeros_like(l)
        self.last_error = {
            "tail_bound": bound.clamp(max=1.0).cpu(),
            "tail_fraction": (l_t / l).cpu(),
            "tail_stderr": (se / l).cpu(),
        }
        out = o / l[:, None]
        return out.to(device=xt.device, dtype=xt.dtype).reshape(xt.shape)
