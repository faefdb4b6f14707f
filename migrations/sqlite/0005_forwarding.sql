-- Forwarding: the same table, indexes and column as migrations/postgres/0005_forwarding.sql, in
-- SQLite's types (times as fixed-width UTC text, see 0001).
create table forward_outbox (
    id               integer primary key autoincrement,
    target           text not null,
    message_id       text not null,
    event_type       text not null,
    run              text not null check (json_valid(run)),
    committed_at     text not null,
    queued_at        text not null,
    state            text not null default 'pending'
                     check (state in ('pending', 'delivered', 'failed')),
    attempts         integer not null default 0,
    next_attempt_at  text not null,
    lease_owner      text,
    lease_until      text,
    last_attempt_at  text,
    last_error       text,
    delivered_at     text
) strict;

create index forward_outbox_pending on forward_outbox (target, next_attempt_at)
    where state = 'pending';
create index forward_outbox_pending_run on forward_outbox (target, message_id, id)
    where state = 'pending';
create index forward_outbox_failed on forward_outbox (target, id) where state = 'failed';
create index forward_outbox_committed on forward_outbox (target, committed_at);

alter table runs add column stuck_queued_at text;
