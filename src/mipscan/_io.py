"""Index folders: one .npy per array plus mipscan.json (format, version, config,
shapes, dtypes, sha256 of each file). No pickle anywhere.

Reading trusts nothing in the folder: every file is opened relative to one open handle
of the folder (so a load sees one folder even while ``serialize`` swaps another in),
without following symbolic links, and must be a regular file; the manifest's size and
nesting are bounded before it is parsed; each ``.npy`` header is parsed here (C order,
the exact dtype and shape the manifest names, the exact file size) and every value is
checked against the rules of ``mipscan._schema`` (finite floats within the builder's
bounds, offsets and slot ids in range), because a folder whose checksums were recomputed
after an edit passes the checksum check.

Writing never deletes anything it did not write: ``serialize`` replaces only an empty
folder or a mipscan index whose files are exactly the ones its manifest lists, and it
removes only the file names an index holds. Writers lock their temporary folder
(``flock``) for their whole life; a writer cleans up another one's temporary folder only
when it can take that lock, which works across processes in any PID namespace.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

import numpy as np

from mipscan._schema import (ARRAY_QUANTIZE, ARRAYS, FLOAT_ARRAYS, array_value_errors,
                             check_stored_config, docids_to_arrays, float_value_bounds,
                             mips_width, required_arrays, spread_weight_of)
from mipscan._validation import Bool, check_value

try:
    import fcntl
except ImportError:  # no flock (Windows): writers do not lock, and no clean-up deletes
    fcntl = None

FORMAT = "mipscan-index"
FORMAT_VERSION = 2
#: Versions read: 1 (static indexes, no docids) and 2 (adds docids; written only for an
#: index with docids, so a static index's folder is unchanged).
READ_VERSIONS = (1, 2)
MANIFEST = "mipscan.json"

#: Bounds of a manifest before it is parsed (one written here is about 2 KB, 4 levels deep).
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 32

#: Every name a writer may create inside an index folder (or its temporary folder): the
#: only names serialize() and the orphan clean-up ever delete.
_INDEX_FILES = frozenset([MANIFEST] + [f"{name}.npy" for name in ARRAYS])

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)

# Values are checked in row chunks of about this many bytes (cache-sized: one read each).
_CHECK_CHUNK_BYTES = 1 << 19


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(1 << 20, size - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: errno values of renameat2(RENAME_EXCHANGE) meaning "not supported here" (old kernel,
#: file system without it): only these fall back to the two-rename path.
_EXCHANGE_UNSUPPORTED = frozenset(e for e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP,
                                              getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE). False if the system
    or file system does not support it; raises OSError for any other failure (which the
    non-atomic fallback must not paper over)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None,
                  str(b))


def _as_path(call: str, directory) -> Path:
    if isinstance(directory, bytes):
        directory = os.fsdecode(directory)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{call}: directory must be a str or os.PathLike; got "
                        f"{type(directory).__name__}")
    raw = os.fspath(directory)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw or "\0" in raw:
        raise ValueError(f"{call}: directory must be a non-empty path without NUL; got {directory!r}")
    return Path(raw)


# ---------------------------------------------------------------- temporary folders
def _remove_index_files(folder: Path, dir_fd: int | None = None) -> bool:
    """Deletes the index files (``_INDEX_FILES``) in ``folder``, then the folder if that
    left it empty. Anything else in it (a user's file) is kept, and so is the folder.
    Never follows a symbolic link. True if the folder is gone."""
    own = dir_fd is None
    if own:
        try:
            dir_fd = os.open(folder, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return not os.path.lexists(folder)
    try:
        for name in os.listdir(dir_fd):
            if name in _INDEX_FILES:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except (IsADirectoryError, PermissionError, FileNotFoundError):
                    pass  # a folder under an index file's name is not ours to delete
                except OSError:
                    pass
    except OSError:
        pass
    finally:
        if own:
            os.close(dir_fd)
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _lock_new_temp(target: Path) -> tuple[Path, int]:
    """Creates this writer's temporary folder beside ``target`` and takes an exclusive
    ``flock`` on it, held until :func:`write_index` ends: the lock, not the pid in the
    name, is what tells other writers that the folder is live."""
    for _ in range(100):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            fd = os.open(tmp, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:  # removed as an orphan before we could lock it
            continue
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits if a clean-up holds it
        try:
            same = os.stat(tmp, follow_symlinks=False)
            mine = os.fstat(fd)
            if (same.st_dev, same.st_ino) == (mine.st_dev, mine.st_ino) and mine.st_nlink > 0:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a clean-up deleted it between mkdtemp and our lock: try again
    raise OSError(f"serialize(): could not create a temporary folder beside {str(target)!r}")


def _remove_orphans(target: Path) -> None:
    """Deletes temporary folders that earlier serialize() calls into ``target`` left
    behind when their process died (killed mid-write). A writer holds an exclusive
    ``flock`` on its temporary folder while it lives; a folder is deleted only if that
    lock can be taken without waiting, so a live writer's folder is never touched,
    whatever PID namespace it runs in (a pid says nothing across containers)."""
    if fcntl is None:
        return  # without locks, liveness cannot be told: never delete
    prefix = f".{target.name}.tmp-"
    try:
        names = [n for n in os.listdir(target.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = target.parent / name
        try:
            fd = os.open(path, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone, not a folder, or a symbolic link: not ours
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live writer (any namespace)
                continue
            try:
                st, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                continue  # renamed or replaced meanwhile
            _remove_index_files(path, fd)
        finally:
            os.close(fd)  # releases the lock


# ---------------------------------------------------------------- writing
def _replaceable(target: Path, shown: str) -> None:
    """Raises ValueError unless ``target`` is absent, an empty folder, or a mipscan index
    whose folder holds exactly the files its manifest lists (so replacing it deletes
    nothing that serialize() did not write). Reads one folder through one handle; if a
    concurrent serialize swaps the folder meanwhile, checks the new one."""
    for _ in range(_LOAD_ATTEMPTS):
        try:
            st = os.stat(target, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"serialize(): directory {shown} exists and is not a folder")
        try:
            dir_fd = os.open(target, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            continue
        try:
            _check_replaceable(target, shown, dir_fd)
            return
        except (ValueError, FileNotFoundError):
            if _still_there(target, dir_fd):
                raise
        finally:
            os.close(dir_fd)
    raise ValueError(f"serialize(): {shown} was replaced {_LOAD_ATTEMPTS} times while being "
                     "checked; try again")


def _check_replaceable(target: Path, shown: str, dir_fd: int) -> None:
    entries = sorted(os.listdir(dir_fd))
    if not entries:
        return
    refuse = (f"serialize(): {shown} is a non-empty folder that is not a mipscan index; "
              "refusing to replace it")
    if MANIFEST not in entries:
        raise ValueError(refuse)
    try:
        fd = _open_regular(target, MANIFEST, dir_fd)
    except ValueError as exc:
        raise ValueError(f"{refuse} ({exc})") from None
    try:
        manifest = _parse_manifest(fd, target / MANIFEST)
    except ValueError as exc:
        raise ValueError(f"{refuse} (its {MANIFEST} is not a mipscan manifest: {exc})") from None
    finally:
        os.close(fd)
    listed = manifest.get("arrays") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(listed, dict)
            or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in listed.values())):
        raise ValueError(f"{refuse} (its {MANIFEST} is not a mipscan manifest)")
    files = {MANIFEST} | {e["file"] for e in listed.values()}
    extra = [e for e in entries if e not in files or e not in _INDEX_FILES]
    if extra:
        raise ValueError(f"serialize(): {shown} is a mipscan index but also holds "
                         f"{len(extra)} file(s) it does not list ({', '.join(extra[:5])}"
                         f"{', ...' if len(extra) > 5 else ''}); refusing to replace it "
                         "(move them away, or serialize to another folder)")
    for name in entries:
        if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise ValueError(f"serialize(): {shown}: {name} is not a regular file; "
                             "refusing to replace the folder")


def write_index(directory, config: dict, arrays: dict[str, np.ndarray], docids: list | None = None
                ) -> None:
    """Writes an index folder (``Searcher.serialize``), atomically: readers see the old
    index or the complete new one, never a mix.

    ``directory`` may be absent, an empty folder, or a mipscan index whose folder holds
    only the files its manifest lists; anything else (a folder with other files, even
    one with its own ``mipscan.json``; an index a user added files to; a file) is refused
    with ValueError and left untouched. A symbolic link is followed: the folder it points
    to is replaced (the link stays a link), as ``open()`` writes through a link.
    """
    version = 1
    if docids is not None:
        kind, extra = docids_to_arrays(docids)
        config = {**config, "docids": kind}
        arrays = {**arrays, **extra}
        version = FORMAT_VERSION
    given = _as_path("serialize()", directory)
    target = Path(os.path.realpath(given.absolute()))
    shown = repr(str(given)) if target == given.absolute() else \
        f"{str(given)!r} (resolves to {str(target)!r})"
    _replaceable(target, shown)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp, lock = _lock_new_temp(target)
    old = tmp  # what to delete at the end: our temporary, or the index we replaced
    try:
        manifest = {"format": FORMAT, "format_version": version,
                    "config": config, "arrays": {}}
        for name, arr in arrays.items():
            path = tmp / f"{name}.npy"
            with open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            manifest["arrays"][name] = {"file": path.name, "dtype": np.dtype(arr.dtype).str,
                                        "shape": list(arr.shape), "sha256": _sha256(path)}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = _swap_in(tmp, target)
        _fsync_dir(target.parent)
    finally:
        try:
            if old is not None:
                _remove_index_files(old)
        finally:
            os.close(lock)


def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Puts ``tmp`` at ``target``: one atomic exchange when there is a folder there (the
    old folder ends up at ``tmp``, returned for deletion), one rename when there is
    none. Without RENAME_EXCHANGE (ENOSYS/EINVAL/ENOTSUP only) two renames, which are
    not atomic together (a crash between them leaves the old index at ``.NAME.old-PID-*``)."""
    for _ in range(10):
        if os.path.lexists(target):
            try:
                if _exchange(tmp, target):
                    return tmp
            except FileNotFoundError:  # the target vanished meanwhile: rename instead
                if not os.path.lexists(tmp):
                    raise
                continue
            # pid + random: writers in two PID namespaces may share a pid
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(target, old)
            os.rename(tmp, target)
            return old
        try:
            os.rename(tmp, target)
            return None
        except OSError as exc:  # another writer put a folder there meanwhile: exchange
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(f"serialize(): {str(target)!r} kept changing while being replaced")


# ---------------------------------------------------------------- reading
def _open_regular(root: Path, name: str, dir_fd: int | None, field: str | None = None) -> int:
    """Opens ``root/name`` read-only without following a symbolic link (relative to
    ``dir_fd`` when given); raises ValueError unless it is a regular file."""
    path = root / name
    where = f" ({field})" if field else ""
    try:
        fd = os.open(name if dir_fd is not None else path, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ValueError(f"load_searcher(): {str(path)!r} is missing{where}") from None
    except OSError as exc:
        try:
            mode = os.stat(name if dir_fd is not None else path, dir_fd=dir_fd,
                           follow_symlinks=False).st_mode
        except OSError:
            mode = None
        if exc.errno == errno.ELOOP or (mode is not None and stat.S_ISLNK(mode)):
            raise ValueError(f"load_searcher(): {str(path)!r} is a symbolic link{where}; index "
                             "files must be regular files inside the folder") from None
        if exc.errno == errno.EISDIR or (mode is not None and not stat.S_ISREG(mode)):
            raise ValueError(f"load_searcher(): {str(path)!r} is not a regular file{where}") from None
        raise ValueError(f"load_searcher(): {str(path)!r} cannot be opened{where}: {exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"load_searcher(): {str(path)!r} is not a regular file{where}")
    return fd


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _parse_manifest(fd: int, mpath: Path):
    """Reads and parses a manifest from ``fd`` with its size and nesting bounded first
    (no RecursionError, no unbounded memory); integers too long for Python's int-string
    limit are refused too. ValueError names the path."""
    def bad(why: str) -> ValueError:
        return ValueError(f"load_searcher(): {str(mpath)!r}: (whole file): {why}")

    size = os.fstat(fd).st_size
    if size > MAX_MANIFEST_BYTES:
        raise bad(f"{size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    raw = b""
    while len(raw) <= MAX_MANIFEST_BYTES:
        chunk = os.read(fd, MAX_MANIFEST_BYTES + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > MAX_MANIFEST_BYTES:
        raise bad(f"more than {MAX_MANIFEST_BYTES} bytes")
    # Nesting depth outside strings, without recursion: +1 per [ or {, -1 per ] or }.
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    steps = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int32)
             - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int32))
    depth = int(np.cumsum(steps).max()) if steps.size else 0
    if depth > MAX_MANIFEST_DEPTH:
        raise bad(f"nested {depth} levels deep; a manifest is at most {MAX_MANIFEST_DEPTH}")

    try:
        return json.loads(raw.decode("utf-8"))  # NaN allowed: defaults such as reorder's
    except UnicodeDecodeError as exc:
        raise bad(f"not valid JSON (not UTF-8: {exc})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # json.JSONDecodeError, integers past sys.get_int_max_str_digits()
        raise bad(f"not valid JSON ({type(exc).__name__}: {exc})") from None


def _read_npy(dir_fd: int, root: Path, name: str, field: str, dtype, shape: list,
              mmap: bool, sha256: str | None, bounds=None) -> tuple[np.ndarray, bool]:
    """Opens one array file of the folder, checks its header (C order, exact dtype and
    shape, exact size) and its sha256 (when given), and returns it (memory-mapped, or read
    once into memory: the bytes hashed are the bytes kept), with whether its values were
    checked. With ``mmap`` and per-column ``bounds`` (a 2-D float array), the values are
    checked on the bytes read for the hash, in chunks, so that a load does not fault
    every page of the mapping into the process (pages are mapped as searches use them)."""
    path = root / name
    fd = _open_regular(root, name, dir_fd, field)

    def bad(why: str) -> ValueError:
        return ValueError(f"load_searcher(): {str(path)!r}: {why} ({field})")

    f = os.fdopen(fd, "rb", buffering=0)
    with f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except Exception as exc:  # wrong magic, truncated or malformed header, ...
            raise ValueError(f"load_searcher(): {str(path)!r} is not a readable .npy file "
                             f"({field}): {type(exc).__name__}: {exc}") from None
        file_shape, fortran, file_dtype = header
        if fortran:
            raise bad("is stored in Fortran order; index arrays are C-ordered")
        if file_dtype != np.dtype(dtype) or file_dtype.str != np.dtype(dtype).str:
            raise bad(f"holds {file_dtype.str}; {MANIFEST} says {np.dtype(dtype).str} "
                      f"({field}.dtype)")
        if list(file_shape) != shape:
            raise bad(f"has shape {tuple(file_shape)}; {MANIFEST} says {tuple(shape)} "
                      f"({field}.shape)")
        offset = f.tell()
        nbytes = int(np.prod(shape, dtype=object)) * file_dtype.itemsize
        size = os.fstat(fd).st_size
        if size != offset + nbytes:
            raise bad(f"has {size} bytes; its header and shape {tuple(shape)} need "
                      f"{offset + nbytes} (truncated or grown)")
        mismatch = bad(f"does not match its sha256 in {MANIFEST} ({field}.sha256): the file "
                       "is damaged or was replaced")
        if mmap and nbytes:
            checked = (bounds is not None and len(shape) == 2 and shape[1] == len(bounds[0])
                       and hasattr(os, "preadv"))
            if checked:
                h = hashlib.sha256(os.pread(fd, offset, 0))
                row_bytes = shape[1] * file_dtype.itemsize
                step = max(1, (1 << 20) // row_bytes)
                buf = memoryview(bytearray(step * row_bytes))  # reused: no page faults
                value_error = None
                for r in range(0, shape[0], step):
                    rows = min(step, shape[0] - r)
                    want = rows * row_bytes
                    got = os.preadv(fd, [buf[:want]], offset + r * row_bytes)
                    if got != want:
                        raise bad(f"ended early at byte {offset + r * row_bytes + got}")
                    if sha256 is not None:
                        h.update(buf[:want])
                    if value_error is None:
                        chunk = np.frombuffer(buf[:want], file_dtype).reshape(rows, shape[1])
                        try:
                            _check_float_values(path, field, chunk, *bounds, row0=r)
                        except ValueError as exc:  # reported after the checksum (damage first)
                            value_error = exc
                            if sha256 is None:
                                break
                if sha256 is not None and h.hexdigest() != sha256:
                    raise mismatch
                if value_error is not None:
                    raise value_error
            elif sha256 is not None and _sha256_fd(fd, size) != sha256:
                raise mismatch
            arr = np.memmap(f, dtype=file_dtype, mode="r", offset=offset, shape=tuple(shape))
            return arr, checked
        arr = np.empty(tuple(shape), file_dtype)
        view = memoryview(arr).cast("B") if nbytes else memoryview(b"")
        got = 0
        while got < nbytes:
            k = f.readinto(view[got:])
            if not k:
                raise bad(f"ended after {offset + got} bytes; expected {offset + nbytes}")
            got += k
        if sha256 is not None:
            h = hashlib.sha256(os.pread(fd, offset, 0))
            h.update(view)
            if h.hexdigest() != sha256:
                raise mismatch
        return arr, False


def _check_float_values(path: Path, field: str, arr: np.ndarray, low: np.ndarray,
                        high: np.ndarray, row0: int = 0) -> None:
    """One pass over a float array (in cache-sized row chunks): finite, and each column
    within ``[low, high]``. ValueError names the file, the field and the first bad index.
    ``arr`` is (rows, width), or codebooks (num_blocks, 16, dims_per_block), whose columns
    are block-major dimensions."""
    if arr.ndim == 3:  # codebooks: tiny; columns = block * dims_per_block + dim
        blocks, words, dpb = arr.shape
        flat = np.ascontiguousarray(np.asarray(arr).transpose(1, 0, 2)).reshape(words, blocks * dpb)

        def at(r, c):
            return (c // dpb, r, c % dpb)
    else:
        flat = np.asarray(arr)  # a plain view of a memmap: no subclass overhead per chunk

        def at(r, c):
            return (row0 + r, c)
    rows = flat.shape[0]
    if rows == 0 or flat.shape[1] == 0:
        return
    if flat.shape[1] != low.shape[0]:
        raise ValueError(f"load_searcher(): {str(path)!r}: {field}: has {flat.shape[1]} "
                         f"columns; expected {low.shape[0]}")
    step = max(1, _CHECK_CHUNK_BYTES // max(1, flat.shape[1] * flat.itemsize))
    # Most columns share one bound (the data columns); squared_l2's -|x|^2/2 column has
    # its own. Per chunk: min and max of the whole chunk (fast, contiguous; NaN shows as
    # NaN) against the shared bound, then the special columns alone; per-column
    # reductions (slower) only for a chunk that fails that (extreme but valid values).
    common_lo, common_hi = low[0], high[0]
    special = np.flatnonzero((low != common_lo) | (high != common_hi))
    ok = True
    for s in range(0, rows, step):
        chunk = flat[s:s + step]
        lo, hi = chunk.min(), chunk.max()
        if lo >= common_lo and hi <= common_hi:  # False for NaN
            if all(chunk[:, j].min() >= low[j] and chunk[:, j].max() <= high[j] for j in special):
                continue
        cols_lo, cols_hi = chunk.min(axis=0), chunk.max(axis=0)
        if not ((cols_lo >= low).all() and (cols_hi <= high).all()):  # False for NaN
            ok = False
            break
    if ok:
        return
    # Slow path (failure only): find the first offending element.
    for s in range(0, rows, step):
        chunk = np.asarray(flat[s:s + step])
        wrong = ~np.isfinite(chunk) | (chunk < low) | (chunk > high)
        if wrong.any():
            r, c = (int(i) for i in np.argwhere(wrong)[0])
            where = at(s + r, c)
            v = float(chunk[r, c])
            if np.isnan(v):
                why = f"contains NaN at {where}"
            elif np.isinf(v):
                why = f"contains {'-' if v < 0 else ''}inf at {where}"
            else:
                why = (f"value {v:.6g} at {where} is outside [{low[c]:.6g}, {high[c]:.6g}], "
                       "the range an index built from this config can hold (larger values "
                       "overflow float32 scores)")
            raise ValueError(f"load_searcher(): {str(path)!r}: {field}: {why}")
    raise AssertionError("unreachable: a bad value was found in the summary but not the data")


def read_index(directory, mmap: bool = True, verify: bool = True) -> tuple[dict, dict]:
    """Reads an index folder written by :func:`write_index`: ``(config, arrays)``, both
    checked against the schema (``mipscan._schema``), values included: every float is
    finite and within the builder's bounds, offsets and slot ids are in range.
    ``mipscan.load_searcher`` wraps it.

    Args:
        directory: the index folder (a symbolic link to one is followed; the files in it
            must be regular files, not links).
        mmap: memory-map the arrays (no copy, fast start, pages shared between processes
            and read as searches touch them). Safe with serialize(): it never writes into
            an existing file (it swaps whole folders and unlinks the old files, whose
            mapped pages stay valid), so a live searcher keeps answering. A file truncated
            or rewritten in place by another program while mapped makes the kernel send
            SIGBUS on the next access; for folders others may edit in place, pass
            ``mmap=False`` (reads each file once into memory).
        verify: check every file's sha256 against mipscan.json (reads each file once).
            Values are checked either way (one pass per array).

    Returns:
        The configuration and the arrays, by name.

    Raises:
        ValueError: a missing, damaged, truncated, foreign or tampered folder; the message
            names the path and the offending field.
    """
    root = _as_path("load_searcher()", directory)
    mmap = check_value("load_searcher()", "mmap", mmap, Bool())
    verify = check_value("load_searcher()", "verify", verify, Bool())
    # serialize() swaps a whole new folder in at this path, then deletes the old one.
    # Every file is opened relative to one handle of the folder, so a load reads one
    # folder; if that folder was swapped out and deleted while we read it, the load fails
    # and is retried on the folder now at the path.
    for _ in range(_LOAD_ATTEMPTS):
        try:
            dir_fd = os.open(root, _DIR_FLAGS)
        except OSError:
            raise ValueError(f"load_searcher(): {str(root)!r} is not a folder") from None
        try:
            try:
                return _load_once(root, dir_fd, mmap, verify)
            except ValueError:
                if _still_there(root, dir_fd):
                    raise
        finally:
            os.close(dir_fd)
    raise ValueError(f"load_searcher(): {str(root)!r} was replaced {_LOAD_ATTEMPTS} times while "
                     "being read; try again")


_LOAD_ATTEMPTS = 20


def _still_there(root: Path, dir_fd: int) -> bool:
    """Whether ``root`` still names the folder open at ``dir_fd``."""
    try:
        st, mine = os.stat(root), os.fstat(dir_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and mine.st_nlink > 0


def _load_once(root: Path, dir_fd: int, mmap: bool, verify: bool) -> tuple[dict, dict]:
    mpath = root / MANIFEST

    def bad(field: str, why: str) -> ValueError:
        if len(why) > 1000:  # a message quoting a huge manifest value
            why = why[:1000] + f"... ({len(why)} characters)"
        return ValueError(f"load_searcher(): {str(mpath)!r}: {field}: {why}")

    try:
        fd = os.open(MANIFEST, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ValueError(f"load_searcher(): {str(root)!r} has no {MANIFEST}; not a mipscan "
                         "index") from None
    except OSError:
        fd = _open_regular(root, MANIFEST, dir_fd)  # raises the right error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"load_searcher(): {str(root)!r} has no {MANIFEST} file ("
                             f"{MANIFEST} is not a regular file); not a mipscan index")
        manifest = _parse_manifest(fd, mpath)
    finally:
        os.close(fd)
    if not isinstance(manifest, dict):
        raise bad("(whole file)", "not a JSON object")
    if manifest.get("format") != FORMAT:
        raise bad("format", f"expected {FORMAT!r}; got {_short(manifest.get('format'))}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READ_VERSIONS:
        raise bad("format_version", f"this mipscan reads versions {READ_VERSIONS}; "
                                    f"got {_short(manifest.get('format_version'))}")
    config = manifest.get("config")
    entries = manifest.get("arrays")
    if not isinstance(config, dict):
        raise bad("config", "missing or not an object")
    if not isinstance(entries, dict):
        raise bad("arrays", "missing or not an object")
    config = check_stored_config(config, bad, version)
    need = required_arrays(config)
    if set(entries) != need:
        stage = {a: s for a, (_, _, s) in ARRAYS.items() if s is not None}

        def choice(a):  # the stored setting that decides the array, if its stage is set
            if a == "leaf_axes" and "tree" in config:
                return f"config.tree.leaf_axes={config['tree']['leaf_axes']!r}"
            if a == "leaf_spread" and "tree" in config:
                return (f"config.tree.spread_weight={config['tree']['spread_weight']!r} "
                        f"({config['distance_measure']}: weight {spread_weight_of(config)})")
            st, arg, _ = ARRAY_QUANTIZE.get(a, (None, None, None))
            return f"config.{st}.{arg}={config[st][arg]!r}" if st in config else None

        why = [f"{a} is listed but {choice(a)}" if choice(a) else
               f"{a} is listed but config.{stage.get(a, '?')} is absent"
               for a in sorted(set(entries) - need)]
        why += [f"{a} (needed by {choice(a) or 'config.' + stage[a]}) is not listed" if a in stage
                else f"{a} is not listed" for a in sorted(need - set(entries))]
        raise bad("arrays", f"expected entries {sorted(need)}; got {_short(sorted(entries))}: "
                            f"{'; '.join(why)}")

    width = mips_width(config["d"], config["distance_measure"])
    arrays = {}
    checked = set()  # float arrays whose values were checked while being read
    for name in sorted(need):
        entry = entries[name]
        field = f"arrays.{name}"
        if not isinstance(entry, dict) or set(entry) != {"file", "dtype", "shape", "sha256"}:
            raise bad(field, "must have exactly file, dtype, shape, sha256")
        if entry["file"] != f"{name}.npy":
            raise bad(f"{field}.file", f"expected {name}.npy; got {_short(entry['file'])}")
        dtype, ndim, _ = ARRAYS[name]
        if entry["dtype"] != np.dtype(dtype).str:
            raise bad(f"{field}.dtype", f"expected {np.dtype(dtype).str!r}; got {_short(entry['dtype'])}")
        shape = entry["shape"]
        if not (isinstance(shape, list) and len(shape) == ndim
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 62
                        for s in shape)):
            raise bad(f"{field}.shape", f"expected {ndim} non-negative ints; got {_short(shape)}")
        sha = entry["sha256"]
        if not (isinstance(sha, str) and len(sha) == 64):
            raise bad(f"{field}.sha256", f"expected 64 hex digits; got {_short(sha)}")
        # Rows whose width the config explains are checked while read (others fail the
        # consistency checks below, which name the config field).
        bounds = (float_value_bounds(name, config)
                  if name in FLOAT_ARRAYS and ndim == 2 and shape[1] == width else None)
        arrays[name], was_checked = _read_npy(dir_fd, root, entry["file"], field, dtype, shape,
                                              mmap, sha if verify else None, bounds)
        if was_checked:
            checked.add(name)
    _check_config_against_arrays(config, arrays, bad)
    for field, why in array_value_errors(config, arrays):
        name = field.split(".")[1]
        raise ValueError(f"load_searcher(): {str(root / f'{name}.npy')!r}: {field}: {why}")
    for name in FLOAT_ARRAYS:
        if name in arrays and name not in checked:
            low, high = float_value_bounds(name, config)
            _check_float_values(root / f"{name}.npy", f"arrays.{name}", arrays[name], low, high)
    return config, arrays


def check_state(config, arrays, call: str) -> tuple[dict, dict]:
    """The loader's checks for an index held in memory (an unpickled searcher): the
    config against the schema, each array's dtype and rank, the arrays against the config
    and every value. Returns (config, C-contiguous arrays); ValueError names the field."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{call}: {field}: {why}")

    if not isinstance(config, dict) or not isinstance(arrays, dict):
        raise bad("state", "config and arrays must be dicts")
    config = check_stored_config(config, bad)
    need = required_arrays(config)
    if set(arrays) != need:
        raise bad("arrays", f"expected {sorted(need)}; got {_short(sorted(map(str, arrays)))}")
    out = {}
    for name in sorted(need):
        dtype, ndim, _ = ARRAYS[name]
        a = arrays[name]
        if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype) or a.ndim != ndim:
            raise bad(f"arrays.{name}", f"must be a {ndim}-D {np.dtype(dtype)} array; got "
                                        f"{type(a).__name__} {getattr(a, 'dtype', '')} "
                                        f"{getattr(a, 'shape', '')}")
        out[name] = np.ascontiguousarray(a)
    _check_config_against_arrays(config, out, bad)
    for field, why in array_value_errors(config, out):
        raise bad(field, why)
    for name in FLOAT_ARRAYS:
        if name in out:
            low, high = float_value_bounds(name, config)
            _check_float_values(Path(f"<{call}>"), f"arrays.{name}", out[name], low, high)
    return config, out


def _short(value, limit: int = 200) -> str:
    """repr() of a manifest value, cut to ``limit`` characters (values may be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str()
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_config_against_arrays(config: dict, arrays: dict, bad) -> None:
    """n, d and the tree in the config must describe the arrays (Searcher trusts them)."""
    n, d = config["n"], config["d"]
    held = arrays["slot_ids"].shape[0]
    tree = config.get("tree")
    if arrays["centroids"].shape[0] < 1:
        raise bad("arrays.centroids.shape", f"centroids.npy must hold at least one leaf; got "
                                            f"shape {arrays['centroids'].shape}")
    spilled = (tree is not None and tree.get("soar_lambda") is not None
               and arrays["centroids"].shape[0] > 1)
    if held != (2 * n if spilled else n):
        if tree is not None and held == (n if spilled else 2 * n):
            raise bad("config.tree.soar_lambda",
                      f"is {tree.get('soar_lambda')!r}, but slot_ids.npy holds {held} slots for "
                      f"n={n} datapoints and centroids.npy {arrays['centroids'].shape[0]} "
                      "leaves: " + ("no point is spilled" if spilled else
                                    "every point is spilled into a second leaf"))
        raise bad("config.n", f"is {n}, but slot_ids.npy holds {held} slots; expected "
                              f"{2 * n if spilled else n}")
    width = d + 1 if config["distance_measure"] == "squared_l2" else d
    if arrays["centroids"].shape[1] != width:
        raise bad("config.d", f"is {d} ({config['distance_measure']}), but centroids.npy has "
                              f"{arrays['centroids'].shape[1]} columns; expected {width}")
    leaves = arrays["centroids"].shape[0]
    if tree is None and leaves != 1:
        raise bad("config.tree", f"missing, but centroids.npy holds {leaves} leaves")
    if tree is not None and leaves > tree["num_leaves"]:
        raise bad("config.tree.num_leaves", f"is {tree['num_leaves']}, but centroids.npy holds "
                                            f"{leaves} leaves")
