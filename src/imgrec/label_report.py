"""The label audit's outputs for people: the terminal table (top N of each kind) and
`--report DIR`, one offline HTML page (DIR/index.html, a jinja2 template with autoescape:
labels and file names are user data) of thumbnail cards sorted by score, the thumbnails
JPEG files beside it in DIR/thumbs/, decoded by the one decoder (images.decode_image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import atomic_write_text
from .errors import ImgrecError

#: a label_audit.LabelAudit (not imported: label_audit imports this module)
LabelAudit = Any

THUMB = 160
#: cards per section of the page (the JSON has every record)
MAX_CARDS = 300


def _rows(records: list[dict[str, Any]], top: int, line) -> list[str]:
    out = [line(r) for r in records[:top]]
    if len(records) > top:
        out.append(f"    ... {len(records) - top} more (--json FILE or --report DIR has all)")
    return out


def audit_text(a: LabelAudit, top: int = 20) -> str:
    """The label audit for the terminal: a summary line, then the top `top` of each kind and
    the per-class label quality."""
    cache = f"{a.cache.get('cached', 0)} cached, {a.cache.get('computed', 0)} computed"
    lines = [
        f"label audit: {a.images} images, {len(a.classes)} classes, embedded by {a.model} "
        f"({cache}); {a.folds}-fold cross-validated linear head {a.cv_accuracy:.1%} "
        f"accurate ({a.timing.get('total', 0):.1f}s)"
    ]
    issues, near, outliers = a.of("label_issue"), a.of("near_duplicate"), a.of("outlier")
    lines.append(
        f"label issues: {len(issues)} ({len(issues) / max(1, a.images):.1%} of the "
        "images; score = 1 - p(given label))"
    )
    lines += _rows(
        issues, top, lambda r: f"  {r['score']:.3f}  {r['given']} -> {r['suggested']}  {r['path']}"
    )
    leaks = sum(r["leak"] for r in near)
    lines.append(f"near duplicates: {len(near)} ({leaks} across splits: leaks)")
    lines += _rows(
        near,
        top,
        lambda r: (
            f"  {r['score']:.3f}  {'leak  ' if r['leak'] else ''}"
            f"{r['path']} ~ {r['other']} (embedding "
            f"{r['similarity']:.3f}, pixels {r['pixel_correlation']:.3f})"
        ),
    )
    lines.append(
        f"outliers: {len(outliers)} (robust z-score of the distance to the nearest images)"
    )
    lines += _rows(outliers, top, lambda r: f"  {r['score']:6.1f}  {r['path']} ({r['given']})")
    lines.append("label quality per class (mean out-of-sample p(given label)):")
    width = max(len(q["class"]) for q in a.class_quality)
    for q in a.class_quality:
        quality = "-" if q["label_quality"] is None else f"{q['label_quality']:.3f}"
        lines.append(
            f"  {q['class']:<{width}}  {quality}  {q['images']} images, "
            f"{q['label_issues']} issue(s), suggested for {q['suggested_here']}"
        )
    if a.skipped:
        lines.append(f"skipped {len(a.skipped)} unreadable file(s) (imgrec doctor DATA lists them)")
    return "\n".join(lines)


# -- the HTML page -------------------------------------------------------------------------
class _Thumbs:
    """Thumbnails written once per file into DIR/thumbs, named by order of first use."""

    def __init__(self, root: Path, out: Path):
        self.root, self.folder = root, out / "thumbs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names: dict[str, str | None] = {}

    def __call__(self, rel: str) -> str | None:
        if rel not in self.names:
            self.names[rel] = self._write(rel, f"thumbs/{len(self.names):05d}.jpg")
        return self.names[rel]

    def _write(self, rel: str, name: str) -> str | None:
        from .images import decode_image

        try:
            img = decode_image(self.root / rel, channels=3, draft_size=(2 * THUMB, 2 * THUMB))
        except (ImgrecError, OSError):
            return None
        img.thumbnail((THUMB, THUMB))
        img.save(self.folder.parent / name, quality=85)
        return name


def _context(a: LabelAudit, thumbs: _Thumbs) -> dict[str, Any]:
    def card(r: dict[str, Any]) -> dict[str, Any]:
        extra = {"other_thumb": thumbs(r["other"])} if "other" in r else {}
        return {
            **r,
            "thumb": thumbs(r["path"]),
            "score": f"{r['score']:.3f}" if r["kind"] != "outlier" else f"{r['score']:.1f}",
            **extra,
        }

    sections = {
        k: [card(r) for r in a.of(k)[:MAX_CARDS]]
        for k in ("label_issue", "near_duplicate", "outlier")
    }
    totals = {k: len(a.of(k)) for k in sections}
    return {
        "data": str(a.root),
        "model": a.model,
        "images": a.images,
        "n_classes": len(a.classes),
        "folds": a.folds,
        "cv_accuracy": f"{a.cv_accuracy:.2%}",
        "seconds": f"{a.timing.get('total', 0):.1f}",
        "sections": sections,
        "totals": totals,
        "leaks": sum(r["leak"] for r in a.of("near_duplicate")),
        "class_quality": [
            {
                **q,
                "label_quality": "-" if q["label_quality"] is None else f"{q['label_quality']:.3f}",
            }
            for q in a.class_quality
        ],
        "max_cards": MAX_CARDS,
    }


def write_report(a: LabelAudit, out: str | Path) -> Path:
    """DIR/index.html and DIR/thumbs/*.jpg; returns the page's path."""
    from .report import template_environment

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    html = (
        template_environment()
        .get_template("label_audit.html.j2")
        .render(_context(a, _Thumbs(a.root, out)))
    )
    page = out / "index.html"
    atomic_write_text(page, html)
    return page
