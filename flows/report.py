"""Comparison reports of pipeline runs read back from MLflow: a table of figures and PNG plots.

``collect`` reads either the variants of a grid run (its child runs of kind ``pipeline``) or a list of
pipeline runs; ``write_report`` writes ``report.html`` and ``report.md`` (same content) plus ``plots/*.png``
into a folder, atomically (a temporary folder renamed into place), and returns the paths. The x axis of the
plots is ``tokenizer.keep_ratio``, or, when it does not vary, the first varying numeric key (e.g.
``evaluate.sampling.guidance_scale``); every other config key that differs between the runs splits the points
into one line per value combination (``tokenizer.scorer=learned`` / ``random``).
"""

from __future__ import annotations

import html
import json
import math
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from infra.storage import atomic_write_bytes, replace_dir
from infra.tracking import TAG_KIND, Tracker

X_KEY = "tokenizer.keep_ratio"
# (metric, axis label, better) for the plots, in order; a metric no run has is listed as unavailable.
PLOTS: tuple[tuple[str, str, str], ...] = (
    ("fid", "FID (lower is better)", "lower"),
    ("sampling_images_per_s", "sampling speed, images/s (higher is better)", "higher"),
    ("recon_psnr", "reconstruction PSNR, dB (higher is better)", "higher"),
    ("sample_class_accuracy", "class accuracy of samples (higher = better)", "higher"),
    ("caption_alignment", "samples matching their caption (higher = better)", "higher"),
    ("caption_alignment_heldout", "... with a held-out colour-shape pair (higher = better)", "higher"),
)
# What a report folder holds (report.md/html and plots; results.md and the variants' pictures with --claims): an
# earlier report is replaced only when it holds nothing else.
REPORT_ENTRIES = frozenset({"report.html", "report.md", "plots", "results.md", "pictures"})
OPTIONAL_PLOTS = ("caption_alignment", "caption_alignment_heldout")  # text models only: no note when absent
TABLE_METRICS = ("fid", "isc_mean", "kid_mean", "sample_class_accuracy", "evaluator_val_accuracy", "caption_alignment",
                 "caption_alignment_seen", "caption_alignment_heldout", "recon_caption_alignment",
                 "reference_caption_alignment", "recon_psnr", "recon_l1",
                 "sampling_images_per_s", "generation_images_per_s", "stackformer.val_bits_per_image",
                 "tokenizer.val_psnr")
IGNORED_PARAM_PREFIXES = ("run.", "evaluate.inception")


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    label: str = ""
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Comparison:
    title: str
    rows: list[RunRow]
    parent_run_id: str | None
    varying: list[str] = field(default_factory=list)  # config keys that differ between the rows


class NothingToCompare(ValueError):
    """No run matches what was asked for (an unknown run id, a grid without variants)."""


def _added_defaults() -> dict[str, str]:
    """The config fields added after a run was logged, at their defaults, as MLflow holds params (strings): a run
    from before a field existed then compares equal to one logging its default, instead of varying in it."""
    from infra.config import ADDED_FIELDS

    out: dict[str, str] = {}
    for key, default in ADDED_FIELDS.items():
        if isinstance(default, dict):
            out.update({f"{key}.{k}": str(v) for k, v in default.items() if not isinstance(v, dict)})
        else:
            out[key] = str(default)
    return out


def collect(tracker: Tracker, grid_run_id: str | None = None, run_ids: list[str] | None = None) -> Comparison:
    """The runs to compare: the variants of ``grid_run_id``, or ``run_ids``, or the latest grid."""
    client = tracker.client
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids; say which id
                raise NothingToCompare(f"MLflow run {rid!r} not found on {tracker.uri}: {e}") from None
        parent = None
        title = f"{len(runs)} pipeline runs"
    else:
        if grid_run_id is None:
            grids = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'grid'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
            if not grids:
                raise NothingToCompare(f"no grid run in experiment {tracker.experiment_id} on {tracker.uri}; "
                                       "run `mqgen grid ...` first or pass run ids")
            grid_run_id = grids[0].info.run_id
        runs = client.search_runs([tracker.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{grid_run_id}' and "
                                                f"tags.`{TAG_KIND}` = 'pipeline'",
                                  max_results=1000, order_by=["attributes.start_time ASC"])
        if not runs:
            raise NothingToCompare(f"grid run {grid_run_id} has no variant runs")
        parent = grid_run_id
        title = f"grid {client.get_run(grid_run_id).info.run_name} ({len(runs)} variants)"
    defaults = _added_defaults()
    rows = [RunRow(run_id=r.info.run_id, name=r.info.run_name or r.info.run_id, status=r.info.status,
                   params={**defaults, **r.data.params}, metrics=dict(r.data.metrics),
                   label=r.data.tags.get("mqgen.variant", ""), tags=dict(r.data.tags)) for r in runs]
    varying = sorted(k for k in {k for row in rows for k in row.params}
                     if not k.startswith(IGNORED_PARAM_PREFIXES)
                     and len({row.params.get(k) for row in rows}) > 1)
    for row in rows:
        if not row.label:
            row.label = ",".join(f"{k}={row.params.get(k)}" for k in varying) or row.name
    return Comparison(title=title, rows=rows, parent_run_id=parent, varying=varying)


def _x(row: RunRow, key: str = X_KEY) -> float:
    try:
        return float(row.params.get(key, "nan"))
    except ValueError:
        return math.nan


def x_key(comp: Comparison) -> str:
    """The plots' x axis: the keep ratio, unless it does not vary and another numeric key does."""
    if X_KEY in comp.varying:
        return X_KEY
    numeric = [k for k in comp.varying if all(not math.isnan(_x(r, k)) for r in comp.rows)]
    return numeric[0] if numeric else X_KEY


def _series(comp: Comparison, key: str = X_KEY) -> dict[str, list[RunRow]]:
    others = [k for k in comp.varying if k != key]
    out: dict[str, list[RunRow]] = {}
    for row in comp.rows:
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={row.params.get(k)}" for k in others) or "runs"
        out.setdefault(name, []).append(row)
    return {k: sorted(v, key=lambda r: _x(r, key)) for k, v in out.items()}


def plot_png(comp: Comparison, metric: str, ylabel: str, path: Path, key: str = X_KEY) -> bool:
    """One metric against ``key`` (keep ratio by default), a line per series; False (no file) when no run has
    the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(comp, key)
    if not any(metric in r.metrics and not math.isnan(_x(r, key)) for rows in series.values() for r in rows):
        return False
    many = len(series) > 6  # a large grid: the legend goes below the axes, one line per series
    fig, ax = plt.subplots(figsize=(6.4 if many else 5.0, 3.4 + (0.13 * len(series) if many else 0.0)), dpi=120)
    colours = plt.get_cmap("tab20").colors if many else [None]
    markers = "os^Dv<>pP*X"
    for i, (name, rows) in enumerate(series.items()):
        pts = [(_x(r, key), r.metrics[metric]) for r in rows if metric in r.metrics and not math.isnan(_x(r, key))]
        if pts:  # past tab20's 20 colours the marker tells the series apart
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=colours[i % len(colours)],
                    marker=markers[(i // len(colours)) % len(markers)] if many else "o")
    ax.set_xlabel("keep ratio (share of latent regions kept)" if key == X_KEY else key)
    ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 34)))  # a long label on two lines, never cut at the edges
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
        fig.savefig(path, format="png", bbox_inches="tight")
    else:
        if len(series) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png")
    plt.close(fig)
    return True


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}"


def write_report(comp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write the report folder; returns the paths of ``report.html``, ``report.md`` and each plot."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                       and not (out_dir / "report.html").is_file())):
        raise ValueError(f"{out_dir} exists and is not an earlier report (no report.html): choose another --out; "
                         "a report folder is replaced as a whole")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in REPORT_ENTRIES) if out_dir.is_dir() else []
    if foreign:  # an earlier report with something else put inside: replacing it would delete that
        raise ValueError(f"{out_dir} is an earlier report but also holds {', '.join(foreign)}, which a report does "
                         "not write; move them out or choose another --out (a report folder is replaced as a whole)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        return _write(comp, out_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(comp: Comparison, out_dir: Path, tmp: Path) -> dict[str, Path]:
    (tmp / "plots").mkdir()
    plots: dict[str, str] = {}
    missing: list[str] = []
    key = x_key(comp)
    for metric, ylabel, _ in PLOTS:
        if metric in OPTIONAL_PLOTS and not any(metric in r.metrics for r in comp.rows):
            continue
        name = f"{metric}_vs_{key.rsplit('.', 1)[-1]}.png"
        if plot_png(comp, metric, ylabel, tmp / "plots" / name, key):
            plots[metric] = f"plots/{name}"
        else:
            missing.append(metric)
    metrics = [m for m in TABLE_METRICS if any(m in r.metrics for r in comp.rows)]
    cols = ["run", *comp.varying, *metrics, "status"]
    table = [[r.label, *(r.params.get(k, "") for k in comp.varying),
              *(_fmt(r.metrics.get(m)) for m in metrics), r.status] for r in comp.rows]
    best = {m: (min if better == "lower" else max) for m, _, better in PLOTS}
    notes = []
    for m, pick in best.items():
        have = [r for r in comp.rows if m in r.metrics]
        if have:
            b = pick(have, key=lambda r: r.metrics[m])
            notes.append(f"best {m}: {b.label} ({_fmt(b.metrics[m])})")
    if missing:
        notes.append(f"no plot (the metric or {key} missing in these runs): " + ", ".join(missing))

    md = [f"# mqgen comparison: {comp.title}", "", *[f"- {n}" for n in notes], "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    md += [""] + [f"![{m}]({p})" for m, p in plots.items()]
    atomic_write_bytes(tmp / "report.md", ("\n".join(md) + "\n").encode())

    esc = html.escape
    rows_html = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in table)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(comp.title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{margin:8px}</style></head><body>"
            f"<h1>mqgen comparison: {esc(comp.title)}</h1><ul>{''.join(f'<li>{esc(n)}</li>' for n in notes)}</ul>"
            f"<table><tr>{''.join(f'<th>{esc(c)}</th>' for c in cols)}</tr>{rows_html}</table>"
            f"<div>{''.join(f'<img src={json.dumps(p)} alt={json.dumps(m)}>' for m, p in plots.items())}</div>"
            "</body></html>\n")
    atomic_write_bytes(tmp / "report.html", page.encode())
    replace_dir(tmp, out_dir)  # readers see the old report or the new one, never a mixture
    paths = {"html": out_dir / "report.html", "md": out_dir / "report.md"}
    paths.update({m: out_dir / p for m, p in plots.items()})
    return paths


def log_report(tracker: Tracker, comp: Comparison, paths: dict[str, Path]) -> str:
    """Log the report folder to the grid run, or to a new ``compare`` run when comparing loose runs."""
    from infra.tracking import StageRun

    if comp.parent_run_id:
        run = StageRun(tracker.client, comp.parent_run_id)
    else:
        run = tracker.pipeline_run("compare", kind="compare", name=f"compare-{len(comp.rows)}-runs",
                                   tags={"mqgen.compared_runs": ",".join(r.run_id for r in comp.rows)})
    folder = paths["html"].parent
    try:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).parent
                run.log_artifact(p, str(Path("compare") / rel) if str(rel) != "." else "compare")
    except BaseException as e:
        if not comp.parent_run_id:
            from infra.tracking import exit_status

            run.finish(exit_status(e))
        raise
    if not comp.parent_run_id:
        run.finish("FINISHED")
    return run.run_id
