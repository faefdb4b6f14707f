// The typical Nen callback receiver, written the way Nen's documentation suggests: Fastify, the
// raw body verified with HMAC-SHA256 and crypto.timingSafeEqual, and one transaction per callback
// (insert the event unless (message_id, status) exists, then upsert the run) on a pg pool of 8.
// It exists only as the comparison point for bench/compare.sh.
'use strict';

const crypto = require('node:crypto');
const fastify = require('fastify')({ logger: false, bodyLimit: 1024 * 1024 });
const { Pool } = require('pg');

const secret = (process.env.NEN_WEBHOOK_SECRETS || '').split(',')[0].trim();
if (!secret) {
  console.error('NEN_WEBHOOK_SECRETS is required');
  process.exit(1);
}
const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 8 });

const SCHEMA = `
create table if not exists runs (
  message_id text primary key,
  workflow_id text,
  status text not null,
  status_rank smallint not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  payload jsonb
);
create table if not exists events (
  id bigint generated always as identity primary key,
  message_id text not null,
  status text not null,
  received_at timestamptz not null default now(),
  payload text not null,
  unique (message_id, status)
);`;

const INSERT_EVENT = {
  name: 'insert-event',
  text: `insert into events (message_id, status, payload) values ($1, $2, $3)
         on conflict (message_id, status) do nothing`,
};
const UPSERT_RUN = {
  name: 'upsert-run',
  text: `insert into runs (message_id, workflow_id, status, status_rank, payload)
         values ($1, $2, $3, $4, $5::jsonb)
         on conflict (message_id) do update set
           status = excluded.status, status_rank = excluded.status_rank,
           payload = excluded.payload, updated_at = now()
         where runs.status_rank < excluded.status_rank`,
};

// Keep the exact bytes: the signature covers them, not a re-serialisation.
fastify.addContentTypeParser('*', { parseAs: 'buffer' }, (request, body, done) => done(null, body));
fastify.removeContentTypeParser('application/json');
fastify.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) =>
  done(null, body),
);

function signatureMatches(header, body) {
  if (typeof header !== 'string' || !header.startsWith('sha256=')) return false;
  const given = Buffer.from(header.slice(7), 'hex');
  const expected = crypto.createHmac('sha256', secret).update(body).digest();
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

fastify.post('/webhooks/nen', async (request, reply) => {
  const body = request.body;
  if (!Buffer.isBuffer(body) || !signatureMatches(request.headers['x-hmac-signature'], body)) {
    return reply.code(401).send({ error: 'invalid_signature', message: 'invalid signature' });
  }
  let callback;
  try {
    callback = JSON.parse(body.toString('utf8'));
  } catch {
    return reply.code(400).send({ error: 'invalid_payload', message: 'not JSON' });
  }
  if (typeof callback.message_id !== 'string' || typeof callback.status !== 'string') {
    return reply.code(400).send({ error: 'invalid_payload', message: 'missing fields' });
  }
  const rank = callback.status === 'processing' ? 1 : 2;
  const client = await pool.connect();
  let duplicate;
  try {
    await client.query('begin');
    const inserted = await client.query({
      ...INSERT_EVENT,
      values: [callback.message_id, callback.status, body.toString('utf8')],
    });
    duplicate = inserted.rowCount === 0;
    if (!duplicate) {
      await client.query({
        ...UPSERT_RUN,
        values: [callback.message_id, callback.workflow_id ?? null, callback.status, rank, body.toString('utf8')],
      });
    }
    await client.query('commit');
  } catch (error) {
    await client.query('rollback').catch(() => {});
    client.release();
    return reply.code(503).send({ error: 'unavailable', message: 'store unavailable' });
  }
  client.release();
  return { received: true, duplicate, message_id: callback.message_id, status: callback.status };
});

fastify.get('/healthz', async () => ({ ok: true }));

(async () => {
  await pool.query(SCHEMA);
  const port = Number(process.env.PORT || 8090);
  await fastify.listen({ host: '127.0.0.1', port });
  console.error(`reference receiver listening on 127.0.0.1:${port}`);
})().catch((error) => {
  console.error(error.message);
  process.exit(1);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => fastify.close().then(() => pool.end()).then(() => process.exit(0)));
}
