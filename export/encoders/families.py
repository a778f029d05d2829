"""The encoder families lmrt exports, as declarations: where each keeps its weights and how it reads
its config. One builder (``graph``) writes the graph of every family from these.

BERT, RoBERTa (with XLM-R and CamemBERT) and DistilBERT are the same post-norm transformer: token
and position embeddings with a LayerNorm, then per layer self-attention and a GELU MLP, each added
to its input and normalized. They differ in weight names, where positions start, which config
attribute names the activation, and the classification head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class HeadLayer:
    """One linear layer of a classification head, applied to the first token's hidden state (or to
    the previous head layer): ``weights`` is its state-dict prefix in the *ForSequenceClassification
    model ("{base}" stands for the base model's prefix); ``activation`` follows it ("" for none)."""

    weights: str
    activation: str = ""


@dataclass(frozen=True)
class EncoderFamily:
    family: str
    model_types: tuple[str, ...]
    # State-dict prefixes inside the base model; "{i}" is the layer index.
    layer: str
    query: str
    key: str
    value: str
    attention_output: str
    attention_norm: str
    mlp_in: str
    mlp_out: str
    mlp_norm: str
    head: tuple[HeadLayer, ...]
    word_embeddings: str = "embeddings.word_embeddings"
    position_embeddings: str = "embeddings.position_embeddings"
    token_type_embeddings: str = "embeddings.token_type_embeddings"  # "" when the family has none
    embeddings_norm: str = "embeddings.LayerNorm"
    activation_attribute: str = "hidden_act"  # the config attribute naming the MLP's activation
    norm_eps_attribute: str = "layer_norm_eps"  # "" when the family fixes it at 1e-12
    positions_after_padding: bool = False  # positions start at padding_idx + 1 (RoBERTa)


BERT = EncoderFamily(
    family="bert",
    model_types=("bert",),
    layer="encoder.layer.{i}",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    attention_norm="attention.output.LayerNorm",
    mlp_in="intermediate.dense",
    mlp_out="output.dense",
    mlp_norm="output.LayerNorm",
    head=(HeadLayer("{base}.pooler.dense", "tanh"), HeadLayer("classifier")),
)

# RoBERTa is BERT with positions counted from padding_idx + 1 and a head of its own.
ROBERTA = replace(
    BERT,
    family="roberta",
    model_types=("roberta", "xlm-roberta", "camembert"),
    head=(HeadLayer("classifier.dense", "tanh"), HeadLayer("classifier.out_proj")),
    positions_after_padding=True,
)

DISTILBERT = EncoderFamily(
    family="distilbert",
    model_types=("distilbert",),
    layer="transformer.layer.{i}",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attention_output="attention.out_lin",
    attention_norm="sa_layer_norm",
    mlp_in="ffn.lin1",
    mlp_out="ffn.lin2",
    mlp_norm="output_layer_norm",
    head=(HeadLayer("pre_classifier", "relu"), HeadLayer("classifier")),
    token_type_embeddings="",
    activation_attribute="activation",
    norm_eps_attribute="",
)

FAMILIES: dict[str, EncoderFamily] = {t: f for f in (BERT, ROBERTA, DISTILBERT) for t in f.model_types}


def takes_token_types(family: EncoderFamily, config) -> bool:
    """Whether the graph takes token_type_ids: a family with token types, and more than one of them
    (BERT's sentence pairs: 0 for the first text, 1 for the second)."""
    return bool(family.token_type_embeddings) and int(getattr(config, "type_vocab_size", 1)) > 1


def family_for(model_type: str) -> EncoderFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"encoder architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(FAMILIES))}"
        ) from None
