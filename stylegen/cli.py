"""The `stylegen` command: a thin layer over the library.

Each command checks its flags, calls one library function and prints the result.
Known errors become one line on stderr and a non-zero exit code (see :func:`main`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from stylegen.errors import StylegenError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Judge an album by its cover: genres and similar covers from style features.",
)

IndexDir = Annotated[Path, typer.Option("--index", "-i", help="Index directory.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


@app.callback()
def _root() -> None:
    """Judge an album by its cover: genres and similar covers from style features."""


def _parts(value: str) -> tuple[str, ...]:
    return ("style", "content") if value == "both" else (value,)


@app.command()
def embed(
    source: Annotated[Path, typer.Argument(help="Folder of images (subfolders = genres) or CSV manifest.")],
    index: IndexDir = Path("indexes/default"),
    backbone: Annotated[str | None, typer.Option(help="efficientnet-lite0|1|2 or open_clip:ARCH (new index only).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local weights file or open_clip pretrained tag.")] = None,
    taps: Annotated[str | None, typer.Option(
        help="Comma-separated tap layers for the Gram matrices, e.g. stage4,stage5,stage6 (new index only).")] = None,
    parts: Annotated[str | None, typer.Option(help="style | content | both (new index only).")] = None,
    style_weight: Annotated[float, typer.Option(help="Weight of the style part.")] = 1.0,
    content_weight: Annotated[float, typer.Option(help="Weight of the content part.")] = 1.0,
    compression: Annotated[str | None, typer.Option(help="pca | rp | none (new index only).")] = None,
    dim: Annotated[int, typer.Option(help="Compressed size of each part.")] = 256,
    whiten: Annotated[bool, typer.Option(help="Whiten the PCA output.")] = False,
    flip: Annotated[bool, typer.Option(help="Average each image with its mirror image.")] = False,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Forward batch (default: 16 on CPU, 64 on GPU).")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode worker processes (default: by device and cores).")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Embed every new image of SOURCE into the index (resumable, incremental)."""
    from stylegen.config import BackboneConfig, CompressionConfig, EmbedConfig, FeatureConfig
    from stylegen.embed import embed as run_embed

    asked = any(v is not None for v in (backbone, weights, taps, parts, compression)) or flip or whiten
    config = None
    if asked or not (index / "CURRENT").is_file():
        p = _parts(parts or "both")
        config = EmbedConfig(
            backbone=BackboneConfig(name=backbone or "efficientnet-lite0", weights=weights,
                                    taps=_split(taps) if taps else None),
            features=FeatureConfig(parts=p, weights={"style": style_weight, "content": content_weight}, flip=flip),
            compression=CompressionConfig(method=compression or "pca", dims={q: dim for q in ("style", "content")},
                                          whiten=whiten),
        )
    report = run_embed(source, index, config, device=device, batch_size=batch_size, workers=workers,
                       precision=precision, progress=progress)
    typer.echo(report.summary())
    if report.bad:
        typer.echo(f"skipped files are listed in {index / 'bad_files.csv'}")


Tabular = Annotated[Path | None, typer.Option(help="CSV of numeric features per item, joined on --tabular-key.")]
TabularColumns = Annotated[str | None, typer.Option(
    help="Comma-separated numeric columns; FIRST:LAST is a run of columns (default with --tabular: all numeric).")]
TabularKey = Annotated[str, typer.Option(help="Column joining the table to the images.")]
Method = Annotated[str | None, typer.Option(help="head | knn | ensemble (default: ensemble when trained).")]


def _table(rows, tabular: Path | None, columns: str | None, key: str):
    """Numeric features for ``rows`` (a DataFrame with the key column), or None."""
    if tabular is None and columns is None:
        return None, None
    from stylegen.tabular import load_tabular

    cols = [c.strip() for c in columns.split(",")] if columns else None
    return load_tabular(rows, columns=cols, table=tabular, key=key)


@app.command()
def train(
    index: IndexDir = Path("indexes/default"),
    head: Annotated[list[str], typer.Option(help="linear | mlp | knn | ensemble | all (repeatable).")] = ["all"],  # noqa: B006
    labels: Annotated[str, typer.Option(help="single (genre) | multi (genres).")] = "single",
    taxonomy: Annotated[Path | None, typer.Option(help="YAML/JSON parent -> children (default: packaged).")] = None,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    seed: int = 0,
) -> None:
    """Fit genre heads on the index's vectors and store them in the index."""
    from stylegen.store import Index
    from stylegen.train import HEAD_NAMES
    from stylegen.train import train as run_train

    heads = list(HEAD_NAMES) if "all" in head else head
    table, cols = _table(Index.open(index, use_gpu=False).metadata, tabular, tabular_columns, tabular_key)
    cfg = run_train(index, heads, labels, taxonomy, table, cols, seed)
    scores = cfg.get("validation_macro_f1") or cfg.get("validation_top1_in_labels") or {}
    typer.echo(f"trained {', '.join(cfg['heads'])} on {len(cfg['train_rows'])} covers, "
               f"{len(cfg['classes'])} genres; default head {cfg['default_head']}, method {cfg['default_method']}")
    for name, score in scores.items():
        metric = "macro-F1" if labels == "single" else "top-1 in labels"
        typer.echo(f"  {name:9s} {metric} on an artist-disjoint 20% validation split: {score}")
    if cfg["dropped_classes"]:
        typer.echo(f"  left out (fewer than 3 covers): {', '.join(cfg['dropped_classes'])}")


@app.command()
def classify(
    image: Annotated[list[Path], typer.Argument(help="Cover image(s).")],
    index: IndexDir = Path("indexes/default"),
    method: Method = None,
    top: Annotated[int, typer.Option(min=1)] = 3,
    as_json: JsonFlag = False,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    device: Device = "auto",
) -> None:
    """Top genres (with the hierarchical path) for each IMAGE."""
    import numpy as np
    import pandas as pd

    from stylegen.engine import Engine, open_query_image

    engine = Engine.open(index, device=device)
    imgs = [open_query_image(p) for p in image]
    trained_columns = engine.head_config.get("tabular_columns") if tabular is not None else None
    table, _ = _table(pd.DataFrame({tabular_key: [str(p) for p in image]}), tabular,
                      tabular_columns or (",".join(trained_columns) if trained_columns else None), tabular_key)
    vectors = engine.embed_images(imgs)
    rows = [engine.find(p) for p in image]
    proba, classes = engine.predict_proba(vectors, method, rows=[-1 if r is None else r for r in rows],
                                          tabular=table)
    results = [{"image": str(p), "in_index": r is not None, **engine.describe(np.asarray(pr), classes, top)}
               for p, r, pr in zip(image, rows, proba, strict=True)]
    if as_json:
        typer.echo(json.dumps({"method": method or engine.head_config["default_method"], "results": results}, indent=2))
        return
    for r in results:
        shown = ", ".join(f"{g['genre']} {g['probability']:.2f}" + (f" ({' › '.join(g['path'])})" if len(g["path"]) > 1 else "")
                          for g in r["genres"])
        typer.echo(f"{r['image']}: {shown}")


@app.command()
def similar(
    image: Annotated[Path, typer.Argument(help="Query cover image.")],
    index: IndexDir = Path("indexes/default"),
    k: Annotated[int, typer.Option("-k", "--k", min=1)] = 12,
    by: Annotated[str, typer.Option(help="style | content | both")] = "both",
    as_json: JsonFlag = False,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained contact sheet here.")] = None,
    device: Device = "auto",
) -> None:
    """Nearest covers in the index to IMAGE (the query itself is marked when indexed)."""
    from stylegen.engine import Engine, open_query_image
    from stylegen.search import contact_sheet, format_neighbours

    if by not in ("style", "content", "both"):
        raise StylegenError(f"--by must be style, content or both, got {by!r}")
    engine = Engine.open(index, device=device)
    img = open_query_image(image)
    row = engine.find(image)
    if row is not None:
        hits = engine.similar_id(row, k, by)
    else:
        hits = engine.similar(img, k, by)
    if html is not None:
        page = contact_sheet(img, image.name, hits, [engine.cover_path(h["id"]) for h in hits], by)
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(page, encoding="utf-8")
    if as_json:
        typer.echo(json.dumps({"query": str(image), "in_index": row is not None, "by": by, "neighbours": hits}, indent=2))
    else:
        typer.echo(format_neighbours(hits))
        if html is not None:
            typer.echo(f"contact sheet: {html}")


def _split(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _names(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = _split(value)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise StylegenError(f"{option} takes a comma-separated subset of {', '.join(allowed)}; got {value!r}")
    return names


@app.command()
def evaluate(
    index: IndexDir = Path("indexes/default"),
    test: Annotated[Path | None, typer.Option(help="Test manifest (CSV) or folder, never the training data.")] = None,
    cv: Annotated[int | None, typer.Option(help="Cross-validate on the index with this many artist-disjoint folds.")] = None,
    heads: Annotated[str, typer.Option(help="With --cv: comma-separated heads to compare.")] = "linear,mlp,knn,ensemble",
    parts: Annotated[str, typer.Option(help="With --cv: comma-separated feature parts to compare.")] = "style,content,both",
    method: Method = None,
    report: Annotated[Path | None, typer.Option(help="Write report.md with plots into this folder.")] = None,
    as_json: JsonFlag = False,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    device: Device = "auto",
) -> None:
    """Score the genre models on a test manifest, or by cross-validation on the index."""
    from stylegen.evaluate import to_markdown, write_report

    if (test is None) == (cv is None):
        raise StylegenError("give exactly one of --test MANIFEST or --cv N")
    if cv is not None:
        from stylegen.scoring import PART_CHOICES, cross_validate
        from stylegen.store import Index
        from stylegen.train import HEAD_NAMES

        cv_heads = _names(heads, HEAD_NAMES, "--heads")
        cv_parts = _names(parts, PART_CHOICES, "--parts")
        table, _ = _table(Index.open(index, use_gpu=False).metadata, tabular, tabular_columns, tabular_key)
        frame, results = cross_validate(index, cv, heads=cv_heads, parts=cv_parts, tabular=table)
        variants = {}
        if table is not None:
            from stylegen.scoring import plot_variant_confusions, variant_tables

            variants = variant_tables(results)
        if report is not None:
            best = "mlp-hybrid" if table is not None else max(results, key=lambda k: results[k]["accuracy"])
            write_report(results[best], report, f"Cross-validation ({cv} stratified, artist-disjoint folds); "
                         f"{'headline' if table is not None else 'best'}: {best}",
                         extra_tables={**variants, "All heads and feature parts": frame})
            if table is not None:
                plot_variant_confusions(results, report)
        if as_json:
            keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy",
                    "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std")
            typer.echo(json.dumps({k: {m: v[m] for m in keys if m in v} for k, v in results.items()}, indent=2))
        else:
            typer.echo(to_markdown(frame))
            for name, t in list(variants.items())[:2]:
                typer.echo(f"{name}\n\n{to_markdown(t)}")
        return
    from stylegen.engine import Engine
    from stylegen.images import list_source
    from stylegen.scoring import evaluate_test

    engine = Engine.open(index, device=device)
    table, _ = _table(list_source(test), tabular, tabular_columns, tabular_key)
    metrics = evaluate_test(engine, test, method, tabular=table)
    if report is not None:
        write_report(metrics, report, f"Evaluation of {index} on {test}")
    if as_json:
        typer.echo(json.dumps(_jsonable(metrics), indent=2))
        return
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "macro_auroc", "macro_auprc")
    typer.echo("  ".join(f"{k}={metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                         for k in keys if k in metrics))
    if metrics["n_in_training_excluded"]:
        typer.echo(f"left out {metrics['n_in_training_excluded']} test covers the heads were trained on")
    for src, m in (metrics.get("by_source") or {}).items():
        typer.echo(f"  {src}: n={m['n']} accuracy={m['accuracy']:.3f} macro_f1={m['macro_f1']:.3f}")


def _jsonable(value):
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@app.command()
def serve(
    index: IndexDir = Path("indexes/default"),
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 20.0,
    device: Device = "auto",
) -> None:
    """Serve the web page and the JSON API (classify, similar, thumbnails)."""
    from stylegen.engine import Engine
    from stylegen.service import serve as run_serve

    engine = Engine.open(index, device=device)
    engine.featurizer  # load the model once, before the first request  # noqa: B018
    typer.echo(f"serving {index} ({len(engine.index)} covers) on http://{host}:{port}  (docs: /docs)")
    run_serve(engine, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024))


def main() -> None:
    """Entry point: run the app, turning known errors into one line and an exit code."""
    try:
        app(standalone_mode=False)
    except StylegenError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted (the index on disk is unchanged; re-run to resume)", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and anything unexpected
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click usage errors
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        if os.environ.get("STYLEGEN_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                   " (set STYLEGEN_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
