"""The HTML report of a run: one self-contained page built from the executed notebooks.

Why not nbconvert's HTML exporter: its templates load MathJax and require.js from a CDN, and hospital
research networks are often air-gapped. This page carries everything inline (figures as data URIs, styles
in a ``<style>`` block) and no ``<script src=...>``: it opens from disk with no network. Code is hidden
behind a toggle (``<details>``); stderr (progress bars, warnings) is left to the executed notebooks beside
the page; errors are shown in full, so a failed stage is visible where it failed.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd

from nrfm.eval.claims import verdict_tone
from nrfm.files import atomic_write_text
from nrfm.pipeline.layout import RunLayout

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PATH_REPR = re.compile(r"^(Posix|Windows)?Path\('[^']*'\)$")

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2329;background:#fafbfc}
header{background:#1f3a5f;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header .meta{opacity:.85;font-size:13px;margin-top:6px}
nav{position:fixed;top:0;right:0;width:230px;height:100%;overflow:auto;background:#fff;border-left:1px solid #dde;
padding:70px 14px 14px;font-size:13px;box-sizing:border-box}nav a{display:block;color:#1f3a5f;text-decoration:none;
padding:3px 0}nav a:hover{text-decoration:underline}
main{margin-right:240px;padding:10px 28px 60px;max-width:1150px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:8px 22px 18px;margin:18px 0}
h2{border-bottom:2px solid #1f3a5f;padding-bottom:4px}img{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}th,td{border:1px solid #d7dbe0;padding:3px 7px;
text-align:right}th{background:#eef1f5}td:first-child,th:first-child{text-align:left}
pre{background:#f4f6f8;padding:8px;overflow:auto;font-size:12px;white-space:pre-wrap}
pre.error{background:#fdecea;border-left:4px solid #c0392b;color:#611a15}
.table-box{max-width:100%;max-height:520px;overflow:auto;margin:8px 0}.table-box table{margin:0}
details{margin:6px 0}summary{cursor:pointer;color:#56606b;font-size:12px}
.status-complete{color:#1e7d32}.status-failed,.status-incomplete{color:#c0392b}
.verdict-good{background:#e6f4ea}.verdict-bad{background:#fdecea}
.verdict-neutral{background:#fff8e1}td.verdict-good,td.verdict-bad,td.verdict-neutral{text-align:center}code{background:#f1f3f5;padding:0 3px}
"""


_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$", re.S)


def _math_image(expr: str, display: bool) -> str:
    """TeX rendered by matplotlib's mathtext as inline SVG (no MathJax, no network); code if it cannot."""
    import base64
    import io

    from matplotlib import mathtext

    buffer = io.BytesIO()
    try:
        mathtext.math_to_image(f"${' '.join(expr.split())}$", buffer, format="svg", dpi=100)
    except Exception:  # mathtext covers most but not all of TeX: show the source rather than fail the report
        return f"<code>{html.escape(expr)}</code>"
    data = base64.b64encode(buffer.getvalue()).decode()
    style = "display:block;margin:8px auto" if display else "vertical-align:middle"
    return f"<img class='math' alt='{html.escape(expr)}' style='{style}' src='data:image/svg+xml;base64,{data}'/>"


def _markdown(text: str) -> str:
    """Markdown to HTML, with $...$ and $$...$$ math rendered offline."""
    import mistune

    rendered: list[str] = []

    def keep(match: re.Match) -> str:
        rendered.append(_math_image(match.group(1) or match.group(2), display=match.group(1) is not None))
        return f"MATHPLACEHOLDER{len(rendered) - 1}X"

    body = mistune.html(_MATH.sub(keep, text))
    return re.sub(r"MATHPLACEHOLDER(\d+)X", lambda m: rendered[int(m.group(1))], body)


def _output_html(output: dict[str, Any]) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        if output.get("name") == "stderr":
            return ""  # progress bars and warnings: kept in the executed notebook, not on the report page
        return f"<pre>{html.escape(_ANSI.sub('', output.get('text', '')))}</pre>"
    if kind == "error":
        trace = _ANSI.sub("", "\n".join(output.get("traceback", [])))
        return (f"<pre class='error'><b>{html.escape(output.get('ename', 'Error'))}: "
                f"{html.escape(output.get('evalue', ''))}</b>\n{html.escape(trace)}</pre>")
    data = output.get("data", {})
    if kind == "execute_result" and set(data) == {"text/plain"} and _PATH_REPR.match("".join(data["text/plain"])):
        return ""  # a cell ending in ctx.save_figure(...) echoes the file's path: not content for a reader
    if "image/png" in data:
        return f"<img alt='figure' src='data:image/png;base64,{''.join(data['image/png']).strip()}'/>"
    if "image/svg+xml" in data:
        return "".join(data["image/svg+xml"])
    if "text/html" in data:
        body = "".join(data["text/html"])
        # wide tables (per-site x endpoint) scroll inside their own box instead of widening the page
        return f"<div class='table-box'>{body}</div>" if "<table" in body else body
    if "text/markdown" in data:
        return _markdown("".join(data["text/markdown"]))
    if "text/plain" in data:
        return f"<pre>{html.escape(_ANSI.sub('', ''.join(data['text/plain'])))}</pre>"
    return ""


def notebook_section(path: Path) -> tuple[str, str]:
    """(anchor, HTML) of one executed notebook: narrative, figures and tables; code behind toggles."""
    nb = nbformat.read(str(path), as_version=4)
    anchor = path.stem
    parts = [f"<section id='{anchor}'>"]
    injected = any("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells)
    for cell in nb.cells:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if "remove" in tags or ("parameters" in tags and injected):
            continue  # the defaults cell is shadowed by papermill's injected one: show only the values used
        if cell.cell_type == "markdown":
            parts.append(_markdown(cell.source))
        elif cell.cell_type == "code":
            if cell.source.strip():
                label = ("parameters (as run)" if "injected-parameters" in tags else
                         "parameters" if "parameters" in tags else "code")
                parts.append(f"<details><summary>{label}</summary><pre>{html.escape(cell.source)}</pre></details>")
            parts.extend(_output_html(o) for o in cell.get("outputs", []))
    parts.append(f"<p><small>Executed notebook: <a href='notebooks/{path.name}'>notebooks/{path.name}</a>"
                 "</small></p></section>")
    return anchor, "\n".join(p for p in parts if p)


def _title_of(path: Path) -> str:
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


def _frame_html(frame: pd.DataFrame, classes: str = "") -> str:
    return frame.to_html(index=False, classes=classes, border=0, na_rep="", float_format=lambda v: f"{v:.3f}")


def _fmt(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "" if value is None else html.escape(str(value))
    return "" if not np.isfinite(value) else f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"


def _verdict_html(run_dir: Path) -> str:
    """Grid: one row per claim, comparison (or objective) and, for per-site claims, site; one column per backbone.
    Every row of ``metrics/verdicts.csv`` appears in exactly one cell (a cell lists all rows that share its key),
    with the measured difference, its CI and the Holm-adjusted p; the full table behind a toggle."""
    path = RunLayout(run_dir).metrics("verdicts")
    if not path.is_file():
        return "<p>No verdict table (the summary notebook did not run in this run).</p>"
    frame = pd.read_csv(path)
    if frame.empty:
        return "<p>No claim could be evaluated in this run.</p>"
    for column in ("comparison", "site", "scenario", "adjusted_p", "note", "paper_erm", "paper_dro"):
        if column not in frame:
            frame[column] = np.nan
    per_site = frame["claim"].str.contains("each site", na=False)
    frame["row"] = (frame["claim"].astype(str) + " · " + frame["comparison"].fillna("").astype(str)
                    + np.where(per_site, " · " + frame["site"].astype(str), ""))
    backbones = sorted(frame["backbone"].astype(str).unique())
    scenario = ", ".join(sorted(frame["scenario"].dropna().astype(str).unique())) or "not recorded"
    head = ("<tr><th>claim · comparison</th><th>paper (ERM → DRO)</th>"
            + "".join(f"<th>{html.escape(b)}</th>" for b in backbones) + "</tr>")
    rows = []
    for row_name, part in frame.groupby("row", sort=False):
        first = part.iloc[0]
        paper = (f"{_fmt(first.get('paper_erm'))} → {_fmt(first.get('paper_dro'))}"
                 if pd.notna(first.get("paper_erm")) else "")
        cells = []
        for backbone in backbones:
            match = part[part["backbone"].astype(str) == backbone]
            if match.empty:
                cells.append("<td></td>")
                continue
            items = []
            for _, r in match.iterrows():
                is_cam = str(r.get("metric", "")).startswith("cam")
                detail = (f"enrichment {_fmt(r.get('value'))}" if is_cam else f"Δ {_fmt(r.get('delta'))}")
                if pd.notna(r.get("ci_low")):
                    detail += f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
                if pd.notna(r.get("adjusted_p")):
                    detail += f" · Holm p {float(r['adjusted_p']):.3g}"
                if not per_site.loc[r.name]:
                    detail += f" · site {html.escape(str(r['site']))}"
                items.append(f"<b>{html.escape(str(r['verdict']))}</b><br><small>{detail}</small>")
            r = match.iloc[0]
            css = "verdict-" + verdict_tone(r["verdict"])
            note = f" title='{html.escape(str(r['note']))}'" if isinstance(r.get("note"), str) and r["note"] else ""
            cells.append(f"<td class='{css}'{note}>{'<hr>'.join(items)}</td>")
        rows.append(f"<tr><td>{html.escape(row_name)}</td><td>{paper}</td>{''.join(cells)}</tr>")
    full = frame.drop(columns=["row"]).to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.3g}")
    return (f"<p>Cohort scenario: <b>{html.escape(scenario)}</b>. Decisions: one-sided paired bootstrap tests, "
            "Holm-adjusted over the run's comparisons (rules: <code>nrfm.eval.claims</code>).</p>"
            f"<table>{head}{''.join(rows)}</table><details><summary>all verdict columns (CSV: metrics/verdicts.csv)"
            f"</summary>{full}</details>")


def _provenance_html(record: dict[str, Any]) -> str:
    git = record.get("git", {})
    stages = pd.DataFrame(record.get("stages", []))
    rows = [("run", record.get("run_id")), ("status", record.get("status")),
            ("started", record.get("started")), ("finished", record.get("finished")),
            ("git commit", f"{git.get('commit')} {'(dirty work tree)' if git.get('dirty') else ''}"),
            ("config", record.get("config_source")), ("config sha256", record.get("config_sha256")),
            ("seed", record.get("seed")), ("device", json.dumps(record.get("device"))),
            ("packages", ", ".join(f"{k} {v}" for k, v in (record.get("packages") or {}).items() if v))]
    if record.get("error"):
        rows.append(("error", record["error"]))
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    stage_html = _frame_html(stages) if not stages.empty else ""
    return (f"<table>{table}</table><h3>Wall time per notebook</h3>{stage_html}"
            "<details><summary>resolved config</summary><pre>"
            f"{html.escape(json.dumps(record.get('config'), indent=1))}</pre></details>")


def _metrics_table(run_dir: Path, name: str) -> pd.DataFrame | None:
    """``metrics/<name>.csv`` of a run, or None when it is missing or empty."""
    path = RunLayout(run_dir).metrics(name)
    table = pd.read_csv(path) if path.is_file() else None
    return None if table is None or table.empty else table


def _models_html(run_dir: Path) -> str:
    """The report's first table: every fine-tuned model and baseline against the ceiling (``metrics/ceiling.csv``)."""
    table = _metrics_table(run_dir, "ceiling")
    if table is None:
        return ""
    kind = np.select([table["objective"] == "probe", table["objective"] == "scratch", table["backbone"] == "handcrafted"],
                     ["linear probe (frozen embedding)", "from scratch (random init, fine-tuned)", "handcrafted features"],
                     "fine-tuned")
    shown = pd.DataFrame({"backbone": table["backbone"], "model": kind, "objective": table["objective"],
                          "ceiling fraction [95% CI]": [f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]" for v, lo, hi in
                                                       zip(table["ceiling_fraction"], table["ci_low"], table["ci_high"])],
                          "mean AUC": table["mean_auc"].map(_fmt), "mean bound": table["mean_bound"].map(_fmt),
                          "n test": table["n_test"]})
    shown = shown.sort_values(["backbone", "model", "objective"], kind="stable")
    return ("<section id='models'><h2>Models against the ceiling</h2>"
            "<p>Mean over the binary markers of (AUC − 0.5) / (bound − 0.5) on the pooled test set, where the bound "
            "is the synthetic cohort's oracle on the same subjects (0 = chance, 1 = the bound); CIs resample test "
            "patients. Baselines: a linear probe on each frozen pretrained embedding and a handcrafted-feature "
            f"model.</p><div class='table-box'>{_frame_html(shown)}</div>{_comparisons_html(run_dir)}</section>")


def _comparisons_html(run_dir: Path) -> str:
    table = _metrics_table(run_dir, "baseline_comparisons")
    if table is None:
        return ""
    text = pd.DataFrame({
        "backbone": table["backbone"], "fine-tuned with": table["objective"], "against": table["baseline"],
        "difference in ceiling fraction [95% CI]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                                    for d, lo, hi in zip(table["delta"], table["ci_low"], table["ci_high"])],
        "beats it?": np.where(table["beats"].astype(str).str.lower() == "true", "yes",
                              np.where(table["ci_high"] < 0, "no: worse", "no: not shown"))})
    return ("<h3>Does each fine-tuned model beat its baselines?</h3><p>Paired differences on the same resampled "
            "test patients (fine-tuned minus baseline); yes = the CI lies above 0.</p>"
            f"<div class='table-box'>{_frame_html(text)}</div>")


def render_run_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/index.html`` from run.json, the verdicts and the executed notebooks."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    record = json.loads(layout.run_json.read_text(encoding="utf-8"))
    notebooks = [layout.executed_notebook(name) for name in record.get("notebooks", [])]
    notebooks = [nb for nb in notebooks if nb.is_file()]
    models = _models_html(run_dir)
    sections, nav = [], (["<a href='#models'>Models and ceiling</a>"] if models else []) + ["<a href='#verdicts'>Verdicts</a>"]
    for nb in notebooks:
        anchor, body = notebook_section(nb)
        sections.append(body)
        nav.append(f"<a href='#{anchor}'>{html.escape(_title_of(nb))}</a>")
    nav.append("<a href='#provenance'>Provenance</a>")
    status = record.get("status", "incomplete")
    title = (record.get("config") or {}).get("report", {}).get("title", "nrfm run")
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)} · {html.escape(record.get('run_id', ''))}</title><style>{STYLE}</style></head><body>
<header><h1>{html.escape(title)}</h1><div class="meta">run {html.escape(record.get('run_id', ''))} ·
status <b class="status-{status}">{status}</b> · started {record.get('started')} · config
{html.escape(str(record.get('config_source')))} · seed {record.get('seed')} · git
{html.escape(str((record.get('git') or {}).get('commit') or 'n/a'))[:12]}</div></header>
<nav>{''.join(nav)}<hr><a href="../index.html">All runs</a></nav><main>{models}
<section id="verdicts"><h2>Verdicts: does this run reproduce the paper's claims?</h2>{_verdict_html(run_dir)}
<p><small>Each verdict is computed from this run's metrics by <code>nrfm.eval.claims</code>; the paper's numbers are
quoted from Bhattacharya et al. (arXiv 2509.15416) for comparison and are not measured here.</small></p></section>
{''.join(sections)}
<section id="provenance"><h2>Provenance</h2>{_provenance_html(record)}</section></main></body></html>"""
    return atomic_write_text(layout.report_html, page)


def _headline(run_dir: Path) -> str:
    path = RunLayout(run_dir).metrics("molecular")
    if not path.is_file():
        return ""
    frame = pd.read_csv(path)
    pooled = frame[(frame.get("protocol") == "pooled") & (frame.get("site") == "worst")]
    if pooled.empty or "auc" not in pooled:
        return ""
    means = pooled.groupby("objective")["auc"].mean()
    return ", ".join(f"{obj} {value:.3f}" for obj, value in means.items())


def render_index(reports_root: Path) -> Path:
    """Write ``reports/index.html`` listing every run with date, config, status and a headline number."""
    reports_root = Path(reports_root)
    rows = []
    for run_json in sorted(reports_root.glob("*/run.json"), reverse=True):
        try:
            record = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        run_dir = run_json.parent
        status = record.get("status", "?")
        rows.append(f"<tr><td><a href='{run_dir.name}/index.html'>{html.escape(run_dir.name)}</a></td>"
                    f"<td>{html.escape(str(record.get('started')))}</td>"
                    f"<td>{html.escape(str(record.get('config_source')))}</td><td>{record.get('seed')}</td>"
                    f"<td class='status-{status}'>{status}</td><td>{html.escape(_headline(run_dir))}</td></tr>")
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>nrfm runs</title>
<style>{STYLE}</style></head><body><header><h1>nrfm runs</h1></header><main style="margin-right:0">
<section><table><tr><th>run</th><th>started</th><th>config</th><th>seed</th><th>status</th>
<th>mean worst-site AUC (pooled), per objective</th></tr>{''.join(rows)}</table></section></main></body></html>"""
    return atomic_write_text(reports_root / "index.html", page)


def render_sweep_report(sweep_dir: Path) -> Path:
    """Render a sweep's page: its summary notebook (executed by the runner) and links to the child runs."""
    children = sorted(p.parent.name for p in (sweep_dir / "runs").glob("*/run.json"))
    links = "".join(f"<li><a href='runs/{c}/index.html'>{html.escape(c)}</a></li>" for c in children)
    report = render_run_report(sweep_dir)
    text = report.read_text(encoding="utf-8").replace(
        "<section id=\"verdicts\">", f"<section><h2>Runs in this sweep</h2><ul>{links}</ul></section>"
                                    "<section id=\"verdicts\">", 1)
    atomic_write_text(report, text)
    render_index(sweep_dir.parent)
    return report
