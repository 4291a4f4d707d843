"""The byte-level tokenizer of the tiny training job and of generation from its checkpoints.

Bytes 1..254 are text (valid UTF-8 never contains 0xFF; it holds 0x00 only for the character
U+0000, which `tokenize` refuses); 0 is end-of-document, 255 pad.
It is also the tokenizer object Megatron's GPTDataset needs (eod, pad, vocab_size, identifiers).
"""

from __future__ import annotations

from typing import List

EOD, PAD, VOCAB = 0, 255, 256


class ByteTokenizer:
    eod, pad, vocab_size = EOD, PAD, VOCAB
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": VOCAB}

    def tokenize(self, text: str) -> List[int]:
        if "\x00" in text:  # (its byte is the end-of-document id: it would end the document)
            raise ValueError(f"text holds the character U+0000 at position {text.index(chr(0))}: "
                             "its byte 0 is this tokenizer's end-of-document id; allowed is text "
                             "without U+0000")
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 255).decode("utf-8", errors="replace")
