"""Storage: the files a run leaves behind, on a local disk or any `pyarrow.fs` URI.

`files` (atomic writes, a run's small files), `shards` (Parquet shards and their manifest),
`history` (the speed/quality history table). Knows nothing of Ray or of sampling."""
