"""How the neural encoders run: torch, or ONNX Runtime on a graph exported from the same weights.

The ONNX files are built on first use from the project's own torch weights (never downloaded),
cached under `cache_dir` with the weights' SHA-256 in their name (new weights, new file), and
written atomically so concurrent processes never read a half-written file. The backend is an
inference detail: an encoder's identity, and so every collection it wrote, is the same in both.

Variants (measured in benchmarks/bench_encoders.py): fp32, and int8, which is ORT dynamic
quantization with per-channel weights for matrix multiplications (text; per-tensor loses too
much) and static QDQ per-channel quantization with calibration photos for convolutions (image;
dynamic int8 convolutions are slower than fp32 here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from prodsearch.encoders.base import Encoder
from prodsearch.errors import ConfigError

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from prodsearch.settings import Settings

Backend = Literal["torch", "onnx"]
Precision = Literal["auto", "fp32", "int8"]
#: builds an int8 file from an fp32 one; may return a report stored beside it (`build_report`)
Quantizer = Callable[[Path, Path], Mapping[str, Any] | None]
#: bump when the exported graphs change for the same weights (the cache key holds it)
EXPORT_FORMAT = 1
OPSET = 17
CALIBRATION_PHOTOS = 100
#: held-out photos on which a freshly built int8 image graph must agree with fp32
CHECK_PHOTOS = 20
#: the mean cosine to fp32 an int8 variant must reach to be picked by precision "auto"
QUALITY_BAR = 0.99
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})

_REPO = Path(__file__).resolve().parents[3]
log = logging.getLogger("prodsearch")


def available_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class InferenceOptions:
    """Which backend runs the neural encoders, and how (see the module docstring)."""

    backend: Backend = "onnx"
    precision: Precision = "auto"
    #: ORT intra-op threads; None = every core this process may use
    threads: int | None = None
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/prodsearch").expanduser())
    #: a folder of photos to calibrate the int8 image graph with; None = look in known places
    calibration_images: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> InferenceOptions:
        """Return the options `settings` names (default: options, environment, settings file)."""
        from prodsearch.settings import Settings

        settings = settings or Settings()
        return cls(
            backend=settings.backend,
            precision=settings.onnx_precision,
            threads=settings.onnx_threads,
            cache_dir=settings.cache_dir.expanduser(),
            calibration_images=settings.calibration_images,
        )


class NeuralEncoder(Encoder):
    """An encoder whose network runs in torch or in ONNX Runtime, per its InferenceOptions.

    Subclasses export their fp32 network (`export_onnx`), may say how to build int8
    (`int8_recipe`), and name the variant `precision="auto"` picks (`auto_precision`).
    """

    inference: InferenceOptions
    neural = True
    #: the variant "auto" picks: the fastest one whose mean cosine to torch is >= 0.99
    auto_precision: Literal["fp32", "int8"] = "fp32"
    #: cached attributes that hold torch modules (dropped after an export under ONNX)
    torch_attributes: tuple[str, ...] = ()

    @property
    def precision(self) -> Literal["fp32", "int8"]:
        """The ONNX variant asked for (int8 may still fall back to fp32, see `onnx_file`)."""
        chosen = self.inference.precision
        return self.auto_precision if chosen == "auto" else chosen

    @abstractmethod
    def export_onnx(self, path: Path) -> None:
        """Write the fp32 network, from input arrays to normalised vectors, to `path`."""

    def int8_recipe(self) -> tuple[str, Quantizer] | None:
        """Return (a cache-name suffix, a function fp32 file -> int8 file), or None when no
        int8 variant can be built here (fp32 is used instead)."""
        return ("", quantize_dynamic_int8)

    def onnx_file(self) -> Path:
        """Return the cached ONNX file of this encoder's weights and precision (built if absent).

        Under precision "auto", an int8 graph whose build report (held-out agreement with fp32)
        falls below QUALITY_BAR is not used: fp32 is.
        """
        stem = f"{self.modality}-{self.identity().weights_sha256[:16]}-v{EXPORT_FORMAT}"
        fp32 = cached_file(self.inference.cache_dir / f"{stem}-fp32.onnx", self._export_and_free)
        recipe = self.int8_recipe() if self.precision == "int8" else None
        if recipe is None:
            return fp32
        suffix, quantize = recipe
        int8 = cached_file(
            self.inference.cache_dir / f"{stem}-int8{suffix}.onnx",
            lambda out: quantize(fp32, out),
        )
        report = build_report(int8)
        if self.inference.precision == "auto" and report and report["mean_cosine"] < QUALITY_BAR:
            log.info(
                "%s: int8 mean cosine %.4f to fp32 < %s, using fp32",
                int8,
                report["mean_cosine"],
                QUALITY_BAR,
            )
            return fp32
        return int8

    @cached_property
    def session(self) -> InferenceSession:
        """The ONNX Runtime session of `onnx_file()` (exported on first use)."""
        return open_session(self.onnx_file(), self.inference.threads)

    def run_onnx(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Run the session on one batch; return its only output as float32."""
        return self.session.run(None, dict(inputs))[0].astype(np.float32, copy=False)

    def _export_and_free(self, path: Path) -> None:
        self.export_onnx(path)
        if self.inference.backend == "onnx":
            # The torch network was loaded only to be exported: give its memory back.
            for name in self.torch_attributes:
                self.__dict__.pop(name, None)


def export_module(
    module: Any,
    example: tuple[Any, ...],
    path: Path,
    input_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> None:
    """Export a torch module to ONNX (TorchScript exporter, opset 17) with output `embedding`."""
    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # Tracer and deprecation warnings concern control flow these graphs do not have.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=list(input_names),
            output_names=["embedding"],
            dynamic_axes={**dynamic_axes, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def cached_file(path: Path, build: Callable[[Path], Mapping[str, Any] | None]) -> Path:
    """Return `path`, first building it with `build(tmp)` and renaming it into place if absent.

    When `build` returns a report, it is stored beside the file as JSON (see `build_report`).
    Raises ConfigError when the cache folder cannot be written.
    """
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as scratch:
            partial = Path(scratch) / path.name
            log.info("building %s (once per weights file)", path)
            report = build(partial)
            if report is not None:
                # The report lands first: whoever finds the model finds its report.
                sidecar = partial.with_suffix(".json")
                sidecar.write_text(json.dumps(dict(report), indent=1), encoding="utf-8")
                os.replace(sidecar, path.with_suffix(".json"))
            os.replace(partial, path)  # atomic on one filesystem: readers see all or nothing
    except PermissionError as exc:
        raise ConfigError(
            f"cannot write the ONNX model cache {path.parent}: {exc.strerror}; "
            "set PRODSEARCH_CACHE_DIR to a writable folder or PRODSEARCH_BACKEND=torch"
        ) from exc
    return path


def build_report(path: Path) -> dict[str, Any] | None:
    """Return the report stored when `path` was built (e.g. its agreement with fp32), if any."""
    sidecar = path.with_suffix(".json")
    return json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None


def agreement(
    reference: Path, candidate: Path, batches: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Return the mean and min cosine between two ONNX graphs' outputs on `batches`."""
    outputs = [
        np.concatenate([session.run(None, dict(batch))[0] for batch in batches])
        for session in (open_session(reference), open_session(candidate))
    ]
    a, b = outputs
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "items": len(cosines),
    }


def open_session(path: Path, threads: int | None = None) -> InferenceSession:
    """Return a CPU ONNX Runtime session on `path` (intra-op `threads`, default every core)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(
            "onnxruntime is not installed: pip install onnxruntime, or PRODSEARCH_BACKEND=torch"
        ) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    # One graph at a time per session; parallelism is inside each operator.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Threads spin while a run lasts (fast), not after it: the text and image sessions take turns
    # in one process, and idle-spinning threads of the one that just ran would take the cores
    # from the next (measured: a title + image query's encoding, p50 29 -> 14 ms).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_dynamic_int8(
    source: Path, target: Path, keep_fp32: Callable[[str], bool] | None = None
) -> None:
    """Write `source` with int8 per-channel weights and dynamically quantized activations;
    nodes whose name `keep_fp32` accepts stay in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [node.name for node in onnx.load(str(source)).graph.node]
    with _quiet_quantizer():
        quantize_dynamic(
            source,
            target,
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[name for name in names if keep_fp32 and keep_fp32(name)],
        )


def quantize_static_int8(
    source: Path,
    target: Path,
    calibration: Sequence[Mapping[str, np.ndarray]],
    keep_fp32: Sequence[str] = (),
) -> None:
    """Write `source` as a static QDQ int8 graph calibrated on `calibration` batches.

    Per-channel int8 weights in 7 bits (`reduce_range`): CPUs without VNNI compute u8 x s8
    products in saturating 16-bit sums, which 8-bit weights overflow. Nodes whose name contains
    one of `keep_fp32` stay in fp32.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[Mapping[str, np.ndarray]] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else dict(batch)

    prepared = target.with_name(target.name + ".pre.onnx")
    with _quiet_quantizer():
        quant_pre_process(str(source), str(prepared))
        import onnx

        names = [node.name for node in onnx.load(str(prepared)).graph.node]
        quantize_static(
            prepared,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[n for n in names if any(part in n for part in keep_fp32)],
        )
    prepared.unlink()


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # The quantizer logs advice ("consider pre-processing") on the root logger at WARNING.
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def calibration_photo_files(folder: Path | None, n: int = CALIBRATION_PHOTOS) -> list[Path]:
    """Return up to `n` photos to calibrate an int8 image graph with (empty when none are found).

    `folder` when given; else the Grocery Store `train` photos in the shared data beside the
    checkout; else the sample catalog's photos (few, so they are augmented).
    """
    candidates = (
        [folder]
        if folder is not None
        else [
            _REPO.parent / "shared" / "data" / "grocery_store" / "images" / "train",
            _REPO / "ingest" / "sample" / "images",
        ]
    )
    for candidate in candidates:
        if candidate.is_dir():
            photos = sorted(p for p in candidate.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
            if photos:
                # Evenly spaced over the sorted paths: every class folder is represented.
                picks = min(len(photos), n)
                return [photos[i * len(photos) // picks] for i in range(picks)]
    return []


def calibration_digest(files: Sequence[Path]) -> str:
    """Return a short hash naming a calibration set (file names and sizes: cheap, no decoding)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:8]


def calibration_photos(files: Sequence[Path], n: int = CALIBRATION_PHOTOS) -> list[Image.Image]:
    """Return `n` RGB photos: `files` decoded, then augmented copies of them (crops, flips,
    brightness and contrast, seeded) when there are fewer than `n`."""
    from prodsearch.images import load_image

    photos = [load_image(path) for path in files]
    rng = random.Random(0)
    out = list(photos[:n])
    while photos and len(out) < n:
        out.append(_augment(photos[len(out) % len(photos)], rng))
    return out


def _augment(photo: Image.Image, rng: random.Random) -> Image.Image:
    width, height = photo.size
    scale = rng.uniform(0.6, 1.0)
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    out = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))
