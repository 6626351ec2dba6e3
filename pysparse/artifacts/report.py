"""Compile reports: what a compiled model is, how it was made and how well it does.

Every artifact holds three files made from one record:
  * ``report.json``  the data: the model, each pass (settings, time, facts), per-linear weight
                     sparsity and 2:4 mask statistics, the learning passes' curves (loss,
                     sparsity, lambda over training; thinned to <= 200 points), the FATReLU
                     threshold sweep, and once measured the held-out quality against the dense
                     original and the speed-up on this machine,
  * ``report.md``    the same as tables,
  * ``report.html``  one self-contained page (no scripts or fonts fetched; the plots are inline
                     SVG drawn here, no plotting library needed).
``pysparse.save`` writes them from the compiled model (``collect``); ``pysparse compile`` adds its
closing evaluation, and ``pysparse report DIR`` measures quality and speed again on this machine
and rewrites them (``rewrite``; the manifest's checksums are updated with them).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pysparse.artifacts.layout import MANIFEST
from pysparse.kernels.extension import build_info
from pysparse.kernels.formats import dense_weight
from pysparse.util.files import atomic_write, sha256_file

REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
REPORT_FILES = (REPORT_JSON, REPORT_MD, REPORT_HTML)

# the six ways to keep two of four weights, as kept positions (bit i: position i of the group)
PATTERNS = ("1100", "1010", "1001", "0110", "0101", "0011")
_HIDDEN = ("pass", "settings", "modified", "seconds", "curve", "threshold_sweep")
_LAYER = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")


def pass_facts(entry: dict[str, Any]) -> dict[str, Any]:
    """A pass report's facts for one line of text (no settings, curves or sweep tables)."""
    return {k: v for k, v in entry.items() if k not in _HIDDEN}


def weight_stats(weight: torch.Tensor) -> dict[str, Any]:
    """Zeros of a dense ``[out, in]`` weight, whether it is 2:4 along ``in``, and how often each
    of the six 2-of-4 patterns occurs among its groups (``PATTERNS``) when it is."""
    w = weight.detach()
    zeros = (w == 0).float().mean().item()
    out: dict[str, Any] = {"shape": list(w.shape), "zeros": round(zeros, 4), "is_24": False}
    if w.dim() != 2 or not w.numel():
        return out
    # groups along in_features (every mask pass's default), else along out_features (a down
    # projection masked along d_model)
    for axis, m in (("in", w), ("out", w.T)):
        if m.shape[1] % 4:
            continue
        kept = (m != 0).reshape(-1, 4)
        if bool((kept.sum(1) <= 2).all()):
            code = (kept.to(torch.int64) * torch.tensor([1, 2, 4, 8])).sum(1)
            counts = torch.bincount(code, minlength=16)
            patterns = [
                int(counts[sum(1 << i for i, c in enumerate(p) if c == "1")]) for p in PATTERNS
            ]
            out.update(
                is_24=True,
                axis=axis,
                patterns=patterns,
                groups_fewer_than_2=int(kept.shape[0] - sum(patterns)),
            )
            break
    return out


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(f".{name}.")
    return int(m.group(1)) if m else None


def collect(sm: Any) -> dict[str, Any]:
    """The report record of a compiled model (``pysparse.compile``'s result): everything that
    needs no evaluation. Linears whose weights were packed 2:4 or re-laid-out by lowering are
    read back dense (``formats.dense_weight``)."""
    gm = sm.gm
    meta = gm.meta.get("pysparse", {})
    layouts = meta.get("weight_layouts", {})
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    rows = []
    seen: set[str] = set()
    for info in meta.get("linears", {}).values():
        name = info.get("weight")
        if not name or name in seen:
            continue
        seen.add(name)
        w = dense_weight(tensors, name, layouts)
        if w is None or w.dim() != 2:
            continue
        rows.append(
            {
                "weight": name,
                "role": info.get("role"),
                "layer": info.get("layer") if info.get("layer") is not None else _layer_of(name),
                "stored": layouts.get(name, {}).get("layout", "dense"),
                **weight_stats(w),
            }
        )
    report = json.loads(json.dumps(sm.report, default=str))
    return {
        "format": "pysparse-report",
        "version": 1,
        "model": meta.get("model", {}),
        "passes": report,
        "linears": rows,
        "quality": None,
        "speed": [],
        "machine": None,
    }


def add_evaluation(
    data: dict[str, Any], quality: dict[str, Any] | None, speeds: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Adds a held-out evaluation (``evaluate.evaluate``) and speed rows (``evaluate.speedup``)
    measured on this machine to a report record."""
    info = build_info()
    cpu = info.get("cpu", {})
    data["quality"] = quality
    data["speed"] = list(speeds)
    data["machine"] = {
        "cpu": cpu.get("model"),
        "linear_kernel": cpu.get("linear_impl"),
        "ffn_kernel": cpu.get("ffn_impl"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return data


# ---------------------------------------------------------------------------------------------
# SVG plots (inline, no dependencies)

_COLORS = ("#3465a4", "#cc0000", "#4e9a06", "#f57900", "#75507b", "#c4a000")
_W, _H, _L, _R, _T, _B = 640, 240, 56, 16, 28, 40


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _frame(title: str, kind: str, ylo: float, yhi: float, percent: bool) -> tuple[list[str], Any]:
    ph = _H - _T - _B

    def y(v: float) -> float:
        return _T + ph * (1 - (v - ylo) / ((yhi - ylo) or 1.0))

    parts = [
        (
            f'<svg class="plot" data-kind="{kind}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
            f'aria-label="{html.escape(title)}">'
        ),
        f'<text x="{_W / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>',
    ]
    for t in _ticks(ylo, yhi):
        label = f"{t:.0%}" if percent else _fmt(t)
        parts.append(
            f'<line x1="{_L}" x2="{_W - _R}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
            f'<text x="{_L - 4}" y="{y(t) + 4:.1f}" text-anchor="end" class="tick">{label}</text>'
        )
    parts.append(
        f'<line x1="{_L}" x2="{_W - _R}" y1="{_T + ph}" y2="{_T + ph}" class="axis"/>'
        f'<line x1="{_L}" x2="{_L}" y1="{_T}" y2="{_T + ph}" class="axis"/>'
    )
    return parts, y


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    percent: bool = True,
    ymax: float | None = None,
) -> str:
    """Grouped bars, one group per label, one bar per series (values >= 0)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    hi = ymax if ymax is not None else max(values + [1e-9]) * 1.1
    parts, y = _frame(title, "bar", 0.0, hi, percent)
    n, k = max(len(labels), 1), max(len(series), 1)
    pw = _W - _L - _R
    slot = pw / n
    bw = slot * 0.8 / k
    for j, (name, vs) in enumerate(series.items()):
        for i, v in enumerate(vs):
            if v is None:
                continue
            x = _L + i * slot + slot * 0.1 + j * bw
            top = y(min(v, hi))
            label = f"{labels[i]} {name}: {v:.1%}" if percent else f"{labels[i]} {name}: {_fmt(v)}"
            parts.append(
                f'<rect class="mark" x="{x:.1f}" y="{top:.1f}" width="{max(bw - 1, 1):.1f}" '
                f'height="{_T + (_H - _T - _B) - top:.1f}" fill="{_COLORS[j % len(_COLORS)]}">'
                f"<title>{html.escape(label)}</title></rect>"
            )
    step = max(1, math.ceil(n / 24))
    for i in range(0, len(labels), step):
        parts.append(_tick_below(_L + (i + 0.5) * slot, str(labels[i])))
    return _close(parts, series)


def line_chart(
    title: str,
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    percent: bool = False,
) -> str:
    """Lines over a shared x axis (e.g. training steps)."""
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = (0.0 if lo >= 0 and lo - pad < 0 else lo - pad), hi + pad
    parts, y = _frame(title, "line", lo, hi, percent)
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pw = _W - _L - _R

    def x(v: float) -> float:
        return _L + pw * (v - xlo) / ((xhi - xlo) or 1.0)

    for j, (name, vs) in enumerate(series.items()):
        pts = [
            f"{x(a):.1f},{y(b):.1f}"
            for a, b in zip(xs, vs, strict=False)
            if b is not None and math.isfinite(b)
        ]
        if pts:
            parts.append(
                f'<polyline class="mark" fill="none" stroke-width="2" '
                f'stroke="{_COLORS[j % len(_COLORS)]}" points="{" ".join(pts)}">'
                f"<title>{html.escape(name)}</title></polyline>"
            )
    xticks = _ticks(xlo, xhi, 6)
    if all(float(v).is_integer() for v in xs):  # steps: no ticks between them
        xticks = [t for t in xticks if float(t).is_integer()]
    for t in xticks:
        parts.append(_tick_below(x(t), _fmt(t)))
    parts.append(_tick_below(_L + pw / 2, xlabel, _H - 6))
    return _close(parts, series)


def _tick_below(x: float, text: str, y: float = _H - _B + 14) -> str:
    return f'<text x="{x:.1f}" y="{y}" text-anchor="middle" class="tick">{html.escape(text)}</text>'


def _close(parts: list[str], series: dict) -> str:
    """Ends a plot: the legend when there is more than one series, then the closing tag."""
    if len(series) > 1:
        parts.append(_legend(list(series)))
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: list[str]) -> str:
    out = []
    for j, name in enumerate(names):
        x = _W - _R - 150
        yy = _T + 4 + 14 * j
        out.append(
            f'<rect x="{x}" y="{yy}" width="10" height="10" fill="{_COLORS[j % len(_COLORS)]}"/>'
            f'<text x="{x + 14}" y="{yy + 9}" class="tick">{html.escape(name)}</text>'
        )
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Rendering


def _per_layer(rows: list[dict], key: str) -> tuple[list[str], dict[str, list]]:
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    roles = sorted({r.get("role") or "?" for r in rows})
    series: dict[str, list] = {}
    for role in roles:
        vals = []
        for layer in layers:
            hit = [
                r[key] for r in rows if r.get("layer") == layer and (r.get("role") or "?") == role
            ]
            vals.append(sum(hit) / len(hit) if hit else None)
        series[role] = vals
    return [str(i) for i in layers], series


def _headline(data: dict[str, Any]) -> list[tuple[str, str]]:
    q = data.get("quality") or {}
    out = []
    if q.get("kind") == "decoder":
        ppl = f"{q['perplexity']:.2f}"
        if "perplexity_dense" in q:
            ppl += f" (dense {q['perplexity_dense']:.2f}, {q['perplexity'] / q['perplexity_dense']:.2f}x)"
        out.append(("held-out perplexity", ppl))
    elif q:
        out.append(("mean cosine to the dense original", f"{q['mean_cosine_to_dense']:.3f}"))
        out.append(("lowest cosine", f"{q['min_cosine_to_dense']:.3f}"))
        out.append(
            ("Spearman of pairwise similarities", f"{q['spearman_pairwise_similarity']:.3f}")
        )
    if q.get("activation_sparsity") is not None:
        out.append(("FFN activations zero", f"{q['activation_sparsity']:.1%}"))
    rows = data.get("linears", [])
    if rows:
        n24 = sum(1 for r in rows if r.get("is_24") and r["zeros"] >= 0.5)
        out.append(("linears 2:4", f"{n24} of {len(rows)}"))
    for s in data.get("speed", []):
        shape = "x".join(map(str, s.get("batch_shape") or []))
        out.append((f"speed-up, batch x tokens {shape}", f"{s['speedup']:.2f}x"))
    return out


def _title(data: dict[str, Any]) -> str:
    return str(data.get("model", {}).get("class") or "model").rsplit(".", 1)[-1]


def render_markdown(data: dict[str, Any]) -> str:
    model = data.get("model", {})
    lines = [f"# pysparse report: {_title(data)}", ""]
    if model.get("source"):
        lines += [f"Source: `{model['source']}`", ""]
    head = _headline(data)
    if head:
        lines += ["| | |", "|---|---:|", *[f"| {k} | {v} |" for k, v in head], ""]
    if not data.get("quality"):
        lines += ["Quality and speed not measured yet: run `pysparse report DIR`.", ""]
    m = data.get("machine")
    if m:
        lines.append(
            f"Measured with {m.get('threads')} threads on {m.get('cpu') or 'this CPU'} "
            f"(2:4 kernel {m.get('linear_kernel')}, FFN kernel {m.get('ffn_kernel')}, "
            f"torch {m.get('torch')})."
        )
        lines.append("")
    if data.get("speed"):
        lines += ["## Speed", "", "| batch x tokens | dense ms | compiled ms | speed-up |"]
        lines.append("|---|---:|---:|---:|")
        for s in data["speed"]:
            shape = "x".join(map(str, s.get("batch_shape") or []))
            lines.append(
                f"| {shape} | {s['dense_ms']:.2f} | {s['compiled_ms']:.2f} | {s['speedup']:.2f}x |"
            )
        lines.append("")
    lines += ["## Passes", "", "| pass | seconds | facts |", "|---|---:|---|"]
    for e in data.get("passes", []):
        facts = json.dumps(pass_facts(e), default=str)
        lines.append(f"| {e['pass']} | {e.get('seconds', 0):.1f} | `{facts}` |")
    lines.append("")
    per = (data.get("quality") or {}).get("activation_sparsity_per_layer")
    if per:
        lines += ["## FFN activation sparsity per layer (held-out text)", ""]
        lines += ["| layer | " + " | ".join(map(str, range(len(per)))) + " |"]
        lines += ["|---|" + "---:|" * len(per)]
        lines += ["| zeros | " + " | ".join(f"{v:.1%}" for v in per) + " |", ""]
    rows = data.get("linears", [])
    if rows:
        lines += ["## Linears", "", "| weight | role | layer | shape | stored | zeros | 2:4 |"]
        lines.append("|---|---|---:|---|---|---:|---|")
        for r in rows:
            lines.append(
                f"| `{r['weight']}` | {r.get('role')} | {r.get('layer')} | "
                f"{'x'.join(map(str, r['shape']))} | {r['stored']} | {r['zeros']:.1%} | "
                f"{'yes' if r.get('is_24') else 'no'} |"
            )
        lines.append("")
        pats = _pattern_totals(rows)
        if pats:
            total = sum(pats)
            lines += ["## 2:4 mask patterns (kept positions in each group of 4)", ""]
            lines += ["| pattern | " + " | ".join(PATTERNS) + " |", "|---|" + "---:|" * 6]
            lines += ["| share | " + " | ".join(f"{c / total:.1%}" for c in pats) + " |", ""]
    for e in data.get("passes", []):
        curve = e.get("curve") or []
        if curve:
            last = curve[-1]
            cols = [k for k in last if k != "step"]
            lines += [
                f"## Training: {e['pass']} ({len(curve)} points, last step {last['step']})",
                "",
            ]
            lines += ["| step | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
            pick = curve[:: max(1, len(curve) // 10)] + ([last] if len(curve) > 1 else [])
            for row in pick:
                lines.append(
                    f"| {row['step']} | "
                    + " | ".join(_fmt(row.get(c, float("nan"))) for c in cols)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines)


def _pattern_totals(rows: list[dict]) -> list[int] | None:
    with_patterns = [r["patterns"] for r in rows if r.get("patterns") and r["zeros"] >= 0.5]
    if not with_patterns:
        return None
    return [sum(p[i] for p in with_patterns) for i in range(6)]


def _plots(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(section title, svg) for every plot the record supports."""
    out: list[tuple[str, str]] = []
    rows = data.get("linears", [])
    if any(r["zeros"] >= 0.01 for r in rows):  # an all-dense model gets no empty plot
        labels, series = _per_layer(rows, "zeros")
        if labels:
            out.append(
                (
                    "Weight sparsity",
                    bar_chart("zeros per linear, by layer and role", labels, series, ymax=1.0),
                )
            )
    q = data.get("quality") or {}
    per = q.get("activation_sparsity_per_layer")
    if per:
        out.append(
            (
                "Activation sparsity",
                bar_chart(
                    "FFN activations zero per layer (held-out text)",
                    [str(i) for i in range(len(per))],
                    {"zeros": per},
                    ymax=1.0,
                ),
            )
        )
    pats = _pattern_totals(rows)
    if pats:
        total = sum(pats)
        out.append(
            (
                "2:4 masks",
                bar_chart(
                    "share of each 2-of-4 pattern (kept positions) over all masked groups",
                    list(PATTERNS),
                    {"share": [c / total for c in pats]},
                ),
            )
        )
    for e in data.get("passes", []):
        curve = e.get("curve") or []
        if len(curve) < 2:
            continue
        steps = [r["step"] for r in curve]
        losses = {k: [r.get(k) for r in curve] for k in ("loss", "task") if k in curve[-1]}
        if losses:
            out.append(
                (f"Training: {e['pass']}", line_chart("loss over training", steps, losses, "step"))
            )
        for key, title, pct in (
            ("sparsity", "FFN activation sparsity (training batches)", True),
            ("groups_24", "share of weight groups already 2:4", True),
            ("lam", "L1 factor lambda", False),
            ("lr", "learning rate", False),
        ):
            if key in curve[-1]:
                out.append(
                    (
                        f"Training: {e['pass']}",
                        line_chart(title, steps, {key: [r.get(key) for r in curve]}, "step", pct),
                    )
                )
        sweep = (e.get("threshold_sweep") or {}).get("rows")
        if sweep:
            ts = [r["t"] for r in sweep]
            out.append(
                (
                    f"Threshold sweep: {e['pass']}",
                    line_chart(
                        f"FATReLU threshold sweep (chosen {e['threshold_sweep'].get('chosen')})",
                        ts,
                        {
                            "sparsity": [r["sparsity"] for r in sweep],
                            "quality": [r["quality"] for r in sweep],
                        },
                        "threshold",
                    ),
                )
            )
    return out


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:980px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}td.n{text-align:right}code{font-size:12px}
svg.plot{display:block;margin:8px 0;background:#fff;border:1px solid #eee}
svg .title{font-size:13px;font-weight:600}svg .tick{font-size:11px;fill:#444}
svg .grid{stroke:#eee}svg .axis{stroke:#888}
.note{color:#666}
"""

# Run by the browser after load: counts the plots that drew, for people (a line at the bottom)
# and for tests (data attributes on <body>; tests/test_report.py reads them from the DOM).
_CHECK = """
(function(){var ok=0,bad=0;document.querySelectorAll('svg.plot').forEach(function(s){
var r=s.getBoundingClientRect();var marks=s.querySelectorAll('.mark').length;
if(r.width>0&&r.height>0&&marks>0){ok++}else{bad++}});
document.body.dataset.plotsOk=ok;document.body.dataset.plotsBad=bad;
document.getElementById('check').textContent=ok+' plots drawn'+(bad?', '+bad+' empty':'');})();
"""


def render_html(data: dict[str, Any]) -> str:
    model = data.get("model", {})
    esc = html.escape
    body = [f"<h1>pysparse report: {esc(_title(data))}</h1>"]
    if model.get("source"):
        body.append(f"<p>Source: <code>{esc(str(model['source']))}</code></p>")
    head = _headline(data)
    if head:
        body.append(
            "<table>"
            + "".join(f"<tr><th>{esc(k)}</th><td class=n>{esc(v)}</td></tr>" for k, v in head)
            + "</table>"
        )
    if not data.get("quality"):
        body.append(
            '<p class="note">Quality and speed not measured yet: run <code>pysparse report DIR</code>.</p>'
        )
    m = data.get("machine")
    if m:
        body.append(
            f'<p class="note">Measured with {m.get("threads")} threads on '
            f"{esc(str(m.get('cpu') or 'this CPU'))} (2:4 kernel {esc(str(m.get('linear_kernel')))}, "
            f"FFN kernel {esc(str(m.get('ffn_kernel')))}, torch {esc(str(m.get('torch')))}).</p>"
        )
    if data.get("speed"):
        body.append(
            "<h2>Speed</h2><table><tr><th>batch x tokens</th><th>dense ms</th><th>compiled ms</th><th>speed-up</th></tr>"
        )
        for s in data["speed"]:
            shape = "x".join(map(str, s.get("batch_shape") or []))
            body.append(
                f"<tr><td>{shape}</td><td class=n>{s['dense_ms']:.2f}</td>"
                f"<td class=n>{s['compiled_ms']:.2f}</td><td class=n>{s['speedup']:.2f}x</td></tr>"
            )
        body.append("</table>")
    section = None
    for title, svg in _plots(data):
        if title != section:
            body.append(f"<h2>{esc(title)}</h2>")
            section = title
        body.append(svg)
    body.append("<h2>Passes</h2><table><tr><th>pass</th><th>seconds</th><th>facts</th></tr>")
    for e in data.get("passes", []):
        facts = esc(json.dumps(pass_facts(e), default=str))
        body.append(
            f"<tr><td>{esc(e['pass'])}</td><td class=n>{e.get('seconds', 0):.1f}</td><td><code>{facts}</code></td></tr>"
        )
    body.append("</table>")
    body.append('<p class="note" id="check">plots not checked (scripts off)</p>')
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>pysparse report: {esc(_title(data))}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_CHECK}</script></body></html>"
    )


def files(data: dict[str, Any]) -> dict[str, str]:
    """The three report files of a record, by name."""
    return {
        REPORT_JSON: json.dumps(data, indent=1, default=str),
        REPORT_MD: render_markdown(data),
        REPORT_HTML: render_html(data),
    }


def read(directory: str | os.PathLike) -> dict[str, Any]:
    """The report record of an artifact (``report.json``)."""
    path = Path(directory) / REPORT_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(
            f"{directory} has no {REPORT_JSON} (made by a pysparse older than its reports); "
            "recompile it"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"{path} cannot be read ({exc}); recompile the artifact") from exc
    if not isinstance(data, dict) or data.get("format") != "pysparse-report":
        raise RuntimeError(f"{path} is not a pysparse report; recompile the artifact")
    return data


def rewrite(directory: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Replaces an artifact's report files with ``data``'s and updates their manifest records
    (each file and then the manifest are written to a temporary name and renamed into place)."""
    root = Path(directory)
    manifest = json.loads((root / MANIFEST).read_text())
    for name, text in files(data).items():
        atomic_write(root / name, text.encode())
        manifest["files"][name] = {
            "sha256": sha256_file(root / name),
            "bytes": (root / name).stat().st_size,
        }
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
    return root / REPORT_HTML
