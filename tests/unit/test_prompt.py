import pytest
import torch

from comfyui_moa.moa_core.errors import ConditioningError
from comfyui_moa.moa_core.fuser import Fuser, FuserConfig
from comfyui_moa.moa_core.prompt import PersonalPrompt, personal_context

L, D, E = 6, 4, 5  # prompt tokens, text width, image width
TOL = {"rtol": 1e-6, "atol": 1e-6}


def images(seed: int = 0, subjects: int = 2) -> torch.Tensor:
    return torch.randn(subjects, E, generator=torch.Generator().manual_seed(seed))


def prompt(positions, subjects, image_embeds=None) -> PersonalPrompt:
    image_embeds = images() if image_embeds is None else image_embeds
    long = torch.long
    return PersonalPrompt(L, torch.tensor(positions, dtype=long), torch.tensor(subjects, dtype=long), image_embeds)


def context(batch: int = 3, tokens: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fuser(perturb) -> Fuser:
    return perturb(Fuser(FuserConfig(D, E, 8, True, True, 2, 4)), seed=2, std=0.5).requires_grad_(False)


T = torch.tensor([10.0, 900.0])
ROWS = torch.tensor([0, 2])


def test_prompt_rejects_a_position_beyond_the_prompt():
    with pytest.raises(ValueError, match="beyond the prompt's 6 tokens"):
        prompt([1, 6], [0, 0])


def test_prompt_rejects_a_subject_without_image_embedding():
    with pytest.raises(ValueError, match="no image embedding"):
        prompt([1, 2], [0, 2])


@pytest.mark.parametrize(("positions", "subjects"), [([1, 2], [0]), ([[1, 2]], [[0, 0]])])
def test_prompt_rejects_positions_and_subjects_of_other_shapes(positions, subjects):
    with pytest.raises(ValueError, match="1-D and of one length"):
        prompt(positions, subjects)


def test_personal_context_fuses_exactly_the_subject_tokens_of_the_chosen_rows(fuser):
    ctx = context()
    original = ctx.clone()
    p = prompt([1, 4], [0, 1])
    out = personal_context(ctx, ROWS, p, fuser, T, 1)
    assert torch.equal(ctx, original)  # the input is not modified
    assert torch.equal(out[1], ctx[1])
    others = [i for i in range(L) if i not in (1, 4)]
    assert torch.equal(out[:, others], ctx[:, others])
    expected = fuser(ctx[ROWS][:, [1, 4]], images()[[0, 1]], T, 1)
    torch.testing.assert_close(out[ROWS][:, [1, 4]], expected, **TOL)
    assert not torch.allclose(out[ROWS][:, [1, 4]], ctx[ROWS][:, [1, 4]], atol=1e-3)


def test_personal_context_fuses_every_copy_of_a_repeated_prompt(fuser):
    single = context()
    doubled = single.repeat(1, 2, 1)
    p = prompt([1, 4], [0, 1])
    out = personal_context(doubled, ROWS, p, fuser, T, 0)
    assert out.shape == (3, 2 * L, D)
    assert torch.equal(out[:, :L], out[:, L:])
    torch.testing.assert_close(out[:, :L], personal_context(single, ROWS, p, fuser, T, 0), **TOL)
    for pos in (1, 4, L + 1, L + 4):
        assert not torch.allclose(out[ROWS][:, pos], doubled[ROWS][:, pos], atol=1e-3)


def test_context_of_a_length_that_is_no_multiple_of_the_prompt_raises(fuser):
    with pytest.raises(ConditioningError, match="MoAApply"):
        personal_context(context(tokens=L + 1), ROWS, prompt([1], [0]), fuser, T, 0)


def test_each_subject_gets_its_own_image_embedding(fuser):
    ctx = context()
    ctx[:, 4:6] = ctx[:, 1:3]  # both subjects have the same two words: only the images tell them apart
    embeds = images()
    out = personal_context(ctx, ROWS, prompt([1, 2, 4, 5], [0, 0, 1, 1], embeds), fuser, T, 1)
    swapped = personal_context(ctx, ROWS, prompt([1, 2, 4, 5], [0, 0, 1, 1], embeds.flip(0)), fuser, T, 1)
    assert not torch.allclose(out[:, 1:3], out[:, 4:6], atol=1e-3)
    torch.testing.assert_close(swapped[:, 1:3], out[:, 4:6], **TOL)
    torch.testing.assert_close(swapped[:, 4:6], out[:, 1:3], **TOL)


def test_no_rows_or_no_subjects_leave_the_context_unchanged(fuser):
    ctx = context()
    assert torch.equal(personal_context(ctx, torch.tensor([], dtype=torch.long), prompt([1], [0]), fuser, T, 0), ctx)
    assert torch.equal(personal_context(ctx, ROWS, prompt([], []), fuser, T, 0), ctx)
