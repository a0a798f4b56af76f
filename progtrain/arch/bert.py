"""BERT (``BertModel``, ``BertForMaskedLM``): post-LayerNorm blocks, learned positions and token
types, an embedding LayerNorm, a pooler, and the MLM transform head whose decoder is tied to the
word embeddings. head_dim = hidden_size / num_attention_heads."""

from .base import TINY_SIZES, ArchAdapter, ConfigOption, P, TinyConfig, hf_size_keys, register_adapter

_TINY = dict(TINY_SIZES, max_position_embeddings=64)

BERT = register_adapter(
    ArchAdapter(
        name="bert",
        model_types=("bert",),
        layers_path="encoder.layer",
        params={
            "embeddings.word_embeddings.weight": P("embed", None, "hidden.out"),
            "embeddings.position_embeddings.weight": P("pos_embed", None, "hidden.out"),
            "embeddings.token_type_embeddings.weight": P("type_embed", None, "hidden.out"),
            "embeddings.LayerNorm.weight": P("embed_norm", "hidden.gain"),
            "embeddings.LayerNorm.bias": P("embed_norm", "hidden.shift"),
            "pooler.dense.weight": P("pooler", "hidden.out", "hidden.in"),
            "pooler.dense.bias": P("pooler", "hidden.out"),
        },
        layer_params={
            "attention.self.query.weight": P("q", "q.out", "hidden.in"),
            "attention.self.query.bias": P("q", "q.out"),
            "attention.self.key.weight": P("k", "k.out", "hidden.in"),
            "attention.self.key.bias": P("k", "k.out"),
            "attention.self.value.weight": P("v", "v.out", "hidden.in"),
            "attention.self.value.bias": P("v", "v.out"),
            "attention.output.dense.weight": P("o", "hidden.out", "o.in"),
            "attention.output.dense.bias": P("o", "hidden.out"),
            "attention.output.LayerNorm.weight": P("norm", "hidden.gain"),
            "attention.output.LayerNorm.bias": P("norm", "hidden.shift"),
            "intermediate.dense.weight": P("up", "ffn.out", "hidden.in"),
            "intermediate.dense.bias": P("up", "ffn.out"),
            "output.dense.weight": P("down", "hidden.out", "ffn.in"),
            "output.dense.bias": P("down", "hidden.out"),
            "output.LayerNorm.weight": P("norm", "hidden.gain"),
            "output.LayerNorm.bias": P("norm", "hidden.shift"),
        },
        head_params={
            "cls.predictions.transform.dense.weight": P("head_transform", "hidden.out", "hidden.in"),
            "cls.predictions.transform.dense.bias": P("head_transform", "hidden.out"),
            "cls.predictions.transform.LayerNorm.weight": P("final_norm", "hidden.gain"),
            "cls.predictions.transform.LayerNorm.bias": P("final_norm", "hidden.shift"),
            "cls.predictions.decoder.weight": P("head", None, "hidden.in"),
            "cls.predictions.bias": P("head_bias", None),
            "cls.predictions.decoder.bias": P("head_bias", None),
        },
        config_keys=hf_size_keys(kv_heads=None, head_dim=None, norm_eps="layer_norm_eps"),
        norm="layernorm",
        pre_norm=False,
        config_options={
            "hidden_act": ConfigOption(
                "any activation: new FFN units write through zero output columns, so f(0) never reaches "
                "the stream"
            ),
            "is_decoder": ConfigOption("causal instead of bidirectional attention mask; same in every layer"),
            "add_cross_attention": ConfigOption(
                "cross-attention blocks (encoder-decoder use) are not described by the bert adapter",
                allowed=(False,),
            ),
            "position_embedding_type": ConfigOption(
                "relative position embeddings (relative_key, relative_key_query) are not computed by "
                "transformers' BertModel, which loads such a checkpoint with absolute positions, and not "
                "described by the bert adapter",
                allowed=("absolute", None),
            ),
        },
        tiny_configs=(
            TinyConfig("mlm-tied", dict(_TINY, tie_word_embeddings=True), task="masked-lm"),
            TinyConfig("mlm-untied", dict(_TINY, tie_word_embeddings=False), task="masked-lm"),
            TinyConfig("decoder", dict(_TINY, is_decoder=True)),  # BertLMHeadModel: causal mask, KV cache
        ),
    )
)
