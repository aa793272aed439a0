"""What every family's tiny random models share: the text width and length, the latent channels and a T5
tokenizer over a small word list (imports nothing from the family modules, which import it)."""

from __future__ import annotations

TINY_WORDS = (
    "a the red blue green yellow white black ball cube sphere box block ring toy car bottle cup "
    "falls drops bounces rolls slides spins moves swings flies floats sinks collides hits stops "
    "left right up down across over under onto into off floor table ramp wall water air slowly "
    "quickly and on in of with from to"
).split()

TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 4
TINY_TEXT_LENGTH = 226  # CogVideoX's max_text_seq_length: the 2B sincos table assumes exactly this many text tokens


def tiny_tokenizer():
    """A T5 tokenizer (unigram over a small word list plus single letters, so any caption tokenises)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -float(rank + 1)) for rank, word in enumerate(TINY_WORDS)]
    vocab += [("\u2581", -60.0)] + [(letter, -80.0) for letter in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)
