"""One page per evaluated run: ``report.md`` (images beside it, relative links) and ``report.html``
(the same content with every image embedded as base64, a single self-contained file).

A page is a list of blocks built by :class:`Page` (headings, paragraphs, tables, images, code) and
rendered to both formats, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Page:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if any(len(r) != len(header) for r in rows):
            raise ValueError(f"table rows must have {len(header)} cells")
        self.blocks.append(("table", list(header), [list(map(str, r)) for r in rows]))

    def image(self, path: str | Path, caption: str) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"report image {path} does not exist")
        self.blocks.append(("img", path, caption))

    def code(self, text: str, language: str = "") -> None:
        self.blocks.append(("code", text, language))

    # -- rendering -----------------------------------------------------------------------------
    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                out += [f"## {block[1]}", ""]
            elif kind == "p":
                out += [block[1], ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                rel = Path(os.path.relpath(block[1], base)).as_posix()
                out += [f"![{block[2]}]({rel})", "", f"*{block[2]}*", ""]
            elif kind == "code":
                fence = "````" if "```" in block[1] else "```"
                out += [fence + block[2], block[1].rstrip("\n"), fence, ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def html(self) -> str:
        esc = html.escape
        body = [f"<h1>{esc(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h2":
                body.append(f"<h2>{esc(block[1])}</h2>")
            elif kind == "p":
                body.append(f"<p>{esc(block[1])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                data = block[1].read_bytes()
                if not data.startswith(PNG_SIGNATURE):
                    raise ValueError(f"report image {block[1]} is not a PNG")
                b64 = base64.b64encode(data).decode("ascii")
                body.append(f'<figure><img alt="{esc(block[2])}" src="data:image/png;base64,{b64}">'
                            f"<figcaption>{esc(block[2])}</figcaption></figure>")
            elif kind == "code":
                body.append(f"<pre><code>{esc(block[1])}</code></pre>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;"
                 "text-align:left}pre{background:#f5f5f5;padding:1em;overflow:auto;font-size:85%}"
                 "img{max-width:100%;image-rendering:pixelated}figcaption{font-size:90%;color:#555}")
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{esc(self.title)}</title><style>{style}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")

    def write(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.html`` into ``out_dir``; returns both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
        md.write_text(self.markdown(out_dir), encoding="utf-8")
        page.write_text(self.html(), encoding="utf-8")
        return md, page


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def build_report(*, title: str, source: str, weights: str, step: Optional[int], num_parameters: int,
                 config_yaml: str, nll=None, figures: Optional[dict] = None,
                 notes: Sequence[str] = ()) -> Page:
    """The report page of one evaluated checkpoint.

    ``nll``: an :class:`avi_scale.evaluate.nll.NLLResult` (or None when the likelihood was skipped);
    ``figures``: {name: path} as written by :func:`avi_scale.evaluate.cli` (``curves``, ``kl_heatmap``,
    ``samples`` ({temperature: path}), ``reconstructions``, ``latent_usage``, ``attention``).
    """
    figures = figures or {}
    page = Page(title)
    page.text(f"Checkpoint: {source} — {weights} weights, "
              + (f"step {step}, " if step is not None else "")
              + f"{num_parameters / 1e6:.3f}M parameters.")
    for note in notes:
        page.text(note)

    page.heading("Likelihood")
    if nll is not None:
        page.text(f"{nll.count} images of the evaluation split, each once over {nll.world_size} rank(s); "
                  f"mean ± standard error over images; seed {nll.seed}; {nll.seconds:.1f} s.")
        page.table(["quantity", "nats / image", "bits / dim"], nll.table_rows())
        page.text(f"Active units (Cov_x E_q[z_u] > {nll.active_unit_threshold:g}): {nll.active_units} of "
                  f"{nll.units_per_layer * len(nll.kl_per_layer)}; active layers (KL > {nll.active_layer_kl:g} "
                  f"nats): {nll.active_layers} of {len(nll.kl_per_layer)}.")
        page.table(["layer", "KL (nats / image)", "active units"],
                   [(str(i + 1), f"{k:.3f}", f"{a} / {nll.units_per_layer}")
                    for i, (k, a) in enumerate(zip(nll.kl_per_layer, nll.active_units_per_layer))])
    else:
        page.text("Not measured in this report (run without --skip-nll to include it).")
    if "latent_usage" in figures:
        page.image(figures["latent_usage"], "Test set: KL per layer and fraction of active units per layer.")

    if "curves" in figures or "kl_heatmap" in figures:
        page.heading("Training")
    if "curves" in figures:
        page.image(figures["curves"], "Training curves from metrics.jsonl.")
    if "kl_heatmap" in figures:
        page.image(figures["kl_heatmap"], "KL per layer over training (layers x steps; colour: share of the "
                                          "total KL), and each layer's KL at the last logged step.")

    if figures.get("samples"):
        page.heading("Samples")
        for t, path in sorted(figures["samples"].items(), key=lambda kv: -kv[0]):
            page.image(path, f"Samples at temperature {t:g} (prior sigmas scaled by {t:g}).")
    if "reconstructions" in figures:
        page.heading("Reconstructions")
        page.image(figures["reconstructions"], "Rows alternate: originals, then their reconstructions.")
    if "attention" in figures:
        page.heading("Depth-wise attention")
        page.image(figures["attention"], "Mean attention weight of each querying layer (rows) on the layers it "
                                         "reads (columns), averaged over images and pixels; bars: the chosen layer.")

    page.heading("Resolved config")
    page.code(config_yaml, "yaml")
    return page
