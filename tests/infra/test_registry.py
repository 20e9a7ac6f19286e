"""The model registry and the promotion gate on a real MLflow store (SQLite): registration is idempotent, the
gate moves the alias only beyond the noise and only on the same evaluation protocol, a registered model loads
back by alias (bundle and MLflow pyfunc) with its weights verified, and a tampered bundle is refused."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from infra.config import resolve, stackformer_config
from infra.refs import StackformerOutput, load_generator
from infra.storage import sha256_file
from tests.fixtures.tokenize_data import make_tokenizer


def _generator(cfg, tokenizer, out: Path, seed: int) -> StackformerOutput:
    from dataclasses import asdict

    from safetensors.torch import save_file

    from models.stackformer import Stackformer

    torch.manual_seed(seed)
    mc = stackformer_config(cfg.stackformer, tokenizer, num_classes=10)
    model = Stackformer(mc)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return StackformerOutput(path=str(out), key=f"g{seed}", weights=str(weights), sha256=sha256_file(weights), step=1,
                             model="stackformer", model_config=asdict(mc), tokenizer_sha256=tokenizer.sha256,
                             num_classes=mc.num_classes)


def _evaluation(fid: float, se: float | None, n: int = 64) -> dict:
    ev = {"extractor": "classifier-test", "extractor_info": {"weights_sha256": "e" * 64}, "n": n,
          "set_sizes": {"reference": 256}, "data": {"reference_set_hash": "r" * 16}, "metrics": {"fid": fid}}
    if se is not None:
        ev["fid_interval"] = {"std": se, "low": fid - 2 * se, "high": fid + 2 * se, "level": 0.95}
    return ev


@pytest.fixture
def setting(run_root: Path):
    from infra.tracking import Tracker

    cfg = resolve("tiny", overrides=[f"run.root={run_root}", "registry.name=gate"])
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    tokenizer = make_tokenizer(cfg)
    return cfg, tracker, tokenizer


def _register(cfg, tracker, tokenizer, root: Path, seed: int):
    from infra import registry

    run = tracker.stage_run("train_stackformer", f"key{seed}")
    gen = _generator(cfg, tokenizer, root / f"gen{seed}", seed)
    version = registry.register(tracker, cfg, kind="stackformer", run_id=run.run_id, tokenizer=tokenizer, generator=gen)
    run.finish()
    ev_run = tracker.stage_run("evaluate", f"eval{seed}")
    ev_run.finish()
    return gen, version, ev_run.run_id


def test_the_gate_moves_the_alias_only_beyond_the_noise_and_on_the_same_protocol(setting, run_root: Path) -> None:
    from infra import registry

    cfg, tracker, tok = setting
    g1, v1, e1 = _register(cfg, tracker, tok, run_root, 1)
    assert (v1.name, v1.version) == ("mqgen-stackformer-gate", "1")
    # registering the same weights from the same run again is the same version
    again = registry.register(tracker, cfg, kind="stackformer", run_id=v1.run_id, tokenizer=tok, generator=g1)
    assert again.version == "1"

    def gate(version, ev, run_id, c=cfg):
        return registry.promote(tracker, c, generator=None, tokenizer_version=None, version=version,
                                evaluation=ev, evaluate_run_id=run_id)

    first = gate(v1, _evaluation(10.0, 0.5), e1)
    assert first.decision == "first" and registry.alias_version(tracker, v1.name, "champion").version == "1"

    _, v2, e2 = _register(cfg, tracker, tok, run_root, 2)
    close = gate(v2, _evaluation(9.2, 0.5), e2)  # 0.8 better; the noise: 1.96 * sqrt(0.5^2 + 0.5^2) = 1.39
    assert close.decision == "kept" and close.threshold == pytest.approx(1.96 * (0.5 ** 2 * 2) ** 0.5)
    assert registry.alias_version(tracker, v1.name, "champion").version == "1"
    point = dataclasses.replace(cfg, registry=dataclasses.replace(cfg.registry, rule="point"))
    # the same figures under rule=point (no noise term) would have moved it
    assert registry.decide(point, close.new, close.champion)[0] == "promoted"

    _, v3, e3 = _register(cfg, tracker, tok, run_root, 3)
    other_protocol = gate(v3, _evaluation(2.0, 0.5, n=128), e3)  # more samples: another protocol
    assert other_protocol.decision == "not comparable"
    assert registry.alias_version(tracker, v1.name, "champion").version == "1"

    _, v4, e4 = _register(cfg, tracker, tok, run_root, 4)
    better = gate(v4, _evaluation(7.0, 0.5), e4)
    assert better.decision == "promoted" and better.champion_version == "1"
    assert registry.alias_version(tracker, v1.name, "champion").version == "4"
    # the decision is on the version and on the evaluate run
    mv = tracker.client.get_model_version(v4.name, "4")
    assert mv.tags[registry.TAG_DECISION].startswith("promoted")
    tags = tracker.client.get_run(e4).data.tags
    assert tags["mqgen.promotion.decision"] == "promoted" and float(tags["mqgen.promotion.champion_fid"]) == 10.0
    # without a bootstrap interval, rule=interval refuses to decide and keeps the champion
    _, v5, e5 = _register(cfg, tracker, tok, run_root, 5)
    assert gate(v5, _evaluation(1.0, None), e5).decision == "kept"
    assert registry.alias_version(tracker, v1.name, "champion").version == "4"

    # a new protocol with a way to evaluate the champion on it (the flow's: the evaluate stage on its registered
    # weights): the champion's figure there is recorded on it, and the gate decides on the two
    asked = []

    def rescore(holder):
        asked.append(holder.version)
        return _evaluation(3.0, 0.1, n=128), e4

    _, v6, e6 = _register(cfg, tracker, tok, run_root, 6)
    d6 = registry.promote(tracker, cfg, generator=None, tokenizer_version=None, version=v6,
                          evaluation=_evaluation(2.0, 0.1, n=128), evaluate_run_id=e6, rescore=rescore)
    assert asked == ["4"] and d6.decision == "promoted" and d6.champion.fid == 3.0
    assert "re-evaluated on this protocol" in d6.reason
    pid = registry.protocol_id(_evaluation(3.0, 0.1, n=128))
    assert tracker.client.get_model_version(v1.name, "4").tags[f"{registry.EVAL_PREFIX}{pid}.fid"] == "3.0"
    # a champion that fails to evaluate (or evaluates on other settings) is kept, with the reason
    _, v7, e7 = _register(cfg, tracker, tok, run_root, 7)

    def broken(holder):
        raise RuntimeError("its tokenizer does not fit this data")

    d7 = registry.promote(tracker, cfg, generator=None, tokenizer_version=None, version=v7,
                          evaluation=_evaluation(0.5, 0.1, n=256), evaluate_run_id=e7, rescore=broken)
    assert d7.decision == "not comparable" and "does not fit this data" in d7.reason
    d7b = registry.promote(tracker, cfg, generator=None, tokenizer_version=None, version=v7,
                           evaluation=_evaluation(0.5, 0.1, n=256), evaluate_run_id=e7,
                           rescore=lambda h: (_evaluation(0.4, 0.1, n=64), e6))
    assert d7b.decision == "not comparable" and "another protocol" in d7b.reason
    assert registry.alias_version(tracker, v1.name, "champion").version == "6"
    # the re-evaluation runs outside the gate's lock: when another gate moves the alias meanwhile, this one decides
    # against the new holder, never overwriting it on the old one's figure
    _, v8, e8 = _register(cfg, tracker, tok, run_root, 8)
    _, v9, e9 = _register(cfg, tracker, tok, run_root, 9)

    def meanwhile(holder):
        registry.record_evaluation(tracker, v9, _evaluation(0.1, 0.01, n=512), e9)
        tracker.client.set_registered_model_alias(v1.name, "champion", v9.version)
        return _evaluation(9.0, 0.1, n=512), e6  # v6's figure: far worse than v8's

    d8 = registry.promote(tracker, cfg, generator=None, tokenizer_version=None, version=v8,
                          evaluation=_evaluation(0.5, 0.01, n=512), evaluate_run_id=e8, rescore=meanwhile)
    assert d8.decision == "kept" and d8.champion_version == "9" and d8.champion.fid == 0.1
    assert registry.alias_version(tracker, v1.name, "champion").version == "9"


def test_a_registered_model_loads_by_alias_verified_and_a_tampered_bundle_is_refused(setting, run_root: Path,
                                                                                     tmp_path: Path,
                                                                                     monkeypatch) -> None:
    import mlflow.pyfunc
    import pandas as pd

    from infra import registry
    from infra.bundle import BundleError, read_bundle, write_bundle

    cfg, tracker, tok = setting
    gen, v1, e1 = _register(cfg, tracker, tok, run_root, 1)
    registry.promote(tracker, cfg, generator=gen, tokenizer_version=None, version=v1,
                     evaluation=_evaluation(5.0, 0.1), evaluate_run_id=e1)
    with registry.load_bundle("champion", cfg) as (bundle, version):
        assert version.version == "1" and bundle.generator.sha256 == gen.sha256
        assert bundle.tokenizer.sha256 == tok.sha256
        model = load_generator(bundle.generator)
    ref_state = load_generator(gen).state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())

    # MLflow's own loader runs the model from its code (no pickle) and samples images. (MLflow's set_*_uri also
    # set the environment variables, which every later Tracker would follow: restored after the load.)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracker.uri)
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/mqgen-stackformer-gate@champion")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    images = pyfunc.predict(pd.DataFrame({"n": [3], "class": [2], "seed": [0]}))
    assert images.shape == (3, 1, 16, 16) and str(images.dtype) == "uint8"
    rows = pd.DataFrame({"n": [1, 2], "class": [2, 0], "seed": [0, 1], "guidance_scale": [1.0, None]})
    assert pyfunc.predict(rows).shape == (3, 1, 16, 16)  # an empty guidance cell means 1 (no guidance)
    with pytest.raises(Exception, match="classifier-free guidance"):  # this model was trained without it
        pyfunc.predict(pd.DataFrame({"n": [1], "class": [2], "guidance_scale": [3.0]}))

    # an exported folder with one weight byte changed is refused, naming the file
    folder = write_bundle(tmp_path / "exported", tokenizer=tok, generator=gen)
    weights = folder / "generator" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"generator/model\.safetensors: sha256"):
        read_bundle(folder)
    # an index that points outside its folder is refused before anything is read
    index = folder / "model_index.json"
    import json

    doc = json.loads(index.read_text())
    doc2 = copy.deepcopy(doc)
    doc2["components"]["generator"]["weights"] = "../../etc/passwd"
    index.write_text(json.dumps(doc2))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(folder)
    # a registered sha256 that differs from the folder's is refused too
    index.write_text(json.dumps(doc))
    weights.write_bytes(Path(gen.weights).read_bytes())
    with pytest.raises(BundleError, match="not the registered"):
        read_bundle(folder, expected_sha256={"generator": "0" * 64})
    assert read_bundle(folder).generator.sha256 == gen.sha256


# One promotion gate in its own process: builds the config and the tracker on the shared root, widens the window
# between reading the alias holder and moving the alias (the seam: ``registry.decide``, which runs inside it), says
# it is ready, waits for the start moment the test sends on stdin, and prints its decision as JSON.
GATE_PROCESS = r"""
import json, sys, time
from infra import registry
from infra.config import resolve
from infra.tracking import Tracker

spec = json.loads(sys.argv[1])
cfg = resolve("tiny", overrides=[f"run.root={spec['root']}", "registry.name=gate"])
tracker = Tracker(cfg.run.root, cfg.run.experiment)
version = registry.resolve_version(tracker, f"models:/mqgen-stackformer-gate/{spec['version']}")
decide = registry.decide

def slow_decide(*a, **k):
    time.sleep(2.0)  # another gate that read the same holder would decide on stale facts in this window
    return decide(*a, **k)

registry.decide = slow_decide
ev = {"extractor": "classifier-test", "extractor_info": {"weights_sha256": "e" * 64}, "n": 64,
      "set_sizes": {"reference": 256}, "data": {"reference_set_hash": "r" * 16},
      "metrics": {"fid": spec["fid"]}, "fid_interval": {"std": 0.1, "low": 0.0, "high": 99.0, "level": 0.95}}
print("ready", flush=True)
start = float(sys.stdin.readline())
while time.time() < start:
    time.sleep(0.005)
d = registry.promote(tracker, cfg, generator=None, tokenizer_version=None, version=version, evaluation=ev,
                     evaluate_run_id=spec["run_id"])
print(json.dumps({"version": version.version, "decision": d.decision, "champion": d.champion_version}))
"""


def test_two_gates_at_once_decide_one_after_the_other(setting, run_root: Path) -> None:
    """Two pipelines finishing their evaluation at the same moment (a scheduled retrain beside a manual run on one
    root): the gates run one after the other, so exactly one version is "first" and the other is compared with it;
    the alias ends on the better version whichever gate ran first (without the lock both would see no holder, both
    call themselves "first", and the alias would end on whichever wrote last)."""
    import json
    import subprocess
    import sys
    import time

    from infra import registry

    cfg, tracker, tok = setting
    _, v1, e1 = _register(cfg, tracker, tok, run_root, 1)
    _, v2, e2 = _register(cfg, tracker, tok, run_root, 2)
    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", GATE_PROCESS,
                               json.dumps({"root": str(run_root), "version": v.version, "fid": fid, "run_id": run_id})],
                              cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v, fid, run_id in ((v1, 10.0, e1), (v2, 5.0, e2))]
    for p in procs:  # both imported, resolved and holding their version: now start them at one moment
        seen = []
        while not seen or seen[-1] not in ("ready", ""):
            seen.append(p.stdout.readline().strip())
        assert seen[-1] == "ready", "\n".join(seen) + p.stderr.read()[-3000:]
    start = time.time() + 0.5
    for p in procs:
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    # each gate holds its decision for 2 s: one after the other they take at least 4 s from the common start
    assert time.time() - start >= 4.0
    by_decision = {o["decision"]: o for o in outs}
    assert sorted(by_decision) in (["first", "promoted"], ["first", "kept"]), outs
    first = by_decision["first"]
    second = next(o for o in outs if o is not first)
    assert second["champion"] == first["version"], outs  # the second gate saw the first one's alias
    assert registry.alias_version(tracker, v1.name, "champion").version == v2.version  # FID 5 beats 10 by > noise


def test_a_champion_is_only_re_evaluated_on_data_it_can_draw() -> None:
    """The flow's re-evaluation refuses (the gate then says "not comparable" with this reason) a champion of another
    image size or channel count, or of another conditioning than the new model's."""
    from types import SimpleNamespace as NS

    from flows.publish import _check_fits

    holder = NS(name="mqgen-stackformer-x", version="3")
    ingest = NS(image_size=32, channels=1)

    def bundle(resolution=32, channels=1, text=""):
        return NS(tokenizer=NS(model_config={"resolution": resolution, "in_channels": channels}),
                  generator=NS(text_tokenizer=text))

    _check_fits(holder, bundle(), ingest, NS(text_tokenizer=""))  # fits: no error
    with pytest.raises(ValueError, match="64 px, 1 channel.*this run's data is 32 px"):
        _check_fits(holder, bundle(resolution=64), ingest, NS(text_tokenizer=""))
    with pytest.raises(ValueError, match="3 channel"):
        _check_fits(holder, bundle(channels=3), ingest, NS(text_tokenizer=""))
    with pytest.raises(ValueError, match="it reads captions and the new model does not"):
        _check_fits(holder, bundle(text="tok.json"), ingest, NS(text_tokenizer=""))
    with pytest.raises(ValueError, match="holds no generator"):
        _check_fits(holder, NS(tokenizer=bundle().tokenizer, generator=None), ingest, NS(text_tokenizer=""))


@pytest.mark.long  # run by .ci/run after the README's test command (see pyproject.toml)
def test_one_evaluation_recorded_by_several_processes_at_once_is_stored_once(setting, run_root: Path) -> None:
    """Two runs of one config finishing together (a manual run beside a scheduled one) record the same evaluation
    on the same version at the same moment: MLflow's SQL store inserts a new tag after looking for it, so the
    second insert of a key can hit its UNIQUE constraint. Both must succeed, with the tags once."""
    import multiprocessing

    from infra import registry

    cfg, tracker, tok = setting
    _, version, run_id = _register(cfg, tracker, tok, run_root, 3)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_record, args=(str(run_root), version.name, version.version, run_id, start, results))
             for _ in range(6)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert outcomes == ["ok"] * 6, outcomes
    got = tracker.client.get_model_version(version.name, version.version).tags
    assert sum(k.startswith(registry.EVAL_PREFIX) and k.endswith(".fid") for k in got) == 1


def _record(root: str, name: str, number: str, run_id: str, start, results) -> None:
    from infra import registry
    from infra.tracking import Tracker

    tracker = Tracker(root, "mqgen")
    version = registry.Version(name=name, version=number, run_id=run_id, tags={})
    start.wait()  # every process ready: they record at the same moment
    try:
        registry.record_evaluation(tracker, version, _evaluation(10.0, 0.5), run_id)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def test_an_evaluation_changed_in_the_artifact_store_is_refused_where_it_is_read(setting, run_root: Path,
                                                                                tmp_path: Path) -> None:
    import hashlib
    import json

    from infra import registry
    from tasks.evaluate import ARTIFACT_SHA256_TAG, EVALUATION

    cfg, tracker, tokenizer = setting
    _, version, _ = _register(cfg, tracker, tokenizer, tmp_path, seed=3)
    run = tracker.stage_run("evaluate", "eval-art")  # what the evaluate stage logs and tags
    local = tmp_path / "out" / EVALUATION
    local.parent.mkdir()
    local.write_text(json.dumps(_evaluation(7.5, 0.1)))
    run.log_artifact(local)
    run.set_tags({f"{ARTIFACT_SHA256_TAG}{EVALUATION}": hashlib.sha256(local.read_bytes()).hexdigest()})
    run.finish()
    registry.record_evaluation(tracker, version, _evaluation(7.5, 0.1), run.run_id)
    mv = tracker.client.get_model_version(version.name, version.version)
    current = registry.Version(version.name, version.version, version.run_id, dict(mv.tags))
    assert registry.evaluation_of(tracker, current)["metrics"]["fid"] == 7.5

    [stored] = [p for p in run_root.rglob(EVALUATION) if run.run_id in str(p)]  # the store's own copy
    stored.write_text(stored.read_text().replace("7.5", "1.5"))  # a better FID, typed into the store
    with pytest.raises(registry.ArtifactAltered, match=f"evaluation.json of MLflow run {run.run_id}"):
        registry.evaluation_of(tracker, current)
