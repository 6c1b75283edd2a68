"""Deferred requests (store-and-forward): a request that may only go to the cloud, marked
deferrable, arriving while the cloud is unreachable is accepted with 202 and an id, kept durably
and redacted (SQLite file on one machine, Redis for a fleet), sent by a background worker when
the cloud is back (claimed atomically: one replica sends it), and its answer fetched with
`GET /v1/deferred/{id}` or POSTed to a callback URL on loopback or an allowed host.

    plan.py     which requests are deferred (pure), the callback URL check
    job.py      one deferred request as stored, its vault sealed with AES-GCM
    queue.py    the seam: submit, claim, finish, release, get
    sqlite.py   the embedded queue (a file under the state dir: survives a restart)
    redis.py    the shared queue (a hash per job, a sorted set of due ids, Lua to claim)
    worker.py   sends due jobs when a target of theirs is reachable, delivers callbacks
    service.py  what the API and the gateway's lifecycle call
"""
