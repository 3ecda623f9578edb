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
from stylegen.query.options import BY, DEFAULT_K, DEFAULT_TOP, METHODS, choices

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
QueryWeights = Annotated[str | None, typer.Option(
    "--weights", help="Backbone weights file or open_clip tag, for an index made with other than the packaged "
                      "weights (stylegen never loads weights because an index names them).")]


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
    image_size: Annotated[int | None, typer.Option(
        min=32, help="Input size in pixels, shorter side resized then centre-cropped (new index only).")] = None,
    parts: Annotated[str | None, typer.Option(help="style | content | both (new index only).")] = None,
    style_weight: Annotated[float | None, typer.Option(help="Weight of the style part (1.0; new index only).")] = None,
    content_weight: Annotated[float | None, typer.Option(help="Weight of the content part (1.0; new index only).")] = None,
    compression: Annotated[str | None, typer.Option(help="pca | rp | none (new index only).")] = None,
    dim: Annotated[int | None, typer.Option(min=1, help="Compressed size of each part (256; new index only).")] = None,
    whiten: Annotated[bool | None, typer.Option("--whiten/--no-whiten", help="Whiten the PCA output (new index only).")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Average each image with its mirror image (new index only).")] = None,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Forward batch (default: 16 on CPU, 64 on GPU).")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode worker processes (default: by device and cores).")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (auto: the index's, else by device)")] = "auto",
    engine: Annotated[str, typer.Option(help="local | ray (read/decode as Ray tasks, the model in Ray actors).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Covers per ingest shard (a killed run loses at most one).")] = 1024,
    runtime: Annotated[str, typer.Option(
        help="auto | torch | onnx | openvino (auto: torch on a GPU, the fastest installed on a CPU).")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Embed every new image of SOURCE into the index (resumable, incremental: covers are
    ingested to shards, then appended with the index's frozen compression)."""
    from stylegen.index.ingest import embed as run_embed
    from stylegen.index.ingest import requested_config

    config = requested_config(
        index, backbone=backbone, weights=weights, taps=_split(taps) if taps else None, image_size=image_size,
        parts=_parts(parts) if parts else None, style_weight=style_weight, content_weight=content_weight,
        compression=compression, dim=dim, whiten=whiten, flip=flip)
    report = run_embed(source, index, config, device=device, batch_size=batch_size, workers=workers,
                       precision=precision, progress=progress, engine=engine, address=address,
                       checkpoint_every=shard_size, runtime=runtime, weights=weights)
    typer.echo(report.summary())
    if report.bad:
        typer.echo(f"skipped files are listed in {index / 'bad_files.csv'}")


Tabular = Annotated[Path | None, typer.Option(help="CSV of numeric features per item, joined on --tabular-key.")]
TabularColumns = Annotated[str | None, typer.Option(
    help="Comma-separated numeric columns; FIRST:LAST is a run of columns (default with --tabular: all numeric).")]
TabularKey = Annotated[str, typer.Option(help="Column joining the table to the images.")]
Method = Annotated[str | None, typer.Option(
    help=f"{choices(METHODS)} (default: the method `stylegen train` validated best).")]


def _table(rows, tabular: Path | None, columns: str | None, key: str):
    """Numeric features for ``rows`` (a DataFrame with the key column), or None."""
    if tabular is None and columns is None:
        return None, None
    from stylegen.sources.tabular import load_tabular

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
    from stylegen.heads.train import HEAD_NAMES
    from stylegen.heads.train import train as run_train
    from stylegen.index.store import Index

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
    top: Annotated[int, typer.Option(min=1)] = DEFAULT_TOP,
    as_json: JsonFlag = False,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    device: Device = "auto",
    explain: Annotated[bool, typer.Option("--explain", help="Show the kNN voters and each tap layer's share.")] = False,
    weights: QueryWeights = None,
) -> None:
    """Top genres (with the hierarchical path) for each IMAGE."""
    from stylegen.query.engine import Engine

    engine = Engine.open(index, device=device, weights=weights)
    keys = [str(p) for p in image]
    table = engine.tabular_for(keys, tabular, _columns(tabular_columns), tabular_key) if tabular else None
    results, bad = engine.query_many(image, top=top, method=method, tabular=table, explain=explain)
    if as_json:
        typer.echo(json.dumps({"results": [r.to_dict() for r in results], "skipped": bad}, indent=2))
    for r in results if not as_json else []:
        shown = ", ".join(f"{g['genre']} {g['probability']:.2f}" + (f" ({' › '.join(g['path'])})" if len(g["path"]) > 1 else "")
                          for g in r.genres)
        typer.echo(f"{r.label}: {shown}" + ("  [in the index: its own vote left out]" if r.in_index else ""))
        if r.explanation is not None:
            from stylegen.query.explain import format_explanation

            typer.echo(format_explanation(r.explanation))
    _report_skipped(bad, len(results))


@app.command()
def similar(
    image: Annotated[Path, typer.Argument(help="Query cover image.")],
    index: IndexDir = Path("indexes/default"),
    k: Annotated[int, typer.Option("-k", "--k", min=1)] = DEFAULT_K,
    by: Annotated[str, typer.Option(help=choices(BY))] = "both",
    as_json: JsonFlag = False,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained contact sheet here.")] = None,
    device: Device = "auto",
    weights: QueryWeights = None,
) -> None:
    """Nearest covers in the index to IMAGE (the query itself is marked when indexed)."""
    from stylegen.apps.render import format_neighbours, write_contact_sheet
    from stylegen.query.engine import Engine

    engine = Engine.open(index, device=device, weights=weights)
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


def _split(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _names(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = _split(value)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise StylegenError(f"{option} takes a comma-separated subset of {', '.join(allowed)}; got {value!r}")
    return names


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
    weights: QueryWeights = None,
) -> None:
    """Score the genre models on a test manifest, or by cross-validation on the index."""
    from stylegen.evaluation import runs as scoring

    if (test is None) == (cv is None):
        raise StylegenError("give exactly one of --test MANIFEST or --cv N")
    table = scoring.TableSpec(tabular, _columns(tabular_columns), tabular_key) if tabular or tabular_columns else None
    if cv is not None:
        from stylegen.heads.train import HEAD_NAMES

        outcome = scoring.run_cv(index, cv, heads=_names(heads, HEAD_NAMES, "--heads"),
                                 parts=_names(parts, scoring.PART_CHOICES, "--parts"), table=table, report=report)
    else:
        outcome = scoring.run_test(index, test, method=method, table=table, report=report, device=device,
                                   weights=weights)
    typer.echo(json.dumps(outcome.as_json(), indent=2) if as_json else outcome.summary())


@app.command()
def serve(
    index: IndexDir = Path("indexes/default"),
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 20.0,
    device: Device = "auto",
    token: Annotated[str | None, typer.Option(
        envvar="STYLEGEN_TOKEN", show_envvar=True,
        help="Ask every request (but /healthz) for this token; required beyond loopback. "
             "Prefer the environment variable (a flag shows in `ps`).")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="Accept this Host name too (repeatable; '*': any). Loopback names always are.")] = None,
    rate_limit: Annotated[str, typer.Option(
        help="Per client: classify/similar requests and failed logins, N/min (or N/s, N/h); 0: off.")] = "120/min",
) -> None:
    """Serve the web page and the JSON API (classify, similar, thumbnails)."""
    from stylegen.apps.service import RateLimiter, hosts_for_bind
    from stylegen.apps.service import serve as run_serve
    from stylegen.query.engine import Engine

    hosts_for_bind(host, token, allow_host or ())  # refuse before the model loads
    RateLimiter.parse(rate_limit)
    engine = Engine.open(index, device=device)
    engine.featurizer  # load the model once, before the first request  # noqa: B018
    login = "  (token required: open /?token=TOKEN once, or send 'Authorization: Bearer TOKEN')" if token else ""
    typer.echo(f"serving {index} ({len(engine.index)} covers) on http://{host}:{port}  (API schema: /openapi.json)"
               + login)
    run_serve(engine, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
              token=token, allow_hosts=allow_host or (), rate_limit=rate_limit)


library_app = typer.Typer(no_args_is_help=True, help="Genres for a music library: scan album art, tag, undo.")
app.add_typer(library_app, name="library")
MusicDir = Annotated[Path, typer.Argument(help="Folder of audio files (searched recursively).")]
ShowProgress = Annotated[bool, typer.Option(help="Show a progress bar.")]


@library_app.command("scan")
def library_scan(
    directory: MusicDir,
    index: IndexDir = Path("indexes/default"),
    method: Method = None,
    top: Annotated[int, typer.Option(min=1)] = DEFAULT_TOP,
    as_json: JsonFlag = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write one row per album here.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a self-contained page here.")] = None,
    device: Device = "auto",
    progress: ShowProgress = True,
) -> None:
    """Each album's cover art (embedded, else cover.* in its folder), current genre and suggested genres."""
    from stylegen.apps.musiclib import genres as library
    from stylegen.query.engine import Engine

    report = library.scan(directory, Engine.open(index, device=device), top=top, method=method, progress=progress)
    if csv_out is not None:
        library.write_csv(report, csv_out)
    if html_out is not None:
        library.write_html(report, html_out)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else library.format_scan(report))
    if not as_json:
        typer.echo(report.summary())


@library_app.command("tag")
def library_tag(
    directory: MusicDir,
    index: IndexDir = Path("indexes/default"),
    write: Annotated[bool, typer.Option("--write", help="Write the tags (default: only show what would change).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace genres that are already set.")] = False,
    min_confidence: Annotated[float, typer.Option(min=0.0, max=1.0, help="Leave albums whose top genre is less likely.")] = 0.0,
    level: Annotated[str, typer.Option(help="class (the heads' genres) | top (top-level genres of the taxonomy)")] = "class",
    count: Annotated[int, typer.Option(min=1, help="Write up to this many genres (each above --min-confidence).")] = 1,
    log: Annotated[Path | None, typer.Option(help="Undo log (default: DIRECTORY/stylegen-undo-TIME.csv).")] = None,
    touch: Annotated[bool, typer.Option("--touch", help="Give tagged files the current modification time "
                                        "(default: keep it; owner, group and mode are always kept).")] = False,
    method: Method = None,
    device: Device = "auto",
    progress: ShowProgress = True,
) -> None:
    """Set genre tags from cover art: a dry run unless --write (verified writes, undo log)."""
    from stylegen.apps.musiclib import genres as library
    from stylegen.util.progress import embed_progress

    report = library.scan(directory, _engine(index, device), method=method, progress=progress)
    plans = library.plan_tags(report, level=level, count=count, min_confidence=min_confidence, overwrite=overwrite)
    typer.echo(library.format_plan(plans, report.bad_files))
    if not write:
        typer.echo(f"dry run: {sum(p.action == 'write' for p in plans)} files would be tagged (add --write)")
        return
    log = log or library.default_log(directory)
    with embed_progress(sum(p.action == "write" for p in plans), progress, "writing tags", "files") as advance:
        done = library.apply(plans, log, advance, keep_times=not touch)
    for f in done.failed + report.bad_files:
        typer.echo(f"not tagged: {f['path']}: {f['reason']}", err=True)
    typer.echo(f"{done.summary()}; undo with: stylegen library undo {log}")


@library_app.command("undo")
def library_undo(log: Annotated[Path, typer.Argument(help="Undo log written by `library tag --write`.")]) -> None:
    """Restore the genre tags recorded in LOG (files edited since are left alone)."""
    from stylegen.apps.musiclib.tagging import undo

    report = undo(log)
    for f in report.failed:
        typer.echo(f"not restored: {f['path']}: {f['reason']}", err=True)
    typer.echo(report.summary())


def _engine(index: Path, device: str):
    from stylegen.query.engine import Engine

    return Engine.open(index, device=device)


@app.command("index")
def build_index(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    refit: Annotated[bool, typer.Option(
        help="Refit the compression on all ingested covers (new vectors: heads must be trained again).")] = False,
    max_sample: Annotated[int, typer.Option(min=2, help="Most covers the compression is fitted on (seeded sample).")] = 100_000,
) -> None:
    """Build the index from its ingested shards: append the covers it lacks with the frozen
    compression (old vectors and trained heads stay valid), or --refit."""
    from stylegen.index.ingest import build

    result = build(index, refit=refit, max_sample=max_sample)
    verb = "fitted the compression on" if result.refit else "appended"
    typer.echo(f"{verb} {result.added} covers from {result.shards} shards; index holds {result.count} covers"
               f" [{result.seconds:.1f} s]")
    if result.refit and (index / "heads").is_dir():
        typer.echo(f"the vectors changed: train the heads again (stylegen train --index {index})"
                   if result.vectors_changed else
                   "the compression came out the same (same feature_id): trained heads stay valid")


@app.command()
def duplicates(
    index: IndexDir = Path("indexes/default"),
    threshold: Annotated[float | None, typer.Option(help="Cosine similarity at or above which two covers are near-duplicates (0.70, chosen on planted copies).")] = None,
    by: Annotated[str, typer.Option(help=choices(BY))] = "both",
    against: Annotated[Path | None, typer.Option(help="Another index: report only pairs across the two collections.")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write one row per cover of each group here.")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained page of the groups here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Groups of near-duplicate covers (rescans, re-encodes, stickers, borders)."""
    from stylegen.apps.duplicates import (
        DEFAULT_THRESHOLD,
        find_duplicates,
        group_table,
        groups_html,
    )
    from stylegen.index.store import Index
    from stylegen.util.tables import safe_frame

    idx, other = Index.open(index), Index.open(against) if against is not None else None
    dups = find_duplicates(idx, DEFAULT_THRESHOLD if threshold is None else threshold, by, other)
    table = group_table(dups, idx, other)
    for path, text in ((csv, lambda: safe_frame(table).to_csv(index=False)), (html, lambda: groups_html(table, dups))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text(), encoding="utf-8")
    if as_json:
        groups = [json.loads(g.drop(columns="group").to_json(orient="records")) for _, g in table.groupby("group")]
        typer.echo(json.dumps({"summary": dups.summary(), "groups": groups}, indent=2))
        return
    typer.echo(dups.summary())
    for g, members in list(table.groupby("group"))[:20]:
        typer.echo(f"{g:4d}. " + "  ".join(f"#{m.id} {Path(str(m.image)).name}" for m in members.itertuples()))


@app.command("map")
def map_(
    index: IndexDir = Path("indexes/default"),
    out: Annotated[Path, typer.Option(help="The self-contained HTML page to write.")] = Path("map.html"),
    by: Annotated[str, typer.Option(help=choices(BY))] = "both",
    png: Annotated[Path | None, typer.Option(help="Also write a PNG scatter plot here.")] = None,
    color: Annotated[str, typer.Option(help="genre | predicted (needs trained heads)")] = "genre",
    server: Annotated[str, typer.Option(help="Where `stylegen serve` runs: clicking a cover opens its similar covers there.")] = "http://127.0.0.1:8000",
    method: Annotated[str, typer.Option(help="auto (UMAP when installed, else t-SNE) | umap | tsne")] = "auto",
) -> None:
    """A 2-D map of the collection (HTML page with thumbnails, optional PNG)."""
    from stylegen.apps.maps import build_map, map_html, map_png, predicted_labels
    from stylegen.query.engine import Engine

    engine = Engine.open(index, device="cpu")
    predicted = predicted_labels(engine)
    payload = build_map(engine.index, by, predicted, color, link=server.rstrip("/") + "/?id=", method=method)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(map_html(payload), encoding="utf-8")
    if png is not None:
        map_png(payload, png)
    typer.echo(f"{payload['count']:,} covers laid out by {by} with {payload['method']} in "
               f"{payload['layout_seconds']:.1f} s; wrote {out} ({out.stat().st_size / 1e6:.1f} MB)"
               + (f" and {png}" if png else ""))


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
