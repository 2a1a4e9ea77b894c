"""Self-contained HTML pages: the interactive attention view and the index of a run's figures.

Nothing is fetched from anywhere: the data sit in the page as JSON (``<script
type="application/json">``), the script and the style are inline, images are relative links to
PNG files beside the page. The attention page works offline, from a file:// URL.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .attention import AttentionMaps

DATA_ID = "lmforge-attention"  # the id of the JSON block holding the weights
DIGITS = 5  # decimals kept of each weight in the page


def attention_payload(maps: AttentionMaps, *, title: str) -> dict[str, Any]:
    """What the page embeds: tokens and α rounded to :data:`DIGITS` decimals, [layer][head][query][key]."""
    return {
        "title": title,
        "stack": maps.stack,
        "tokens": maps.tokens,
        "key_tokens": maps.key_tokens,
        "layers": maps.num_layers,
        "heads": maps.num_heads,
        "attention": maps.weights.round(DIGITS).tolist(),
    }


def _json_for_script(value: Any) -> str:
    """JSON safe inside a <script> element (no ``</`` can close it early)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.3em} .note{color:#666;font-size:.9em}
#controls{margin:.8em 0} #controls label{margin-right:1.2em}
#tokens{line-height:2.4em;margin:1em 0;padding:.6em;border:1px solid #ddd;border-radius:6px}
.tok{padding:.25em .35em;margin:0 .1em;border-radius:4px;cursor:default;border:1px solid #ccc;white-space:pre}
.tok.query{outline:2px solid #d62728}
#readout{font-family:ui-monospace,monospace;font-size:.85em;min-height:1.5em;white-space:pre-wrap}
table.map{border-collapse:collapse;font-size:.75em;margin-top:1em}
table.map td{width:1.9em;height:1.6em;text-align:center;border:1px solid #eee}
table.map th{font-weight:normal;padding:0 .3em;white-space:pre}
table.map th.col{writing-mode:vertical-rl;transform:rotate(180deg);height:5em;vertical-align:bottom}
table.map tr.hot th.row{background:#fde0e0}
"""

# The page's own script: pick a layer and a head (or the mean over heads); hovering a token colours
# every key by the weight the hovered query gives it, and prints the weights; the table below is
# the whole α of the chosen layer/head.
_SCRIPT = """
const data = JSON.parse(document.getElementById('%(data_id)s').textContent);
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
for (let l = 0; l < data.layers; l++) layerSel.add(new Option('layer ' + l, l));
headSel.add(new Option('mean of all heads', -1));
for (let h = 0; h < data.heads; h++) headSel.add(new Option('head ' + h, h));
const offset = data.key_tokens.length - data.tokens.length;  // virtual keys before the text
function matrix() {
  const l = +layerSel.value, h = +headSel.value, A = data.attention[l];
  if (h >= 0) return A[h];
  return A[0].map((row, q) => row.map((_, k) => A.reduce((s, head) => s + head[q][k], 0) / A.length));
}
function shade(w) { return 'rgba(31,119,180,' + w.toFixed(3) + ')'; }
const tokBox = document.getElementById('tokens'), readout = document.getElementById('readout');
const keySpans = data.key_tokens.map((t, k) => {
  const s = document.createElement('span'); s.className = 'tok'; s.textContent = t; s.dataset.key = k;
  tokBox.appendChild(s); return s;
});
function clear() {
  keySpans.forEach(s => { s.style.background = ''; s.style.color = ''; s.classList.remove('query'); });
  readout.textContent = 'hover a token to see where it attends';
  document.querySelectorAll('table.map tr').forEach(r => r.classList.remove('hot'));
}
function show(q) {
  const row = matrix()[q];
  keySpans.forEach((s, k) => { s.style.background = shade(row[k]); s.style.color = row[k] > 0.55 ? '#fff' : ''; });
  keySpans[q + offset].classList.add('query');
  const top = row.map((w, k) => [w, k]).sort((a, b) => b[0] - a[0]).slice(0, 8);
  readout.textContent = JSON.stringify(data.tokens[q]) + ' attends to: ' +
    top.map(([w, k]) => JSON.stringify(data.key_tokens[k]) + ' ' + w.toFixed(3)).join(', ');
  const tr = document.getElementById('row-' + q); if (tr) tr.classList.add('hot');
}
keySpans.forEach((s, k) => {
  s.addEventListener('mouseenter', () => { clear(); if (k >= offset) show(k - offset); });
  s.addEventListener('mouseleave', clear);
});
function table() {
  const A = matrix(), t = document.getElementById('map');
  let h = '<tr><th></th>' + data.key_tokens.map(k => '<th class="col">' + esc(k) + '</th>').join('') + '</tr>';
  A.forEach((row, q) => {
    h += '<tr id="row-' + q + '"><th class="row">' + esc(data.tokens[q]) + '</th>' +
      row.map(w => '<td title="' + w.toFixed(4) + '" style="background:' + shade(w) + '"></td>').join('') + '</tr>';
  });
  t.innerHTML = h;
  t.querySelectorAll('tr[id]').forEach(tr => {
    const q = +tr.id.slice(4);
    tr.addEventListener('mouseenter', () => { clear(); show(q); });
    tr.addEventListener('mouseleave', clear);
  });
}
function esc(s) { const d = document.createElement('div'); d.textContent = s; return d.innerHTML; }
layerSel.onchange = headSel.onchange = () => { clear(); table(); };
clear(); table();
"""


def attention_page(maps: AttentionMaps, *, title: str, text: str) -> str:
    """The interactive attention page of ``maps`` as one HTML string."""
    payload = _json_for_script(attention_payload(maps, title=title))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Text: {html.escape(text)}<br>{len(maps.tokens)} tokens as the tokenizer splits them;
{maps.num_layers} layers × {maps.num_heads} heads of the {maps.stack}. α = softmax(QKᵀ/√d + mask): the
weight each query (row) gives each key (column); every row sums to 1.</p>
<div id="controls"><label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label></div>
<div id="tokens"></div>
<div id="readout"></div>
<table class="map" id="map"></table>
<script type="application/json" id="{DATA_ID}">{payload}</script>
<script>{_SCRIPT % {"data_id": DATA_ID}}</script>
</body></html>
"""


def write_attention_html(maps: AttentionMaps, path: Path, *, title: str, text: str) -> Path:
    """:func:`attention_page` written to ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, attention_page(maps, title=title, text=text))


def index_page(title: str, sections: Sequence[tuple[str, Sequence[tuple[str, str]]]], *, notes: Sequence[str] = ()) -> str:
    """A page of figures: ``sections`` are (heading, [(image file relative to the page, caption)])."""
    parts = [
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
        "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}"
        "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    for heading, figures in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for src, caption in figures:
            parts.append(
                f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)
