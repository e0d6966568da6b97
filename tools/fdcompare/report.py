"""The comparison's reports: ratios against the issue's targets (`assess`), the formatting
helpers, `machine_line`, OUT/results.md, OUT/results.csv (and `write_dict_csv`, the other
benchmarks' CSV writer), and OUT/payload-vs-time.svg, the
payload-against-diff-time plot drawn with matplotlib (Debian's python3-matplotlib)."""

import csv
import datetime
import math
import os
import platform
import re

# The targets.
MAX_VS_BEST_PEER = 0.9        # fleetdelta max payload <= 0.9x the smallest peer payload
DEFAULT_TIME_FRACTION = 0.2   # fleetdelta default diff time <= 1/5 of zstd -19's
APPLY_RSS_LIMIT_KIB = 64 * 1024


# ---------------------------------------------------------------- ratios and targets

def find(rows, tool):
    for r in rows:
        if r.tool == tool:
            return r
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


def assess(rows):
    """Ratios and the issue's targets for one pair: list of (label, value, met)."""
    peers = [r for r in rows if r.kind == "peer" and r.usable]
    best = min(peers, key=lambda r: r.payload) if peers else None
    fmax, fdef = find(rows, "fleetdelta-max"), find(rows, "fleetdelta-default")
    z19, rd = find(rows, "zstd-19"), find(rows, "rdiff")
    out = []

    r = ratio(fmax.payload, best.payload) if fmax and fmax.usable and best else None
    out.append((f"max payload / smallest peer ({best.tool if best else '-'})", r,
                None if r is None else r <= MAX_VS_BEST_PEER, f"<= {MAX_VS_BEST_PEER}"))

    z_ok = z19 is not None and z19.usable
    rp = ratio(fdef.payload, z19.payload) if fdef and fdef.usable and z_ok else None
    rt = ratio(fdef.diff.seconds, z19.diff.seconds) if fdef and fdef.usable and z_ok else None
    out.append(("default payload / zstd-19 payload", rp, None if rp is None else rp <= 1.0, "<= 1"))
    out.append(("default diff time / zstd-19 diff time", rt,
                None if rt is None else rt <= DEFAULT_TIME_FRACTION, f"<= {DEFAULT_TIME_FRACTION}"))

    ra = None
    if fdef and fdef.usable and fdef.apply and fdef.apply.ok and rd and rd.usable:
        ra = ratio(fdef.apply.seconds, rd.apply.seconds)
    out.append(("default apply time / rdiff apply time", ra, None if ra is None else ra < 1.0, "< 1"))
    rss = fdef.apply.rss_kib if fdef and fdef.apply and fdef.apply.ok else None
    out.append(("default apply peak RSS (MiB)", None if rss is None else rss / 1024,
                None if rss is None else rss < APPLY_RSS_LIMIT_KIB, "< 64"))
    return out


# ---------------------------------------------------------------- reports

def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def fmt_time(m):
    if m is None:
        return "-"
    if m.status == "timeout":
        return "timeout"
    if m.status in ("failed", "skipped"):
        return m.status
    return f"{m.seconds:.2f}"


def fmt_rss(m):
    return "-" if m is None or not m.rss_kib else f"{m.rss_kib / 1024:.1f}"


def machine_line():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}, {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def write_markdown(path, results, args):
    lines = ["# fleetdelta vs peers", "",
             f"Run: {machine_line()}.", "",
             "Payload = bytes to ship. Peers work on the concatenated uncompressed layer tars "
             "(OLD/NEW); rdiff's diff time includes signature + delta + zstd -19, its apply "
             "unzstd + patch. Times are wall seconds, RSS is peak MiB (/usr/bin/time -v).", ""]
    for info, rows in results:
        lines += [f"## {info['pair']}", "",
                  f"v1 {fmt_bytes(info['v1_compressed'])} / v2 {fmt_bytes(info['v2_compressed'])} "
                  f"compressed; OLD {fmt_bytes(info.get('old_bytes'))} / NEW "
                  f"{fmt_bytes(info.get('new_bytes'))} uncompressed.", "",
                  "| tool | payload | % of NEW | diff s | diff MiB | apply s | apply MiB | verified | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        new = info.get("new_bytes")
        for r in rows:
            pct = f"{100 * r.payload / new:.2f}" if r.payload is not None and new else "-"
            ver = {True: "yes", False: "NO", None: "-"}[r.verified]
            diff_t = fmt_time(r.diff) if r.kind != "baseline" or r.diff.seconds else "-"
            note = r.note.replace("|", "\\|").replace("\n", " ")[:120]
            lines.append(f"| {r.tool} | {fmt_bytes(r.payload)} | {pct} | {diff_t} | "
                         f"{fmt_rss(r.diff)} | {fmt_time(r.apply)} | {fmt_rss(r.apply)} | {ver} | {note} |")
        lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
        for label, value, met, target in assess(rows):
            v = "-" if value is None else f"{value:.3f}"
            m = {True: "met", False: "**missed**", None: "n/a"}[met]
            lines.append(f"| {label} | {v} | {target} | {m} |")
        lines.append("")
    lines += ["Targets (from the issue): max payload <= 0.9x the smallest peer payload; default "
              "payload <= zstd -19 --patch-from and diff time <= 1/5 of its; apply faster than "
              "rdiff patch with peak RSS < 64 MiB.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_csv(path, results):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "tool", "kind", "payload_bytes", "old_bytes", "new_bytes",
                    "diff_seconds", "diff_status", "diff_peak_rss_kib", "apply_seconds",
                    "apply_status", "apply_peak_rss_kib", "verified", "note"])
        for info, rows in results:
            for r in rows:
                has_diff = r.kind != "baseline" or r.diff.seconds
                w.writerow([info["pair"], r.tool, r.kind,
                            "" if r.payload is None else r.payload,
                            info.get("old_bytes", ""), info.get("new_bytes", ""),
                            f"{r.diff.seconds:.3f}" if has_diff else "",
                            r.diff.status if has_diff else "",
                            r.diff.rss_kib or "",
                            f"{r.apply.seconds:.3f}" if r.apply else "",
                            r.apply.status if r.apply else "",
                            (r.apply.rss_kib or "") if r.apply else "",
                            {True: "yes", False: "no", None: ""}[r.verified], r.note])


def write_dict_csv(path, cells, value):
    """Writes `cells` (dicts with the same keys, in the first's order) as a CSV with a header
    row, each value through `value`; writes nothing when there are none."""
    if not cells:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cells[0]))
        w.writeheader()
        for c in cells:
            w.writerow({k: value(v) for k, v in c.items()})


# ---------------------------------------------------------------- the plot

# tool -> (colour, matplotlib marker); the tools the plot shows, in legend order.
STYLE = {
    "fleetdelta-fast": ("#1b9e77", "o"), "fleetdelta-default": ("#117a5b", "o"),
    "fleetdelta-max": ("#0b4d39", "o"), "fleetdelta-default-content": ("#5fc9a8", "o"),
    "xdelta3": ("#d95f02", "s"),
    "zstd-19": ("#7570b3", "D"), "zstd-3": ("#b3b0e0", "D"),
    "bsdiff": ("#e7298a", "^"), "rdiff": ("#66a61e", "v"),
    "zstd-19-full": ("#777777", "X"),
}


def tick_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def tick_seconds(t):
    return f"{t:g}s"


def log_axis(axis, lo, hi, label):
    """Log scale on [lo, hi]: ticks at decades, or at 1-2-5 steps under two decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    subs = (1.0,) if math.log10(hi / lo) >= 2 else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_formatter(NullFormatter())


def write_plot(path, results):
    """Small multiples: per pair, payload (log) against diff time (log), one marker per tool."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [(info, [r for r in rows if r.tool in STYLE and r.payload and r.diff.ok
                      and r.diff.seconds])
              for info, rows in results]
    panels = [p for p in panels if p[1]]
    cols = min(3, max(1, len(panels)))
    rows_n = max(1, math.ceil(len(panels) / cols))
    shown = [t for t in STYLE if any(r.tool == t for _, rows in panels for r in rows)]
    width = max(cols * 4.2, 6.8)  # inches
    legend_cols = max(1, min(len(shown), int(width / 2.0)))  # a label is up to ~1.9 in wide
    legend_in = 0.22 * math.ceil(max(1, len(shown)) / legend_cols) + 0.25
    height = rows_n * 3.3 + legend_in

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fleetdelta-compare",
                                "font.family": "sans-serif", "font.size": 9}):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(rows_n, cols, squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_axis_off()
        if not panels:
            axes[0][0].text(0.5, 0.5, "no timed payloads", ha="center", va="center",
                            transform=axes[0][0].transAxes)
        for ax, (info, rows) in zip(axes.flat, panels):
            ts = [r.diff.seconds for r in rows]
            ps = [r.payload for r in rows]
            tlo, thi = min(ts) / 1.5, max(ts) * 1.5
            plo, phi = min(ps) / 1.5, max(ps) * 1.5
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(tlo, thi)
            ax.set_ylim(plo, phi)
            log_axis(ax.xaxis, tlo, thi, tick_seconds)
            log_axis(ax.yaxis, plo, phi, tick_bytes)
            ax.grid(True, which="major", color="#dddddd", linewidth=0.8)
            ax.set_axisbelow(True)
            ax.set_title(info["pair"], fontweight="bold")
            ax.set_xlabel("diff time (log)")
            ax.set_ylabel("payload (log)")
            for r in rows:
                colour, marker = STYLE[r.tool]
                # The SVG element's id names the point: PAIR.TOOL
                ax.plot([r.diff.seconds], [r.payload], linestyle="none", marker=marker,
                        markersize=7, color=colour,
                        gid=re.sub(r"[^A-Za-z0-9_.-]", "_", f"{info['pair']}.{r.tool}"))
        handles = [Line2D([], [], linestyle="none", marker=STYLE[t][1], markersize=7,
                          color=STYLE[t][0], label=t) for t in shown]
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=legend_cols, frameon=False)
        fig.tight_layout(rect=(0, legend_in / height, 1, 1))
        fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight",
                    pad_inches=0.1)
