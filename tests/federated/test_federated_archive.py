"""Safe unpacking of untrusted payloads: the archive attack corpus (issue 14, acceptance 2)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from medinfer.federated.archive import SafeUnpacker, UnpackLimits


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _unpack(tmp_path: Path, name: str, data: bytes, **limits: int) -> tuple[SafeUnpacker, Path]:
    work = tmp_path / "work"
    outside_before = _all_files(tmp_path)
    up = SafeUnpacker(work, UnpackLimits(**limits) if limits else None)
    up.add(name, data)
    written_outside = {p for p in _all_files(tmp_path) - outside_before
                       if not p.resolve().is_relative_to(work.resolve())}
    assert written_outside == set()
    for p in up.result.files:
        assert p.resolve().is_relative_to(work.resolve()) and p.is_file()
    return up, work


def _refused(up: SafeUnpacker) -> dict[str | None, str]:
    return {r.member: r.reason for r in up.result.refused}


GOOD = ("case1.nii.gz", b"\x1f\x8b" + b"payload")


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_absolute_and_traversal_members_refused(tmp_path: Path, mode: str) -> None:
    data = _tar([("/etc/evil.txt", b"x"), ("../../evil.txt", b"x"),
                 ("a/../../evil2.txt", b"x"), GOOD], mode)
    up, work = _unpack(tmp_path, "req.tar", data)
    refused = _refused(up)
    assert "absolute" in refused["/etc/evil.txt"]
    assert ".." in refused["../../evil.txt"] and ".." in refused["a/../../evil2.txt"]
    assert [p.name for p in up.result.files] == ["case1.nii.gz"]
    assert not (tmp_path / "evil.txt").exists() and not Path("/etc/evil.txt").exists()


def test_links_devices_fifos_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("secret")
    data = _tar([_info("sym.nii.gz", tarfile.SYMTYPE, str(tmp_path / "secret.txt")),
                 _info("hard.nii.gz", tarfile.LNKTYPE, "../../secret.txt"),
                 _info("dev", tarfile.CHRTYPE), _info("blk", tarfile.BLKTYPE),
                 _info("fifo", tarfile.FIFOTYPE), GOOD])
    up, work = _unpack(tmp_path, "links.tar", data)
    refused = _refused(up)
    assert "symbolic link" in refused["sym.nii.gz"] and "hard link" in refused["hard.nii.gz"]
    assert "device" in refused["dev"] and "device" in refused["blk"]
    assert "FIFO" in refused["fifo"]
    assert not any(p.is_symlink() for p in work.rglob("*"))
    assert [p.name for p in up.result.files] == ["case1.nii.gz"]


def test_zip_symlink_and_traversal_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("link.dcm")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("../up.dcm", b"x")
        zf.writestr("ok/scan.nii.gz", b"\x1f\x8bdata")
    up, _ = _unpack(tmp_path, "req.zip", buf.getvalue())
    refused = _refused(up)
    assert "symbolic link" in refused["link.dcm"] and ".." in refused["../up.dcm"]
    assert [p.name for p in up.result.files] == ["scan.nii.gz"]


def test_too_many_members_refuses_the_archive(tmp_path: Path) -> None:
    data = _tar([(f"m{i:05d}.dcm", b"") for i in range(10_000)])
    up, work = _unpack(tmp_path, "many.tar.gz", data)
    assert up.result.files == {}
    assert "more than 4096 members" in _refused(up)[None]
    assert up.result.refused[0].source == "many.tar.gz"
    assert not any(p.is_file() for p in work.rglob("*"))


def _gz_bomb(size: int) -> bytes:
    """A .tar.gz holding one member of ``size`` zero bytes: concatenated gzip members (RFC
    1952 allows them), one 16 MiB block of zeros compressed once and repeated."""
    info = tarfile.TarInfo("bomb.dcm")
    info.size = size
    block = 1 << 24
    zeros = gzip.compress(bytes(block), compresslevel=9)
    parts = [gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    parts += [zeros] * (size // block)
    parts.append(gzip.compress(bytes(1024)))  # end-of-archive blocks
    return b"".join(parts)


def test_bomb_and_ratio(tmp_path: Path) -> None:
    data = _gz_bomb(1 << 30)
    assert len(data) < 2 << 20
    up, work = _unpack(tmp_path, "bomb.tar.gz", data)
    assert up.result.files == {}
    assert "decompression bomb" in _refused(up)[None]
    assert sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) == 0


def test_zip_ratio_checked_while_streaming(tmp_path: Path) -> None:
    """zip sizes come from the central directory: the ratio is enforced on the bytes that
    really come out, member by member, and the partial output is removed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.nii.gz", b"\x1f\x8b" + b"data")
        zf.writestr("zeros.dcm", bytes(8 << 20))
    up, work = _unpack(tmp_path, "bomb.zip", buf.getvalue(), max_ratio=50,
                       ratio_floor_bytes=1 << 20)
    assert up.result.files == {}
    assert "decompression bomb" in _refused(up)[None]
    assert not any(p.is_file() for p in work.rglob("*"))


def test_duplicates_and_shadowing_names(tmp_path: Path) -> None:
    data = _tar([("s/a.dcm", b"first"), ("s/a.dcm", b"second"), ("S/A.DCM", b"third"),
                 ("./s//a.dcm", b"fourth"),
                 # a member named like a later real file's folder, then the real file
                 ("x", b"plain file"), ("x/real.dcm", b"real")])
    up, work = _unpack(tmp_path, "dup.tar", data)
    written = {p.relative_to(work).as_posix(): p.read_bytes() for p in up.result.files}
    assert written == {"src0001/s/a.dcm": b"first", "src0001/x": b"plain file"}
    reasons = [r.reason for r in up.result.refused]
    assert sum("duplicate name" in r for r in reasons) == 3
    assert any("runs through the earlier file 'x'" in r for r in reasons)


def test_tar_inside_tar_not_unpacked(tmp_path: Path) -> None:
    inner = _tar([("evil/../../x.dcm", b"x")], "w:gz")
    data = _tar([("inner.tar.gz", inner), ("plain_inner.tar", _tar([("y", b"y")])), GOOD])
    up, work = _unpack(tmp_path, "outer.tar", data)
    refused = _refused(up)
    assert "archive inside an archive" in refused["inner.tar.gz"]
    assert "archive inside an archive" in refused["plain_inner.tar"]
    assert [p.name for p in up.result.files] == ["case1.nii.gz"]


def test_corrupt_archive_reported(tmp_path: Path) -> None:
    data = _tar([GOOD, ("b.dcm", os.urandom(50_000))], "w:gz")
    up, _ = _unpack(tmp_path, "cut.tar.gz", data[: len(data) // 2])
    assert up.result.files == {}
    assert "unreadable" in _refused(up)[None]


def test_corpus_peak_rss_under_500_mb(tmp_path: Path) -> None:
    """The whole corpus (incl. the 1 GB bomb) in a fresh interpreter: peak RSS < 500 MB."""
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_federated_archive as t
from medinfer.federated.archive import SafeUnpacker
up = SafeUnpacker({str(tmp_path / 'w')!r})
up.add("bomb.tar.gz", t._gz_bomb(1 << 30))
up.add("many.tar", t._tar([(f"m{{i}}", b"") for i in range(10_000)]))
up.add("dup.tar", t._tar([("a", b"1"), ("a", b"2")]))
# VmHWM: this process's own peak (ru_maxrss would carry the forking pytest process's RSS
# across fork + exec)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(json.dumps({{"rss_kb": hwm[0],
                  "refused": len(up.result.refused), "files": len(up.result.files)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rss_kb"] < 500 * 1024, res
    assert res["refused"] == 3 and res["files"] == 1
