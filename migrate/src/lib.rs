//! Migration engine (stop-and-copy, pre-copy, post-copy, enlightened post-copy). Filled in by the migration-engine issue.
