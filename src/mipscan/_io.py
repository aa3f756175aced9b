"""Index folders: one .npy per array plus mipscan.json (format, version, config,
shapes, dtypes, sha256 of each file). No pickle anywhere."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mipscan._schema import ARRAYS, check_stored_config, required_arrays
from mipscan._validation import Bool, check_value

FORMAT = "mipscan-index"
FORMAT_VERSION = 1
MANIFEST = "mipscan.json"

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


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


def _remove_orphans(target: Path) -> None:
    """Deletes temporary folders that earlier serialize() calls into ``target`` left behind
    when their process died (killed mid-write). Each is named after its writer's pid; a
    folder whose writer is still alive (a concurrent serialize) is left alone."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*-*"):
        try:
            pid = int(tmp.name[len(f".{target.name}.tmp-"):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive but not ours (PermissionError), or unknown: keep it
            pass


def write_index(directory, config: dict, arrays: dict[str, np.ndarray]) -> None:
    """Writes an index folder (``Searcher.serialize``), atomically: readers see the old
    index or the complete new one, never a mix."""
    target = _as_path("serialize()", directory).absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"serialize(): directory {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise ValueError(f"serialize(): {str(target)!r} is a non-empty folder that is not a "
                         "mipscan index; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
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
        if target.exists():
            if not _exchange(tmp, target):
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.rename(target, old)
                os.rename(tmp, target)
                tmp = old
        else:
            os.rename(tmp, target)
            tmp = None
        _fsync_dir(target.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def read_index(directory, mmap: bool = True, verify: bool = True) -> tuple[dict, dict]:
    """Reads an index folder written by :func:`write_index`: ``(config, arrays)``, both
    checked against the schema (``mipscan._schema``). ``mipscan.load_searcher`` wraps it.

    Args:
        directory: the index folder.
        mmap: memory-map the arrays (no copy, fast start, pages shared between processes).
        verify: check every file's sha256 against mipscan.json (reads each file once).

    Returns:
        The configuration and the arrays, by name.

    Raises:
        ValueError: a missing, damaged, truncated or foreign folder; the message names
            the path and the offending field.
    """
    root = _as_path("load_searcher()", directory)
    mmap = check_value("load_searcher()", "mmap", mmap, Bool())
    verify = check_value("load_searcher()", "verify", verify, Bool())
    # serialize() swaps a whole new folder in at this path. A load that overlaps the swap
    # could read the old manifest and some new files (a spurious "damaged" error, or a
    # mix when verify=False and shapes agree). The folders are immutable once in place,
    # so a load during which the path kept naming the same folder is consistent; else retry.
    for _ in range(_LOAD_ATTEMPTS):
        before = _folder_identity(root)
        try:
            loaded = _load_once(root, mmap, verify)
        except ValueError:
            if before is not None and _folder_identity(root) != before:
                continue
            raise
        if _folder_identity(root) == before:
            return loaded
    raise ValueError(f"load_searcher(): {str(root)!r} was replaced {_LOAD_ATTEMPTS} times while "
                     "being read; try again")


_LOAD_ATTEMPTS = 20


def _folder_identity(root: Path):
    try:
        st = os.stat(root)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _load_once(root: Path, mmap: bool, verify: bool) -> tuple[dict, dict]:
    mpath = root / MANIFEST

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"load_searcher(): {str(mpath)!r}: {field}: {why}")

    if not root.is_dir():
        raise ValueError(f"load_searcher(): {str(root)!r} is not a folder")
    if not mpath.is_file():
        raise ValueError(f"load_searcher(): {str(root)!r} has no {MANIFEST}; not a mipscan index")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad("(whole file)", f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise bad("(whole file)", "not a JSON object")
    if manifest.get("format") != FORMAT:
        raise bad("format", f"expected {FORMAT!r}; got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise bad("format_version", f"this mipscan reads version {FORMAT_VERSION}; "
                                    f"got {manifest.get('format_version')!r}")
    config = manifest.get("config")
    entries = manifest.get("arrays")
    if not isinstance(config, dict):
        raise bad("config", "missing or not an object")
    if not isinstance(entries, dict):
        raise bad("arrays", "missing or not an object")
    config = check_stored_config(config, bad)
    need = required_arrays(config)
    if set(entries) != need:
        stage = {a: s for a, (_, _, s) in ARRAYS.items() if s is not None}
        why = [f"{a} is listed but config.{stage.get(a, '?')} is absent"
               for a in sorted(set(entries) - need)]
        why += [f"{a} (needed by config.{stage[a]}) is not listed" if a in stage else f"{a} is not listed"
                for a in sorted(need - set(entries))]
        raise bad("arrays", f"expected entries {sorted(need)}; got {sorted(entries)}: {'; '.join(why)}")

    arrays = {}
    for name in sorted(need):
        entry = entries[name]
        field = f"arrays.{name}"
        if not isinstance(entry, dict) or set(entry) != {"file", "dtype", "shape", "sha256"}:
            raise bad(field, "must have exactly file, dtype, shape, sha256")
        if entry["file"] != f"{name}.npy":
            raise bad(f"{field}.file", f"expected {name}.npy; got {entry['file']!r}")
        dtype, ndim, _ = ARRAYS[name]
        if entry["dtype"] != np.dtype(dtype).str:
            raise bad(f"{field}.dtype", f"expected {np.dtype(dtype).str!r}; got {entry['dtype']!r}")
        shape = entry["shape"]
        if not (isinstance(shape, list) and len(shape) == ndim
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise bad(f"{field}.shape", f"expected {ndim} non-negative ints; got {shape!r}")
        path = root / entry["file"]
        if not path.is_file():
            raise ValueError(f"load_searcher(): {str(path)!r} is missing ({field})")
        if verify and _sha256(path) != entry["sha256"]:
            raise ValueError(f"load_searcher(): {str(path)!r} does not match its sha256 in "
                             f"{MANIFEST} ({field}.sha256): the file is damaged or was replaced")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as exc:  # truncated header, wrong magic, pickled object, ...
            raise ValueError(f"load_searcher(): {str(path)!r} is not a readable .npy file "
                             f"({field}): {exc}") from None
        if arr.dtype != np.dtype(dtype):
            raise ValueError(f"load_searcher(): {str(path)!r} holds {arr.dtype}; {MANIFEST} "
                             f"says {entry['dtype']} ({field}.dtype)")
        if list(arr.shape) != shape:
            raise ValueError(f"load_searcher(): {str(path)!r} has shape {arr.shape}; {MANIFEST} "
                             f"says {tuple(shape)} ({field}.shape)")
        arrays[name] = arr
    _check_config_against_arrays(config, arrays, bad)
    return config, arrays


def _check_config_against_arrays(config: dict, arrays: dict, bad) -> None:
    """n, d and the tree in the config must describe the arrays (Searcher trusts them)."""
    n, d = config["n"], config["d"]
    held = arrays["slot_ids"].shape[0]
    tree = config.get("tree")
    spilled = (tree is not None and tree.get("soar_lambda") is not None
               and arrays["centroids"].shape[0] > 1)
    if held != (2 * n if spilled else n):
        if tree is not None and held == (n if spilled else 2 * n):
            raise bad("config.tree.soar_lambda",
                      f"is {tree.get('soar_lambda')!r}, but slot_ids.npy holds {held} slots for "
                      f"n={n} datapoints: " + ("no point is spilled" if spilled else
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
