"""Formats and file names of exported models (``ml_model.export``), known without exporting. Free of PyTorch, so
the web UI names its download buttons without loading it (+180 MB and seconds on the Jobs page's first render)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FORMATS = ("onnx", "onnx-int8", "torchscript")
EXTENSIONS = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "torchscript": ".pt"}


def stored_meta(artifact_id: int, job_id: int | None, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A stored model's metadata (model_artifacts row) with its artifact and job ids, which its export's name and
    embedded description use (ids the metadata already holds are kept)."""
    meta = dict(metadata or {})
    meta.setdefault("artifact_id", int(artifact_id))
    if job_id is not None:
        meta.setdefault("job_id", int(job_id))
    return meta


def with_names_now(meta: Mapping[str, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    """The metadata with its classes by the names their gestures have now (semg.repo.renamed_classes), as the API
    answers: a file exported after a rename names its outputs as the bank does; ``renamed`` keeps the old names."""
    out = dict(meta)
    if renamed:
        out["classes"] = [renamed.get(str(c), str(c)) for c in meta["classes"]]
        out["renamed"] = dict(renamed)
    return out


def export_filename(meta: Mapping[str, Any], fmt: str) -> str:
    """Default file name: ``semg-job<job id>`` or ``semg-<sha256 prefix>`` plus the format's extension.

    Always one plain file name in the current folder: metadata can come from a file anyone wrote, so only a
    whole-number job id is used and the sha256 part keeps letters, digits, ``-`` and ``_`` only.
    """
    job_id = str(meta.get("job_id"))
    if re.fullmatch(r"[0-9]{1,18}", job_id) and int(job_id) > 0:  # also refuses True, 3.0, "../x"
        stem = f"semg-job{int(job_id)}"
    else:
        stem = "semg-" + (re.sub(r"[^A-Za-z0-9_-]", "", str(meta.get("sha256") or ""))[:12] or "model")
    return stem + EXTENSIONS[fmt.lower() if fmt.lower() in EXTENSIONS else "onnx"]
