"""The tokenizer of a GGUF file, rebuilt as a Hugging Face `tokenizers` file from its metadata.

Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported, with the pre-tokenizers of
llama.cpp named in `tokenizer.ggml.pre` that we know how to express: `smollm` (every digit split,
then GPT-2's byte-level split), `gpt2`/`default` (GPT-2's split) and `llama-bpe` (Llama-3's split).
Control and user-defined token types become special added tokens (never split, skipped on decode).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from colm_runtime.importers.llama import ImportRefused

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(pre: str, where: str):
    """The `tokenizers` pre-tokenizer equivalent to llama.cpp's named one."""
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in ("gpt2", "gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ImportRefused(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                        "(supported: smollm, gpt2, default, llama-bpe)")


def build_tokenizer(meta: dict, where: str) -> HFTokenizer:
    """A byte-level BPE tokenizer from tokenizer.ggml.{model, pre, tokens, merges, token_type}."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ImportRefused(f"{where}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE 'gpt2')")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ImportRefused(f"{where}: missing {key}")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ImportRefused(f"{where}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), where)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens(special)
    return tok


def special_tokens(meta: dict, tokens: list[str]) -> tuple[dict, dict]:
    """(tokenizer_config subset, generation_config) from the file's special ids.

    End of sequence: the file's eos and eot (end of turn) ids, plus "<|endoftext|>" where it is a
    control token: a model that emits the document separator has ended its text too."""
    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if isinstance(meta.get(k), int) and 0 <= meta[k] < len(tokens)]
    types = meta.get("tokenizer.ggml.token_type") or []
    if "<|endoftext|>" in tokens:
        i = tokens.index("<|endoftext|>")
        if i < len(types) and types[i] == CONTROL:
            eos.append(i)
    eos = list(dict.fromkeys(eos))
    tcfg = {k: v for k, v in (("bos_token", name("tokenizer.ggml.bos_token_id")),
                              ("eos_token", name("tokenizer.ggml.eos_token_id"))) if v is not None}
    tcfg["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return tcfg, ({"eos_token_id": eos} if eos else {})
