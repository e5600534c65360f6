"""The stages, each running its heavy work on Ray with the resources its config section names:
`profile` (a task per block), `plan` (the scheduler in a task), `generate` (an actor pool writing
Parquet shards), `fid` (an actor pool reducing images to feature statistics), `compare`
(sequential vs plans on the same noise, for the report)."""
