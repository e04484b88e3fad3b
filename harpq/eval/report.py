"""The comparison report: one Markdown file and two plots, from the per-run JSON records of `compare`."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from ..errors import HarpqError
from ..markdown import markdown_table

MARKERS = "osD^vP*Xh"


def _plots(out: Path, records: list[dict], fp: dict | None, stem: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise HarpqError("the report's plots need matplotlib: pip install 'harpq[report]'") from e
    from .compare import layer_medians

    methods = sorted({r["method"] for r in records})
    # one colour and marker per method in both plots and every panel, whichever methods a panel lacks
    style = {m: {"color": f"C{k % 10}", "marker": MARKERS[k % len(MARKERS)]} for k, m in enumerate(methods)}
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in methods:
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["bits_per_weight"])
        xs, ys = [r["bits_per_weight"] for r in rows], [r["ppl"][stem] for r in rows]
        ax.plot(xs, ys, label=method, **style[method])
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['bits']}b", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fp is not None:
        ax.axhline(fp["ppl"][stem], color="black", linestyle="--", linewidth=1, label=f"fp ({fp['ppl'][stem]:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (every stored bit)")
    ax.set_ylabel(f"perplexity, {stem} (log scale)")
    ax.set_title("Perplexity against bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bits.png")
    plt.close(fig)
    files.append("ppl_vs_bits.png")

    with_proxy = [r for r in records if layer_medians(r.get("proxy_loss", {}))]  # calibration-free runs have none
    if not with_proxy:
        return files
    methods = [m for m in methods if any(r["method"] == m for r in with_proxy)]
    bits = sorted({r["bits"] for r in with_proxy})
    fig, axes = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 4), dpi=120, squeeze=False)
    handles = {}
    for ax, b in zip(axes[0], bits, strict=True):
        for method in methods:
            rec = next((r for r in with_proxy if r["method"] == method and r["bits"] == b), None)
            med = layer_medians(rec.get("proxy_loss", {})) if rec else {}
            if med:
                (handles[method],) = ax.plot(list(med), list(med.values()), label=method, **style[method])
        ax.set_yscale("log")
        ax.set_title(f"{b} bits")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median proxy loss tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)")
    fig.suptitle("Per-module proxy loss by layer (methods with calibration)")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles], fontsize=8,
               loc="center right")
    fig.savefig(out / "proxy_loss_by_layer.png")
    plt.close(fig)
    files.append("proxy_loss_by_layer.png")
    return files


def _row(r: dict, stem: str, tasks: list[str]) -> list[str]:
    cells = [r["method"] if r["method"] == "fp" else f"{r['method']} {r['bits']}-bit", f"{r['bits_per_weight']:.3f}",
             f"{r['ppl'][stem]:.3f}"]
    for t in tasks:
        v = r.get("tasks", {}).get(t, {})
        cells.append(f"{v['acc']:.3f}" + (f" / {v['acc_norm']:.3f}" if "acc_norm" in v else "") if v else "")
    cells.append(str(r.get("quant_seconds", "")))
    return cells


def _header(stem: str, tasks: list[str]) -> list[str]:
    return ["run", "bits/weight", f"ppl {stem}", *tasks, "quantize s"]


def results_table(records: list[dict[str, Any]]) -> str:
    """Every run in one Markdown table: FP first, then by bit width and perplexity."""
    quantized = [r for r in records if r["method"] != "fp"]
    if not quantized:
        raise HarpqError("no finished quantized runs to report")
    stem, tasks = next(iter(quantized[0]["ppl"])), list(quantized[0].get("tasks", {}))
    ordered = [r for r in records if r["method"] == "fp"] + sorted(
        quantized, key=lambda r: (r["bits"], r["ppl"][stem]))
    return markdown_table(_header(stem, tasks), [_row(r, stem, tasks) for r in ordered])


def write_report(out: Path, records: list[dict[str, Any]], model: str) -> Path:
    """OUT/report.md with a table per bit width and the plots."""
    fp = next((r for r in records if r["method"] == "fp"), None)
    quantized = [r for r in records if r["method"] != "fp"]
    if not quantized:
        raise HarpqError("no finished quantized runs to report")
    stem = next(iter(quantized[0]["ppl"]))
    tasks = list(quantized[0].get("tasks", {}))
    plots = _plots(out, quantized, fp, stem)
    limit = quantized[0].get("limit")
    used, total = (quantized[0].get("windows") or {}).get(stem, [None, None])
    slice_ = f" over {used} of {total} windows, evenly spread" if used and used < total else ""
    lines = [f"# harpq comparison: {Path(model).name}", "",
             f"Generated {datetime.date.today().isoformat()} by `harpq compare`. Perplexity on `{stem}` at context "
             f"{quantized[0]['ctx']}{slice_}; zero-shot accuracy (acc / acc_norm; LAMBADA: greedy acc) "
             + (f"on the first {limit} items of each task." if limit else "on every item of each task."),
             "Bits per weight count every stored bit (codes, scales, zero-points, sign vectors, processor "
             "parameters).", ""]
    header = _header(stem, tasks)

    def row(r: dict) -> str:
        return "| " + " | ".join(_row(r, stem, tasks)) + " |"

    for b in sorted({r["bits"] for r in quantized}):
        lines += [f"## {b} bits", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        if fp is not None:
            lines.append(row(fp))
        lines += [row(r) for r in sorted((r for r in quantized if r["bits"] == b), key=lambda r: r["ppl"][stem])]
        lines.append("")
    kept = [r for r in quantized if r.get("path")]
    if kept:
        lines += ["## Models", "", *(f"- {r['method']} {r['bits']}-bit: `{r['path']}`" for r in kept), ""]
    lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
