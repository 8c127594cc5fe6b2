"""Tokenizers for post-training Hugging Face models: load one from a local folder, or train a byte-level BPE.

A trained tokenizer has the special tokens SPECIAL_TOKENS and CHAT_TEMPLATE: a conversation is bos, then
each turn as `<|role|>content<|end|>`; with `add_generation_prompt` it ends in `<|assistant|>`. An
assistant's content and its `<|end|>` sit inside `{% generation %}`, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly them: `<|end|>` is the
end-of-turn token the model learns to emit (`<|eos|>` separates pretraining documents). There are no
newlines between a marker and the content: special tokens are split off before byte-level
pre-tokenization, so a turn's content is tokenized on its own and no token straddles a turn boundary.

The folder holds tokenizer.json and tokenizer_config.json (with chat_template; tokenizer_class
TokenizersBackend, which transformers >= 5 reads). Training is cached: `out_dir/orchestrator_tokenizer.json`
records a digest of the texts, vocab_size and FORMAT; the same inputs reuse the folder. The record is
written last, so an interrupted save retrains.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from orchestrator.config import ConfigError

BOS, EOS, PAD, END_OF_TURN = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_TOKENS.values()]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% elif message['role'] == 'system' or message['role'] == 'user' %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
FORMAT = 1            # bump when SPECIAL_TOKENS, CHAT_TEMPLATE or the model change: cached tokenizers retrain
_RECORD = "orchestrator_tokenizer.json"
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_tokenizer(path: str | Path):
    """A transformers tokenizer from a local folder (tokenizer.json, tokenizer_config.json, ...); never the hub."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"tokenizer path {str(folder)!r} is not a folder; give a local folder holding "
                          f"tokenizer.json and tokenizer_config.json (as save_pretrained writes them)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"tokenizer path {str(folder)!r}: transformers could not load a tokenizer from it: "
                          f"{e}") from e


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """A byte-level BPE tokenizer trained on `texts`, saved as a transformers tokenizer folder `out_dir`.

    The texts are held in memory once (they are hashed before training decides whether it is needed), so
    give a sample of a large corpus. Returns the tokenizer as loaded back from `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is below the 256 byte tokens plus "
                          f"{len(SPECIAL_TOKENS)} special tokens; use at least {256 + len(SPECIAL_TOKENS)}")
    texts = list(texts)
    digest = _texts_digest(texts, vocab_size)
    out = Path(out_dir).expanduser()
    if _recorded_digest(out) == digest:
        return load_tokenizer(out)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  extra_special_tokens=[END_OF_TURN, *ROLE_TOKENS.values()])
    tok.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    for stale in (_RECORD, "chat_template.jinja"):     # the jinja file would override the config's template
        (out / stale).unlink(missing_ok=True)
    tok.save_pretrained(str(out), save_jinja_files=False)   # chat_template inside tokenizer_config.json
    (out / _RECORD).write_text(json.dumps({"texts_vocab_sha256": digest, "vocab_size": vocab_size,
                                           "num_texts": len(texts), "format": FORMAT}, indent=1))
    return load_tokenizer(out)


def _texts_digest(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"bpe-format-{FORMAT}-vocab-{vocab_size}\0".encode())
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))     # length-prefixed: ["ab"] and ["a", "b"] differ
        h.update(raw)
    return h.hexdigest()


def _recorded_digest(out: Path) -> str | None:
    try:
        record = json.loads((out / _RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not (out / "tokenizer.json").is_file():
        return None
    return record.get("texts_vocab_sha256")


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides token ids: the tokenizer model, special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a tokenizer without a `tokenizers` backend: its vocabulary and added tokens
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(t) for t in tokenizer.all_special_tokens]).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def has_generation_block(tokenizer) -> bool:
    """Whether the chat template marks assistant tokens (needed for return_assistant_tokens_mask)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and _GENERATION.search(template) is not None
