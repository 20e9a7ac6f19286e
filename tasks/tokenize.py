"""tokenize stage: every train/val image -> its MQ-VAE tokens (kept codes, raster positions, label) in LMDB.

``run(cfg, inputs)`` is the stage (testable without Prefect); ``tokenize_task`` wraps it.

How a run goes:

1. The inputs (trained tokenizer, ingest output) arrive from the flow's stage graph; the stage key hashes
   :data:`VERSION`, the tokenizer weights' sha256 and the ingest manifest's sha256. A complete output for
   the key (``_SUCCESS.json`` whose databases verify) is a cache hit.
2. Take ``<run.root>/tokenize/.<key>.lock`` (a second run of the same key waits, then hits the cache) and
   open one :class:`infra.tokens.TokenWriter` per split; shards whose done key exists are skipped.
3. Every remaining input shard is one Ray task (:func:`encode_shard`, ``ray.cpus_per_worker`` CPUs and,
   with ``ray.use_gpu``, one GPU): verify the shard's sha256, decode its PNGs, encode them in batches
   with the eval-mode MQ-VAE, return codes/positions/labels as numpy arrays.
4. The driver is the only writer: each shard's records and its done key go into LMDB in one transaction,
   in shard order (so every write is an append). A killed run resumes at shard granularity, and because
   record keys and values are deterministic the result is byte-for-byte that of an uninterrupted run
   (on the same kind of device: CPU and GPU encoders round differently).
5. Finalize each split (full verification pass, record checksum, ``complete`` metadata, compaction), log
   counts, throughput, code usage and the metadata to MLflow, and write ``_SUCCESS.json`` last.

The database format is described in ``docs/lmdb_format.md``; the reader is :class:`infra.tokens.TokenDataset`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.config import PipelineConfig, stable_hash
from infra.orchestration import lazy_stage_task
from infra.refs import (
    IngestOutput,
    TokenizeInputs,
    TokenizeOutput,
    TokenizerOutput,
    at_configured_encoder,
    load_tokenizer,
)
from infra.storage import (
    DamagedOutput,
    atomic_write_json,
    cached_run,
    read_json,
    read_marker,
    remove_tree,
    sha256_file,
    stage_dir,
)
from infra.text import FILENAME as TEXT_TOKENIZER
from infra.text import CaptionTokenizer, pretrained_digest
from infra.tokens import DEFAULT_MAP_SIZE, TokenFormatError, TokenMeta, TokenWriter, read_meta, verify
from models.metrics import code_stats
from models.mqvae import to_model_input

STAGE = "tokenize"
VERSION = "1"  # bump when the records written for a given tokenizer and input change
SUCCESS = "_SUCCESS.json"
SPLITS = ("train", "val")
ENCODE_BATCH_SIZE = 256  # images per encoder forward; part of the output contract (float results may
# differ in the last bit between batch sizes), so changing it means bumping VERSION

log = logging.getLogger("mqgen.tokenize")


# --------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class ShardJob:
    """One unit of work: encode every image of one input shard."""

    split: str
    shard: int  # index of the shard within its split (the ``%06d`` of ``<split>-%06d.tar``)
    path: str
    count: int  # samples the ingest manifest lists for the shard
    sha256: str  # the shard file's sha256 from the manifest ("" = do not check)
    tokenizer: TokenizerOutput
    image_size: int
    channels: int
    batch_size: int = ENCODE_BATCH_SIZE
    use_gpu: bool = False  # encode on the worker's CUDA device (a model passed to encode_shard decides instead)
    num_threads: int | None = None  # torch intra-op threads in the worker (None = leave as is)
    decode_threads: int = 1  # PNG decoding threads; > 1 overlaps decoding with a GPU's encoding
    captioned: bool = False  # return the captions (every sample must have one)


@dataclass(frozen=True)
class EncodedShard:
    """The tokens of one shard: ``codes``/``positions`` uint16 ``[n, N]`` (raster order), ``labels`` int32."""

    split: str
    shard: int
    codes: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    seconds: float  # wall time of the task (hash, decode, encode)
    cpu_seconds: float  # CPU time of the task's process meanwhile (all its threads)
    device: str  # "cpu" or "cuda:<device name>"
    captions: list[str] | None = None  # the samples' captions (captioned data), in record order


_MODEL_CACHE: dict[tuple[str, str, str], torch.nn.Module] = {}


def _worker_model(tokenizer: TokenizerOutput, device: torch.device) -> torch.nn.Module:
    """The eval-mode MQ-VAE, built (and its sha256 verified) once per worker process."""
    key = (tokenizer.weights, tokenizer.sha256, str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_tokenizer(tokenizer, device)
    return _MODEL_CACHE[key]


def shard_seed(tokenizer_sha256: str, split: str, shard: int) -> int:
    """Seed of the global torch RNG while encoding one shard (only a random scorer draws from it)."""
    return int.from_bytes(hashlib.sha256(f"{STAGE}/{tokenizer_sha256}/{split}/{shard}".encode()).digest()[:8],
                          "little") & (2**63 - 1)


def encode_shard(job: ShardJob, model: torch.nn.Module | None = None) -> EncodedShard:
    """Encode one input shard (a Ray task in the stage; callable in-process for tests and benchmarks).

    Verifies the shard's sha256 and sample count against the manifest, decodes and checks every PNG
    (size, channels, label; ``decode_threads`` at a time), and encodes batches of ``batch_size`` images
    with the eval-mode ``model`` (default: the job's tokenizer, built once per process). The torch RNG is
    forked and seeded per shard and cuDNN is kept deterministic, so the result does not depend on which
    worker ran it or what ran before: a rerun reproduces it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from infra.shards import ShardIntegrityError, decode_sample, read_shard

    t0, cpu0 = time.perf_counter(), time.process_time()
    if job.num_threads is not None:
        torch.set_num_threads(job.num_threads)
    if model is None:
        if job.use_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"tokenize shard {job.split}/{job.shard}: ray.use_gpu=true but this Ray worker sees "
                               "no CUDA device")
        model = _worker_model(job.tokenizer, torch.device("cuda" if job.use_gpu else "cpu"))
    if model.training:
        raise ValueError("encode_shard needs an eval-mode model (call model.eval())")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if job.sha256:
        actual = sha256_file(job.path)
        if actual != job.sha256:
            raise ShardIntegrityError(f"{job.path}: sha256 {actual} differs from the ingest manifest ({job.sha256}); "
                                      "the shard changed after ingest: rerun ingest")
    cfg = model.cfg
    codes = np.empty((job.count, cfg.num_kept), np.uint16)
    positions = np.empty((job.count, cfg.num_kept), np.uint16)
    labels = np.empty(job.count, np.int32)

    def decode(item: tuple[str, bytes, int]) -> torch.Tensor:
        key, png, label = item
        sample = {"__key__": key, "__url__": job.path, "png": png}
        if label >= 0:
            sample["cls"] = str(label).encode()
        return decode_sample(sample, job.image_size, job.channels).image

    def encode(images: list[torch.Tensor], start: int) -> None:
        tokens = model.encode(to_model_input(torch.stack(images), device))
        codes[start:start + len(images)] = tokens.codes.cpu().numpy()
        positions[start:start + len(images)] = tokens.positions.cpu().numpy()

    captions: list[str | None] = []

    def samples() -> Iterator[tuple[str, bytes, int]]:
        for i, item in enumerate(read_shard(job.path)):
            if i >= job.count:
                raise ShardIntegrityError(f"{job.path}: more samples than the {job.count} the manifest lists")
            labels[i] = item.label
            captions.append(item.caption)
            yield item[:3]

    pool = ThreadPoolExecutor(job.decode_threads) if job.decode_threads > 1 else None
    n = 0
    batch: list[torch.Tensor] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(shard_seed(job.tokenizer.sha256, job.split, job.shard))
            images = map(decode, samples()) if pool is None else _ordered_map(pool, decode, samples(),
                                                                              2 * job.batch_size)
            for image in images:
                batch.append(image)
                if len(batch) == job.batch_size:
                    encode(batch, n)
                    n += len(batch)
                    batch = []
            if batch:
                encode(batch, n)
                n += len(batch)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if n != job.count:
        raise ShardIntegrityError(f"{job.path}: {n} samples, the manifest lists {job.count}")
    name = "cpu" if device.type == "cpu" else f"{device.type}:{torch.cuda.get_device_name(device)}"
    if job.captioned and None in captions:
        raise ShardIntegrityError(f"{job.path}: sample {captions.index(None)} has no caption (.txt member) in a "
                                  "captioned dataset, whose ingest manifest promises one for every sample: rerun "
                                  "ingest")
    return EncodedShard(job.split, job.shard, codes, positions, labels, time.perf_counter() - t0,
                        time.process_time() - cpu0, name, [c or "" for c in captions] if job.captioned else None)


def _worker_threads(cfg: PipelineConfig) -> dict[str, int]:
    """How a task uses its ``ray.cpus_per_worker`` CPUs.

    CPU: every CPU runs the encoder (torch intra-op threads), decoding stays serial. GPU: every CPU
    decodes PNGs (decoding bounds the throughput), torch keeps one thread (intra-op threads only compete
    with the decoders: on an H200 at 256 px with 8 decoders, 520-530 images/s with 1, 410-480 with 16).
    """
    cpus = cfg.ray.cpus_per_worker or 1
    if cfg.ray.use_gpu:
        return {"num_threads": 1, "decode_threads": cpus}
    return {"num_threads": cpus, "decode_threads": 1}


def _ordered_map(pool: Any, fn: Any, items: Iterator[Any], window: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``window`` items decoded ahead."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------------------------- stage


def stage_key(tokenizer_sha256: str, ingest_manifest_sha256: str, text: dict[str, Any] | None = None) -> str:
    """``text``: the caption settings (:func:`text_settings`) for captioned data, else None (not hashed)."""
    return stable_hash(_key_doc(tokenizer_sha256, ingest_manifest_sha256, text))


def _key_doc(tokenizer_sha256: str, ingest_manifest_sha256: str, text: dict[str, Any] | None) -> dict[str, Any]:
    d: dict[str, Any] = {"stage": STAGE, "version": VERSION, "tokenizer": tokenizer_sha256,
                         "ingest": ingest_manifest_sha256}
    if text is not None:
        d["text"] = text
    return d


def key_doc(cfg: PipelineConfig, inputs: TokenizeInputs) -> dict[str, Any]:
    """What the stage key of ``cfg`` on ``inputs`` hashes."""
    return _key_doc(inputs.train_tokenizer.sha256, inputs.ingest.manifest_sha256, text_settings(cfg, inputs.ingest))


def text_settings(cfg: PipelineConfig, ingest: IngestOutput) -> dict[str, Any] | None:
    """What shapes the caption ids of captioned data (None for data without captions)."""
    if not ingest.captioned:
        return None
    if cfg.text.pretrained is not None:  # the folder by content: its tokenizer makes the ids
        return {"max_len": cfg.text.max_len, "tokenizer": PRETRAINED_TOKENIZER_KIND,
                "pretrained": pretrained_digest(cfg.text.pretrained)}
    return {"vocab_size": cfg.text.vocab_size, "max_len": cfg.text.max_len, "tokenizer": TEXT_TOKENIZER_KIND}


TEXT_TOKENIZER_KIND = "bpe-bytelevel/1"  # bump when infra.text's training recipe changes
PRETRAINED_TOKENIZER_KIND = "pretrained/1"  # bump when the ids of a pretrained tokenizer are stored differently


def split_meta(split: str, tokenizer: TokenizerOutput, ingest: IngestOutput, shards: list[tuple[int, int]],
               text: CaptionTokenizer | None = None, text_len: int = 0, text_sha256: str = "") -> TokenMeta:
    """The metadata a split's database is created with (completion fields unset)."""
    return TokenMeta(split=split, codebook_size=tokenizer.codebook_size, grid_size=tokenizer.grid_size,
                     seq_len=tokenizer.seq_len, keep_ratio=tokenizer.keep_ratio, num_classes=ingest.num_classes,
                     tokenizer_sha256=tokenizer.sha256, source_sha256=ingest.manifest_sha256, shards=tuple(shards),
                     text_len=text_len if text is not None else 0,
                     text_vocab_size=text.vocab_size if text is not None else 0, text_tokenizer_sha256=text_sha256)


VERIFIED = ".verified.json"  # size and mtime of each database file when it last verified in full


def _db_stamp(db: str | Path) -> list[int]:
    st = (Path(db) / "data.mdb").stat()
    return [st.st_size, st.st_mtime_ns]


def load_output(out_dir: Path) -> TokenizeOutput | None:
    """The stage output if ``out_dir`` holds a complete one whose databases match it; None without a commit
    marker; :class:`~infra.storage.DamagedOutput` when a database is missing, incomplete, altered or does not
    match the marker.

    A database whose file changed since it last verified (size or modification time; records deleted or
    rewritten by hand) is verified in full again: every record checked and hashed against the metadata.
    """
    ref = read_marker(out_dir / SUCCESS, TokenizeOutput)
    if ref is None:
        return None
    stamps_file = out_dir / VERIFIED
    try:
        stamps = read_json(stamps_file) if stamps_file.is_file() else {}
    except (OSError, ValueError):
        stamps = {}
    fresh = {}
    for split in SPLITS:
        db = ref.db(split)
        try:
            stamp = _db_stamp(db)
            meta = read_meta(db) if stamps.get(split) == stamp else verify(db)[0]
        except (OSError, TokenFormatError) as e:
            raise DamagedOutput(out_dir, f"{Path(db).name}: {e}") from None
        try:  # the marker's copy as this version writes it (a field added later, at its default, is no change)
            stored = TokenMeta.normalized(ref.metadata[split])
        except (TypeError, ValueError, KeyError, TokenFormatError):
            stored = None
        if not meta.complete or meta.to_dict() != stored:
            raise DamagedOutput(out_dir, f"{Path(db).name} does not match {SUCCESS}")
        fresh[split] = stamp
    if ref.text_tokenizer:
        try:
            ok = sha256_file(ref.text_tokenizer) == ref.text_tokenizer_sha256
        except OSError:
            ok = False
        if not ok:
            raise DamagedOutput(out_dir, f"{TEXT_TOKENIZER} is missing or does not match {SUCCESS}")
    if fresh != stamps:
        with contextlib.suppress(OSError):
            atomic_write_json(stamps_file, fresh)
    return ref


def cached(cfg: PipelineConfig, inputs: TokenizeInputs) -> TokenizeOutput | None:
    """The complete output for ``inputs`` if it exists (no computation), else None."""
    out_dir = stage_dir(cfg.run.root, STAGE, stable_hash(key_doc(cfg, inputs)))
    return at_configured_encoder(load_output(out_dir), cfg.text.pretrained)


def check_inputs(inputs: TokenizeInputs) -> None:
    """Raise ``ValueError`` when the tokenizer cannot encode the ingested images."""
    tok, ingest = inputs.train_tokenizer.mqvae_config, inputs.ingest
    if (tok.resolution, tok.in_channels) != (ingest.image_size, ingest.channels):
        raise ValueError(f"the tokenizer takes {tok.resolution}px images with {tok.in_channels} channel(s) but "
                         f"the ingest output {ingest.path} holds {ingest.image_size}px with {ingest.channels}")


def run(cfg: PipelineConfig, inputs: TokenizeInputs, *, force: bool = False, parent_run_id: str | None = None,
        map_size: int = DEFAULT_MAP_SIZE) -> TokenizeOutput:
    """Tokenize (or resume, or reuse) every train/val image of the ingest output with the trained tokenizer.

    ``force=True`` deletes an existing output for the key and starts over. ``map_size`` is the initial
    LMDB map size per split (it doubles whenever a shard does not fit).
    """
    if "://" in str(cfg.run.root):
        raise ValueError(f"run.root={cfg.run.root!r}: tokenize writes LMDB databases, which need a local disk")
    check_inputs(inputs)
    tokenizer, ingest = inputs.train_tokenizer, inputs.ingest
    doc = key_doc(cfg, inputs)
    key = stable_hash(doc)
    out_dir = stage_dir(cfg.run.root, STAGE, key)

    def compute() -> TokenizeOutput:
        if force:
            remove_tree(out_dir)
        (out_dir / SUCCESS).unlink(missing_ok=True)
        return _tokenize(cfg, parent_run_id, key, out_dir, tokenizer, ingest, map_size)

    return cached_run(out_dir, key, lambda: at_configured_encoder(load_output(out_dir), cfg.text.pretrained), compute,
                      force=force, key_doc=doc)


def _tokenize(cfg: PipelineConfig, parent_run_id: str | None, key: str, out_dir: Path, tokenizer: TokenizerOutput,
              ingest: IngestOutput, map_size: int) -> TokenizeOutput:
    from infra.shards import ShardSet
    from infra.tracking import Tracker

    t_start = time.perf_counter()
    shard_set = ShardSet.from_output(ingest)
    inputs = {split: shard_set.shards(split) if split in shard_set.splits else [] for split in SPLITS}
    out_dir.mkdir(parents=True, exist_ok=True)
    text, text_sha = _caption_tokenizer(cfg, ingest, inputs["train"], out_dir)
    encoder_digest = pretrained_digest(cfg.text.pretrained) if text is not None and cfg.text.pretrained else ""
    metas = {split: split_meta(split, tokenizer, ingest, [(i, s.num_samples) for i, s in enumerate(inputs[split])],
                               text, cfg.text.max_len, text_sha)
             for split in SPLITS}
    num_shards = sum(len(v) for v in inputs.values())
    m = metas["train"]
    params = {"stage_key": key, "version": VERSION, "tokenizer_sha256": tokenizer.sha256,
              "ingest_manifest_sha256": ingest.manifest_sha256, "encode_batch_size": ENCODE_BATCH_SIZE,
              "format_version": m.format_version, "codebook_size": m.codebook_size, "grid_size": m.grid_size,
              "seq_len": m.seq_len, "keep_ratio": m.keep_ratio}
    if text is not None:
        params.update(text_vocab_size=text.vocab_size, text_len=cfg.text.max_len, text_tokenizer_sha256=text_sha)
        if encoder_digest:
            params.update(text_encoder=cfg.text.pretrained, text_encoder_digest=encoder_digest)
    tags = {"mqgen.tokenizer_run_id": tokenizer.mlflow_run_id, "mqgen.ingest_run_id": ingest.mlflow_run_id,
            "mqgen.use_gpu": cfg.ray.use_gpu, "mqgen.cpus_per_task": cfg.ray.cpus_per_worker or 1}
    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    with tracker.stage_run(STAGE, key, params=params, tags=tags, parent_run_id=parent_run_id) as sr:
        sr.log_dataset(f"ingest-{ingest.key}", ingest.manifest_sha256, Path(ingest.path) / "manifest.json", "input",
                       num_train=ingest.num_train, num_val=ingest.num_val)
        with contextlib.ExitStack() as stack:
            writers = {split: stack.enter_context(TokenWriter(out_dir / f"{split}.lmdb", metas[split],
                                                              map_size=map_size)) for split in SPLITS}
            jobs = []
            for split in SPLITS:
                done = writers[split].done_shards()
                jobs += [ShardJob(split=split, shard=i, path=s.path, count=s.num_samples, sha256=s.sha256,
                                  tokenizer=tokenizer, image_size=ingest.image_size, channels=ingest.channels,
                                  use_gpu=cfg.ray.use_gpu, captioned=text is not None, **_worker_threads(cfg))
                         for i, s in enumerate(inputs[split]) if i not in done]
            if len(jobs) < num_shards:
                log.info("tokenize %s: resuming, %d of %d shards already written", key, num_shards - len(jobs),
                         num_shards)
            t_loop = time.perf_counter()
            encoded_images, first_result_s, worker_cpu_s, captions_cut = _encode_and_write(
                cfg, key, jobs, writers, num_shards, text)
            loop_seconds = time.perf_counter() - t_loop
            finished = {split: writers[split].finalize() for split in SPLITS}
            map_grows = sum(w.map_grows for w in writers.values())
        finals = {split: meta for split, (meta, _) in finished.items()}
        scans = {split: scan for split, (_, scan) in finished.items()}
        checksum = hashlib.sha256("".join(f"{s} {finals[s].records_sha256}\n" for s in SPLITS).encode()).hexdigest()
        usage = code_stats(torch.from_numpy(np.asarray(scans["train"].code_counts, dtype=np.float64)))
        metrics = {"num_train": finals["train"].num_records, "num_val": finals["val"].num_records,
                   "num_shards": num_shards, "shards_encoded": len(jobs), "shards_resumed": num_shards - len(jobs),
                   "images_encoded": encoded_images, "seconds": time.perf_counter() - t_start,
                   "images_per_s": encoded_images / loop_seconds if encoded_images else 0.0,
                   "first_shard_s": first_result_s,  # worker start-up (imports, model) + one shard
                   "worker_cpu_s": worker_cpu_s,  # CPU time of the shard tasks (not the workers' start-up)
                   "db_bytes": sum(_db_bytes(out_dir / f"{s}.lmdb") for s in SPLITS), "map_grows": map_grows,
                   "train_code_usage": usage["usage"], "train_code_perplexity": usage["perplexity"]}
        if text is not None:
            metrics.update(text_vocab_size=text.vocab_size, captions_cut=captions_cut)
            sr.log_artifact(out_dir / TEXT_TOKENIZER, "tokens")
        sr.log_metrics(metrics, step=sr.last_step("num_train") + 1)  # a forced rerun logs at the next step
        metadata = {s: finals[s].to_dict() for s in SPLITS}
        sr.log_dict(metadata, "tokens/metadata.json")
        sr.log_dict({"checksum": checksum, **{s: finals[s].records_sha256 for s in SPLITS}}, "tokens/checksum.json")
        _log_usage_plots(sr, scans, finals["train"])
        sr.set_tags({"mqgen.tokens_checksum": checksum})
        ref = TokenizeOutput(path=str(out_dir.resolve()), key=key, num_train=finals["train"].num_records,
                             num_val=finals["val"].num_records, train_db=str((out_dir / "train.lmdb").resolve()),
                             val_db=str((out_dir / "val.lmdb").resolve()), metadata=metadata, checksum=checksum,
                             mlflow_run_id=sr.run_id, metrics={k: float(v) for k, v in metrics.items()},
                             text_tokenizer=str((out_dir / TEXT_TOKENIZER).resolve()) if text is not None else "",
                             text_tokenizer_sha256=text_sha,
                             text_encoder=cfg.text.pretrained if encoder_digest else "",
                             text_encoder_digest=encoder_digest)
        atomic_write_json(out_dir / VERIFIED, {s: _db_stamp(out_dir / f"{s}.lmdb") for s in SPLITS})  # just scanned
        atomic_write_json(out_dir / SUCCESS, ref.to_dict())  # the commit marker: last
        log.info("tokenize %s: %d train + %d val records (%d shards encoded, %d resumed), %.0f images/s -> %s", key,
                 ref.num_train, ref.num_val, len(jobs), num_shards - len(jobs), metrics["images_per_s"], out_dir)
    return ref


def _caption_tokenizer(cfg: PipelineConfig, ingest: IngestOutput, train_shards: list[Any], out_dir: Path
                       ) -> tuple[CaptionTokenizer | None, str]:
    """For captioned data: the caption tokenizer trained on the training captions (in shard order), or the
    ``tokenizer.json`` of ``text.pretrained``, saved as ``text_tokenizer.json`` in ``out_dir``, and its sha256 (a
    resumed run retrains it; the databases' metadata then refuses a tokenizer that came out different).
    ``(None, "")`` without captions."""
    if not ingest.captioned:
        return None, ""
    if cfg.text.pretrained is not None:
        tok = CaptionTokenizer.from_pretrained(cfg.text.pretrained)
        tok.save(out_dir / TEXT_TOKENIZER)
        log.info("tokenize: caption ids from the pretrained tokenizer of %s (%d ids)", cfg.text.pretrained,
                 tok.vocab_size - tok.offset)
        return tok, sha256_file(out_dir / TEXT_TOKENIZER)
    from infra.shards import read_shard

    def captions() -> Iterator[str]:
        for s in train_shards:
            for r in read_shard(s.path):
                if r.caption:
                    yield r.caption

    t0 = time.perf_counter()
    tok = CaptionTokenizer.train(captions(), cfg.text.vocab_size)
    tok.save(out_dir / TEXT_TOKENIZER)
    sha = sha256_file(out_dir / TEXT_TOKENIZER)
    log.info("tokenize: caption tokenizer of %d ids trained in %.1f s", tok.vocab_size, time.perf_counter() - t0)
    return tok, sha


def _encode_and_write(cfg: PipelineConfig, key: str, jobs: list[ShardJob], writers: dict[str, TokenWriter],
                      num_shards: int, text: CaptionTokenizer | None = None) -> tuple[int, float, float, int]:
    """Encode ``jobs`` on Ray workers and commit each result as it arrives (with its caption ids when ``text``).

    Returns the number of images encoded, the seconds until the first shard was committed, the CPU
    seconds the shard tasks used and the number of captions cut to ``text.max_len`` ids.
    """
    from infra import ray as rayx
    from infra.console import Progress

    encoded, t0, first, cpu, cut = 0, time.perf_counter(), 0.0, 0.0, 0
    bar = Progress(STAGE, num_shards, unit="shards", start=num_shards - len(jobs))
    # ordered: shards arrive (and are committed) in key order, so every transaction is an append
    results = rayx.map_tasks(encode_shard, jobs, num_cpus=cfg.ray.cpus_per_worker or 1,
                             num_gpus=1 if cfg.ray.use_gpu else 0, ordered=True)
    with bar, contextlib.closing(results):
        for _, enc in results:
            ids = None
            if text is not None:
                ids, n_cut = text.encode(enc.captions or [], cfg.text.max_len)
                cut += n_cut
            writers[enc.split].write_shard(enc.shard, enc.codes, enc.positions, enc.labels, device=enc.device,
                                           text=ids)
            encoded += len(enc.labels)
            first = first or time.perf_counter() - t0
            cpu += enc.cpu_seconds
            bar.advance(1, img_s=encoded / (time.perf_counter() - t0))
    return encoded, first, cpu, cut


def _db_bytes(path: Path) -> int:
    return (path / "data.mdb").stat().st_size


def _log_usage_plots(sr: Any, scans: dict[str, Any], meta: TokenMeta) -> None:
    """Code-usage histogram (train) and the kept-cell frequency map of the latent grid."""
    import io

    from PIL import Image

    from infra.viz import histogram_png

    counts = scans["train"].code_counts
    used = int((counts > 0).sum())
    png = histogram_png(counts, f"train code usage: {used}/{len(counts)} codes used")
    with Image.open(io.BytesIO(png)) as im:
        sr.log_image(im.convert("RGB"), "tokens/code_usage.png")
    freq = scans["train"].position_counts.reshape(meta.grid_size, meta.grid_size).astype(np.float64)
    freq = freq / max(1, meta.num_records)  # fraction of images keeping each cell
    cell = max(1, 256 // meta.grid_size)
    image = np.kron((freq * 255).round().clip(0, 255).astype(np.uint8), np.ones((cell, cell), np.uint8))
    sr.log_image(image, "tokens/kept_cells.png")


# Retries (run.retries) and the rule that bad data never retries (infra.errors) come from flows/pipeline.py.
__getattr__ = lazy_stage_task(__name__, "tokenize_task", run, name=STAGE)
