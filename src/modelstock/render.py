"""An `Inspection` as text for the terminal, CSV, JSON, and one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from .geometry import KIND_LABELS, Inspection, KindSummary, LayerGeometry
from .report import LayerReport

SHORT_TABLE_ROWS = 40  # longer models print their first and last rows unless asked for all
HEAD_ROWS, TAIL_ROWS = 20, 10
NAME_WIDTH = 56


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _cut(name: str, width: int = NAME_WIDTH) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _norms(g: LayerGeometry) -> str:
    xs = g.layer.norms
    if not xs:
        return "-"
    if len(xs) <= 3:
        return ", ".join(f"{x:.3g}" for x in xs)
    return f"{statistics.fmean(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"


def _angles(g: LayerGeometry) -> str:
    a = g.pair_angles
    if g.layer.angle_deg is None:
        return "-"
    if len(a) <= 1:
        return f"{g.layer.angle_deg:.1f}"
    return f"{g.layer.angle_deg:.1f} [{min(a):.1f}-{max(a):.1f}]"


def layer_row(g: LayerGeometry) -> list[str]:
    rel = g.relative_norms
    rule = g.layer.rule if g.changed and all(g.changed) or not g.measured else \
        f"{g.layer.rule}*"
    return [_cut(g.name), g.kind, _count(g.layer.numel), _norms(g),
            "-" if rel is None else f"{statistics.fmean(rel):.3g}", _angles(g),
            _num(g.layer.t, ".3f"), rule]


LAYER_HEADER = ["layer", "kind", "numel", "|w_i - w0|", "rel", "angle", "t", "rule"]
KIND_HEADER = ["kind", "layers", "params", "angle mean [min-max]", "spread", "t median",
               "rel median"]


def kind_row(s: KindSummary) -> list[str]:
    angle = "-" if s.angle_mean is None else \
        f"{s.angle_mean:.1f} [{s.angle_min:.1f}-{s.angle_max:.1f}]"
    return [KIND_LABELS[s.kind], str(s.layers), _count(s.params), angle,
            _num(s.spread_mean, ".1f"), _num(s.t_median, ".3f"), _num(s.rel_norm_median)]


def kind_table(insp: Inspection) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary by kind (no spread column for a single pair)."""
    keep = [i for i, h in enumerate(KIND_HEADER) if insp.n_models > 2 or h != "spread"]
    rows = [kind_row(s) for s in insp.by_kind()]
    return [KIND_HEADER[i] for i in keep], [[r[i] for i in keep] for r in rows]


def _grid(header: list[str], rows: Sequence[list[str]], numeric_from: int = 2) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [c.ljust(w) if i < numeric_from else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]


def text(insp: Inspection, full: bool = False) -> str:
    """The terminal report: per-layer table (first and last rows of a long model unless
    ``full``), summary by layer kind, findings."""
    n = insp.n_models
    out = [f"anchor  {insp.anchor}",
           *(f"model {i + 1} {m}" for i, m in enumerate(insp.models)),
           ""]
    rows = [layer_row(g) for g in insp.layers]
    grid = _grid(LAYER_HEADER, rows, numeric_from=2)
    if full or len(rows) <= SHORT_TABLE_ROWS:
        out += grid
    else:
        hidden = len(rows) - HEAD_ROWS - TAIL_ROWS
        out += grid[: 2 + HEAD_ROWS]
        out.append(f"... {hidden} more layers (--all prints every layer; --csv/--json save "
                   "them) ...")
        out += grid[-TAIL_ROWS:]
    out += ["",
            f"|w_i - w0|: task-vector norm per fine-tune{'' if n <= 3 else ' (mean [min-max])'}; "
            "rel: mean |w_i - w0| / |w0|; angle: degrees between task vectors"
            + ("" if n == 2 else " (mean of cosines [min-max over pairs])")
            + "; t: the merge's ratio; rule* = not every fine-tune moved this layer", "",
            "By layer kind (angles over layers that every fine-tune moved"
            + ("" if n == 2 else "; spread: mean of max-min pair angle") + "):"]
    out += _grid(*kind_table(insp), numeric_from=1)
    out.append("")
    if not insp.findings:
        out.append("no findings: the geometry looks like fine-tunes of this anchor")
    out += [f"{f.level}: {f.message}" for f in insp.findings]
    return "\n".join(out)


CSV_FIELDS = [*LayerReport.__dataclass_fields__, "kind", "anchor_norm"]


def to_csv(insp: Inspection) -> str:
    """One row per layer; the columns of ``modelstock_report.json``'s layers plus ``kind`` and
    ``anchor_norm`` (lists as JSON)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for g in insp.layers:
        row = g.to_dict()
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return buf.getvalue()


def to_json(insp: Inspection) -> str:
    return json.dumps(insp.to_dict(), indent=1)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}
th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f3f3f3;position:sticky;top:0}
td:first-child,th:first-child{text-align:left;font-family:monospace}
tr.flag td{background:#fff3e0}
li.warning{color:#a33} li.info{color:#555}
img{max-width:100%} code{font-size:12px}
"""


def _table(header: list[str], rows: Sequence[list[str]], flags: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = ' class="flag"' if i < len(flags) and flags[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def to_html(insp: Inspection, png: bytes | None = None) -> str:
    """One page, no external resources: findings, summary by kind, plots, every layer."""
    flagged = {name for f in insp.findings if f.level == "warning" for name in f.layers
               if f.code not in ("orthogonal_everywhere", "far_from_anchor")}
    models = "".join(f"<li>model {i + 1}: <code>{html.escape(m)}</code></li>"
                     for i, m in enumerate(insp.models))
    findings = "".join(f'<li class="{f.level}">{f.level}: {html.escape(f.message)}</li>'
                       for f in insp.findings) or "<li>no findings</li>"
    plot = "" if png is None else (
        f'<h2>Per layer</h2><img alt="angle, t and norms per layer" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    rows = [[g.name, *layer_row(g)[1:], g.layer.note or ""] for g in insp.layers]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelstock inspect</title>
<style>{_CSS}</style></head><body>
<h1>modelstock inspect</h1>
<ul><li>anchor: <code>{html.escape(insp.anchor)}</code></li>{models}</ul>
<h2>Findings</h2><ul>{findings}</ul>
<h2>By layer kind</h2>
{_table(*kind_table(insp))}
{plot}
<h2>Layers</h2>
<p>|w_i - w0|: task-vector norm per fine-tune; rel: mean |w_i - w0| / |w0|; angle: degrees
between task vectors (mean of cosines, [min-max over pairs]); t: the ratio a merge uses.</p>
{_table([*LAYER_HEADER, "note"], rows, [g.name in flagged for g in insp.layers])}
</body></html>
"""


def write_outputs(insp: Inspection, *, json_path: str | os.PathLike | None = None,
                  csv_path: str | os.PathLike | None = None,
                  plot_path: str | os.PathLike | None = None,
                  html_path: str | os.PathLike | None = None) -> None:
    """Write whichever of the JSON, CSV, PNG and HTML reports were asked for."""
    if json_path:
        Path(json_path).write_text(to_json(insp) + "\n")
    if csv_path:
        Path(csv_path).write_text(to_csv(insp))
    if plot_path or html_path:
        from .plots import png_bytes

        png = png_bytes(insp)
        if plot_path:
            Path(plot_path).write_bytes(png)
        if html_path:
            Path(html_path).write_text(to_html(insp, png), encoding="utf-8")
