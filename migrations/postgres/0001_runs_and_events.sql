-- Runs, the distinct callbacks (events) that moved them, and signed bodies that were not callbacks.

-- One row per run (Nen's message_id). status only moves forward: status_rank is
-- 0 submitted, 1 processing, 2 terminal (any other status), and an update never lowers it.
create table runs (
    message_id            text primary key,
    -- Listing order (newest first) and keyset cursor: identity values only grow, so a page
    -- boundary never moves while new runs arrive.
    seq                   bigint generated always as identity unique,
    workflow_id           text,
    status                text not null,
    status_rank           smallint not null check (status_rank between 0 and 2),
    created_at            timestamptz not null,
    updated_at            timestamptz not null,
    completed_at          timestamptz,
    expires_at            timestamptz,
    -- jsonb: the result is queried by operators; the exact bytes stay in events.payload.
    result                jsonb,
    assets_url            text,
    error                 text,
    triggered_here        boolean not null default false,
    -- Two different terminal statuses arrived: a provider bug or tampering.
    conflicting_terminals boolean not null default false
);

-- Filtered listings walk one of these backwards from the cursor.
create index runs_workflow_seq on runs (workflow_id, seq);
create index runs_status_seq on runs (status, seq);

-- One row per distinct (message_id, status). The unique constraint is the deduplication:
-- concurrent copies on any connection or replica race on it, and exactly one inserts.
create table events (
    id                    bigint generated always as identity primary key,
    message_id            text not null,
    status                text not null,
    received_at           timestamptz not null,
    last_received_at      timestamptz not null,
    -- The exact body Nen signed. text, not jsonb: jsonb would reorder keys and drop duplicates.
    payload               text not null,
    body_sha256           bytea not null,
    -- Non-secret id of the webhook secret that verified it.
    key_id                text not null,
    duplicates            bigint not null default 0,
    -- Copies whose body differed from this one.
    differing_duplicates  bigint not null default 0,
    conflicting_terminal  boolean not null default false,
    constraint events_message_status unique (message_id, status)
);

-- Signed bodies that were not callbacks, kept for inspection: they are authentic Nen data.
create table rejected_payloads (
    id           bigint generated always as identity primary key,
    received_at  timestamptz not null,
    key_id       text not null,
    reason       text not null,
    body         bytea not null
);

-- Started through POST /v1/runs: personal data, so only kept when the operator turns it on.
alter table runs add column workflow_params jsonb;

-- Idempotency-Key claims for POST /v1/runs. The request is kept only as a hash: it may carry
-- personal data and secure parameters.
create table idempotency_keys (
    key              text primary key,
    request_sha256   bytea not null,
    created_at       timestamptz not null,
    expires_at       timestamptz not null,
    -- Null while the first request is still talking to Nen.
    response_status  smallint,
    response_body    text
);
create index idempotency_keys_expires_at on idempotency_keys (expires_at);
