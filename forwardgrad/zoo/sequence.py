"""Sequence and miscellaneous models in plain ``torch.nn``: ``nn.Transformer``, recurrent language
models (packed sequences too), Conv1d/GroupNorm and InstanceNorm nets, weight-normalised layers,
``nn.EmbeddingBag`` and activation checkpointing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

from forwardgrad.zoo.convnets import image_batch
from forwardgrad.zoo.losses import classification_loss, language_model_loss, next_token_loss
from forwardgrad.zoo.registry import ZooCase, pick, register

NUM_CLASSES = 10
PAD = 0  # the padding token of every token batch here


def token_batch(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length))


# --- Transformers from torch.nn ----------------------------------------------------------------


class Seq2SeqTransformer(nn.Module):
    """``nn.Transformer`` translation model: padded source, causal target, tied output layer."""

    def __init__(self, vocab, d_model, heads, layers, length):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)  # tied: logits of order 1
        self.position = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.transformer = nn.Transformer(
            d_model, heads, layers, layers, 4 * d_model, dropout=0.1, batch_first=True
        )

    def forward(self, source, target):
        length = target.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=self.position.dtype)
        out = self.transformer(
            self.embedding(source) + self.position[: source.shape[1]],
            self.embedding(target) + self.position[:length],
            tgt_mask=mask,
            src_key_padding_mask=source == PAD,
            memory_key_padding_mask=source == PAD,
            tgt_is_causal=True,
        )
        return out @ self.embedding.weight.T


def seq2seq_loss(model, batch):
    source, target = batch
    return next_token_loss(model(source, target), target)


def build_seq2seq(size):
    d_model, layers, batch, length = pick(size, (32, 1, 2, 12), (128, 2, 8, 32))
    vocab = 500
    source = token_batch(batch, length, vocab)
    source[1, length // 2 :] = PAD  # one padded sentence
    return Seq2SeqTransformer(vocab, d_model, 4, layers, length), (
        source,
        token_batch(batch, length, vocab),
    )


class EncoderLM(nn.Module):
    """Causal language model on ``nn.TransformerEncoder`` (pre-norm, GELU)."""

    def __init__(self, vocab, d_model, heads, layers, length):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(length, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, 0.1, "gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=self.position.dtype)
        x = self.embedding(tokens) + self.position[:length]
        return self.head(self.encoder(x, mask=mask, is_causal=True))


def build_encoder_lm(size):
    d_model, layers, batch, length = pick(size, (32, 1, 2, 12), (128, 2, 8, 64))
    return EncoderLM(500, d_model, 4, layers, length), (token_batch(batch, length, 500),)


# --- Recurrent language models ---------------------------------------------------------------


class RecurrentLM(nn.Module):
    def __init__(self, cell, vocab, hidden, layers):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.rnn = cell(hidden, hidden, layers, batch_first=True, dropout=0.1)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        out, _ = self.rnn(self.embedding(tokens))
        return self.head(out)


def recurrent_builder(cell):
    def build(size):
        hidden, batch, length = pick(size, (32, 2, 8), (256, 16, 48))
        return RecurrentLM(cell, 1000, hidden, 2), (token_batch(batch, length, 1000),)

    return build


class PackedClassifier(nn.Module):
    """LSTM sentence classifier over variable-length sentences, run as a packed sequence."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden, padding_idx=PAD)
        self.rnn = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(
            self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def packed_loss(model, batch):
    tokens, lengths, labels = batch
    return F.cross_entropy(model(tokens, lengths), labels)


def build_packed(size):
    hidden, batch, length = pick(size, (32, 3, 8), (256, 32, 64))
    tokens = token_batch(batch, length, 1000)
    lengths = torch.randint(length // 2, length + 1, (batch,))
    lengths[0] = length
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n:] = PAD
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    return PackedClassifier(1000, hidden), (tokens, lengths, labels)


# --- Normalisation layers, weight norm, EmbeddingBag, checkpointing ---------------------------


def build_conv1d(size):
    width, batch, length = pick(size, (8, 2, 256), (32, 8, 16000))
    layers, cin = [], 1
    for i in range(4):
        cout = width * 2**i
        layers += [
            nn.Conv1d(cin, cout, 9 if i == 0 else 3, 4 if i == 0 else 1, padding=1),
            nn.GroupNorm(4, cout),
            nn.GELU(),
            nn.MaxPool1d(2),
        ]
        cin = cout
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(1), nn.Linear(cin, NUM_CLASSES)
    )
    return model, (torch.randn(batch, 1, length), torch.randint(0, NUM_CLASSES, (batch,)))


def build_instance_norm(size):
    width, batch, resolution = pick(size, (8, 2, 16), (32, 8, 64))

    def stage(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.InstanceNorm2d(cout, affine=True), nn.ReLU()]

    model = nn.Sequential(
        *stage(3, width, 1),
        *stage(width, 2 * width, 2),
        *stage(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(4 * width, NUM_CLASSES),
    )
    return model, image_batch(batch, resolution)


def build_weight_norm(size):
    width, batch, resolution = pick(size, (8, 2, 16), (32, 16, 64))
    model = nn.Sequential(
        weight_norm(nn.Conv2d(3, width, 3, 1, 1)),
        nn.ReLU(),
        nn.MaxPool2d(2),
        weight_norm(nn.Conv2d(width, 2 * width, 3, 1, 1)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(1),
        weight_norm(nn.Linear(32 * width, 128)),
        nn.ReLU(),
        weight_norm(nn.Linear(128, NUM_CLASSES)),
    )
    return model, image_batch(batch, resolution)


class BagClassifier(nn.Module):
    """fastText-style text classifier: the mean of a sentence's word vectors, then an MLP."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, NUM_CLASSES))

    def forward(self, tokens, offsets):
        return self.head(self.bag(tokens, offsets))


def bag_loss(model, batch):
    tokens, offsets, labels = batch
    return F.cross_entropy(model(tokens, offsets), labels)


def build_embedding_bag(size):
    vocab, dim, batch, words = pick(size, (500, 16, 4, 40), (20_000, 128, 256, 50_000))
    offsets = torch.sort(torch.randperm(words - 1)[: batch - 1] + 1).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), offsets])
    tokens = torch.randint(0, vocab, (words,))
    return BagClassifier(vocab, dim), (tokens, offsets, torch.randint(0, NUM_CLASSES, (batch,)))


class CheckpointedMLP(nn.Module):
    """Residual MLP blocks under ``torch.utils.checkpoint`` (recomputed in backward)."""

    def __init__(self, dim, blocks):
        super().__init__()
        self.stem = nn.Linear(3 * 32 * 32, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        x = self.stem(x.flatten(1))
        for block in self.blocks:
            x = x + checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def build_checkpointed(size):
    dim, blocks, batch = pick(size, (32, 2, 2), (256, 4, 256))
    return CheckpointedMLP(dim, blocks), image_batch(batch, 32)


for _case in [
    ZooCase(
        "nn-transformer",
        "torch.nn",
        build_seq2seq,
        seq2seq_loss,
        description="nn.Transformer seq2seq, padded source",
    ),
    ZooCase(
        "nn-encoder-lm",
        "torch.nn",
        build_encoder_lm,
        language_model_loss,
        description="nn.TransformerEncoder causal LM",
    ),
    ZooCase(
        "lstm-lm",
        "recurrent",
        recurrent_builder(nn.LSTM),
        language_model_loss,
        description="2-layer nn.LSTM language model",
    ),
    ZooCase(
        "gru-lm",
        "recurrent",
        recurrent_builder(nn.GRU),
        language_model_loss,
        description="2-layer nn.GRU language model",
    ),
    ZooCase(
        "lstm-packed",
        "recurrent",
        build_packed,
        packed_loss,
        description="nn.LSTM classifier on packed sequences",
    ),
    ZooCase(
        "conv1d-groupnorm",
        "torch.nn",
        build_conv1d,
        classification_loss,
        description="Conv1d, GroupNorm, GELU, MaxPool1d",
    ),
    ZooCase(
        "instancenorm",
        "torch.nn",
        build_instance_norm,
        classification_loss,
        description="Conv2d, InstanceNorm2d (affine)",
    ),
    ZooCase(
        "weight-norm",
        "torch.nn",
        build_weight_norm,
        classification_loss,
        description="parametrizations.weight_norm CNN",
    ),
    ZooCase(
        "embedding-bag",
        "torch.nn",
        build_embedding_bag,
        bag_loss,
        description="nn.EmbeddingBag text classifier",
    ),
    ZooCase(
        "checkpointed-mlp",
        "torch.nn",
        build_checkpointed,
        classification_loss,
        description="torch.utils.checkpoint residual MLP",
    ),
]:
    register(_case)
