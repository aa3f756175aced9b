"""mipscan.keras.ApproximateRetrieval on every Keras backend.

Keras fixes its backend on first import, so each backend runs
``tests/keras_backend_checks.py`` in its own subprocess with ``KERAS_BACKEND`` set, once
per session; each check of that run is one test here, and a failure prints the check's
message and the subprocess's output. The recall check uses the tutorial model's
embeddings (../shared/data/ml-100k, trained once with JAX and shared by all backends).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("keras_backend_checks.py")
BACKENDS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}  # name -> module
CHECKS = ["contract", "compiled", "config", "save_load", "load_other_backend", "errors",
          "update_candidates", "incremental_update", "linked_incremental", "tutorial_model", "owns_data", "nan_queries", "racing_updates",
          "tampered_assets"]
#: The backend whose saved model the others load (check load_other_backend).
SAVING_BACKEND = "jax"
MARKER = "KERAS_CHECKS_JSON: "
# Few epochs keep the session short, and the barely trained model's nearly isotropic
# embeddings are the hard case for recall. 40 copies make 109,962 candidates: the default
# index (mipscan.suggest_config) uses a tree; the first 9,000 test exact scoring.
# benchmarks/bench_keras.py uses the tutorial's 50 epochs and 100 copies.
EPOCHS, COPIES = 10, 40
TIMEOUT = 900

_runs: dict[str, tuple[dict | None, str]] = {}


def _run(args: list[str], backend: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(SCRIPT), *args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:  # report what it printed, as for a failure
        text = [o.decode(errors="replace") if isinstance(o, bytes) else (o or "")
                for o in (exc.stdout, exc.stderr)]
        return subprocess.CompletedProcess(cmd, f"timed out after {TIMEOUT} s", *text)


def _output(proc: subprocess.CompletedProcess) -> str:
    return (f"--- exit status {proc.returncode}; stdout:\n{proc.stdout}\n"
            f"--- stderr:\n{proc.stderr[-20000:]}")


@pytest.fixture(scope="session")
def tutorial_npz(ml100k_dir, tmp_path_factory) -> Path:
    """The tutorial model's candidates and users as .npz (trained once, with JAX)."""
    out = tmp_path_factory.mktemp("keras") / "tutorial.npz"
    proc = _run(["--make-embeddings", str(out), "--data-dir", str(ml100k_dir),
                 "--epochs", str(EPOCHS), "--copies", str(COPIES)], "jax")
    if proc.returncode != 0:
        pytest.fail("training the tutorial model failed\n" + _output(proc), pytrace=False)
    return out


def _backend_report(request, backend: str) -> tuple[dict, str]:
    """Runs every check on ``backend`` once per session; the recall check runs when the
    data is there (its own test skips or fails through the ml100k_dir fixture). The
    saving backend runs first and saves a model that the others load."""
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        pytest.skip(f"{BACKENDS[backend]} is not installed (pip install '.[test]')")
    if backend not in _runs:
        try:
            npz = request.getfixturevalue("tutorial_npz")
        except (pytest.skip.Exception, pytest.fail.Exception):
            npz = None
        args = [] if npz is None else ["--embeddings", str(npz)]
        saved = request.getfixturevalue("tmp_path_factory").getbasetemp() / "keras_saved_model"
        if backend == SAVING_BACKEND:
            saved.mkdir(exist_ok=True)
            args += ["--save-model", str(saved)]
        else:
            _backend_report(request, SAVING_BACKEND)
            if (saved / "model.keras").is_file():
                args += ["--load-model", str(saved)]
        proc = _run(args, backend)
        report = None
        for line in proc.stdout.splitlines():
            if line.startswith(MARKER):
                report = json.loads(line[len(MARKER):])
        _runs[backend] = (report, _output(proc))
    report, output = _runs[backend]
    if report is None:
        pytest.fail(f"{backend}: the checks did not report\n{output}", pytrace=False)
    return report, output


def _expect(report: dict, output: str, backend: str, name: str) -> str:
    entry = report.get(name)
    if entry is None:
        pytest.fail(f"{backend}: check {name!r} did not run\n{output}", pytrace=False)
    if not entry["ok"]:
        pytest.fail(f"{backend}: {name}: {entry['detail']}\n{output}", pytrace=False)
    if entry["skipped"]:
        pytest.fail(f"{backend}: {name} did not run (no model saved by {SAVING_BACKEND}: see "
                    f"its save_load check)\n{output}", pytrace=False)
    return entry["detail"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_recall_vs_brute_force_on_tutorial_embeddings(request, backend, ml100k_dir, tutorial_npz):
    report, output = _backend_report(request, backend)
    entry = report.get("recall")
    if entry is not None and entry["ok"] and entry["skipped"]:
        pytest.fail(f"{backend}: recall check skipped although the data is at {ml100k_dir}\n"
                    f"{output}", pytrace=False)
    _expect(report, output, backend, "recall")


@pytest.mark.parametrize("backend,check", [
    (b, c) for b in BACKENDS for c in CHECKS
    if not (c == "load_other_backend" and b == SAVING_BACKEND)])
def test_backend(request, backend, check):
    report, output = _backend_report(request, backend)
    _expect(report, output, backend, check)


def test_import_mipscan_does_not_import_keras():
    code = ("import sys, mipscan; bad = [m for m in ('keras', 'keras_rs', 'tensorflow', "
            "'torch', 'jax') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_check_list_is_complete():
    """Every check in the script is a test here (the recall one has its own)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import keras_backend_checks as c; "
            "print(' '.join(c.CHECKS))")
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(CHECKS + ["recall"])
