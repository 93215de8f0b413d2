"""Find each subject's word in a prompt, through the CLIP model's own tokenizer.

A word is found as its token sequence starting at a word boundary, so prompt weighting like
`(man:1.2)`, punctuation, embeddings elsewhere in the prompt and prompts over 77 tokens all work;
several-word subjects ("old man") too. Positions count tokens across the prompt's 77-token
windows laid end to end, which is how the text embedding lays them out.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from ...moa_core import ConditioningError

END_OF_WORD = "</w>"  # CLIP's BPE marks the last token of every word


@dataclass(frozen=True)
class BoundPrompt:
    tokens: dict  # ComfyUI tokens for encoding (without word ids)
    positions: list[list[int]]  # per subject word: its tokens' positions
    prompt_length: int  # tokens in the encoded prompt (a multiple of the window size)


def parse_subject_words(text: str, input_name: str) -> list[str]:
    """'man, woman' -> ['man', 'woman']: one word (or phrase) per subject, in subject order."""
    words = [w.strip() for w in text.split(",")]
    if not text.strip() or any(not w for w in words):
        raise ConditioningError(
            f"{input_name}: {text!r} has an empty entry; give one word per subject, "
            "separated by commas (e.g. 'man, woman')"
        )
    seen = set()
    for word in words:
        if word.lower() in seen:
            raise ConditioningError(f"{input_name}: {word!r} is listed twice; each subject needs its own word")
        seen.add(word.lower())
    return words


def bind_subject_words(
    clip,
    text: str,
    words: Sequence[str],
    input_names: tuple[str, str] = ("text", "subject_words"),
    occurrences: Sequence[int | None] | None = None,
) -> BoundPrompt:
    """Tokenize `text` with `clip` and find every word of `words` in it, in each of the model's text
    encoders' token streams (SDXL has two), which must agree.

    Each word binds to all its occurrences, or with `occurrences[i]` set, to that one (0-based).
    """
    if not text.strip():
        raise ConditioningError(
            f"{input_names[0]}: the prompt is empty; write a prompt that names each subject (e.g. 'a photo of a man')"
        )
    tokens = clip.tokenize(text)
    streams = {key: _stream_positions(clip, tokens, key, words, input_names, occurrences) for key in tokens}
    positions, lengths = zip(*streams.values(), strict=True)
    if any(p != positions[0] for p in positions):
        described = "; ".join(f"{key}: {p}" for key, (p, _) in streams.items())
        raise ConditioningError(
            f"{input_names[1]}: the subject words sit at different token positions in the model's text encoders "
            f"({described}): an embedding in the prompt has a different number of vectors for each encoder, or "
            "vectors for one only. Use an embedding made for every text encoder of this model, or remove it"
        )
    # Several encoders' outputs are joined width-wise, cut to the shortest (SDXL: CLIP-L and OpenCLIP-bigG).
    return BoundPrompt(tokens, positions[0], min(lengths))


def _stream_positions(
    clip,
    tokens: dict,
    key: str,
    words: Sequence[str],
    input_names: tuple[str, str],
    occurrences: Sequence[int | None] | None,
) -> tuple[list[list[int]], int]:
    """Every word's token positions in one text encoder's stream, and the stream's length."""
    tokenizer = getattr(clip.tokenizer, f"clip_{key}", None) or clip.tokenizer
    windows = [[entry[0] for entry in window] for window in tokens[key]]
    window_size = len(windows[0])
    positions = []
    for i, word in enumerate(words):
        found = _find(tokenizer, windows, _word_ids(tokenizer, word))
        if not found:
            raise ConditioningError(
                f"{input_names[1]}: {word!r} is not in the prompt; add it to the prompt or change {input_names[1]}"
            )
        which = None if occurrences is None else occurrences[i]
        if which is not None:
            if which >= len(found):
                raise ConditioningError(f"{input_names[1]}: {word!r} occurs {len(found)} times, not {which + 1}")
            found = [found[which]]
        positions.append([w * window_size + p for w, start, length in found for p in range(start, start + length)])
    return positions, window_size * len(windows)


def _word_ids(tokenizer, word: str) -> list[int]:
    ids = tokenizer.tokenizer(word)["input_ids"][tokenizer.tokens_start : -1]
    if not ids:
        raise ConditioningError(f"subject word {word!r} has no tokens")
    return ids


def _find(tokenizer, windows: list[list], ids: list[int]) -> list[tuple[int, int, int]]:
    """(window, start, length) of every occurrence of the token sequence `ids` at a word start."""
    hits = []
    for w, window in enumerate(windows):
        for start in range(len(window) - len(ids) + 1):
            candidate = window[start : start + len(ids)]
            same = all(isinstance(t, int) and t == i for t, i in zip(candidate, ids, strict=True))
            if same and _starts_word(tokenizer, window, start):
                hits.append((w, start, len(ids)))
    return hits


def _starts_word(tokenizer, window: list, start: int) -> bool:
    if start == 0:
        return True
    before = window[start - 1]
    if not isinstance(before, int) or before == tokenizer.start_token:
        return True
    return tokenizer.tokenizer.convert_ids_to_tokens(before).endswith(END_OF_WORD)
