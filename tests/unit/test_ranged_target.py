"""RangedVFSTarget (storage/artifacts/hfimport.py): parts written by several threads at once,
the journal that lets a restart resume them, and what a torn or foreign journal does."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from storage.artifact_config import VFSStorageConfig
from storage.artifacts.hfimport import RangedVFSTarget
from storage.artifacts.huggingface import HubFile
from storage.artifacts.vfs import VFSArtifactStorage

PART = 1 << 20


def _setup(root: Path, data: bytes) -> tuple[VFSArtifactStorage, HubFile]:
    storage = VFSArtifactStorage(VFSStorageConfig(name="m", base_path=root))
    storage.prepare()
    f = HubFile(path="big.bin", size=len(data), blob_id="0" * 40, sha256=hashlib.sha256(data).hexdigest(),
                url="http://hub/big.bin")
    return storage, f


def test_parts_written_at_once_by_threads_journal_and_verify(tmp_path: Path) -> None:
    data = os.urandom(5 * PART + 123)
    storage, f = _setup(tmp_path / "m", data)
    target = RangedVFSTarget(storage, "a/big.bin", f, PART)
    assert target.open() is False and len(target.parts) == 6
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        start, end, _ = target.parts[index]
        try:
            for pos in range(start, end, 64 << 10):
                target.write_at(index, data[pos:min(pos + (64 << 10), end)])
                if pos % (256 << 10) == 0:
                    target.save_journal()  # as the importer does at a part's end, from many threads
            target.save_journal()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    journal = tmp_path / "m" / "a" / target.journal_name
    assert json.loads(journal.read_bytes())["done"] == [end - start for start, end, _ in target.parts]
    target.finish()
    assert (tmp_path / "m" / "a" / "big.bin").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "m" / "a").iterdir()) == ["big.bin"]  # staging and journal gone


def test_a_restart_resumes_each_part_from_the_journal(tmp_path: Path) -> None:
    data = os.urandom(3 * PART + 5)
    storage, f = _setup(tmp_path / "m", data)
    first = RangedVFSTarget(storage, "big.bin", f, PART)
    first.open()
    first.write_at(0, data[:PART])  # part 0 whole
    first.write_at(2, data[2 * PART:2 * PART + 1000])  # part 2 begun
    first.save_journal()
    first.write_at(1, data[PART:PART + 10])  # written after the last save: not counted
    first.close()  # (a kill: nothing more)
    again = RangedVFSTarget(storage, "big.bin", f, PART)
    assert again.open() is False
    assert [p[2] for p in again.parts] == [PART, 0, 1000, 0] and again.offset == PART + 1000
    for index, (start, end, done) in enumerate(again.parts):
        again.write_at(index, data[start + done:end])
    again.finish()
    assert (tmp_path / "m" / "big.bin").read_bytes() == data


def test_wrong_bytes_fail_verification_and_start_clean(tmp_path: Path) -> None:
    data = os.urandom(2 * PART)
    storage, f = _setup(tmp_path / "m", data)
    target = RangedVFSTarget(storage, "big.bin", f, PART)
    target.open()
    target.write_at(0, data[:PART])
    target.write_at(1, b"x" * PART)
    try:
        target.finish()
    except Exception as exc:  # ArtifactVerificationFailed
        assert "do not match" in str(exc)
    else:
        raise AssertionError("wrong bytes were accepted")
    target.close()
    assert not (tmp_path / "m" / "big.bin").exists()
    again = RangedVFSTarget(storage, "big.bin", f, PART)
    again.open()
    assert [p[2] for p in again.parts] == [0, 0]  # the journal went with the bad bytes
    again.close()


@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["size", "part_size", "done"]),
                    st.one_of(st.integers(-5, 4 * PART), st.lists(st.integers(-5, 2 * PART), max_size=5),
                              st.text(max_size=5), st.none()), max_size=3).map(lambda d: json.dumps(d).encode()),
    st.tuples(st.integers(0, PART + 1), st.integers(0, PART + 1), st.integers(-1, 8)).map(
        lambda t: json.dumps({"size": 2 * PART + 7, "part_size": PART, "done": [t[0], t[1], t[2]]}).encode()),
))
def test_any_journal_is_taken_only_when_it_fits(raw: bytes) -> None:
    """A torn, foreign or hostile journal never breaks open(): it is used only when it describes this
    file's parts, each count within its part; else every part starts from 0."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = b"z" * (2 * PART + 7)
        storage, f = _setup(Path(tmp) / "m", data)
        target = RangedVFSTarget(storage, "big.bin", f, PART)
        (Path(tmp) / "m" / target.part_name).write_bytes(data)
        (Path(tmp) / "m" / target.journal_name).write_bytes(raw)
        assert target.open() is False
        done = [p[2] for p in target.parts]
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        fits = (isinstance(parsed, dict) and parsed.get("size") == f.size and parsed.get("part_size") == PART
                and isinstance(parsed.get("done"), list) and len(parsed["done"]) == 3
                and all(isinstance(n, int) and 0 <= n <= e - s for n, (s, e, _) in zip(parsed["done"],
                                                                                     target.parts, strict=True)))
        assert done == (parsed["done"] if fits else [0, 0, 0])  # type: ignore[index]
        assert os.path.getsize(Path(tmp) / "m" / target.part_name) == f.size
        target.close()

