"""Plain Parquet files as shards: one per row group, and errors that name the row of the file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmdist.data.sources import check_labels, resolve


def test_row_groups_are_shards_and_a_bad_label_names_its_row_in_the_file(tmp_path):
    table = pa.table({"sentence": [f"s{i}" for i in range(10)], "label": [0] * 7 + [5] + [0] * 2})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=4)
    source = resolve(str(tmp_path / "f.parquet"))
    assert [s["rows"] for s in source.manifest["shards"]] == [4, 4, 2]  # counted from the footer
    assert source.manifest["total_rows"] == 10 and not source.prepared
    # Row 7 of the file is row 3 of its second row group: the message gives the file's row.
    with pytest.raises(ValueError, match=r"f.parquet' row 7 has label=5, outside \[0, 2\)"):
        check_labels(source, "label", 2, "data.train")
