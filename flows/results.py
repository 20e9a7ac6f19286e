"""The paper's claims tested on a grid's runs: variants grouped over seeds, mean and spread, and a verdict per
claim, written as ``results.md`` with plots (error bars over seeds). Every number comes from the MLflow runs
(:func:`flows.report.collect`); nothing is typed by hand. The verdict rules (:data:`RULES`) are printed in the
document with the history of their changes: the overlap rule was fixed before any result was read; the paired view
and the restriction of each comparison to the seeds both groups ran were added later, and say so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from flows.report import Comparison, RunRow

SEED_KEY = "seed"
MIN_SHARED_SEEDS = 2  # two groups are compared over the seeds both ran, when they share at least this many
TOO_FEW_SEEDS = "too few shared seeds"  # the outcome of a comparison of groups that share fewer
# figure -> (label, "lower" | "higher" is better)
FIGURES: dict[str, tuple[str, str]] = {
    "recon_l1": ("recon L1", "lower"), "recon_psnr": ("recon PSNR dB", "higher"),
    "recon_ssim": ("recon SSIM", "higher"), "rfid": ("rFID", "lower"), "fid": ("FID", "lower"),
    "kid_mean": ("KID", "lower"), "isc_mean": ("IS", "higher"),
    "sampling_images_per_s": ("sampling images/s", "higher"), "tokens_per_image": ("tokens/image", "lower"),
    "tokenizer.num_params": ("tokenizer params", "lower"), "stackformer.num_params": ("generator params", "lower"),
    "tokenizer.train_wall_s": ("tokenizer train s", "lower"),
    "stackformer.train_wall_s": ("generator train s", "lower"), "stackformer.step": ("generator steps", "lower"),
}
QUALITY = ("recon_l1", "recon_psnr", "recon_ssim", "rfid", "fid", "kid_mean", "isc_mean")
COST = ("sampling_images_per_s", "tokens_per_image", "tokenizer.num_params", "stackformer.num_params",
        "tokenizer.train_wall_s", "stackformer.step", "stackformer.train_wall_s")
# the evaluate stage's pictures shown per variant (its MLflow run's artifacts)
PICTURES = {"samples": "pictures/samples_grid.png", "mask overlay (samples)": "pictures/mask_overlay_samples.png",
            "reconstructions": "pictures/reconstructions.png"}
RULES = """\
- Two groups (a variant over its seeds) are compared on one figure over the seeds both ran, by their means over
  those seeds: the global seed also fixes a variant's evaluator classifier (the FID/KID/IS features), so only
  runs of one seed share the extractor. Each comparison names its seeds. Groups that share fewer than 2 seeds are
  not compared (*too few shared seeds*). The tables show every variant over all of its seeds.
- The difference counts only when the intervals `mean -/+ spread` do not overlap; the spread of a group is the
  larger of the standard deviation over the compared seeds and, for FID, the mean bootstrap standard error of
  those FIDs (`fid_boot_std`). Overlapping intervals: *overlap*.
- A claim is *confirmed* when every comparison it names goes its way without overlap, *not confirmed* when one goes
  the other way without overlap, *inconclusive* otherwise, and *not testable* when its runs are missing.
- The compared variants share the data and the training budget in steps and batch; the equal-compute variants
  (more second-stage steps for fewer tokens) are shown in the table, not used by the verdicts.
- *Paired by seed* (shown, not used by the verdicts): the mean and standard deviation over the compared seeds of
  the per-seed difference `a - b`, and how many seeds went a's way. This view was added after the first part of
  the grid had been read; restricting the comparisons to shared seeds came after the first report, whose groups
  had unequal seed sets. The overlap rule was not changed."""


@dataclass
class Group:
    """The runs of one variant over its seeds."""

    key: dict[str, str]  # the config values that identify it (seed excluded)
    rows: list[RunRow]

    @property
    def seeds(self) -> list[str]:
        return sorted(r.params.get(SEED_KEY, "?") for r in self.rows)

    def values(self, figure: str) -> list[float]:
        return [r.metrics[figure] for r in self.rows if isinstance(r.metrics.get(figure), (int, float))
                and math.isfinite(r.metrics[figure])]

    def mean(self, figure: str) -> float | None:
        v = self.values(figure)
        return statistics.fmean(v) if v else None

    def spread(self, figure: str) -> float | None:
        v = self.values(figure)
        if not v:
            return None
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        if figure == "fid":
            se = [r.metrics["fid_boot_std"] for r in self.rows if isinstance(r.metrics.get("fid_boot_std"), float)]
            sd = max(sd, statistics.fmean(se)) if se else sd
        return sd

    def get(self, name: str) -> str:
        """The group's value of config key ``name``: from its key, or, for a key that does not vary between the
        compared runs (a grid run in parts), from its runs' parameters."""
        if name in self.key:
            return self.key[name]
        return self.rows[0].params.get(name, "") if self.rows else ""


def group_rows(comp: Comparison) -> list[Group]:
    """The rows grouped by every varying config key except the seed, in first-seen order."""
    keys = [k for k in comp.varying if k != SEED_KEY]
    groups: dict[tuple[str, ...], Group] = {}
    for row in comp.rows:
        if row.status != "FINISHED":
            continue
        ident = tuple(row.params.get(k, "") for k in keys)
        groups.setdefault(ident, Group(dict(zip(keys, ident)), [])).rows.append(row)
    return list(groups.values())


@dataclass
class Contrast:
    """One figure compared between two groups: which way it went, with or without overlap."""

    figure: str
    a: str
    b: str
    a_mean: float | None
    b_mean: float | None
    a_spread: float | None
    b_spread: float | None
    outcome: str  # "a better" | "b better" | "overlap" | TOO_FEW_SEEDS | "missing"
    paired: list[float] = field(default_factory=list)  # per compared seed: a - b
    seeds: list[str] = field(default_factory=list)  # the seeds compared: those both groups ran
    why: str = ""  # for TOO_FEW_SEEDS: the seeds each group ran

    @property
    def compared(self) -> bool:
        return self.outcome in ("a better", "b better", "overlap")

    def text(self) -> str:
        if self.outcome == "missing":
            return f"{FIGURES[self.figure][0]}: missing for {self.a if self.a_mean is None else self.b}"
        if self.outcome == TOO_FEW_SEEDS:
            return f"{FIGURES[self.figure][0]}: {self.why} -> not compared (inconclusive)"
        out = (f"{FIGURES[self.figure][0]}: {self.a} {self.a_mean:.4g} +/- {self.a_spread:.2g} vs {self.b} "
               f"{self.b_mean:.4g} +/- {self.b_spread:.2g} on seeds {','.join(self.seeds)} (n={len(self.seeds)}) "
               f"-> {self.outcome}")
        if len(self.paired) > 1:
            lower = FIGURES[self.figure][1] == "lower"
            wins = sum((d < 0) == lower and d != 0 for d in self.paired)
            out += (f"; paired by seed: a - b = {statistics.fmean(self.paired):+.3g} +/- "
                    f"{statistics.stdev(self.paired):.2g} over {len(self.paired)} seeds, {self.a} better in {wins}")
        return out


def compare(a: Group, b: Group, figure: str, a_name: str, b_name: str) -> Contrast:
    """``a`` against ``b`` on ``figure`` over the seeds both ran (see :data:`RULES`)."""
    ra, rb = _by_seed(a, figure), _by_seed(b, figure)
    if not ra or not rb:
        return Contrast(figure, a_name, b_name, a.mean(figure), b.mean(figure), a.spread(figure), b.spread(figure),
                        "missing")
    seeds = sorted(set(ra) & set(rb))
    if len(seeds) < MIN_SHARED_SEEDS:
        why = (f"{a_name} ran seeds {','.join(sorted(ra))}, {b_name} seeds {','.join(sorted(rb))}: "
               f"{len(seeds)} shared, a comparison needs {MIN_SHARED_SEEDS}")
        return Contrast(figure, a_name, b_name, None, None, None, None, TOO_FEW_SEEDS, seeds=seeds, why=why)
    sa, sb = Group(a.key, [ra[s] for s in seeds]), Group(b.key, [rb[s] for s in seeds])
    am, bm, asp, bsp = sa.mean(figure), sb.mean(figure), sa.spread(figure), sb.spread(figure)
    assert am is not None and bm is not None and asp is not None and bsp is not None
    lower = FIGURES[figure][1] == "lower"
    if abs(am - bm) <= asp + bsp:
        outcome = "overlap"
    else:
        outcome = "a better" if (am < bm) == lower else "b better"
    paired = [ra[s].metrics[figure] - rb[s].metrics[figure] for s in seeds]
    return Contrast(figure, a_name, b_name, am, bm, asp, bsp, outcome, paired=paired, seeds=seeds)


def _by_seed(g: Group, figure: str) -> dict[str, RunRow]:
    """The group's run of each seed that has ``figure`` (the last one where a seed ran twice)."""
    return {r.params.get(SEED_KEY, "?"): r for r in g.rows
            if isinstance(r.metrics.get(figure), (int, float)) and math.isfinite(r.metrics[figure])}


@dataclass
class Verdict:
    claim: str
    verdict: str  # "confirmed" | "not confirmed" | "inconclusive" | "not testable"
    comparisons: list[Contrast] = field(default_factory=list)
    note: str = ""


def judge(claim: str, comparisons: list[Contrast], note: str = "") -> Verdict:
    """Every comparison "a better" (a is the claim's side) -> confirmed; any "b better" -> not confirmed."""
    if not comparisons or all(c.outcome == "missing" for c in comparisons):
        return Verdict(claim, "not testable", comparisons, note or "the runs it needs are missing")
    few = sum(c.outcome == TOO_FEW_SEEDS for c in comparisons)
    if few:
        why = f"{few} of {len(comparisons)} comparisons not made: their groups share fewer than {MIN_SHARED_SEEDS} seeds"
        note = f"{note}; {why}" if note else why
    if any(c.outcome == "b better" for c in comparisons):
        return Verdict(claim, "not confirmed", comparisons, note)
    if all(c.outcome == "a better" for c in comparisons):
        return Verdict(claim, "confirmed", comparisons, note)
    return Verdict(claim, "inconclusive", comparisons, note)


def _find(groups: list[Group], **want: str) -> Group | None:
    """The one group with these config values (see :meth:`Group.get`)."""
    hits = [g for g in groups if all(g.get(k) == v for k, v in want.items())]
    return hits[0] if len(hits) == 1 else None


CLAIM_KEYS = ("tokenizer.keep_ratio", "tokenizer.scorer", "tokenizer.architecture", "stackformer.model", SEED_KEY)


def default_base(groups: list[Group]) -> dict[str, str]:
    """For every varying key the claims do not compare (steps, grid layout), its most common value: the verdicts
    compare variants at the experiment's common budget and layout."""
    keys = {k for gr in groups for k in gr.key if k not in CLAIM_KEYS}
    out = {}
    for k in sorted(keys):
        values = [gr.get(k) for gr in groups]
        out[k] = max(sorted(set(values)), key=values.count)
    return out


def claims(groups: list[Group], *, base: dict[str, str] | None = None) -> list[Verdict]:
    """The four claims on the groups of the claims experiment (``experiments/claims.yaml``). ``base`` names the
    config values every compared group must share (e.g. the default steps and the 8x8 grid)."""
    base = default_base(groups) if base is None else base
    keep = "tokenizer.keep_ratio"
    scorer = "tokenizer.scorer"
    arch = "tokenizer.architecture"
    model = "stackformer.model"

    def g(**kw: str) -> Group | None:
        return _find(groups, **{**base, **kw})

    out = []
    # 1. learned beats random at the same keep ratio, on reconstruction and generation
    comps = []
    for k in ("0.75", "0.5", "0.25"):
        a, b = g(**{keep: k, scorer: "learned"}), g(**{keep: k, scorer: "random"})
        if a and b:
            comps += [compare(a, b, f, f"learned@{k}", f"random@{k}") for f in ("recon_psnr", "fid")]
    out.append(judge("1. Adaptive (learned) masking beats random masking at the same keep ratio "
                     "(reconstruction PSNR and generation FID).", comps))
    # 2. a moderate mask keeps reconstruction close to the unmasked tokenizer and improves generation
    masked, full = g(**{keep: "0.75", scorer: "learned"}), g(**{keep: "1.0", model: "stackformer"})
    comps = []
    note = ""
    if masked and full:
        psnr = compare(masked, full, "recon_psnr", "keep0.75", "keep1.0")
        close = abs(psnr.a_mean - psnr.b_mean) <= 1.0 if psnr.compared else None
        note = (f"reconstruction within 1 dB of keep 1.0: {'yes' if close else 'no'} ({psnr.a_mean:.2f} vs "
                f"{psnr.b_mean:.2f} dB on seeds {','.join(psnr.seeds)})" if psnr.compared
                else f"reconstruction not judged: {psnr.text()}")
        comps = [compare(masked, full, "fid", "keep0.75", "keep1.0")]
        verdict = judge("2. A moderate mask (keep 0.75) keeps reconstruction close to the unmasked tokenizer "
                        "(within 1 dB PSNR) and improves generation (FID).", comps, note)
        if verdict.verdict == "confirmed" and not close:
            verdict.verdict = "not confirmed" if close is False else "inconclusive"
        out.append(verdict)
    else:
        out.append(judge("2. A moderate mask keeps reconstruction close and improves generation.", []))
    # 3. Stackformer on the kept codes: better and faster than a plain AR model on all codes (the VQGAN baseline)
    ours = g(**{keep: "0.75", scorer: "learned"})
    vqgan = _find(groups, **{**base, arch: "vqgan", model: "fullgrid"})
    comps = ([compare(ours, vqgan, "fid", "Stackformer keep0.75", "VQGAN+full grid"),
              compare(ours, vqgan, "sampling_images_per_s", "Stackformer keep0.75", "VQGAN+full grid")]
             if ours and vqgan else [])
    out.append(judge("3. Stackformer on the kept codes generates better (FID) and faster (sampling images/s) than a "
                     "plain autoregressive model on all codes of a plain VQGAN.", comps))
    # 4. the mask ratio trades sampling speed for quality: fewer tokens -> faster, at some FID cost
    ladder = [g(**{keep: k, scorer: "learned"}) for k in ("0.75", "0.5", "0.25")]
    comps = []
    if all(ladder):
        for hi, lo, kh, kl in zip(ladder, ladder[1:], ("0.75", "0.5"), ("0.5", "0.25")):
            comps.append(compare(lo, hi, "sampling_images_per_s", f"keep{kl}", f"keep{kh}"))
            comps.append(compare(hi, lo, "fid", f"keep{kh}", f"keep{kl}"))
    out.append(judge("4. The mask ratio trades sampling speed for quality: each lower keep ratio samples faster and "
                     "the higher one has the better FID.", comps))
    return out


@dataclass
class Side:
    """Variants off the verdicts' common setting in one or more keys (more generator steps for equal compute;
    another latent grid with its own batch): shown with their own comparisons, not used by the verdicts."""

    title: str
    text: str
    groups: list[Group]
    comparisons: list[Contrast]


def _latent_grid(gr: Group) -> str:
    """``HxW`` of a group's latent grid from its image size and channel multipliers (empty when not logged)."""
    import ast

    try:
        size = int(gr.get("data.image_size"))
        mult = ast.literal_eval(gr.get("tokenizer.ch_mult"))
        side = size // 2 ** (len(mult) - 1)
    except (ValueError, SyntaxError, TypeError):
        return ""
    return f"{side}x{side}"


def _an(grid: str) -> str:
    return ("an " if grid.startswith(("8", "11x", "18x")) else "a ") + grid


def side_comparisons(groups: list[Group], base: dict[str, str]) -> list[Side]:
    """The variants off ``base``, one section per set of settings they change, with their comparisons. Equal
    compute (only ``stackformer.max_steps`` changed): each against its equal-steps self and the VQGAN baseline on
    FID. Anything else (another latent grid, with whatever budget it needs): keep 0.75 against keep 1.0 there, as
    claim 2 at the base setting."""
    keep, scorer, model, steps = "tokenizer.keep_ratio", "tokenizer.scorer", "stackformer.model", "stackformer.max_steps"
    at_base = [gr for gr in groups if all(gr.get(k) == v for k, v in base.items())]
    off: dict[tuple[tuple[str, str], ...], list[Group]] = {}
    for gr in groups:
        diff = tuple((k, gr.get(k)) for k, v in base.items() if gr.get(k) != v)
        if diff:
            off.setdefault(diff if [k for k, _ in diff] != [steps] else ((steps, "*"),), []).append(gr)
    out = []
    for diff, here in off.items():
        comps: list[Contrast] = []
        if diff == ((steps, "*"),):
            vqgan = _find(at_base, **{"tokenizer.architecture": "vqgan", model: "fullgrid"})
            for gr in here:
                name = f"keep{gr.get(keep)} {gr.get(steps)} steps"
                same = _find(at_base, **{keep: gr.get(keep), scorer: gr.get(scorer) or "learned",
                                         "tokenizer.architecture": "mqvae", model: "stackformer"})
                if same:
                    comps.append(compare(gr, same, "fid", name, f"keep{gr.get(keep)} {base[steps]} steps"))
                if vqgan:
                    comps.append(compare(gr, vqgan, "fid", name, f"VQGAN+full grid {base[steps]} steps"))
            out.append(Side("Equal generator training compute", f"`{steps}` scaled by 1 / tokens per image (the "
                            f"others: {base[steps]})", here, comps))
            continue
        masked = _find(here, **{keep: "0.75"}) or _find(here, **{keep: "0.75", scorer: "learned"})
        full = _find(here, **{keep: "1.0"}) or _find(here, **{keep: "1.0", model: "stackformer"})
        if masked and full:
            comps = [compare(masked, full, f, "keep0.75", "keep1.0")
                     for f in ("recon_psnr", "fid", "sampling_images_per_s")]
        grid, base_grid = _latent_grid(here[0]), _latent_grid(at_base[0]) if at_base else ""
        changed = ", ".join(f"`{k}={v}`" for k, v in diff)
        was = ", ".join(f"`{k}={base[k]}`" for k, _ in diff)
        out.append(Side(f"Another layout: {_an(grid) + ' latent grid' if grid else changed}",
                        f"{changed} (the verdicts: {was}" + (f", {_an(base_grid)} latent grid" if base_grid else "")
                        + "); keep 0.75 against keep 1.0 with the same settings otherwise. This table's budget may "
                        "differ from the verdicts': compare its rows with each other", here, comps))
    return out


def table(groups: list[Group], figures: tuple[str, ...] = tuple(FIGURES)) -> list[str]:
    """Markdown rows: one per group, ``mean +/- spread (n seeds)`` per figure."""
    keys = sorted({k for gr in groups for k in gr.key})
    head = ["variant", "seeds", *(FIGURES[f][0] for f in figures)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for gr in groups:
        name = variant_name(gr, keys)
        cells = []
        for f in figures:
            m, s = gr.mean(f), gr.spread(f)
            if m is None:
                cells.append("")
            elif f.endswith(("num_params", ".step")):  # counts: exact
                cells.append(f"{m:,.0f}")
            else:
                cells.append(f"{m:.4g}" + (f" +/- {s:.2g}" if s else ""))
        lines.append("| " + " | ".join([name, ",".join(gr.seeds), *cells]) + " |")
    return lines


def results_markdown(comp: Comparison, verdicts: list[Verdict], groups: list[Group], plots: dict[str, str],
                     extra: dict[str, Any] | None = None, pictures: dict[str, dict[str, str]] | None = None,
                     sides: list[Side] | None = None) -> str:
    """The results document: verdicts in plain words first, then the rules, the table and the plots."""
    lines = [f"# Results: {comp.title}", "", "Generated by `mqgen compare` from the MLflow runs"
             + (f" of grid run `{comp.parent_run_id}`" if comp.parent_run_id else "") + "; no number here is typed by "
             "hand.", "", "## Verdicts", ""]
    for v in verdicts:
        lines.append(f"- **{v.verdict}**: {v.claim}" + (f" ({v.note})" if v.note else ""))
        lines += [f"  - {c.text()}" for c in v.comparisons]
    lines += [""] + [f"- {k}: {v}" for k, v in (extra or {}).items()]
    lines += ["", "## How the verdicts are decided", "", RULES.strip(), "",
              "## Every variant: quality (mean +/- spread over seeds)", "", *table(groups, QUALITY), "",
              "## Every variant: cost (training budget, size, speed)", "",
              ("Equal budgets are stated two ways: the same generator steps and batch (every variant but the "
              "`stackformer.max_steps` ones) and the same generator training compute (those, whose steps scale "
              "with 1 / tokens per image); `generator train s` is the measured wall time of each. The verdicts use "
              "the equal-steps variants. Wall times are of the machine that ran the grid; the variants of one stage train "
              "concurrently there, so compare them with each other, not with a run alone."), "", *table(groups, COST), ""]
    for name, rel in plots.items():
        lines += [f"![{name}]({rel})", ""]
    for side in sides or []:
        lines += [f"## {side.title} (shown, not used by the verdicts)", "", side.text + ".", "",
                  *[f"- {c.text()}" for c in side.comparisons], "",
                  *table(side.groups, ("recon_psnr", "fid", "kid_mean", "sampling_images_per_s",
                                       "tokens_per_image", "stackformer.step", "stackformer.train_wall_s")), ""]
    if pictures:
        names = list(PICTURES)
        lines += ["## Pictures (first seed of each variant)", "", "| variant | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for variant, pics in pictures.items():
            cells = [f"![{n}]({pics[n]})" if n in pics else "" for n in names]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def variant_name(gr: Group, keys: list[str]) -> str:
    """``model=..., keep_ratio=...``: the group's varying values, without the scorer where nothing is masked (a
    VQGAN, or keep 1.0: its value is only the config default there)."""
    unmasked = gr.get("tokenizer.architecture") == "vqgan" or gr.get("tokenizer.keep_ratio") == "1.0"
    return ", ".join(f"{k.split('.')[-1]}={gr.key[k]}" for k in keys
                     if gr.key.get(k) and not (unmasked and k == "tokenizer.scorer")) or "default"


def fetch_pictures(groups: list[Group], out_dir: Any, tracking_uri: str) -> dict[str, dict[str, str]]:
    """The evaluate run's pictures of each group's first seed, copied under ``out_dir/pictures``; returns
    ``{variant: {picture name: relative path}}`` (a variant whose run has no such artifact is left out)."""
    import re
    import tempfile
    from pathlib import Path

    import mlflow

    from infra.storage import atomic_copy

    keys = sorted({k for gr in groups for k in gr.key})
    out: dict[str, dict[str, str]] = {}
    for gr in groups:
        first = min(gr.rows, key=lambda r: r.params.get(SEED_KEY, ""))
        run_id = first.tags.get("mqgen.evaluate.run_id")
        if not run_id:
            continue
        name = variant_name(gr, keys)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
        got: dict[str, str] = {}
        for label, artifact in PICTURES.items():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp,
                                                                tracking_uri=tracking_uri)
                except Exception:  # noqa: BLE001, S112 - an MlflowException or OSError: the picture is left out
                    continue
                rel = f"pictures/{slug}_{Path(artifact).stem}.png"
                (Path(out_dir) / "pictures").mkdir(parents=True, exist_ok=True)
                atomic_copy(local, Path(out_dir) / rel)
                got[label] = rel
        if got:
            out[name] = got
    return out


def extractor_names(groups: list[Group], tracking_uri: str | None) -> list[str]:
    """The feature extractors behind the FID/KID/IS figures: each evaluate run's ``mqgen.extractor`` tag (e.g.
    ``classifier-fashion-mnist``, ``inception-v3-compat``), else the ``evaluate.extractor`` setting."""
    names: set[str] = set()
    client = None
    if tracking_uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
    for gr in groups:
        for row in gr.rows:
            name = ""
            run_id = row.tags.get("mqgen.evaluate.run_id")
            if client is not None and run_id:
                try:
                    name = client.get_run(run_id).data.tags.get("mqgen.extractor", "")
                except Exception:  # noqa: BLE001 - a deleted or unreachable run: fall back to the setting
                    name = ""
            names.add(name or row.params.get("evaluate.extractor", "") or "unknown")
    return sorted(names)


def _extractor_text(names: list[str]) -> str:
    text = ", ".join(names)
    if any(n.startswith("classifier") for n in names):
        text += (" (a classifier extractor is trained on the run's own training split by the train_evaluator stage: "
                 "its FIDs compare the variants here, not with Inception FIDs such as the paper's)")
    return text


def plot_with_error_bars(groups: list[Group], figure: str, path: Any, base: dict[str, str]) -> bool:
    """``figure`` against keep ratio, one line per scorer (the MQ-VAE groups at ``base``), mean -/+ spread over
    seeds; the VQGAN baseline as a horizontal band. False (no file) when no group has the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def at_base(gr: Group) -> bool:
        return all(gr.get(k) == v for k, v in base.items())

    series: dict[str, list[tuple[float, float, float]]] = {}
    for gr in groups:
        m, s = gr.mean(figure), gr.spread(figure)
        if m is None or not at_base(gr) or gr.get("tokenizer.architecture") == "vqgan":
            continue
        name = f"{gr.get('tokenizer.scorer') or 'learned'} scorer, {gr.get('stackformer.model') or 'stackformer'}"
        series.setdefault(name, []).append((float(gr.get("tokenizer.keep_ratio") or "nan"), m, s or 0.0))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(5.2, 3.5), dpi=120)
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
    vq = next((gr for gr in groups if gr.get("tokenizer.architecture") == "vqgan" and at_base(gr)), None)
    if vq is not None and vq.mean(figure) is not None:
        m, s = vq.mean(figure), vq.spread(figure) or 0.0
        ax.axhline(m, color="grey", linestyle="--", label="VQGAN + full grid")
        ax.axhspan(m - s, m + s, color="grey", alpha=0.15)
    ax.set_xlabel("keep ratio (share of latent regions kept)")
    ax.set_ylabel(f"{FIGURES[figure][0]} ({FIGURES[figure][1]} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def write_results(comp: Comparison, out_dir: Any, tracking_uri: str | None = None) -> Any:
    """``results.md`` and its plots (``plots/claims_*.png``) in ``out_dir`` (a report folder), with each variant's
    pictures when ``tracking_uri`` is given; returns the document's path."""
    from pathlib import Path

    from infra.storage import atomic_write_bytes

    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    groups = group_rows(comp)
    base = default_base(groups)
    plots = {}
    for figure in ("fid", "sampling_images_per_s", "recon_psnr"):
        rel = f"plots/claims_{figure}_vs_keep_ratio.png"
        if plot_with_error_bars(groups, figure, out / rel, base):
            plots[FIGURES[figure][0]] = rel
    pictures = fetch_pictures(groups, out, tracking_uri) if tracking_uri else None
    doc = results_markdown(comp, claims(groups, base=base), groups, plots,
                           {"compared at": ", ".join(f"{k}={v}" for k, v in base.items()) or "the defaults",
                            "FID, KID and IS features": _extractor_text(extractor_names(groups, tracking_uri))},
                           pictures=pictures, sides=side_comparisons(groups, base))
    atomic_write_bytes(out / "results.md", doc.encode())
    return out / "results.md"
