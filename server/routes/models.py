"""GET /v1/models: the base model id and one id per chain count, `<base>:c<k>`."""

from __future__ import annotations

from functools import lru_cache

import torch
from fastapi import APIRouter

from colm_runtime.config import ModelConfig
from colm_runtime.model import CoLMModel

from server.routes.deps import ERROR_RESPONSES, APIKey, State
from server.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", dependencies=[APIKey], tags=["models"],
                   responses={k: ERROR_RESPONSES[k] for k in (401, 503)})


@lru_cache(maxsize=64)
def parameter_count(cfg: ModelConfig, chains: int) -> int:
    """Parameters of the first `chains` chains: counted on the meta device (no memory, exact)."""
    with torch.device("meta"):
        model = CoLMModel(cfg.truncated(chains))
    return sum(p.numel() for p in model.parameters())


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    """Every model id this server answers to, with its chain count and parameter count."""
    base = state.base_name
    cards = [ModelCard(id=mid, root=base, parent=None if mid == base else base, chains=k,
                       max_model_len=state.max_model_len, parameters=parameter_count(state.cfg, k))
             for mid, k in state.router.model_ids()]
    return ModelList(data=cards)
