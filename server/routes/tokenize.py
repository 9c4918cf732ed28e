"""POST /tokenize and POST /detokenize (vLLM's shapes): the server's own tokenizer, so that clients
(lm-evaluation-harness, prompt-length checks) count and build prompts exactly as the engine does."""

from __future__ import annotations

from fastapi import APIRouter

from server.errors import InvalidRequest
from server.routes.deps import APIKey, ERROR_RESPONSES, State
from server.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.serving_chat import render_chat

router = APIRouter(dependencies=[APIKey], tags=["tokenizer"], responses=ERROR_RESPONSES)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, state: State) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template."""
    if body.model is not None:
        state.router.chains_of_model(body.model)  # 404 for an id this server does not serve
    param = "prompt" if body.prompt is not None else "messages"
    text = body.prompt if body.prompt is not None else render_chat(state, body)
    ids = state.encode(text, param, add_bos=None if body.add_special_tokens else False)  # checks UTF-8 too
    if body.add_special_tokens:  # the tokenizer's own post-processor (a BOS, if it has one)
        ids = state.tokenizer.hf.encode(text, add_special_tokens=True).ids
    strs = [state.tokenizer.hf.id_to_token(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    """The text of token ids (special tokens included, so that tokenize -> detokenize round-trips)."""
    if body.model is not None:
        state.router.chains_of_model(body.model)
    vocab = state.cfg.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise InvalidRequest(f"tokens must be in 0..{vocab - 1}", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens, skip_special_tokens=False))
