"""The ``diffgen-fast`` command line: ``demo``, ``info``, ``score`` and ``index build|info``.

Also runs as ``python -m diffgen_fast``. Errors raised by the package (``DiffgenError``) are printed as one line
``error: ...`` with exit status 2 instead of a traceback. Heavy imports (torch, matplotlib) happen inside the
commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import click

from diffgen_fast import __version__
from diffgen_fast.errors import DiffgenError

# The backends a user can name for the demo; "faiss" serves knn only, so the denoiser could not use it.
DEMO_BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")

# Optional packages reported by `info`: display name -> (distribution names to try, import name).
_OPTIONAL = {
    "triton": (("triton", "pytorch-triton"), "triton"),
    "faiss": (("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"), "faiss"),
    "sklearn": (("scikit-learn",), "sklearn"),
    "pykeops": (("pykeops",), "pykeops"),
}


class _Group(click.Group):
    """A click group that turns package errors (and OS errors such as an unwritable folder) into one clean line
    and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # e.g. `diffgen-fast info | head`: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except (DiffgenError, OSError) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"error: {msg}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings=dict(help_option_names=["-h", "--help"], max_content_width=120))
@click.version_option(__version__, prog_name="diffgen-fast", message="%(prog)s %(version)s")
def main() -> None:
    """diffgen-fast: exact, fast empirical optimal denoisers, KDE and kNN for diffusion memorization studies.

    \b
    Examples:

    \b
    # Sample 8x8 digits with the empirical optimum and the Gaussian denoiser, score memorization
    diffgen-fast demo --out demo_out

    \b
    # Smaller and faster, without progress bars
    diffgen-fast demo --n 16 --steps 10 --no-progress

    \b
    # Versions, devices, backends and a 2-second self-check against float64 references
    diffgen-fast info
    """


# ----------------------------------------------------------------------------------------------------------------------
# demo


@main.command(short_help="Sample digits with the empirical optimum and the Gaussian denoiser; report memorization.")
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default="demo_out",
    show_default=True,
    help="Where to write the report",
)
@click.option(
    "--n", "n", metavar="INT", type=click.IntRange(min=2), default=64, show_default=True, help="Samples per denoiser"
)
@click.option(
    "--steps", metavar="INT", type=click.IntRange(min=1), default=18, show_default=True, help="Sampler steps (EDM Heun)"
)
@click.option(
    "--seed",
    metavar="INT",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Random seed of the initial noise",
)
@click.option(
    "--backend",
    metavar="NAME",
    type=click.Choice(DEMO_BACKENDS),
    default="auto",
    show_default=True,
    help="Denoiser / kNN backend: " + "|".join(DEMO_BACKENDS),
)
@click.option("--no-progress", is_flag=True, default=False, help="Hide the progress bars")
def demo(out_dir: Path, n: int, steps: int, seed: int, backend: str, no_progress: bool) -> None:
    """Show the empirical optimum memorizing: sample, score with the NN ratio test, write a report.

    Draws N samples of the built-in 8x8 digits (1797 images) with the empirical optimal denoiser and N with the
    Gaussian (linear) denoiser, runs the nearest-neighbour ratio test (memorized when ||x-NN1||/||x-NN2|| < 1/3)
    and writes report.md, report.json, figures and per-sample CSV files into DIR.

    \b
    Examples:

    \b
    diffgen-fast demo                              # 64 samples each, 18 steps, into ./demo_out
    diffgen-fast demo --n 8 --steps 6 --out /tmp/d # a quick smoke run
    """
    from diffgen_fast.demo import run_demo

    t0 = time.perf_counter()
    summary = run_demo(out_dir, n=n, steps=steps, seed=seed, backend=backend, progress=not no_progress)
    elapsed = time.perf_counter() - t0

    data, settings = summary.get("data", {}), summary.get("settings", {})
    click.echo(
        f"digits: N={data.get('n_train')}, d={data.get('d')}; {settings.get('n_samples')} samples per denoiser, "
        f"{settings.get('sampler')} {settings.get('steps')} steps, seed {settings.get('seed')}, "
        f"backend {settings.get('backend')}"
    )
    rows = []
    for name, d in summary.get("denoisers", {}).items():
        t = d.get("timings", {})
        frac = d.get("memorized_fraction")
        med = d.get("median_ratio")
        rows.append(
            [
                name,
                str(d.get("n_samples")),
                "n/a" if frac is None else f"{100 * frac:.1f}%",
                "n/a" if med is None else f"{med:.4f}",
                f"{t.get('sample_s', float('nan')) + t.get('score_s', float('nan')):.2f} s",
            ]
        )
    click.echo()
    click.echo(_table(["denoiser", "samples", "memorized", "median ratio", "time"], rows, "lrrrr"))
    click.echo()
    click.echo("expected: ~100% memorized for the empirical optimum, ~0% for the Gaussian denoiser (threshold 1/3)")
    click.echo("wrote:")
    for rel in summary.get("files", {}).values():
        click.echo(f"  {Path(out_dir) / rel}")
    click.echo(f"done in {elapsed:.1f} s")


# ----------------------------------------------------------------------------------------------------------------------
# info


def _table(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    align = align.ljust(len(headers), "l")

    def line(cells: list[str]) -> str:
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(str(c).rjust(w) if a == "r" else str(c).ljust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _optional_version(dists: tuple[str, ...], module: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "installed (version unknown)" if found else "not installed"


def _or_nan(v) -> float:
    return float("nan") if v is None else float(v)


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.1e}".replace(".0e", "e")


def _first_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@dataclass
class _Check:
    name: str
    op: str
    backend: str
    device: str
    ok: bool
    detail: str
    raised: str | None = None
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def _run_check(checks: list[_Check], name: str, op: str, backend: str, device: str, fn: Callable[[], dict]) -> None:
    """fn() -> {error name: (value, tolerance)}; PASS when every error is finite and <= its tolerance."""
    try:
        errors = fn()
    except Exception as e:  # a self-check must report, never crash
        checks.append(_Check(name, op, backend, device, False, f"raised {_first_line(e)}", raised=_first_line(e)))
        return
    ok = all(math.isfinite(v) and v <= tol for v, tol in errors.values())
    tols = {tol for _, tol in errors.values()}
    if len(tols) == 1:
        detail = ", ".join(f"{k} {_num(v)}" for k, (v, _) in errors.items()) + f" (tol {_num(tols.pop())})"
    else:
        detail = ", ".join(f"{k} {_num(v)} (tol {_num(tol)})" for k, (v, tol) in errors.items())
    checks.append(_Check(name, op, backend, device, ok, detail, errors=errors))


def _self_checks(rows: list[dict]) -> list[_Check]:
    """Tiny random problems on every available backend, against the float64 naive references."""
    import torch

    from diffgen_fast.ops import kde_log_density, knn, softmax_denoise
    from diffgen_fast.ops.knn.naive import knn_naive
    from diffgen_fast.ops.softmax_denoise.naive import kde_log_density_naive, softmax_denoise_naive

    g = torch.Generator().manual_seed(1234)
    N, d, M, k = 203, 37, 9, 5  # awkward sizes on purpose
    train = torch.rand(N, d, generator=g, dtype=torch.float64) * 2 - 1
    pick = torch.randint(0, N, (M,), generator=g)
    noise = torch.randn(M, d, generator=g, dtype=torch.float64)

    def queries(sigma: float) -> torch.Tensor:
        # Near training points, as during sampling: the regime where the norm expansion cancels.
        return (train[pick] + sigma * noise).float()

    train32 = train.float()

    def check_denoise(b: str, dev: str, sigma: float) -> dict:
        x = queries(sigma)
        out, lse = softmax_denoise(x.to(dev), train32.to(dev), sigma, return_lse=True, backend=b, precision="exact")
        ref_out, ref_lse = softmax_denoise_naive(x, train32, sigma)
        e_out = (out.double().cpu() - ref_out).abs().max().item()
        e_lse = ((lse.double().cpu() - ref_lse).abs() / (1 + ref_lse.abs())).max().item()
        return {"out": (e_out, 1e-4), "lse(rel)": (e_lse, 1e-4)}

    def check_kde(b: str, dev: str, h: float) -> dict:
        x = queries(h)
        got = kde_log_density(x.to(dev), train32.to(dev), h, backend=b)
        ref = kde_log_density_naive(x, train32, h)
        return {"logp(rel)": (((got.double().cpu() - ref).abs() / (1 + ref.abs())).max().item(), 1e-4)}

    def check_knn(b: str, dev: str) -> dict:
        x = queries(0.05)
        x[0] = train32[7]  # an exact copy: distance 0
        d2, idx = knn(x.to(dev), train32.to(dev), k, backend=b)
        ref_d2, ref_idx = knn_naive(x, train32, k)
        d2, idx = d2.double().cpu(), idx.cpu()
        e_d = ((d2 - ref_d2).abs() / (1 + ref_d2)).max().item()
        # Tie-aware: an index may differ only where the reference has (near-)equal neighbouring distances.
        gaps = torch.full_like(ref_d2, float("inf"))
        diff = (ref_d2[:, 1:] - ref_d2[:, :-1]).abs() / (1 + ref_d2[:, 1:])
        gaps[:, 1:] = torch.minimum(gaps[:, 1:], diff)
        gaps[:, :-1] = torch.minimum(gaps[:, :-1], diff)
        bad = ((idx != ref_idx) & (gaps > 1e-5)).sum().item()
        return {"sqdist(rel)": (e_d, 1e-4), "index mismatches": (bad, 0)}

    checks: list[_Check] = []
    for row in rows:
        if not row.get("available"):
            continue
        op, b, dev = row["op"], row["backend"], str(row.get("device", "cpu"))
        if op == "softmax_denoise":
            for sigma in (0.01, 1.0, 50.0):
                _run_check(
                    checks, f"softmax_denoise exact sigma={sigma:g}", op, b, dev, partial(check_denoise, b, dev, sigma)
                )
            _run_check(checks, "kde_log_density h=0.3", op, b, dev, partial(check_kde, b, dev, 0.3))
        elif op == "knn":
            _run_check(checks, f"knn k={k}", op, b, dev, partial(check_knn, b, dev))

    native = _native_merge_check()
    if native is not None:
        checks.append(native)
    return checks


def _native_merge_check() -> _Check | None:
    """Native softmax-state merge against ops.merge, when the extension is built."""
    try:
        from diffgen_fast import _native

        if not _native.available():
            return None
    except Exception:
        return None
    checks: list[_Check] = []

    def check_merge() -> dict:
        import torch

        from diffgen_fast.ops.merge import SoftmaxState, merge_softmax_states

        g = torch.Generator().manual_seed(7)
        M, d = 13, 29

        def state(empty_rows: slice) -> SoftmaxState:
            m = torch.randn(M, generator=g, dtype=torch.float64) * 5
            l = torch.rand(M, generator=g, dtype=torch.float64) * 3 + 1
            q = l * torch.rand(M, generator=g, dtype=torch.float64)
            o = torch.randn(M, d, generator=g, dtype=torch.float32)
            m[empty_rows], l[empty_rows], q[empty_rows], o[empty_rows] = float("-inf"), 0.0, 0.0, 0.0
            return SoftmaxState(m, l, q, o)

        a, b = state(slice(0, 2)), state(slice(1, 3))  # row 1 empty in both, rows 0 / 2 empty in one
        ref = merge_softmax_states(a, b)
        got = _native.merge_softmax_states(a, b)
        errs = {}
        for key in ("m", "l", "q", "o"):
            r, x = getattr(ref, key).double(), getattr(got, key).double().cpu()
            same_inf = torch.isinf(r) & (r == x)
            diff = torch.where(same_inf, torch.zeros_like(r), (x - r).abs() / (1 + r.abs()))
            errs[key] = (diff.max().item(), 1e-6)
        return errs

    _run_check(checks, "native merge_softmax_states", "merge", "cpu", "cpu", check_merge)
    return checks[0]


@main.command(short_help="Versions, devices, native extension, backend table and a quick self-check.")
@click.option("--no-check", is_flag=True, default=False, help="Skip the self-check against the float64 references")
def info(no_check: bool) -> None:
    """Versions, devices, the native extension, the backend table and a quick self-check.

    The self-check (about 2 s at most) runs a tiny random problem on every available backend of every op
    (softmax_denoise with precision="exact" at sigma 0.01, 1 and 50; kde_log_density; knn; the native merge when
    built) and compares it with the float64 brute-force reference; it exits with status 1 if any check fails. A
    backend listed as available whose call raises is shown as unavailable, with the error.

    \b
    Examples:

    \b
    diffgen-fast info             # everything, with the self-check
    diffgen-fast info --no-check  # no computation, just what is installed
    """
    import numpy
    import torch

    click.echo("versions")
    versions = [
        ["python", platform.python_version()],
        ["diffgen_fast", __version__],
        ["torch", torch.__version__],
        ["numpy", numpy.__version__],
    ]
    versions += [[name, _optional_version(dists, mod)] for name, (dists, mod) in _OPTIONAL.items()]
    w = max(len(k) for k, _ in versions)
    for k, v in versions:
        click.echo(f"  {k.ljust(w)}  {v}")

    click.echo("\ndevices")
    click.echo(f"  platform      {platform.platform()}")
    click.echo(f"  cpu threads   {torch.get_num_threads()} (torch intra-op), {os.cpu_count()} logical cores")
    if torch.cuda.is_available():
        click.echo(f"  CUDA          yes: {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            click.echo(f"    cuda:{i}      {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device or driver found"
        click.echo(f"  CUDA          no ({why})")

    click.echo("\nnative extension (diffgen_fast._C)")
    try:
        from diffgen_fast import _native

        if _native.available():
            bi = _native.build_info()
            click.echo("  built: yes")
            if isinstance(bi, dict):
                for k, v in bi.items():
                    if k == "simd":  # the compile-time baseline flags; the kernels dispatch at load time
                        k, v = "simd baseline (compiled)", ", ".join(v) if isinstance(v, list) else v
                    click.echo(f"    {k}: {v}")
                try:
                    level = _native.simd_level()
                except Exception as e:  # an extension without the query
                    level = f"unknown ({_first_line(e)})"
                click.echo(f"    simd dispatched (kernel variant running on this CPU): {level}")
                try:
                    click.echo(f"    direct kernel (d <= 64, float32): {_native.direct_kernel()}")
                except Exception as e:
                    click.echo(f"    direct kernel (d <= 64, float32): unknown ({_first_line(e)})")
                try:
                    click.echo(f"    knn first pass (d > 32, float32): {_native.knn_kernel()}")
                except Exception as e:
                    click.echo(f"    knn first pass (d > 32, float32): unknown ({_first_line(e)})")
            else:
                click.echo(f"    {bi}")
        else:
            click.echo(f"  built: no ({_native.unavailable_reason()})")
    except Exception as e:
        click.echo(f"  built: no (diffgen_fast._native failed: {_first_line(e)})")

    from diffgen_fast.ops.dispatch import ENV_VAR, backend_table

    rows = backend_table()
    checks: list[_Check] = []
    t0 = time.perf_counter()
    if not no_check:
        checks = _self_checks(rows)
    check_s = time.perf_counter() - t0

    by_backend: dict[tuple[str, str, str], list[_Check]] = {}
    for c in checks:
        by_backend.setdefault((c.op, c.backend, c.device), []).append(c)

    click.echo("\nbackends")
    if os.environ.get(ENV_VAR):
        click.echo(f"  {ENV_VAR}={os.environ[ENV_VAR]} overrides backend='auto'")
    table = []
    for r in rows:
        key = (r["op"], r["backend"], str(r.get("device", "cpu")))
        mine = by_backend.get(key, [])
        available, reason = bool(r["available"]), str(r.get("reason") or "")
        raised = next((c.raised for c in mine if c.raised), None)
        if available and raised:  # listed as available, but calling it fails: say so
            available, reason = False, f"listed available but raised {raised}"
        if not r["available"]:
            status = "-"
        elif no_check:
            status = "not run"
        elif not mine:
            status = "no check"
        else:
            status = "PASS" if all(c.ok for c in mine) else "FAIL"
        table.append([r["op"], r["backend"], key[2], "yes" if available else "no", status, reason])
    click.echo(_indent(_table(["op", "backend", "device", "available", "check", "reason"], table)))
    click.echo("  (kde_log_density runs on the softmax_denoise backends)")

    if no_check:
        click.echo("\nself-check skipped (--no-check); 'available' is what each backend's probe reports")
        return
    click.echo(f"\nself-check against the float64 references ({check_s:.1f} s)")
    crows = [["PASS" if c.ok else "FAIL", c.name, c.backend, c.device, c.detail] for c in checks]
    click.echo(_indent(_table(["result", "check", "backend", "device", "max error"], crows)))
    failed = [c for c in checks if not c.ok]
    if failed:
        click.echo(f"\n{len(failed)} of {len(checks)} checks FAILED", err=True)
        click.get_current_context().exit(1)
    click.echo(f"\nall {len(checks)} checks passed")


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


# ----------------------------------------------------------------------------------------------------------------------
# score


KNN_BACKENDS = ("auto", "torch", "cpu", "cuda", "faiss")
_INDEX_HELP = "flat (exact) | ivf | ivfpq | hnsw | a faiss factory string | a saved .faiss file"


def _open_set(path: str, name: str, cache_dir: Path | None = None, scale: str = "[-1,1]"):
    """Open a TrainingSet; image folders and EDM zips are streamed into a memory-mapped .npy under cache_dir; uint8
    pixels (images, uint8 .npy / .npz such as guided-diffusion's arr_0) are scaled to `scale`."""
    from diffgen_fast.data import TrainingSet, _as_path, _require_exists, _sniff

    p = _as_path(path, name)
    _require_exists(p, name)
    if cache_dir is not None and _sniff(p, name) in ("images", "zip"):
        return TrainingSet.open(p, name=name, cache=cache_dir, scale=scale)
    return TrainingSet.open(p, name=name, scale=scale)


def _nonempty_path(ctx, param, value):
    if value is None:
        return None
    if str(value).strip() == "":
        raise click.BadParameter("expected a folder path, got an empty string", ctx=ctx, param=param)
    return Path(value)


def _positive_finite(ctx, param, value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"expected a finite number > 0, got {value}", ctx=ctx, param=param)
    return value


def _checked_inputs(train, samples_path, heldout_path, cache, precomputed: bool, allow_range_mismatch: bool):
    """Open the samples (and held-out set) on the training set's scale, align their layout to the training items
    and apply the value-range rule, printing every conversion; all before anything is written."""
    from diffgen_fast.layout import align_layout, check_range, scale_for, training_range

    scale = scale_for(training_range(train))
    for c in train.conversions:
        click.echo(f"train: {c}")
    out = []
    for path, name in ((samples_path, "samples"), (heldout_path, "heldout")):
        if not path:
            out.append(None)
            continue
        s = align_layout(_open_set(path, name, cache, scale), train, name, strict=not precomputed)
        if not precomputed:
            facts = check_range(
                s,
                train,
                name,
                on_mismatch="ignore" if allow_range_mismatch else "error",
                hint=", or pass --allow-range-mismatch to score anyway",
            )
            if facts["mismatch"]:
                click.echo(f"warning: {' '.join(facts['message'].split())}", err=True)
        for c in s.conversions:
            click.echo(f"{name}: {c}")
        out.append(s)
    return out


@main.command(short_help="Memorization tests of generated samples against a training set; writes a report.")
@click.option(
    "--train",
    "train_path",
    metavar="PATH",
    required=True,
    help="Training set: .npy (memory-mapped), .npz, image folder, EDM zip, CIFAR-10",
)
@click.option("--samples", "samples_path", metavar="PATH", required=True, help="Generated samples (same formats)")
@click.option(
    "--heldout",
    "heldout_path",
    metavar="PATH",
    default=None,
    help="Held-out real samples (enables C_T and the train-vs-heldout figure)",
)
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    required=True,
    callback=_nonempty_path,
    help="Output folder",
)
@click.option(
    "--threshold",
    metavar="FLOAT",
    type=click.FloatRange(min=0, min_open=True),
    default=1 / 3,
    show_default="1/3",
    callback=_positive_finite,
    help="Memorized when ||x-NN1|| / ||x-NN2|| is below this (finite, > 0)",
)
@click.option(
    "--k",
    "k",
    metavar="INT",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Neighbours kept per sample",
)
@click.option(
    "--backend",
    metavar="NAME",
    type=click.Choice(KNN_BACKENDS),
    default="auto",
    show_default=True,
    help="kNN backend per chunk",
)
@click.option("--index", "index", metavar="SPEC", default=None, help="Search a faiss index instead: " + _INDEX_HELP)
@click.option("--train-features", metavar="NPY", default=None, help="Precomputed training-set embeddings [N, e]")
@click.option("--sample-features", metavar="NPY", default=None, help="Precomputed sample embeddings [M, e]")
@click.option("--heldout-features", metavar="NPY", default=None, help="Precomputed held-out embeddings [H, e]")
@click.option(
    "--metric",
    type=click.Choice(["l2", "cosine"]),
    default="l2",
    show_default=True,
    help="Distance between points or features",
)
@click.option(
    "--chunk-size",
    metavar="INT",
    type=click.IntRange(min=1),
    default=None,
    help="Training rows per chunk (default: about 64 MiB)",
)
@click.option(
    "--cells",
    metavar="INT",
    type=click.IntRange(min=1),
    default=None,
    help="k-means cells of C_T, fitted on the training set (default: 50, as Meehan et al.)",
)
@click.option(
    "--tau",
    metavar="FLOAT",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=None,
    help="C_T keeps the cells holding more than this share of the samples (default: 20 / number of samples)",
)
@click.option(
    "--ct-variant",
    type=click.Choice(["reference", "global_nn"]),
    default="reference",
    show_default=True,
    help="C_T distances: to the nearest training point in the same cell (Meehan et al.'s code) or overall",
)
@click.option(
    "--cache-dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where image folders and EDM zips are decoded, chunk by chunk, into memory-mapped .npy files (default: "
    "OUT/.cache; reused while the images are unchanged)",
)
@click.option("--no-resume", is_flag=True, default=False, help="Ignore checkpoints of an interrupted run")
@click.option("--no-authenticity", is_flag=True, default=False, help="Skip the second (authenticity) pass")
@click.option(
    "--seed", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the k-means cells"
)
@click.option(
    "--allow-range-mismatch",
    is_flag=True,
    default=False,
    help="Score even when the samples' (or held-out) values are far from the training set's value range (e.g. "
    "[0, 1] or [0, 255] samples against a [-1, 1] training set): a warning instead of an error",
)
@click.option("--no-progress", is_flag=True, default=False, help="Hide the progress bars")
def score(
    train_path,
    samples_path,
    heldout_path,
    out_dir,
    threshold,
    k,
    backend,
    index,
    train_features,
    sample_features,
    heldout_features,
    metric,
    chunk_size,
    cells,
    tau,
    ct_variant,
    cache_dir,
    no_resume,
    no_authenticity,
    seed,
    allow_range_mismatch,
    no_progress,
) -> None:
    """Did the model copy its training data? Nearest-neighbour ratio test, authenticity and (with --heldout) the
    C_T data-copying test, over a training set streamed in chunks.

    Writes report.md, summary.json, per_sample.csv, per_sample.npz and figures (nn_grid.png: samples beside their
    nearest training images, most memorized first; ratio_hist.png; nn_dist_hist.png; train_vs_heldout.png) into
    DIR. Each pass checkpoints after every chunk into DIR/.checkpoints: run the same command again after an
    interruption and it resumes where it stopped. per_sample.csv names each sample and its nearest training item
    (sample_name, nn_name: file name in a folder or zip, FILE:KEY[ROW] or FILE[ROW] for arrays).

    \b
    Inputs are checked before anything is written:
    - item layout: samples / held-out sets must have the training items' shape (or be flat); a set in the
      channels-last layout [H, W, C] of [C, H, W] training items (or the reverse) is permuted, and said so;
    - uint8 pixels (PNG folders, EDM zips, guided-diffusion / ADM .npz arr_0 and .npy [N, H, W, C]) are
      scaled to the training set's convention ([-1, 1], [0, 1] or [0, 255], the closest to its value range);
    - value range: an error when the samples' values reach outside the training range by more than half its
      width, or all lie in one half of it (e.g. [0, 1] or [0, 255] against [-1, 1]); --allow-range-mismatch
      scores anyway with a warning.

    \b
    Examples:

    \b
    diffgen-fast score --train train.npy --samples samples.npy --out score_out
    diffgen-fast score --train cifar10.zip --samples samples/ --heldout test.zip --out score_out
    diffgen-fast score --train train.npy --samples s.npy --index ivf --out score_out   # approximate, with recall
    diffgen-fast score --train train.npy --samples s.npy --train-features ft.npy --sample-features fs.npy \\
        --metric cosine --out score_out
    """
    from diffgen_fast._outdir import OutputFolder
    from diffgen_fast.layout import RangeMismatchWarning
    from diffgen_fast.metrics.score_report import write_score_outputs
    from diffgen_fast.metrics.scoring import score as run_score

    t0 = time.perf_counter()
    # One run per folder (a second is refused at once); the lock is held until the command returns.
    folder = OutputFolder(out_dir, name="out").__enter__()
    click.get_current_context().call_on_close(lambda: folder.__exit__(None, None, None))
    cache = cache_dir if cache_dir is not None else Path(out_dir) / ".cache"
    train = _open_set(train_path, "train", cache)
    samples, heldout = _checked_inputs(
        train, samples_path, heldout_path, cache, bool(sample_features), allow_range_mismatch
    )
    ck = Path(out_dir) / ".checkpoints"
    with warnings.catch_warnings():  # a range mismatch was refused or reported above; score() records the ranges
        warnings.simplefilter("ignore", RangeMismatchWarning)
        result = run_score(
            samples,
            train,
            heldout=heldout,
            threshold=threshold,
            k=k,
            backend=backend,
            index=index,
            train_features=train_features,
            sample_features=sample_features,
            heldout_features=heldout_features,
            metric=metric,
            chunk_size=chunk_size,
            checkpoint_dir=ck,
            resume=not no_resume,
            progress=not no_progress,
            n_cells=cells,
            tau=tau,
            ct_variant=ct_variant,
            check_authenticity=not no_authenticity,
            seed=seed,
            on_range_mismatch="warn",
        )
    # The files are written to a staging folder and published as one set (manifest.json names the run).
    files = write_score_outputs(result, folder.stage(), samples, train)
    folder.publish(files, info={"command": "diffgen-fast score"})
    files = [*files, "manifest.json"]
    with contextlib.suppress(OSError):
        ck.rmdir()
    s = result.summary
    resumed = s["passes"].get("neighbours", {}).get("resumed_from_row", 0)
    click.echo(
        f"train: {train.source}, N={len(train)}, d={train.d}; samples: {s['n_samples']}; "
        f"held-out: {s['n_heldout']}; space: {s['space']}, {s['metric']}; "
        f"{'exact' if s['exact'] else 'approximate'} kNN ({s['backend']})"
    )
    if resumed:
        click.echo(f"resumed from a checkpoint at training row {resumed}")
    rows = [
        [
            "memorized (NN ratio < " + ("1/3" if abs(threshold - 1 / 3) < 1e-12 else f"{threshold:g}") + ")",
            f"{s['n_memorized']} / {s['n_samples']}",
            f"{100 * s['fraction_memorized']:.1f}%",
        ]
    ]
    rows.append(["median NN ratio", "", f"{s['ratio_median']:.4f}"])
    if "authenticity" in s:
        a = s["authenticity"]
        rows.append(
            ["inauthentic", f"{a['n_inauthentic']} / {s['n_samples']}", f"{100 * a['fraction_inauthentic']:.1f}%"]
        )
    if "heldout" in s:
        rows.append(["held-out memorized (control)", "", f"{100 * s['heldout']['fraction_memorized']:.1f}%"])
    if "C_T" in s:
        rows.append(["C_T (<< 0: copying)", f"{s['C_T']['cells_used']} cells", f"{s['C_T']['C_T']:.2f}"])
    if s.get("index") and not s["exact"]:
        rows.append(
            # a plain decimal (0.487), never 4.9e-01
            [f"recall@{s['k']} ({s['index'].get('factory')})", "", f"{_or_nan(s['index'].get('recall_at_k')):.3f}"]
        )
    click.echo()
    click.echo(_table(["test", "count", "value"], rows, "lrr"))
    click.echo()
    click.echo("wrote:")
    for f in files:
        click.echo(f"  {Path(out_dir) / f}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------------------------------------------------
# index


@main.group(cls=_Group)
def index() -> None:
    """Build and inspect persistent faiss indexes of a training set."""


@index.command("build", short_help="Build a faiss index of a training set and save it with its fingerprint.")
@click.option("--train", "train_path", metavar="PATH", required=True, help="Training set (any TrainingSet format)")
@click.option(
    "--out",
    "out_path",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Index file (.faiss); metadata goes to FILE.json",
)
@click.option(
    "--index",
    "kind",
    metavar="SPEC",
    default="flat",
    show_default=True,
    help="flat | ivf | ivfpq | hnsw | a faiss factory string",
)
@click.option(
    "--train-sample",
    metavar="INT",
    type=click.IntRange(min=1),
    default=None,
    help="Points the index is trained on (IVF / PQ)",
)
@click.option("--seed", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
def index_build(train_path, out_path, kind, train_sample, seed) -> None:
    """Build an index once and reuse it: `diffgen-fast score --index FILE` and `knn(..., index=FILE)` refuse it if
    the training set has changed since (its SHA-256 fingerprint is stored beside the index).

    \b
    Examples:
    diffgen-fast index build --train train.npy --index ivf --out train.ivf.faiss
    diffgen-fast index build --train train.npy --index "IVF4096,PQ32x4fs" --out train.pq.faiss
    """
    from diffgen_fast.ops.knn.faiss import FaissIndex

    if out_path.suffix != ".faiss":
        raise click.BadParameter("expected a file name ending in .faiss", param_hint="--out")
    t0 = time.perf_counter()
    train = _open_set(train_path, "train")
    idx = FaissIndex.build(train, kind, train_sample=train_sample, seed=seed)
    idx.save(out_path)
    click.echo(f"built {idx.factory} over N={idx.n}, d={idx.d} in {time.perf_counter() - t0:.1f} s")
    click.echo(f"fingerprint {idx.fingerprint[:16]}...; wrote {out_path} and {out_path}.json")


@index.command("info", short_help="Show a saved index's metadata; with --train, check it is current.")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--train", "train_path", metavar="PATH", default=None, help="Check the index against this training set")
def index_info(path, train_path) -> None:
    """Print the metadata of a saved index and, with --train, whether it matches that training set."""
    from diffgen_fast.ops.knn.faiss import FaissIndex

    train = _open_set(train_path, "train") if train_path else None
    idx = FaissIndex.load(path, train)
    click.echo(f"{path}: {idx.factory} ({idx.spec}), N={idx.n}, d={idx.d}, exact={idx.exact}")
    click.echo(f"fingerprint {idx.fingerprint}")
    for key, v in sorted(idx.meta.items()):
        click.echo(f"  {key}: {v}")
    if train is not None:
        click.echo("matches the training set: yes")


# ----------------------------------------------------------------------------------------------------------------------
# bench


@main.command(short_help="Benchmark the ops against the best peer (dense, chunked, keops, faiss); CSV, roofline.")
@click.option("--op", "--ops", "ops", multiple=True, metavar="OP", help="denoise, knn, kde (repeat or comma list)")
@click.option("--shapes", metavar="MxNxD,...", default=None, help='e.g. "256x20000x64,64x5000x3072" (all ops)')
@click.option("--sigma", metavar="S,...", default="1", show_default=True, help="Noise levels / bandwidths (comma list)")
@click.option("--backends", metavar="NAMES", default=None, help="Comma list of our backends (default: all available)")
@click.option("--precision", metavar="P,...", default="exact,fast", show_default=True, help="Denoise precisions")
@click.option("--no-peers", is_flag=True, default=False, help="Skip the dense / chunked / keops / faiss peers")
@click.option("--device", metavar="DEV", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads of torch, ours and faiss alike")
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default="bench_out",
    show_default=True,
    help="Where bench.csv, bench.md and roofline.png go",
)
@click.option(
    "--compare",
    "old_csv",
    metavar="OLD.csv",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Compare times with an older bench.csv; exit 1 on a regression",
)
@click.option("--tolerance", type=float, default=0.2, show_default=True, help="Slow-down flagged by --compare")
@click.option("--profile", is_flag=True, default=False, help="Also write a Chrome trace (DIR/trace.json)")
@click.option("--tiny", is_flag=True, default=False, help="Tiny shapes (seconds)")
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True, help="Timed rounds per row")
def bench(ops, shapes, sigma, backends, precision, no_peers, device, threads, out_dir, old_csv, tolerance, profile,
          tiny, repeat):  # fmt: skip
    """Time our backends and the peers per op, shape and sigma; print the ceilings and a table.

    Measures the machine's ceilings first (sgemm rate of a large torch.mm, copy bandwidth), then, in one loop whose
    order rotates every round, each backend of ours and each peer: "dense" (the papers' cdist + softmax + matmul),
    "chunked" (a tuned plain-torch online-softmax loop, chunk size calibrated per shape), "keops" (if installed)
    and "faiss" (knn). Each row of ours gets the ratio best peer time / our time against the fastest peer of the
    same run, the error against float64 and the peak memory. Writes DIR/bench.csv (CPU model, threads, versions,
    date, git SHA), DIR/bench.md and DIR/roofline.png.

    \b
    Examples:
      diffgen-fast bench --tiny --out /tmp/b
      diffgen-fast bench --op denoise --shapes 256x20000x64 --sigma 0.05,1,80 --backends cpu
      diffgen-fast bench --out new --compare old/bench.csv
    """
    import torch

    from diffgen_fast import bench as B

    def split(values):
        return [v.strip() for s in values for v in s.split(",") if v.strip()]

    op_list = split(ops) or list(B.OPS)
    bad = [o for o in op_list if o not in B.OPS]
    if bad:
        raise click.BadParameter(f"unknown op {bad[0]!r}; expected {', '.join(B.OPS)}", param_hint="--op")
    shape_list = None
    if shapes:
        try:
            shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in split([shapes])]
        except ValueError:
            shape_list = []
        if not shape_list or any(len(s) != 3 or min(s) < 1 for s in shape_list):
            raise click.BadParameter(f"expected MxNxD[,MxNxD...], got {shapes!r}", param_hint="--shapes")
    try:
        sigmas = [float(v) for v in split([sigma])]
    except ValueError:
        sigmas = []
    if not sigmas or any(not v > 0 for v in sigmas):
        raise click.BadParameter(f"expected positive numbers, got {sigma!r}", param_hint="--sigma")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B.set_threads(threads)
    ceil = B.measure_ceilings(dev)
    click.echo(B.format_ceilings(ceil))
    rows = B.run_bench(
        ops=op_list,
        shapes=shape_list,
        backends=split([backends]) if backends else None,
        precision=split([precision]),
        peers=not no_peers,
        device=dev,
        repeat=repeat,
        sigma=sigmas,
        threads=threads,
        out_dir=out_dir,
        tiny=tiny,
        ceilings=ceil,
        profile=(out_dir / "trace.json") if profile else None,
    )
    click.echo(B.format_table(rows))
    from diffgen_fast._atomic import write_text_atomic

    write_text_atomic(B.format_markdown(rows, ceil), out_dir / "bench.md")
    extra = f" and {out_dir / 'trace.json'}" if profile else ""
    click.echo(f"wrote {out_dir / 'bench.csv'}, {out_dir / 'bench.md'} and {out_dir / 'roofline.png'}{extra}")
    if old_csv:
        res = B.compare(rows, old_csv, tolerance=tolerance)
        click.echo(B.format_compare(res))
        if any(c["flag"] == "REGRESSION" for c in res):
            click.echo("regression: some rows are slower than the older results", err=True)
            click.get_current_context().exit(1)


# ----------------------------------------------------------------------------------------------------------------------
# analyze


_DATA_HELP = (
    "Training set: 'digits' (built in), 'gaussian:N:D' (isotropic Gaussian data) or a path (any TrainingSet format)"
)


def _analysis_data(spec: str, seed: int):
    from diffgen_fast.data import TrainingSet

    if spec == "digits":
        return TrainingSet.builtin("digits")
    if spec.startswith("gaussian:"):
        try:
            _, n, d = spec.split(":")
            return TrainingSet.gaussian(int(n), int(d), 0.0, 1.0, seed)
        except ValueError as e:
            raise click.BadParameter(f"expected gaussian:N:D, got {spec!r}", param_hint="--data") from e
    return _open_set(spec, "train")


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as e:
        raise click.BadParameter(f"expected integers separated by commas, got {text!r}", param_hint=name) from e
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint=name)
    return vals


def _echo_files(out_dir: Path, names: list[str]) -> None:
    click.echo("wrote:")
    for n in names:
        click.echo(f"  {Path(out_dir) / n}")


_OUT = click.option(
    "--out", "out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path), default="analysis_out",
    show_default=True, help="Output folder",
)  # fmt: skip
_DATA = click.option("--data", metavar="SPEC", default="digits", show_default=True, help=_DATA_HELP)
_SEED = click.option("--seed", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)


@main.group(cls=_Group)
def analyze() -> None:
    """The generalization papers' measurements, one command each (figure + JSON).

    \b
    Examples:
    diffgen-fast analyze gaussian --data digits          # linearity of D* and D_G, distance of D* to D_G
    diffgen-fast analyze gap --data digits               # E||D - D*||^2 per sigma for D_G and a KNN denoiser
    diffgen-fast analyze kde --d 8 --ns 2,8,32,128,512   # Halder's relative distance sweep on Gaussian data
    diffgen-fast analyze sweep --data digits --ns 16,128,1797
    diffgen-fast analyze transition                      # train small denoisers at several N (a few minutes)
    """


def _named_models(spec: str, train) -> dict:
    """'empirical', 'gaussian', 'knn:K' (KNNDenoiser with k = K, neighbours only) -> {name: denoiser}."""
    from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser, KNNDenoiser

    out = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "empirical":
            out["D* (empirical)"] = EmpiricalDenoiser(train)
        elif item == "gaussian":
            out["D_G (Gaussian)"] = GaussianDenoiser(train)
        elif item.startswith("knn:") and item[4:].isdigit():
            out[f"KNN k={item[4:]}"] = KNNDenoiser(train, k=int(item[4:]), n_samples=0)
        else:
            raise click.BadParameter(f"expected empirical, gaussian or knn:K, got {item!r}", param_hint="--models")
    return out


def _sigma_grid(n: int):
    from diffgen_fast.schedules import edm_sigmas

    return [float(s) for s in edm_sigmas(n, append_zero=False)]


@analyze.command("gaussian", short_help="Linearity score and distance to the Gaussian denoiser per sigma.")
@_DATA
@click.option("--models", metavar="LIST", default="empirical,gaussian", show_default=True,
              help="Denoisers: empirical, gaussian, knn:K (comma separated)")
@click.option("--sigmas", "n_sigmas", metavar="INT", type=click.IntRange(min=2), default=12, show_default=True,
              help="Points of the EDM sigma grid (0.002 to 80)")
@click.option("--pairs", metavar="INT", type=click.IntRange(min=2), default=256, show_default=True,
              help="Probe pairs per sigma")
@click.option("--center/--no-center", default=False, show_default=True,
              help="Linearity about the training mean (affine maps score 1) instead of on raw values (the authors')")
@click.option("--probes", type=click.Choice(["data", "noise"]), default="data", show_default=True,
              help="Linearity probes: x = y + sigma n (data) or x = sigma n (noise)")
@_SEED
@_OUT
def analyze_gaussian_cmd(data, models, n_sigmas, pairs, center, probes, seed, out_dir) -> None:
    """Hidden Gaussian structure (Li, Dai, Qu 2024): the linearity score LS(sigma) of each denoiser and its
    normalised distance ||D - D_G|| / ||D_G|| to the Gaussian denoiser, over an EDM sigma grid. Writes gaussian.json
    and gaussian.png. The linearity score is the authors': raw values, averaged over a in linspace(0.99, 0.5, 5)
    (per-a values in the JSON); --center measures it about the training mean, where the affine D_G scores 1. The
    empirical optimum D* is far from linear at small sigma."""
    from diffgen_fast.metrics.gaussian import analyze_gaussian

    train = _analysis_data(data, seed)
    res = analyze_gaussian(_named_models(models, train), train, sigmas=_sigma_grid(n_sigmas), n_pairs=pairs,
                           seed=seed, center=center, probes=probes, out_dir=out_dir)  # fmt: skip
    rows = []
    for name, r in res["denoisers"].items():
        ls = r["linearity"]
        rows.append([name, f"{min(ls):.4f}", f"{ls[-1]:.4f}", f"{max(r['difference']):.4f}"])
    click.echo(f"{data}: N={len(train)}, d={train.d}; {n_sigmas} sigmas from {_num(res['sigma'][0])} to "
               f"{_num(res['sigma'][-1])}")  # fmt: skip
    click.echo(f"linearity: {res['settings']['linearity']}")
    click.echo(_table(["denoiser", "min linearity", "linearity at sigma_min", "max ||D-D_G||/||D_G||"], rows, "lrrr"))
    _echo_files(out_dir, ["gaussian.json", "gaussian.png"])


@analyze.command("gap", short_help="E||D(x) - D*(x)||^2 per sigma against the empirical optimum.")
@_DATA
@click.option("--models", metavar="LIST", default="gaussian,knn:16", show_default=True,
              help="Denoisers compared with D*: empirical, gaussian, knn:K")
@click.option("--sigmas", "n_sigmas", metavar="INT", type=click.IntRange(min=2), default=12, show_default=True)
@click.option("--n", "n", metavar="INT", type=click.IntRange(min=2), default=256, show_default=True,
              help="Forward samples per sigma")
@_SEED
@_OUT
def analyze_gap_cmd(data, models, n_sigmas, n, seed, out_dir) -> None:
    """The gap to the empirical optimum (Yi, Sun, Li 2023; Niedoba et al. 2025): E||D(x) - D*(x)||^2 per sigma over
    forward samples x = y + sigma n, with 95% confidence intervals. Writes gap.json and gap.png. For any denoiser
    of your own, call diffgen_fast.metrics.gap.analyze_gap({name: D}, train) from Python."""
    from diffgen_fast.metrics.gap import analyze_gap

    train = _analysis_data(data, seed)
    res = analyze_gap(_named_models(models, train), train, sigmas=_sigma_grid(n_sigmas), n=n, seed=seed,
                      out_dir=out_dir)  # fmt: skip
    rows = []
    for name, r in res["models"].items():
        g = r["gap_per_dim"]
        i = max(range(len(g)), key=lambda j: g[j])
        ge = r["eps"]["gap_per_dim"]
        j = max(range(len(ge)), key=lambda k: ge[k])
        rows.append([name, f"{g[i]:.3g}", _num(res["sigma"][i]), f"{g[0]:.3g}", f"{g[-1]:.3g}", f"{ge[j]:.3g}",
                     _num(res["sigma"][j])])  # fmt: skip
    click.echo(f"{data}: N={len(train)}, d={train.d}; n={n} forward samples per sigma")
    click.echo("gap in x0 space ||D - D*||^2 and in eps space ||eps - eps*||^2 = ||D - D*||^2 / sigma^2, per value")
    heads = ["model", "max gap / d", "at sigma", "gap / d at sigma_max", "at sigma_min", "max eps gap / d", "at sigma"]
    click.echo(_table(heads, rows, "lrrrrrr"))
    _echo_files(out_dir, ["gap.json", "gap.png"])


@analyze.command("kde", short_help="Halder's relative distance to the KDE on Gaussian data, swept over N.")
@click.option("--d", "d", metavar="INT[,INT..]", default="8", show_default=True,
              help="Dimension; a list (e.g. 4,16,32) also writes kde_scales.png: P(Delta > 0) and KL against N / d")
@click.option("--ns", metavar="LIST", default="2,4,8,16,32,64,128,256", show_default=True,
              help="Training-set sizes N")
@click.option("--redraws", metavar="INT", type=click.IntRange(min=2), default=40, show_default=True,
              help="Training sets drawn per N")
@click.option("--generator", type=click.Choice(["gaussian", "kde", "linear"]), default="gaussian",
              show_default=True,
              help="Generated distribution: the fitted Gaussian (generalizes), the training KDE (memorizes) or "
                   "Halder's least-squares linear one-step denoiser")
@_SEED
@_OUT
def analyze_kde_cmd(d, ns, redraws, generator, seed, out_dir) -> None:
    """Halder (2024): on data N(0, I_d), E_TG = ||rho_gen - rho_T||^2 and E_OG = ||rho_gen - rho_O||^2 in closed form
    (Gaussian mixtures), Delta = E_TG - E_OG and P(Delta > 0) over redraws of the training set, and the KL of the
    generator to the truth, per N. Writes kde_relative_distance.json and .png (for each d when several are given,
    in d<d>/ subfolders, plus kde_scales.json and .png). --generator linear is the paper's tractable model: a linear
    denoiser fitted by least squares from x_T (OU process to T = 2, l = e^-4) to y; its KL is inf while N <= d."""
    from diffgen_fast.metrics.kde import analyze_kde, scales_figure

    ds = _ints(d, "--d")
    if any(v < 1 for v in ds):
        raise click.BadParameter(f"expected dimensions >= 1, got {d!r}", param_hint="--d")
    runs, names = [], []
    for dim in ds:
        sub = out_dir if len(ds) == 1 else Path(out_dir) / f"d{dim}"
        res = analyze_kde(dim, _ints(ns, "--ns"), redraws=redraws, generator=generator, seed=seed, out_dir=sub)
        runs.append(res)
        prefix = "" if len(ds) == 1 else f"d{dim}/"
        names += [prefix + "kde_relative_distance.json", prefix + "kde_relative_distance.png"]
        rows = [
            [str(N), f"{p:.2f}", f"{dm:+.3g}", "inf" if kl is None or kl == float("inf") else f"{kl:.3g}"]
            for N, p, dm, kl in zip(res["Ns"], res["p_positive"], res["delta_rel_mean"], res["kl_mean"])
        ]
        click.echo(f"d={dim}, generator {generator}, {redraws} redraws per N; transition (P >= 0.5) at N = "
                   f"{res.get('transition_N')}")  # fmt: skip
        click.echo(_table(["N", "P(Delta > 0)", "mean Delta / <rho_O, rho_O>", "KL(gen || true)"], rows, "rrrr"))
        inf_ns = [N for N, f in zip(res["Ns"], res.get("kl_finite_fraction", [])) if f < 1.0]
        if inf_ns:
            click.echo(f"KL = inf at N = {', '.join(map(str, inf_ns))}: the generated covariance C is singular "
                       "(least squares from N points has rank <= N - 1 < d); Delta stays finite")  # fmt: skip
    if len(ds) > 1:
        from diffgen_fast._atomic import write_json_atomic

        scales_figure(runs, Path(out_dir) / "kde_scales.png")
        write_json_atomic({"ds": ds, "runs": [{k: v for k, v in r.items() if k != "files"} for r in runs]},
                          Path(out_dir) / "kde_scales.json")  # fmt: skip
        names += ["kde_scales.json", "kde_scales.png"]
    _echo_files(out_dir, names)


@analyze.command("sweep", short_help="Memorization and the Gaussian-structure metrics over nested subsets.")
@_DATA
@click.option("--ns", metavar="LIST", default="16,64,256,1024,1797", show_default=True, help="Subset sizes N")
@click.option("--metrics", "metrics", metavar="LIST", default="memorization,linearity,gaussian_difference",
              show_default=True, help="Any of memorization, linearity, gaussian_difference, gap")
@click.option("--model", type=click.Choice(["empirical", "gaussian"]), default="empirical", show_default=True,
              help="Denoiser built for each subset")
@click.option("--samples", "n_samples", metavar="INT", type=click.IntRange(min=2), default=64, show_default=True)
@_SEED
@click.option("--no-progress", is_flag=True, default=False, help="Hide the progress bar")
@_OUT
def analyze_sweep_cmd(data, ns, metrics, model, n_samples, seed, no_progress, out_dir) -> None:
    """Training-set-size sweep: for nested subsets of the data (first N points of one permutation), the chosen
    metrics of the subset's empirical optimum (or Gaussian denoiser). Writes sweep.json and sweep.png."""
    from diffgen_fast.denoisers import EmpiricalDenoiser, GaussianDenoiser
    from diffgen_fast.metrics.sweep import size_sweep

    train = _analysis_data(data, seed)
    Ns = [min(n, len(train)) for n in _ints(ns, "--ns")]
    make = EmpiricalDenoiser if model == "empirical" else GaussianDenoiser
    ms = [m.strip() for m in metrics.split(",") if m.strip()]
    res = size_sweep(train, Ns, make_denoiser=make, metrics=ms, n_samples=n_samples, seed=seed, out_dir=out_dir,
                     progress=not no_progress)  # fmt: skip
    head, rows = ["N"], []
    for i, N in enumerate(res["Ns"]):
        row = [str(N)]
        for m in ms:
            v = res["metrics"][m][i]
            row.append(f"{v:.3f}" if m == "memorization" else f"{min(v):.3g}..{max(v):.3g}")
        rows.append(row)
    head += [m if m == "memorization" else f"{m} (range over sigma)" for m in ms]
    click.echo(f"{data}: {model} denoiser per subset; sigmas {_num(res['sigma'][0])}..{_num(res['sigma'][-1])}")
    click.echo(_table(head, rows, "r" * len(head)))
    _echo_files(out_dir, ["sweep.json", "sweep.png"])


@analyze.command("transition", short_help="Train small denoisers at several N: memorization falls as N grows.")
@_DATA
@click.option("--ns", metavar="LIST", default="16,64,256,1024,1797", show_default=True, help="Training-set sizes N")
@click.option("--steps", metavar="INT", type=click.IntRange(min=1), default=None,
              help="Training steps per N (default 3000; 1000 with --quick)")
@click.option("--quick", is_flag=True, default=False, help="Two small settings (N = 8, 128) in well under a minute")
@click.option("--arch", type=click.Choice(["mlp", "unet"]), default="mlp", show_default=True,
              help="Network: EDM-preconditioned MLP or small convolutional UNet (image data only)")
@click.option("--no-strong", is_flag=True, default=False,
              help="Skip the twin networks on disjoint data (strong generalization)")
@_SEED
@click.option("--no-progress", is_flag=True, default=False, help="Hide the progress bars")
@_OUT
def analyze_transition_cmd(data, ns, steps, quick, arch, no_strong, seed, no_progress, out_dir) -> None:
    """The memorization-to-generalization transition end to end, without downloads: for nested subsets of the data,
    train an EDM-preconditioned denoiser (MLP width 512, depth 3, or --arch unet), sample it (EDM Heun), and measure
    the memorized fraction (NN ratio < 1/3 against the subset), the gap to the subset's empirical optimum D*, the
    distance to its Gaussian denoiser D_G and the network's linearity score per sigma; for N <= n/2 a twin network
    trained on a disjoint subset of the same size is sampled from the same noise (strong generalization: paired
    samples agree more with each other than with their own training data at large N). Writes transition.json and
    transition.png. The default run takes a few minutes on 2 CPU cores."""
    from diffgen_fast.metrics.transition import transition

    train = _analysis_data(data, seed)
    Ns = None if quick else [min(n, len(train)) for n in _ints(ns, "--ns")]
    res = transition(train, Ns, steps=steps, seed=seed, quick=quick, arch=arch, strong=not no_strong,
                     out_dir=out_dir, progress=not no_progress)  # fmt: skip
    st = res["strong"]
    rows = []
    for i, N in enumerate(res["Ns"]):
        lin = res["linearity"][i]
        row = [str(N), f"{100 * res['memorized_fraction'][i]:.1f}%", f"{res['gap_to_dstar_mean'][i]:.4f}",
               f"{res['dist_to_dg_mean'][i]:.3f}", f"{min(lin):.3f}"]  # fmt: skip
        if N in st["Ns"]:
            j = st["Ns"].index(N)
            row += [f"{st['pair_cos'][j]:.3f} / {st['nn_cos'][j]:.3f}",
                    f"{st['pair_l2'][j]:.2f} / {st['nn_l2'][j]:.2f}"]  # fmt: skip
        else:
            row += ["-", "-"]
        rows.append(row)
    head = ["N", "memorized", "gap to D* (mean over sigma)", "||D - D_G|| / ||D_G||", "min linearity",
            "cos pair / own NN", "L2 pair / own NN"]  # fmt: skip
    click.echo(f"{data}: {arch}, {res['settings'].get('steps')} training steps per N; {res['wall_seconds']:.0f} s")
    click.echo(_table(head, rows, "rrrrrrr"))
    _echo_files(out_dir, ["transition.json", "transition.png"])


if __name__ == "__main__":  # pragma: no cover
    main()


@analyze.command("jacobian", short_help="Jacobian spectra and effective rank against sigma (D*, D_G, a small network).")
@_DATA
@click.option("--models", metavar="LIST", default="empirical,gaussian,network", show_default=True,
              help="Denoisers: empirical, gaussian, network (an EDM MLP trained here), knn:K")
@click.option("--sigmas", "n_sigmas", metavar="INT", type=click.IntRange(min=2), default=8, show_default=True,
              help="Points of the EDM sigma grid (0.002 to 80)")
@click.option("--k", "k", metavar="INT", type=click.IntRange(min=1), default=16, show_default=True,
              help="Eigenpairs per point")
@click.option("--points", "n_points", metavar="INT", type=click.IntRange(min=1), default=4, show_default=True,
              help="Probe points per sigma")
@click.option("--steps", metavar="INT", type=click.IntRange(min=1), default=1500, show_default=True,
              help="Training steps of the network")
@_SEED
@click.option("--no-progress", is_flag=True, default=False, help="Hide the progress bars")
@_OUT
def analyze_jacobian_cmd(data, models, n_sigmas, k, n_points, steps, seed, no_progress, out_dir) -> None:
    """What a denoiser has learned (Kadkhodaie et al. 2023): the top-k eigenvalues of its Jacobian at noisy training
    points and its effective rank tr J / lambda_max, per sigma. D*'s Jacobian is closed form ((1 / sigma^2) times
    the covariance of the softmax weights: rank ~0 at small sigma, where it copies one point); D_G's is
    U diag(lam / (lam + sigma^2)) U^T; the network's comes from autograd. Writes jacobian.json and jacobian.png."""
    from diffgen_fast.metrics.jacobian import analyze_jacobian
    from diffgen_fast.models import EDMPrecondMLP, train_denoiser

    train = _analysis_data(data, seed)
    items = [s.strip() for s in models.split(",") if s.strip()]
    dens = _named_models(",".join(i for i in items if i != "network"), train) if set(items) - {"network"} else {}
    if "network" in items:
        net = EDMPrecondMLP(train.shape, hidden=256, depth=3, seed=seed)
        train_denoiser(net, train, steps=steps, seed=seed, progress=not no_progress)
        net.eval()
        dens[f"EDM MLP ({steps} steps)"] = net
    sig = _sigma_grid(n_sigmas)
    res = analyze_jacobian(dens, train, sigmas=sig, k=min(k, train.d - 1), n_points=n_points, seed=seed,
                           out_dir=out_dir, progress=not no_progress)  # fmt: skip
    click.echo(f"{data}: N={len(train)}, d={train.d}; {n_sigmas} sigmas from {_num(sig[-1])} to {_num(sig[0])}")
    rows = []
    for name, r in res["denoisers"].items():
        er = r["effective_rank"]
        rows.append([name, f"{er[-1]:.3g}", f"{er[len(er) // 2]:.3g}", f"{er[0]:.3g}", "yes" if r["exact"] else "no"])
    mid = _num(sig[len(sig) // 2])
    click.echo(_table(["denoiser", f"rank at {_num(sig[-1])}", f"at {mid}", f"at {_num(sig[0])}", "closed form"],
                      rows, "lrrrl"))  # fmt: skip
    _echo_files(out_dir, ["jacobian.json", "jacobian.png"])
