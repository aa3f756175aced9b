"""mipscan.recsys.load_ml100k: the real data, zip and folder forms, lookup order,
damaged files, and the checksummed download (via file://, as there is no internet)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mipscan.recsys import DataNotFoundError, load_ml100k, movielens


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $MIPSCAN_DATA_DIR, an empty cache folder, and a download URL that fails."""
    monkeypatch.delenv("MIPSCAN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(movielens, "ML100K_URL", (tmp_path / "nowhere.zip").as_uri())
    return tmp_path


def make_zip(src: Path, dest: Path, files=("u.data", "u.item", "README")) -> Path:
    """A zip laid out like GroupLens's (members under ml-100k/)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(src / f, f"ml-100k/{f}")
    return dest


def copy_folder(src: Path, dest: Path, files=("u.data", "u.item")) -> Path:
    dest.mkdir(parents=True)
    for f in files:
        shutil.copy(src / f, dest / f)
    return dest


# ---------------------------------------------------------------- the real data
def test_counts(ml100k):
    assert ml100k.num_ratings == 100_000
    assert ml100k.num_users == 943
    assert ml100k.num_movies == 1682
    assert ml100k.max_user_id == 943
    assert set(np.unique(ml100k.movie_id)) == set(range(1, 1683))
    assert np.array_equal(ml100k.movie_ids, np.arange(1, 1683))
    # SOURCE.md's rating histogram and timestamp range
    assert np.bincount(ml100k.rating.astype(int))[1:].tolist() == [6110, 11370, 27145,
                                                                     34174, 21201]
    assert ml100k.timestamp.min() == 874724710 and ml100k.timestamp.max() == 893286638
    # 100,000 distinct (user, movie) pairs
    assert np.unique(ml100k.user_id.astype(np.int64) * 10_000 + ml100k.movie_id).size == 100_000


def test_dtypes_and_first_rows(ml100k):
    assert ml100k.user_id.dtype == np.int32 and ml100k.movie_id.dtype == np.int32
    assert ml100k.rating.dtype == np.float32 and ml100k.timestamp.dtype == np.int64
    # u.data's first line: 196	242	3	881250949
    assert (ml100k.user_id[0], ml100k.movie_id[0], ml100k.rating[0],
            ml100k.timestamp[0]) == (196, 242, 3.0, 881250949)


def test_titles_are_latin1(ml100k):
    assert ml100k.title(543) == "Misérables, Les (1995)"
    assert ml100k.title(1633).startswith("Á köldum klaka")
    assert ml100k.title(1) == "Toy Story (1995)"
    with pytest.raises(KeyError, match="9999"):
        ml100k.title(9999)


def test_genres(ml100k):
    assert ml100k.genres.shape == (1682, 19) and ml100k.genres.dtype == bool
    assert ml100k.genre_names[0] == "unknown" and ml100k.genre_names[-1] == "Western"
    # Toy Story: Animation, Children's, Comedy
    toy = [ml100k.genre_names[g] for g in np.flatnonzero(ml100k.genres[0])]
    assert toy == ["Animation", "Children's", "Comedy"]


def test_zip_equals_folder(ml100k, ml100k_dir, tmp_path):
    z = make_zip(ml100k_dir, tmp_path / "ml-100k.zip")
    for path in (z, tmp_path):  # the zip itself, or the folder holding it
        data = load_ml100k(path)
        assert data.sha256 == ml100k.sha256
        assert data.source == str(z)
        for field in ("user_id", "movie_id", "rating", "timestamp", "movie_ids", "genres",
                      "titles"):
            assert np.array_equal(getattr(data, field), getattr(ml100k, field)), field


def test_folder_holding_ml100k(ml100k, ml100k_dir, tmp_path):
    copy_folder(ml100k_dir, tmp_path / "ml-100k")
    assert load_ml100k(tmp_path).sha256 == ml100k.sha256


# ---------------------------------------------------------------- damaged copies
def test_missing_file(ml100k_dir, tmp_path):
    folder = copy_folder(ml100k_dir, tmp_path / "ml-100k", files=("u.item",))
    with pytest.raises(ValueError, match=r"u\.data is missing"):
        load_ml100k(folder)


def test_zip_without_u_item(ml100k_dir, tmp_path):
    z = make_zip(ml100k_dir, tmp_path / "ml-100k.zip", files=("u.data",))
    with pytest.raises(ValueError, match=r"has no ml-100k/u\.item"):
        load_ml100k(z)


@pytest.mark.parametrize("file, lineno, replacement, message", [
    ("u.data", 3, b"22\t377\t1", r"u\.data line 3: expected 4 TAB-separated fields"),
    ("u.data", 5, b"166\t346\tfive\t886397596", r"u\.data line 5: rating must be an integer"),
    ("u.data", 7, b"115\t265\t7\t881171488", r"u\.data line 7: rating must be in \[1, 5\]"),
    ("u.data", 2, b"", r"u\.data line 2: expected 4"),
    ("u.item", 4, b"4|Get Shorty (1995)|01-Jan-1995", r"u\.item line 4: expected 24"),
    ("u.item", 1, b"x|Toy Story (1995)" + b"|" * 22, r"u\.item line 1: movie_id must be"),
])
def test_damaged_file(ml100k_dir, tmp_path, file, lineno, replacement, message):
    folder = copy_folder(ml100k_dir, tmp_path / "ml-100k")
    lines = (folder / file).read_bytes().split(b"\n")
    lines[lineno - 1] = replacement
    (folder / file).write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=message) as info:
        load_ml100k(folder)
    assert str(folder / file) in str(info.value)


def test_damaged_file_in_zip_names_member(ml100k_dir, tmp_path):
    folder = copy_folder(ml100k_dir, tmp_path / "src")
    lines = (folder / "u.data").read_bytes().split(b"\n")
    lines[9] = b"1\t2\t3"
    (folder / "u.data").write_bytes(b"\n".join(lines))
    z = make_zip(folder, tmp_path / "ml-100k.zip", files=("u.data", "u.item"))
    with pytest.raises(ValueError, match=r"ml-100k\.zip:ml-100k/u\.data line 10"):
        load_ml100k(z)


# ---------------------------------------------------------------- lookup order
def test_explicit_path_not_found(isolated):
    with pytest.raises(DataNotFoundError, match="no MovieLens 100K at path") as info:
        load_ml100k(isolated / "empty")
    assert isinstance(info.value, FileNotFoundError)
    assert str(isolated / "empty" / "ml-100k.zip") in str(info.value)


def test_nothing_found_lists_every_place(isolated, monkeypatch):
    env_dir = isolated / "env"
    env_dir.mkdir()
    monkeypatch.setenv("MIPSCAN_DATA_DIR", str(env_dir))
    with pytest.raises(DataNotFoundError) as info:
        load_ml100k()
    msg = str(info.value)
    cache = isolated / "xdg" / "mipscan"
    for place in ("$MIPSCAN_DATA_DIR", str(env_dir / "ml-100k"), str(cache / "ml-100k.zip"),
                  movielens.ML100K_URL, "failed", "--data"):
        assert place in msg, (place, msg)
    # in lookup order: env, then cache, then download
    assert msg.index(str(env_dir)) < msg.index(str(cache)) < msg.index(movielens.ML100K_URL)


def test_nothing_found_download_disabled(isolated):
    with pytest.raises(DataNotFoundError, match=r"MIPSCAN_DATA_DIR \(not set\).*download "
                                                r"\(disabled\)"):
        load_ml100k(download=False)


def test_env_then_cache(isolated, monkeypatch, ml100k_dir, ml100k):
    cache = isolated / "xdg" / "mipscan"
    cache.mkdir(parents=True)
    make_zip(ml100k_dir, cache / "ml-100k.zip")
    assert load_ml100k().source == str(cache / "ml-100k.zip")  # env unset: the cache

    env_data = copy_folder(ml100k_dir, isolated / "env" / "ml-100k")
    monkeypatch.setenv("MIPSCAN_DATA_DIR", str(isolated / "env"))
    assert load_ml100k().source == str(env_data)  # env beats the cache
    monkeypatch.setenv("MIPSCAN_DATA_DIR", str(env_data))  # the ml-100k folder itself
    assert load_ml100k().source == str(env_data)
    # an explicit path beats everything
    assert load_ml100k(ml100k_dir).source == str(ml100k_dir)


# ---------------------------------------------------------------- download (file://)
def test_download_good_checksum(isolated, monkeypatch, ml100k_dir, ml100k):
    archive = make_zip(ml100k_dir, isolated / "served.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(movielens, "ML100K_URL", archive.as_uri())
    monkeypatch.setattr(movielens, "ML100K_SHA256", digest)
    data = load_ml100k()
    cached = isolated / "xdg" / "mipscan" / "ml-100k.zip"
    assert data.source == str(cached)
    assert cached.read_bytes() == archive.read_bytes()
    assert data.sha256 == ml100k.sha256
    # next time the cache answers, without the URL
    archive.unlink()
    assert load_ml100k().source == str(cached)


def test_download_bad_checksum(isolated, monkeypatch, ml100k_dir):
    archive = make_zip(ml100k_dir, isolated / "served.zip")
    monkeypatch.setattr(movielens, "ML100K_URL", archive.as_uri())
    monkeypatch.setattr(movielens, "ML100K_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64}, but the pinned sha256 is 0{64}"):
        load_ml100k()
    cache = isolated / "xdg" / "mipscan"
    assert list(cache.iterdir()) == []  # neither the archive nor a partial file stays


def test_download_arguments_override_constants(isolated, ml100k_dir):
    archive = make_zip(ml100k_dir, isolated / "served.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    data = load_ml100k(url=archive.as_uri(), sha256=digest)
    assert data.num_ratings == 100_000

