"""Tier 2: subject words found through ComfyUI's real CLIP tokenizer."""

import pytest
import torch
from safetensors.torch import save_file

from comfyui_moa.moa_core import ConditioningError
from comfyui_moa.nodes.host.text import bind_subject_words, parse_subject_words
from moa_testing.tiny import tiny_clip, tiny_sdxl_clip


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def clip(request):
    """SD1.5's CLIP-L, or SDXL's CLIP-L + OpenCLIP-bigG pair: every test below holds for both."""
    return tiny_clip() if request.param == "sd15" else tiny_sdxl_clip()


@pytest.fixture(scope="module")
def sdxl_clip():
    return tiny_sdxl_clip()


def token_ids(clip, text):
    return [entry[0] for window in clip.tokenize(text)["l"] for entry in window]


def word_tokens(clip, word):
    return clip.tokenizer.clip_l.tokenizer(word)["input_ids"][1:-1]


def test_each_subject_binds_to_its_word(clip):
    bound = bind_subject_words(clip, "a man and a woman at the beach", ["man", "woman"])
    ids = token_ids(clip, "a man and a woman at the beach")
    assert [[ids[p] for p in positions] for positions in bound.positions] == [
        word_tokens(clip, "man"),
        word_tokens(clip, "woman"),
    ]
    assert bound.positions == [[2], [5]]  # <start> a man and a woman
    assert bound.prompt_length == 77


def test_a_word_is_not_found_inside_another_word(clip):
    # CLIP splits "mailman" into "mail" + "man</w>": that "man</w>" is no word of its own
    assert len(word_tokens(clip, "mailman")) == 2 and word_tokens(clip, "mailman")[1:] == word_tokens(clip, "man")
    bound = bind_subject_words(clip, "a mailman next to a man", ["man"])
    assert bound.positions == [[7]]  # <start> a mail man next to a man


def test_weighting_syntax_and_punctuation_keep_the_word(clip):
    bound = bind_subject_words(clip, "portrait of a (man:1.3), smiling", ["man"])
    assert bound.positions == [[4]]
    weights = [entry[1] for entry in bound.tokens["l"][0]]
    assert weights[4] == pytest.approx(1.3)


def test_every_occurrence_binds_unless_one_is_chosen(clip):
    text = "a man reads, the man smiles"
    assert bind_subject_words(clip, text, ["man"]).positions == [[2, 6]]
    assert bind_subject_words(clip, text, ["man"], occurrences=[1]).positions == [[6]]
    with pytest.raises(ConditioningError, match="occurs 2 times, not 3"):
        bind_subject_words(clip, text, ["man"], occurrences=[2])


def test_a_phrase_binds_to_all_its_tokens(clip):
    bound = bind_subject_words(clip, "an old man with a hat", ["old man"])
    assert bound.positions == [[2, 3]]


def test_words_beyond_the_first_77_tokens_are_found(clip):
    filler = ", ".join(["a very detailed painting"] * 20)
    text = f"{filler}, a woman in red"
    bound = bind_subject_words(clip, text, ["woman"])
    assert bound.prompt_length % 77 == 0 and bound.prompt_length > 77
    ids = token_ids(clip, text)
    (position,) = bound.positions[0]
    assert position >= 77 and ids[position] == word_tokens(clip, "woman")[0]


def test_a_missing_word_names_the_input_and_the_fix(clip):
    with pytest.raises(ConditioningError, match=r"subject_words: 'dog' is not in the prompt; add it to the prompt"):
        bind_subject_words(clip, "a man on a bench", ["dog"])


def test_an_empty_prompt_names_the_input(clip):
    with pytest.raises(ConditioningError, match="text: the prompt is empty"):
        bind_subject_words(clip, "   ", ["man"])


@pytest.mark.parametrize(
    ("text", "message"), [("man,,woman", "empty entry"), ("", "empty entry"), ("man, Man", "twice")]
)
def test_subject_word_lists_are_checked(text, message):
    with pytest.raises(ConditioningError, match=message):
        parse_subject_words(text, "subject_words")


def test_subject_word_list_is_split_on_commas():
    assert parse_subject_words(" man , old woman", "subject_words") == ["man", "old woman"]


LONG = ", ".join(["a detailed painting"] * 20) + ", a woman, a man"


@pytest.mark.parametrize("text", ["a (man:1.2) and a woman", LONG])
def test_sdxl_words_sit_at_the_same_positions_in_both_streams_and_in_the_joined_context(sdxl_clip, text):
    bound = bind_subject_words(sdxl_clip, text, ["man", "woman"])
    for stream in ("g", "l"):
        ids = [entry[0] for window in bound.tokens[stream] for entry in window]
        assert [[ids[p] for p in positions] for positions in bound.positions] == [
            word_tokens(sdxl_clip, "man"),
            word_tokens(sdxl_clip, "woman"),
        ]
    context = sdxl_clip.encode_from_tokens_scheduled(bound.tokens)[0][0]
    assert context.shape == (1, bound.prompt_length, 2048)  # CLIP-L's 768 then bigG's 1280, token by token


def test_an_embedding_that_shifts_one_sdxl_stream_is_refused_naming_both(tmp_path):
    # bigG gets three vectors, CLIP-L two: the words after it sit one token apart in the two streams
    generator = torch.Generator().manual_seed(0)
    vectors = {"clip_g": torch.randn(3, 1280, generator=generator), "clip_l": torch.randn(2, 768, generator=generator)}
    save_file(vectors, str(tmp_path / "lopsided.safetensors"))
    clip = tiny_sdxl_clip(embedding_directory=str(tmp_path))
    message = r"subject_words: .*different token positions .*\(g: \[\[8\]\]; l: \[\[7\]\]\)"
    with pytest.raises(ConditioningError, match=message):
        bind_subject_words(clip, "embedding:lopsided a photo of a man", ["man"])
    assert bind_subject_words(clip, "a photo of a man, embedding:lopsided", ["man"]).positions == [[5]]
