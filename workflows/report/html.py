"""The morning report: one self-contained HTML page (figures embedded as PNG) plus the same figures as JSON.

Input is a `ReportData` (`report/data.py`):

- per-model table: wall time, speedup, passes, max error vs sequential and FID of each sampler;
- speedup vs batch size (when measured): sequential vs the auto plan at each, and the one-pass bound;
- per-block: CRM share and IGM (z vs zeros) bars, the chosen solver and its iterations;
- convergence: Jacobi residual per iteration for each block;
- history: speedup and FID over time;
- sample grids: sequential and each plan on the same noise, side by side.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from matplotlib.dates import ConciseDateFormatter
from matplotlib.figure import Figure

from tarflow.schedule import MIN_GAIN

from ..fidelity.registry import NOISE_SIGMAS
from ..storage.files import Store, write_below
from .data import ModelResult, ReportData

SECTIONS = ("summary", "blocks", "convergence", "history", "samples")  # on every page; "scaling" where measured


# ---- figures: each is a JSON-able spec, drawn with matplotlib, embedded as PNG --------------------------------


def _figure_specs(data: ReportData) -> list[dict]:
    specs = []
    for m in data.models:
        if m.scaling:
            specs.append({"id": f"scaling-{m.name}", "section": "scaling",
                          "title": f"{m.name}: speedup over sequential vs batch size ({m.device})",
                          "batch_size": [p.batch_size for p in m.scaling], "speedup": [p.speedup for p in m.scaling],
                          "bound": [p.bound_speedup for p in m.scaling],
                          "fallback": [p.fallback is not None for p in m.scaling]})
        if m.blocks:
            specs.append({
                "id": f"blocks-{m.name}", "section": "blocks", "title": f"{m.name}: per-block metrics and plan",
                "x": [b.block for b in m.blocks], "x_label": "block (forward index; the last is sampled first)",
                "crm_share": [b.crm_share for b in m.blocks],
                "igm_z": [b.igm_z for b in m.blocks], "igm_zeros": [b.igm_zeros for b in m.blocks],
                "labels": [f"{b.solver} L={b.segment_len}\n{b.iterations:.1f} it/seg" for b in m.blocks],
            })
        if m.convergence:
            specs.append({"id": f"convergence-{m.name}", "section": "convergence",
                          "title": f"{m.name}: Jacobi convergence per block",
                          "x_label": "iteration", "y_label": "max |x_k - x_(k-1)| (model space)",
                          "series": [asdict(c) for c in m.convergence]})
    if data.history:
        models = sorted({h.model for h in data.history})
        series = {}
        for name in models:
            points = sorted((h for h in data.history if h.model == name), key=lambda h: h.timestamp)
            for plan in sorted({p.plan for p in points}):
                pts = [p for p in points if p.plan == plan]
                series[f"{name} / {plan}"] = {"t": [p.timestamp for p in pts], "speedup": [p.speedup for p in pts],
                                              "fid": [p.fid_plan for p in pts],
                                              "fid_sequential": [p.fid_sequential for p in pts]}
        specs.append({"id": "history", "section": "history", "title": "speedup and FID over time",
                      "series": series})
    return specs


def _draw(spec: dict) -> Figure:
    if spec["section"] == "blocks":
        fig = Figure(figsize=(10, 3.6), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        x = np.arange(len(spec["x"]))
        shares = [s if s is not None else 0.0 for s in spec["crm_share"]]
        bars = ax1.bar(x, [100 * s for s in shares], color="#4c72b0")
        for bar, label in zip(bars, spec["labels"]):
            ax1.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                         fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax1.set(xticks=x, xticklabels=spec["x"], xlabel=spec["x_label"], ylabel="CRM share (%)",
                title="CRM share, chosen solver, iterations per segment")
        ax1.set_ylim(0, max(100 * max(shares, default=0) * 1.35, 1))
        w = 0.38
        z = [v if v is not None else np.nan for v in spec["igm_z"]]
        zeros = [v if v is not None else np.nan for v in spec["igm_zeros"]]
        ax2.bar(x - w / 2, z, w, label="init z", color="#55a868")
        ax2.bar(x + w / 2, zeros, w, label="init zeros", color="#c44e52")
        ax2.set(xticks=x, xticklabels=spec["x"], xlabel=spec["x_label"], ylabel="IGM (lower is better)",
                title="IGM of the two initial guesses")
        if np.nanmax(z + zeros + [0]) > 0:
            ax2.set_yscale("log")
        ax2.legend(fontsize=8)
        fig.suptitle(spec["title"])
        return fig
    if spec["section"] == "scaling":
        fig = Figure(figsize=(6.5, 3.6), layout="constrained")
        ax = fig.subplots()
        x = spec["batch_size"]
        ax.plot(x, spec["bound"], marker="x", linestyle="--", color="grey", label="one pass per block (bound)")
        ax.plot(x, spec["speedup"], marker="o", label="auto plan (measured)")
        fell = [(b, s) for b, s, f in zip(x, spec["speedup"], spec["fallback"]) if f]
        if fell:
            ax.plot(*zip(*fell), "o", mfc="white", color="#c44e52", label="scheduler fell back to sequential")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(x, [str(b) for b in x])
        ax.set(xlabel="batch size", ylabel="speedup over sequential (x)", title=spec["title"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return fig
    if spec["section"] == "convergence":
        fig = Figure(figsize=(6.5, 3.6), layout="constrained")
        ax = fig.subplots()
        for s in spec["series"]:
            values = [max(v, 1e-12) for v in s["values"]]
            ax.semilogy(range(1, len(values) + 1), values, marker=".", label=s["label"])
        ax.set(xlabel=spec["x_label"], ylabel=spec["y_label"], title=spec["title"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return fig
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for label, s in spec["series"].items():
        t = [datetime.fromisoformat(v.replace("Z", "+00:00")) for v in s["t"]]
        ax1.plot(t, s["speedup"], marker="o", label=label)
        if any(v is not None for v in s["fid"]):
            ax2.plot(t, [np.nan if v is None else v for v in s["fid"]], marker="o", label=f"{label}")
        if any(v is not None for v in s["fid_sequential"]):
            ax2.plot(t, [np.nan if v is None else v for v in s["fid_sequential"]], marker="x", linestyle="--",
                     label=f"{label.split(' / ')[0]} / sequential")
    times = [datetime.fromisoformat(v.replace("Z", "+00:00")) for s in spec["series"].values() for v in s["t"]]
    if times and max(times) - min(times) < timedelta(days=1):  # one night: a one-day axis, not matplotlib's years
        for ax in (ax1, ax2):
            ax.set_xlim(min(times) - timedelta(hours=12), max(times) + timedelta(hours=12))
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(ylabel="speedup over sequential (x)", title="speedup")
    ax2.set(ylabel="FID (lower is better)", title="FID")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(ax.xaxis.get_major_locator()))
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(spec["title"])
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def draw_figures(data: ReportData) -> tuple[list[dict], dict[str, bytes]]:
    """(figure specs, {figure id: PNG}) of a report: what its page embeds and `write_report` also saves."""
    specs = _figure_specs(data)
    return specs, {s["id"]: _png(_draw(s)) for s in specs}


PAYS = 1 / (1 - MIN_GAIN)  # the speedup at which the scheduler keeps a parallel plan rather than sequential


def where_plans_pay(m: ModelResult) -> str | None:
    """One sentence from the speedup-vs-batch-size points: at which batch sizes the auto plan beat
    sequential sampling on the hardware that measured them (None: not measured)."""
    if not m.scaling:
        return None
    pays = [p for p in m.scaling if p.fallback is None and p.speedup >= PAYS]
    rest = [p for p in m.scaling if p not in pays]

    def points(ps):
        return ", ".join(f"{p.batch_size} ({p.speedup:.2f}x)" for p in ps)

    if not pays:
        return (f"{m.name} on {m.device}: plans do not pay at any batch size measured ({points(rest)}); "
                "sampling stays sequential.")
    where = f"{m.name} on {m.device}: the auto plan pays at batch size {points(pays)} over sequential sampling"
    return where + (f", not at {points(rest)}, where it stays sequential." if rest else ".")


# ---- HTML ------------------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.muted{color:#777}
img{max-width:100%}.grids{display:flex;gap:16px;flex-wrap:wrap}.grids figure{margin:0}
figcaption{text-align:center;font-size:.9em}"""


def _fmt(value, spec: str = ".3g", empty: str = "-") -> str:
    return empty if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _summary_table(data: ReportData) -> str:
    rows = []
    for m in data.models:
        for r in m.runs:
            rows.append(f"<tr><td>{html.escape(m.name)}</td><td>{html.escape(r.plan)}</td>"
                        f"<td>{r.seconds:.3f}</td><td>{r.speedup:.2f}x</td><td>{r.passes}</td>"
                        f"<td>{_fmt(r.max_abs_error, '.1e')}</td><td>{r.fallbacks}</td><td>{_fmt(r.fid, '.3f')}</td>"
                        f"<td>{html.escape(', '.join(f'{k} {v:.4g}' for k, v in sorted(r.metrics.items())) or '-')}"
                        "</td></tr>")
    head = ("<tr><th>model</th><th>sampler</th><th>wall time (s)</th><th>speedup</th><th>network passes</th>"
            "<th>max |error| vs sequential</th><th>fallbacks</th><th>FID</th><th>other metrics (same pass)</th></tr>")
    extra = "".join(f"<li>{html.escape(m.name)}: {m.device}, batch {m.batch_size}, model {m.model_hash}; FID with "
                    f"<code>{html.escape(m.fid_extractor or '-')}</code> on {m.fid_num_samples} samples</li>"
                    for m in data.models)
    paired = [_quality_table(m) for m in data.models if m.fid_difference is not None]
    return (f'<table id="summary-table">{head}{"".join(rows)}</table><ul class="muted">{extra}</ul>'
            + "".join(paired))


def _quality_table(m: ModelResult) -> str:
    """What the paper's table shows: sequential and the plan side by side, speed and FID over the same sample
    ids, and the difference with its uncertainty (`fidelity.paired`)."""
    d, seq, planned = m.fid_difference, m.runs[0], m.runs[1]
    table = _captioned_table(
        "quality-table", f"{m.name}: sequential vs {planned.plan}, FID over the same {d.sample_count} sample ids",
        ["sampler", "wall time (s)", "speedup", "FID +- standard error"],
        [[html.escape(seq.plan), f"{seq.seconds:.3f}", "1.00x", f"{d.fid_sequential:.4f} +- {d.sequential_se:.4f}"],
         [html.escape(planned.plan), f"{planned.seconds:.3f}", f"{planned.speedup:.2f}x",
          f"{d.fid_plan:.4f} +- {d.plan_se:.4f}"],
         ["plan - sequential", "", "", f"{d.difference:+.4f} +- {d.difference_se:.4f}"]])
    verdict = "within" if d.within_noise() else "beyond"
    same = (" The two sets hold the same images (the plan samples as sequential does here): the difference is "
            "exactly 0." if d.difference == 0 and d.difference_se == 0 else "")
    return (table + f'<p class="muted">Standard errors by the jackknife over {d.groups} blocks of consecutive sample '
            "ids, the same blocks on both sides, so the difference's error is paired. The plan's FID is "
            f"{verdict} {NOISE_SIGMAS:g} standard errors of sequential's ({NOISE_SIGMAS * d.sequential_se:.4f}): "
            f"the FID's own sampling noise at {d.sample_count} samples ({html.escape(d.extractor)}).{same}</p>")


def _captioned_table(css_class: str, caption: str, headers: list[str], rows: list[list]) -> str:
    """A table of already formatted (and escaped) cells under a caption."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><caption>{html.escape(caption)}</caption>{head}{body}</table>'


def _block_table(m: ModelResult) -> str:
    return _captioned_table(
        "blocks-table", m.name,
        ["block", "solver", "segment", "init", "iterations / segment", "passes", "CRM share", "IGM z", "IGM zeros"],
        [[b.block, b.solver, b.segment_len, b.init, f"{b.iterations:.1f}", b.passes,
          f"{_fmt(None if b.crm_share is None else 100 * b.crm_share, '.1f')}%", _fmt(b.igm_z), _fmt(b.igm_zeros)]
         for b in m.blocks])


def _scaling_table(m: ModelResult) -> str:
    return _captioned_table(
        "scaling-table", f"{m.name} on {m.device}",
        ["batch", "sequential s / image", "plan s / image", "speedup", "bound", "plan (by forward block)",
         "fell back?", "max |error| vs sequential"],
        [[p.batch_size, f"{p.sequential_seconds:.4f}", f"{p.plan_seconds:.4f}", f"{p.speedup:.2f}x",
          f"{p.bound_speedup:.2f}x", html.escape(p.plan), html.escape(p.fallback or "no"),
          _fmt(p.max_abs_error, ".1e")] for p in m.scaling])


def render_html(data: ReportData, drawn: tuple[list[dict], dict[str, bytes]] | None = None) -> tuple[str, dict]:
    """(HTML page, figures JSON) of a report; every image is inline, so the page is one file. `drawn`: the
    figures already drawn (`draw_figures`)."""
    specs, images = drawn or draw_figures(data)

    def figures(section: str) -> str:
        return "".join(f'<figure id="{s["id"]}"><img alt="{html.escape(s["title"])}" '
                       f'src="data:image/png;base64,{base64.b64encode(images[s["id"]]).decode()}"></figure>'
                       for s in specs if s["section"] == section) or '<p class="muted">no data</p>'

    grids = []
    for m in data.models:
        cells = "".join(f'<figure><img class="grid" alt="{html.escape(r.plan)}" src="data:image/png;base64,{r.grid_png}">'
                        f"<figcaption>{html.escape(r.plan)}</figcaption></figure>" for r in m.runs if r.grid_png)
        if cells:
            grids.append(f"<h3>{html.escape(m.name)}</h3><div class=\"grids\">{cells}</div>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    headlines = "".join(f"<p><strong>{html.escape(line)}</strong></p>" for line in map(where_plans_pay, data.models)
                        if line)
    body = [
        f"<h1>{html.escape(data.title)}</h1><p class=\"muted\">{html.escape(data.created)}</p>", headlines,
        f"<ul>{notes}</ul>" if notes else "",
        '<h2 id="summary">Speedup and FID against sequential sampling</h2>', _summary_table(data),
        *(['<h2 id="scaling">Speedup vs batch size</h2>',
           '<p>The auto plan scheduled for each batch size against sequential sampling on one batch of the same '
           "noise, on this hardware; the bound is one parallel pass per block. A parallel pass costs about as much "
           "as many sequential steps once the batch fills the device, so plans pay at small batch and, on a CPU, "
           "fall back to sequential at large batch.</p>",
           "".join(_scaling_table(m) for m in data.models if m.scaling), figures("scaling")]
          if any(m.scaling for m in data.models) else []),
        '<h2 id="blocks">Per block: CRM / IGM, chosen solver, iterations</h2>',
        "".join(_block_table(m) for m in data.models if m.blocks), figures("blocks"),
        '<h2 id="convergence">Convergence</h2>', figures("convergence"),
        '<h2 id="history">Speedup and FID over time</h2>', figures("history"),
        '<h2 id="samples">Samples on the same noise: sequential vs plan</h2>',
        "".join(grids) or '<p class="muted">no data</p>',
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(data.title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    return page, {"title": data.title, "created": data.created, "figures": specs}


def report_files(data: ReportData, drawn: tuple[list[dict], dict[str, bytes]] | None = None) -> dict[str, str]:
    """{file name: text} of a report: report.html, report.json (figures) and report-data.json (the input).
    report.html comes last, so a writer that stops early never leaves a page without its data."""
    page, figures = render_html(data, drawn)
    return {"report-data.json": data.to_json(), "report.json": json.dumps(figures, indent=2), "report.html": page}


def write_report(data: ReportData, out_dir) -> tuple[Path, Path]:
    """Write the report's files into a local directory, and every figure and sample grid as a PNG under
    `figures/` (for slides and READMEs); returns (report.html, report.json)."""
    out_dir = Path(out_dir)
    store = Store(str(out_dir))  # atomic writes that stay inside out_dir (no link is written through)
    drawn = draw_figures(data)
    for name, text in report_files(data, drawn).items():
        store.write_text(name, text)
    pngs = {f"{figure_id}.png": png for figure_id, png in drawn[1].items()}
    pngs.update({f"samples-{m.name}-{r.plan}.png": base64.b64decode(r.grid_png)
                 for m in data.models for r in m.runs if r.grid_png})
    for name, png in pngs.items():
        write_below(store.fs, store.base, f"figures/{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}", png)
    return out_dir / "report.html", out_dir / "report.json"
