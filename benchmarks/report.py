"""Summaries of a harness run: QPS at target recalls, markdown tables, the plot, README section.

``python -m benchmarks.report --readme`` rewrites the README section between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` from the committed results
(``benchmarks/results/<dataset>.json`` for :data:`README_DATASETS`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.systems import AH1

TARGETS = (0.90, 0.95, 0.99)
README_DATASETS = ("seed", "glove-50-dev")
RESULTS = REPO / "benchmarks" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
REFERENCE = "mipscan"
#: The variants whose best point at each target is the reference of the ratios (mipscan's
#: partitioned index at either code width; its brute-force variant is a row like others).
REFERENCE_VARIANTS = (REFERENCE, REFERENCE + AH1)


def slug(name: str) -> str:
    """A file-name-safe form of a dataset name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def modes(result: dict) -> list[tuple[str, str]]:
    """(key, label) of every QPS measure in a run: single query, then batched per thread count."""
    out = [("single", "single query, 1 thread")]
    for n in result["config"]["threads"]:
        out.append((f"batched:{n}", f"batched, {n} thread{'s' if n > 1 else ''}"))
    return out


def qps(point: dict, mode: str) -> float | None:
    if mode == "single":
        return point.get("qps_single")
    return point["qps_batched"].get(mode.split(":")[1])


def front(points: list[dict], mode: str) -> list[dict]:
    """Pareto front (no other point has both higher recall and higher QPS), by recall."""
    pts = sorted((p for p in points if qps(p, mode)), key=lambda p: (-p["recall"], -qps(p, mode)))
    out, best = [], -1.0
    for p in pts:
        if qps(p, mode) > best:
            out.append(p)
            best = qps(p, mode)
    return sorted(out, key=lambda p: p["recall"])


def at_target(points: list[dict], mode: str, target: float) -> dict | None:
    """The fastest measured point whose recall@10 reaches ``target`` (no interpolation)."""
    ok = [p for p in points if p["recall"] >= target and qps(p, mode)]
    return max(ok, key=lambda p: qps(p, mode)) if ok else None


def summarize(result: dict) -> dict:
    """{mode: {system: {target: {"qps", "recall", "knobs", "ratio"}}}}; ratio = mipscan / system,
    mipscan being the faster of :data:`REFERENCE_VARIANTS` at that mode and target (its cell
    carries "reference": true)."""
    out = {}
    systems = [s for s in result["systems"] if s.get("points")]
    for mode, _ in modes(result):
        table = {}
        for s in systems:
            table[s["name"]] = {}
            for t in TARGETS:
                p = at_target(s["points"], mode, t)
                table[s["name"]][f"{t:.2f}"] = None if p is None else {
                    "qps": qps(p, mode), "recall": p["recall"], "knobs": p["knobs"]}
        for t in (f"{t:.2f}" for t in TARGETS):
            cells = [table[v][t] for v in REFERENCE_VARIANTS if table.get(v, {}).get(t)]
            if not cells:
                continue
            ref = max(cells, key=lambda c: c["qps"])
            ref["reference"] = True
            for row in table.values():
                if row[t] is not None:
                    row[t]["ratio"] = ref["qps"] / row[t]["qps"]
        out[mode] = table
    out["scaling"] = _scaling(result, out)
    return out


def _scaling(result: dict, summary: dict) -> dict:
    """{threads: {target: {"ratio", "variant", "knobs"}}}: the same-round thread scaling
    (run.py's "thread_scaling") of the reference's fastest batched point at that many
    threads and that target."""
    out = {}
    for n in result["config"]["threads"]:
        if n == 1:
            continue
        for t in (f"{t:.2f}" for t in TARGETS):
            for name in REFERENCE_VARIANTS:
                cell = summary.get(f"batched:{n}", {}).get(name, {}).get(t)
                if not (cell and cell.get("reference")):
                    continue
                s = next(s for s in result["systems"] if s["name"] == name)
                p = next(p for p in s["points"] if p["knobs"] == cell["knobs"])
                ratio = p.get("thread_scaling", {}).get(str(n))
                if ratio is not None:
                    out.setdefault(str(n), {})[t] = {"ratio": ratio, "variant": name,
                                                    "knobs": cell["knobs"]}
    return out


def _fmt_qps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _mb(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**20:,.1f}"


def _knobs(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items())


def _noise(system: dict) -> str:
    vals = sorted(p["foreign_cores"] for p in system.get("points", [])
                  if p.get("foreign_cores") is not None)
    return f"{vals[len(vals) // 2]:.2f}" if vals else "—"


def markdown(result: dict, plot_name: str | None = None, heading: str = "###") -> str:
    """The summary of one run: header, QPS-at-recall tables, build table, plot link."""
    ds, env, cfg = result["dataset"], result["env"], result["config"]
    summary = result.get("summary") or summarize(result)
    lines = [
        f"{heading} {ds['name']}: {ds['n']:,} x {ds['d']} ({ds['metric']}), "
        f"{ds['nq']:,} queries, k={cfg['k']}",
        "",
        f"{result['date']}; {env['cpu']} ({env['cores']} cores, mipscan SIMD "
        f"`{env.get('mipscan_simd_level')}`); load average {env['loadavg_start'][0]:.2f} at the "
        f"start and {env.get('loadavg_end', [float('nan')])[0]:.2f} at the end "
        "(other engineers share the machine). Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + "."
        + (f" Checkout {env['git']['commit']}"
           + (" with uncommitted changes in src/." if env["git"]["src_dirty"] else ".")
           if env.get("git") else ""),
        f"Command: `{result['command']}`",
        "",
        f"QPS at recall@10 >= target: the fastest measured point reaching it (no "
        f"interpolation; — = not reached). In bold: {REFERENCE}'s best at that target (of "
        + " and ".join(REFERENCE_VARIANTS) + f"); in brackets: that QPS / the row's. Variants "
        "ending in -ah1 use one dimension per 4-bit code instead of two. "
        + (f"Each system ran {cfg['rounds']} times, interleaved with the others; each point "
           "keeps its best round (the VM's speed drifts). " if cfg.get("rounds", 1) > 1 else "")
        + f"Median of {cfg['repeats']} timed runs after a warm-up; single-query QPS over "
        f"{cfg['nq_single']} queries. \"Others' CPU\": the median, over a system's points, "
        "of the cores that other processes kept busy while it was measured (from /proc/stat).",
        "",
    ]
    for mode, label in modes(result):
        lines += [f"| {label} | " + " | ".join(f"@{t:.2f}" for t in TARGETS) + " |",
                  "|---|" + "---:|" * len(TARGETS)]
        for name, row in summary[mode].items():
            cells = []
            for t in TARGETS:
                c = row[f"{t:.2f}"]
                if c is None:
                    cells.append("—")
                else:
                    if c.get("reference"):
                        cells.append(f"**{_fmt_qps(c['qps'])}**")
                    else:
                        ratio = f" ({c['ratio']:.2f}x)" if "ratio" in c else ""
                        cells.append(_fmt_qps(c["qps"]) + ratio)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for n, cells in summary.get("scaling", {}).items():
        machine = result.get("env", {}).get("machine_thread_scaling", {}).get(n)
        ceiling = "" if machine is None else (
            f" The machine's own {n}-thread scaling in the same rounds (SHA-256 on {n} threads "
            f"against one, in turns: compute only, nothing shared): {machine['median']:.2f}x "
            f"(median; rounds {min(machine['rounds']):.2f}-{max(machine['rounds']):.2f}x).")
        lines += [f"Batched QPS at {n} threads / at 1 thread, at {REFERENCE}'s fastest {n}-thread "
                  "point per target, each ratio from one round (1 and n threads timed in "
                  "turns), median over the rounds: " + "; ".join(
                      f"@{t} {c['ratio']:.2f}x ({c['variant']} {_knobs(c['knobs'])})"
                      for t, c in cells.items()) + "." + ceiling, ""]
    lines += ["| system | SIMD | build s | index MB | build peak RSS MB | default knobs | recall@10 "
              "| QPS 1 query | QPS batched 1 thread | others' CPU |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for s in result["systems"]:
        if "skipped" in s:
            lines.append(f"| {s['name']} | skipped: {s['skipped']} |||||||||")
            continue
        if "build" not in s:
            lines.append(f"| {s['name']} | error (see JSON) |||||||||")
            continue
        b = s["build"]
        dk = s.get("default_knobs")
        p = next((p for p in s.get("points", []) if p["knobs"] == dk), None)
        if p is None and s.get("points") and len(s["points"]) == 1:
            p = s["points"][0]
        lines.append(
            f"| {s['name']} | {s.get('simd_level') or '—'} | {b['seconds']:.2f} | "
            f"{_mb(b['index_bytes'])} | "
            f"{_mb(b['build_peak_rss'])} | {json.dumps(dk) if dk else '—'} | "
            + (f"{p['recall']:.4f} | {_fmt_qps(p['qps_single'])} | "
               f"{_fmt_qps(p['qps_batched']['1'])} |" if p else "— | — | — |")
            + f" {_noise(s)} |")
    lines.append("")
    errors = [s["name"] for s in result["systems"] if "error" in s]
    if errors:
        lines += [f"Failed: {', '.join(errors)} (traceback in the JSON).", ""]
    for s in result["systems"]:
        for e in s.get("point_errors", []):
            lines += [f"{s['name']} failed at {json.dumps(e['knobs'])}: `{e['error']}`", ""]
    if result.get("merged"):
        lines += ["Merged runs: " + "; ".join(
            f"{', '.join(m['systems'])} from {m['date']}" for m in result["merged"]) + ".", ""]
    if plot_name:
        lines += [f"![recall-QPS fronts, {ds['name']}]({plot_name})", ""]
    return "\n".join(lines)


#: The plots' recall axis: recall below RECALL_KNEE gets KNEE_SHARE of the width, the
#: region the tables quote (RECALL_KNEE..1) the rest.
RECALL_KNEE, KNEE_SHARE = 0.8, 0.2


def _recall_axis(r):
    import numpy as np

    r = np.asarray(r, dtype=float)
    return np.where(r < RECALL_KNEE, r / RECALL_KNEE * KNEE_SHARE,
                    KNEE_SHARE + (r - RECALL_KNEE) / (1 - RECALL_KNEE) * (1 - KNEE_SHARE))


def _recall_axis_inverse(x):
    import numpy as np

    x = np.asarray(x, dtype=float)
    return np.where(x < KNEE_SHARE, x / KNEE_SHARE * RECALL_KNEE,
                    RECALL_KNEE + (x - KNEE_SHARE) / (1 - KNEE_SHARE) * (1 - RECALL_KNEE))


def plot(result: dict, path: Path) -> None:
    """Log-QPS vs recall@10 fronts, one panel per QPS measure. The recall axis gives 0.8-1.0
    four fifths of the width; the legend sits below the panels, over no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = modes(result)
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 4.2), squeeze=False)
    systems = [s for s in result["systems"] if s.get("points")]
    # 20 distinct colours: a run has a dozen systems (the default cycle repeats after 10)
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    for ax, (mode, label) in zip(axes[0], ms):
        for i, s in enumerate(systems):
            c = colors[i % len(colors)]
            pts = [p for p in s["points"] if qps(p, mode)]
            ax.scatter([p["recall"] for p in pts], [qps(p, mode) for p in pts], s=8, color=c,
                       alpha=0.3)
            f = front(s["points"], mode)
            ax.plot([p["recall"] for p in f], [qps(p, mode) for p in f], "o-", ms=3, color=c,
                    label=s["name"], lw=2.2 if s["name"] in REFERENCE_VARIANTS else 1.2)
        ax.set_yscale("log")
        ax.set_xscale("function", functions=(_recall_axis, _recall_axis_inverse))
        ax.set_xlim(0, 1.002)
        ax.set_xticks([0, 0.4, 0.8, 0.85, 0.9, 0.95, 0.99])
        ax.set_xticklabels(["0", "0.4", "0.8", "0.85", "0.9", "0.95", ".99"], fontsize=8)
        for t in TARGETS:
            ax.axvline(t, color="0.6", lw=0.6, ls=":")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries per second")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ds = result["dataset"]
    fig.suptitle(f"{ds['name']}: {ds['n']:,} x {ds['d']}, {ds['nq']:,} queries "
                 f"({result['env']['cpu']}, {result['date'][:10]})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6) or 1, fontsize=8,
               frameon=False)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def readme_section(results_dir: Path = RESULTS) -> str:
    """Markdown for the README: the committed results of :data:`README_DATASETS`."""
    parts = ["Generated by `python -m benchmarks.run ... --out benchmarks/results "
             "--update-readme`; the method is in `benchmarks/README.md`. Each table compares "
             "systems measured in one run (unless it lists merged runs), on the same data "
             "and the same pinned threads. The machine is shared: the last column shows how "
             "many of the machine's cores other work kept busy meanwhile.", ""]
    found = False
    for name in README_DATASETS:
        path = results_dir / f"{slug(name)}.json"
        if not path.exists():
            parts += [f"### {name}", "", "Not measured yet.", ""]
            continue
        found = True
        result = json.loads(path.read_text())
        png = path.with_suffix(".png")
        rel = png.relative_to(REPO).as_posix() if png.exists() else None
        parts.append(markdown(result, rel))
    bf = results_dir / "brute_force.json"
    if bf.exists():
        found = True
        r = json.loads(bf.read_text())
        ds = r["dataset"]
        parts += ["### Exact search (brute force), one thread", "",
                  f"{r['date']}; {ds['name']}: {ds['n']:,} x {ds['d']}, {ds['nq']} queries, "
                  f"k={r['k']}, {r['threads']} thread, median of {r['repeats']} runs "
                  f"(`{r['command']}`).", "",
                  "| method | ms for all queries | QPS | mipscan speed-up | others' CPU |",
                  "|---|---:|---:|---:|---:|"]
        parts += [f"| {name} | {row['seconds'] * 1e3:,.1f} | {row['qps']:,.0f} | "
                  f"{row['mipscan_speedup']:.2f}x | "
                  + (f"{row['foreign_cores']:.2f} |" if row.get("foreign_cores") is not None
                     else "— |") for name, row in r["results"].items()]
        parts.append("")
    if not found:
        parts.append("No committed results yet.")
    return "\n".join(parts).rstrip() + "\n"


def update_readme(readme: Path = REPO / "README.md", results_dir: Path = RESULTS) -> None:
    """Replaces the text between the bench markers (appends the markers when missing)."""
    text = readme.read_text() if readme.exists() else ""
    body = f"{START}\n{readme_section(results_dir)}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="rewrite the README bench section")
    ap.add_argument("json", nargs="*", help="result JSON files to print as markdown")
    args = ap.parse_args()
    for path in args.json:
        print(markdown(json.loads(Path(path).read_text())))
    if args.readme:
        update_readme()


if __name__ == "__main__":
    main()
