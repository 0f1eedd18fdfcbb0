"""Build script for diffgen-fast's native extension, diffgen_fast._C (the metadata lives in pyproject.toml).

The extension is pybind11 + C++17 (+ OpenMP where the compiler has it), with no torch headers: Python allocates
every buffer and passes raw pointers, so the build needs no torch and no ``--no-build-isolation``. The package
works without the extension (the pure-torch backends); diffgen_fast._native says why it is missing.

Environment switches, read at build time:

    DIFFGEN_FAST_BUILD_EXT=auto   (default) build the extension; if the compiler fails, print a loud warning and
                                  install the package without it. pip shows a build's output only with -v.
    DIFFGEN_FAST_BUILD_EXT=1      build the extension; a failure fails the install (CI sets this).
    DIFFGEN_FAST_BUILD_EXT=0      skip the extension entirely (no compiler needed).
    DIFFGEN_FAST_OPENMP=auto|0|1  auto (default): use OpenMP when a probe compile and link succeeds; 0: never;
                                  1: a failed probe fails the extension build.
    DIFFGEN_FAST_BUILD_JOBS=N     parallel compile jobs (default: all cores).

Reserved for the CUDA sources of a later task (not read yet; there are no .cu files):

    DIFFGEN_FAST_BUILD_CUDA=auto|0|1  auto: compile csrc/cuda/*.cu when nvcc is found; 1: required; 0: skip.
    DIFFGEN_FAST_CUDA_ARCH="8.0;9.0"  compute capabilities to generate code for.

Code is compiled for the baseline instruction set of the target (no -march=native), so a wheel runs on any CPU
of its platform; faster paths are to be picked at run time.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import textwrap
import traceback

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


def _mode(name: str, default: str = "auto") -> str:
    """'off', 'on' or 'auto' from an environment variable."""
    value = os.environ.get(name, default).strip().lower() or default
    if value in _OFF:
        return "off"
    if value in _ON:
        return "on"
    if value == "auto":
        return "auto"
    raise SystemExit(f"setup.py: {name}={os.environ[name]!r} is not one of auto, 0, 1")


BUILD_EXT = _mode("DIFFGEN_FAST_BUILD_EXT")
OPENMP = _mode("DIFFGEN_FAST_OPENMP")

_OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main() {
        int n = 0;
    #pragma omp parallel reduction(+ : n)
        n += 1;
        return (n > 0 && omp_get_max_threads() > 0) ? 0 : 1;
    }
    """
)


def _banner(lines: list[str]) -> None:
    bar = "=" * 100
    print("\n".join(["", bar, *lines, bar, ""]), file=sys.stderr, flush=True)


class BuildExt(build_ext):
    """pybind11's build_ext plus an OpenMP probe, the version macro, and the auto/required failure policy."""

    _failed: list[str]

    def run(self) -> None:
        self._failed = []
        try:
            super().run()
        except Exception as exc:
            if BUILD_EXT == "on":
                raise
            # Failures outside build_extension (compiler set-up): nothing was built.
            self._warn_failure("the extension build", exc)
            self.extensions = []

    def build_extensions(self) -> None:
        compile_flags, link_flags = self._openmp_flags() if OPENMP != "off" else ([], [])
        optimize = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3"]
        version = self.distribution.get_version()
        for ext in self.extensions:
            ext.define_macros.append(("DIFFGEN_FAST_VERSION", version))
            ext.extra_compile_args += optimize + compile_flags
            ext.extra_link_args += link_flags
        super().build_extensions()
        # Leave out what failed, so the editable install and the wheel do not look for its output.
        self.extensions = [ext for ext in self.extensions if ext.name not in self._failed]

    def build_extension(self, ext) -> None:
        if BUILD_EXT == "on":
            super().build_extension(ext)
            return
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._failed.append(ext.name)
            self._warn_failure(f"building {ext.name}", exc)

    def _warn_failure(self, what: str, exc: BaseException) -> None:
        _banner(
            [
                f"WARNING: diffgen-fast: {what} FAILED; installing WITHOUT the native extension.",
                f"  {type(exc).__name__}: {exc}",
                "  The package works with its pure-torch backends; the 'cpu' backend is unavailable.",
                "  To see the full error: DIFFGEN_FAST_BUILD_EXT=1 pip install -v .",
                "  To skip the extension quietly: DIFFGEN_FAST_BUILD_EXT=0.",
            ]
        )
        traceback.print_exc()

    def _openmp_flags(self) -> tuple[list[str], list[str]]:
        """(compile flags, link flags) of the first OpenMP spelling that compiles and links here, or ([], [])."""
        if self.compiler.compiler_type == "msvc":
            candidates = [(["/openmp"], [])]
        elif sys.platform == "darwin":
            candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
        else:
            candidates = [(["-fopenmp"], ["-fopenmp"])]
        for compile_flags, link_flags in candidates:
            if self._probe(compile_flags, link_flags):
                print(f"diffgen-fast: OpenMP enabled: compile {compile_flags}, link {link_flags}", flush=True)
                return compile_flags, link_flags
        if OPENMP == "on":
            raise RuntimeError("DIFFGEN_FAST_OPENMP=1 but no OpenMP flags compile and link with this compiler")
        _banner(["WARNING: diffgen-fast: no usable OpenMP (or no working compiler); kernels will run on one thread."])
        return [], []

    def _probe(self, compile_flags: list[str], link_flags: list[str]) -> bool:
        old_cwd = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="diffgen_fast_probe_") as tmp:
            try:
                os.chdir(tmp)
                with open("probe.cpp", "w", encoding="utf-8") as f:
                    f.write(_OPENMP_PROBE)
                objects = self.compiler.compile(["probe.cpp"], extra_postargs=compile_flags)
                self.compiler.link_executable(objects, "probe", extra_postargs=link_flags, target_lang="c++")
                return True
            except Exception as exc:
                print(f"diffgen-fast: OpenMP probe with {compile_flags + link_flags} failed: {exc}", flush=True)
                return False
            finally:
                os.chdir(old_cwd)


def _extensions() -> list[Pybind11Extension]:
    if BUILD_EXT == "off":
        print("diffgen-fast: DIFFGEN_FAST_BUILD_EXT=0, not building the native extension", flush=True)
        return []
    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True))
    return [Pybind11Extension("diffgen_fast._C", sources, depends=headers, include_dirs=["csrc"], cxx_std=17)]


os.chdir(os.path.dirname(os.path.abspath(__file__)))
ParallelCompile("DIFFGEN_FAST_BUILD_JOBS").install()
setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
