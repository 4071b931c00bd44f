"""Reading pickles from a user's folder as data, never as code: an unpickler that builds only numpy arrays,
dtypes, scalars and plain containers, and refuses any other import (``os.system``, ``builtins.eval``, ...)
before calling it — the standard library's "restricting globals" recipe, for the CIFAR batches."""
from __future__ import annotations

import codecs
import os
import pickle
from typing import Any

__all__ = ["UnsafePickleError", "load_plain_pickle"]

_ARRAY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks to import something that is not a numpy array part; the message names it."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, limited to the latin-1 codec."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"refuses _codecs.encode with codec {encoding!r} (only latin-1 builds bytes)")
    return codecs.encode(text, "latin1", errors)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(f"refuses to import {module}.{name} (only numpy arrays and plain containers)")


def load_plain_pickle(path: str | os.PathLike, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` allowing only numpy arrays, dtypes, scalars and dicts, lists, tuples, strings, numbers.

    Anything else raises :class:`UnsafePickleError` before it is imported, so a crafted file runs nothing.
    """
    with open(path, "rb") as f:
        return _PlainUnpickler(f, encoding=encoding).load()
