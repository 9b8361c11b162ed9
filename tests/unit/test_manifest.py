"""Pure unit tests for hubert_ray.corpus.manifest and jobs.prepare (no Ray, no torch).

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_manifest.py``.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hubert_ray.core.errors import ManifestError
from hubert_ray.corpus.manifest import (
    CANONICAL_SCHEMA,
    MAX_LISTED,
    SEGMENT_SCHEMA,
    Recording,
    Segment,
    read_manifest,
    read_segments,
    segment_table,
    write_canonical,
)
from jobs import prepare


def write_jsonl(path, records) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def manifest_error(uri: str) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(uri)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Formats


def test_jsonl_with_ids_and_segments(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "id": "rec1",
                "audio": "/data/rec1.flac",
                "duration_s": 4,
                "segments": [
                    {"id": "rec1-0", "start_s": 0, "end_s": 2.5},
                    {"id": "rec1-1", "start_s": 2.5, "end_s": None},
                ],
            },
            {"id": "rec2", "audio": "s3://bucket/a/rec2.wav", "extra": {"ignored": True}},
        ],
    )
    recs = read_manifest(uri)
    assert recs == [
        Recording(
            "rec1",
            "/data/rec1.flac",
            (Segment("rec1-0", 0.0, 2.5), Segment("rec1-1", 2.5, None)),
            4.0,
        ),
        Recording("rec2", "s3://bucket/a/rec2.wav", (Segment("rec2", 0.0, None),), None),
    ]
    assert isinstance(recs[0].duration_s, float)
    assert isinstance(recs[0].segments[0].start_s, float)


def test_jsonl_without_ids_derives_them_and_resolves_relative_paths(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.ndjson",
        [
            {"audio": "audio/spk1/utt1.flac"},
            "",
            "   ",
            {"audio": "../other/utt2.wav", "segments": [{"start_s": 1, "end_s": 2}]},
        ],
    )
    recs = read_manifest(uri)
    assert [r.recording_id for r in recs] == ["utt1", "utt2"]
    assert recs[0].audio_uri == str(tmp_path / "audio/spk1/utt1.flac")
    # A relative path leaving the manifest's directory is marked, never resolved:
    # the decode stage turns it into path_escape error rows.
    assert recs[1].audio_uri == "path-escape://../other/utt2.wav"
    assert recs[0].segments == (Segment("utt1", 0.0, None),)
    assert recs[1].segments == (Segment("utt2-0", 1.0, 2.0),)


def test_json_extension_is_jsonl(tmp_path):
    uri = write_jsonl(tmp_path / "m.json", [{"id": "a", "audio": "/x/a.wav"}])
    assert read_manifest(uri)[0].recording_id == "a"


def test_file_url_manifest(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"audio": "a.wav"}, {"audio": "file:///abs/b.wav"}])
    recs = read_manifest(f"file://{tmp_path}/m.jsonl")
    assert recs[0].audio_uri == f"file://{tmp_path}/a.wav"
    assert recs[1].audio_uri == "file:///abs/b.wav"


def test_parquet_raw_columns(tmp_path):
    table = pa.table(
        {
            "id": ["r1", None],
            "audio": ["a/r1.wav", "/abs/r2.wav"],
            "segments": [
                [
                    {"id": "s1", "start_s": 0.0, "end_s": 1.0},
                    {"id": "s2", "start_s": 1.0, "end_s": None},
                ],
                None,
            ],
            "duration_s": [2.0, None],
            "speaker": ["x", "y"],
        }
    )
    pq.write_table(table, tmp_path / "raw.parquet")
    recs = read_manifest(str(tmp_path / "raw.parquet"))
    assert recs == [
        Recording(
            "r1",
            str(tmp_path / "a/r1.wav"),
            (Segment("s1", 0.0, 1.0), Segment("s2", 1.0, None)),
            2.0,
        ),
        Recording("r2", "/abs/r2.wav", (Segment("r2", 0.0, None),), None),
    ]


def test_parquet_error_names_row(tmp_path):
    table = pa.table(
        {
            "audio": ["/a.wav", "/b.wav"],
            "segments": [
                [{"id": "s1", "start_s": 0.0, "end_s": 1.0}],
                [{"id": "s2", "start_s": 3.0, "end_s": 1.0}],
            ],
        }
    )
    pq.write_table(table, tmp_path / "raw.parquet")
    msg = manifest_error(str(tmp_path / "raw.parquet"))
    assert "raw.parquet:2: field 'segments[0].end_s': end_s=1.0 must be > start_s=3.0" in msg


def test_parquet_without_audio_column(tmp_path):
    pq.write_table(pa.table({"path": ["/a.wav"]}), tmp_path / "bad.parquet")
    msg = manifest_error(str(tmp_path / "bad.parquet"))
    assert "'audio'" in msg and "recording_id" in msg


def test_canonical_round_trip(tmp_path):
    recs = [
        Recording("r1", "/abs/r1.wav", (Segment("s1", 0.0, 1.5), Segment("s2", 1.5, None)), 3.0),
        Recording("r2", "s3://b/r2.flac", (Segment("r2", 0.0, None),)),
    ]
    out = tmp_path / "nested" / "dir" / "canon.parquet"
    write_canonical(recs, str(out))
    table = pq.read_table(out)
    assert table.schema.equals(CANONICAL_SCHEMA)
    assert table.num_rows == 2
    assert read_manifest(str(out)) == recs


def test_canonical_round_trip_via_file_url(tmp_path):
    recs = [Recording("r1", "/abs/r1.wav", (Segment("r1", 0.0, None),), None)]
    write_canonical(recs, f"file://{tmp_path}/c.parquet")
    assert read_manifest(f"file://{tmp_path}/c.parquet") == recs


def test_fairseq_tsv(tmp_path):
    (tmp_path / "train.tsv").write_text(
        "audio_root\nspk1/utt1.flac\t32000\n\nspk2/utt1.flac\t8000\n"
    )
    recs = read_manifest(str(tmp_path / "train.tsv"))
    assert recs == [
        Recording(
            "spk1/utt1",
            str(tmp_path / "audio_root/spk1/utt1.flac"),
            (Segment("spk1/utt1", 0.0, None),),
            2.0,
        ),
        Recording(
            "spk2/utt1",
            str(tmp_path / "audio_root/spk2/utt1.flac"),
            (Segment("spk2/utt1", 0.0, None),),
            0.5,
        ),
    ]


def test_fairseq_tsv_absolute_root(tmp_path):
    (tmp_path / "t.tsv").write_text("/corpus\na.wav\t16000\n")
    assert read_manifest(str(tmp_path / "t.tsv"))[0].audio_uri == "/corpus/a.wav"


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "abc"])
def test_fairseq_tsv_bad_num_samples(tmp_path, value):
    (tmp_path / "t.tsv").write_text(f"/corpus\na.wav\t16000\nb.wav\t{value}\n")
    msg = manifest_error(str(tmp_path / "t.tsv"))
    assert f"t.tsv:3: field 'num_samples': num_samples={value!r}" in msg
    assert "positive integer" in msg


def test_fairseq_tsv_duplicate_ids(tmp_path):
    (tmp_path / "t.tsv").write_text("/corpus\na.wav\t16000\na.flac\t16000\n")
    msg = manifest_error(str(tmp_path / "t.tsv"))
    assert "t.tsv:3: field 'id': duplicate recording id 'a' (first at line 2)" in msg


# ---------------------------------------------------------------------------------------------
# Validation


def test_duplicate_recording_id(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "r", "audio": "/a.wav"}, {"id": "r", "audio": "/b.wav"}]
    )
    msg = manifest_error(uri)
    assert "m.jsonl:2: field 'id': duplicate recording id 'r' (first at line 1)" in msg
    assert "1 problem:" in msg


def test_duplicate_segment_id_across_recordings(tmp_path):
    seg = {"id": "s", "start_s": 0, "end_s": 1}
    uri = write_jsonl(
        tmp_path / "m.jsonl",
        [{"audio": "/a.wav", "segments": [seg]}, {"audio": "/b.wav", "segments": [seg]}],
    )
    msg = manifest_error(uri)
    assert "m.jsonl:2: field 'segments[0].id': duplicate segment id 's' (first at line 1)" in msg


def test_whole_file_segment_colliding_with_explicit_segment_id(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": "/a.wav", "segments": [{"id": "b", "start_s": 0, "end_s": 1}]},
            {"audio": "/b.wav"},
        ],
    )
    assert "m.jsonl:2: field 'segments': duplicate segment id 'b'" in manifest_error(uri)


def test_end_not_after_start(tmp_path):
    segs = [
        {"id": "a", "start_s": 0, "end_s": 1},
        {"id": "b", "start_s": 1, "end_s": 1},
        {"id": "c", "start_s": 2.0, "end_s": 1.0},
    ]
    records = [{"id": f"r{i}", "audio": f"/r{i}.wav"} for i in range(6)]
    uri = write_jsonl(
        tmp_path / "manifest.jsonl", [*records, {"id": "r", "audio": "/r.wav", "segments": segs}]
    )
    msg = manifest_error(uri)
    assert "manifest.jsonl:7: field 'segments[2].end_s': end_s=1.0 must be > start_s=2.0" in msg
    assert "manifest.jsonl:7: field 'segments[1].end_s': end_s=1.0 must be > start_s=1.0" in msg


def test_negative_times(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": "/a.wav", "segments": [{"start_s": -0.5, "end_s": 1}]},
            {"audio": "/b.wav", "duration_s": -3},
        ],
    )
    msg = manifest_error(uri)
    assert "m.jsonl:1: field 'segments[0].start_s': start_s=-0.5 must be >= 0" in msg
    assert "m.jsonl:2: field 'duration_s': duration_s=-3 must be > 0" in msg


@pytest.mark.parametrize("value", ["1.0", True, [1], {"s": 1}])
def test_non_numeric_time(tmp_path, value):
    uri = write_jsonl(
        tmp_path / "m.jsonl", [{"audio": "/a.wav", "segments": [{"start_s": 0, "end_s": value}]}]
    )
    msg = manifest_error(uri)
    assert f"m.jsonl:1: field 'segments[0].end_s': end_s={value!r} is not a number" in msg


def test_non_finite_time(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl", ['{"audio": "/a.wav", "segments": [{"start_s": NaN, "end_s": 1}]}']
    )
    assert "field 'segments[0].start_s': start_s=nan is not finite" in manifest_error(uri)


def test_missing_segment_keys(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl", [{"audio": "/a.wav", "segments": [{"id": "x", "start": 0, "end": 1}]}]
    )
    msg = manifest_error(uri)
    assert "m.jsonl:1: field 'segments[0].start_s': missing" in msg
    assert "m.jsonl:1: field 'segments[0].end_s': missing" in msg


def test_empty_segments_list(tmp_path):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav", "segments": []}])
    assert "m.jsonl:1: field 'segments': an empty list" in manifest_error(uri)


@pytest.mark.parametrize(
    "record, detail",
    [
        ({"id": "r"}, "missing"),
        ({"id": "r", "audio": ""}, "'' is invalid"),
        ({"id": "r", "audio": 3}, "3 is invalid"),
    ],
)
def test_missing_audio(tmp_path, record, detail):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/ok.wav"}, record])
    msg = manifest_error(uri)
    assert f"m.jsonl:2: field 'audio': {detail}; expected a non-empty audio path or URL" in msg


def test_invalid_json_line_and_non_object(tmp_path):
    uri = write_jsonl(tmp_path / "m.jsonl", ['{"audio": "/a.wav"}', '{"audio": ', '["x"]'])
    msg = manifest_error(uri)
    assert "m.jsonl:2: invalid JSON" in msg
    assert "m.jsonl:3: a JSON list is not a recording; expected a JSON object" in msg


def test_unknown_extension(tmp_path):
    (tmp_path / "m.csv").write_text("audio\n/a.wav\n")
    msg = manifest_error(str(tmp_path / "m.csv"))
    assert "'.csv'" in msg
    for ext in (".jsonl", ".ndjson", ".json", ".parquet", ".tsv"):
        assert ext in msg


def test_missing_manifest_file(tmp_path):
    assert "does not exist" in manifest_error(str(tmp_path / "nope.jsonl"))


def test_empty_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n\n")
    assert "m.jsonl: no recordings; expected at least one" in manifest_error(
        str(tmp_path / "m.jsonl")
    )
    (tmp_path / "t.tsv").write_text("/root\n")
    assert "no recordings" in manifest_error(str(tmp_path / "t.tsv"))


def test_all_problems_in_one_error(tmp_path):
    uri = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "audio": "/a.wav"},
            {"id": "a", "audio": "/b.wav"},
            "not json",
            {"audio": "/c.wav", "segments": [{"start_s": 3, "end_s": 2}]},
            {"id": "d"},
        ],
    )
    msg = manifest_error(uri)
    assert msg.startswith(f"manifest {uri} has 4 problems:")
    for where in ("m.jsonl:2:", "m.jsonl:3:", "m.jsonl:4:", "m.jsonl:5:"):
        assert where in msg


def test_problem_list_is_capped(tmp_path):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"id": "r"}] * (MAX_LISTED + 7))
    msg = manifest_error(uri)
    lines = msg.splitlines()
    # Header + MAX_LISTED problems + the "... and N more" line. Each {"id": "r"} line has a
    # missing audio; lines 2.. also repeat the id, so there are 2 * n - 1 problems.
    total = 2 * (MAX_LISTED + 7) - 1
    assert lines[0] == f"manifest {uri} has {total} problems:"
    assert len(lines) == 1 + MAX_LISTED + 1
    assert lines[-1].strip() == f"... and {total - MAX_LISTED} more"


# ---------------------------------------------------------------------------------------------
# segment_table


def test_segment_table_order_and_schema():
    recs = [
        Recording("r1", "/r1.wav", (Segment("r1-b", 2.0, 3.0), Segment("r1-a", 0.0, 1.0))),
        Recording("r2", "/r2.wav", (Segment("r2", 0.0, None),), 5.0),
        Recording("r3", "s3://b/r3.wav", (Segment("z", 1.0, 4.0),)),
    ]
    table = segment_table(recs)
    assert table.schema.equals(SEGMENT_SCHEMA)
    assert table.schema.names == ["segment_id", "recording_id", "audio_uri", "start_s", "end_s"]
    assert table.to_pydict() == {
        "segment_id": ["r1-b", "r1-a", "r2", "z"],
        "recording_id": ["r1", "r1", "r2", "r3"],
        "audio_uri": ["/r1.wav", "/r1.wav", "/r2.wav", "s3://b/r3.wav"],
        "start_s": [2.0, 0.0, 0.0, 1.0],
        "end_s": [3.0, 1.0, None, 4.0],
    }


def test_segment_table_empty():
    table = segment_table([])
    assert table.num_rows == 0 and table.schema.equals(SEGMENT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# read_segments: the column-wise path for canonical Parquet


def _canonical_file(path, rows, schema=CANONICAL_SCHEMA) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def _seg(sid, start, end):
    return {"segment_id": sid, "start_s": start, "end_s": end}


GOOD_ROWS = [
    {
        "recording_id": "r1",
        "audio_uri": " audio/r1.opus ",  # relative, with blanks: resolved and stripped
        "duration_s": 9.0,
        "segments": [_seg("r1-b", 4.0, 6.5), _seg("r1-a", 0.0, 3.0)],
    },
    {
        "recording_id": "r2",
        "audio_uri": "../up.wav",
        "duration_s": None,
        "segments": [_seg("r2", 0.0, None)],
    },
    {
        "recording_id": "r3",
        "audio_uri": "s3://b/r3.flac",
        "duration_s": 2.0,
        "segments": [_seg("z", 0.5, 1.0)],
    },
]


def test_read_segments_canonical_equals_the_per_record_path(tmp_path):
    from hubert_ray.corpus import manifest

    uri = _canonical_file(tmp_path / "c.parquet", GOOD_ROWS)
    fast = manifest._canonical_segments(uri, None)
    assert fast is not None  # the column-wise path took it
    assert fast.schema.equals(SEGMENT_SCHEMA)
    assert fast.equals(segment_table(read_manifest(uri)))
    assert read_segments(uri).equals(fast)
    assert fast.column("audio_uri").to_pylist()[:2] == [f"{tmp_path}/audio/r1.opus"] * 2
    assert fast.column("audio_uri")[2].as_py().startswith("path-escape://")
    # without the optional duration column
    no_dur = CANONICAL_SCHEMA.remove(CANONICAL_SCHEMA.get_field_index("duration_s"))
    rows = [{k: v for k, v in r.items() if k != "duration_s"} for r in GOOD_ROWS]
    uri = _canonical_file(tmp_path / "nodur.parquet", rows, no_dur)
    assert manifest._canonical_segments(uri, None).equals(segment_table(read_manifest(uri)))


@pytest.mark.parametrize(
    "change",
    [
        {"recording_id": " "},
        {"audio_uri": ""},
        {"recording_id": "r2"},  # duplicate recording id
        {"segments": [_seg("z", 0.0, 1.0)]},  # duplicate segment id (r3's)
        {"segments": []},
        {"segments": [_seg("", 0.0, 1.0)]},
        {"segments": [_seg("x", -1.0, 1.0)]},
        {"segments": [_seg("x", 0.0, float("inf"))]},
        {"segments": [_seg("x", float("nan"), 1.0)]},
        {"segments": [_seg("x", 2.0, 2.0)]},  # end <= start
        {"duration_s": 0.0},
        {"duration_s": float("nan")},
    ],
)
def test_read_segments_bad_canonical_reports_like_read_manifest(tmp_path, change):
    from hubert_ray.corpus import manifest

    rows = [dict(GOOD_ROWS[0], **change), *GOOD_ROWS[1:]]
    uri = _canonical_file(tmp_path / "bad.parquet", rows)
    assert manifest._canonical_segments(uri, None) is None
    with pytest.raises(ManifestError) as info:
        read_segments(uri)
    assert str(info.value) == manifest_error(uri)


def test_read_segments_other_formats_and_types_take_the_per_record_path(tmp_path):
    from hubert_ray.corpus import manifest

    # float32 times: not exactly canonical, so read (and validated) record by record
    schema = pa.schema(
        [
            ("recording_id", pa.string()),
            ("audio_uri", pa.string()),
            (
                "segments",
                pa.list_(
                    pa.struct(
                        [
                            ("segment_id", pa.string()),
                            ("start_s", pa.float32()),
                            ("end_s", pa.float32()),
                        ]
                    )
                ),
            ),
        ]
    )
    rows = [{k: v for k, v in r.items() if k != "duration_s"} for r in GOOD_ROWS]
    uri = _canonical_file(tmp_path / "f32.parquet", rows, schema)
    assert manifest._canonical_segments(uri, None) is None
    assert read_segments(uri).equals(segment_table(read_manifest(uri)))
    jsonl = write_jsonl(tmp_path / "m.jsonl", [{"audio": "a.wav"}])
    assert read_segments(jsonl).equals(segment_table(read_manifest(jsonl)))


# ---------------------------------------------------------------------------------------------
# CLI


def test_prepare_cli_writes_canonical(tmp_path, capsys):
    uri = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "id": "r1",
                "audio": "a.wav",
                "segments": [
                    {"id": "s1", "start_s": 0, "end_s": 1},
                    {"id": "s2", "start_s": 1, "end_s": None},
                ],
            },
            {"audio": "b.wav"},
        ],
    )
    out = tmp_path / "out" / "canon.parquet"
    assert prepare.main(["--manifest", uri, "--output", str(out), "--storage-options", "{}"]) == 0
    assert f"wrote 2 recordings, 3 segments to {out}" in capsys.readouterr().out
    assert pq.read_table(out).schema.equals(CANONICAL_SCHEMA)
    assert read_manifest(str(out)) == read_manifest(uri)


def test_prepare_cli_bad_manifest(tmp_path, capsys):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"id": "r1"}])
    out = tmp_path / "canon.parquet"
    assert prepare.main(["--manifest", uri, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "m.jsonl:1: field 'audio': missing" in err
    assert not out.exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_prepare_cli_bad_storage_options(tmp_path, capsys, text):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav"}])
    args = ["--manifest", uri, "--output", str(tmp_path / "o.parquet"), "--storage-options", text]
    assert prepare.main(args) == 2
    assert "--storage-options" in capsys.readouterr().err
