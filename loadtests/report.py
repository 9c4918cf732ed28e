"""summary.json -> summary.md and the PNG plots (matplotlib, Agg backend; skipped if not installed);
the phases' records -> records.jsonl."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

_LAT_COLS = ("ttft_ms", "tpot_ms", "e2e_ms")


def _ms(block: dict, key: str) -> str:
    p = block[key]
    return "-" if p["p50"] is None else f"{p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f}"


def _phase_table(phases: list[dict]) -> list[str]:
    lines = ["| phase | offered req/s | send lag p99 ms | requests | ok | errors | refused | cancelled | timed out "
             "| tokens/s | goodput req/s | budget met | chains chosen |", "|" + "---|" * 13]
    for p in phases:
        share = p["overall"]["budget_met_share"]
        chains = ", ".join(f"c{k}: {v}" for k, v in p["chosen_chains"].items()) or "-"
        lag = (p.get("send_lag_ms") or {}).get("p99")
        lines.append(f"| {p['name']} | {p['offered_rate_rps']:.2f} | {'-' if lag is None else f'{lag:.0f}'} | "
                     f"{p['requests']} | {p['completed']} | "
                     f"{p['errors']} | {p['rejected']} | {p['cancelled']} | {p['timed_out']} | "
                     f"{p['throughput_tokens_per_s']:.1f} | {p['goodput_requests_per_s']:.3f} | "
                     f"{'-' if share is None else f'{share:.1%}'} | {chains} |")
    return lines


def _chain_table(title: str, per_chains: dict) -> list[str]:
    lines = [f"**{title}** (p50 / p90 / p99, ms)", "",
             "| chains | requests | completed | TTFT | TPOT | end-to-end | budget met |", "|" + "---|" * 7]
    for k, b in per_chains.items():
        share = b["budget_met_share"]
        lines.append(f"| {k} | {b['count']} | {b['completed']} | " + " | ".join(_ms(b, c) for c in _LAT_COLS)
                     + f" | {'-' if share is None else f'{share:.1%}'} |")
    return lines + [""]


def _comparison(comp: dict) -> list[str]:
    lines = ["## Elastic against pinned", "", "| load x capacity | offered req/s | budget ms | elastic goodput "
             "| pinned goodput | ratio | elastic budget met | pinned budget met | elastic chains |",
             "|" + "---|" * 9]
    for r in comp["rows"]:
        ratio = "inf" if r["goodput_ratio"] is None else f"{r['goodput_ratio']:.2f}"
        shares = [("-" if s is None else f"{s:.1%}") for s in (r["elastic_budget_met_share"],
                                                                r["pinned_budget_met_share"])]
        chains = ", ".join(f"c{k}: {v}" for k, v in r["elastic_chosen_chains"].items())
        lines.append(f"| {r['load_factor']:g} | {r['offered_rate_rps']:.2f} | {r['budget_ms']:.0f} | "
                     f"{r['elastic_goodput_rps']:.3f} | {r['pinned_goodput_rps']:.3f} | {ratio} | {shares[0]} | "
                     f"{shares[1]} | {chains} |")
    goals = comp["goals"]
    lines += ["", f"Goals: elastic goodput >= {goals['goodput_ratio_min']:g}x pinned; >= "
              f"{goals['budget_met_share_min']:.0%} of budgeted elastic requests within budget.", ""]
    for r in comp["rows"]:
        lines.append(f"- x{r['load_factor']:g}: goodput goal {'met' if r['goodput_goal_met'] else 'NOT met'}, "
                     f"budget goal {'met' if r['budget_goal_met'] else 'NOT met'}")
    return lines + [""]


def write_markdown(summary: dict, path: Path) -> None:
    """summary.md: the run's outcome, calibration, phase table, comparison, per-chain latencies, checks."""
    s = summary
    lines = [f"# Load test: {s['scenario']}", "",
             f"Target {s['target']['url']} (model {s['target']['model']}, {s['target']['n_chains']} chains); "
             f"started {s['started_at']}; {s['conditions']['cpus']} CPUs, load average "
             f"{s['conditions']['loadavg_before']} before, {s['conditions']['loadavg_after']} after.", "",
             f"**{'PASSED' if s['passed'] else 'FAILED'}**: {s['requests']} requests, {s['errors']} errors, "
             f"{s['throughput_tokens_per_s']:.1f} output tokens/s, goodput {s['goodput_requests_per_s']:.3f} "
             "requests/s.", ""]
    if s.get("calibration"):
        c = s["calibration"]
        lines += [f"Full-chain capacity: {c['capacity_rps']:.3f} requests/s ({c['source']}"
                  + (f", {c['users']} users" if "users" in c else "") + ")"
                  + (f"; latency budget {c['budget_ms']:.0f} ms" if c.get("budget_ms") else "")
                  + (f"; one-chain capacity {c['one_chain_capacity_rps']:.3f} requests/s"
                     if c.get("one_chain_capacity_rps") else "") + ".", ""]
    lines += ["## Phases", ""] + _phase_table(s["phases"]) + [""]
    if s.get("comparison"):
        lines += _comparison(s["comparison"])
    lines += ["## Latency per chain count", ""]
    for p in s["phases"]:
        lines += _chain_table(p["name"], p["per_chains"])
    lines += ["## Checks", ""]
    for name, c in s["checks"].items():
        details = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("passed", "samples_mib"))
        lines.append(f"- {name}: {'passed' if c['passed'] else 'FAILED'} ({details})")
    path.write_text("\n".join(lines) + "\n")


def write_plots(summary: dict, out: Path) -> list[str]:
    """latency_vs_load.png and chains_vs_load.png; [] if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    phases = [p for p in summary["phases"] if p["overall"]["completed"]]
    # Calibrations are closed loop at their own achieved rate: not points of an offered-load curve.
    modes = sorted({p["mode"] for p in phases} - {"calibration"}) or ["calibration"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "e2e_ms", "end-to-end"), (axes[1], "ttft_ms", "time to first token")):
        for mode in modes:
            pts = sorted((p["offered_rate_rps"], p["overall"][key]) for p in phases if p["mode"] == mode)
            for q, style in (("p50", "o-"), ("p90", "s--")):
                ax.plot([x for x, _ in pts], [b[q] for _, b in pts], style, label=f"{mode} {q}")
        ax.set(xlabel="offered load (requests/s)", ylabel="ms", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(phases)), 4))
    keys = sorted({k for p in phases for k in p["chosen_chains"]}, key=int)
    bottoms = [0.0] * len(phases)
    labels = [f"{p['name']}\n{p['offered_rate_rps']:.2f}/s" for p in phases]
    for k in keys:
        shares = [p["chosen_chains"].get(k, 0) / max(1, sum(p["chosen_chains"].values())) for p in phases]
        ax.bar(labels, shares, bottom=bottoms, label=f"{k} chains")
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    ax.set(ylabel="share of requests", title="chain counts chosen, by phase and offered load")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "chains_vs_load.png", dpi=100)
    plt.close(fig)
    return ["latency_vs_load.png", "chains_vs_load.png"] + _rss_plot(summary, out, plt)


def _rss_plot(summary: dict, out: Path, plt) -> list[str]:
    """soak: the server's resident memory over the soak phase."""
    rss = summary["checks"].get("rss_bounded", {})
    if not rss.get("samples_mib"):
        return []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([t for t, _ in rss["samples_mib"]], [m for _, m in rss["samples_mib"]], ".-")
    ax.axhline(rss["rss_before_mib"] + rss["bound_mib"], color="red", linestyle="--", label="bound")
    ax.set(xlabel="seconds into the soak", ylabel="server RSS (MiB)", title="server memory during the soak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=100)
    plt.close(fig)
    return ["rss.png"]


def write_records(phases, path: Path) -> None:
    """One JSON line per request of every phase (its RequestRecord, inter-token gaps left out), times in
    seconds from the phase start: for looking at a run over time, e.g. when a queue formed."""
    with path.open("w") as f:
        for phase in phases:
            for rec in phase.records:
                row = {k: v for k, v in dataclasses.asdict(rec).items() if k != "itl_s"}
                row["sent_at"] = round(rec.sent_at - phase.started, 4) if rec.sent_at else None
                f.write(json.dumps({"phase": phase.name, **row}) + "\n")
