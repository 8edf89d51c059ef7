"""A toy tokenizer and the shared constants of the data tests."""

from __future__ import annotations

from collections.abc import Sequence

PAD_ID, UNK_ID, BOS_ID = 0, 1, 2
FIRST_CHAR_ID = 3  # printable ASCII 32..126 -> ids 3..97
NEWLINE_ID = FIRST_CHAR_ID + 95
FIRST_WORD_ID = NEWLINE_ID + 1
VOCAB_SIZE = 128


class ToyTokenizer:
    """Characters as tokens, except whole ``words`` (e.g. ``" positive"``) as one token each.

    Implements the part of the HF tokenizer interface that ``stiefel_peft.cli.encoding`` uses:
    ``encode(text, add_special_tokens)``, ``decode(ids)``, ``pad_token_id``.
    """

    def __init__(self, words: Sequence[str] = (), add_bos: bool = False) -> None:
        self.words = sorted(words, key=len, reverse=True)  # longest match first
        self.word_ids = {word: FIRST_WORD_ID + i for i, word in enumerate(words)}
        self.add_bos = add_bos
        self.pad_token_id = PAD_ID

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS_ID] if add_special_tokens and self.add_bos else []
        position = 0
        while position < len(text):
            word = next((w for w in self.words if text.startswith(w, position)), None)
            if word is not None:
                ids.append(self.word_ids[word])
                position += len(word)
                continue
            code = ord(text[position])
            if text[position] == "\n":
                ids.append(NEWLINE_ID)
            else:
                ids.append(FIRST_CHAR_ID + code - 32 if 32 <= code <= 126 else UNK_ID)
            position += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        by_id = {i: w for w, i in self.word_ids.items()}
        parts = []
        for i in ids:
            if i in by_id:
                parts.append(by_id[i])
            elif i == NEWLINE_ID:
                parts.append("\n")
            elif FIRST_CHAR_ID <= i < NEWLINE_ID:
                parts.append(chr(i - FIRST_CHAR_ID + 32))
        return "".join(parts)


LABEL_WORDS = (" negative", " positive")
TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
EXAMPLES = [
    {"text": "A joy from start to end.", "label": 1},
    {"text": "Dull.", "label": 0},
    {"text": "The cast is fine but the plot wanders off into nowhere for an hour.", "label": 0},
    {"text": "Bold, funny and warm", "label": 1},
    {"text": "x", "label": 1},
    {"text": "An over-long mess; skip it, and skip the sequel too.", "label": 0},
    {"text": "Lovely", "label": 1},
]
