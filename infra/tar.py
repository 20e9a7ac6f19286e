"""A streaming reader for untrusted tar streams (WebDataset shards): what the ingest stage reads from users'
shards and what every stage reads from ours (``infra.shards.read_shard``).

It never extracts anything and never unpickles: members are grouped into samples by WebDataset's key rule
(:func:`split_member_name`), names are checked (:func:`safe_member_name`), links and special files are
refused, members over a size cap are skipped unread, and the end of the stream is reported (``ok``,
``truncated``, ``corrupt``, ``empty``).
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

# Why a tar sample is refused (the ingest stage counts these with its other skip reasons).
TOO_LARGE = "too_large"                  # over data.max_input_bytes, or over Pillow's pixel limit
UNSAFE_NAME = "unsafe_name"              # tar member name absolute, with '..', or outside [A-Za-z0-9_./-]
LINK_MEMBER = "link_member"              # tar symlink or hardlink
SPECIAL_MEMBER = "special_member"        # tar device, FIFO or unknown member type
DUPLICATE_KEY = "duplicate_key"          # a key seen earlier in the same shard (non-adjacent members)
DUPLICATE_MEMBER = "duplicate_member"    # the same extension twice in one sample
TRUNCATED_SHARD = "truncated_shard"      # the sample the input tar was cut in (or after, without EOF marker)


@dataclass(slots=True)
class Ignore:
    """A file or member that is not an input at all (hidden file, sidecar .json, directory)."""

    reason: str
    ref: str


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_./-]+$")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_MAX_META_BYTES = 1 << 20  # PAX / GNU long-name headers larger than this are treated as corrupt
IMAGE_MEMBER_EXTS = ("png", "jpg", "jpeg", "webp")
KEPT_MEMBER_EXTS = IMAGE_MEMBER_EXTS + ("cls", "txt", "json")  # image, label, caption


def safe_member_name(name: str) -> bool:
    """Relative, only ``[A-Za-z0-9_./-]``, no ``..`` anywhere: safe as a key or a path component."""
    return bool(_SAFE_NAME.match(name)) and not name.startswith("/") and ".." not in name


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first dot of the base name, extension = the rest (lower)."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{d}/{stem}" if d else stem), ext.lower()


@dataclass(slots=True)
class TarMember:
    name: str
    kind: str  # "file", "link", "special", "too_large", "dir"
    data: bytes | None  # only for kept files within the size cap
    offset: int


@dataclass(slots=True)
class TarSample:
    """A group of consecutive members sharing a key; ``reject`` is set when the group is unusable."""

    key: str
    position: int  # index of the group in its shard
    members: dict[str, bytes] = field(default_factory=dict)
    reject: str | None = None
    detail: str = ""
    ignored: list[str] = field(default_factory=list)


class TarReader:
    """Streaming tar parser for untrusted shards: POSIX ustar, GNU and PAX headers, optional gzip.

    It never extracts anything. Unlike :mod:`tarfile`, it reports how a stream ended: ``ok`` (end-of-archive
    marker), ``truncated`` (data or header cut short, or no marker), ``corrupt`` (bad header checksum or
    gzip stream) or ``empty``; ``tarfile`` silently treats a bad header after the first as the end.
    """

    def __init__(self, fileobj: BinaryIO, max_member_bytes: int, keep_exts: tuple[str, ...] = KEPT_MEMBER_EXTS):
        head = fileobj.read(2)
        rest: BinaryIO = fileobj
        self._raw = _Prepend(head, rest)
        self._f: Any = gzip.GzipFile(fileobj=self._raw, mode="rb") if head == b"\x1f\x8b" else self._raw
        self.max_member_bytes = max_member_bytes
        self.keep_exts = keep_exts
        self.offset = 0
        self.status = "reading"
        self.detail = ""
        self.cut_member: str | None = None  # a member whose header was read but whose data was cut short

    def _read(self, n: int) -> bytes:
        try:
            out = []
            while n > 0:
                b = self._f.read(min(n, 1 << 22))
                if not b:
                    break
                out.append(b)
                n -= len(b)
            data = b"".join(out)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            kind = "truncated" if isinstance(e, EOFError) else "corrupt"
            raise _StreamEnd(kind, f"{type(e).__name__}: {e}") from None
        self.offset += len(data)
        return data

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) < n:
            raise _StreamEnd("truncated", f"{what} cut short at byte {self.offset}")
        return data

    def _skip(self, n: int, what: str) -> None:
        while n > 0:
            k = min(n, 1 << 22)
            self._read_exact(k, what)
            n -= k

    def members(self) -> Iterator[TarMember]:
        try:
            yield from self._members()
        except _StreamEnd as e:
            self.status, self.detail = e.kind, e.detail

    def _members(self) -> Iterator[TarMember]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            start = self.offset
            hdr = self._read(_BLOCK)
            if not hdr:
                self.status = "empty" if start == 0 else "truncated"
                self.detail = "" if start == 0 else f"no end-of-archive marker (stream ends at byte {start})"
                return
            if len(hdr) < _BLOCK:
                raise _StreamEnd("truncated", f"header cut short at byte {start}")
            if hdr == _ZERO_BLOCK:
                self.status = "ok"
                return
            if not _checksum_ok(hdr):
                raise _StreamEnd("corrupt", f"bad tar header checksum at byte {start}")
            try:
                size = _tar_number(hdr[124:136])
            except ValueError:
                raise _StreamEnd("corrupt", f"bad size field at byte {start}") from None
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise _StreamEnd("corrupt", f"bad PAX size at byte {start}") from None
            typeflag = hdr[156:157]
            padding = (-size) % _BLOCK
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size > _MAX_META_BYTES:
                    raise _StreamEnd("corrupt", f"{size}-byte metadata header at byte {start}")
                meta = self._read_exact(size, "metadata header")
                self._skip(padding, "padding")
                if typeflag == b"x":
                    pax = _parse_pax(meta)
                elif typeflag == b"L":
                    long_name = meta.split(b"\0", 1)[0].decode("utf-8", "replace")
                continue  # 'g' (global PAX) and 'K' (long link name) carry nothing we use
            name = _header_name(hdr)
            if long_name is not None:
                name, long_name = long_name, None
            if "path" in pax:
                name = pax["path"]
            pax = {}
            while name.startswith("./"):
                name = name[2:]
            self.cut_member = name  # until its data has been read in full
            if typeflag in (b"0", b"\0", b"7"):
                parts = split_member_name(name)
                wanted = parts is not None and parts[1] in self.keep_exts
                if wanted and size > self.max_member_bytes:
                    self._skip(size + padding, "member data")
                    yield TarMember(name, "too_large", None, start)
                    continue
                if not wanted:
                    self._skip(size + padding, "member data")
                    yield TarMember(name, "file", None, start)
                    continue
                data = self._read_exact(size, f"member {name!r}")
                self._skip(padding, "padding")
                yield TarMember(name, "file", data, start)
            elif typeflag == b"5":
                self._skip(size + padding, "directory data")
                yield TarMember(name, "dir", None, start)
            else:
                self._skip(size + padding, "member data")
                kind = "link" if typeflag in (b"1", b"2") else "special"
                yield TarMember(name, kind, None, start)

    def samples(self) -> Iterator[TarSample | Ignore]:
        """Group members into samples; the last, possibly partial, group is dropped unless the stream ended
        with a proper end-of-archive marker (then ``self.status == "ok"``)."""
        current: TarSample | None = None
        seen: set[str] = set()
        position = 0
        for m in self.members():
            self.cut_member = None
            if m.kind == "dir":
                yield Ignore("directory_member", m.name)
                continue
            parts = split_member_name(m.name)
            key = parts[0] if parts else m.name
            ext = parts[1] if parts else ""
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = TarSample(key=key, position=position)
                position += 1
                if key in seen:
                    current.reject, current.detail = DUPLICATE_KEY, f"key {key!r} appears twice in the shard"
                seen.add(key)
            reason = _member_problem(m, ext, current)
            if reason is not None:
                if current.reject is None or _REJECT_PRIORITY[reason] < _REJECT_PRIORITY[current.reject]:
                    current.reject, current.detail = reason, f"member {m.name!r}"
                continue
            if m.data is None:
                current.ignored.append(m.name)
                continue
            current.members[ext] = m.data
        if current is None:
            return
        cut_parts = split_member_name(self.cut_member) if self.cut_member is not None else None
        cut_key = cut_parts[0] if cut_parts else self.cut_member
        if self.status == "ok" or (cut_key is not None and cut_key != current.key):
            yield current  # complete: the stream ended cleanly, or the next sample's header was read
            if self.status != "ok":
                yield TarSample(key=cut_key or "", position=position, reject=TRUNCATED_SHARD,
                                detail=f"input cut inside member {self.cut_member!r} ({self.detail})")
        else:
            current.reject = TRUNCATED_SHARD
            current.detail = f"input ended inside or right after this sample ({self.status}: {self.detail})"
            yield current


_REJECT_PRIORITY = {UNSAFE_NAME: 0, LINK_MEMBER: 1, SPECIAL_MEMBER: 2, TOO_LARGE: 3, DUPLICATE_KEY: 4,
                    DUPLICATE_MEMBER: 5, TRUNCATED_SHARD: 6}


def _member_problem(m: TarMember, ext: str, sample: TarSample) -> str | None:
    if not safe_member_name(m.name):
        return UNSAFE_NAME
    if m.kind == "link":
        return LINK_MEMBER
    if m.kind == "special":
        return SPECIAL_MEMBER
    if m.kind == "too_large":
        return TOO_LARGE
    if m.data is not None and ext in sample.members:
        return DUPLICATE_MEMBER
    return None


class _StreamEnd(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class _Prepend:
    """A read-only stream that first returns ``head`` (bytes already sniffed) then the rest of ``f``."""

    def __init__(self, head: bytes, f: BinaryIO):
        self._head = head
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self._f.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._f.read(n - len(out))
            return out
        return self._f.read(n)

    def readable(self) -> bool:
        return True


def _checksum_ok(hdr: bytes) -> bool:
    try:
        stored = _tar_number(hdr[148:156])
    except ValueError:
        return False
    unsigned = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    signed = sum(struct.unpack("148b", hdr[:148])) + 8 * 32 + sum(struct.unpack("356b", hdr[156:]))
    return stored in (unsigned, signed)


def _tar_number(field_bytes: bytes) -> int:
    if field_bytes[:1] == b"\x80":  # GNU base-256 (positive)
        return int.from_bytes(field_bytes[1:], "big")
    if field_bytes[:1] == b"\xff":
        raise ValueError("negative number")
    s = field_bytes.split(b"\0", 1)[0].strip(b" ")
    return int(s, 8) if s else 0


def _header_name(hdr: bytes) -> str:
    name = hdr[0:100].split(b"\0", 1)[0]
    if hdr[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field extends the name
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _parse_pax(meta: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(meta):
        sp = meta.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(meta[pos:sp])
        except ValueError:
            raise _StreamEnd("corrupt", "bad PAX record") from None
        if length <= 0 or pos + length > len(meta):
            raise _StreamEnd("corrupt", "bad PAX record length")
        record = meta[sp + 1:pos + length - 1]
        k, eq, v = record.partition(b"=")
        if eq:
            out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out
