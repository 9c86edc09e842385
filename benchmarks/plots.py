"""PNG plots: time and peak memory against sequence length, one line per provider.

One figure per (op, dtype, device): a row per (mode, causal), columns for the median time (with
the p20–p80 band), the extra peak memory and, where rates were computed on a GPU, the achieved
TFLOP/s (GB/s for the projection) beside the ceiling measured in the same run. Providers whose
check failed are drawn dashed and labelled MISMATCH. Titles name the device and the date.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from .providers import ALL_PROVIDERS  # noqa: E402

COLORS = dict(zip(ALL_PROVIDERS, ["#444444", "#8c564b", "#1f77b4", "#9467bd", "#2ca02c", "#d62728",
                                  "#7f7f7f", "#ff7f0e"], strict=True))


@FuncFormatter
def _two_and_five(v, _pos):
    """Minor log ticks: label 2·10^k and 5·10^k only (enough to read a value off a short axis)."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:.3g}" if lead in (2, 5) else ""


def _ceiling(records, device_name, what, dtype):
    """The ceiling measured in the same run: the matmul of the figure's dtype, or the copy."""
    for r in records:
        if r.get("kind") == "ceiling" and r.get("device_name") == device_name:
            if what == "tflops" and "matmul" in r["op"] and r["dtype"] == dtype:
                return r["tflops"], f"{dtype} matmul"
            if what == "gbps" and r["op"] == "ceiling-copy":
                return r["gbps"], "copy"
    return None, None


def draw_plots(records: list[dict], out_dir: str) -> list[str]:
    meas = [r for r in records if r.get("kind", "measurement") == "measurement" and r.get("status") == "ok"]
    figures: OrderedDict[tuple, list] = OrderedDict()
    for r in meas:
        figures.setdefault((r["op"], r["dtype"], r["device_name"]), []).append(r)
    paths = []
    for (op, dtype, device_name), recs in figures.items():
        rows = sorted({(r["mode"], bool(r.get("causal"))) for r in recs},
                      key=lambda mc: (["forward", "backward", "full"].index(mc[0]), mc[1]))
        rate = "gbps" if op in ("projection", "attention-decode") else "tflops"  # bandwidth-bound ops
        has_rate = recs[0].get("device") == "cuda" and any(r.get(rate) for r in recs)
        ncols = 3 if has_rate else 2
        fig, axes = plt.subplots(len(rows), ncols, figsize=(5 * ncols, 3.4 * len(rows)), squeeze=False)
        r0 = recs[0]
        shape_keys = ("batch", "heads", "head_dim", "hidden", "temp_heads", "layers", "vocab")
        shape = ", ".join(f"{k}={r0[k]}" for k in shape_keys if r0.get(k))
        fig.suptitle(f"{op} ({shape}), {dtype} — {device_name}, {r0['date'][:10]}", fontsize=11)
        for i, (mode, causal) in enumerate(rows):
            sel = [r for r in recs if r["mode"] == mode and bool(r.get("causal")) == causal]
            title = f"{mode}" + ("" if op == "projection" else f", causal={causal}")
            for provider in ALL_PROVIDERS:
                pts = sorted((r for r in sel if r["provider"] == provider), key=lambda r: r["seq_len"])
                if not pts:
                    continue
                bad = any(r.get("check_ok") is False for r in pts)
                style = dict(color=COLORS.get(provider), marker="o", ms=3, ls="--" if bad else "-",
                             label=provider + (" (MISMATCH)" if bad else ""))
                xs = [r["seq_len"] for r in pts]
                ax = axes[i][0]
                ax.plot(xs, [r["median_ms"] for r in pts], **style)
                ax.fill_between(xs, [r["p20_ms"] for r in pts], [r["p80_ms"] for r in pts],
                                color=COLORS.get(provider), alpha=0.15)
                mem = [(r["seq_len"], r["peak_mib"]) for r in pts if r.get("peak_mib") is not None]
                if mem:
                    axes[i][1].plot(*zip(*mem, strict=True), **style)
                if has_rate:
                    vals = [(r["seq_len"], r[rate]) for r in pts if r.get(rate)]
                    if vals:
                        axes[i][2].plot(*zip(*vals, strict=True), **style)
            axes[i][0].set_ylabel("median ms (p20–p80 band)")
            axes[i][1].set_ylabel("extra peak MiB")
            axes[i][0].set_title(f"time, {title}", fontsize=9)
            axes[i][1].set_title(f"peak memory, {title}", fontsize=9)
            if has_rate:
                ceiling, what = _ceiling(records, device_name, rate, dtype)
                if ceiling:
                    axes[i][2].axhline(ceiling, color="k", ls=":", lw=1, label=f"measured {what} ceiling")
                axes[i][2].set_ylabel("TFLOP/s" if rate == "tflops" else "GB/s")
                axes[i][2].set_title(f"achieved rate, {title}", fontsize=9)
            seq_lens = sorted({r["seq_len"] for r in sel})
            plain = FuncFormatter(lambda v, _: f"{v:.3g}")
            for j, ax in enumerate(axes[i]):
                ax.set_xscale("log", base=2)
                ax.set_xticks(seq_lens)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
                # memory can be 0 MiB (all in place): symlog keeps those points on the plot
                if j == 1:
                    ax.set_yscale("symlog", linthresh=1)
                    ax.set_ylim(bottom=0)
                else:
                    ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(_two_and_five)
                ax.set_xlabel("sequence length S")
                ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if has_rate:
            h2, l2 = axes[0][2].get_legend_handles_labels()
            handles += [h for h, lab in zip(h2, l2, strict=True) if lab not in labels]
            labels += [lab for lab in l2 if lab not in labels]
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 0.96))
        path = os.path.join(out_dir, f"{op}_{dtype}_{recs[0]['device']}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
