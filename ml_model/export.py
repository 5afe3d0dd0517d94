"""Export a trained artifact to ONNX (fp32 and int8) or TorchScript, for running outside the platform.

The exported graph is the WHOLE serving path of ``artifacts.Predictor``, so it takes raw windows exactly as
the device sends them and returns class probabilities:

    input  "raw_windows"    float32 (batch, n_device_channels, window)   raw device values (int16 range)
    output "probabilities"  float32 (batch, n_classes)                   softmax, classes in meta["classes"] order

Inside: channel selection (``meta["channels"]``), the filter (a zero-phase IIR filter applied per window is a
fixed linear map of the window, exported as one (window x window) matrix computed from
``preprocessing.apply_filter`` itself), standardisation with the artifact's scaler, the CNN, softmax.
The same description is written next to the file as a sidecar JSON (``sidecar``) and embedded in the file
(ONNX ``metadata_props["semg"]``, TorchScript extra file ``semg.json``).

int8: ``onnxruntime.quantization.quantize_dynamic`` (weights int8, activations quantised on the fly; no
calibration data needed) of the CNN only: the preprocessing nodes see raw device values, whose DC level would
eat the int8 range, so they stay float32. ``compare`` reports the size and the change in predictions/accuracy,
on given windows or on ``probe_windows`` at the raw level recorded in the artifact (``input_stats``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml_model import preprocessing as pp
from ml_model.export_names import EXTENSIONS, FORMATS, export_filename, stored_meta, with_names_now  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "raw_windows", "probabilities"
OPSET = 17


class ExportedPredictor(nn.Module):
    """Raw windows -> probabilities: channel selection, filter, standardisation, EMGNet, softmax."""

    def __init__(self, model: nn.Module, meta: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model.eval()
        n_dev = int(meta["n_device_channels"])
        channels = [int(c) for c in meta.get("channels") or range(n_dev)]
        self.select = channels != list(range(n_dev))
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long))
        mean = torch.tensor(meta["scaler"]["mean"], dtype=torch.float32).view(1, -1, 1)
        std = torch.tensor(meta["scaler"]["std"], dtype=torch.float32).view(1, -1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", 1.0 / std)
        fmat = filter_matrix(meta)
        self.filtered = fmat is not None
        self.register_buffer("filter_t", torch.from_numpy(fmat.T.copy()) if fmat is not None else torch.zeros(0))

    def forward(self, raw_windows: torch.Tensor) -> torch.Tensor:
        x = raw_windows
        if self.select:
            x = torch.index_select(x, 1, self.channels)
        if self.filtered:
            x = torch.matmul(x, self.filter_t)
        x = (x - self.mean) * self.inv_std
        return torch.softmax(self.model(x), dim=1)


def filter_matrix(meta: Mapping[str, Any]) -> np.ndarray | None:
    """The (window, window) float32 matrix F with filtered = F @ window, or None when no filter is configured.

    ``apply_filter`` runs sosfiltfilt with a fixed pad length on each window independently, which is linear
    in the window, so applying it to the identity basis gives its exact matrix.
    """
    cfg = pp.filter_config(meta.get("filter"))
    if not cfg.get("highpass_hz") and not cfg.get("notch_hz"):
        return None
    win = int(meta["window"])
    basis = np.eye(win, dtype=np.float64)[:, None, :]  # (win, 1, win): row i = unit impulse at i
    response = pp.apply_filter(basis, cfg, float(meta["sample_rate_hz"]))[:, 0, :]  # (win, win): row i = F e_i
    return response.T.astype(np.float32)


def sidecar(meta: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """What the exported file takes and returns (JSON-able)."""
    n_dev, win = int(meta["n_device_channels"]), int(meta["window"])
    return {
        "format": fmt,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", n_dev, win],
                  "layout": "(batch, device channel, sample): raw device values, channels in device order, "
                            "the last `window` samples in time order"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(meta["classes"])],
                   "meaning": "class probabilities (softmax) in `classes` order"},
        "includes": ["channel selection", "filter" if filter_matrix(meta) is not None else "no filter configured",
                     "standardisation", "cnn", "softmax"],
        "classes": list(meta["classes"]),
        # {name a class was trained under: its gesture's name now (in `classes`)}
        "renamed": dict(meta.get("renamed") or {}),
        "channels": list(meta["channels"]),
        "n_device_channels": n_dev,
        "sample_rate_hz": meta["sample_rate_hz"],
        "window": win, "window_ms": meta.get("window_ms"),
        "step": meta.get("step"), "step_ms": meta.get("step_ms"),
        "filter": pp.filter_config(meta.get("filter")),
        "scaler": meta["scaler"],
        "source_sha256": meta.get("sha256"),
        "source_artifact_id": meta.get("artifact_id"),
        "job_id": meta.get("job_id"),
        # how the source model was made, so that a file handed on can be tied to a training (README: Reproducing)
        "source_created_at": meta.get("created_at"),
        "training_seed": (meta.get("training") or {}).get("seed"),
        "environment": meta.get("environment"),
    }


def _module(weights: bytes, meta: Mapping[str, Any]) -> ExportedPredictor:
    from ml_model.artifacts import load_artifact

    return ExportedPredictor(load_artifact(weights, meta), meta).eval()


# Without recorded raw statistics, a filtered artifact does not say at what level the device's values sit (a
# high-pass filter removes it before the scaler): the probe then spreads its windows over these offsets, from
# signed devices near 0 to a 12-bit ADC's mid-scale (2048) and top.
UNKNOWN_LEVEL_RANGE = (-4096.0, 4096.0)


def probe_windows(meta: Mapping[str, Any], n: int = 256, seed: int = 1) -> tuple[np.ndarray, str]:
    """Random raw windows on the scale of what the device sends, to check an exported file without data;
    returns ``(windows (n, n_device_channels, window) float32, a description of the probe)``.

    With ``meta["input_stats"]`` (the raw training windows' per-device-channel mean/std) the windows have that
    level and spread. Older artifacts only have the scaler, which describes the *filtered* signal: without a
    filter that is the raw scale of the used channels; with one, the raw level is unknown, so each window gets
    a random offset per channel from ``UNKNOWN_LEVEL_RANGE``.
    """
    rng = np.random.default_rng(seed)
    n_dev, win = int(meta["n_device_channels"]), int(meta["window"])
    stats = meta.get("input_stats")
    if stats and len(stats.get("mean", ())) == n_dev and len(stats.get("std", ())) == n_dev:
        mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
        offset, what = 0.0, "the level and spread of the raw training data (input_stats)"
    else:
        mean, std = np.zeros(n_dev), np.ones(n_dev)
        chans = list(meta.get("channels") or range(n_dev))
        mean[chans] = meta["scaler"]["mean"]
        std[chans] = meta["scaler"]["std"]
        if filter_matrix(meta) is None:
            offset, what = 0.0, "the scale of the artifact's scaler (no filter: the raw scale)"
        else:
            offset = rng.uniform(*UNKNOWN_LEVEL_RANGE, size=(n, n_dev, 1))
            what = (f"the spread of the artifact's scaler at raw levels from {UNKNOWN_LEVEL_RANGE[0]:g} to "
                    f"{UNKNOWN_LEVEL_RANGE[1]:g} (the artifact does not record its raw input level)")
    x = offset + mean[None, :, None] + std[None, :, None] * rng.standard_normal((n, n_dev, win))
    return x.astype(np.float32), f"{n} random windows at {what}; no labels"


def _example(meta: Mapping[str, Any], n: int = 2, seed: int = 0) -> torch.Tensor:
    """Raw-looking example windows (for tracing the graph)."""
    return torch.from_numpy(probe_windows(meta, n, seed)[0])


def to_onnx(weights: bytes, meta: Mapping[str, Any]) -> bytes:
    """fp32 ONNX model bytes (dynamic batch), sidecar embedded as metadata_props["semg"]."""
    import onnx

    module = _module(weights, meta)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (_example(meta),), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    _set_meta(proto, sidecar(meta, "onnx"))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _set_meta(proto, info: Mapping[str, Any]) -> None:
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"semg": json.dumps(info, allow_nan=False)})
    proto.producer_name = "semg-platform"
    proto.doc_string = "raw sEMG windows -> gesture probabilities; see metadata_props['semg']"


MODEL_SCOPE = "/model/"  # torch.onnx names the nodes of ExportedPredictor.model "/model/..."


def quantize_int8(onnx_bytes: bytes, meta: Mapping[str, Any] | None = None) -> bytes:
    """Dynamic int8 quantisation of an fp32 ONNX model (weights int8; activations quantised at run time).

    Only the CNN is quantised. The wrapper's own nodes (channel selection, filter matrix, standardisation,
    softmax) stay float32: they work on raw device values, and a dynamically quantised activation spans
    [min(0, x), max(0, x)] in 256 steps, so a DC offset (an ESP32's ADC sits near 2048) would leave a few
    steps for the signal itself and cost accuracy (measured: -8 points with a high-pass filter).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(onnx_bytes)
        quant_pre_process(str(src), str(pre))  # shape inference + graph optimisation, as onnxruntime advises
        graph = onnx.load(str(pre)).graph
        if not any(node.name.startswith(MODEL_SCOPE) for node in graph.node):
            raise RuntimeError(f"no {MODEL_SCOPE} nodes in the exported graph: cannot tell the CNN from the "
                               "raw-input preprocessing (did torch.onnx change its node names?)")
        raw_scale = [node.name for node in graph.node if not node.name.startswith(MODEL_SCOPE)]
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=raw_scale)
        proto = onnx.load(str(dst))
    if meta is not None:
        _set_meta(proto, sidecar(meta, "onnx-int8"))
    return proto.SerializeToString()


def to_torchscript(weights: bytes, meta: Mapping[str, Any]) -> bytes:
    """TorchScript (traced) bytes; ``torch.jit.load(io.BytesIO(b))`` runs it; sidecar in extra file semg.json."""
    module = _module(weights, meta)
    with torch.no_grad():
        traced = torch.jit.trace(module, (_example(meta),), check_trace=True)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"semg.json": json.dumps(sidecar(meta, "torchscript"))})
    return buf.getvalue()


def export_bytes(weights: bytes, meta: Mapping[str, Any], fmt: str = "onnx") -> bytes:
    """The exported model file for ``fmt`` in ``FORMATS`` ("onnx", "onnx-int8", "torchscript"), as bytes.

    For the UI's download button: ``st.download_button(data=export_bytes(w, meta, "onnx"), file_name=
    export_filename(meta, "onnx"))``. The description of the input is embedded in the file (see module doc).
    """
    fmt = fmt.lower()
    if fmt == "onnx":
        return to_onnx(weights, meta)
    if fmt in ("onnx-int8", "int8"):
        return quantize_int8(to_onnx(weights, meta), meta)
    if fmt == "torchscript":
        return to_torchscript(weights, meta)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")


# ---- running exported files (checks, benchmarks) ------------------------------------------------------
def onnx_session(onnx_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(onnx_bytes_or_session, raw_windows: np.ndarray, batch: int = 4096) -> np.ndarray:
    sess = onnx_session(onnx_bytes_or_session) if isinstance(onnx_bytes_or_session, bytes) else onnx_bytes_or_session
    x = np.ascontiguousarray(raw_windows, dtype=np.float32)
    return np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]) \
        if len(x) else np.empty((0, 0), np.float32)


def run_torchscript(ts_bytes: bytes, raw_windows: np.ndarray) -> np.ndarray:
    mod = torch.jit.load(io.BytesIO(ts_bytes))
    with torch.inference_mode():
        return mod(torch.from_numpy(np.ascontiguousarray(raw_windows, dtype=np.float32))).numpy()


def compare(
    weights: bytes,
    meta: Mapping[str, Any],
    raw_windows: np.ndarray | None = None,
    labels: Sequence[Any] | None = None,
    formats: Sequence[str] = ("onnx", "onnx-int8", "torchscript"),
    exported: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Run the PyTorch ``Predictor`` and each exported format on the same raw windows and report
    sizes, max |probability difference|, top-1 agreement and (with labels) accuracies.

    Without windows, ``probe_windows`` are used (no accuracy then; ``probe`` in the result describes them).
    """
    from ml_model.artifacts import Predictor

    probe = None
    if raw_windows is None:
        raw_windows, probe = probe_windows(meta)
    x = np.asarray(raw_windows, dtype=np.float32)
    ref = Predictor(weights, meta).predict_proba(x)
    ref_top = ref.argmax(1)
    classes = list(meta["classes"])
    y = None if labels is None else np.array([classes.index(str(v)) for v in labels])
    out: dict[str, Any] = {"n_windows": int(len(x)), "safetensors_bytes": len(weights)}
    if probe is not None:
        out["probe"] = probe
    if y is not None:
        out["pytorch_accuracy"] = float(np.mean(ref_top == y))
    for fmt in formats:
        data = (exported or {}).get(fmt) or export_bytes(weights, meta, fmt)
        prob = run_torchscript(data, x) if fmt == "torchscript" else run_onnx(data, x)
        r = {"bytes": len(data), "max_abs_diff": float(np.max(np.abs(prob - ref))) if len(x) else 0.0,
             "top1_agreement": float(np.mean(prob.argmax(1) == ref_top))}
        if y is not None:
            r["accuracy"] = float(np.mean(prob.argmax(1) == y))
            r["accuracy_change_points"] = round(100.0 * (r["accuracy"] - out["pytorch_accuracy"]), 3)
        out[fmt] = r
    return out


# ---- CLI helpers (used by TrainMLJob.py export) -------------------------------------------------------
def load_job_artifact(job_id: int, settings=None) -> tuple[bytes, dict[str, Any], int]:
    """(weights, meta, artifact_id) of the newest artifact a job produced."""
    from semg import db, repo
    from semg.config import get_settings

    conn = db.connect(settings or get_settings())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, weights, metadata, classes FROM model_artifacts WHERE job_id = %s "
                        "ORDER BY created_at DESC, id DESC LIMIT 1", (int(job_id),))
            row = cur.fetchone()
            if row is None:
                cur.execute("SELECT status FROM training_jobs WHERE id = %s", (int(job_id),))
                job = cur.fetchone()
        renamed = repo.renamed_classes(conn, row[0], row[3]) if row is not None else {}
    finally:
        conn.close()
    if row is None:
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        if job[0] in ("scheduled", "running"):
            raise LookupError(f"job {job_id} is {job[0]}: it has no model artifact yet (export it once it completed)")
        raise LookupError(f"job {job_id} is {job[0]}: it has no model artifact")
    return bytes(row[1]), with_names_now(stored_meta(row[0], None, row[2]), renamed), int(row[0])


def cli_export(
    job_id: int | None = None,
    fmt: str = "onnx",
    out: str | os.PathLike | None = None,
    artifact_dir: str | os.PathLike | None = None,
    int8: bool = True,
    check: bool = True,
    settings=None,
) -> dict[str, Any]:
    """What ``TrainMLJob.py export`` does: write the file (+ sidecar JSON, + the int8 variant for ONNX) and
    return a JSON-able report (paths, sizes, max abs difference vs PyTorch, int8 agreement)."""
    from ml_model import artifacts

    if (job_id is None) == (artifact_dir is None):
        raise ValueError("give a JOB_ID or --artifact-dir (exactly one)")
    fmt = fmt.lower()
    if fmt not in ("onnx", "torchscript"):
        raise ValueError("--format must be onnx or torchscript (the int8 ONNX variant is written alongside onnx)")
    if artifact_dir is not None:
        weights, meta = artifacts.read_artifact_dir(artifact_dir)
        source = {"artifact_dir": str(artifact_dir)}
    else:
        weights, meta, artifact_id = load_job_artifact(int(job_id), settings)
        source = {"job_id": int(job_id), "artifact_id": artifact_id}
    if not out:
        path = Path(export_filename(meta, fmt))
    # a folder (existing, ending in "/", or a new name without a suffix: `--out exports` never means a file
    # "exports" with no extension): the file goes in it, named as usual
    elif str(out).endswith(("/", os.sep)) or Path(out).is_dir() or not Path(out).suffix:
        path = Path(out) / export_filename(meta, fmt)
    else:
        path = Path(out)
    data = export_bytes(weights, meta, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    side = path.with_suffix(path.suffix + ".json")
    side.write_text(json.dumps(sidecar(meta, fmt), indent=2) + "\n", encoding="utf-8")
    report: dict[str, Any] = {**source, "format": fmt, "path": str(path), "sidecar": str(side), "bytes": len(data),
                              "safetensors_bytes": len(weights)}
    exported = {fmt: data}
    if fmt == "onnx" and int8:
        q = quantize_int8(data, meta)
        qpath = path.with_name(path.name[: -len(".onnx")] + ".int8.onnx" if path.name.endswith(".onnx")
                               else path.name + ".int8.onnx")
        qpath.write_bytes(q)
        qside = qpath.with_suffix(qpath.suffix + ".json")
        qside.write_text(json.dumps(sidecar(meta, "onnx-int8"), indent=2) + "\n", encoding="utf-8")
        report.update(int8_path=str(qpath), int8_bytes=len(q), int8_size_ratio=round(len(q) / len(data), 3))
        exported["onnx-int8"] = q
    if check:
        report["check"] = compare(weights, meta, formats=list(exported), exported=exported)
    return report


def _main(argv: Sequence[str]) -> int:
    """``python -m ml_model.export ARTIFACT_DIR FORMAT OUT``: write ``export_bytes`` of an artifact dir to OUT.

    The API's model download runs this in its own process, at low priority: an export takes seconds of CPU and
    torch.onnx's global export state, neither of which belongs in the process serving live /predict."""
    from ml_model import artifacts

    if len(argv) != 3:
        print("usage: python -m ml_model.export ARTIFACT_DIR FORMAT OUT", file=sys.stderr)
        return 2
    src, fmt, out = argv
    os.nice(10)
    torch.set_num_threads(1)
    weights, meta = artifacts.read_artifact_dir(src)
    Path(out).write_bytes(export_bytes(weights, meta, fmt))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_main(sys.argv[1:]))
