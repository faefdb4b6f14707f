-- Events are deduplicated on (run_seq, status) instead of (message_id, status).
--
-- Why: in WAL mode every commit writes each page it touched, whole, and syncs them. Message ids
-- are random, so each new event touched its own leaf of the (message_id, status) index: about
-- 27 of the 74 pages a batch of 25 callbacks wrote. A run's seq grows with arrival, and a run's
-- events arrive while it is recent, so the same index keyed by seq touches the last few leaves
-- only: 50 pages a batch. The run is found by message_id once, through runs' own index, which a
-- batch reads anyway. SQLite only: PostgreSQL logs an index insert as a small record, not as a
-- page, and has no 0007. (SQLite has no 0006, PostgreSQL's batch statement.)
--
-- A table constraint cannot be dropped in SQLite, so the table is rebuilt, keeping every id.
-- Every event has its run (both are written, and deleted, in one transaction); an event
-- without one would fail this migration on `run_seq not null` rather than be dropped.
--
-- One way only: an earlier release cannot write this table (it inserts without run_seq and
-- names the old conflict target). To go back past this migration, restore the backup taken
-- before the upgrade (docs/operations.md).
create table events_by_run (
    id                    integer primary key,
    run_seq               integer not null,
    message_id            text not null,
    status                text not null,
    received_at           text not null,
    last_received_at      text not null,
    payload               text not null,
    body_sha256           blob not null check (length(body_sha256) = 32),
    key_id                text not null,
    duplicates            integer not null default 0,
    differing_duplicates  integer not null default 0,
    payload_pruned        integer not null default 0 check (payload_pruned in (0, 1)),
    constraint events_run_status unique (run_seq, status)
) strict;

insert into events_by_run (id, run_seq, message_id, status, received_at, last_received_at,
                           payload, body_sha256, key_id, duplicates, differing_duplicates,
                           payload_pruned)
select events.id, runs.seq, events.message_id, events.status, events.received_at,
       events.last_received_at, events.payload, events.body_sha256, events.key_id,
       events.duplicates, events.differing_duplicates, events.payload_pruned
from events
left join runs on runs.message_id = events.message_id
order by events.id;

drop table events;
alter table events_by_run rename to events;

create index events_unpruned_received_at on events (received_at) where payload_pruned = 0;
