-- The poller (DESIGN.md §5) claims requests by setting "startedFulfillingAt" (a lease)
-- and recovers the claims of pollers that died: it looks for leases older than the
-- lease time. This index finds them without scanning the pending rows.
create index if not exists "OutgoingRequest_in_flight_idx"
    on "OutgoingRequest" ("startedFulfillingAt") where "startedFulfillingAt" is not null;
