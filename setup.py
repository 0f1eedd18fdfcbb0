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

The native CUDA kernels (csrc/cuda/*.cu) are compiled by nvcc into objects linked into the same module, with
cudart linked statically (libcudart_static.a -lrt -ldl -lpthread), so the module still imports on a machine with no
GPU driver (diffgen_fast._C.build_info()["cuda_build"] then reports the runtime's error):

    DIFFGEN_FAST_BUILD_CUDA=auto  (default) compile them when nvcc is found (CUDA_HOME/bin, CUDA_PATH/bin, then
                                  PATH); if nvcc fails, print a loud warning and build the extension without CUDA.
    DIFFGEN_FAST_BUILD_CUDA=1     nvcc is required and a CUDA compile error fails the build (CI sets this when
                                  nvcc is present).
    DIFFGEN_FAST_BUILD_CUDA=0     never compile the CUDA sources.
    DIFFGEN_FAST_CUDA_ARCH="8.0;9.0+PTX"  (default) compute capabilities to generate code for: a list separated by
                                  ';', ',' or spaces of MAJOR.MINOR with an optional a/f suffix (9.0a: sm_90a) and an
                                  optional +PTX (also embed PTX for that capability, so newer GPUs JIT-compile it).
                                  Each entry becomes -gencode arch=compute_XY,code=[sm_XY(,compute_XY)].
    CUDAHOSTCXX=path              host compiler for nvcc (-ccbin); default: nvcc's own choice.

Code is compiled for the baseline instruction set of the target (no -march=native), so a wheel runs on any CPU
of its platform; faster paths are to be picked at run time.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
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
BUILD_CUDA = _mode("DIFFGEN_FAST_BUILD_CUDA")
DEFAULT_CUDA_ARCH = "8.0;9.0+PTX"

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
        # -fopenmp-simd: the kernels' `omp simd` loops vectorise (reductions included) even without OpenMP;
        # -fno-trapping-math lets compares/selects vectorise (no FP traps are enabled; results are unchanged)
        optimize = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
        version = self.distribution.get_version()
        for ext in self.extensions:
            ext.define_macros.append(("DIFFGEN_FAST_VERSION", version))
            ext.extra_compile_args += optimize + compile_flags
            ext.extra_link_args += link_flags
            if ext.name == "diffgen_fast._C" and BUILD_CUDA != "off":
                self._add_cuda(ext)
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

    # -- CUDA ---------------------------------------------------------------------------------------------------------

    def _add_cuda(self, ext) -> None:
        """Compile csrc/cuda/*.cu with nvcc and add the objects, the CUDA bindings and static cudart to `ext`.

        auto: a missing nvcc or a failed CUDA compile leaves `ext` without CUDA (loud warning); 1: either fails."""
        nvcc = _find_nvcc()
        if nvcc is None:
            if BUILD_CUDA == "on":
                raise RuntimeError(
                    "DIFFGEN_FAST_BUILD_CUDA=1 but nvcc was not found (CUDA_HOME/bin, CUDA_PATH/bin, PATH)"
                )
            print("diffgen-fast: nvcc not found; building without the CUDA kernels", flush=True)
            return
        try:
            objects, cudart, nvcc_version, archs = self._compile_cuda(nvcc)
        except Exception as exc:
            if BUILD_CUDA == "on":
                raise
            _banner(
                [
                    "WARNING: diffgen-fast: compiling the CUDA kernels FAILED; building the extension WITHOUT them.",
                    f"  {type(exc).__name__}: {exc}",
                    "  The 'cuda' backend will be unavailable. Full error: DIFFGEN_FAST_BUILD_CUDA=1 pip install -v .",
                    "  To skip CUDA quietly: DIFFGEN_FAST_BUILD_CUDA=0.",
                ]
            )
            traceback.print_exc()
            return
        ext.sources.append("csrc/cuda/bindings_cuda.cpp")
        ext.extra_objects += [*objects, cudart]
        ext.extra_link_args += ["-lrt", "-ldl", "-lpthread"]
        # String literals: setuptools passes each -D as one argv element (no shell), so the quotes arrive intact.
        ext.define_macros += [
            ("DIFFGEN_FAST_WITH_CUDA", "1"),
            ("DIFFGEN_FAST_NVCC_VERSION", f'"{nvcc_version}"'),
            ("DIFFGEN_FAST_CUDA_ARCHS", f'"{archs}"'),
        ]

    def _compile_cuda(self, nvcc: str) -> tuple[list[str], str, str, str]:
        """(objects, path of libcudart_static.a, nvcc version, arch list) after compiling every csrc/cuda/*.cu."""
        sources = sorted(glob.glob("csrc/cuda/*.cu"))
        if not sources:
            raise RuntimeError("no csrc/cuda/*.cu sources found")
        arch_spec = os.environ.get("DIFFGEN_FAST_CUDA_ARCH", "").strip() or DEFAULT_CUDA_ARCH
        gencode = _cuda_gencode(arch_spec)
        nvcc_version = _nvcc_version(nvcc)
        cudart = _find_cudart_static(nvcc)
        jobs = max(1, int(os.environ.get("DIFFGEN_FAST_BUILD_JOBS", "0") or 0) or (os.cpu_count() or 1))
        # files in parallel, and nvcc's own threads over the -gencode targets of each file with the cores left
        threads = max(1, jobs // len(sources))
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-Icsrc"]
        flags += ["--threads", str(threads), *gencode]
        host = os.environ.get("CUDAHOSTCXX", "").strip()
        if host:
            flags += ["-ccbin", host]
        commands = []
        for src in sources:
            obj = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".o")
            commands.append((src, obj, [nvcc, *flags, "-c", src, "-o", obj]))
        print(
            f"diffgen-fast: nvcc {nvcc_version} ({nvcc}): {len(sources)} CUDA sources, {jobs} jobs, arch {arch_spec}",
            flush=True,
        )
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(jobs, len(commands))) as pool:
            results = list(pool.map(lambda c: _run_nvcc(*c), commands))
        failed = [msg for ok, msg in results if not ok]
        if failed:
            raise RuntimeError("nvcc failed:\n" + "\n".join(failed))
        print(f"diffgen-fast: CUDA sources compiled in {time.monotonic() - t0:.1f} s", flush=True)
        return [obj for _, obj, _ in commands], cudart, nvcc_version, arch_spec

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


def _find_nvcc() -> str | None:
    """nvcc from CUDA_HOME/bin, CUDA_PATH/bin, then PATH; None if there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var, "").strip()
        if root:
            cand = os.path.join(root, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return shutil.which("nvcc")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release [0-9.]+, V([0-9.]+)", out) or re.search(r"release ([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"cannot read the version from `{nvcc} --version`: {out.strip()!r}")
    return m.group(1)


def _find_cudart_static(nvcc: str) -> str:
    """libcudart_static.a from the library directories nvcc itself links with (nvcc --dryrun), else the usual
    places under CUDA_HOME, CUDA_PATH and the directory above nvcc's bin."""
    dirs = []
    with tempfile.TemporaryDirectory(prefix="diffgen_fast_nvcc_") as tmp:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", os.path.join(tmp, "probe.cu"), "-o", os.path.join(tmp, "probe.o")],
            capture_output=True,
            text=True,
        )
    for line in (dry.stdout + dry.stderr).splitlines():
        if "LIBRARIES=" in line:
            dirs += [tok[2:] for tok in shlex.split(line.split("LIBRARIES=", 1)[1]) if tok.startswith("-L")]
    roots = [os.environ.get(v, "").strip() for v in ("CUDA_HOME", "CUDA_PATH")]
    roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs += [os.path.join(r, sub) for r in roots if r for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    for d in dirs:
        cand = os.path.join(d, "libcudart_static.a")
        if os.path.isfile(cand):
            return os.path.realpath(cand)
    raise RuntimeError(f"libcudart_static.a not found (looked in {', '.join(dirs)})")


def _cuda_gencode(spec: str) -> list[str]:
    """-gencode flags of a DIFFGEN_FAST_CUDA_ARCH list such as "8.0;9.0+PTX" or "8.6, 9.0a"."""
    flags = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if m is None:
            raise RuntimeError(
                f"DIFFGEN_FAST_CUDA_ARCH: {entry!r} is not MAJOR.MINOR[a|f][+PTX] (e.g. 8.0, 9.0a, 9.0+PTX)"
            )
        cc = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
        code = f"sm_{cc},compute_{cc}" if m.group(4) else f"sm_{cc}"
        flags += ["-gencode", f"arch=compute_{cc},code=[{code}]"]
    if not flags:
        raise RuntimeError(f"DIFFGEN_FAST_CUDA_ARCH={spec!r} names no architecture")
    return flags


def _run_nvcc(src: str, obj: str, cmd: list[str]) -> tuple[bool, str]:
    print("diffgen-fast: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return False, f"{src}: exit status {proc.returncode}\n{output}"
    if output:
        print(output, flush=True)
    return True, ""


def _extensions() -> list[Pybind11Extension]:
    if BUILD_EXT == "off":
        print("diffgen-fast: DIFFGEN_FAST_BUILD_EXT=0, not building the native extension", flush=True)
        return []
    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(glob.glob("csrc/cuda/*.cu"))
    return [Pybind11Extension("diffgen_fast._C", sources, depends=headers, include_dirs=["csrc"], cxx_std=17)]


os.chdir(os.path.dirname(os.path.abspath(__file__)))
ParallelCompile("DIFFGEN_FAST_BUILD_JOBS").install()
setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
