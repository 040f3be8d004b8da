"""A restricted unpickler for the ``.pkl`` files of nnU-Net v1 model folders.

nnU-Net v1 stores its plans (``plans.pkl``) and the trainer description beside each
checkpoint (``model_final_checkpoint.model.pkl``) as Python pickles. A pickle can name any
importable callable and call it while loading (``__reduce__``), so a model folder from
elsewhere could run code the moment it is read. :func:`load_pickle` reads them with a
:class:`pickle.Unpickler` whose ``find_class`` allows only the types nnU-Net writes: plain
builtins (containers, numbers, strings), :mod:`collections` containers and numpy arrays,
scalars and dtypes. Anything else (``os.system``, ``builtins.eval``, ``subprocess``...)
is refused with :class:`~medinfer.errors.ModelError` before it is called. This follows
the "Restricting Globals" recipe of the :mod:`pickle` documentation.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from medinfer.errors import ModelError

__all__ = ["ALLOWED_GLOBALS", "MAX_PICKLE_BYTES", "load_pickle"]

MAX_PICKLE_BYTES = 50_000_000

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
#: (module, name) pairs a pickle may reference; every other global is refused
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar")]
    + [(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("numpy", n) for n in ("float64", "float32", "float16", "int64", "int32", "int16",
                              "int8", "uint8", "uint16", "uint32", "uint64", "bool_")]
    + [("numpy.dtypes", n) for n in (
        "Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
        "Int16DType", "Int8DType", "UInt8DType", "UInt16DType", "UInt32DType",
        "UInt64DType", "BoolDType", "StrDType", "BytesDType", "ObjectDType")]
    + [("collections", n) for n in ("OrderedDict", "defaultdict", "deque")]
    + [("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int",
                                 "float", "complex", "bool", "str", "bytes", "bytearray",
                                 "slice", "range")]
    + [("_codecs", "encode")]  # bytes of numpy arrays pickled with protocol 2
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ModelError(
            f"{self._source}: refers to {module}.{name}, which is not allowed in an nnU-Net "
            "pickle (only builtins containers/numbers/strings, collections containers and "
            "numpy arrays/scalars/dtypes are loaded; nothing in the file was executed)"
        )


def load_pickle(path: str | os.PathLike[str], *, max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Unpickle ``path`` allowing only the types in :data:`ALLOWED_GLOBALS`.

    Parameters
    ----------
    path : a ``.pkl`` file (e.g. nnU-Net v1 ``plans.pkl``).
    max_bytes : larger files are refused before reading.

    Returns
    -------
    The unpickled object (dicts, lists, numpy arrays...).

    Raises
    ------
    ModelError
        Missing, empty or too large file, a global outside the allow-list (nothing is
        called), or a file that is not a valid pickle.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: file not found")
    size = p.stat().st_size
    if size == 0 or size > max_bytes:
        raise ModelError(f"{p}: size {size} bytes; expected 1..{max_bytes}")
    data = p.read_bytes()
    try:
        return _RestrictedUnpickler(data, str(p)).load()
    except ModelError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"{p}: not a readable pickle ({first})") from None
