"""The Prompt page's HTML: tokens coloured by loss or activation (hover: the top next-token
predictions), and a self-contained CircuitsVis-like view of one head's attention."""

from __future__ import annotations

import html
import json
import math
from typing import Callable

import numpy as np

LOSS_RGB = "220,40,40"

def _esc(s: str) -> str:
    return html.escape(s).replace("\n", "⏎").replace(" ", "&nbsp;") or "&nbsp;"


def _tok(t: str) -> str:
    return repr(t)


def loss_html(strs: list[str], loss: np.ndarray, top_ids: np.ndarray, top_p: np.ndarray,
              decode: Callable[[int], str], scale: float) -> str:
    """Each token coloured by its loss (the loss of predicting it from the tokens before);
    its title: that loss and the top-5 predictions for the next token."""
    out = ["<div style='font-family:monospace;font-size:0.9em;line-height:1.9'>"]
    for j, t in enumerate(strs):
        lj = float(loss[j - 1]) if 0 < j <= len(loss) else float("nan")
        if np.isfinite(lj):
            a = float(np.clip(lj / scale, 0, 1)) if scale > 0 else 0.0
            bg, first = f"rgba({LOSS_RGB},{a:.2f})", f"loss {lj:.3f} (p {math.exp(-lj):.3g})"
        else:
            bg, first = "transparent", "loss: none (the first token)"
        nxt = "; ".join(f"{_tok(decode(int(i)))} {p:.3g}" for i, p in zip(top_ids[j], top_p[j]))
        title = html.escape(f"{j}: {_tok(t)} | {first} | next: {nxt}", quote=True)
        out.append(f"<span class='ptok' title=\"{title}\" style='background:{bg};'>"
                   f"{_esc(t)}</span>")
    out.append("</div>")
    return "".join(out)


def acts_html(strs: list[str], acts: np.ndarray, color: Callable[[float, float], str]) -> str:
    """The Neurons page's colouring: orange positive, blue negative, scaled by the largest
    |activation| on the text; the title is the value."""
    scale = max(float(np.nanmax(np.abs(acts))) if len(acts) else 0.0, 1e-6)
    spans = [f"<span class='tok' title='{a:.3f}' style='background:{color(float(a), scale)};'>"
             f"{_esc(t)}</span>" for t, a in zip(strs, acts)]
    return ("<div style='font-family:monospace;font-size:0.9em;line-height:1.9'>"
            + "".join(spans) + "</div>")


ATTN_JS = """<div id="av" style="font-family:monospace;font-size:14px;line-height:2">
<div style="font-family:sans-serif;font-size:13px;color:#555">Hover a token:
<span style="background:rgba(30,110,255,.55)">&nbsp;blue&nbsp;</span> where it attends (its
row, as the query) &middot; <span style="background:rgba(255,120,0,.55)">&nbsp;orange&nbsp;
</span> what attends to it (its column, as the key); shaded relative to the largest, the
values on hover. __TITLE__</div>
<div><b style="font-family:sans-serif">attends to:</b> <span id="q"></span></div>
<div><b style="font-family:sans-serif">attended to by:</b> <span id="k"></span></div>
<div id="info" style="font-family:sans-serif;font-size:13px"></div></div>
<script>
const T = __TOKS__, P = __PAT__;
const esc = s => s.replace(/&/g,"&amp;").replace(/</g,"&lt;").replace(/\\n/g,"\\u23ce")
  .replace(/ /g,"\\u00a0") || "\\u00a0";
function mk(id) {
  const el = document.getElementById(id);
  return T.map((t, i) => { const s = document.createElement("span");
    s.className = "atok"; s.dataset.i = i; s.innerHTML = esc(t);
    s.style.padding = "1px 1px"; s.style.cursor = "default";
    s.addEventListener("mouseenter", () => show(i)); el.appendChild(s); return s; });
}
const Q = mk("q"), K = mk("k");
function best(v, from) { let b = -1;
  v.forEach((x, j) => { if (j >= from && (b < 0 || x > v[b])) b = j; }); return b; }
function show(i) {
  const row = P[i], col = P.map(r => r[i]);
  const rm = Math.max(...row, 1e-9), cm = Math.max(...col, 1e-9);
  Q.forEach((s, j) => { s.style.background = `rgba(30,110,255,${(row[j] / rm).toFixed(3)})`;
    s.title = `${j}: query ${i} -> key ${j}: ${row[j].toFixed(3)}`;
    s.style.outline = j === i ? "2px solid black" : "none"; });
  K.forEach((s, j) => { s.style.background = `rgba(255,120,0,${(col[j] / cm).toFixed(3)})`;
    s.title = `${j}: query ${j} -> key ${i}: ${col[j].toFixed(3)}`;
    s.style.outline = j === i ? "2px solid black" : "none"; });
  const a = best(row, 0), b = best(col, i + 1);
  document.getElementById("info").textContent = `token ${i} ${JSON.stringify(T[i])}: ` +
    `attends most to ${a} ${JSON.stringify(T[a])} (${row[a].toFixed(2)})` +
    (b >= 0 ? `; attended to most by ${b} ${JSON.stringify(T[b])} (${col[b].toFixed(2)})` : "");
  document.getElementById("av").dataset.shown = i;
}
show(T.length - 1);
</script>"""


def attention_html(strs: list[str], pattern: np.ndarray, title: str) -> str:
    """A self-contained CircuitsVis-like view of one head's pattern [T, T] (query, key)."""
    def js(x) -> str:  # JSON inside <script>: no "</" can close it
        return json.dumps(x).replace("</", "<\\/")
    pat = np.round(np.nan_to_num(pattern.astype(np.float64)), 4).tolist()
    return (ATTN_JS.replace("__TOKS__", js(list(strs))).replace("__PAT__", js(pat))
            .replace("__TITLE__", html.escape(title)))
