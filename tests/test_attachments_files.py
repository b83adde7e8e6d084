"""Files on the NAS: every hostile name made safe, paths that never leave the root, whole files
or none, orphaned temporary files swept; and a hostile mailbox end to end."""

from __future__ import annotations

import os
import time
import unicodedata
import uuid
from pathlib import Path

import asyncpg
import pytest
from attachhelp import (
    all_files,
    all_names,
    att_settings,
    drain,
    janitor,
    names_in,
    part_files,
    rows,
    sync_mailbox,
)
from synchelp import make_sandbox

from nova import nas
from nova.config import ConfigError, Settings, load_settings
from nova.sandbox.nylas.generate import HOSTILE_FILENAME_GROUPS, NFC_NAME, NFD_NAME

HOSTILE = [name for _, names in HOSTILE_FILENAME_GROUPS for name in names] + [
    "notes\x000.txt", "a\x07b\x1b[31m.pdf", "x\u202efdp.exe", "..", ".", " ", "C:\\Windows\\x.dll",
    "con.txt", "Lpt1", "COM9.tar.gz", "aux ", "trailing. . .", "tab\tname\n.txt",
    "\ud800lone.txt", "日本語の請求書.pdf", "e\u0301" * 200 + ".txt", "a" * 400,
    "name.ThisIsAVeryLongExtension", "..\\..\\..\\..\\windows\\win.ini", "%2e%2e%2fx.pdf"]
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
            *(f"LPT{i}" for i in range(10))}


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("max_bytes", [255, 143])
def test_every_hostile_name_becomes_one_safe_file_name(name: str, max_bytes: int) -> None:
    row_id = str(uuid.uuid4())
    out = nas.safe_filename(name, row_id, "application/octet-stream", max_bytes=max_bytes)
    assert len(out.encode("utf-8")) <= max_bytes
    assert out == unicodedata.normalize("NFC", out)
    assert not out.startswith((".", " ")) and not out.endswith((".", " "))
    assert not any(c in out for c in '/\\:*?"<>|\x00')
    assert all(unicodedata.category(c)[0] != "C" for c in out)
    stem, _, ext = out.rpartition(".")
    assert stem.endswith(f"_{row_id}") and ext.isalnum()
    assert stem.split(".")[0].split("_")[0].upper() not in RESERVED or stem.startswith("_")
    assert (Path("/nas/2024-01") / out).resolve().parent == Path("/nas/2024-01")


def test_the_same_name_in_nfc_and_nfd_is_one_stem_and_two_files() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert NFC_NAME != NFD_NAME
    first, second = nas.safe_filename(NFC_NAME, a), nas.safe_filename(NFD_NAME, b)
    assert first == f"r\u00e9sum\u00e9_{a}.pdf" and second == f"r\u00e9sum\u00e9_{b}.pdf"


def test_names_are_cut_by_bytes_never_inside_a_character() -> None:
    row_id = str(uuid.uuid4())
    out = nas.safe_filename("\u00fc" * 160 + ".pdf", row_id)  # 324 bytes of UTF-8
    assert len(out.encode()) <= 255 and len(out.encode()) >= 253
    assert out.endswith(f"_{row_id}.pdf") and set(out[: out.index("_")]) == {"\u00fc"}


def test_a_missing_extension_comes_from_the_content_type() -> None:
    assert nas.split_name("report", "application/pdf; name=\"report\"") == ("report", ".pdf")
    assert nas.split_name("", "text/plain") == ("attachment", ".txt")
    assert nas.split_name("archive", None) == ("archive", "")


def test_paths_that_leave_the_root_are_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    assert nas.inside(tmp_path / "root", "2024-01/x.pdf") == (tmp_path / "root" / "2024-01"
                                                               / "x.pdf").resolve()
    for bad in ("../x", "2024-01/../../x", "/etc/passwd", ".", ""):
        with pytest.raises(nas.UnsafePath):
            nas.inside(tmp_path / "root", bad)


async def test_a_spool_writes_whole_files_or_leaves_nothing(tmp_path: Path) -> None:
    data = os.urandom(3 * nas.BATCH_BYTES + 123)
    spool = nas.Spool(tmp_path, tag="t")
    for i in range(0, len(data), 65536):
        await spool.write(data[i:i + 65536])
    written = await spool.finish()
    assert written.path is not None and written.path.read_bytes() == data
    assert written.size == len(data) and written.data is None
    nas.commit_file(written.path, tmp_path / "final.bin")
    assert (tmp_path / "final.bin").read_bytes() == data and part_files(tmp_path) == []

    capped = nas.Spool(tmp_path, limit=nas.BATCH_BYTES)
    with pytest.raises(nas.TooLarge):
        for i in range(0, len(data), 65536):
            await capped.write(data[i:i + 65536])
    await capped.discard()
    assert part_files(tmp_path) == []

    empty = await nas.Spool(tmp_path).finish()
    assert empty.path is not None and empty.path.read_bytes() == b"" and empty.size == 0


async def test_a_spool_keeps_small_files_in_memory_and_spills_large_ones(
        tmp_path: Path) -> None:
    small = nas.Spool(tmp_path, memory_max=10_000)
    await small.write(b"x" * 5000)
    kept = await small.finish()
    assert kept.data == b"x" * 5000 and kept.path is None and all_files(tmp_path) == []
    large = nas.Spool(tmp_path, memory_max=nas.BATCH_BYTES)
    payload = os.urandom(2 * nas.BATCH_BYTES + 5)
    await large.write(payload)
    spilled = await large.finish()
    assert spilled.data is None and spilled.path is not None
    assert spilled.path.read_bytes() == payload
    hashed = nas.Spool(None)
    await hashed.write(payload)
    only = await hashed.finish()
    assert (only.data, only.path, only.sha256) == (None, None, spilled.sha256)


def test_the_sweep_deletes_only_orphaned_temporary_files(tmp_path: Path) -> None:
    month = tmp_path / "nas" / "2024-03"
    month.mkdir(parents=True)
    temp = tmp_path / "tmp"
    temp.mkdir()
    old = [month / ".nova-a-1.part", temp / ".nova-b-2.part"]
    fresh = month / ".nova-c-3.part"
    keep = [month / "report_1.pdf", month / ".nova-note.txt", tmp_path / "nas" / ".nova-d.parts"]
    for p in [*old, fresh, *keep]:
        p.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for p in [*old, *keep]:
        os.utime(p, (hour_ago, hour_ago))
    removed = nas.sweep_temp_files([temp], 300) + nas.sweep_temp_files(
        [tmp_path / "nas"], 300, month_folders=True)
    assert sorted(removed) == sorted(old)
    assert fresh.exists() and all(p.exists() for p in keep)


async def test_the_janitor_sweeps_orphaned_files_of_the_nas_and_the_temp_folder(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    with make_sandbox(2) as sb:
        s = att_settings(sb, tmp_path, attachment_temp_max_age_seconds=60)
        month = tmp_path / "nas" / "2025-07"
        month.mkdir(parents=True)
        (tmp_path / "tmp").mkdir()
        orphans = [month / ".nova-x-1.part", tmp_path / "tmp" / ".nova-y-2.part"]
        for p in orphans:
            p.write_bytes(b"half a download")
            os.utime(p, (time.time() - 120, time.time() - 120))
        sweep = await janitor(pool, s).sweep()
        assert sorted(sweep.temp_files) == sorted(orphans)
        assert part_files(tmp_path) == []


async def test_a_hostile_mailbox_ends_with_every_attachment_on_disk_inside_the_root(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    with make_sandbox(40, hostile=0.5) as sb:
        gid = sb.grant_ids[0]
        carried = {k for kinds in sb.hostile_threads(gid).values() for k in kinds}
        assert {"path_traversal", "reserved_names", "unicode_names", "degenerate_names",
                "nul_filename", "broken_charset"} <= carried
        await sync_mailbox(pool, sb)
        await drain(pool, att_settings(sb, tmp_path))
        root = (tmp_path / "nas").resolve()
        stored = await rows(pool)
        names = {r["original_filename"] for r in stored}
        assert {"../../etc/passwd", "..\\..\\boot.ini", "/abs/path.pdf", "CON", "NUL.txt",
                ".hidden", "", "...", NFC_NAME} <= names
        expected = set()
        for r in stored:
            assert r["status"] == "completed", r["error_message"]
            path = (root / r["local_path"]).resolve()
            assert path.is_relative_to(root) and path.parent.parent == root
            assert r["local_filename"] == nas.safe_filename(
                r["original_filename"], str(r["id"]), r["content_type"])
            assert path.read_bytes() == sb.attachment_bytes(
                gid, r["provider_attachment_id"], r["provider_message_id"])
            expected.add(path)
        assert set(all_files(root)) == expected  # nothing else under the root
        assert names_in(tmp_path) == ["nas"]  # nothing beside it
        assert not {"passwd", "boot.ini"} & all_names(tmp_path)
        resumes = [r for r in stored if unicodedata.normalize("NFC", r["original_filename"])
                   == NFC_NAME]
        assert len(resumes) >= 2 and len({r["local_filename"] for r in resumes}) == len(resumes)
        texts = [r for r in stored if r["original_filename"].startswith("notes")
                 and r["content_type"].startswith("text/plain; charset")]
        assert texts and all(r["extracted_text"] for r in texts)


def test_attachment_settings_keep_the_seeds_names_and_thresholds() -> None:
    fields = Settings.model_fields
    expected = {"max_retries": ("MAX_RETRIES", 3),
                "attachment_path": ("NOVA_ATTACHMENT_PATH", Path("./attachments")),
                "attachment_store": ("NOVA_ATTACHMENT_STORE", "nas"),
                "attachment_stuck_minutes": ("NOVA_ATTACHMENT_STUCK_MINUTES", 30.0),
                "attachment_temp_max_age_seconds": ("NOVA_ATTACHMENT_TEMP_MAX_AGE_SECONDS", 300),
                "extract_memory_max_bytes": ("NOVA_EXTRACT_MEMORY_MAX_BYTES", 10 * 1024 * 1024),
                "extract_max_bytes": ("NOVA_EXTRACT_MAX_BYTES", 50 * 1024 * 1024)}
    for name, (env_name, default) in expected.items():
        assert (fields[name].validation_alias, fields[name].default) == (env_name, default)
    with pytest.raises(ConfigError, match="NOVA_ATTACHMENT_STORE"):
        load_settings(attachment_store="s3")
