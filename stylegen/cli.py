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
    parts: Annotated[str | None, typer.Option(help="style | content | both (new index only).")] = None,
    style_weight: Annotated[float, typer.Option(help="Weight of the style part.")] = 1.0,
    content_weight: Annotated[float, typer.Option(help="Weight of the content part.")] = 1.0,
    compression: Annotated[str | None, typer.Option(help="pca | rp | none (new index only).")] = None,
    dim: Annotated[int, typer.Option(help="Compressed size of each part.")] = 256,
    whiten: Annotated[bool, typer.Option(help="Whiten the PCA output.")] = False,
    flip: Annotated[bool, typer.Option(help="Average each image with its mirror image.")] = False,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decode worker processes.")] = 2,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Embed every new image of SOURCE into the index (resumable, incremental)."""
    from stylegen.config import BackboneConfig, CompressionConfig, EmbedConfig, FeatureConfig
    from stylegen.embed import embed as run_embed

    asked = any(v is not None for v in (backbone, weights, parts, compression)) or flip or whiten
    config = None
    if asked or not (index / "CURRENT").is_file():
        p = _parts(parts or "both")
        config = EmbedConfig(
            backbone=BackboneConfig(name=backbone or "efficientnet-lite0", weights=weights),
            features=FeatureConfig(parts=p, weights={"style": style_weight, "content": content_weight}, flip=flip),
            compression=CompressionConfig(method=compression or "pca", dims={q: dim for q in ("style", "content")},
                                          whiten=whiten),
        )
    report = run_embed(source, index, config, device=device, batch_size=batch_size, workers=workers,
                       precision=precision, progress=progress)
    typer.echo(report.summary())
    if report.bad:
        typer.echo(f"skipped files are listed in {index / 'bad_files.csv'}")


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
