"""Workers' warnings reach the driver through the run directory, once each, only this invocation's."""

from __future__ import annotations

import logging
import warnings

from seqmesh.launch.worker_warnings import FILE, new_warnings, record_warnings, warnings_offset


def test_warnings_and_seqmesh_log_warnings_are_kept_per_rank(tmp_path) -> None:
    (tmp_path / FILE).write_text('{"rank": 0, "message": "from an earlier invocation"}\n')
    offset = warnings_offset(tmp_path)
    for rank in (0, 1):
        with record_warnings(tmp_path, rank), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("skipping checkpoint step 4: rank1.pt checksum mismatch")
            logging.getLogger("seqmesh.trainer").warning("plan took %d ms", 12)
            logging.getLogger("seqmesh.trainer").info("not a warning")
    with open(tmp_path / FILE, "a") as f:
        f.write('{"rank": 1, "mess')  # a worker killed mid-line
    assert new_warnings(tmp_path, offset) == [
        "UserWarning: skipping checkpoint step 4: rank1.pt checksum mismatch (rank 0, 1)",
        "plan took 12 ms (rank 0, 1)",
    ]
    assert new_warnings(tmp_path, 0)[0] == "from an earlier invocation (rank 0)"


def test_a_replaced_run_directory_is_read_from_its_start(tmp_path) -> None:
    assert warnings_offset(tmp_path) == 0 and new_warnings(tmp_path, 0) == []
    (tmp_path / FILE).write_text('{"rank": 2, "message": "new run"}\n')
    assert new_warnings(tmp_path, offset=10_000) == ["new run (rank 2)"]


def test_the_handlers_are_removed_after_the_block(tmp_path) -> None:
    before = (warnings.showwarning, list(logging.getLogger("seqmesh").handlers))
    with record_warnings(tmp_path, 0):
        pass
    assert (warnings.showwarning, logging.getLogger("seqmesh").handlers) == before
