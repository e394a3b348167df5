"""The manifest of a soft-label store: its checksum, atomic replacement, reading and validation.

`write_manifest` adds `manifest_checksum` (a blake2b-128 digest of the canonical JSON of
every top-level field, and one per shard entry) and atomically replaces `manifest.json`
(temporary file, fsync, rename), so the checksum is always committed together with the
content it covers. `read_manifest` parses the file, checks the format name and version,
then the checksum, so an edited field is named in a `ManifestError` even when its new
value looks valid, and then validates every field (types, ranges, dtypes, byte counts, and
the shard table: shard i numbered i, ranges contiguous from 0 and covering `num_tokens`,
the file names and sizes the shapes imply). Format-version-1 manifests (written before the
checksum existed) are validated the same way; edits that keep them self-consistent (e.g. of
the temperature) cannot be detected, and a warning says so. Cross-checks against the shard
files themselves (sizes, `.npy` headers) belong to the reader. The format is specified in
docs/soft_label_store.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional

from kdfast.store.format import (
    FIELDS,
    FILE_CHECKSUMS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_MAX_VOCAB,
    INDEX_STORAGE,
    LOGPROB_STORAGE,
    MANIFEST_NAME,
    READABLE_FORMAT_VERSIONS,
    STORAGE_DTYPES,
    ManifestError,
    atomic_write_text,
    soft_label_bytes_per_token,
)

CHECKSUM_KEY = "manifest_checksum"
MANIFEST_CHECKSUM_ALGORITHM = "blake2b-128"
REQUIRED_FIELDS = ("format", "format_version", "vocab_size", "k", "temperature", "dtypes", "bytes_per_token",
                   "checksum", "shard_tokens", "complete", "num_tokens", "shards")


# --------------------------------------------------------------------------- checksum
def canonical_json(value: Any) -> str:
    """The canonical JSON text of a value: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(name: str, value: Any) -> str:
    return hashlib.blake2b(f"{name}\n{canonical_json(value)}".encode("ascii"), digest_size=16).hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """The `manifest_checksum` entry of a manifest (which it ignores if present).

    Returns:
        {"algorithm": "blake2b-128", "fields": {name: digest of every top-level field but
        "shards"}, "shards": [digest of each shard entry]}; a digest is blake2b-128 of
        "<name>\\n<canonical JSON of the value>" (name "shards[i]" for shard i).
    """
    fields = {name: _digest(name, value) for name, value in manifest.items() if name not in (CHECKSUM_KEY, "shards")}
    shards = [_digest(f"shards[{number}]", shard) for number, shard in enumerate(manifest.get("shards") or [])]
    return {"algorithm": MANIFEST_CHECKSUM_ALGORITHM, "fields": dict(sorted(fields.items())), "shards": shards}


def _check_checksum(manifest: Mapping[str, Any], path: str) -> None:
    recorded = manifest.get(CHECKSUM_KEY)
    if not isinstance(recorded, dict) or recorded.get("algorithm") != MANIFEST_CHECKSUM_ALGORITHM \
            or not isinstance(recorded.get("fields"), dict) or not isinstance(recorded.get("shards"), list):
        raise ManifestError(
            f"SoftLabelStore: {path}: field {CHECKSUM_KEY!r} is missing or malformed (format version "
            f"{manifest.get('format_version')} manifests carry {{'algorithm': '{MANIFEST_CHECKSUM_ALGORITHM}', "
            "'fields': {...}, 'shards': [...]}}); the manifest was edited or damaged", path=path, field=CHECKSUM_KEY)
    actual = manifest_checksum(manifest)
    problems: List[str] = []
    fields: List[str] = []
    for name in sorted(set(recorded["fields"]) | set(actual["fields"])):
        if name not in actual["fields"]:
            problems.append(f"field {name!r} was removed")
        elif name not in recorded["fields"]:
            problems.append(f"field {name!r} was added")
        elif recorded["fields"][name] != actual["fields"][name]:
            problems.append(f"field {name!r} was modified")
        else:
            continue
        fields.append(name)
    if len(recorded["shards"]) != len(actual["shards"]):
        problems.append(f"field 'shards' lists {len(actual['shards'])} shards, {len(recorded['shards'])} were written")
        fields.append("shards")
    else:
        for number, (written, found) in enumerate(zip(recorded["shards"], actual["shards"])):
            if written != found:
                problems.append(f"field 'shards[{number}]' was modified")
                fields.append(f"shards[{number}]")
    if problems:
        raise ManifestError(
            f"SoftLabelStore: {path} does not match its manifest_checksum: " + "; ".join(problems)
            + ". The manifest was edited or damaged after it was written; restore it (or rewrite the store)",
            path=path, field=fields[0])


# --------------------------------------------------------------------------- validation
def _fail(path: str, field: str, problem: str) -> ManifestError:
    return ManifestError(f"SoftLabelStore: {path}: field {field!r} {problem}", path=path, field=field)


def _integer(manifest: Mapping[str, Any], name: str, path: str, minimum: int, maximum: Optional[int] = None) -> int:
    value = manifest[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
            or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise _fail(path, name, f"must be an integer {bounds}, found {value!r}")
    return value


def row_bytes(field: str, k: int, dtype_name: str) -> int:
    """Bytes of one row of a shard field: k items for indices/logprobs, one for the others."""
    return STORAGE_DTYPES[dtype_name][0].itemsize * (k if field in ("indices", "logprobs") else 1)


def validate_manifest(manifest: Mapping[str, Any], path: str) -> None:
    """Checks every field of a parsed manifest and the consistency of its shard table.

    Raises:
        ManifestError: naming `path` and the first field found wrong (wrong type, out of
            range, unknown dtype, bytes_per_token not matching k and the dtypes, shard
            numbered out of order, gap or overlap between shard ranges, last shard not
            ending at num_tokens, missing or extra shard files, a file name that is not
            the shard's own, a byte count smaller than the shape implies).
    """
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        raise _fail(path, missing[0], f"is missing (required fields: {', '.join(REQUIRED_FIELDS)})")
    vocab_size = _integer(manifest, "vocab_size", path, 1)
    k = _integer(manifest, "k", path, 1, vocab_size)
    temperature = manifest["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise _fail(path, "temperature", f"must be a finite number > 0, found {temperature!r}")
    dtypes = manifest["dtypes"]
    if not isinstance(dtypes, dict) or set(dtypes) != set(FIELDS):
        raise _fail(path, "dtypes", f"must map exactly {list(FIELDS)} to dtype names, found {dtypes!r}")
    allowed = {"indices": INDEX_STORAGE, "logprobs": LOGPROB_STORAGE, "tail_logprob": ("float32",),
               "token_ids": (None, dtypes["indices"])}
    for field, names in allowed.items():
        if dtypes[field] not in names:
            raise _fail(path, f"dtypes.{field}", f"must be one of {list(names)}, found {dtypes[field]!r}")
    if vocab_size > INDEX_MAX_VOCAB[dtypes["indices"]]:
        raise _fail(path, "vocab_size", f"{vocab_size} does not fit the {dtypes['indices']} indices")
    soft = soft_label_bytes_per_token(k, dtypes["indices"], dtypes["logprobs"])
    ids = STORAGE_DTYPES[dtypes["indices"]][0].itemsize if dtypes["token_ids"] else 0
    expected = {"soft_labels": soft, "token_ids": ids, "total": soft + ids}
    if manifest["bytes_per_token"] != expected:
        raise _fail(path, "bytes_per_token", f"is {manifest['bytes_per_token']!r}, k={k} and the dtypes give "
                                             f"{expected}")
    if manifest["checksum"] not in FILE_CHECKSUMS:
        raise _fail(path, "checksum", f"must be one of {list(FILE_CHECKSUMS)}, found {manifest['checksum']!r}")
    _integer(manifest, "shard_tokens", path, 1)
    if not isinstance(manifest["complete"], bool):
        raise _fail(path, "complete", f"must be true or false, found {manifest['complete']!r}")
    num_tokens = _integer(manifest, "num_tokens", path, 0)
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise _fail(path, "shards", f"must be a list, found {type(shards).__name__}")
    fields = [field for field in FIELDS if dtypes[field] is not None]
    position = 0
    for number, shard in enumerate(shards):
        where = f"shards[{number}]"
        if not isinstance(shard, dict) or set(shard) != {"index", "start", "stop", "files"}:
            raise _fail(path, where, "must be an object with keys index, start, stop, files")
        if shard["index"] != number or isinstance(shard["index"], bool):
            raise _fail(path, f"{where}.index", f"is {shard['index']!r}, expected {number} (shards are in order)")
        if shard["start"] != position or isinstance(shard["start"], bool):
            raise _fail(path, f"{where}.start", f"is {shard['start']!r}, expected {position} (where "
                        + ("the previous shard stops" if number else "the store starts") + ")")
        stop = shard["stop"]
        if isinstance(stop, bool) or not isinstance(stop, int) or stop <= position:
            raise _fail(path, f"{where}.stop", f"must be an integer > start = {position}, found {stop!r}")
        files = shard["files"]
        if not isinstance(files, dict) or sorted(files) != sorted(fields):
            found = sorted(files) if isinstance(files, dict) else files
            raise _fail(path, f"{where}.files", f"must list exactly {fields} (from dtypes), found {found!r}")
        for field in fields:
            entry = files[field]
            at = f"{where}.files.{field}"
            if not isinstance(entry, dict) or not {"file", "bytes", "checksum"} <= set(entry):
                raise _fail(path, at, "must be an object with file, bytes and checksum")
            name = f"shard-{number:06d}.{field}.npy"
            if entry["file"] != name:
                raise _fail(path, f"{at}.file", f"is {entry['file']!r}, shard {number}'s {field} file is {name!r}")
            payload = (stop - position) * row_bytes(field, k, dtypes[field])
            size = entry["bytes"]
            if isinstance(size, bool) or not isinstance(size, int) or size <= payload:
                raise _fail(path, f"{at}.bytes", f"is {size!r}; {stop - position} rows of {field} take {payload} "
                                                 "bytes plus the .npy header")
        position = stop
    if num_tokens != position:
        raise _fail(path, "num_tokens", f"is {num_tokens}, the shards cover [0, {position})")


# --------------------------------------------------------------------------- I/O
def write_manifest(directory: str, manifest: Mapping[str, Any], durable: bool) -> Dict[str, Any]:
    """Atomically replaces `directory/manifest.json` (temporary file, fsync, rename).

    Returns:
        The manifest as written: `manifest` with a fresh `manifest_checksum`.
    """
    written = {name: value for name, value in manifest.items() if name != CHECKSUM_KEY}
    written[CHECKSUM_KEY] = manifest_checksum(written)
    text = json.dumps(written, indent=1, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_text(directory, MANIFEST_NAME, text, durable)
    return written


def read_manifest(directory: str) -> Dict[str, Any]:
    """The parsed, validated and checksum-verified `manifest.json` of `directory`.

    Raises:
        FileNotFoundError: `directory` has no manifest.
        ManifestError: the manifest is not valid JSON, not a store manifest, of an unknown
            format version, invalid (see `validate_manifest`) or does not match its
            checksum (an edit), naming the file and the field.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SoftLabelStore: no {MANIFEST_NAME} in {directory!r}; it is not a soft-label store")
    with open(path, "r", encoding="utf-8") as handle:
        try:
            manifest = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ManifestError(f"SoftLabelStore: {path} is not valid JSON: {error}", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"SoftLabelStore: {path}: field 'format' is not {FORMAT_NAME!r}; this is not a "
                            "soft-label store manifest", path=path, field="format")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        raise ManifestError(
            f"SoftLabelStore: {path}: field 'format_version' is {version!r}; this kdfast reads versions "
            f"{list(READABLE_FORMAT_VERSIONS)}", path=path, field="format_version")
    if version >= 2:
        _check_checksum(manifest, path)
    else:
        warnings.warn(
            f"SoftLabelStore: {path} has format version {version}, which carries no manifest checksum: the "
            "shard table, shapes, dtypes and file checksums are cross-checked, but an edit of a field such as "
            f"the temperature cannot be detected. Resuming the store with a writer upgrades it to version "
            f"{FORMAT_VERSION}.", UserWarning, stacklevel=3)
    validate_manifest(manifest, path)
    return manifest
