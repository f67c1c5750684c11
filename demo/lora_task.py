"""The LoRA demo's task: a tiny "pretrained" BERT and a synthetic, seeded text classification task.

No model or data set is downloaded. Instead:

* **A language.** A fixed vocabulary of 1000 word-level tokens: 5 special
  tokens, 4 topics of 40 words each, 40 positive and 40 negative words, and
  755 filler words, all pronounceable pseudo-words drawn from syllables with a
  fixed seed (``LANGUAGE_SEED``), so the vocabulary is the same in every run.
* **Sentences.** 8-16 words: three words of one topic (30 %: plus one of
  another topic), sentiment words, and filler words drawn with Zipf
  frequencies, in random order. A *positive* sentence has two or three
  positive words and (15 %) one negative; *negative* the reverse; *neutral*
  has none, or (30 %) one of each. 3 % of the sentiment labels are redrawn at
  random (label noise).
* **Pretraining.** :func:`create_base_model` trains a small BERT (hidden 64,
  2 layers, 4 heads, ~140 k weights) from scratch for a few hundred steps to
  *tag* which word categories a sentence mentions (multi-label over the four
  topics, positive and negative; with an auxiliary per-token tagger that is
  discarded) and saves it with ``save_pretrained`` (safetensors) plus a
  word-level tokenizer (``tokenizers`` WordLevel model, whitespace
  pre-tokenizer, ``[CLS] … [SEP]``, padded to 20 tokens) in the same
  directory. That directory is the frozen base every member shares. Its
  encoder knows what words mean; it has never seen a sentiment label.
* **Fine-tuning task.** Classify the **sentiment** (negative / neutral /
  positive) — a new head, and a rule the tags do not give (counts decide:
  two positive and one negative word is positive, one of each is neutral).
  1800 training sentences are split across the members with label skew (per
  class, a Dirichlet(0.5) share per member, as in ``digits.py``), plus 600
  held-out test sentences. 15 % of the training pool, chosen before the
  split, is each member's local validation data, so the union of the
  members' training portions is exactly the centralised training set.

Everything is a function of the seed, so every node process derives the same
data without exchanging it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from torch.utils.data import TensorDataset

LANGUAGE_SEED = 20240
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOPICS = ("sport", "finance", "health", "travel")
SENTIMENTS = ("negative", "neutral", "positive")
WORDS_PER_TOPIC = 40
WORDS_PER_SENTIMENT = 40
VOCAB_SIZE = 1000
MAX_LEN = 20
N_TRAIN = 1800
N_TEST = 600
VAL_FRACTION = 0.15
LABEL_NOISE = 0.03
MIN_WORDS, MAX_WORDS = 8, 16
MIXED_NEUTRAL = 0.3
MINORITY = 0.15
DIRICHLET_ALPHA = 0.5
MIN_SHARD = 100
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Language:
    topics: tuple[tuple[str, ...], ...]
    negative: tuple[str, ...]
    positive: tuple[str, ...]
    filler: tuple[str, ...]

    @property
    def words(self) -> list[str]:
        return [w for t in self.topics for w in t] + [*self.negative, *self.positive, *self.filler]


@functools.cache
def language() -> Language:
    """The demo's fixed vocabulary of pseudo-words (independent of the run's seed)."""
    rng = np.random.default_rng(LANGUAGE_SEED)
    onsets = [*"bdfgklmnprstvz", "ch", "sh", "tr", "pl"]
    vowels = [*"aeiou", "ai", "ou"]
    needed = VOCAB_SIZE - len(SPECIAL_TOKENS)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < needed:
        syllables = int(rng.integers(2, 4))
        word = "".join(str(rng.choice(onsets)) + str(rng.choice(vowels)) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    topic_end = len(TOPICS) * WORDS_PER_TOPIC
    topics = tuple(tuple(words[i : i + WORDS_PER_TOPIC]) for i in range(0, topic_end, WORDS_PER_TOPIC))
    negative = tuple(words[topic_end : topic_end + WORDS_PER_SENTIMENT])
    positive = tuple(words[topic_end + WORDS_PER_SENTIMENT : topic_end + 2 * WORDS_PER_SENTIMENT])
    return Language(topics, negative, positive, tuple(words[topic_end + 2 * WORDS_PER_SENTIMENT :]))


def sentences(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` sentences with their topic labels and (noisy) sentiment labels."""
    lang = language()
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, len(lang.filler) + 1)
    zipf /= zipf.sum()
    texts: list[str] = []
    topic_labels = rng.integers(0, len(TOPICS), size=n)
    sentiment_labels = rng.integers(0, len(SENTIMENTS), size=n)
    for topic, sentiment in zip(topic_labels, sentiment_labels, strict=True):
        words = list(rng.choice(lang.topics[topic], size=3, replace=False))
        if rng.random() < 0.3:
            other = (topic + int(rng.integers(1, len(TOPICS)))) % len(TOPICS)
            words.append(str(rng.choice(lang.topics[other])))
        if sentiment == 1:
            if rng.random() < MIXED_NEUTRAL:
                words += [str(rng.choice(lang.negative)), str(rng.choice(lang.positive))]
        else:
            main, minor = (lang.positive, lang.negative) if sentiment == 2 else (lang.negative, lang.positive)
            words += list(rng.choice(main, size=int(rng.integers(2, 4)), replace=False))
            if rng.random() < MINORITY:
                words.append(str(rng.choice(minor)))
        length = max(int(rng.integers(MIN_WORDS, MAX_WORDS + 1)), len(words))
        words += list(rng.choice(lang.filler, size=length - len(words), p=zipf))
        texts.append(" ".join(str(w) for w in rng.permutation(words)))
    flip = rng.random(n) < LABEL_NOISE
    noisy = np.where(flip, rng.integers(0, len(SENTIMENTS), size=n), sentiment_labels)
    return texts, topic_labels.astype(np.int64), noisy.astype(np.int64)


# ------------------------------------------------------------------ tokenizer


def build_tokenizer() -> Any:
    """Word-level tokenizer over the demo's vocabulary: whitespace split, [CLS] … [SEP], padded to 20."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *language().words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]", length=MAX_LEN)
    tokenizer.enable_truncation(MAX_LEN)
    return tokenizer


@functools.cache
def load_tokenizer(path: str) -> Any:
    """The tokenizer saved beside the base model (``path``: the directory or its tokenizer.json)."""
    from tokenizers import Tokenizer

    file = Path(path)
    tokenizer = Tokenizer.from_file(str(file / TOKENIZER_FILE if file.is_dir() else file))
    # Fixed length whatever the saved file says (transformers may store it without padding).
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]", length=MAX_LEN)
    tokenizer.enable_truncation(MAX_LEN)
    return tokenizer


def encode(tokenizer: Any, texts: list[str], labels: np.ndarray) -> TensorDataset:
    encodings = tokenizer.encode_batch(texts)
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return TensorDataset(input_ids, attention_mask, torch.from_numpy(labels))


# ------------------------------------------------------------------ the fine-tuning task


@dataclass(frozen=True)
class SentimentTask:
    texts: list[str]
    labels: np.ndarray
    is_val: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    shards: list[np.ndarray]


@functools.cache
def sentiment_task(shards: int, seed: int) -> SentimentTask:
    """The training pool split over ``shards`` members with label skew, plus the held-out test set."""
    texts, _, labels = sentences(N_TRAIN + N_TEST, seed)
    rng = np.random.default_rng(seed + 1)
    is_val = rng.random(N_TRAIN) < VAL_FRACTION
    pool = labels[:N_TRAIN]
    parts: list[list[int]] = [[] for _ in range(shards)]
    for _ in range(100):
        parts = [[] for _ in range(shards)]
        for label in range(len(SENTIMENTS)):
            idx = rng.permutation(np.flatnonzero(pool == label))
            share = rng.dirichlet([DIRICHLET_ALPHA] * shards)
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for member, piece in enumerate(np.split(idx, cuts)):
                parts[member].extend(piece.tolist())
        if min(len(p) for p in parts) >= min(MIN_SHARD, N_TRAIN // shards):
            break
    return SentimentTask(
        texts[:N_TRAIN],
        pool,
        is_val,
        texts[N_TRAIN:],
        labels[N_TRAIN:],
        [np.array(sorted(p), dtype=np.int64) for p in parts],
    )


def member_data(
    tokenizer: str, shard: int = 0, shards: int = 1, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """This member's (train, validation) datasets — the LoraTrainer ``data`` callable.

    ``shards = 1`` gives the whole training pool: the centralised baseline.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    task = sentiment_task(shards, seed)
    tok = load_tokenizer(tokenizer)
    rows = task.shards[shard]
    train_rows, val_rows = rows[~task.is_val[rows]], rows[task.is_val[rows]]
    return (
        encode(tok, [task.texts[i] for i in train_rows], task.labels[train_rows]),
        encode(tok, [task.texts[i] for i in val_rows], task.labels[val_rows]),
    )


def held_out_data(tokenizer: str, seed: int = 0) -> TensorDataset:
    """The held-out test set (never given to a member)."""
    task = sentiment_task(1, seed)
    return encode(load_tokenizer(tokenizer), task.test_texts, task.test_labels)


def label_counts(shards: int, seed: int) -> list[list[int]]:
    """Training examples per sentiment label, per member (shows the skew)."""
    task = sentiment_task(shards, seed)
    out = []
    for rows in task.shards:
        train_rows = rows[~task.is_val[rows]]
        out.append(np.bincount(task.labels[train_rows], minlength=len(SENTIMENTS)).tolist())
    return out


# ------------------------------------------------------------------ the pretrained base


@dataclass(frozen=True)
class Pretraining:
    steps: int
    #: Held-out pretraining sentences: fraction of the six category tags predicted right.
    tag_accuracy: float
    seconds: float


def categories(tokenizer: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining targets: per sentence, which word groups occur (multi-hot over topics, positive,
    negative); per token, its group (index into those six, 6 for a filler word, -100 for padding)."""
    lang = language()
    groups = [*lang.topics, lang.positive, lang.negative]
    per_token = torch.full_like(input_ids, len(groups))
    tags = []
    for index, group in enumerate(groups):
        hit = torch.isin(input_ids, torch.tensor([tokenizer.token_to_id(w) for w in group]))
        per_token[hit] = index
        tags.append(hit.any(dim=1))
    special = torch.tensor([tokenizer.token_to_id(t) for t in SPECIAL_TOKENS])
    per_token[torch.isin(input_ids, special)] = -100
    return torch.stack(tags, dim=1).float(), per_token


def create_base_model(
    out_dir: Path,
    seed: int = 0,
    steps: int = 400,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> Pretraining:
    """Pretrain a small BERT to tag word categories and save it (and the tokenizer) to ``out_dir``."""
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    started = time.monotonic()
    tokenizer = build_tokenizer()
    tags = [*TOPICS, "positive", "negative"]
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)},
        problem_type="multi_label_classification",
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    # Auxiliary per-token tagger: dense supervision that teaches the word embeddings their group
    # quickly; it is discarded, only the sentence classifier is saved.
    token_head = torch.nn.Linear(hidden, len(tags) + 1)
    # Pretraining sentences come from another seed than the fine-tuning task's.
    n_pre, n_eval = batch_size * 40, 512
    texts, topics, _ = sentences(n_pre + n_eval, seed + 7_000_001)
    x, mask, _ = encode(tokenizer, texts, topics).tensors
    y, y_tokens = categories(tokenizer, x)
    params = [*model.parameters(), *token_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, n_pre, (batch_size,), generator=generator)
        optimizer.zero_grad()
        out = model.bert(input_ids=x[batch], attention_mask=mask[batch])
        logits = model.classifier(model.dropout(out.pooler_output))
        token_logits = token_head(out.last_hidden_state)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch])
        loss = loss + torch.nn.functional.cross_entropy(
            token_logits.reshape(-1, token_logits.shape[-1]), y_tokens[batch].reshape(-1), ignore_index=-100
        )
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
    model.eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        predicted = model(input_ids=x[n_pre:], attention_mask=mask[n_pre:]).logits > 0
    accuracy = float((predicted == y[n_pre:].bool()).float().mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_LEN,
    )
    fast.save_pretrained(str(out_dir))
    load_tokenizer.cache_clear()
    return Pretraining(steps, round(accuracy, 4), round(time.monotonic() - started, 2))
