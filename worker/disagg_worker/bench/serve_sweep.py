"""A load sweep of ``disagg bench serve`` (``--rate 2,4,6,8``): one point per arrival rate, each point a
full run of its own (in compare mode on freshly started clusters, so no prefix cache, queue or warm-up
carries over from the previous rate: the traces of two rates hold the same prompts). This module owns
the summary across the points: one table row per rate, the sweep JSON, and a PNG of goodput and the
TPOT / TTFT p99 against the rate. Where along the load the disaggregated pair beats the monolithic
worker (and by how much) is what a single rate cannot show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disagg_worker.bench.latency_stats import SLO


def sweep_point(rate: float, payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """One rate's entry in the sweep JSON: the runs' summaries and the comparison, not every request (the
    point's own JSON at ``path`` holds those)."""
    return {
        "rate": rate,
        "json": str(path),
        "requests": len(next((r["requests"] for r in payload["runs"] if "requests" in r), [])),
        "summaries": {r["label"]: r["summary"] for r in payload["runs"] if "summary" in r},
        "failed": {r["label"]: r["failed"] for r in payload["runs"] if "failed" in r},
        "comparison": payload.get("comparison"),
    }


def _ms(summary: dict[str, Any] | None, key: str) -> float | None:
    return None if summary is None else summary[f"{key}_ms"]["p99"]


def sweep_table(points: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (one per rate, so the table stays narrow) and rows: each run's goodput fraction, TPOT and
    TTFT p99 and requests not served, and with two runs to compare, the issue's two ratios."""
    labels = sorted({label for p in points for label in (*p["summaries"], *p["failed"])},
                    key=lambda label: (label != "monolithic", label))
    columns = ["rate (req/s)", *(f"{p['rate']:g}" for p in points)]
    rows: list[list[Any]] = [["requests", *(p["requests"] for p in points)]]
    metrics = (("goodput / sent", lambda s: s["goodput_fraction"]), ("TPOT p99 ms", lambda s: _ms(s, "tpot")),
               ("TTFT p99 ms", lambda s: _ms(s, "ttft")), ("not served", lambda s: s["sent"] - s["ok"]))
    for label in labels:
        for name, get in metrics:
            rows.append([f"{label} {name}", *(_dash(get(p["summaries"][label])) if label in p["summaries"]
                                               else "failed" for p in points)])
    if any(p["comparison"] for p in points):
        def ratio(p: dict[str, Any], key: str) -> Any:
            comp = p["comparison"] or {}
            if key == "goodput_disagg_over_mono" and comp.get("goodput_unbounded"):
                return "unbounded"
            return _dash(comp.get(key))
        rows.append(["TPOT p99 mono / disagg (>= 3x)", *(ratio(p, "tpot_p99_mono_over_disagg") for p in points)])
        rows.append(["goodput disagg / mono (>= 2x)", *(ratio(p, "goodput_disagg_over_mono") for p in points)])
    return columns, rows


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def plot_sweep(points: list[dict[str, Any]], slo: SLO, path: Path) -> Path:
    """Goodput (fraction of the requests sent that met both SLOs), TPOT p99 and TTFT p99 against the
    arrival rate, one line per run label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for p in points for label in p["summaries"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = ((axes[0], "goodput / sent", lambda s: s["goodput_fraction"], None),
              (axes[1], "TPOT p99 (ms)", lambda s: _ms(s, "tpot"), slo.tpot_ms),
              (axes[2], "TTFT p99 (ms)", lambda s: _ms(s, "ttft"), slo.ttft_ms))
    for ax, name, get, limit in panels:
        for label in labels:
            xy = [(p["rate"], get(p["summaries"][label])) for p in points if label in p["summaries"]]
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o", label=label)
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", linewidth=1, label=f"SLO {limit:g} ms")
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("disagg bench serve: load sweep")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
