"""How many pages a SQLite commit writes, per batch of 25 callbacks, and which B-trees they
belong to: a model of the writer's statements (src/store/sqlite/batch.rs) on the real schema,
with the bench's mix (a run's terminal callback 256 runs after its `processing`, a fifth of
the callbacks repeated, random message ids).

    python3 bench/sqlite_wal_pages.py run-seq 100000      # the schema as it is (migration 0007)
    python3 bench/sqlite_wal_pages.py message-id 100000   # events keyed by message_id (before 0007)

In WAL mode a commit appends every page it changed, whole, and syncs them: this counts the
frames each commit appended, and, over the last 200 batches, whose pages they were (`dbstat`).
Python's sqlite3 stands in for the service; the statements and schema are the service's.
"""
import sqlite3, os, uuid, random, json, sys, glob, hashlib, datetime, tempfile
variant = sys.argv[1] if len(sys.argv) > 1 else "run-seq"
assert variant in ("run-seq", "message-id"), "run-seq or message-id"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200000
workdir = tempfile.mkdtemp()
path = os.path.join(workdir, "pages.db")
db = sqlite3.connect(path, isolation_level=None)
db.execute("pragma journal_mode=wal"); db.execute("pragma synchronous=full"); db.execute("pragma wal_autocheckpoint=0")
here = os.path.dirname(os.path.abspath(__file__))
for f in sorted(glob.glob(os.path.join(here, "..", "migrations", "sqlite", "*.sql"))):
    if variant == "message-id" and os.path.basename(f) >= "0007":
        break
    db.executescript(open(f).read())
rnd = random.Random(1)
runs = []; inprog = []; sent = []
def now(): return datetime.datetime.utcnow().isoformat(timespec="microseconds") + "Z"
def body(mid, status):
    d = {"workflow_id": "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", "message_id": mid, "status": status, "expires_at": 1800000000}
    if status == "success": d.update(success=True, result={"patient":"Jane Doe","claims":3,"approved":True,"total":12.5}, assets="https://assets.example.invalid/%s/assets.zip?X-Amz-Expires=604800" % mid)
    if status == "failed": d.update(success=False, error="TimeoutError: the portal did not answer within 30 s")
    return json.dumps(d)
def gen():
    if sent and rnd.random() < 0.2:
        return sent[-1 - rnd.randrange(min(len(sent), 512))]
    if len(inprog) >= 256:
        mid = inprog.pop(0); st = "success" if rnd.random() < 0.8 else "failed"
    else:
        mid = str(uuid.UUID(int=rnd.getrandbits(128), version=4)); inprog.append(mid); st = "processing"
    c = (mid, st, body(mid, st)); sent.append(c); return c
rank = {"processing": 1, "success": 2, "failed": 2}
wal = path + "-wal"
frames = []
B = 25
for b in range(N // B):
    batch = [gen() for _ in range(B)]
    size0 = os.path.getsize(wal) if os.path.exists(wal) else 0
    db.execute("begin immediate")
    for mid, st, bd in batch:
        t = now()
        seq = None
        if variant == "run-seq":
            r = db.execute("select seq from runs where message_id=?", (mid,)).fetchone()
            if r is None:
                db.execute("insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at) values (?,?,?,?,?,?)",
                           (mid, "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", st, rank[st], t, t))
                seq = db.execute("select last_insert_rowid()").fetchone()[0]
            else: seq = r[0]
            cur = db.execute("insert into events (run_seq, message_id, status, received_at, last_received_at, payload, body_sha256, key_id) values (?,?,?,?,?,?,?,?) on conflict (run_seq, status) do nothing",
                       (seq, mid, st, t, t, bd, hashlib.sha256(bd.encode()).digest(), "k1"))
        else:
            cur = db.execute("insert into events (message_id, status, received_at, last_received_at, payload, body_sha256, key_id) values (?,?,?,?,?,?,?) on conflict (message_id, status) do nothing",
                       (mid, st, t, t, bd, hashlib.sha256(bd.encode()).digest(), "k1"))
        if cur.rowcount == 0:
            if variant == "run-seq":
                db.execute("update events set duplicates = duplicates + 1, last_received_at = max(last_received_at, ?) where run_seq=? and status=? returning id", (t, seq, st)).fetchall()
            else:
                db.execute("update events set duplicates = duplicates + 1, last_received_at = max(last_received_at, ?) where message_id=? and status=? returning id", (t, mid, st)).fetchall()
            continue
        r = db.execute("select status_rank from runs where message_id=?", (mid,)).fetchone()
        if r is not None and r[0] >= rank[st] and st == "processing": continue
        term = st != "processing"
        db.execute("""insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at, completed_at, expires_at, result, assets_url, error)
          values (?,?,?,?,?,?,?,?,?,?,?) on conflict (message_id) do update set workflow_id=excluded.workflow_id, status=excluded.status, status_rank=excluded.status_rank,
          created_at=excluded.created_at, updated_at=excluded.updated_at, completed_at=excluded.completed_at, expires_at=excluded.expires_at, result=excluded.result,
          assets_url=excluded.assets_url, error=excluded.error""",
          (mid, "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", st, rank[st], t, t, t if term else None, "2027-01-01T00:00:00Z",
           '{"patient":"Jane Doe","claims":3,"approved":true,"total":12.5}' if st == "success" else None,
           "https://assets.example.invalid/x/assets.zip" if st == "success" else None, "TimeoutError" if st == "failed" else None))
    db.execute("commit")
    frames.append((os.path.getsize(wal) - size0) / (4096 + 24))
    if b == N // B - 201:
        db.execute("pragma wal_checkpoint(truncate)")
tail = frames[-2000:]
print(variant, "callbacks", N, "pages written per commit, mean of the last 2,000: %.1f" % (sum(tail)/len(tail)))
import struct, collections
owner = dict((p, n) for n, p in db.execute("select name, pageno from dbstat"))
walb = open(wal, "rb").read()
off = 32; cnt = collections.Counter(); commits = 0
while off + 24 <= len(walb):
    pg, commit = struct.unpack(">II", walb[off:off+8])
    cnt[owner.get(pg, "?")] += 1
    if commit: commits += 1
    off += 24 + 4096
for k, v in cnt.most_common(): print("   %-35s %.1f" % (k, v / max(commits, 1)))
print("(per commit, over the last %d commits)" % commits)
db.close()
for f in glob.glob(path + "*"): os.remove(f)
os.rmdir(workdir)
