"""The CLI as a user meets it: a real subprocess, one-line errors, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import add_bad_files


def stylegen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, check=False)


@pytest.mark.parametrize("make_source, message", [
    (lambda d: d / "missing", "source not found"),
    (lambda d: (d / "m.csv").write_text("path,genre\na.jpg,rock\n") and d / "m.csv", "has no 'image' column"),
    (lambda d: (d / "x.txt").write_text("hello") and d / "x.txt", "must be a folder of images or a .csv"),
])
def test_bad_source_is_one_line_error_with_nonzero_exit(tmp_path, make_source, message):
    result = stylegen("embed", str(make_source(tmp_path)), "--index", str(tmp_path / "idx"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "idx" / "CURRENT").exists()


def test_unknown_option_is_one_line_error():
    result = stylegen("embed", "--no-such-flag")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_embed_skips_bad_files_and_exits_zero(genre_folder, tmp_path):
    add_bad_files(genre_folder)
    result = stylegen("embed", str(genre_folder), "--index", str(tmp_path / "idx"), "--workers", "0",
                      "--dim", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "6 added" in result.stdout and "4 skipped" in result.stdout
    assert (tmp_path / "idx" / "bad_files.csv").is_file()
    refused = stylegen("embed", str(genre_folder), "--index", str(tmp_path / "idx"),
                       "--backbone", "efficientnet-lite1", "--no-progress")
    assert refused.returncode != 0 and "other settings" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_embed_taps_option_is_recorded_and_unknown_tap_refused(genre_folder, tmp_path):
    from stylegen.index.store import Index

    result = stylegen("embed", str(genre_folder), "--index", str(tmp_path / "idx"), "--workers", "0",
                      "--dim", "4", "--no-progress", "--taps", "stage2, stage3")
    assert result.returncode == 0, result.stderr
    assert Index.open(tmp_path / "idx", use_gpu=False).config.backbone.taps == ("stage2", "stage3")
    bad = stylegen("embed", str(genre_folder), "--index", str(tmp_path / "other"), "--taps", "stage99",
                   "--no-progress")
    assert bad.returncode != 0 and "stage99" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
