"""Strict JSON, written whole: every file the project writes parses with any JSON parser,
and no crash, kill or full disk leaves half of one.

Python's json writes float('nan') as the literal `NaN` (and inf as `Infinity`), which is not
JSON: browsers, jq and strict parsers refuse the whole file. Here a non-finite float becomes
null, and `allow_nan=False` makes any value that slipped through an error instead of a bad file.

A file is replaced atomically (`write_atomic`: `<name>.<pid>-<thread>.tmp`, flushed to disk,
renamed over it) and a JSON-lines file grows by whole lines (`append_line`). Either fails in one OSError
naming the file, whatever went wrong (disk full, file-size limit, a signal), and leaves the
file as it was: no .tmp, no half line.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path


def finite_or_none(obj):
    """`obj` with every non-finite float (also numpy's, at any depth) replaced by None;
    tuples become lists, as json writes them anyway."""
    if isinstance(obj, float):   # numpy.float64 is a float subclass
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return finite_or_none(obj.item())   # numpy / torch scalars
    return obj


def dumps(obj, **kwargs) -> str:
    """json.dumps for files and printed output: non-finite floats as null, never NaN/Infinity."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _refuse(literal: str):
    raise ValueError(f"{literal} is not JSON")


def loads_strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's reader accepts them)."""
    return json.loads(text, parse_constant=_refuse)


def _write_error(path, e: OSError) -> OSError:
    """One line for the user: which file, what the system said, and that the file is whole."""
    reason = e.strerror or str(e) or type(e).__name__
    return OSError(e.errno, f"cannot write {path} ({reason}); it was left as it was")


def write_atomic(path, data: bytes | str) -> None:
    """Replace `path` with `data` all at once: readers, a crash or a kill see the old file or
    the new one. On any failure (an OSError such as a full disk, or a KeyboardInterrupt from a
    signal) the .tmp is removed; an OSError is raised again as one line naming `path`. The .tmp
    is the writer's own (pid and thread in its name): two writers never write into one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())   # the bytes on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass   # (a file system gone read-only meanwhile): nothing more to do
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def save(path, obj, indent: int | None = 2) -> None:
    """`obj` as strict JSON in `path`, atomically (write_atomic)."""
    write_atomic(path, dumps(obj, indent=indent))


def append_line(path, obj) -> None:
    """Append `obj` as one strict JSON line to `path`: the whole line or, on any failure,
    nothing (the file is cut back to its previous length)."""
    line = (dumps(obj) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except BaseException as e:
            os.ftruncate(fd, size)
            if isinstance(e, OSError):
                raise _write_error(path, e) from None
            raise
    finally:
        os.close(fd)
