"""Export an index's trained heads as a model bundle (:mod:`stylegen.index.bundle`).

The bundle keeps what a query needs and nothing of the collection: no paths, no covers, no
training rows, only the content hashes of the covers the heads were fitted on (so that
``evaluate`` never scores a model on them). Fitted parameters that were rounded to float16 at
fit (the compressor's components, kNN reference rows) are stored as float16, so a bundle
answers exactly like the index it came from; each exported head is checked on a sample of
the index's covers before the bundle is named.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stylegen.errors import IndexMismatchError, StylegenError
from stylegen.heads.compiled import load_compiled, save_compiled
from stylegen.heads.io import TRAIN_HASHES, head_file, load_predictor, read_head_info, read_head_set
from stylegen.index.bundle import BUNDLE_FORMAT, CARD, bundle_size, check_files
from stylegen.index.store import Index
from stylegen.util.persist import write_folder
from stylegen.util.versions import STYLEGEN_VERSION

EXPORT_TOLERANCE = 1e-3  # an exported head must answer like its source to this
PROBE_ROWS = 1000
MANIFEST_KEYS = ("format_version", "config", "backbone", "preprocess", "parts", "slices", "dims", "dim",
                 "metric", "precision", "runtime", "feature_id", "ingest_id", "compression_fit", "versions",
                 "created")


def _probe(index: Index, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(index), size=min(PROBE_ROWS, len(index)), replace=False))
    return np.asarray(index.vectors[rows], np.float32)


def _write_head(src: Path, dst: Path, probe: np.ndarray) -> dict[str, Any]:
    """Copy one compiled head; checks that the copy answers exactly like the original."""
    head = load_predictor(src)
    save_compiled(head, dst)
    drift = float(np.max(np.abs(load_compiled(dst).predict_proba(probe) - head.predict_proba(probe)), initial=0.0))
    if drift > EXPORT_TOLERANCE:
        raise StylegenError(f"head {src.stem} changed by {drift:.2g} when exported; not exporting it")
    dst.with_suffix(".json").write_text(json.dumps(read_head_info(src), indent=2), encoding="utf-8")
    return {"max_probability_change": drift}


def export_model(index_dir: str | Path, out: str | Path, *, name: str | None = None,
                 card: dict[str, Any] | None = None, graph: str | Path | None = None,
                 heads: Sequence[str] | None = None) -> Path:
    """Write the bundle of the index at ``index_dir`` (its live heads) to the new folder ``out``.

    ``card``: fields for ``model.json`` (training data, metrics, rebuild command, ...);
    ``graph``: an exported featurizer (``.onnx`` with its ``.json`` spec) to ship with it;
    ``heads``: which trained heads to keep (default: all).
    """
    out = Path(out)
    if out.exists():
        raise StylegenError(f"{out} exists; a model is exported to a new folder")
    index = Index.open(index_dir, use_gpu=False)
    head_set = read_head_set(index_dir)
    kept = list(heads) if heads is not None else list(head_set["heads"])
    unknown = [h for h in kept if h not in head_set["heads"]]
    if unknown or not kept:
        raise StylegenError(f"heads to export must be among {', '.join(head_set['heads'])}, got {', '.join(kept)}")
    heads = head_set
    if heads["feature_id"] != index.feature_id:
        raise IndexMismatchError("the heads were trained before the index changed; run `stylegen train` again")
    probe = _probe(index)
    name = name or out.name

    def fill(tmp: Path) -> None:
        manifest = {k: index.manifest[k] for k in MANIFEST_KEYS if k in index.manifest}
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "count": 0}, indent=2, sort_keys=True))
        index.compressor.save(tmp / "compressor.npz")
        (tmp / "heads").mkdir()
        stored = {h: _write_head(head_file(heads["dir"], h), tmp / "heads" / f"{h}.npz", probe) for h in kept}
        config = {k: v for k, v in heads.items() if k not in ("dir", "train_rows")}
        config["heads"] = kept
        if config["default_head"] not in kept:
            raise StylegenError(f"the default head {config['default_head']} must be exported")
        if config["default_method"] == "knn" and "knn" not in kept or config["default_method"] == "ensemble" \
                and "ensemble" not in kept:
            config["default_method"] = "head"
        (tmp / "heads" / "heads.json").write_text(json.dumps({**config, "train_rows": []}, indent=1))
        trained = index.rows(heads["train_rows"])["content_hash"].dropna().astype(str).tolist()
        np.savez(tmp / "heads" / TRAIN_HASHES, hashes=np.array(sorted(trained), dtype="S"))
        if graph is not None:
            shutil.copyfile(graph, tmp / "featurizer.onnx")
            shutil.copyfile(Path(graph).with_suffix(".json"), tmp / "featurizer.json")
        model_card = {
            "bundle_format": BUNDLE_FORMAT,
            "name": name,
            "version": STYLEGEN_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": f"{heads['labels']}-label genre classification of album covers",
            "classes": heads["classes"],
            "labels": heads["labels"],
            "heads": kept,
            "default_method": config["default_method"],
            "default_head": heads["default_head"],
            "feature_id": index.feature_id,
            "input": {"image": "any JPEG/PNG/WebP/GIF/BMP", "preprocess": index.preprocess.to_dict(),
                      "backbone": index.manifest["backbone"]["name"],
                      "weights_id": index.manifest["backbone"]["weights_id"]},
            "output": "probability per class (softmax for single-label heads, sigmoid for multi-label)",
            "max_probability_change_on_export": max(s["max_probability_change"] for s in stored.values()),
            "training_covers": len(heads["train_rows"]),
            **(card or {}),
        }
        (tmp / CARD).write_text(json.dumps(model_card, indent=2), encoding="utf-8")

    out.parent.mkdir(parents=True, exist_ok=True)
    final = write_folder(out.parent, out.name, fill)
    check_files(final)
    return final


def describe_model(model: Any) -> dict[str, Any]:
    """``stylegen model info``: the card, plus where the model is and its size on disk."""
    return {**model.card, "path": str(model.root), "size_bytes": bundle_size(model.root)}
