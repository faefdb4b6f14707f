-- Retention: payloads of old terminal runs are pruned, old terminal runs and rejected payloads
-- are deleted, in small batches (src/retention/). The same columns and indexes as
-- migrations/postgres/0004_retention.sql.

-- A pruned event keeps (message_id, status) and body_sha256, which is all deduplication reads,
-- so a late redelivery is still a duplicate; its payload becomes ''. A flag rather than a null
-- payload: SQLite cannot drop the not-null constraint without rebuilding the table, and adding a
-- column with a constant default rewrites nothing.
alter table events add column payload_pruned integer not null default 0
    check (payload_pruned in (0, 1));

-- Events not yet pruned, oldest arrival first: the payload sweep walks this from the start, and
-- pruned events leave it. The sweep's condition is written `payload_pruned = 0`, as here, so
-- that SQLite uses this partial index.
create index events_unpruned_received_at on events (received_at) where payload_pruned = 0;

-- Terminal runs, oldest completion first: the runs sweep walks this from the start.
create index runs_terminal_completed_at on runs (completed_at) where status_rank = 2;

-- Rejected payloads, oldest first.
create index rejected_payloads_received_at on rejected_payloads (received_at);
