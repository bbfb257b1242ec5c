"""DuckDB: schema, the exactly-once sink, rollups, retention, Parquet export, read-only
queries, and the HTTP API served by the process that owns the file."""
