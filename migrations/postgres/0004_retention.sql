-- Retention: payloads of old terminal runs are pruned, old terminal runs and rejected payloads
-- are deleted, in small batches (src/retention/). These indexes keep each batch a short walk
-- from the oldest row instead of a scan of the table.

-- A pruned event keeps (message_id, status) and body_sha256, which is all deduplication reads,
-- so a late redelivery is still a duplicate; its payload becomes ''. A flag rather than a null
-- payload, so that the column keeps its meaning ("the exact body") and SQLite, which cannot drop
-- a not-null constraint in place, stores the same thing. A constant default adds the column
-- without rewriting the table.
alter table events add column payload_pruned boolean not null default false;

-- Events not yet pruned, oldest arrival first: the payload sweep walks this from the start, and
-- pruned events leave it, so it stays as small as what is still to be pruned.
create index events_unpruned_received_at on events (received_at) where not payload_pruned;

-- Terminal runs, oldest completion first: the runs sweep walks this from the start.
create index runs_terminal_completed_at on runs (completed_at) where status_rank = 2;

-- Rejected payloads, oldest first.
create index rejected_payloads_received_at on rejected_payloads (received_at);
