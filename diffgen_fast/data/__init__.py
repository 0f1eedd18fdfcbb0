"""Training sets: N points of one per-item shape, served as a flattened ``[N, d]`` float view.

:class:`TrainingSet` is what every kernel, denoiser and memorization metric reads. It holds the points either in
memory (a torch tensor on any device) or out of core (a read-only memory map of an ``.npy`` file, whose pages load
lazily), and serves them whole (:meth:`TrainingSet.flat`) or in bounded chunks (:meth:`TrainingSet.iter_chunks`).
Chunks of a file-backed set are read with explicit reads into fresh buffers (never handed out as views of the map),
and the file is checked unchanged (size, modification time, inode) before every chunk: a file truncated or rewritten
while in use raises :class:`~diffgen_fast.errors.DataFormatError` naming it instead of killing the process (SIGBUS).
Per-set statistics that several consumers need (squared norms, mean, covariance, finiteness, a content fingerprint)
are streamed over chunks with float64 accumulation and cached.

Loaders cover arrays (torch / numpy), ``.npy`` (memory-mapped by default), ``.npz``, folders of images, EDM
``dataset_tool`` zips, the python version of CIFAR-10 (directory or ``.tar.gz``, read without extracting and without
running arbitrary pickle code) and small built-ins. Every failure raises an error from :mod:`diffgen_fast.errors`
that names the argument or file at fault and what was expected.

Archive members (``.npz`` arrays, zip entries, tar entries) are refused when their declared uncompressed size exceeds
a limit, so that a small file that expands hugely (a "zip bomb") is never read whole: :data:`MAX_MEMBER_BYTES`
(4 GiB), overridden by the environment variable ``DIFFGEN_FAST_MAX_MEMBER_BYTES`` and by the ``max_member_bytes=``
keyword of the archive loaders; and a member of more than 64 MiB that expands more than :data:`MAX_EXPANSION` (100)
times its compressed size is refused whatever the limit (``DIFFGEN_FAST_MAX_EXPANSION`` raises it), so a 3 GB member
packed in 3 MB is refused by default.

The package:

- :mod:`.training_set`: :class:`TrainingSet` (construction, views, subsets, chunk streaming with the file checks,
  statistics; its ``from_*`` constructors call the format readers), :data:`DEFAULT_CHUNK_BYTES`.
- :mod:`.formats`: one module per input format (``npy`` for .npy / .npz, ``images`` for image folders and EDM zips,
  ``cifar``, ``builtin``), the archive member limits (``formats._archive``) and the format sniffing of
  :meth:`TrainingSet.open`.
- :mod:`._checks`: the small argument checks shared by all of them.

The names below are re-exported here so that ``from diffgen_fast.data import X`` works as before the split. The
module constants are read in the module that defines them (``DEFAULT_CHUNK_BYTES`` in ``training_set``,
``IMAGE_CACHE_CHUNK`` in ``formats.images``, the member limits in ``formats._archive``): patch them there.
"""

from __future__ import annotations

# Besides __all__, importable as before: the other public constants and the private helpers used outside the package
# (the CLI opens its inputs with _as_path / _require_exists / _sniff; the tests call _member_limit and _zip_read).
from diffgen_fast.data._checks import FLOAT_DTYPES, IMAGE_SCALES, PathLike, _as_path, _require_exists  # noqa: F401
from diffgen_fast.data.formats import _sniff  # noqa: F401
from diffgen_fast.data.formats._archive import (  # noqa: F401
    EXPANSION_FREE_BYTES,
    MAX_EXPANSION,
    MAX_EXPANSION_ENV,
    MAX_MEMBER_BYTES,
    MAX_MEMBER_BYTES_ENV,
    _member_limit,
    _zip_read,
)
from diffgen_fast.data.formats.builtin import BUILTINS
from diffgen_fast.data.formats.images import IMAGE_CACHE_CHUNK, IMAGE_EXTENSIONS, MAX_CLASS_LABEL  # noqa: F401
from diffgen_fast.data.training_set import DEFAULT_CHUNK_BYTES, TrainingSet

__all__ = [
    "BUILTINS",
    "DEFAULT_CHUNK_BYTES",
    "FLOAT_DTYPES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SCALES",
    "MAX_CLASS_LABEL",
    "MAX_MEMBER_BYTES",
    "MAX_MEMBER_BYTES_ENV",
    "MAX_EXPANSION",
    "MAX_EXPANSION_ENV",
    "TrainingSet",
]
