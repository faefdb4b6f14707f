-- A message is written three times: queued, leased by a claim, and finished. Each new row
-- version that cannot stay on its page is entered again in every index of the table, and
-- logged with each of those entries. Two changes make the middle write, and most of the rest,
-- cheaper:
--
-- 1. Room on every page for the lease. A claim changes only lease_owner and lease_until, which
--    no index holds, so its new version is a heap-only tuple (HOT) when the page has room: one
--    log record and no index entries, instead of one for the row and one per index. New pages
--    are filled to 70 %; existing pages keep their rows as they are.
-- 2. Replay finds its window of commits through a block-range (BRIN) index on committed_at
--    instead of a B-tree (pruning selects on other columns and never used it). Messages are appended roughly in commit order, so the
--    ranges stay narrow; a row's entry costs nothing until its range is summarized, where the
--    B-tree took a new entry for every version of every row.
alter table forward_outbox set (fillfactor = 70);
drop index forward_outbox_committed;
create index forward_outbox_committed on forward_outbox using brin (committed_at);
