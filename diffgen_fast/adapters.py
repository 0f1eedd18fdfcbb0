"""Adapters that let diffgen-fast denoisers drive other libraries' samplers.

- k-diffusion (Crowson): its samplers call ``model(x, sigma * s_in, **extra_args)`` and expect the denoised image,
  which is EDM's convention, so :func:`to_k_diffusion` is a thin wrapper that adds ``sigma_min`` / ``sigma_max``.
- diffusers (Hugging Face): :class:`UNet2DModelStandIn` answers ``unet(sample, timestep).sample`` with exactly what a
  perfectly trained ``UNet2DModel`` would return (eps, v or x0 prediction) for a VP / DDPM schedule, so diffusers'
  schedulers (DDIM, DDPM, Euler, DPM-Solver, ...) and pipelines can sample the empirical optimal denoiser.

Neither library is imported by this module at import time; both are optional.

Conventions (schedules.py): VP x_t = alpha_t y + sigma_t n with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t);
the denoiser is called in VE form D(x_t / alpha_t, sigma_t / alpha_t) (valid for any EDM-convention denoiser), and
eps = (x_t - alpha_t D) / sigma_t, v = alpha_t eps - sigma_t D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from diffgen_fast.errors import InputError, InputTypeError
from diffgen_fast.schedules import edm_sigmas, eps_from_x0, v_from_x0

__all__ = [
    "KDiffusionDenoiser",
    "to_k_diffusion",
    "UNet2DModelStandIn",
    "StandInOutput",
    "PREDICTION_TYPES",
    "INTERPOLATIONS",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INTERPOLATIONS = ("linear", "log_linear", "continuous")


def _positive_finite(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"{name}: expected a real number, got {value!r}") from e
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name}: expected a finite value > 0, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------------------------------
# k-diffusion
# ---------------------------------------------------------------------------------------------------------------------


class KDiffusionDenoiser(torch.nn.Module):
    """A denoiser in k-diffusion's model convention.

    k-diffusion's samplers (``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``, ...) call
    ``model(x [B, *shape], sigma [B], **extra_args)`` and expect the denoised x0-prediction ``[B, *shape]`` back.

    Args:
        denoiser: any EDM-convention callable D(x, sigma[, class_labels]) -> x0-prediction (EmpiricalDenoiser, ...).
        sigma_min, sigma_max: the noise range reported to samplers that ask for it (``model.sigma_min``); default:
            the denoiser's own if finite and > 0, else EDM's 0.002 and 80.
    forward(x [B, *shape], sigma (float, [B] or [B, 1, ...]), class_labels=None) -> [B, *shape] in x's dtype.
    Only ``class_labels`` is accepted in ``extra_args``.
    """

    def __init__(self, denoiser: Callable, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
        super().__init__()
        if not callable(denoiser):
            raise InputTypeError(f"denoiser: expected a callable D(x, sigma), got {type(denoiser).__name__}")
        self.inner = denoiser
        self.sigma_min = _positive_finite(
            sigma_min if sigma_min is not None else _own_sigma(denoiser, "sigma_min", 0.002), "sigma_min"
        )
        self.sigma_max = _positive_finite(
            sigma_max if sigma_max is not None else _own_sigma(denoiser, "sigma_max", 80.0), "sigma_max"
        )
        if self.sigma_min > self.sigma_max:
            raise InputError(
                f"sigma_min, sigma_max: expected sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        self.shape = getattr(denoiser, "shape", None)

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        class_labels = extra_args.pop("class_labels", None)
        if extra_args:
            raise InputError(
                f"extra_args: unexpected keys {sorted(extra_args)}; only 'class_labels' is passed to the denoiser"
            )
        args = (x, sigma) if class_labels is None else (x, sigma, class_labels)
        return self.inner(*args).to(x.dtype)

    def get_sigmas(self, n: int, rho: float = 7.0, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Karras grid of n noise levels from sigma_max to sigma_min plus a final 0, [n + 1] (as k-diffusion's
        ``get_sigmas_karras(n, model.sigma_min, model.sigma_max, rho)``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n: expected an int >= 1, got {n!r}")
        return edm_sigmas(n, self.sigma_min, self.sigma_max, rho, dtype=dtype, device=device)


def _own_sigma(denoiser, name: str, default: float) -> float:
    v = getattr(denoiser, name, None)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) and v > 0 else default


def to_k_diffusion(
    denoiser: Callable, *, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None
) -> KDiffusionDenoiser:
    """Wrap an EDM-convention denoiser for k-diffusion's samplers (see :class:`KDiffusionDenoiser`).

    Example::

        model = to_k_diffusion(EmpiricalDenoiser(train))
        sigmas = k_diffusion.sampling.get_sigmas_karras(18, model.sigma_min, model.sigma_max, rho=7.0)
        x = k_diffusion.sampling.sample_heun(model, torch.randn(8, *train.shape) * sigmas[0], sigmas)
    """
    if isinstance(denoiser, KDiffusionDenoiser) and sigma_min is None and sigma_max is None:
        return denoiser
    return KDiffusionDenoiser(denoiser, sigma_min=sigma_min, sigma_max=sigma_max)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StandInOutput:
    """What ``UNet2DModelStandIn(...)(sample, t)`` returns when diffusers is not installed (else ``UNet2DOutput``).

    sample: [B, *shape] model output (eps, v or x0 prediction).
    """

    sample: torch.Tensor


class _Config(dict):
    """A dict with attribute access, like diffusers' FrozenDict model config."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _output(sample: torch.Tensor):
    try:
        from diffusers.models.unets.unet_2d import UNet2DOutput
    except Exception:  # diffusers absent or laid out differently
        return StandInOutput(sample=sample)
    return UNet2DOutput(sample=sample)


def _check_alphas_cumprod(abar) -> torch.Tensor:
    if isinstance(abar, np.ndarray):
        abar = torch.from_numpy(np.ascontiguousarray(abar))
    if not isinstance(abar, torch.Tensor):
        try:
            abar = torch.as_tensor(abar)
        except Exception as e:
            raise InputTypeError(f"alphas_cumprod: expected a 1-d tensor of floats, got {type(abar).__name__}") from e
    abar = abar.detach().to(device="cpu", dtype=torch.float64)
    if abar.ndim != 1 or abar.numel() < 2:
        raise InputError(f"alphas_cumprod: expected a 1-d tensor of >= 2 values [T], got shape {tuple(abar.shape)}")
    if not bool(torch.isfinite(abar).all()) or not bool(((abar > 0) & (abar <= 1)).all()):
        raise InputError("alphas_cumprod: expected finite values in (0, 1]")
    return abar


class UNet2DModelStandIn(torch.nn.Module):
    """A stand-in for a perfectly trained diffusers ``UNet2DModel`` on a VP (DDPM) schedule.

    Given the VP sample x_t = alpha_t y + sigma_t n ``[B, *shape]`` and a timestep, it finds (alpha_t, sigma_t),
    calls the denoiser as D(x_t / alpha_t, sigma_t / alpha_t) and returns the prediction type the scheduler expects:
    ``"epsilon"`` (x_t - alpha_t D) / sigma_t, ``"v_prediction"`` alpha_t eps - sigma_t D, or ``"sample"`` D.

    Timestep -> noise level, in this order:
      1. with a ``scheduler`` that has ``sigmas`` (Euler, Heun, DPM-Solver, ...): a timestep found in
         ``scheduler.timesteps`` (at the scheduler's current ``step_index`` first) uses the scheduler's own VE sigma
         at that index, alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t: bit-for-bit what the scheduler
         used in ``scale_model_input`` and uses in ``step``;
      2. otherwise from ``alphas_cumprod`` [T]: an integer t gives abar_t = alphas_cumprod[t] exactly; a float t is
         interpolated like diffusers does: ``"linear"`` interpolates the VE sigma sqrt((1 - abar) / abar) linearly
         in t (EulerDiscreteScheduler's ``interpolation_type="linear"``), ``"log_linear"`` interpolates log sigma
         (the inverse of the schedulers' ``_sigma_to_t``, used with Karras / exponential / beta sigmas),
         ``"continuous"`` reads t = log(sigma) / 4 (EulerDiscreteScheduler's ``timestep_type="continuous"``).

    Args:
        denoiser: EDM-convention callable D(x [B, *shape], sigma [B][, class_labels]) -> x0-prediction.
        prediction_type: one of "epsilon", "v_prediction", "sample"; default the scheduler's, else "epsilon".
        alphas_cumprod: [T] abar_t of the training schedule; default ``scheduler.alphas_cumprod``.
        scheduler: a diffusers scheduler (optional; supplies alphas_cumprod, prediction_type and exact sigmas).
        interpolation: "linear", "log_linear" or "continuous" for float timesteps (step 2); default from the
            scheduler's config (timestep_type, use_karras_sigmas, ...), else "linear".
        shape: item shape (C, H, W); default ``denoiser.shape``.
        dtype: the dtype reported as ``unet.dtype`` (pipelines draw their noise in it).
    forward(sample [B, *shape], timestep (int / float / 0-d or [B] tensor), class_labels=None, return_dict=True)
        -> UNet2DOutput(sample=[B, *shape]) (StandInOutput without diffusers), or a 1-tuple if not return_dict.
    Attributes: config (in_channels, out_channels, sample_size), dtype, device, prediction_type.
    """

    def __init__(
        self,
        denoiser: Callable,
        prediction_type: Optional[str] = None,
        alphas_cumprod=None,
        scheduler=None,
        *,
        interpolation: Optional[str] = None,
        shape=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not callable(denoiser):
            raise InputTypeError(f"denoiser: expected a callable D(x, sigma), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.scheduler = scheduler
        sconf = getattr(scheduler, "config", None) if scheduler is not None else None
        s_pred = _conf(sconf, "prediction_type")
        if prediction_type is None:
            prediction_type = s_pred if s_pred is not None else "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if s_pred is not None and s_pred in PREDICTION_TYPES and s_pred != prediction_type:
            raise InputError(
                f"prediction_type: {prediction_type!r} does not match the scheduler's prediction_type {s_pred!r}; "
                "the scheduler would misread the model output"
            )
        self.prediction_type = prediction_type

        if alphas_cumprod is None and scheduler is not None:
            alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise InputError(
                "alphas_cumprod: required (the training schedule's abar_t, [T]); pass alphas_cumprod= or a scheduler "
                "with .alphas_cumprod"
            )
        self.register_buffer("alphas_cumprod", _check_alphas_cumprod(alphas_cumprod), persistent=False)

        if interpolation is None:
            if _conf(sconf, "timestep_type") == "continuous" and s_pred == "v_prediction":
                interpolation = "continuous"
            elif any(bool(_conf(sconf, k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
                interpolation = "log_linear"
            else:
                interpolation = "linear"
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation

        shape = tuple(shape if shape is not None else getattr(denoiser, "shape", ()) or ())
        if not shape:
            raise InputError("shape: the denoiser has no .shape attribute; pass shape=(C, H, W)")
        self.shape = shape
        if len(shape) == 3:
            in_ch = int(shape[0])
            sample_size = int(shape[1]) if shape[1] == shape[2] else (int(shape[1]), int(shape[2]))
        else:
            in_ch, sample_size = 1, (int(shape[-1]) if len(shape) >= 1 else None)
        self.config = _Config(in_channels=in_ch, out_channels=in_ch, sample_size=sample_size)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputTypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self._dtype = dtype

    # -- diffusers' ModelMixin surface ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        dev = getattr(self.denoiser, "device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    # -- timestep -> (alpha_t, sigma_t) --------------------------------------------------------------------------

    def alpha_sigma(self, timestep, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t), float64 [batch] on the CPU, for a timestep (scalar, 0-d or [batch] tensor)."""
        t = timestep.detach() if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
        if t.dtype == torch.bool or t.is_complex():
            raise InputTypeError(f"timestep: expected an int or float timestep, got dtype {t.dtype}")
        t = t.to(device="cpu", dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise InputError(f"timestep: expected a scalar or {batch} timesteps (one per sample), got {t.numel()}")
        if not bool(torch.isfinite(t).all()):
            raise InputError("timestep: contains NaN or Inf")
        uniq, inv = torch.unique(t, return_inverse=True)
        abar = torch.tensor([self._abar(float(u)) for u in uniq.tolist()], dtype=torch.float64)[inv]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def _abar(self, t: float) -> float:
        s = self._scheduler_sigma(t)
        if s is not None:
            return 1.0 / (1.0 + s * s)
        if self.interpolation == "continuous":
            return 1.0 / (1.0 + math.exp(8.0 * t))
        abar = self.alphas_cumprod
        T = abar.numel()
        if not (0.0 <= t <= T - 1):
            raise InputError(f"timestep: {t:g} lies outside the training schedule [0, {T - 1}]")
        if t == round(t):
            return float(abar[int(round(t))])
        sig = ((1.0 - abar) / abar).sqrt().cpu().numpy()
        if self.interpolation == "linear":
            ve = float(np.interp(t, np.arange(T), sig))
        else:
            ve = float(np.exp(np.interp(t, np.arange(T), np.log(np.maximum(sig, 1e-300)))))
        return 1.0 / (1.0 + ve * ve)

    def _scheduler_sigma(self, t: float) -> Optional[float]:
        """The scheduler's own VE sigma for a timestep in scheduler.timesteps (None if it has no sigmas / no hit)."""
        s = self.scheduler
        sigmas = getattr(s, "sigmas", None) if s is not None else None
        ts = getattr(s, "timesteps", None) if s is not None else None
        if sigmas is None or ts is None:
            return None
        ts = torch.as_tensor(ts).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if sigmas.numel() < ts.numel():
            return None
        step = getattr(s, "step_index", None)
        if isinstance(step, int) and 0 <= step < ts.numel() and float(ts[step]) == t:
            return float(sigmas[step])
        hits = (ts == t).nonzero().reshape(-1)
        if hits.numel() == 0:
            return None
        i = int(hits[1]) if hits.numel() > 1 else int(hits[0])  # as diffusers' index_for_timestep
        return float(sigmas[i])

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise InputTypeError(f"sample: expected a floating tensor [B, *shape], got {type(sample).__name__}")
        if sample.ndim < 2:
            raise InputError(f"sample: expected [B, *shape], got shape {tuple(sample.shape)}")
        B = sample.shape[0]
        a, s = self.alpha_sigma(timestep, B)
        if not bool((s > 0).all()):
            raise InputError("timestep: abar_t = 1 (sigma_t = 0) leaves nothing to denoise")
        a = a.to(sample.device)
        s = s.to(sample.device)
        bshape = (B,) + (1,) * (sample.ndim - 1)
        x64 = sample.detach().to(torch.float64)
        x_ve = (x64 / a.reshape(bshape)).to(sample.dtype)
        sig_ve = (s / a).to(sample.dtype)
        args = (x_ve, sig_ve) if class_labels is None else (x_ve, sig_ve, class_labels)
        x0 = torch.as_tensor(self.denoiser(*args)).to(device=sample.device, dtype=torch.float64)
        if self.prediction_type == "sample":
            out = x0
        elif self.prediction_type == "epsilon":
            out = eps_from_x0(x64, x0, s, a)
        else:
            out = v_from_x0(x64, x0, s, a)
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return _output(out)


def _conf(config, key: str):
    if config is None:
        return None
    try:
        return config[key] if isinstance(config, dict) else getattr(config, key, None)
    except KeyError:
        return None


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_k_diffusion_sampling():
    """k-diffusion's sampling module (sample_euler, sample_heun, sample_dpmpp_2m, get_sigmas_karras, ...).

    Imports ``k_diffusion.sampling`` normally. k-diffusion's package ``__init__`` also imports its training stack
    (torchvision, kornia, clip, ...); when that fails (e.g. it was installed with ``pip install --no-deps
    k-diffusion`` to keep your torch build), the module file ``k_diffusion/sampling.py`` is loaded on its own, with
    its one helper from ``k_diffusion.utils`` (append_dims) supplied. It then needs scipy, torchdiffeq, torchsde and
    tqdm.

    Raises:
        BackendUnavailableError: k-diffusion is not installed, or its sampling module cannot be loaded.
    """
    import importlib.util
    import types
    from pathlib import Path

    from diffgen_fast.errors import BackendUnavailableError

    try:
        import k_diffusion.sampling as mod

        return mod
    except ImportError as e:
        first = e
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("k-diffusion is not installed (pip install --no-deps k-diffusion)") from first
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    src = path.read_text() if path.is_file() else ""
    if "from . import utils" not in src:
        raise BackendUnavailableError(f"k_diffusion: cannot import it ({first}) and {path} is not the expected module")
    mod = types.ModuleType("k_diffusion_sampling_standalone")
    mod.utils = types.SimpleNamespace(append_dims=_append_dims)
    try:
        exec(compile(src.replace("from . import utils", ""), str(path), "exec"), mod.__dict__)
    except ImportError as e:
        raise BackendUnavailableError(
            f"k_diffusion.sampling needs {e.name}: pip install --no-deps torchsde torchdiffeq trampoline (and scipy)"
        ) from e
    return mod
