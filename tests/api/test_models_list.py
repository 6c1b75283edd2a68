"""GET /v1/models answers both SDKs' `models.list()`, each entry valid as that SDK's model type."""

from __future__ import annotations

import anthropic
import openai
from anthropic.types import ModelInfo
from openai.types import Model

from tests.api.conftest import KEY, post
from tests.support.gateway import RunningGateway


def test_both_sdks_list_the_models(gw: RunningGateway) -> None:
    with gw.client() as c:
        raw = c.get("/v1/models", headers={"x-api-key": KEY}).json()
    for entry in raw["data"]:
        ModelInfo.model_validate(entry)
        Model.model_validate(entry)
    claude = anthropic.Anthropic(base_url=gw.base_url, api_key=KEY, max_retries=0)
    ids = [m.id for m in claude.models.list()]  # pages until has_more is false
    assert ids == ["auto", "cloud", "local"]
    gpt = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in gpt.models.list()] == ids
    # an id from the list is a model the Messages API takes
    assert post(gw, "/v1/messages", {"model": ids[2], "max_tokens": 8,
                                     "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
