-- One callback per transaction, as nen-relay's schema stores it: the event (deduplicated on
-- (message_id, status)) and the run's forward-only upsert. Run with -M prepared: PostgreSQL's
-- own ceiling for this write when every callback pays for its own commit.
-- (The body is built with json_build_object: pgbench would read a colon inside a JSON literal
-- as a variable reference.)
\set run random(1, 2000000000)
\set terminal random(0, 1)
begin;
insert into events (message_id, status, received_at, last_received_at, payload, body_sha256, key_id)
values ('pgbench-' || cast(:run as text), case when cast(:terminal as int) = 1 then 'success' else 'processing' end,
        now(), now(),
        json_build_object('workflow_id', '6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f', 'message_id', 'pgbench-' || cast(:run as text),
                          'status', 'success', 'expires_at', 1800000000, 'success', true,
                          'result', json_build_object('patient', 'Jane Doe', 'claims', 7, 'approved', true, 'total', 1234.56),
                          'assets', 'https://assets.example.invalid/a/assets.zip?X-Amz-Expires=604800')::text,
        sha256(convert_to('pgbench-' || cast(:run as text), 'UTF8')), 'k-00000000')
on conflict (message_id, status) do nothing;
insert into runs as r (message_id, workflow_id, status, status_rank, created_at, updated_at, completed_at, result)
values ('pgbench-' || cast(:run as text), '6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f',
        case when cast(:terminal as int) = 1 then 'success' else 'processing' end, 1 + cast(:terminal as int), now(), now(),
        case when cast(:terminal as int) = 1 then now() end,
        case when cast(:terminal as int) = 1 then jsonb_build_object('patient', 'Jane Doe', 'total', 1234.56) end)
on conflict (message_id) do update set
    status = case when excluded.status_rank > r.status_rank then excluded.status else r.status end,
    status_rank = greatest(r.status_rank, excluded.status_rank),
    updated_at = greatest(r.updated_at, excluded.updated_at),
    completed_at = case when excluded.status_rank > r.status_rank then excluded.completed_at else r.completed_at end,
    result = case when excluded.status_rank > r.status_rank then excluded.result else r.result end;
end;
