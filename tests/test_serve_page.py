"""The service's page in Debian's headless Chromium: it loads, asks the server for a
user's approximate and exact top-10, and renders the titles (checked in the DOM against
the searcher and numpy); its "exclude what they rated" checkbox, ticked by the page's own
click handler, renders no rated title. Chromium is required (CI installs it, see .ci/run):
no skip."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import numpy as np
import pytest

import mipscan
from mipscan.serve import page_dir_for, read_page_data, save_page_data
from mipscan.serve._app import create_app

from _serve_util import running


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run "
                "installs it)", pytrace=False)


def rendered(url: str) -> dict[str, list[str]]:
    """The page's DOM after its scripts ran: the titles of each list, in order."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    out = {}
    for name in ("approximate", "exact"):
        m = re.search(rf'<ol id="{name}">(.*?)</ol>', dom, re.S)
        assert m, f"no list {name!r} in the DOM:\n{dom[-3000:]}"
        out[name] = [html.unescape(t) for t in re.findall(r"<li[^>]*>(.*?)</li>", m.group(1))]
    assert 'data-done="1"' in dom, dom[-2000:]
    m = re.search(r'data-exclude-rated="([01])"', dom)
    assert m, dom[-2000:]
    out["exclude_rated"] = m.group(1) == "1"  # what the server's answer says it did
    return out


def test_page_renders_approximate_and_exact_titles(tmp_path):
    """A small index with fake titles (one per 500 rows, as the demo's noisy copies share
    a movie's title): the page shows exactly the searcher's and numpy's top-10."""
    rng = np.random.default_rng(5)
    db = rng.normal(size=(4000, 8)).astype(np.float32)
    users = rng.normal(size=(20, 8)).astype(np.float32)
    folder = tmp_path / "index"
    s = (mipscan.builder(db, 10, "dot_product").tree(num_leaves=40, num_leaves_to_search=4)
         .score_ah(2).reorder(40).build())
    s.serialize(folder)
    titles = [f"Film <{i}> & co" if i % 7 else None for i in range(500)]
    save_page_data(page_dir_for(folder), users, list(range(1, 20)), titles, 500)

    def title(i):
        return titles[i % 500] or f"item {i}"

    user = 13
    approx = [title(i) for i in s.search(users[user], 10).indices.tolist()]
    exact = [title(i) for i in mipscan.brute_force(db, users[user:user + 1], 10).indices[0]]
    with running(create_app(folder, page_dir=page_dir_for(folder))) as url:
        got = rendered(f"{url}/?user={user}")
    assert got["approximate"] == approx
    assert got["exact"] == exact


def test_demo_saves_an_index_the_page_serves(shared_data_dir, tmp_path):
    """`mipscan demo --save-index DIR` on the real ml-100k (1 epoch, no noisy copies), then
    the service on DIR: the page shows real MovieLens titles, and its exact list is the
    exact top-10 of the user's embedding over the index's candidates."""
    pytest.importorskip("mipscan.recsys.model")
    from mipscan import cli
    from mipscan.recsys import load_ml100k

    data = shared_data_dir("ml-100k")
    folder = tmp_path / "ml-index"
    status = cli.main(["demo", "--data", str(data), "--epochs", "1", "--copies", "0",
                       "--repeats", "1", "--save-index", str(folder)])
    assert status == 0
    s = mipscan.load_searcher(folder)
    users, meta = read_page_data(page_dir_for(folder))
    assert s.size() == 2682 and meta["title_period"] == 2682 and len(meta["user_ids"]) == 943
    ml = load_ml100k(data)
    user = 42
    candidates = np.asarray(s._arrays["reorder_rows"])  # float32 rows by id
    exact_ids = mipscan.brute_force(candidates, users[user:user + 1], 10).indices[0].tolist()
    with running(create_app(folder, page_dir=page_dir_for(folder))) as url:
        got = rendered(f"{url}/?user={user}")
    real = set(ml.titles.tolist())
    for name in ("approximate", "exact"):
        assert len(got[name]) == 10
        assert all(t in real or t.startswith("item ") for t in got[name]), got[name]
    assert sum(t in real for t in got["exact"]) >= 5, got  # mostly real movies
    expected = [meta["titles"][i] or f"item {i}" for i in exact_ids]
    assert got["exact"] == expected
    assert len(set(got["approximate"]) & set(got["exact"])) >= 7, got
    # "exclude what they rated": none of the movies user 42 rated in the demo's training
    # split (seed 42), in any copy; a title some unrated movie shares does not count.
    from mipscan.recsys.model import rated_candidates

    rated_ids = set(rated_candidates(ml, [user], meta["title_period"], 0, 42)[0].tolist())
    by_title: dict = {}
    for movie_id, title in zip(ml.movie_ids.tolist(), ml.titles.tolist()):
        by_title.setdefault(title, set()).add(movie_id)
    only_rated = {t for t, ids in by_title.items() if ids <= rated_ids}
    assert only_rated & set(got["exact"]), "the user rated none of their exact top-10"
    with running(create_app(folder, page_dir=page_dir_for(folder))) as url:
        ticked = rendered(f"{url}/?user={user}&exclude=1")
    assert ticked["exclude_rated"]
    for name in ("approximate", "exact"):
        assert len(ticked[name]) == 10 and not only_rated & set(ticked[name]), ticked[name]


def test_exclude_what_they_rated(tmp_path):
    """Page data with rated lists: with the checkbox ticked (``?exclude=1`` clicks it after
    the first render), both lists are the searcher's and numpy's top-10 without any copy
    of a rated item, no rated title is shown, and the titles differ from the unticked
    page, which shows some rated titles (the user rated some of their own top-10)."""
    rng = np.random.default_rng(8)
    period = 500
    db = rng.normal(size=(4 * period, 8)).astype(np.float32)  # 4 copies of each item
    users = rng.normal(size=(20, 8)).astype(np.float32)
    folder = tmp_path / "index"
    s = (mipscan.builder(db, 10, "dot_product").tree(num_leaves=40, num_leaves_to_search=4)
         .score_ah(2).reorder(40).build())
    s.serialize(folder)
    titles = [f"Film {i}" for i in range(period)]
    user = 13
    top = s.search(users[user], 10).indices.tolist()
    mine = sorted({top[0] % period, top[3] % period, top[6] % period}
                  | set(rng.integers(period, size=20).tolist()))
    rated = [[] for _ in range(1, 20)]
    rated[user - 1] = mine
    save_page_data(page_dir_for(folder), users, list(range(1, 20)), titles, period, rated)

    excluded = np.sort((np.asarray(mine)[None, :] + np.arange(0, len(db), period)[:, None])
                       .ravel())
    approx = s.search_batched(users[user:user + 1], final_num_neighbors=10,
                              excluded=excluded).indices[0].tolist()
    scores = db @ users[user]
    scores[excluded] = -np.inf
    exact = np.argsort(-scores, kind="stable")[:10].tolist()
    rated_titles = {titles[i] for i in mine}
    with running(create_app(folder, page_dir=page_dir_for(folder))) as url:
        plain = rendered(f"{url}/?user={user}")
        ticked = rendered(f"{url}/?user={user}&exclude=1")
    assert not plain["exclude_rated"] and ticked["exclude_rated"]
    assert ticked["approximate"] == [titles[i % period] for i in approx]
    assert ticked["exact"] == [titles[i % period] for i in exact]
    for name in ("approximate", "exact"):
        assert not rated_titles & set(ticked[name]), (name, ticked[name])
        assert len(ticked[name]) == 10
    assert rated_titles & set(plain["approximate"])  # the unticked page shows rated ones
    assert ticked["approximate"] != plain["approximate"]
