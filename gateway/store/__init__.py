"""Where state shared between requests (and replicas) lives: conversation vaults, rate-limit
buckets, fleet-wide switches. `build_store` picks the backend from the policy's `state:` section:
embedded (in this process, the default) or Redis (several replicas)."""

from gateway.store.base import StateStore, StoreUnavailable
from gateway.store.build import build_store

__all__ = ["StateStore", "StoreUnavailable", "build_store"]
