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

from stylegen.errors import ModelNotFoundError, StylegenError
from stylegen.query.options import BY, DEFAULT_K, DEFAULT_TOP, METHODS, choices

DEFAULT_COVERS = Path("indexes/default")  # where `embed` puts covers without --index

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rendering it with rich imports ~0.35 s of modules
    help="Judge an album by its cover: genres and similar covers from style features.",
)

IndexDir = Annotated[Path, typer.Option("--index", "-i", help="Index directory.")]
GenreIndex = Annotated[Path | None, typer.Option(
    "--index", "-i", help="Index directory (default: genres from --model, else the shipped default model).")]
CoversIndex = Annotated[Path | None, typer.Option(
    "--index", "-i", help="Index of your covers (default: indexes/default, where `stylegen embed` puts them).")]
ModelName = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model bundle, by name (`stylegen model list`) or path; default: the shipped one.")]
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
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Make the new index in a model's vector space (its settings and compressor): "
                              "the model's genres answer on it without `train`.")] = None,
    vectors_dtype: Annotated[str | None, typer.Option(
        help="float32 | float16: how a new index keeps its searchable vectors on disk (float32; float16 "
             "halves vectors.npy, docs/scale.md).")] = None,
    raw_retention: Annotated[str | None, typer.Option(
        help="all | sample | none: which covers of a new index keep raw features in its shards after the "
             "build (default: sample of 100,000, i.e. all below that; refits and explain use them).")] = None,
    raw_sample: Annotated[int | None, typer.Option(
        min=1, help="Covers in the raw-feature sample (--raw-retention sample; new index only).")] = None,
) -> None:
    """Embed every new image of SOURCE into the index (resumable, incremental: covers are
    ingested to shards, then appended with the index's frozen compression)."""
    from stylegen.index.ingest import embed as run_embed
    from stylegen.index.ingest import requested_config, requested_retention

    options = {"backbone": backbone, "taps": _split(taps) if taps else None, "image_size": image_size,
               "parts": _parts(parts) if parts else None, "style_weight": style_weight,
               "content_weight": content_weight, "compression": compression, "dim": dim, "whiten": whiten,
               "flip": flip}
    given = any(v is not None for v in options.values())
    config = requested_config(index, weights=weights, **options) if given or model is None else None
    report = run_embed(source, index, config, device=device, batch_size=batch_size, workers=workers,
                       precision=precision, progress=progress, engine=engine, address=address,
                       checkpoint_every=shard_size, runtime=runtime, weights=weights, model=model,
                       vectors_dtype=vectors_dtype, raw_retention=requested_retention(raw_retention, raw_sample))
    typer.echo(report.summary())
    if report.bad:
        typer.echo(f"skipped files are listed in {index / 'bad_files.csv'}")


Tabular = Annotated[Path | None, typer.Option(help="CSV of numeric features per item, joined on --tabular-key.")]
TabularColumns = Annotated[str | None, typer.Option(
    help="Comma-separated numeric columns; FIRST:LAST is a run of columns (default with --tabular: all numeric).")]
TabularKey = Annotated[str, typer.Option(help="Column joining the table to the images.")]
Method = Annotated[str | None, typer.Option(
    help=f"{choices(METHODS)} (default: the method `stylegen train` validated best).")]


GroupColumn = Annotated[str | None, typer.Option(help=(
    "Metadata column whose covers stay on one side of every split (default: artist, else artist_group)."))]


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
    head: Annotated[list[str] | None, typer.Option(help=(
        "linear | mlp | knn | ensemble | hierarchy | all (repeatable; hierarchy needs --labels multi). Default: "
        "linear, mlp, knn, ensemble; with --labels multi: hierarchy, knn."))] = None,
    labels: Annotated[str, typer.Option(help="single (genre) | multi (|-separated label sets).")] = "single",
    label_column: Annotated[list[str] | None, typer.Option("--label-column", help=(
        "With --labels multi: the |-separated column(s) holding labels (repeatable; default genres, else genre)."))] = None,
    taxonomy: Annotated[str | None, typer.Option(help=(
        "'discogs' (packaged: 15 genres, 400 styles written Genre---Style), 'default', or a YAML/JSON file of "
        "parent -> children."))] = None,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    seed: int = 0,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Calibrate each head's probabilities (a temperature fitted on "
                                            "artist-disjoint out-of-fold predictions).")] = True,
    calibration_folds: Annotated[int, typer.Option(min=1, help=(
        "1: calibrate on the artist-disjoint validation split (no extra fit); K: on K-fold out-of-fold "
        "predictions (K extra fits per head)."))] = 1,
    group_column: GroupColumn = None,
) -> None:
    """Fit genre heads on the index's vectors and store them in the index."""
    from stylegen.heads.train import HEAD_NAMES, MULTI_HEAD_NAMES
    from stylegen.heads.train import train as run_train
    from stylegen.index.store import Index

    if not head:  # multi-label: the flat heads fit one model per label (minutes), the hierarchy scores best
        head = ["hierarchy", "knn"] if labels == "multi" else ["all"]
    heads = list(MULTI_HEAD_NAMES if labels == "multi" else HEAD_NAMES) if "all" in head else head
    table, cols = _table(Index.open(index, use_gpu=False).metadata, tabular, tabular_columns, tabular_key)
    cfg = run_train(index, heads, labels, taxonomy, table, cols, seed, calibrate=calibrate,
                    calibration_folds=calibration_folds, label_columns=label_column, group_column=group_column)
    scores = cfg.get("validation_macro_f1") or cfg.get("validation_top1_in_labels") or {}
    typer.echo(f"trained {', '.join(cfg['heads'])} on {len(cfg['train_rows'])} covers, "
               f"{len(cfg['classes'])} genres; default head {cfg['default_head']}, method {cfg['default_method']}")
    for name, score in scores.items():
        metric = "macro-F1" if labels == "single" else "top-1 in labels"
        typer.echo(f"  {name:9s} {metric} on an artist-disjoint 20% validation split: {score}")
    for name, cal in (cfg.get("calibration") or {}).items():
        typer.echo(f"  {name:9s} calibration skipped: {cal['skipped']}" if "skipped" in cal else
                   f"  {name:9s} calibration: temperature {cal['temperature']:.3g}, expected calibration error "
                   f"{cal['ece_before']:.3f} -> {cal['ece_after']:.3f} ("
                   + ("the artist-disjoint validation split" if cal["folds"] == 1 else
                      f"{cal['folds']} artist-disjoint folds") + ")")
    if cfg.get("precision_coverage"):
        found = cfg["min_confidence"]
        typer.echo(f"  library tag threshold for {cfg['default_method']}: " + (
            f"{found:.2f} (cross-validated precision >= 0.80)" if found is not None
            else "none reaches cross-validated precision 0.80 (0.5..0.9)"))
    for name, cal in (cfg.get("calibration") or {}).items():
        if cal.get("thresholds"):
            typer.echo(f"  {name:9s} F1 thresholds (held out): "
                       + ", ".join(f"{level} {t:.2f}" for level, t in cal["thresholds"].items()))
    if cfg["dropped_classes"] and labels == "multi":
        floor = cfg["flat_min_covers"]
        typer.echo(f"  left out of the flat heads (fewer than {floor} covers): {len(cfg['dropped_classes'])} labels"
                   + ("; the hierarchy head keeps them under their genre" if "hierarchy" in cfg["heads"] else ""))
    elif cfg["dropped_classes"]:
        typer.echo(f"  left out (fewer than 3 covers): {', '.join(cfg['dropped_classes'])}")


@app.command()
def classify(
    image: Annotated[list[Path], typer.Argument(help="Cover image(s).")],
    index: GenreIndex = None,
    method: Method = None,
    top: Annotated[int, typer.Option(min=1)] = DEFAULT_TOP,
    as_json: JsonFlag = False,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    device: Device = "auto",
    explain: Annotated[bool, typer.Option("--explain", help="Show the kNN voters and each tap layer's share.")] = False,
    weights: QueryWeights = None,
    model: ModelName = None,
) -> None:
    """Top genres (with the hierarchical path) for each IMAGE."""
    engine = _engine(index, device, weights, model)
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
    index: CoversIndex = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1)] = DEFAULT_K,
    by: Annotated[str, typer.Option(help=choices(BY))] = "both",
    as_json: JsonFlag = False,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained contact sheet here.")] = None,
    device: Device = "auto",
    weights: QueryWeights = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check the nearest covers with local features: verified copies of IMAGE come first, with the transform.")] = False,
) -> None:
    """Nearest covers in the index to IMAGE (the query itself is marked when indexed)."""
    from stylegen.apps.render import format_neighbours, write_contact_sheet

    engine = _engine(_covers_index(index, "similar"), device, weights)
    result = engine.query(image, k=k, by=by, classify=False, verify=verify)
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
    index: GenreIndex = None,
    test: Annotated[Path | None, typer.Option(help="Test manifest (CSV) or folder, never the training data.")] = None,
    cv: Annotated[int | None, typer.Option(help="Cross-validate on the index with this many artist-disjoint folds.")] = None,
    heads: Annotated[str | None, typer.Option(help=(
        "With --cv: comma-separated heads to compare (default: linear,mlp,knn,ensemble; multi-label: knn,hierarchy)."))] = None,
    parts: Annotated[str, typer.Option(help="With --cv: comma-separated feature parts to compare.")] = "style,content,both",
    method: Method = None,
    report: Annotated[Path | None, typer.Option(help="Write report.md with plots into this folder.")] = None,
    as_json: JsonFlag = False,
    tabular: Tabular = None,
    tabular_columns: TabularColumns = None,
    tabular_key: TabularKey = "image",
    device: Device = "auto",
    weights: QueryWeights = None,
    model: ModelName = None,
    labels: Annotated[str | None, typer.Option(help=(
        "With --cv: single | multi (default: as the index's heads were trained, else single)."))] = None,
    label_column: Annotated[list[str] | None, typer.Option("--label-column", help=(
        "With --cv --labels multi: label column(s) (default: as trained, else genres)."))] = None,
    taxonomy: Annotated[str | None, typer.Option(help=(
        "With --cv --labels multi: 'discogs', 'default' or a file; labels are closed upward and scored per level "
        "(default: as trained)."))] = None,
    group_column: GroupColumn = None,
    min_support: Annotated[int, typer.Option(min=1, help=(
        "With --cv --labels multi: score classes with at least this many covers."))] = 10,
) -> None:
    """Score the genre models on a test manifest, or by cross-validation on the index."""
    from stylegen.evaluation import runs as scoring

    if (test is None) == (cv is None):
        raise StylegenError("give exactly one of --test MANIFEST or --cv N")
    table = scoring.TableSpec(tabular, _columns(tabular_columns), tabular_key) if tabular or tabular_columns else None
    if cv is not None:
        from stylegen.heads.train import MULTI_HEAD_NAMES

        if index is None:
            raise StylegenError("--cv cross-validates an index's covers: pass --index DIR")
        outcome = scoring.run_cv(index, cv, heads=_names(heads, MULTI_HEAD_NAMES, "--heads") if heads else None,
                                 parts=_names(parts, scoring.PART_CHOICES, "--parts"), table=table, report=report,
                                 labels=labels, label_columns=label_column, taxonomy=taxonomy,
                                 group_column=group_column, min_support=min_support)
    else:
        outcome = scoring.run_test(index, test, method=method, table=table, report=report, device=device,
                                   weights=weights, model=model)
    typer.echo(json.dumps(outcome.as_json(), indent=2) if as_json else outcome.summary())


@app.command()
def serve(
    index: GenreIndex = None,
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 20.0,
    model: ModelName = None,
    weights: QueryWeights = None,
    device: Device = "auto",
    token: Annotated[str | None, typer.Option(
        envvar="STYLEGEN_TOKEN", show_envvar=True,
        help="Ask every request (but /healthz) for this token; required beyond loopback. "
             "Prefer the environment variable (a flag shows in `ps`).")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="Accept this Host name too (repeatable; '*': any). Loopback names always are.")] = None,
    rate_limit: Annotated[str, typer.Option(
        help="Per client: classify/similar requests and failed logins, N/min (or N/s, N/h); 0: off.")] = "120/min",
    batch_size: Annotated[int, typer.Option(
        min=1, help="Answer up to this many requests with one forward pass (1: one at a time).")] = 16,
    batch_window_ms: Annotated[float, typer.Option(
        min=0, help="How long a request waits for others to join its batch when the server is idle.")] = 5.0,
    max_queue: Annotated[int, typer.Option(
        min=1, help="Requests waiting at once; beyond that 503 with Retry-After.")] = 32,
    forward_batch: Annotated[int, typer.Option(
        min=1, help="Images per forward pass within a batch (the fastest size depends on the CPU).")] = 16,
) -> None:
    """Serve the web page and the JSON API (classify, similar, thumbnails)."""
    from stylegen.apps.service import RateLimiter, hosts_for_bind
    from stylegen.apps.service import serve as run_serve

    hosts_for_bind(host, token, allow_host or ())  # refuse before the model loads
    RateLimiter.parse(rate_limit)
    engine = _engine(index, device, weights, model)
    engine.featurizer  # load the model once, before the first request  # noqa: B018
    login = "  (token required: open /?token=TOKEN once, or send 'Authorization: Bearer TOKEN')" if token else ""
    what = (f"{index} ({len(engine.index)} covers)" if engine.has_covers else
            f"the genres of model {engine.index.root.name} (similar covers need --index)")
    typer.echo(f"serving {what} on http://{host}:{port}  (API schema: /openapi.json)" + login)
    run_serve(engine, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
              token=token, allow_hosts=allow_host or (), rate_limit=rate_limit,
              batch_size=batch_size, batch_window_ms=batch_window_ms, max_queue=max_queue,
              forward_batch=forward_batch)


library_app = typer.Typer(no_args_is_help=True, help="Genres for a music library: scan album art, tag, undo.")
app.add_typer(library_app, name="library")
MusicDir = Annotated[Path, typer.Argument(help="Folder of audio files (searched recursively).")]
ShowProgress = Annotated[bool, typer.Option(help="Show a progress bar.")]


@library_app.command("scan")
def library_scan(
    directory: MusicDir,
    index: GenreIndex = None,
    method: Method = None,
    top: Annotated[int, typer.Option(min=1)] = DEFAULT_TOP,
    as_json: JsonFlag = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write one row per album here.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a self-contained page here.")] = None,
    model: ModelName = None,
    device: Device = "auto",
    progress: ShowProgress = True,
) -> None:
    """Each album's cover art (embedded, else cover.* in its folder), current genre and suggested genres."""
    from stylegen.apps.musiclib import genres as library

    report = library.scan(directory, _engine(index, device, model=model), top=top, method=method, progress=progress)
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
    index: GenreIndex = None,
    write: Annotated[bool, typer.Option("--write", help="Write the tags (default: only show what would change).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace genres that are already set.")] = False,
    min_confidence: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Leave albums whose top genre is less likely (default: the threshold `stylegen "
                               "train` recorded for the method, cross-validated precision >= 0.80; else 0).")] = None,
    level: Annotated[str, typer.Option(help="class (the heads' genres) | top (top-level genres of the taxonomy) | "
                                            "genre | style | both (Discogs genres and styles, as beets' discogs "
                                            "plugin writes them)")] = "class",
    count: Annotated[int, typer.Option(min=1, help="Write up to this many genres (each above --min-confidence).")] = 1,
    log: Annotated[Path | None, typer.Option(help="Undo log (default: DIRECTORY/stylegen-undo-TIME.csv).")] = None,
    touch: Annotated[bool, typer.Option("--touch", help="Give tagged files the current modification time "
                                        "(default: keep it; owner, group and mode are always kept).")] = False,
    method: Method = None,
    model: ModelName = None,
    device: Device = "auto",
    progress: ShowProgress = True,
) -> None:
    """Set genre tags from cover art: a dry run unless --write (verified writes, undo log)."""
    from stylegen.apps.musiclib import genres as library
    from stylegen.util.progress import embed_progress

    engine = _engine(index, device, model=model)
    report = library.scan(directory, engine, method=method, progress=progress)
    source = "--min-confidence"
    if min_confidence is None:  # what `train` recorded for the head of the method used (None: nothing judged)
        recorded = engine.min_confidence(report.method) if report.method is not None else None
        min_confidence = 0.0 if recorded is None else float(recorded)
        source = ("none recorded by `stylegen train`" if recorded is None else
                  f"recorded by `stylegen train` for {report.method}: cross-validated precision >= 0.80")
    typer.echo(f"min confidence {min_confidence:.2f} ({source})")
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


def _engine(index: Path | None, device: str, weights: str | None = None, model: str | None = None):
    """The one way a command opens what answers it: ``--index`` (with its own heads, or
    ``--model``'s), else ``--model``, else the shipped default model."""
    from stylegen.query.engine import Engine

    return Engine.open(index, device=device, weights=weights, model=model)


def _covers_index(index: Path | None, command: str) -> Path:
    """An index of the user's covers for ``command``: ``--index``, else ``indexes/default``."""
    if index is not None:
        return index
    if (DEFAULT_COVERS / "CURRENT").is_file():
        return DEFAULT_COVERS
    raise StylegenError(f"{command} needs an index of your own covers: run `stylegen embed FOLDER --index "
                        "indexes/mine`, then pass --index indexes/mine")


model_app = typer.Typer(no_args_is_help=True, help="Model bundles: export an index's heads, list models, show a model card.")
app.add_typer(model_app, name="model")


@model_app.command("export")
def model_export(
    index: Annotated[Path, typer.Argument(help="Index with trained heads.")],
    out: Annotated[Path, typer.Argument(help="New folder to write the model to.")],
    name: Annotated[str | None, typer.Option(help="The model's name (default: OUT's folder name).")] = None,
    card: Annotated[Path | None, typer.Option(help="JSON of model card fields to add (training data, metrics...).")] = None,
    heads: Annotated[str | None, typer.Option(help="Comma-separated heads to keep (default: all trained).")] = None,
    featurizer: Annotated[bool, typer.Option(
        "--featurizer/--no-featurizer", help="Ship the exported featurizer graph (+14 MB; no export on first use).")] = False,
) -> None:
    """Write the index's heads, compressor and settings as a model bundle (plain arrays, no pickle)."""
    from stylegen.heads.export import export_model

    extra = None
    if card is not None:
        try:
            extra = json.loads(card.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StylegenError(f"cannot read model card fields {card}: {exc}") from None
    graph = _featurizer_graph(index) if featurizer else None
    path = export_model(index, out, name=name, card=extra, graph=graph, heads=_split(heads) if heads else None)
    from stylegen.index.bundle import bundle_size

    typer.echo(f"model written to {path} ({bundle_size(path) / 1e6:.1f} MB)")


def _featurizer_graph(index: Path) -> Path:
    """The exported featurizer graph of the index's settings (exported now when not cached)."""
    from stylegen.featurize.runtime import graph_for
    from stylegen.index.store import Index

    return graph_for(Index.open(index).query_config())


@model_app.command("list")
def model_list(as_json: JsonFlag = False) -> None:
    """The installed models (shipped with stylegen, and yours in the user models folder)."""
    from stylegen.index.bundle import list_models

    models = list_models()
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    for m in models:
        typer.echo(f"{m['name']:24s} {m['size_bytes'] / 1e6:6.1f} MB  {m['path']}" + ("  (default)" if m["default"] else ""))
    if not models:
        typer.echo("no models installed")


@model_app.command("info")
def model_info(
    model: Annotated[str, typer.Argument(help="A model's name or path.")],
    as_json: JsonFlag = False,
) -> None:
    """A model's card: classes, training data, metrics, calibration, size."""
    from stylegen.heads.export import describe_model
    from stylegen.index.bundle import open_model

    info = describe_model(open_model(model))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key in ("name", "version", "task", "path", "size_bytes", "classes", "heads", "default_method",
                "training_covers", "training_data", "metrics", "calibration", "precision_coverage", "rebuild"):
        if key in info:
            value = info[key]
            typer.echo(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")


@app.command("index")
def build_index(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    refit: Annotated[bool, typer.Option(
        help="Refit the compression on all ingested covers (new vectors: heads must be trained again).")] = False,
    max_sample: Annotated[int, typer.Option(min=2, help="Most covers the compression is fitted on (seeded sample).")] = 100_000,
    device: Device = "auto",
    weights: QueryWeights = None,
) -> None:
    """Build the index from its ingested shards: append the covers it lacks with the frozen
    compression (old vectors and trained heads stay valid), or --refit (re-reading the images
    of covers whose raw features the index did not keep)."""
    from stylegen.index.ingest import build

    result = build(index, refit=refit, max_sample=max_sample, notify=typer.echo, device=device, weights=weights,
                   progress=True)
    done = (f"fitted the compression again and transformed all {result.count} covers ({result.added} new)"
            if result.refit else f"appended {result.added} covers from {result.shards} shards")
    typer.echo(f"{done}; index holds {result.count} covers [{result.seconds:.1f} s]")
    if result.refit and (index / "heads").is_dir():
        typer.echo(f"the vectors changed: train the heads again (stylegen train --index {index})"
                   if result.vectors_changed else
                   "the compression came out the same (same feature_id): trained heads stay valid")


@app.command()
def duplicates(
    index: CoversIndex = None,
    threshold: Annotated[float | None, typer.Option(help="With --no-verify: cosine similarity at or above which two covers are near-duplicates (0.70).")] = None,
    by: Annotated[str, typer.Option(help=choices(BY) + " (with --no-verify)")] = "both",
    against: Annotated[Path | None, typer.Option(help="Another index: report only pairs across the two collections.")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write one row per cover of each group here.")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained page of the groups here.")] = None,
    as_json: JsonFlag = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify FAISS candidates with local features (default), or keep pairs by vector similarity alone.")] = True,
    min_inliers: Annotated[int | None, typer.Option(help="With --verify: keypoints that must agree with one homography (default chosen on planted copies).")] = None,
    candidates: Annotated[int | None, typer.Option(min=1, help="With --verify: nearest covers per cover (by style + content and by content) to verify.")] = None,
    photos: Annotated[bool, typer.Option("--photos/--no-photos", help="With --verify: also propose the covers nearest each cover's centre square (default; one more forward pass per cover), which finds photos of a cover on a table.")] = True,
) -> None:
    """Groups of near-duplicate covers (rescans, re-encodes, stickers, borders, photos)."""
    from stylegen.apps.duplicates import (
        DEFAULT_CANDIDATES,
        DEFAULT_THRESHOLD,
        find_duplicates,
        group_table,
        groups_html,
        verified_duplicates,
    )
    from stylegen.index.store import Index
    from stylegen.util.tables import safe_frame

    if verify and (threshold is not None or by != "both"):
        raise StylegenError("--threshold and --by choose the vector-only search: add --no-verify")
    if not verify and (min_inliers is not None or candidates is not None):
        raise StylegenError("--min-inliers and --candidates belong to verification: drop --no-verify")
    idx, other = Index.open(_covers_index(index, "duplicates")), Index.open(against) if against is not None else None
    if verify:
        centre = None
        if photos:
            from stylegen.query.engine import Engine
            from stylegen.query.verify import centre_vectors

            queried = other if other is not None else idx
            try:
                engine = Engine(idx)
                engine.featurizer  # noqa: B018  (its weights, before any work)
            except ModelNotFoundError as exc:
                raise ModelNotFoundError(f"{exc} (or skip the centre squares: --no-photos)") from None
            centre = centre_vectors(engine, list(queried.metadata["path"]))
        dups = verified_duplicates(idx, other, candidates or DEFAULT_CANDIDATES, min_inliers, centre=centre)
    else:
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
    index: CoversIndex = None,
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

    engine = Engine.open(_covers_index(index, "map"), device="cpu")
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
