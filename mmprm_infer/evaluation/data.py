"""Benchmark files as their releases ship them, read by the one record reader (``mmprm_infer.io.data``):
JSONL, JSON (a list, or {"split": [...]}), Parquet, Arrow; one file per split, a folder of them, Hugging Face
shards (``gsm8k-00000-of-00001.parquet`` is split ``gsm8k``) or a ``datasets.save_to_disk`` folder.  Every
record keeps where it came from (file, line or row) so a bad one is named by place and field."""

from mmprm_infer.io.data import SUFFIXES, DataError, Record, field, read_records, read_splits, string_list

__all__ = ["Record", "BenchmarkDataError", "read_records", "read_splits", "field", "string_list", "SUFFIXES"]

BenchmarkDataError = DataError  # the name the evaluation code raises and catches
