"""Privacy section of the policy (placeholder: the privacy issue replaces this module)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
