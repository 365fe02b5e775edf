"""Every Redis key, stream and channel name, in one place.

This module is part of the wire contract: the gateway imports it (stdlib only, no torch) so both
sides agree on names. Templates take `.format(...)` arguments.
"""

from __future__ import annotations

PREFIX = "selprune"

# Long work (unlearning, evaluation): a stream consumed by one consumer group. Each entry holds only a
# job id; the job itself lives in its hash. Unacked entries of a dead worker are reclaimed (XAUTOCLAIM).
JOB_STREAM = f"{PREFIX}:jobs"
JOB_GROUP = f"{PREFIX}:job-workers"

# Hash of one job; its fields and their encoding are protocol/job_hash.py's JobHash.
JOB_KEY = PREFIX + ":job:{job_id}"
# List of completed step reports (JSON), step 0 first: the metrics trajectory and the resume point.
JOB_STEPS_KEY = PREFIX + ":job:{job_id}:steps"
# Safetensors bytes of the mask after the last completed step, for resuming after a crash.
JOB_CHECKPOINT_KEY = PREFIX + ":job:{job_id}:checkpoint"
# Lease: the id of the worker running the job, with a TTL the worker keeps extending. SET NX on it is
# what guarantees a job never runs on two workers at once.
JOB_LEASE_KEY = PREFIX + ":job:{job_id}:lease"
# Stream of progress events of one job, for server-sent events.
JOB_EVENTS_KEY = PREFIX + ":job:{job_id}:events"
# Sorted sets (score = creation time) of a tenant's job ids, and of every job id.
TENANT_JOBS_KEY = PREFIX + ":tenant:{tenant}:jobs"
ALL_JOBS_KEY = f"{PREFIX}:jobs:all"
# Idempotency: maps (tenant, key) to the job id created first with that key.
IDEMPOTENCY_KEY = PREFIX + ":idem:{tenant}:{key}"
# Jobs that failed more than the retry cap; a list of job ids, newest first.
DEAD_LETTER_KEY = f"{PREFIX}:dead-letter"

# Masks: immutable, content-addressed. The hash holds `bits` (safetensors bytes) and `meta` (JSON).
MASK_KEY = PREFIX + ":mask:{mask_id}"
TENANT_MASKS_KEY = PREFIX + ":tenant:{tenant}:masks"  # sorted set of mask ids the tenant may see

# Workers announce themselves with a TTL'd key; /readyz looks for any.
WORKER_HEARTBEAT_KEY = PREFIX + ":worker:{worker_id}"
WORKER_HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"

# Durations for /metrics: lists of recent seconds, trimmed to a fixed length.
JOB_DURATIONS_KEY = f"{PREFIX}:stats:job-seconds"
STEP_DURATIONS_KEY = f"{PREFIX}:stats:step-seconds"
DURATIONS_KEPT = 1000

# Added with the job queue (worker/consumer.py, worker/store.py) -------------------------------------
# Set of tenants that hold a mask; its data is deleted when the last one lets go.
MASK_TENANTS_KEY = MASK_KEY + ":tenants"
# Approximate cap (XADD MAXLEN ~) on one job's events stream.
JOB_EVENTS_MAXLEN = 1000

# Serving lane (worker/serving.py, service/serving_client.py) -------------------------------------
# Generation requests: a stream consumed by the serving workers' group. Each entry holds one request
# as JSON (protocol.GenerateTask) in the field "task". Entries are acked and deleted as they are read:
# generation is latency-bound, so a request whose worker dies is answered 504 by the gateway, not retried.
GENERATE_STREAM = f"{PREFIX}:generate"
GENERATE_GROUP = f"{PREFIX}:generate-workers"
GENERATE_STREAM_MAXLEN = 10_000  # unread requests; the gateway answers 503 past it (nothing is trimmed)
# The list a worker RPUSHes one request's reply events onto (protocol.GenerateEvent JSON); the gateway
# BLPOPs it. Every push refreshes its TTL, so a reply nobody reads disappears on its own.
GENERATE_REPLY_KEY = PREFIX + ":generate:{request_id}:reply"
GENERATE_REPLY_TTL_S = 120
# Serving workers announce themselves with a TTL'd key (JSON: worker_id, models, at).
SERVER_HEARTBEAT_KEY = PREFIX + ":server:{worker_id}"
SERVER_HEARTBEAT_PATTERN = f"{PREFIX}:server:*"
# Recent serving batches for /metrics: seconds in the model and rows per batch (lists, newest first,
# trimmed to DURATIONS_KEPT like the job durations).
GENERATE_BATCH_SECONDS_KEY = f"{PREFIX}:stats:generate-batch-seconds"
GENERATE_BATCH_ROWS_KEY = f"{PREFIX}:stats:generate-batch-rows"

# Per-job plots (worker/plots.py, GET /v1/jobs/{id}/plot) ------------------------------------------
# PNG bytes of a prune job's forget-vs-retain trade-off, re-rendered after every completed step; it
# expires with the job's other keys.
JOB_PLOT_KEY = PREFIX + ":job:{job_id}:plot"

# Fair job admission (protocol/scripts.py) ----------------------------------------------------------
# A job stream entry is a token: "one job is waiting". Which job a worker runs is chosen when it takes
# the token: the first queued job of the tenant served least recently, so one tenant's backlog never
# delays another tenant's next job by more than one job per worker.
TENANT_QUEUE_KEY = PREFIX + ":tenant:{tenant}:queue"  # list of the tenant's queued job ids, oldest first
TENANTS_WAITING_KEY = f"{PREFIX}:tenants:waiting"  # sorted set: tenants with queued jobs, score = last served
TENANTS_SERVED_KEY = f"{PREFIX}:tenants:served"  # hash: tenant -> unix seconds its last job was taken
ENTRY_JOBS_KEY = f"{PREFIX}:jobs:entries"  # hash: stream entry id -> the job it delivered (for reclaims)
# Set of the tenant's unfinished (queued or running) job ids: the per-tenant cap counts these.
TENANT_ACTIVE_KEY = PREFIX + ":tenant:{tenant}:active"
DEAD_LETTER_KEPT = 1000  # the dead-letter list keeps the newest this many job ids

# Per-tenant mask metadata (worker/store.py, service/queue_client.py, scripts.delete_mask) -----------
# JSON of what one tenant's job said about a mask: name, job id, model, params, datasets, metrics. The
# shared `meta` field of MASK_KEY holds only what the bits determine (mask_id, fingerprint, shape,
# size_bytes), so a tenant producing the same bits as another never sees the other's metadata.
TENANT_MASK_META_KEY = PREFIX + ":tenant:{tenant}:mask:{mask_id}:meta"
MASK_SHARED_META = ("mask_id", "fingerprint", "shape", "size_bytes")  # the fields MASK_KEY's meta holds

# Serving-lane tenancy and cancellation (service/serving_client.py, worker/serving.py) ---------------
# Sorted set of one tenant's generation requests in flight: member "<request_id>:<rows>", score = unix
# seconds it expires (refreshed while its reply streams), so a gateway that dies leaks nothing for long.
# The gateway refuses a request (429) that would take the tenant past its row cap.
GENERATE_INFLIGHT_KEY = PREFIX + ":generate:tenant:{tenant}:inflight"
# Sorted set of request ids whose caller went away (disconnect, timeout), score = unix seconds the entry
# expires; serving workers drop those rows between decode steps and skip them if not yet admitted.
GENERATE_CANCELLED_KEY = f"{PREFIX}:generate:cancelled"
GENERATE_CANCEL_TTL_S = 600
