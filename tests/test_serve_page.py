"""The service's page in Debian's headless Chromium: it loads, asks the server for a
user's approximate and exact top-10, and renders the titles (checked in the DOM against
the searcher and numpy). Chromium is required (CI installs it, see .ci/run): no skip."""

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
