"""Models from Hugging Face ``transformers``, built from their configs with random weights.

Nothing is downloaded. Each architecture comes with eager and SDPA attention (the config's
``attn_implementation``). ``transformers`` is an optional dependency (the ``zoo`` extra): it is
imported when a case is built, and the cases say why they are unavailable without it.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from forwardgrad.zoo.convnets import image_batch
from forwardgrad.zoo.losses import next_token_loss
from forwardgrad.zoo.registry import ZooCase, pick, register

ATTENTION = ("eager", "sdpa")
VOCAB = 1000
PAD = 0
NUM_CLASSES = 10


def _transformers():
    return importlib.import_module("transformers")


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length))


def _padded(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and an attention mask with the second sentence padded to half its length."""
    tokens = _tokens(batch, length)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    tokens[mask == 0] = PAD
    return tokens, mask


_SPECIAL = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2, use_cache=False)


# --- Causal language models --------------------------------------------------------------------


def causal_lm_loss(model, batch):
    (tokens,) = batch
    return next_token_loss(model(input_ids=tokens).logits, tokens)


def build_gpt2(size, attention, checkpointing=False):
    t = _transformers()
    layers, width, batch, length = pick(size, (1, 32, 2, 12), (2, 128, 8, 64))
    config = t.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=length,
        attn_implementation=attention,
        **_SPECIAL,
    )
    model = t.GPT2LMHeadModel(config)
    if checkpointing:  # renamed in transformers 5.2x; the old name warns there
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    return model, (_tokens(batch, length),)


def _llama_like(size, attention, config_class, model_class, **extra):
    t = _transformers()
    layers, width, batch, length = pick(size, (1, 32, 2, 12), (2, 128, 8, 64))
    config = getattr(t, config_class)(
        hidden_size=width,
        intermediate_size=width * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=length,
        attn_implementation=attention,
        **_SPECIAL,
        **extra,
    )
    return getattr(t, model_class)(config), (_tokens(batch, length),)


def build_llama(size, attention):
    return _llama_like(size, attention, "LlamaConfig", "LlamaForCausalLM")


def build_mistral(size, attention):
    return _llama_like(size, attention, "MistralConfig", "MistralForCausalLM", sliding_window=32)


# --- Encoders and encoder-decoders -------------------------------------------------------------


def sequence_classification_loss(model, batch):
    tokens, mask, labels = batch
    return F.cross_entropy(model(input_ids=tokens, attention_mask=mask).logits, labels)


def build_bert(size, attention):
    t = _transformers()
    layers, width, batch, length = pick(size, (1, 32, 2, 12), (2, 128, 8, 64))
    config = t.BertConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * width,
        vocab_size=VOCAB,
        max_position_embeddings=length,
        num_labels=NUM_CLASSES,
        attn_implementation=attention,
        pad_token_id=PAD,
    )
    tokens, mask = _padded(batch, length)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    return t.BertForSequenceClassification(config), (tokens, mask, labels)


def seq2seq_loss(model, batch):
    source, mask, target = batch
    logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
    return next_token_loss(logits, target)


def build_t5(size, attention):
    t = _transformers()
    layers, width, batch, length = pick(size, (1, 32, 2, 12), (2, 128, 8, 48))
    config = t.T5Config(
        d_model=width,
        d_kv=width // 4,
        d_ff=4 * width,
        num_layers=layers,
        num_heads=4,
        vocab_size=VOCAB,
        decoder_start_token_id=PAD,
        attn_implementation=attention,
        **_SPECIAL,
    )
    source, mask = _padded(batch, length)
    return t.T5ForConditionalGeneration(config), (source, mask, _tokens(batch, length))


def build_bart(size, attention):
    t = _transformers()
    layers, width, batch, length = pick(size, (1, 32, 2, 12), (2, 128, 8, 48))
    config = t.BartConfig(
        d_model=width,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * width,
        decoder_ffn_dim=4 * width,
        vocab_size=VOCAB,
        max_position_embeddings=length,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        attn_implementation=attention,
        **_SPECIAL,
    )
    source, mask = _padded(batch, length)
    return t.BartForConditionalGeneration(config), (source, mask, _tokens(batch, length))


# --- Vision ------------------------------------------------------------------------------------


def image_classification_loss(model, batch):
    images, labels = batch
    return F.cross_entropy(model(pixel_values=images).logits, labels)


def build_vit(size, attention):
    t = _transformers()
    layers, width, batch = pick(size, (1, 32, 2), (4, 128, 8))
    config = t.ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * width,
        num_labels=NUM_CLASSES,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation=attention,
    )
    return t.ViTForImageClassification(config), image_batch(batch, 32)


def _with_attention(build, attention):
    return lambda size: build(size, attention)


# name, builder, loss, description, and the attentions with which a float64 copy is only
# float32-exact: RMSNorm casts to float32 (T5, Llama, Mistral), and so does the eager softmax of
# Llama, Mistral and ViT (softmax(..., dtype=torch.float32)).
_BOTH = ATTENTION
_ARCHITECTURES = [
    ("gpt2", build_gpt2, causal_lm_loss, "GPT-2 (Conv1D layers, learned positions)", ()),
    ("bert", build_bert, sequence_classification_loss, "BERT sentence classifier, padded", ()),
    ("t5", build_t5, seq2seq_loss, "T5 encoder-decoder (RMSNorm, relative positions)", _BOTH),
    ("bart", build_bart, seq2seq_loss, "BART encoder-decoder", ()),
    ("llama", build_llama, causal_lm_loss, "Llama (RMSNorm, RoPE, SwiGLU, GQA)", _BOTH),
    ("mistral", build_mistral, causal_lm_loss, "Mistral (sliding-window attention, GQA)", _BOTH),
    ("hf-vit", build_vit, image_classification_loss, "ViT image classifier", ("eager",)),
]

for _name, _build, _loss, _description, _float32_limited in _ARCHITECTURES:
    for _attention in ATTENTION:
        register(
            ZooCase(
                f"{_name}-{_attention}",
                "transformers",
                _with_attention(_build, _attention),
                _loss,
                requires=("transformers",),
                description=f"{_description}, {_attention} attention",
                float32_limited=_attention in _float32_limited,
            )
        )

register(
    ZooCase(
        "gpt2-checkpointing",
        "transformers",
        lambda size: build_gpt2(size, "eager", checkpointing=True),
        causal_lm_loss,
        requires=("transformers",),
        description="GPT-2 with activation (gradient) checkpointing enabled",
    )
)
