"""What the job's tasks do instead of the driver (corpus.canonical, dataset.resume): expand
a validated canonical manifest into segments, skip what an output already holds per
recording, count the summary's checks, and take transient errors out for a retry. No Ray: the
task functions are called directly on Arrow tables, the output is real Parquet parts."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hubert_ray.corpus import canonical as canon
from hubert_ray.corpus import manifest
from hubert_ray.corpus.manifest import Recording, Segment
from hubert_ray.dataset import output, resume
from hubert_ray.dataset import summary as dataset_summary


def _recordings(base: str) -> list[Recording]:
    return [
        Recording(
            f"r{r}",
            os.path.join(base, f"r{r}.wav"),
            tuple(Segment(f"r{r}-{i}", i * 1.0, i * 1.0 + 0.5) for i in range(n)),
        )
        for r, n in enumerate([3, 4, 2, 5])
    ]


@pytest.fixture
def canonical(tmp_path):
    path = str(tmp_path / "m.parquet")
    manifest.write_canonical(_recordings(str(tmp_path)), path, validated=True)
    return path


def _features(out: str, rows: list[tuple[str, str]], name: str) -> None:
    d = os.path.join(out, output.FEATURES_DIR)
    os.makedirs(d, exist_ok=True)
    n = len(rows)
    pq.write_table(
        pa.table(
            {
                "segment_id": [s for s, _ in rows],
                "recording_id": [r for _, r in rows],
                "start_s": [0.0] * n,
                "end_s": [0.5] * n,
                "num_frames": pa.array([24] * n, pa.int32()),
                "compute_dtype": ["float32"] * n,
                "fallback_reason": pa.nulls(n, pa.string()),
            }
        ),
        os.path.join(d, f"part-{name}.parquet"),
    )


def _errors(out: str, rows: list[tuple[str, str, str]], name: str) -> None:
    table = pa.table(
        {
            "segment_id": [s for s, _, _ in rows],
            "recording_id": [r for _, r, _ in rows],
            "stage": ["decode"] * len(rows),
            "reason": [x for _, _, x in rows],
            "message": ["m"] * len(rows),
        }
    )
    table = table.append_column("transient", output.transient(table.column("reason")))
    output.write_part(table, os.path.join(out, output.ERRORS_DIR), {"k": 1}, key=name)


def test_manifest_info_reads_the_footer_of_validated_manifests_only(tmp_path, canonical):
    assert canon.manifest_info(canonical) == {"recordings": 4, "segments": 14, "row_groups": 1}
    plain = str(tmp_path / "plain.parquet")
    manifest.write_canonical(_recordings(str(tmp_path)), plain)  # not marked validated
    assert canon.manifest_info(plain) is None
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "audio": "a.wav"}) + "\n")
    assert canon.manifest_info(str(jsonl)) is None


def test_write_validated_round_trip(tmp_path):
    recs = _recordings(str(tmp_path))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps(
                {
                    "id": r.recording_id,
                    "audio": os.path.basename(r.audio_uri),
                    "segments": [
                        {"id": s.segment_id, "start_s": s.start_s, "end_s": s.end_s}
                        for s in r.segments
                    ],
                }
            )
            + "\n"
            for r in recs
        )
    )
    table = manifest.read_segments(str(jsonl))
    copy = str(tmp_path / "out" / "_manifest.parquet")
    canon.write_validated(table, copy)
    assert canon.manifest_info(copy)["segments"] == table.num_rows
    again = canon.expand(pq.read_table(copy), canon.manifest_dir(copy))
    assert again.equals(table)
    assert again.equals(manifest.read_segments(copy))


def test_todo_skips_written_segments_per_recording(tmp_path, canonical):
    out = str(tmp_path / "out")
    # r0: all written (skipped unread); r1: two of four; r2: one error (permanent) + nothing;
    # r3: nothing. A row of a recording the manifest does not have.
    _features(out, [("r0-0", "r0"), ("r0-1", "r0"), ("r1-0", "r1"), ("x-0", "x")], "a")
    _features(out, [("r0-2", "r0"), ("r1-3", "r1")], "b")
    _errors(out, [("r2-1", "r2", "too_short")], "c")
    index = resume.build_done_index(out)
    assert index.rows == 7
    rows, parts = index.lookup(pa.array(["r0", "r1", "r2", "r3"]))
    assert rows.tolist() == [3, 2, 1, 0]
    assert [len(p) for p in parts] == [2, 2, 1, 0]

    batch = pq.read_table(canonical)
    todo = resume.todo_segments(batch, canon.manifest_dir(canonical), index)
    assert todo.schema.equals(manifest.SEGMENT_SCHEMA)
    assert todo.column("segment_id").to_pylist() == [
        "r1-1", "r1-2", "r2-0", "r3-0", "r3-1", "r3-2", "r3-3", "r3-4"
    ]  # fmt: skip
    # An empty output: every segment, in manifest order.
    empty = resume.build_done_index(str(tmp_path / "none"))
    assert resume.todo_segments(batch, "/", empty).num_rows == 14

    check = resume.check_segments(batch, index).to_pylist()[0]
    assert check == {"segments": 14, "written": 6, "duplicated": 0, "unexpected": 0}
    assert resume.unexpected_recordings(index, canonical, None) == 1


def test_check_counts_duplicates_and_strays(tmp_path, canonical):
    out = str(tmp_path / "out")
    _features(out, [("r0-0", "r0"), ("r0-1", "r0"), ("r0-9", "r0")], "a")
    _features(out, [("r0-1", "r0")], "b")  # written twice
    index = resume.build_done_index(out)
    check = resume.check_segments(pq.read_table(canonical), index).to_pylist()[0]
    assert check == {"segments": 14, "written": 2, "duplicated": 1, "unexpected": 1}


def test_transient_errors_are_taken_out_for_a_retry(tmp_path, canonical):
    out = str(tmp_path / "out")
    _features(out, [("r0-0", "r0"), ("r0-1", "r0"), ("r0-2", "r0")], "a")
    _errors(out, [("r1-0", "r1", "read_error"), ("r1-1", "r1", "too_short")], "mixed")
    _errors(out, [("r2-0", "r2", "read_error"), ("r2-1", "r2", "read_error")], "all")
    _errors(out, [("r3-0", "r3", "missing_file")], "permanent")
    assert output.retry_transient_errors(out) == 3
    errs = output.read_table(os.path.join(out, output.ERRORS_DIR))
    assert sorted(errs.column("segment_id").to_pylist()) == ["r1-1", "r3-0"]
    assert not any(errs.column("transient").to_pylist())
    assert not os.path.exists(os.path.join(out, output.ERRORS_DIR, "part-all.parquet"))
    retried = output.read_table(os.path.join(out, output.RETRIED_DIR))
    assert sorted(retried.column("segment_id").to_pylist()) == ["r1-0", "r2-0", "r2-1"]
    assert output.retry_transient_errors(out) == 0  # nothing left to move

    index = resume.build_done_index(out)
    todo = resume.todo_segments(pq.read_table(canonical), "/", index)
    assert {"r1-0", "r2-0", "r2-1"} <= set(todo.column("segment_id").to_pylist())
    assert "r1-1" not in todo.column("segment_id").to_pylist()  # permanent: skipped

    _features(out, [("r1-0", "r1"), ("r2-0", "r2")], "recovered")  # what the rerun writes
    summary = dataset_summary.summarize_parts(out)
    assert summary["segments_retried"] == 3 and summary["segments_recovered"] == 2
    assert summary["segments_ok"] == 5 and summary["segments_failed"] == 2
    assert summary["errors_by_reason"] == {"missing_file": 1, "too_short": 1}


def test_old_error_parts_without_the_transient_column(tmp_path):
    out = str(tmp_path / "out")
    d = os.path.join(out, output.ERRORS_DIR)
    os.makedirs(d)
    pq.write_table(
        pa.table(
            {
                "segment_id": ["a", "b"],
                "recording_id": ["r", "r"],
                "stage": ["decode", "decode"],
                "reason": ["read_error", "unreadable_audio"],
                "message": ["m", "m"],
            }
        ),
        os.path.join(d, "part-old.parquet"),
    )
    assert output.retry_transient_errors(out) == 1
    left = output.read_table(d)
    assert left.column("segment_id").to_pylist() == ["b"]


def test_runs_totals():
    runs = [
        {"wall_seconds": 10.0, "audio_seconds": 500.0},
        {"wall_seconds": None, "audio_seconds": 0.0},  # killed: no wall time
        {"wall_seconds": 30.0, "audio_seconds": 100.0},
    ]
    assert dataset_summary.runs_totals(runs) == {
        "runs": 3,
        "runs_interrupted": 1,
        "audio_seconds": 600.0,
        "wall_seconds": 40.0,
        "x_realtime": 15.0,
    }
    assert dataset_summary.runs_totals([])["x_realtime"] is None
    assert np.isclose(dataset_summary.runs_totals(runs[:1])["x_realtime"], 50.0)
