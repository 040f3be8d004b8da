"""``NodeState``: a new instance reopens a processed series, a re-sent one does not; an old
state file without the ``stale`` column is upgraded in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from medinfer.pacs.state import NodeState


def _add(state: NodeState, sop: str, tmp: Path) -> None:
    state.add_instance(sop, "1.2.3", "1.2", tmp / f"{sop}.dcm", tmp)


def test_new_instances_reopen_a_series_resent_ones_do_not(tmp_path: Path) -> None:
    state = NodeState(tmp_path / "state.sqlite")
    for sop in ("a", "b"):
        _add(state, sop, tmp_path)
    assert [r[0] for r in state.idle_series(0.0)] == ["1.2.3"]
    assert state.claim("1.2.3") and not state.claim("1.2.3")
    assert state.finish("1.2.3", outputs=1) and state.status("1.2.3") == "done"
    _add(state, "b", tmp_path)  # re-sent: stays done
    assert state.status("1.2.3") == "done" and state.idle_series(0.0) == []
    _add(state, "c", tmp_path)  # new after processing: reopened
    assert state.status("1.2.3") == "receiving"
    assert state.claim("1.2.3")
    _add(state, "d", tmp_path)  # new during processing: stale, reopened when it finishes
    assert state.status("1.2.3") == "processing"
    assert not state.finish("1.2.3", outputs=1)
    assert state.status("1.2.3") == "receiving" and state.instance_count("1.2.3") == 4
    assert state.claim("1.2.3") and state.finish("1.2.3", error="boom")
    assert state.status("1.2.3") == "failed"
    _add(state, "e", tmp_path)  # a failed series is retried with the new instance
    assert state.status("1.2.3") == "receiving"
    state.close()


def test_state_file_of_an_older_version_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
    CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT, folder TEXT,
        status TEXT NOT NULL, received INTEGER NOT NULL DEFAULT 0, last_instance REAL,
        started REAL, finished REAL, outputs INTEGER, error TEXT);
    CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL,
        path TEXT NOT NULL, received REAL);
    INSERT INTO series VALUES ('9', '8', '/x', 'done', 3, 0, 0, 0, 1, NULL);
    """)
    db.commit()
    db.close()
    state = NodeState(path)
    assert state.status("9") == "done" and state.rows()[0]["stale"] == 0
    state.add_instance("z", "9", "8", tmp_path / "z.dcm", tmp_path)
    assert state.status("9") == "receiving"
    state.close()
