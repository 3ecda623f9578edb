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
    rich_markup_mode=None,  # plain click help: rendering it with rich imports ~0.35 s of modules
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
    runtime: Annotated[str, typer.Option(
        help="auto | torch | onnx | openvino (auto: torch on a GPU, the fastest installed on a CPU).")] = "auto",
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
                       precision=precision, runtime=runtime, progress=progress)
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
    from stylegen.engine import Engine

    engine = Engine.open(index, device=device)
    keys = [str(p) for p in image]
    table = engine.tabular_for(keys, tabular, _columns(tabular_columns), tabular_key) if tabular else None
    results, bad = engine.query_many(image, top=top, method=method, tabular=table)
    if as_json:
        typer.echo(json.dumps({"results": [r.to_dict() for r in results], "skipped": bad}, indent=2))
    for r in results if not as_json else []:
        shown = ", ".join(f"{g['genre']} {g['probability']:.2f}" + (f" ({' › '.join(g['path'])})" if len(g["path"]) > 1 else "")
                          for g in r.genres)
        typer.echo(f"{r.label}: {shown}" + ("  [in the index: its own vote left out]" if r.in_index else ""))
    _report_skipped(bad, len(results))


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
    from stylegen.engine import Engine
    from stylegen.search import format_neighbours, write_contact_sheet

    engine = Engine.open(index, device=device)
    result = engine.query(image, k=k, by=by, classify=False)
    if html is not None:
        write_contact_sheet(html, engine, image, result, by)
    if as_json:
        typer.echo(json.dumps({"query": str(image), "in_index": result.in_index, "by": by,
                               "neighbours": result.neighbours}, indent=2))
        return
    typer.echo(format_neighbours(result.neighbours))
    if html is not None:
        typer.echo(f"contact sheet: {html}")


def _columns(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _report_skipped(bad: list[dict[str, str]], done: int) -> None:
    """One stderr line per unreadable image; when none could be read, that line is the error."""
    if bad and not done:
        raise StylegenError("; ".join(f"{b['image']}: {b['reason']}" for b in bad))
    for b in bad:
        typer.echo(f"skipped {b['image']}: {b['reason']}", err=True)


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
    from stylegen import scoring

    if (test is None) == (cv is None):
        raise StylegenError("give exactly one of --test MANIFEST or --cv N")
    table = scoring.TableSpec(tabular, _columns(tabular_columns), tabular_key) if tabular or tabular_columns else None
    if cv is not None:
        from stylegen.train import HEAD_NAMES

        outcome = scoring.run_cv(index, cv, heads=_names(heads, HEAD_NAMES, "--heads"),
                                 parts=_names(parts, scoring.PART_CHOICES, "--parts"), table=table, report=report)
    else:
        outcome = scoring.run_test(index, test, method=method, table=table, report=report, device=device)
    typer.echo(json.dumps(outcome.as_json(), indent=2) if as_json else outcome.summary())


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
