"""The claims' verdicts from grouped runs: means and spreads over seeds, the overlap rule, each verdict reachable,
and the document that states them (synthetic runs: the rules, not MLflow, are under test here)."""

from __future__ import annotations

import itertools
from pathlib import Path

from flows.report import Comparison, RunRow
from flows.results import claims, default_base, group_rows, results_markdown


def _row(i: int, params: dict[str, str], metrics: dict[str, float]) -> RunRow:
    return RunRow(run_id=f"r{i}", name=f"r{i}", status="FINISHED", params=params, metrics=metrics)


def _runs(fid_learned: float, fid_random: float, noise: float) -> Comparison:
    """The claims grid's layout with a FID for the learned and the random scorer, seeds 0 and 1."""
    rows, i = [], 0
    keys = ("tokenizer.keep_ratio", "tokenizer.scorer", "tokenizer.architecture", "stackformer.model", "seed",
            "stackformer.max_steps")
    variants = [(k, s, "mqvae", "stackformer") for k, s in itertools.product(("0.75", "0.5", "0.25"),
                                                                            ("learned", "random"))]
    variants += [("1.0", "learned", "mqvae", "stackformer"), ("1.0", "learned", "mqvae", "fullgrid"),
                 ("1.0", "learned", "vqgan", "fullgrid")]
    for (keep, scorer, arch, model), seed in itertools.product(variants, ("0", "1")):
        tokens = {"0.75": 48, "0.5": 32, "0.25": 16, "1.0": 64}[keep]
        fid = (fid_learned if scorer == "learned" else fid_random) + float(keep == "0.25") + 0.5 * float(keep == "0.5")
        if keep == "1.0":
            fid = fid_learned + (3.0 if arch == "vqgan" else 0.6)
        jitter = noise * (1 if seed == "0" else -1)
        rows.append(_row(i, dict(zip(keys, (keep, scorer, arch, model, seed, "600"))), {
            "fid": fid + jitter, "fid_boot_std": 0.05, "recon_psnr": 20.0 - (0.0 if scorer == "learned" else 1.0)
            - (1.0 - float(keep)) + jitter, "sampling_images_per_s": 6400.0 / tokens + jitter}))
        i += 1
    rows.append(_row(i, dict(zip(keys, ("0.75", "learned", "mqvae", "stackformer", "0", "800"))),
                     {"fid": 1.0, "recon_psnr": 30.0, "sampling_images_per_s": 1.0}))  # equal compute: not judged
    varying = sorted(keys)
    return Comparison(title="claims", rows=rows, parent_run_id="grid", varying=varying)


def test_clear_differences_confirm_the_claims_and_the_document_says_so() -> None:
    comp = _runs(fid_learned=5.0, fid_random=7.0, noise=0.05)
    groups = group_rows(comp)
    assert len(groups) == 10 and all(len(g.rows) == 2 for g in groups if g.get("stackformer.max_steps") == "600")
    assert default_base(groups) == {"stackformer.max_steps": "600"}
    verdicts = {v.claim[0]: v for v in claims(groups)}
    assert verdicts["1"].verdict == "confirmed", verdicts["1"]
    assert verdicts["3"].verdict == "confirmed", verdicts["3"]
    assert verdicts["4"].verdict == "confirmed", verdicts["4"]
    # claim 2: keep 0.75 (FID 5.0) beats keep 1.0 (5.6) and its PSNR (19.75) is within 1 dB of keep 1.0's (20)
    assert verdicts["2"].verdict == "confirmed", verdicts["2"]
    text = results_markdown(comp, list(verdicts.values()), groups, {"fid": "plots/fid.png"})
    assert "**confirmed**: 1. Adaptive" in text and "![fid](plots/fid.png)" in text and "+/-" in text


def test_a_reversed_difference_is_not_confirmed_and_overlap_is_inconclusive() -> None:
    reversed_ = {v.claim[0]: v.verdict for v in claims(group_rows(_runs(fid_learned=7.0, fid_random=5.0, noise=0.05)))}
    assert reversed_["1"] == "not confirmed"
    noisy = {v.claim[0]: v.verdict for v in claims(group_rows(_runs(fid_learned=5.0, fid_random=5.3, noise=0.4)))}
    assert noisy["1"] == "inconclusive"  # seeds 0.8 apart: the 0.3 difference is inside the spread
    missing = claims(group_rows(Comparison(title="x", rows=[], parent_run_id=None, varying=[])))
    assert {v.verdict for v in missing} == {"not testable"}


def test_the_results_document_and_its_error_bar_plots_are_written(tmp_path, monkeypatch) -> None:
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    from flows.results import group_rows, write_results

    drawn: dict[str, list[ErrorbarContainer]] = {}
    real_savefig = Figure.savefig

    def savefig(fig, path, *args, **kwargs):  # the plot as drawn, before it becomes pixels
        drawn[Path(path).name] = [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    runs = _runs(fid_learned=5.0, fid_random=7.0, noise=0.05)
    path = write_results(runs, tmp_path)
    text = path.read_text()
    assert text.startswith("# Results: claims") and "## Verdicts" in text and "stackformer.max_steps=600" in text
    for rel in ("plots/claims_fid_vs_keep_ratio.png", "plots/claims_sampling_images_per_s_vs_keep_ratio.png"):
        assert f"]({rel})" in text and (tmp_path / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the FID plot: one error-bar line per scorer, each bar the group's spread over seeds either side of its mean
    bars = drawn["claims_fid_vs_keep_ratio.png"]
    assert {c.get_label() for c in bars} >= {"learned scorer, stackformer", "random scorer, stackformer"}
    learned = next(c for c in bars if c.get_label() == "learned scorer, stackformer")
    assert learned.has_yerr
    group = next(g for g in group_rows(runs) if g.get("tokenizer.scorer") == "learned"
                 and g.get("tokenizer.keep_ratio") == "0.75" and g.get("stackformer.model") in (None, "stackformer"))
    segments = learned.lines[2][0].get_segments()  # one vertical segment per keep ratio
    heights = sorted(round(float(seg[1][1] - seg[0][1]), 6) for seg in segments)
    assert round(2 * group.spread("fid"), 6) in heights and all(h > 0 for h in heights)


def test_results_show_each_variants_pictures_from_its_evaluate_run_and_the_cost_table(tmp_path) -> None:
    """Real MLflow (sqlite + local artifacts): the evaluate run's sample grid of the first seed is copied beside
    results.md and shown per variant; parameters and steps print as exact counts."""
    from PIL import Image

    from flows.results import write_results
    from infra.tracking import Tracker

    tracker = Tracker(tmp_path / "root", "mqgen")
    client = tracker.client
    run_id = client.create_run(tracker.experiment_id, tags={"mqgen.extractor": "classifier-fashion-mnist"}).info.run_id
    pic = tmp_path / "samples_grid.png"
    Image.new("L", (8, 8), 200).save(pic)
    client.log_artifact(run_id, str(pic), "pictures")
    comp = _runs(fid_learned=5.0, fid_random=7.0, noise=0.05)
    for row in comp.rows:
        row.metrics["tokenizer.num_params"] = 249012.0
        if row.params["tokenizer.keep_ratio"] == "0.75" and row.params["seed"] == "0":
            row.tags["mqgen.evaluate.run_id"] = run_id
    out = tmp_path / "report"
    text = write_results(comp, out, tracking_uri=tracker.uri).read_text()
    assert "## Pictures (first seed of each variant)" in text and "249,012" in text
    shown = [line for line in text.splitlines() if "keep_ratio=0.75" in line and "![samples]" in line]
    assert len(shown) == 3  # the keep 0.75 variants tagged above (learned, random, and the 800-step one)
    assert not [line for line in text.splitlines() if "keep_ratio=0.5" in line and "![" in line]  # no run: no row
    rel = shown[0].split("![samples](")[1].split(")")[0]
    assert (out / rel).read_bytes() == pic.read_bytes()
    assert "mask overlay" not in shown[0].split("![samples]")[1]  # not logged: left out, not a broken link
    # the features behind FID are named: the evaluate run's tag, else (untagged rows) the evaluate.extractor setting
    named = next(line for line in text.splitlines() if line.startswith("- FID, KID and IS features: "))
    assert named.startswith("- FID, KID and IS features: classifier-fashion-mnist, unknown (a classifier extractor")
    assert text.index(named) < text.index("## How the verdicts are decided")


def test_a_guidance_grid_is_plotted_against_the_guidance_scale(tmp_path) -> None:
    """Without a keep-ratio axis the report's x axis is the varying numeric key: the class-accuracy curve."""
    from flows.report import write_report, x_key

    rows = [_row(i, {"evaluate.sampling.guidance_scale": str(s), "tokenizer.keep_ratio": "0.5"},
                 {"fid": 5.0 + s, "sample_class_accuracy": 0.4 + 0.1 * s}) for i, s in enumerate((0.0, 1.0, 3.0))]
    comp = Comparison(title="guidance", rows=rows, parent_run_id=None, varying=["evaluate.sampling.guidance_scale"])
    assert x_key(comp) == "evaluate.sampling.guidance_scale"
    paths = write_report(comp, tmp_path / "report")
    plot = paths["sample_class_accuracy"]
    assert plot.name == "sample_class_accuracy_vs_guidance_scale.png" and plot.read_bytes()[:4] == b"\x89PNG"
    header = next(line for line in paths["md"].read_text().splitlines() if line.startswith("| run |"))
    assert "sample_class_accuracy" in header and "| 0.7 |" in paths["md"].read_text()


def test_a_part_of_the_grid_is_judged_on_what_it_has() -> None:
    """The headline part alone (keep 0.75 learned vs the VQGAN baseline; the scorer does not vary, so it is not a
    key of the groups): claim 3 is judged from the runs' parameters, the others are not testable."""
    comp = _runs(fid_learned=5.0, fid_random=7.0, noise=0.05)
    keep = [r for r in comp.rows if r.params["stackformer.max_steps"] == "600" and r.params["tokenizer.scorer"] ==
            "learned" and (r.params["tokenizer.keep_ratio"] == "0.75" or r.params["tokenizer.architecture"] == "vqgan")]
    part = Comparison(title="part", rows=keep, parent_run_id="g",
                      varying=["seed", "stackformer.model", "tokenizer.architecture", "tokenizer.keep_ratio"])
    verdicts = {v.claim[0]: v.verdict for v in claims(group_rows(part))}
    assert verdicts == {"1": "not testable", "2": "not testable", "3": "confirmed", "4": "not testable"}


def test_comparisons_show_the_per_seed_paired_difference() -> None:
    from flows.results import compare

    def group(fids: list[float]):
        rows = [_row(i, {"seed": str(i)}, {"fid": f}) for i, f in enumerate(fids)]
        return group_rows(Comparison(title="g", rows=rows, parent_run_id=None, varying=["seed"]))[0]

    # seed-to-seed swings hide a difference that every seed shows: overlap unpaired, 3 of 3 seeds paired
    c = compare(group([7.0, 6.9, 9.3]), group([6.1, 6.4, 8.1]), "fid", "mq", "vq")
    assert c.outcome == "overlap" and [round(d, 2) for d in c.paired] == [0.9, 0.5, 1.2]
    assert "paired by seed: a - b = +0.867 +/- 0.35 over 3 seeds, mq better in 0" in c.text()


def test_groups_are_compared_on_the_seeds_both_ran() -> None:
    """As in the claims grid, the headline arm (keep 0.75, learned) and the VQGAN baseline ran a third seed that keep
    1.0 did not, and seed 2's evaluator happens to give lower FIDs. Over each group's own seeds keep 0.75 would
    beat keep 1.0 (claim 2 confirmed); over the seeds both ran the difference is inside the spread."""
    comp = _runs(fid_learned=5.0, fid_random=7.0, noise=0.25)
    headline = {"tokenizer.keep_ratio": "0.75", "tokenizer.scorer": "learned", "tokenizer.architecture": "mqvae",
                "stackformer.model": "stackformer", "stackformer.max_steps": "600", "seed": "2"}
    vqgan = {**headline, "tokenizer.keep_ratio": "1.0", "tokenizer.architecture": "vqgan", "stackformer.model": "fullgrid"}
    comp.rows += [_row(100, headline, {"fid": 4.5, "fid_boot_std": 0.05, "recon_psnr": 19.75,
                                       "sampling_images_per_s": 133.0}),
                  _row(101, vqgan, {"fid": 7.5, "fid_boot_std": 0.05, "recon_psnr": 20.0,
                                    "sampling_images_per_s": 100.0})]
    groups = group_rows(comp)
    masked = next(g for g in groups if all(g.get(k) == v for k, v in headline.items() if k != "seed"))
    full = next(g for g in groups if g.get("tokenizer.keep_ratio") == "1.0" and g.get("stackformer.model") ==
                "stackformer")
    assert masked.seeds == ["0", "1", "2"] and full.seeds == ["0", "1"]
    assert full.mean("fid") - masked.mean("fid") > masked.spread("fid") + full.spread("fid")  # unpaired: a better
    verdicts = {v.claim[0]: v for v in claims(groups)}
    assert verdicts["2"].verdict == "inconclusive", verdicts["2"]
    assert "keep0.75 5 +/- 0.35 vs keep1.0 5.6 +/- 0.35 on seeds 0,1 (n=2) -> overlap" in \
        verdicts["2"].comparisons[0].text()
    assert "on seeds 0,1,2 (n=3) -> a better" in verdicts["3"].comparisons[0].text()  # both ran 3 seeds: all 3 used
    # fewer than 2 shared seeds: not compared, and the verdict says why
    comp.rows = [r for r in comp.rows if not (r.params["tokenizer.keep_ratio"] == "1.0" and r.params["seed"] == "0"
                                              and r.params["stackformer.model"] == "stackformer")]
    lone = {v.claim[0]: v for v in claims(group_rows(comp))}["2"]
    assert lone.verdict == "inconclusive" and "1 of 1 comparisons not made" in lone.note
    assert lone.comparisons[0].text() == ("FID: keep0.75 ran seeds 0,1,2, keep1.0 seeds 1: 1 shared, a comparison "
                                          "needs 2 -> not compared (inconclusive)")


def test_equal_compute_and_another_latent_grid_get_their_own_comparisons() -> None:
    """Variants off the common setting (more generator steps; a 16x16 latent grid) are compared in their own
    sections: the equal-compute variant against its equal-steps self and the VQGAN baseline, the other layout's
    keep 0.75 against its keep 1.0; the verdicts still use the common setting only."""
    from flows.results import side_comparisons

    comp = _runs(fid_learned=5.0, fid_random=7.0, noise=0.05)
    i = len(comp.rows)
    comp.rows.append(_row(i, {**comp.rows[-1].params, "seed": "1"}, dict(comp.rows[-1].metrics)))  # 800 steps, 2 seeds
    i += 1
    for r in comp.rows:
        r.params.update({"data.image_size": "32", "tokenizer.ch_mult": "[1, 2, 2]", "stackformer.batch_size": "64"})
    for keep, seed in itertools.product(("0.75", "1.0"), ("0", "1")):
        comp.rows.append(_row(i, {"tokenizer.keep_ratio": keep, "tokenizer.scorer": "learned",
                                  "tokenizer.architecture": "mqvae", "stackformer.model": "stackformer", "seed": seed,
                                  "stackformer.max_steps": "600", "data.image_size": "32",
                                  "tokenizer.ch_mult": "[1, 2]", "stackformer.batch_size": "32"},
                              {"fid": (3.0 if keep == "0.75" else 9.0) + int(seed), "recon_psnr": 25.0,
                               "sampling_images_per_s": 10.0 if keep == "0.75" else 5.0}))
        i += 1
    comp.varying += ["tokenizer.ch_mult", "stackformer.batch_size"]  # the 16x16 table trains at its own batch
    groups = group_rows(comp)
    base = default_base(groups)
    assert base == {"stackformer.batch_size": "64", "stackformer.max_steps": "600", "tokenizer.ch_mult": "[1, 2, 2]"}
    # the verdicts are unchanged by the extra layout (its keep 1.0 FID of 9.0 would otherwise break claim 2)
    assert {v.claim[0]: v.verdict for v in claims(groups, base=base)}["2"] == "confirmed"
    sides = {s.title: s for s in side_comparisons(groups, base)}
    assert set(sides) == {"Equal generator training compute", "Another layout: a 16x16 latent grid"}
    eq = sides["Equal generator training compute"]
    assert [(c.a, c.b, c.outcome) for c in eq.comparisons] == [
        ("keep0.75 800 steps", "keep0.75 600 steps", "a better"),  # FID 1.0 against 5.0 and 8.0
        ("keep0.75 800 steps", "VQGAN+full grid 600 steps", "a better")]
    assert [g.get("stackformer.max_steps") for g in eq.groups] == ["800"]
    grid = sides["Another layout: a 16x16 latent grid"]
    outcomes = {c.figure: c.outcome for c in grid.comparisons}
    assert outcomes == {"recon_psnr": "overlap", "fid": "a better", "sampling_images_per_s": "a better"}
    assert len(grid.groups) == 2 and grid.text.startswith(
        "`stackformer.batch_size=32`, `tokenizer.ch_mult=[1, 2]` (the verdicts: `stackformer.batch_size=64`, "
        "`tokenizer.ch_mult=[1, 2, 2]`, an 8x8 latent grid)")
    text = results_markdown(comp, claims(groups, base=base), groups, {}, sides=list(sides.values()))
    assert "## Another layout: a 16x16 latent grid (shown, not used by the verdicts)" in text
    assert "keep0.75 3.5 +/- 0.71 vs keep1.0 9.5 +/- 0.71 on seeds 0,1 (n=2) -> a better" in text
    # nothing is masked at keep 1.0 or in a VQGAN: the scorer's default value is not part of their names
    assert "| batch_size=64, max_steps=600, model=fullgrid, architecture=vqgan, ch_mult=[1, 2, 2], keep_ratio=1.0 |" \
        in text
    assert "| batch_size=64, max_steps=600, model=stackformer, architecture=mqvae, ch_mult=[1, 2, 2], keep_ratio=0.75, " \
           "scorer=random |" in text


def test_a_large_grid_plot_keeps_every_series_legible(tmp_path) -> None:
    """A grid of many series (every setting but the keep ratio: 9 here, 22 in the claims grid): short labels, a legend
    under the axes that
    makes the picture taller instead of covering the data."""
    from PIL import Image

    from flows.report import _series, plot_png

    comp = _runs(fid_learned=5.0, fid_random=7.0, noise=0.05)
    series = _series(comp)
    assert len(series) == 9 and all(name.startswith("seed=") and "tokenizer." not in name for name in series)
    small = Comparison(title="two", rows=[r for r in comp.rows if r.params["tokenizer.scorer"] == "random"
                                          and r.params["tokenizer.keep_ratio"] != "1.0"],
                       parent_run_id=None, varying=comp.varying)
    assert plot_png(small, "fid", "FID", tmp_path / "small.png") and plot_png(comp, "fid", "FID", tmp_path / "big.png")
    with Image.open(tmp_path / "small.png") as a, Image.open(tmp_path / "big.png") as b:
        assert b.size[1] > a.size[1] + 100  # the 9-line legend is below the axes, not over them
