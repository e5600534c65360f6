"""Storage: the files a run leaves behind, on a local disk or any `pyarrow.fs` URI.

`files` (atomic writes, a run's small files), `shards` (Parquet shards and their manifest),
`lease` (one writer per output), `history` (the speed/quality history table). Knows nothing of
Ray or of sampling: what made a shard set (its `settings`) is the writer's to define and compare
(`stages.generate.RunIdentity`)."""
