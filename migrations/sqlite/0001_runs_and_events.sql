-- Runs, the distinct callbacks (events) that moved them, and signed bodies that were not callbacks.
-- The same tables and rules as migrations/postgres/0001_runs_and_events.sql, in SQLite's types:
-- - times are text in one fixed-width UTC form, 2024-10-30T20:20:00.000000000Z (written by the
--   store, never by SQL): as text they compare and sort in time order, so min()/max() pick the
--   right one, and sqlite3's date functions still read them;
-- - booleans are integers 0 or 1;
-- - JSON is text, kept exactly as it arrived, and checked with json_valid so that reading it back
--   can never fail.
-- Every table is strict: a value bound with the wrong type is refused at once instead of being
-- stored and misread later.

-- One row per run (Nen's message_id). status only moves forward: status_rank is
-- 0 submitted, 1 processing, 2 terminal (any other status), and an update never lowers it.
create table runs (
    -- Listing order (newest first) and keyset cursor. The rowid itself, so that a listing walks
    -- the table in its own order; autoincrement, so that a value is never handed out twice, even
    -- after the newest run is deleted: a page boundary never moves while new runs arrive.
    seq                   integer primary key autoincrement,
    message_id            text not null unique,
    workflow_id           text,
    status                text not null,
    status_rank           integer not null check (status_rank between 0 and 2),
    created_at            text not null,
    updated_at            text not null,
    completed_at          text,
    expires_at            text,
    result                text check (result is null or json_valid(result)),
    assets_url            text,
    error                 text,
    triggered_here        integer not null default 0 check (triggered_here in (0, 1)),
    -- Two different terminal statuses arrived: a provider bug or tampering.
    conflicting_terminals integer not null default 0 check (conflicting_terminals in (0, 1)),
    -- Started through POST /v1/runs: personal data, so only kept when the operator turns it on.
    workflow_params       text check (workflow_params is null or json_valid(workflow_params))
) strict;

-- Filtered listings walk one of these backwards from the cursor.
create index runs_workflow_seq on runs (workflow_id, seq);
create index runs_status_seq on runs (status, seq);

-- One row per distinct (message_id, status). The unique constraint is the deduplication: every
-- write goes through one connection, but a second process on the same file (a migration, an
-- operator's script) still cannot slip a copy in.
create table events (
    -- Arrival order: a plain rowid grows with every insert (only deleting the newest row could
    -- hand its value out again, and events are not deleted).
    id                    integer primary key,
    message_id            text not null,
    status                text not null,
    received_at           text not null,
    last_received_at      text not null,
    -- The exact body Nen signed, byte for byte (it is valid UTF-8, since it parsed as JSON).
    payload               text not null,
    body_sha256           blob not null check (length(body_sha256) = 32),
    -- Non-secret id of the webhook secret that verified it.
    key_id                text not null,
    duplicates            integer not null default 0,
    -- Copies whose body differed from this one.
    differing_duplicates  integer not null default 0,
    conflicting_terminal  integer not null default 0 check (conflicting_terminal in (0, 1)),
    constraint events_message_status unique (message_id, status)
) strict;

-- Signed bodies that were not callbacks, kept for inspection: they are authentic Nen data.
create table rejected_payloads (
    id           integer primary key,
    received_at  text not null,
    key_id       text not null,
    reason       text not null,
    -- blob: the body need not be UTF-8.
    body         blob not null
) strict;

-- Idempotency-Key claims for POST /v1/runs. The request is kept only as a hash: it may carry
-- personal data and secure parameters.
create table idempotency_keys (
    key              text primary key,
    request_sha256   blob not null,
    created_at       text not null,
    expires_at       text not null,
    -- Null while the first request is still talking to Nen.
    response_status  integer,
    response_body    text
) strict;
create index idempotency_keys_expires_at on idempotency_keys (expires_at);
