"""bench/common.py: what every benchmark result records about the code that produced it."""

from __future__ import annotations


def test_a_result_names_the_commit_that_ran_and_marks_changed_files(tmp_path, monkeypatch) -> None:
    """``head_commit``: HEAD when the tracked files are HEAD's, ``-dirty`` when they differ (a tree copied
    with a stale .git then names no commit it did not run), ``$SEQMESH_COMMIT`` above both."""
    import subprocess

    import bench.common as common

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "bench" / "results")
    monkeypatch.delenv("SEQMESH_COMMIT", raising=False)
    assert common.head_commit() == head
    (tmp_path / "untracked.txt").write_text("results and logs are not code\n")
    assert common.head_commit() == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert common.head_commit() == f"{head}-dirty"
    monkeypatch.setenv("SEQMESH_COMMIT", "abc1234")
    assert common.head_commit() == "abc1234"
