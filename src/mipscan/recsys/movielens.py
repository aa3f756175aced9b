"""GroupLens MovieLens 100K (ml-100k): find it, check it, read it into numpy arrays.

The data may not be redistributed (GroupLens licence), so mipscan never ships it: it
reads a copy the user has, or downloads the official archive once into a user cache
folder and checks its pinned sha256. Cite F. Maxwell Harper and Joseph A. Konstan.
2015. The MovieLens Datasets: History and Context. ACM TiiS 5, 4, Article 19.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# sha256 of the official archive (4,924,029 bytes), as pinned by tensorflow_datasets'
# url_checksums/movielens.txt; several independent projects pin the same value.
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"

DATA_DIR_ENV = "MIPSCAN_DATA_DIR"
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")

_NAME = "ml-100k"
_FILES = ("u.data", "u.item")


class DataNotFoundError(FileNotFoundError):
    """ml-100k was found nowhere; the message lists every place looked at."""


@dataclass(frozen=True, eq=False)
class MovieLens100K:
    """The ratings and the movie table of ml-100k.

    Ratings (one entry per rating, in file order): ``user_id`` int32 (1..943),
    ``movie_id`` int32 (1..1682), ``rating`` float32 (1..5), ``timestamp`` int64 (unix
    seconds). Movies (one entry per row of ``u.item``): ``movie_ids`` int32, ``titles``
    str (decoded from latin-1), ``genres`` bool (num_movies, 19) in the order of
    :data:`GENRES`. ``source`` says where the files were read; ``sha256`` is the sha256
    of ``u.data`` followed by ``u.item`` and keys caches built from this data.
    """

    user_id: np.ndarray
    movie_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    movie_ids: np.ndarray
    titles: np.ndarray
    genres: np.ndarray
    source: str
    sha256: str
    genre_names: tuple[str, ...] = GENRES

    @property
    def num_ratings(self) -> int:
        return int(self.rating.shape[0])

    @property
    def num_users(self) -> int:
        return int(np.unique(self.user_id).shape[0])

    @property
    def num_movies(self) -> int:
        return int(self.movie_ids.shape[0])

    @property
    def max_user_id(self) -> int:
        return int(self.user_id.max())

    def title(self, movie_id: int) -> str:
        """The title of one movie id (raises KeyError for an unknown id)."""
        hit = np.flatnonzero(self.movie_ids == movie_id)
        if hit.size == 0:
            raise KeyError(f"movie id {movie_id} is not in u.item")
        return str(self.titles[hit[0]])


def cache_dir() -> Path:
    """mipscan's user cache folder: ``$XDG_CACHE_HOME/mipscan`` or ``~/.cache/mipscan``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mipscan"


def load_ml100k(path: str | os.PathLike | None = None, *, download: bool = True,
                url: str | None = None, sha256: str | None = None) -> MovieLens100K:
    """Reads MovieLens 100K from a folder or from GroupLens's zip.

    Lookup order, first hit wins:
      1. ``path``, if given (and then nothing else): the ``ml-100k`` folder, the zip, or
         a folder holding ``ml-100k/`` or ``ml-100k.zip``;
      2. the folder named by ``$MIPSCAN_DATA_DIR`` (the same three shapes);
      3. the cache folder :func:`cache_dir` (``ml-100k/`` or ``ml-100k.zip``);
      4. if ``download``: ``url`` (default :data:`ML100K_URL`) saved to the cache folder
         as ``ml-100k.zip`` once its sha256 equals ``sha256`` (default
         :data:`ML100K_SHA256`).

    Returns:
        A :class:`MovieLens100K`.

    Raises:
        DataNotFoundError (a FileNotFoundError): no copy anywhere; the message lists
            every place looked at and how to get the data.
        ValueError: a damaged copy (a missing file, a wrong field count, a non-numeric
            or out-of-range field: the message names the file and the line), or a
            downloaded archive whose sha256 differs from the pinned one.

    Example:
        >>> data = load_ml100k("../shared/data/ml-100k")  # doctest: +SKIP
        >>> data.num_ratings, data.num_users, data.num_movies  # doctest: +SKIP
        (100000, 943, 1682)
    """
    url = ML100K_URL if url is None else url
    sha256 = ML100K_SHA256 if sha256 is None else sha256
    looked: list[str] = []

    if path is not None:
        found = _find(Path(path), looked, "path argument")
        if found is None:
            raise DataNotFoundError(
                f"load_ml100k(): no MovieLens 100K at path={str(path)!r}: looked for "
                + "; ".join(looked) + ". Pass the ml-100k folder or ml-100k.zip.")
        return _read(found)

    env = os.environ.get(DATA_DIR_ENV)
    if env:
        found = _find(Path(env), looked, f"${DATA_DIR_ENV}")
        if found is not None:
            return _read(found)
    else:
        looked.append(f"${DATA_DIR_ENV} (not set)")

    cache = cache_dir()
    found = _find(cache, looked, "cache", allow_self=False)
    if found is not None:
        return _read(found)

    if not download:
        looked.append("download (disabled)")
    else:
        target = cache / f"{_NAME}.zip"
        try:
            _download(url, target, sha256)
        except (urllib.error.URLError, OSError) as exc:
            looked.append(f"download {url} -> {target} (failed: {exc})")
        else:
            return _read(target)

    raise DataNotFoundError(
        "load_ml100k(): MovieLens 100K not found. Looked at, in order: "
        + "; ".join(f"({i}) {p}" for i, p in enumerate(looked, 1))
        + f". To fix: download {ML100K_URL} (GroupLens; no redistribution, cite Harper & "
        f"Konstan 2015) and pass its path (e.g. `mipscan demo --data ml-100k.zip`), or "
        f"set ${DATA_DIR_ENV} to the folder holding it, or put it in {cache}.")


def _find(where: Path, looked: list[str], label: str, allow_self: bool = True) -> Path | None:
    """The ml-100k folder or zip at ``where``, or None (appending what was tried)."""
    candidates = []
    if allow_self:
        candidates.append(where)
    candidates += [where / _NAME, where / f"{_NAME}.zip"]
    for c in candidates:
        if c.is_file() and zipfile.is_zipfile(c):
            return c
        if c.is_dir() and any((c / f).exists() for f in _FILES):
            return c
    looked.append(f"{label}: " + ", ".join(str(c) for c in candidates))
    return None


def _download(url: str, target: Path, sha256: str) -> None:
    """Saves url to target atomically, after checking its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if got != sha256:
            raise ValueError(
                f"load_ml100k(): the archive downloaded from {url} has sha256 {got}, but "
                f"the pinned sha256 is {sha256}; it was not saved. Download it yourself "
                f"and pass its path if you trust it.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(source: Path) -> MovieLens100K:
    """Reads u.data and u.item from a folder or a zip."""
    if source.is_file():
        with zipfile.ZipFile(source) as zf:
            names = zf.namelist()
            blobs = {}
            for f in _FILES:
                member = next((n for n in (f"{_NAME}/{f}", f) if n in names), None)
                if member is None:
                    raise ValueError(f"load_ml100k(): {source} has no {_NAME}/{f}; "
                                     f"is it GroupLens's ml-100k.zip?")
                blobs[f] = (f"{source}:{member}", zf.read(member))
    else:
        blobs = {}
        for f in _FILES:
            p = source / f
            if not p.is_file():
                raise ValueError(f"load_ml100k(): {p} is missing; the ml-100k folder "
                                 f"must hold {' and '.join(_FILES)}")
            blobs[f] = (str(p), p.read_bytes())

    digest = hashlib.sha256(blobs["u.data"][1] + blobs["u.item"][1]).hexdigest()
    user_id, movie_id, rating, timestamp = _parse_ratings(*blobs["u.data"])
    movie_ids, titles, genres = _parse_movies(*blobs["u.item"])
    return MovieLens100K(user_id, movie_id, rating, timestamp, movie_ids, titles, genres,
                         str(source), digest)


def _lines(name: str, blob: bytes) -> list[str]:
    lines = blob.decode("latin-1").split("\n")
    while lines and lines[-1].strip() == "":
        lines.pop()
    if not lines:
        raise ValueError(f"load_ml100k(): {name} is empty")
    return [line.rstrip("\r") for line in lines]


def _int(name: str, lineno: int, field: str, value: str, low: int, high: int) -> int:
    try:
        v = int(value)
    except ValueError:
        raise ValueError(f"load_ml100k(): {name} line {lineno}: {field} must be an integer; "
                         f"got {value!r}") from None
    if not low <= v <= high:
        raise ValueError(f"load_ml100k(): {name} line {lineno}: {field} must be in "
                         f"[{low}, {high}]; got {v}")
    return v


def _parse_ratings(name: str, blob: bytes):
    lines = _lines(name, blob)
    out = np.empty((len(lines), 4), np.int64)
    big = 2**31 - 1
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if len(parts) != 4:
            raise ValueError(f"load_ml100k(): {name} line {i + 1}: expected 4 TAB-separated "
                             f"fields (user_id, item_id, rating, timestamp); got "
                             f"{len(parts)}: {line[:80]!r}")
        out[i, 0] = _int(name, i + 1, "user_id", parts[0], 1, big)
        out[i, 1] = _int(name, i + 1, "item_id", parts[1], 1, big)
        out[i, 2] = _int(name, i + 1, "rating", parts[2], 1, 5)
        out[i, 3] = _int(name, i + 1, "timestamp", parts[3], 0, 2**63 - 1)
    return (out[:, 0].astype(np.int32), out[:, 1].astype(np.int32),
            out[:, 2].astype(np.float32), out[:, 3].copy())


def _parse_movies(name: str, blob: bytes):
    lines = _lines(name, blob)
    n_fields = 5 + len(GENRES)
    ids = np.empty(len(lines), np.int32)
    titles = []
    genres = np.zeros((len(lines), len(GENRES)), bool)
    for i, line in enumerate(lines):
        parts = line.split("|")
        if len(parts) != n_fields:
            raise ValueError(f"load_ml100k(): {name} line {i + 1}: expected {n_fields} "
                             f"'|'-separated fields; got {len(parts)}: {line[:80]!r}")
        ids[i] = _int(name, i + 1, "movie_id", parts[0], 1, 2**31 - 1)
        titles.append(parts[1])
        for g, flag in enumerate(parts[5:]):
            genres[i, g] = _int(name, i + 1, f"genre flag {GENRES[g]!r}", flag, 0, 1)
    return ids, np.array(titles, dtype=str), genres


__all__ = ["DataNotFoundError", "GENRES", "ML100K_SHA256", "ML100K_URL", "MovieLens100K",
           "cache_dir", "load_ml100k"]
