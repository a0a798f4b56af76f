"""Tiny random models of every supported family, for tests."""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("gpt2", "bert", "llama", "mistral", "qwen2", "gpt_neox", "gemma", "gemma2", "gemma3_text", "opt", "gptj",
            "roberta", "qwen3", "phi3", "granite", "olmo2", "stablelm")

# family -> (config class, causal/masked LM class, base class, tiny config kwargs, GQA, tied by default): every
# model is 32 wide with 4 heads and 2 layers; ``kv`` and ``bias`` of tiny_model apply where the family has them
_GQA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, num_hidden_layers=2, vocab_size=101)
TABLE = {
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, T.GemmaModel, _GQA, True, True),
    # sliding window 4 (the 64-token probe crosses it), a softcap small enough to bend the scores and logits, an
    # attention scale that is not 1/sqrt(head_dim)
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, T.Gemma2Model,
               dict(_GQA, sliding_window=4, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                    final_logit_softcapping=5.0), True, True),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, T.Gemma3TextModel,
                    dict(_GQA, sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                         layer_types=["sliding_attention", "full_attention"]), True, True),
    "opt": (T.OPTConfig, T.OPTForCausalLM, T.OPTModel,
            dict(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2, vocab_size=101,
                 max_position_embeddings=64), False, True),
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM, T.GPTJModel,
             dict(n_embd=32, n_head=4, n_layer=2, rotary_dim=4, vocab_size=101, n_positions=64, bos_token_id=1,
                  eos_token_id=1), False, False),
    "roberta": (T.RobertaConfig, T.RobertaForMaskedLM, T.RobertaModel,
                dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=101,
                     max_position_embeddings=66), False, True),
}


def table_model(family: str, head: bool = True, seed: int = 0, **config):
    """A perturbed tiny model of a family in :data:`TABLE` with ``config`` overriding its tiny config."""
    Cfg, Head, Base, kw, _, _ = TABLE[family]
    torch.manual_seed(seed)
    return perturb((Head if head else Base)(Cfg(**{**kw, **config}))).eval()

# families built from one config class with llama-like keywords: (config, causal LM, base model, extra
# config keywords, keyword of the bias switch or None); vocab 101 so every special token id fits
LLAMA_LIKE_TINY = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model", dict(head_dim=8), ("attention_bias",)),
    # Granite's multipliers far from 1 (Granite-3 values), so a growth that ignored them would show
    "granite": ("GraniteConfig", "GraniteForCausalLM", "GraniteModel",
                dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                     logits_scaling=8.0), ("attention_bias", "mlp_bias")),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "Olmo2Model", dict(pad_token_id=0, eos_token_id=2), ("attention_bias",)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", "StableLmModel", {}, ("use_qkv_bias",)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3Model", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2), ()),
}


def tiny_model(family: str, head: bool = True, tie: bool | None = None, kv: int = 2, bias: bool = False, seed: int = 0):
    """A 2-layer, hidden-32, 4-head model of ``family`` in eval mode with every parameter perturbed
    (so norm gains/biases are not their trivial init values)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                           tie_word_embeddings=True if tie is None else tie)
        m = (T.GPT2LMHeadModel if head else T.GPT2Model)(cfg)
    elif family == "bert":
        cfg = T.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                           vocab_size=101, max_position_embeddings=64,
                           tie_word_embeddings=True if tie is None else tie)
        m = (T.BertForMaskedLM if head else T.BertModel)(cfg)
    elif family in ("llama", "mistral", "qwen2"):
        Cfg, Head, Base = {
            "llama": (T.LlamaConfig, T.LlamaForCausalLM, T.LlamaModel),
            "mistral": (T.MistralConfig, T.MistralForCausalLM, T.MistralModel),
            "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, T.Qwen2Model),
        }[family]
        extra = dict(attention_bias=bias, mlp_bias=bias) if family == "llama" else {}
        cfg = Cfg(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=64,
                  num_hidden_layers=2, vocab_size=101, tie_word_embeddings=bool(tie), **extra)
        m = (Head if head else Base)(cfg)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                              vocab_size=101, tie_word_embeddings=bool(tie))
        m = (T.GPTNeoXForCausalLM if head else T.GPTNeoXModel)(cfg)
    elif family in TABLE:
        _, _, _, _, gqa, tied = TABLE[family]
        extra = dict(num_key_value_heads=kv, attention_bias=bias) if gqa else {}
        return table_model(family, head, seed, tie_word_embeddings=tied if tie is None else tie, **extra)
    elif family in LLAMA_LIKE_TINY:
        cfg_cls, head_cls, base_cls, extra, bias_keys = LLAMA_LIKE_TINY[family]
        cfg = getattr(T, cfg_cls)(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=64,
                                  num_hidden_layers=2, vocab_size=101, tie_word_embeddings=bool(tie),
                                  **extra, **{k: bias for k in bias_keys})
        m = getattr(T, head_cls if head else base_cls)(cfg)
    else:
        raise ValueError(family)
    return perturb(m).eval()


def perturb(model, scale: float = 0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
