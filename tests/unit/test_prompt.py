import pytest
import torch
from einops import rearrange

from comfyui_moa.moa_core.errors import ConditioningError
from comfyui_moa.moa_core.fuser import Fuser, FuserConfig
from comfyui_moa.moa_core.prompt import (
    PersonalPrompt,
    fuse_subjects,
    personal_context,
    subject_attention,
    subject_tokens,
)

L, D, E = 6, 4, 5  # prompt tokens, text width, image width
TOL = {"rtol": 1e-6, "atol": 1e-6}
CPU = torch.device("cpu")
TIMESTEPS = torch.tensor([10.0, 500.0, 900.0])  # one per batch row
ROWS = [0, 2]  # the cond rows of a 3-row batch


def images(seed: int = 0, subjects: int = 2) -> torch.Tensor:
    return torch.randn(subjects, E, generator=torch.Generator().manual_seed(seed))


def single(positions, subjects, image_embeds=None) -> PersonalPrompt:
    return PersonalPrompt.single(L, positions, subjects, images() if image_embeds is None else image_embeds)


def context(batch: int = 3, tokens: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, D, generator=torch.Generator().manual_seed(seed))


def fused(prompt, ctx, fuser, layer=1, rows=ROWS):
    tokens = subject_tokens(prompt, rows, ctx.shape[1], TIMESTEPS, CPU)
    return personal_context(ctx, tokens, fuse_subjects(ctx, tokens, fuser), layer)


@pytest.fixture
def fuser(perturb) -> Fuser:
    return perturb(Fuser(FuserConfig(D, E, 8, True, True, 2, 4)), seed=2, std=0.5).requires_grad_(False)


def test_prompt_rejects_a_position_beyond_the_prompt():
    with pytest.raises(ValueError, match="beyond the prompt's 6 tokens"):
        single([1, 6], [0, 0])


def test_prompt_ignores_the_position_of_an_unused_slot():
    prompt = PersonalPrompt(L, torch.tensor([[1, 99]]), torch.tensor([[0, -1]]), images()[None])
    assert prompt.positions.shape == (1, 2)


def test_prompt_rejects_a_subject_without_image_embedding():
    with pytest.raises(ValueError, match="no image embedding"):
        single([1, 2], [0, 2])


def test_prompt_rejects_positions_and_subjects_of_other_shapes():
    with pytest.raises(ValueError, match=r"\[rows, slots\]"):
        PersonalPrompt(L, torch.tensor([[1, 2]]), torch.tensor([[0]]), images()[None])
    with pytest.raises(ValueError, match="rows of positions"):
        PersonalPrompt(L, torch.tensor([[1, 2]]), torch.tensor([[0, 0]]), images())


def test_personal_context_fuses_exactly_the_subject_tokens_of_the_cond_rows(fuser):
    ctx = context()
    original = ctx.clone()
    out = fused(single([1, 4], [0, 1]), ctx, fuser)
    assert torch.equal(ctx, original)  # the input is not modified
    assert torch.equal(out[1], ctx[1])
    others = [i for i in range(L) if i not in (1, 4)]
    assert torch.equal(out[:, others], ctx[:, others])
    for row in ROWS:
        expected = fuser(ctx[row, [1, 4]], images(), TIMESTEPS[row], 1)
        torch.testing.assert_close(out[row, [1, 4]], expected, **TOL)
        assert not torch.allclose(out[row, [1, 4]], ctx[row, [1, 4]], atol=1e-3)


def test_untrained_fuser_leaves_the_context_bit_for_bit():
    ctx = context()
    assert torch.equal(fused(single([1, 4], [0, 1]), ctx, Fuser(FuserConfig(D, E, 8, True, True, 2, 4))), ctx)


def test_personal_context_fuses_every_copy_of_a_repeated_prompt(fuser):
    once = context()
    doubled = once.repeat(1, 2, 1)
    prompt = single([1, 4], [0, 1])
    out = fused(prompt, doubled, fuser)
    assert out.shape == (3, 2 * L, D)
    assert torch.equal(out[:, :L], out[:, L:])
    torch.testing.assert_close(out[:, :L], fused(prompt, once, fuser), **TOL)


@pytest.mark.parametrize("layer_conditioning", [True, False])
def test_one_fuser_call_for_every_layer_matches_a_call_per_layer(perturb, layer_conditioning):
    fuser = perturb(Fuser(FuserConfig(D, E, 8, True, layer_conditioning, 3, 4)), seed=3, std=0.5)
    ctx = context()
    tokens = subject_tokens(single([1, 4], [0, 1]), ROWS, L, TIMESTEPS, CPU)
    words = ctx[tokens.rows, tokens.tokens]
    every_layer = fuse_subjects(ctx, tokens, fuser)
    assert every_layer.shape == (3 if layer_conditioning else 1, 4, D)
    for layer in range(3):
        expected = fuser(words, tokens.images, tokens.timestep, layer)
        out = personal_context(ctx, tokens, every_layer, layer)[tokens.rows, tokens.tokens]
        torch.testing.assert_close(out, expected, **TOL)


def test_context_of_a_length_that_is_no_multiple_of_the_prompt_raises():
    with pytest.raises(ConditioningError, match="MoAApply"):
        subject_tokens(single([1], [0]), ROWS, L + 1, TIMESTEPS, CPU)


def test_a_context_changed_after_planning_raises(fuser):
    tokens = subject_tokens(single([1], [0]), ROWS, L, TIMESTEPS, CPU)
    with pytest.raises(ConditioningError, match="another node changes the text context"):
        fuse_subjects(context(tokens=2 * L), tokens, fuser)


def test_each_subject_gets_its_own_image_embedding(fuser):
    ctx = context()
    ctx[:, 4:6] = ctx[:, 1:3]  # both subjects have the same two words: only the images tell them apart
    embeds = images()
    out = fused(single([1, 2, 4, 5], [0, 0, 1, 1], embeds), ctx, fuser)
    swapped = fused(single([1, 2, 4, 5], [0, 0, 1, 1], embeds.flip(0)), ctx, fuser)
    assert not torch.allclose(out[:, 1:3], out[:, 4:6], atol=1e-3)
    torch.testing.assert_close(swapped[:, 1:3], out[:, 4:6], **TOL)
    torch.testing.assert_close(swapped[:, 4:6], out[:, 1:3], **TOL)


def test_row_wise_prompts_bind_each_row_its_own_subjects_and_skip_unused_slots(fuser):
    embeds = torch.stack([images(seed=5), images(seed=6)])  # row 0 and row 1 of the prompt
    prompt = PersonalPrompt(L, torch.tensor([[1, 3], [2, 0]]), torch.tensor([[0, 1], [1, -1]]), embeds)
    ctx = context()
    out = fused(prompt, ctx, fuser)  # prompt rows go to batch rows 0 and 2
    changed = (out != ctx).any(dim=-1).nonzero().tolist()
    assert changed == [[0, 1], [0, 3], [2, 2]]
    torch.testing.assert_close(out[2, 2], fuser(ctx[2, 2], embeds[1, 1], TIMESTEPS[2], 1), **TOL)


def test_a_row_wise_prompt_for_another_batch_size_raises():
    embeds = images()[None].repeat(3, 1, 1)
    prompt = PersonalPrompt(L, torch.tensor([[1], [2], [3]]), torch.tensor([[0], [0], [0]]), embeds)
    with pytest.raises(ConditioningError, match="3 rows but the batch has 2 cond rows"):
        subject_tokens(prompt, ROWS, L, TIMESTEPS, CPU)


def test_no_cond_rows_or_no_subjects_leave_the_context_unchanged(fuser):
    ctx = context()
    assert torch.equal(fused(single([1], [0]), ctx, fuser, rows=[]), ctx)
    assert torch.equal(fused(single([], []), ctx, fuser), ctx)


def test_subject_attention_is_the_softmax_column_of_each_subject_token():
    heads, n, t, d = 2, 4, L, 3
    generator = torch.Generator().manual_seed(9)
    q, k = torch.randn(3, n, heads * d, generator=generator), torch.randn(3, t, heads * d, generator=generator)
    tokens = subject_tokens(single([1, 4], [0, 1]), ROWS, L, TIMESTEPS, CPU)
    probs = subject_attention(q, k, heads, tokens)
    assert probs.shape == (4, heads, n)
    qh = rearrange(q, "b n (h d) -> b h n d", h=heads)
    kh = rearrange(k, "b t (h d) -> b h t d", h=heads)
    full = ((qh @ kh.transpose(-1, -2)) / d**0.5).softmax(dim=-1)  # [b, h, n, t]
    for i, (row, token) in enumerate(zip(tokens.rows.tolist(), tokens.tokens.tolist(), strict=True)):
        torch.testing.assert_close(probs[i], full[row, :, :, token], rtol=1e-5, atol=1e-6)
