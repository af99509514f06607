-- The poller's claim (DESIGN.md §5) skips a pending request while another request of
-- the same tenancy is in flight. This index answers "is one in flight?" with one probe
-- per candidate, where a scan of every in-flight row would otherwise be needed.
create index if not exists "OutgoingRequest_in_flight_key_idx"
    on "OutgoingRequest" ("deduplicationKey") where "startedFulfillingAt" is not null;
