-- Forwarding: one message per run change and target, written in the transaction that commits the
-- change (src/store/outbox.rs), and kept after delivery for replay until forward.keep_delivered.
create table forward_outbox (
    -- Stable for the message's life: its webhook-id is msg_<id>. Per target, ids grow in commit
    -- order within a run, which is the order a run's messages are sent in.
    id               bigint generated always as identity primary key,
    target           text not null,
    message_id       text not null,
    -- run.status_changed or run.stuck
    event_type       text not null,
    -- The run as GET /v1/runs/{id} showed it right after the change: JSON text, sent as is.
    run              text not null,
    -- The change's commit: the envelope's timestamp, and what replay selects on.
    committed_at     timestamptz not null,
    -- When it was (last) queued: by the change, or again by retry-failed or replay.
    -- forward.max_age counts from here.
    queued_at        timestamptz not null,
    state            text not null default 'pending'
                     check (state in ('pending', 'delivered', 'failed')),
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null,
    -- The replica holding the message while it sends it, and until when.
    lease_owner      uuid,
    lease_until      timestamptz,
    last_attempt_at  timestamptz,
    last_error       text,
    delivered_at     timestamptz
);

-- Pending messages of a target, soonest due first: what a worker claims from (a walk that stops
-- at the first claimable ones), and the soonest retry still to come (when an idle worker looks
-- again).
create index forward_outbox_pending on forward_outbox (target, next_attempt_at)
    where state = 'pending';
-- Order per run: a message waits while an earlier pending one of its run and target exists.
create index forward_outbox_pending_run on forward_outbox (target, message_id, id)
    where state = 'pending';
-- The failed list, newest first, and retry-failed.
create index forward_outbox_failed on forward_outbox (target, id) where state = 'failed';
-- Replay of a window of commits, and pruning old messages.
create index forward_outbox_committed on forward_outbox (target, committed_at);

-- When this run's run.stuck message was queued: it is queued once until the run changes again
-- (updated_at moves past it).
alter table runs add column stuck_queued_at timestamptz;
