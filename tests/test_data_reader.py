"""The one record reader: JSONL, JSON, Parquet and Arrow everywhere a file is read, Hugging Face shards
and split names, the datasets library's save_to_disk folders; bad input named by file, line and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmprm_infer.io.data import DataError, data_files, field, read_records, read_splits, split_name

ROWS = [{"id": i, "problem": f"What is {i} + 1?", "steps": [f"{i} + 1 = {i + 1}."], "label": -1} for i in range(5)]


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("name,split", [("gsm8k-00000-of-00001.parquet", "gsm8k"),
                                        ("train-00003-of-00010-5f2c1a9b3d.parquet", "train"),
                                        ("math.jsonl", "math"), ("olympiad-bench.json", "olympiad-bench")])
def test_split_names_from_file_names(tmp_path, name, split):
    assert split_name(tmp_path / name) == split


def test_shards_are_one_split_and_a_hub_checkout_reads_its_data_folder(tmp_path):
    _parquet(tmp_path / "data" / "gsm8k-00000-of-00002.parquet", ROWS[:2])
    _parquet(tmp_path / "data" / "gsm8k-00001-of-00002.parquet", ROWS[2:4])
    _parquet(tmp_path / "data" / "math-00000-of-00001.parquet", ROWS[4:])
    (tmp_path / "README.md").write_text("dataset card")
    splits = read_splits(tmp_path)  # the checkout's root: its data/ folder
    assert {k: [r.data["id"] for r in v] for k, v in splits.items()} == {"gsm8k": [0, 1, 2, 3], "math": [4]}
    assert splits["gsm8k"][2].where.endswith("gsm8k-00001-of-00002.parquet row 1")


def test_every_file_kind_reads_the_same_records(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"test": ROWS}))
    (tmp_path / "d.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # datasets' to_json: JSON Lines
    _parquet(tmp_path / "e.parquet", ROWS)
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(tmp_path / "g.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    for name in "a.jsonl b.json c.json d.json e.parquet f.arrow g.arrow".split():
        records = list(read_records(tmp_path / name))
        assert [r.data for r in records] == ROWS, name
        assert records[0].path == tmp_path / name


def test_datasets_save_to_disk_layouts(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert list(data_files(tmp_path / "one")) == ["one"]
    assert [r.data for r in read_records(tmp_path / "one")] == ROWS
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(3, 5))}).save_to_disk(
        str(tmp_path / "dict"))
    splits = read_splits(tmp_path / "dict")
    assert {k: [r.data["id"] for r in v] for k, v in splits.items()} == {"train": [0, 1, 2], "test": [3, 4]}


def test_bad_input_is_named_by_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        list(read_records(bad))
    bad.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xcc\xcc\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid UTF-8 \(byte 0xcc"):
        list(read_records(bad))
    (tmp_path / "x.json").write_text('{"a": 1, "b": 2}')
    with pytest.raises(DataError, match=r"x\.json: expected a list of records"):
        list(read_records(tmp_path / "x.json"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not a Parquet file"):
        list(read_records(tmp_path / "broken.parquet"))
    _parquet(tmp_path / "rows.parquet", [{"problem": 3}])
    (rec,) = read_records(tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows\.parquet row 1: field 'problem' must be str, got int"):
        field(rec, "problem", str)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl, .json, .parquet"):
        read_splits(tmp_path / "empty")


def test_outputs_in_the_data_folder_are_not_read(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "report.json").write_text(json.dumps({"benchmark": "processbench"}))
    assert list(read_splits(tmp_path, exclude=[tmp_path / "report.json"])) == ["gsm8k"]
